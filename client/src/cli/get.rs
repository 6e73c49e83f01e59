//! `portrait get USER`: one profile, as text or JSON.

use std::fmt::Write;

use portrait_client::json::profile_to_json;
use portrait_client::json::rule_value_to_json;
use portrait_client::portrait_proto::v1::{
    FamilyData, GetProfileRequest, GetProfileResponse, HistoryEvent, ReadInfo,
};
use portrait_client::{Consistency, PortraitClient, Profile, Value};
use serde_json::json;

use super::format;

/// What to read; all empty = everything.
pub struct Selection {
    pub families: Vec<String>,
    pub features: Vec<String>,
    pub tags: Vec<String>,
}

pub async fn run(
    client: &PortraitClient,
    user: &str,
    selection: Selection,
    linearizable: bool,
    as_json: bool,
) -> anyhow::Result<String> {
    let consistency = if linearizable { Consistency::Linearizable } else { Consistency::Local };
    let request = GetProfileRequest {
        user_id: user.to_string(),
        families: selection.families,
        features: selection.features,
        tags: selection.tags,
        consistency: consistency.into(),
    };
    let response = client.get_profile_request(request).await?;
    Ok(if as_json { to_json(&response) } else { to_text(user, &response) })
}

/// The profile as JSON (see `json::profile_to_json`) plus `read_info`.
fn to_json(response: &GetProfileResponse) -> String {
    let mut value = response.profile.as_ref().map_or_else(|| json!({}), profile_to_json);
    let info = response.read_info.unwrap_or_default();
    value["read_info"] = json!({
        "node_id": info.node_id,
        "applied_index": info.applied_index,
        "as_of_ms": info.as_of_ms,
        "lag_entries": info.lag_entries,
        "leader_contact_age_ms": info.leader_contact_age_ms,
    });
    format!("{value:#}\n")
}

fn to_text(user: &str, response: &GetProfileResponse) -> String {
    let served = served_by(&response.read_info.unwrap_or_default());
    let profile = response.profile.clone().unwrap_or_default();
    if !profile.found {
        return format!("user {user}: no data ({served})\n");
    }
    let mut out = format!("user {} ({served})\n", profile.user_id);
    for (name, family) in sorted_families(&profile) {
        out.push_str(&family_text(name, family));
    }
    out.push_str(&features_text(&profile));
    out.push_str(&tags_text(&profile));
    out
}

fn features_text(profile: &Profile) -> String {
    let lines = profile.features.iter().map(|(name, v)| (name, rule_value_to_json(v).to_string()));
    section("features", lines)
}

fn tags_text(profile: &Profile) -> String {
    let lines = profile.tags.iter().map(|(name, t)| {
        let value = t.value.as_ref().map_or(serde_json::Value::Null, rule_value_to_json);
        (name, format!("{value}  (since {})", format::timestamp(t.changed_at_ms)))
    });
    section("tags", lines)
}

/// `[title]` and one aligned `name  text` line per entry, sorted by name;
/// nothing when there are no entries.
fn section<'a>(title: &str, lines: impl Iterator<Item = (&'a String, String)>) -> String {
    let mut lines: Vec<_> = lines.collect();
    if lines.is_empty() {
        return String::new();
    }
    lines.sort();
    let width = lines.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut out = format!("\n[{title}]\n");
    for (name, text) in lines {
        let _ = writeln!(out, "  {name:<width$}  {text}");
    }
    out
}

/// Where the read was served and how far behind the leader that node was.
fn served_by(info: &ReadInfo) -> String {
    let contact = match info.leader_contact_age_ms {
        Some(ms) => format!(", leader contact {ms} ms ago"),
        None => String::new(),
    };
    format!("node {}, applied index {}, lag {}{contact}", info.node_id, info.applied_index, info.lag_entries)
}

fn sorted_families(profile: &Profile) -> Vec<(&String, &FamilyData)> {
    let mut families: Vec<_> = profile.families.iter().collect();
    families.sort_by_key(|(name, _)| *name);
    families
}

fn family_text(name: &str, family: &FamilyData) -> String {
    let mut out = format!("\n[{name}]\n");
    let mut attrs: Vec<_> = family.attrs.iter().collect();
    attrs.sort_by_key(|(name, _)| *name);
    let width = attrs.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (attr, v) in attrs {
        let value = v.value.as_ref().map_or_else(|| "null".to_string(), format::value);
        let (at, expires) = (format::timestamp(v.event_time_ms), format::expiry(v.expires_at_ms));
        let _ = writeln!(out, "  {attr:<width$}  {value}  (at {at}, expires {expires})");
    }
    if !family.history.is_empty() {
        out.push_str("  history, newest first:\n");
        for event in &family.history {
            out.push_str(&history_line(event));
        }
    }
    out
}

