//! Features and tags on a real `portraitd`: the demo schema's tags after
//! writes, rule errors at ApplySchema, and a time-driven tag flipping on the
//! running node through a raft tick, with no new event.

#[allow(dead_code)]
use crate::common;

use std::time::Duration;

use common::TestNode;
use portrait_client::json::now_ms;
use portrait_client::portrait_proto::v1::rule_value::Kind;
use portrait_client::portrait_proto::v1::{GetProfileRequest, Profile, RuleValue};
use portrait_client::{ClientError, Consistency, Event, PortraitClient, Value};
use tonic::Code;

fn event(user: &str, family: &str, kind: &str, time_ms: i64, id: &str, attrs: &[(&str, Value)]) -> Event {
    Event {
        user_id: user.into(),
        family: family.into(),
        r#type: kind.into(),
        event_time_ms: time_ms,
        event_id: id.into(),
        attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

async fn select(client: &PortraitClient, user: &str, features: &[&str], tags: &[&str]) -> Profile {
    let request = GetProfileRequest {
        user_id: user.into(),
        features: features.iter().map(|s| s.to_string()).collect(),
        tags: tags.iter().map(|s| s.to_string()).collect(),
        consistency: Consistency::Linearizable.into(),
        ..Default::default()
    };
    client.get_profile_request(request).await.unwrap().profile.unwrap()
}

fn tag(p: &Profile, name: &str) -> Option<Kind> {
    p.tags[name].value.as_ref().and_then(|v| v.kind.clone())
}

fn feature(p: &Profile, name: &str) -> Option<Kind> {
    p.features[name].kind.clone()
}

#[tokio::test]
async fn demo_schema_tags_follow_the_events() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let now = now_ms();
    let phone = || Value::string("phone");
    let views: Vec<Event> = (0..3)
        .map(|i| event("u7", "browse", "view", now - i * 1000, &format!("b{i}"), &[("category", phone())]))
        .collect();
    client.write(views).await.unwrap();
    let p = select(
        &client,
        "u7",
        &["browse_cat_7d", "orders_lifetime"],
        &["coupon_target", "top_category_30d", "lifecycle"],
    )
    .await;
    assert_eq!(tag(&p, "coupon_target"), Some(Kind::BoolValue(true)));
    assert_eq!(tag(&p, "top_category_30d"), Some(Kind::StringValue("phone".into())));
    assert_eq!(tag(&p, "lifecycle"), Some(Kind::StringValue("prospect".into())));
    assert_eq!(feature(&p, "orders_lifetime"), Some(Kind::NumberValue(0.0)));
    let Some(Kind::MapValue(m)) = feature(&p, "browse_cat_7d") else { panic!("{p:?}") };
    assert_eq!(m.counts["phone"], 3.0);
    assert_eq!(p.families.len(), 0, "only the selected features and tags");
    assert_eq!(p.features.len(), 2);

    let order =
        event("u7", "trade", "order", now, "o1", &[("category", phone()), ("amount", Value::double(2999.0))]);
    client.write(vec![order]).await.unwrap();
    let p = select(
        &client,
        "u7",
        &[],
        &["coupon_target", "lifecycle", "high_value", "rfm_recency", "churn_risk"],
    )
    .await;
    assert_eq!(tag(&p, "coupon_target"), Some(Kind::BoolValue(false)), "ordered in the category");
    assert_eq!(tag(&p, "lifecycle"), Some(Kind::StringValue("new".into())));
    assert_eq!(tag(&p, "high_value"), Some(Kind::BoolValue(true)));
    assert_eq!(tag(&p, "rfm_recency"), Some(Kind::NumberValue(5.0)));
    assert_eq!(tag(&p, "churn_risk"), Some(Kind::BoolValue(false)));
    assert!(p.tags["lifecycle"].changed_at_ms >= now - 1000);

    // An old first order (backfill, already past the trade TTL) still makes a loyal customer.
    let old = event("u8", "trade", "order", now - 800 * 86_400_000, "o-old", &[("amount", Value::int(10))]);
    let recent = event("u8", "trade", "order", now - 86_400_000, "o-new", &[("amount", Value::int(10))]);
    let r = client.write(vec![old, recent]).await.unwrap();
    assert_eq!((r.applied, r.expired), (1, 1));
    let p = select(&client, "u8", &["orders_lifetime"], &["lifecycle"]).await;
    assert_eq!(tag(&p, "lifecycle"), Some(Kind::StringValue("loyal".into())));
    assert_eq!(feature(&p, "orders_lifetime"), Some(Kind::NumberValue(2.0)));

    let unknown = client
        .get_profile_request(GetProfileRequest {
            user_id: "u7".into(),
            tags: vec!["nope".into()],
            ..Default::default()
        })
        .await;
    match unknown {
        Err(ClientError::Rpc(s)) => {
            assert_eq!(s.code(), Code::InvalidArgument);
            assert!(s.message().starts_with("tags[0]: unknown tag \"nope\""), "{}", s.message());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rule_errors_are_reported_at_apply_schema_and_nothing_changes() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let base = "[families.trade]\nttl = \"730d\"\n[features.orders]\nfamily = \"trade\"\nagg = \"count\"\n";
    let cases = [
        ("[tags.bad]\nrule = 'orders > \"x\"'", "tags.bad.rule: line 1, column"),
        ("[tags.bad]\nrule = 'nope > 1'", "unknown name `nope`"),
        ("[tags.a]\nrule = 'b'\n[tags.b]\nrule = 'a'", "tags.a: cycle between tags: a -> b -> a"),
        // Named by the cycle, not by a tag that only reads it.
        (
            "[tags.a]\nrule = 'b'\n[tags.b]\nrule = 'c'\n[tags.c]\nrule = 'b'",
            "tags.b: cycle between tags: b -> c -> b",
        ),
        (
            "[features.x]\nfamily = \"trade\"\nagg = \"median\"",
            "features.x.agg: unknown aggregation \"median\"",
        ),
        ("[features.x]\nfamily = \"trade\"\nagg = \"sum\"", "features.x.attr: required"),
        (
            "[features.x]\nfamily = \"trade\"\nagg = \"count\"\nwindow = \"5s\"",
            "features.x.window: must be between",
        ),
        ("[features.x]\nfamily = \"trade\"\nagg = \"count\"\nwhere = 'amount >'", "features.x.where: column"),
        // Names no rule could read (refused when offered only).
        ("[tags.now]\nrule = 'orders > 1'", "tags.now: \"now\" is a reserved word of the tag language"),
        (
            "[families.shop]\nttl = \"1d\"\nattrs = { \"\" = \"str\" }",
            "families.shop.attrs.: an event attribute name is 1 to 64",
        ),
    ];
    for (extra, expected) in cases {
        let toml = format!("{base}{extra}\n");
        match client.apply_schema(toml.clone(), false).await {
            Err(ClientError::Rpc(s)) => {
                assert_eq!(s.code(), Code::InvalidArgument, "{toml}");
                assert!(s.message().contains(expected), "{toml}\n→ {}", s.message());
            }
            other => panic!("{toml} was accepted: {other:?}"),
        }
    }
    let schema = client.get_schema().await.unwrap();
    assert_eq!(schema.version, 0, "no rejected schema was applied");
}

#[tokio::test]
async fn a_time_driven_tag_flips_on_the_node_without_a_new_event() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let schema = r#"
[families.browse]
ttl = "90d"
[features.last_view]
family = "browse"
agg = "last_time"
[tags.idle]
rule = 'not is_null(last_view) and now - last_view > 3s'
"#;
    client.apply_schema(schema.into(), false).await.unwrap();
    let t = now_ms();
    let w = client.write(vec![event("u1", "browse", "view", t, "v1", &[])]).await.unwrap();
    let p = select(&client, "u1", &[], &["idle"]).await;
    assert_eq!(tag(&p, "idle"), Some(Kind::BoolValue(false)));

    // The flip is due at t + 3 s + 1 ms; the leader's ticker (every second)
    // proposes a tick, applied through raft: waited for (at most 30 s past
    // the due time, for a loaded machine), not slept for.
    tokio::time::sleep(Duration::from_millis((t + 3_001 - now_ms()).max(0) as u64)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.cluster_status().await.unwrap();
        if status.applied_index > w.log_index {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no tick entry applied after the write: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = select(&client, "u1", &[], &["idle"]).await;
    assert_eq!(tag(&p, "idle"), Some(Kind::BoolValue(true)));
    assert_eq!(p.tags["idle"].changed_at_ms, t + 3_001, "changed at the scheduled moment");
    let _ = RuleValue::default();
}

#[tokio::test]
async fn a_changed_rule_is_applied_to_existing_users_in_the_background() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let schema = |threshold: u32| {
        format!(
            "[families.trade]\nttl = \"730d\"\n[features.spend]\nfamily = \"trade\"\nagg = \"sum\"\nattr = \"amount\"\n\
             [tags.big]\nrule = 'spend > {threshold}'\n"
        )
    };
    client.apply_schema(schema(100), false).await.unwrap();
    let t = now_ms();
    let events: Vec<Event> = (0..1200)
        .map(|i| event(&format!("u{i}"), "trade", "order", t, "o", &[("amount", Value::int(i))]))
        .collect();
    client.write(events).await.unwrap();
    let big = |p: &Profile| tag(p, "big");
    assert_eq!(big(&select(&client, "u500", &[], &["big"]).await), Some(Kind::BoolValue(true)));

    client.apply_schema(schema(1000), false).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = client.cluster_status().await.unwrap();
        if !status.reevaluating {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "re-evaluation did not finish: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (user, expected) in
        [("u500", false), ("u999", false), ("u1000", false), ("u1001", true), ("u1199", true)]
    {
        let p = select(&client, user, &[], &["big"]).await;
        assert_eq!(big(&p), Some(Kind::BoolValue(expected)), "{user}");
    }
}
