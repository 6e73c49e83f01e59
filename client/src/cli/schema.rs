//! `portrait schema show|apply`.

use std::path::Path;

use portrait_client::portrait_proto::v1::FamilySpec;
use portrait_client::PortraitClient;

use super::{format, read_input};

/// The schema as TOML, headed by its version as a TOML comment so the output
/// can be edited and applied again.
pub async fn show(client: &PortraitClient) -> anyhow::Result<String> {
    let schema = client.get_schema().await?;
    let mut out = format!("# schema version {}\n{}", schema.version, schema.toml);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

pub async fn apply(endpoint: &super::Target, file: &Path, dry_run: bool) -> anyhow::Result<String> {
    let toml = read_input(file)?;
    let client = endpoint.connect().await?;
    let response = client.apply_schema(toml, dry_run).await?;
    let head = if dry_run {
        format!("schema is valid (dry run; current version {})", response.version)
    } else {
        format!("schema version {} applied", response.version)
    };
    Ok(format!("{head}\n{}{}", families(&response.families), unchecked(&response.unchecked_nodes)))
}

/// The warning for nodes that did not answer the build check.
fn unchecked(nodes: &[u64]) -> String {
    if nodes.is_empty() {
        return String::new();
    }
    let ids: Vec<String> = nodes.iter().map(u64::to_string).collect();
    format!(
        "warning: node(s) {} did not answer the build check: should one run a build that refuses this schema, \
         it stops at the schema's entry when it comes back (docs/operations.md, \"Upgrades and on-disk formats\")\n",
        ids.join(", ")
    )
}

fn families(families: &[FamilySpec]) -> String {
    let width = families.iter().map(|f| f.name.len()).max().unwrap_or(0);
    families
        .iter()
        .map(|f| format!("  {:<width$}  ttl={}  history={}\n", f.name, format::ttl(f.ttl_ms), f.history_len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_families_aligned() {
        let specs = [
            FamilySpec { name: "browse".into(), ttl_ms: 30 * 86_400_000, history_len: 20 },
            FamilySpec { name: "registration".into(), ttl_ms: 0, history_len: 1 },
        ];
        let expected = "  browse        ttl=30d  history=20\n  registration  ttl=never  history=1\n";
        assert_eq!(families(&specs), expected);
    }

    #[test]
    fn names_the_nodes_that_did_not_check() {
        assert_eq!(unchecked(&[]), "");
        let warning = unchecked(&[2, 5]);
        assert!(warning.starts_with("warning: node(s) 2, 5 did not answer the build check"), "{warning}");
    }
}
