//! TOML → [`Schema`] with validation. Errors name the field and the reason.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Aggregation, FamilySpec, FeatureSpec, Schema, TagSpec, ValueType};
use crate::duration::{parse_duration_ms, MINUTE_MS, YEAR_MS};
use crate::engine::expr::RESERVED;
use crate::limits::{
    MAX_ATTRS_PER_EVENT, MAX_ATTR_NAME_BYTES, MAX_FAMILIES, MAX_FEATURES, MAX_HISTORY_LEN, MAX_SCHEMA_BYTES,
    MAX_TAGS,
};
use crate::validate::{shown, shown_name};

/// Why a schema was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("schema is not valid TOML: {0}")]
    Toml(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid { field: field.into(), reason: reason.into() }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    families: BTreeMap<String, RawFamily>,
    #[serde(default)]
    features: BTreeMap<String, RawFeature>,
    #[serde(default)]
    tags: BTreeMap<String, RawTag>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeature {
    family: String,
    agg: String,
    attr: Option<String>,
    window: Option<String>,
    #[serde(rename = "where")]
    filter: Option<String>,
    #[serde(rename = "type")]
    value_type: Option<String>,
    anchor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    rule: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    dedupe_window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFamily {
    ttl: String,
    #[serde(default)]
    history: u32,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

const DEFAULT_DEDUPE_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;
const MAX_TTL_MS: i64 = 100 * YEAR_MS;

pub(super) fn parse(text: &str) -> Result<Schema, SchemaError> {
    if text.len() > MAX_SCHEMA_BYTES {
        return Err(invalid(
            "schema",
            format!("{} bytes is over the limit of {MAX_SCHEMA_BYTES}", text.len()),
        ));
    }
    let raw: RawSchema =
        toml::from_str(text).map_err(|e| SchemaError::Toml(e.to_string().trim().to_string()))?;
    if raw.families.is_empty() {
        return Err(invalid("families", "at least one family is required"));
    }
    if raw.families.len() > MAX_FAMILIES {
        return Err(invalid(
            "families",
            format!("{} families is over the limit of {MAX_FAMILIES}", raw.families.len()),
        ));
    }
    let mut families = BTreeMap::new();
    for (name, fam) in raw.families {
        families.insert(name.clone(), family_spec(&name, fam)?);
    }
    if raw.features.len() > MAX_FEATURES {
        return Err(invalid(
            "features",
            format!("{} features is over the limit of {MAX_FEATURES}", raw.features.len()),
        ));
    }
    if raw.tags.len() > MAX_TAGS {
        return Err(invalid("tags", format!("{} tags is over the limit of {MAX_TAGS}", raw.tags.len())));
    }
    let mut features = BTreeMap::new();
    for (name, f) in raw.features {
        features.insert(name.clone(), feature_spec(&name, f, &families)?);
    }
    let mut tags = BTreeMap::new();
    for (name, t) in raw.tags {
        let field = format!("tags.{}", shown_name(&name));
        if !valid_name(&name) {
            return Err(invalid(&field, "name must match [a-z][a-z0-9_]{0,31}"));
        }
        if features.contains_key(&name) {
            return Err(invalid(&field, format!("a feature is also named {name:?}")));
        }
        tags.insert(name, TagSpec { rule: t.rule });
    }
    let dedupe_window_ms = match raw.ingest.dedupe_window {
        None => DEFAULT_DEDUPE_WINDOW_MS,
        Some(text) => {
            let ms = parse_duration_ms(&text).map_err(|e| invalid("ingest.dedupe_window", e))?;
            if !(1..=MAX_TTL_MS).contains(&ms) {
                return Err(invalid("ingest.dedupe_window", "must be between 1ms and 100y"));
            }
            ms
        }
    };
    Ok(Schema { families, features, tags, dedupe_window_ms, toml: text.to_string() })
}

const MAX_WINDOW_MS: i64 = 10 * YEAR_MS;

fn feature_spec(
    name: &str,
    raw: RawFeature,
    families: &BTreeMap<String, FamilySpec>,
) -> Result<FeatureSpec, SchemaError> {
    let field = format!("features.{}", shown_name(name));
    if !valid_name(name) {
        return Err(invalid(&field, "name must match [a-z][a-z0-9_]{0,31}"));
    }
    if !families.contains_key(&raw.family) {
        return Err(invalid(format!("{field}.family"), format!("unknown family {}", shown(&raw.family))));
    }
    let agg = match raw.agg.as_str() {
        "count" => Aggregation::Count,
        "sum" => Aggregation::Sum,
        "min" => Aggregation::Min,
        "max" => Aggregation::Max,
        "avg" => Aggregation::Avg,
        "distinct_count" => Aggregation::DistinctCount,
        "first_time" => Aggregation::FirstTime,
        "last_time" => Aggregation::LastTime,
        "last_value" => Aggregation::LastValue,
        "top_k" => Aggregation::TopK,
        other => {
            let known = "count, sum, min, max, avg, distinct_count, first_time, last_time, last_value, top_k";
            return Err(invalid(
                format!("{field}.agg"),
                format!("unknown aggregation {} (use one of: {known})", shown(other)),
            ));
        }
    };
    let needs_attr = !matches!(agg, Aggregation::Count | Aggregation::FirstTime | Aggregation::LastTime);
    match (&raw.attr, needs_attr) {
        (None, true) => {
            return Err(invalid(format!("{field}.attr"), format!("required for agg = {:?}", raw.agg)))
        }
        (Some(_), false) => {
            return Err(invalid(format!("{field}.attr"), format!("not used by agg = {:?}", raw.agg)))
        }
        _ => {}
    }
    let window_ms = match raw.window.as_deref() {
        None | Some("lifetime") => None,
        Some(text) => {
            let ms = parse_duration_ms(text).map_err(|e| invalid(format!("{field}.window"), e))?;
            if !(MINUTE_MS..=MAX_WINDOW_MS).contains(&ms) {
                return Err(invalid(
                    format!("{field}.window"),
                    "must be between 1m and 10y, or \"lifetime\"",
                ));
            }
            Some(ms)
        }
    };
    let value_type = match raw.value_type.as_deref() {
        None => ValueType::Str,
        Some(t) if agg == Aggregation::LastValue => {
            value_type(t).map_err(|e| invalid(format!("{field}.type"), e))?
        }
        Some(_) => return Err(invalid(format!("{field}.type"), "only used by agg = \"last_value\"")),
    };
    let anchor_first = match raw.anchor.as_deref() {
        None | Some("now") => false,
        Some("first") if agg == Aggregation::Count && window_ms.is_some() => true,
        Some("first") => {
            return Err(invalid(format!("{field}.anchor"), "\"first\" needs agg = \"count\" and a window"))
        }
        Some(other) => {
            return Err(invalid(
                format!("{field}.anchor"),
                format!("unknown anchor {} (use \"now\" or \"first\")", shown(other)),
            ))
        }
    };
    Ok(FeatureSpec {
        family: raw.family,
        agg,
        attr: raw.attr,
        window_ms,
        filter: raw.filter,
        value_type,
        anchor_first,
    })
}

fn value_type(text: &str) -> Result<ValueType, String> {
    match text {
        "str" => Ok(ValueType::Str),
        "num" => Ok(ValueType::Num),
        "bool" => Ok(ValueType::Bool),
        other => Err(format!("unknown type {} (use str, num or bool)", shown(other))),
    }
}

fn family_spec(name: &str, raw: RawFamily) -> Result<FamilySpec, SchemaError> {
    let field = format!("families.{}", shown_name(name));
    if !valid_name(name) {
        return Err(invalid(&field, "name must match [a-z][a-z0-9_]{0,31}"));
    }
    let ttl_ms = match raw.ttl.as_str() {
        "none" => None,
        text => {
            let ms = parse_duration_ms(text).map_err(|e| invalid(format!("{field}.ttl"), e))?;
            if !(1..=MAX_TTL_MS).contains(&ms) {
                return Err(invalid(format!("{field}.ttl"), "must be between 1ms and 100y, or \"none\""));
            }
            Some(ms)
        }
    };
    if raw.history > MAX_HISTORY_LEN {
        return Err(invalid(
            format!("{field}.history"),
            format!("{} is over the limit of {MAX_HISTORY_LEN}", raw.history),
        ));
    }
    if raw.attrs.len() > MAX_ATTRS_PER_EVENT {
        return Err(invalid(format!("{field}.attrs"), format!("over the limit of {MAX_ATTRS_PER_EVENT}")));
    }
    let mut attrs = BTreeMap::new();
    for (attr, ty) in raw.attrs {
        let ty = value_type(&ty).map_err(|e| invalid(format!("{field}.attrs.{}", shown_name(&attr)), e))?;
        attrs.insert(attr, ty);
    }
    Ok(FamilySpec { ttl_ms, history_len: raw.history, attrs })
}

pub(super) fn check_names(schema: &Schema) -> Result<(), SchemaError> {
    let reserved = |kind: &str, name: &str| {
        RESERVED.contains(&name).then(|| {
            invalid(
                format!("{kind}.{name}"),
                format!("{name:?} is a reserved word of the tag language: no rule could read it"),
            )
        })
    };
    for name in schema.features.keys() {
        if let Some(e) = reserved("features", name) {
            return Err(e);
        }
    }
    for name in schema.tags.keys() {
        if let Some(e) = reserved("tags", name) {
            return Err(e);
        }
    }
    // A declared attribute no rule can name (`userAgent`) still counts:
    // declared names are exempt from the cap on undeclared ones. Only one
    // no event may carry is refused.
    for (family, spec) in &schema.families {
        for attr in spec.attrs.keys() {
            if attr.is_empty() || attr.len() > MAX_ATTR_NAME_BYTES {
                return Err(invalid(
                    format!("families.{family}.attrs.{}", shown_name(attr)),
                    format!("an event attribute name is 1 to {MAX_ATTR_NAME_BYTES} bytes: no event could carry this one"),
                ));
            }
        }
    }
    for (name, feature) in &schema.features {
        if let Some(attr) = &feature.attr {
            if attr.is_empty() || attr.len() > MAX_ATTR_NAME_BYTES {
                return Err(invalid(
                    format!("features.{name}.attr"),
                    format!("an event attribute name is 1 to {MAX_ATTR_NAME_BYTES} bytes: no event could carry this one"),
                ));
            }
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::DAY_MS;
    use crate::schema::DEFAULT_SCHEMA_TOML;

    #[test]
    fn default_schema_has_the_documented_families() {
        let s = parse(DEFAULT_SCHEMA_TOML).unwrap();
        let ttl = |f: &str| s.families[f].ttl_ms;
        assert_eq!(ttl("registration"), None);
        assert_eq!(ttl("browse"), Some(90 * DAY_MS));
        assert_eq!(ttl("trade"), Some(730 * DAY_MS));
        assert_eq!(ttl("social"), Some(180 * DAY_MS));
        assert_eq!(ttl("third_party"), Some(365 * DAY_MS));
        assert_eq!(ttl("contact"), Some(30 * DAY_MS));
        assert_eq!(s.dedupe_window_ms, 7 * DAY_MS);
    }

    #[test]
    fn custom_family_accepted() {
        let s = parse("[families.app_usage]\nttl = \"14d\"\nhistory = 3\n").unwrap();
        let expected = FamilySpec { ttl_ms: Some(14 * DAY_MS), history_len: 3, attrs: BTreeMap::new() };
        assert_eq!(s.families["app_usage"], expected);
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn malformed_toml_reports_position() {
        let e = err("[families.browse\nttl = 1");
        assert!(e.starts_with("schema is not valid TOML"), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn invalid_fields_are_named() {
        assert_eq!(
            err("[families.Browse]\nttl = \"1d\""),
            "families.Browse: name must match [a-z][a-z0-9_]{0,31}"
        );
        assert!(err("[families.browse]\nttl = \"9x\"").starts_with("families.browse.ttl: invalid duration"));
        assert!(err("[families.browse]\nttl = \"0d\"").starts_with("families.browse.ttl: must be between"));
        assert!(err("[families.browse]\nttl = \"1d\"\nhistory = 5000")
            .starts_with("families.browse.history: 5000"));
        assert!(err("[ingest]\ndedupe_window = \"7d\"").starts_with("families: at least one"));
        assert!(err("[families.browse]\nttl = \"1d\"\ncolour = 1").contains("unknown field"));
        assert!(err("[families.browse]\nhistory = 1").contains("missing field `ttl`"));
    }

    fn names_err(text: &str) -> String {
        parse(text).expect("parses").check_names().unwrap_err().to_string()
    }

    #[test]
    fn names_no_rule_could_read_are_refused_when_offered() {
        let family = "[families.browse]\nttl = \"1d\"\n";
        assert_eq!(
            names_err(&format!("{family}[features.now]\nfamily = \"browse\"\nagg = \"count\"\n")),
            "features.now: \"now\" is a reserved word of the tag language: no rule could read it"
        );
        assert_eq!(
            names_err(&format!("{family}[tags.and]\nrule = 'true'\n")),
            "tags.and: \"and\" is a reserved word of the tag language: no rule could read it"
        );
        let e = names_err("[families.browse]\nttl = \"1d\"\nattrs = { \"\" = \"str\" }\n");
        assert!(e.starts_with("families.browse.attrs.: an event attribute name is 1 to 64"), "{e}");
        let long = "a".repeat(MAX_ATTR_NAME_BYTES + 1);
        let e = names_err(&format!("{family}attrs = {{ {long} = \"num\" }}\n"));
        assert!(e.contains("no event could carry this one"), "{e}");
        let e = names_err(&format!(
            "{family}[features.f]\nfamily = \"browse\"\nagg = \"sum\"\nattr = \"{long}\"\n"
        ));
        assert!(e.starts_with("features.f.attr: an event attribute name is 1 to 64 bytes"), "{e}");
        // What rules can read passes, and so does the default schema.
        let fine = format!("{family}attrs = {{ _x = \"num\", userAgent = \"str\" }}\n[features.nowish]\nfamily = \"browse\"\nagg = \"sum\"\nattr = \"Amount-EUR\"\n[tags.nulls]\nrule = 'true'\n");
        parse(&fine).unwrap().check_names().unwrap();
        parse(DEFAULT_SCHEMA_TOML).unwrap().check_names().unwrap();
    }

    #[test]
    fn an_error_repeats_a_long_name_or_value_cut_short() {
        let long = "x".repeat(100_000);
        let cases = [
            format!("[families.{long}]\nttl = \"1d\"\n"),
            format!("[families.b]\nttl = \"1d\"\n[features.{long}]\nfamily = \"b\"\nagg = \"count\"\n"),
            format!("[families.b]\nttl = \"1d\"\n[tags.{long}]\nrule = 'true'\n"),
            format!("[families.b]\nttl = \"1d\"\n[features.f]\nfamily = \"{long}\"\nagg = \"count\"\n"),
            format!("[families.b]\nttl = \"1d\"\n[features.f]\nfamily = \"b\"\nagg = \"{long}\"\n"),
            format!("[families.b]\nttl = \"1d\"\nattrs = {{ a = \"{long}\" }}\n"),
            format!("[families.b]\nttl = \"1d\"\nattrs = {{ {long} = \"zzz\" }}\n"),
            format!("[families.b]\nttl = \"{long}\"\n"),
            format!("[families.b]\nttl = \"1{long}\"\n"),
        ];
        for text in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.len() < 1_000, "{} bytes: {}", e.len(), &e[..200]);
            assert!(e.contains("100000 bytes"), "{e}");
        }
    }
}