fn history_line(event: &HistoryEvent) -> String {
    let id = if event.event_id.is_empty() { "-" } else { &event.event_id };
    format!(
        "    {}  {}  id={id}  {}  (expires {})\n",
        format::timestamp(event.event_time_ms),
        event.r#type,
        attrs_inline(&event.attrs),
        format::expiry(event.expires_at_ms)
    )
}

fn attrs_inline(attrs: &std::collections::HashMap<String, Value>) -> String {
    let mut pairs: Vec<_> = attrs.iter().map(|(k, v)| format!("{k}={}", format::value(v))).collect();
    pairs.sort();
    format!("{{{}}}", pairs.join(", "))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use portrait_client::portrait_proto::v1::rule_value::Kind as RuleKind;
    use portrait_client::portrait_proto::v1::{AttributeValue, RuleValue, TagValue};

    use super::*;

    fn response() -> GetProfileResponse {
        let attrs = HashMap::from([
            (
                "price".into(),
                AttributeValue { value: Some(Value::double(399.0)), event_time_ms: 0, expires_at_ms: 0 },
            ),
            (
                "category".into(),
                AttributeValue { value: Some(Value::string("phone")), event_time_ms: 0, expires_at_ms: 1000 },
            ),
        ]);
        let history = vec![HistoryEvent {
            r#type: "view".into(),
            event_time_ms: 0,
            event_id: "e1".into(),
            attrs: HashMap::from([
                ("qty".into(), Value::int(2)),
                ("category".into(), Value::string("phone")),
            ]),
            expires_at_ms: 0,
        }];
        let family = FamilyData { attrs, history };
        let profile = Profile {
            user_id: "u1".into(),
            found: true,
            families: HashMap::from([("browse".into(), family)]),
            features: HashMap::from([(
                "views_7d".into(),
                RuleValue { kind: Some(RuleKind::NumberValue(3.0)) },
            )]),
            tags: HashMap::from([(
                "lifecycle".into(),
                TagValue {
                    value: Some(RuleValue { kind: Some(RuleKind::StringValue("new".into())) }),
                    changed_at_ms: 0,
                },
            )]),
        };
        let read_info = ReadInfo {
            node_id: 2,
            applied_index: 42,
            as_of_ms: 5,
            lag_entries: 0,
            leader_contact_age_ms: Some(12),
            shard: 0,
        };
        GetProfileResponse { profile: Some(profile), read_info: Some(read_info) }
    }

    #[test]
    fn text_lists_families_attrs_and_history() {
        let expected = "user u1 (node 2, applied index 42, lag 0, leader contact 12 ms ago)\n\
            \n[browse]\n\
            \x20 category  \"phone\"  (at 1970-01-01T00:00:00.000Z, expires 1970-01-01T00:00:01.000Z)\n\
            \x20 price     399.0  (at 1970-01-01T00:00:00.000Z, expires never)\n\
            \x20 history, newest first:\n\
            \x20   1970-01-01T00:00:00.000Z  view  id=e1  {category=\"phone\", qty=2}  (expires never)\n\
            \n[features]\n\
            \x20 views_7d  3.0\n\
            \n[tags]\n\
            \x20 lifecycle  \"new\"  (since 1970-01-01T00:00:00.000Z)\n";
        assert_eq!(to_text("u1", &response()), expected);
    }

    #[test]
    fn text_for_missing_user() {
        let mut r = response();
        r.profile = Some(Profile { user_id: "u9".into(), found: false, ..Default::default() });
        assert_eq!(
            to_text("u9", &r),
            "user u9: no data (node 2, applied index 42, lag 0, leader contact 12 ms ago)\n"
        );
        r.read_info.as_mut().unwrap().leader_contact_age_ms = None;
        assert_eq!(to_text("u9", &r), "user u9: no data (node 2, applied index 42, lag 0)\n");
    }

    #[test]
    fn json_has_profile_and_read_info() {
        let value: serde_json::Value = serde_json::from_str(&to_json(&response())).unwrap();
        assert_eq!(value["families"]["browse"]["attrs"]["price"]["value"], json!(399.0));
        assert_eq!(value["read_info"]["applied_index"], json!(42));
        assert_eq!(value["read_info"]["leader_contact_age_ms"], json!(12));
    }
}
