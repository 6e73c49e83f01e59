//! One real `portraitd` per test, driven through `portrait-client`: profile
//! reads, expiry, dedupe, validation, schema administration, cluster status,
//! health and durability across SIGTERM and SIGKILL restarts.

use crate::common;

use std::time::Duration;

use common::TestNode;
use portrait_client::json::now_ms;
use portrait_client::portrait_proto::v1::{FamilyData, FamilySpec, Profile};
use portrait_client::{ClientError, Consistency, Event, PortraitClient, Value, WriteRequest, WriteResponse};
use portrait_server::duration::{DAY_MS, MINUTE_MS};
use portrait_server::limits::{
    MAX_ATTRS_PER_EVENT, MAX_BATCH_GET_USERS, MAX_EVENTS_PER_REQUEST, MAX_MESSAGE_BYTES,
};
use portrait_server::schema::DEFAULT_SCHEMA_TOML;
use tonic::Code;

const LINEARIZABLE: Consistency = Consistency::Linearizable;
const DEFAULT_FAMILIES: &str = "browse, contact, registration, social, third_party, trade";

/// An event that happened `age_ms` ago (negative: in the future).
fn event(user: &str, family: &str, age_ms: i64, id: &str, attrs: &[(&str, Value)]) -> Event {
    Event {
        user_id: user.into(),
        family: family.into(),
        r#type: "view".into(),
        event_time_ms: now_ms() - age_ms,
        event_id: id.into(),
        attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

/// (applied, duplicates, expired).
fn counts(r: &WriteResponse) -> (u32, u32, u32) {
    (r.applied, r.duplicates, r.expired)
}

async fn write(client: &PortraitClient, events: Vec<Event>) -> WriteResponse {
    client.write(events).await.unwrap_or_else(|e| panic!("write failed: {e}"))
}

async fn profile(client: &PortraitClient, user: &str) -> Profile {
    let response = client.get_profile(user, &[], LINEARIZABLE).await;
    response.unwrap_or_else(|e| panic!("get_profile({user:?}): {e}")).profile.expect("profile set")
}

fn family<'a>(p: &'a Profile, name: &str) -> &'a FamilyData {
    p.families.get(name).unwrap_or_else(|| panic!("no family {name:?} in {p:?}"))
}

fn attr<'a>(p: &'a Profile, family_name: &str, name: &str) -> &'a Value {
    let data = family(p, family_name);
    let cell = data.attrs.get(name).unwrap_or_else(|| panic!("no {family_name}.{name} in {p:?}"));
    cell.value.as_ref().expect("value set")
}

/// The families of a profile, sorted (the wire map is unordered).
fn family_names(p: &Profile) -> Vec<&str> {
    let mut names: Vec<_> = p.families.keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

fn history_ids(data: &FamilyData) -> Vec<&str> {
    data.history.iter().map(|h| h.event_id.as_str()).collect()
}

/// The message of a call that must have failed with `code`.
fn rejected<T: std::fmt::Debug>(result: Result<T, ClientError>, code: Code) -> String {
    match result {
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
        Err(ClientError::Rpc(status)) => {
            assert_eq!(status.code(), code, "{status:?}");
            status.message().to_string()
        }
        Err(e) => panic!("expected {code:?}, got {e}"),
    }
}

async fn assert_no_profile(client: &PortraitClient, user: &str) {
    let message = rejected(client.get_profile(user, &[], LINEARIZABLE).await, Code::NotFound);
    assert_eq!(message, format!("user {user:?} has no profile"));
}

/// The default schema plus `app_usage` (ttl 14d, history 3).
fn schema_with_app_usage() -> String {
    format!("{DEFAULT_SCHEMA_TOML}\n[families.app_usage]\nttl = \"14d\"\nhistory = 3\n")
}

fn spec(name: &str, ttl_days: u64, history_len: u32) -> FamilySpec {
    FamilySpec { name: name.into(), ttl_ms: ttl_days * DAY_MS as u64, history_len }
}

fn default_specs() -> Vec<FamilySpec> {
    vec![
        spec("browse", 90, 50),
        spec("contact", 30, 50),
        spec("registration", 0, 5),
        spec("social", 180, 20),
        spec("third_party", 365, 10),
        spec("trade", 730, 100),
    ]
}

#[tokio::test]
async fn get_profile_of_a_user_without_data_is_not_found() {
    let node = TestNode::start().await;
    let client = node.client().await;
    assert_no_profile(&client, "nobody").await;

    write(&client, vec![event("somebody", "browse", DAY_MS, "e1", &[("page", Value::string("home"))])]).await;
    assert_no_profile(&client, "nobody").await;
    let local = client.get_profile("nobody", &[], Consistency::Local).await;
    assert_eq!(rejected(local, Code::NotFound), "user \"nobody\" has no profile");
}

#[tokio::test]
async fn written_values_are_read_back_latest_event_time_winning() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let registration = event(
        "u1",
        "registration",
        3 * 365 * DAY_MS,
        "r1",
        &[
            ("gender", Value::string("f")),
            ("age", Value::int(30)),
            ("vip", Value::bool(true)),
            ("score", Value::double(4.5)),
        ],
    );
    let b1 = event(
        "u1",
        "browse",
        2 * DAY_MS,
        "b1",
        &[("category", Value::string("phone")), ("price", Value::int(2999))],
    );
    let b2 = event("u1", "browse", DAY_MS, "b2", &[("category", Value::string("laptop"))]);
    let first = write(&client, vec![registration.clone(), b1.clone(), b2.clone()]).await;
    assert_eq!(counts(&first), (3, 0, 0));
    assert_eq!(first.batches, 1);
    assert!(first.log_index > 0);

    // A late event fills in new attributes but does not overwrite newer ones.
    let b0 = event(
        "u1",
        "browse",
        3 * DAY_MS,
        "b0",
        &[("category", Value::string("tv")), ("clicks", Value::int(1))],
    );
    let second = write(&client, vec![b0.clone()]).await;
    assert_eq!(counts(&second), (1, 0, 0));
    assert!(second.log_index > first.log_index, "{second:?} after {first:?}");

    let response = client.get_profile("u1", &[], LINEARIZABLE).await.unwrap();
    let info = response.read_info.expect("read info");
    assert_eq!(info.node_id, 1);
    assert!(info.applied_index >= second.log_index, "{info:?}");
    let p = response.profile.expect("profile");
    assert_eq!((p.user_id.as_str(), p.found), ("u1", true));
    assert_eq!(family_names(&p), ["browse", "registration"]);

    for (name, value) in &registration.attrs {
        let cell = &family(&p, "registration").attrs[name];
        assert_eq!(cell.value.as_ref(), Some(value));
        assert_eq!(cell.event_time_ms, registration.event_time_ms);
        assert_eq!(cell.expires_at_ms, 0, "registration never expires");
    }
    let browse = family(&p, "browse");
    assert_eq!(browse.attrs.len(), 3);
    let category = &browse.attrs["category"];
    assert_eq!(category.value, Some(Value::string("laptop")));
    assert_eq!(category.event_time_ms, b2.event_time_ms);
    assert_eq!(category.expires_at_ms, b2.event_time_ms + 90 * DAY_MS);
    assert_eq!(attr(&p, "browse", "price"), &Value::int(2999));
    assert_eq!(attr(&p, "browse", "clicks"), &Value::int(1));
    assert_eq!(history_ids(browse), ["b2", "b1", "b0"], "newest event time first");
    let newest = &browse.history[0];
    assert_eq!((newest.r#type.as_str(), newest.event_time_ms), ("view", b2.event_time_ms));
    assert_eq!(newest.attrs, b2.attrs);
    assert_eq!(newest.expires_at_ms, b2.event_time_ms + 90 * DAY_MS);
}

#[tokio::test]
async fn events_expired_on_arrival_are_counted_and_not_stored() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let response = write(
        &client,
        vec![
            event("u1", "browse", 91 * DAY_MS, "b-old", &[("page", Value::string("old"))]),
            event("u1", "browse", DAY_MS, "b-new", &[("page", Value::string("new"))]),
            event("u1", "trade", 731 * DAY_MS, "t-old", &[("item", Value::string("old"))]),
            event("u1", "trade", 729 * DAY_MS, "t-new", &[("item", Value::string("new"))]),
            event("u1", "contact", 31 * DAY_MS, "c-old", &[("phone", Value::string("old"))]),
            event("u1", "registration", 20 * 365 * DAY_MS, "r1", &[("channel", Value::string("web"))]),
        ],
    )
    .await;
    assert_eq!(counts(&response), (3, 0, 3));

    let p = profile(&client, "u1").await;
    assert_eq!(family_names(&p), ["browse", "registration", "trade"], "contact held only an expired event");
    assert_eq!(attr(&p, "browse", "page"), &Value::string("new"));
    assert_eq!(history_ids(family(&p, "browse")), ["b-new"]);
    assert_eq!(attr(&p, "trade", "item"), &Value::string("new"));
    assert_eq!(history_ids(family(&p, "trade")), ["t-new"]);
    assert_eq!(attr(&p, "registration", "channel"), &Value::string("web"));

    // A user whose only event was expired on arrival has no profile.
    let only_expired = write(&client, vec![event("u2", "browse", 100 * DAY_MS, "x", &[])]).await;
    assert_eq!(counts(&only_expired), (0, 0, 1));
    assert_no_profile(&client, "u2").await;
}

#[tokio::test]
async fn values_are_not_served_past_event_time_plus_ttl() {
    let node = TestNode::start().await;
    let client = node.client().await;
    const MARGIN_MS: i64 = 2_000;
    let browse = event("u1", "browse", 90 * DAY_MS - MARGIN_MS, "b1", &[("page", Value::string("home"))]);
    let registration = event("u1", "registration", DAY_MS, "r1", &[("channel", Value::string("app"))]);
    let browse_only = Event { user_id: "u2".into(), ..browse.clone() };
    let response = write(&client, vec![browse.clone(), registration, browse_only]).await;
    assert_eq!(counts(&response), (3, 0, 0));

    let before = profile(&client, "u1").await;
    assert_eq!(attr(&before, "browse", "page"), &Value::string("home"));
    let expires_at = family(&before, "browse").attrs["page"].expires_at_ms;
    assert_eq!(expires_at, browse.event_time_ms + 90 * DAY_MS);
    assert_eq!(attr(&profile(&client, "u2").await, "browse", "page"), &Value::string("home"));

    let wait = expires_at - now_ms() + 100;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    let after = profile(&client, "u1").await;
    assert_eq!(family_names(&after), ["registration"], "browse expired at {expires_at}: {after:?}");
    // A user whose data all expired has no profile, whether or not
    // compaction has reclaimed the bytes yet.
    let users = ["u1".to_string(), "u2".to_string()];
    let batch = client.batch_get_profiles(&users, &[], LINEARIZABLE).await.unwrap();
    assert_eq!(family_names(&batch.profiles[0]), ["registration"]);
    assert_eq!((batch.profiles[1].found, batch.profiles[1].families.len()), (false, 0));
    let gone = client.get_profile("u2", &[], LINEARIZABLE).await;
    assert_eq!(rejected(gone, Code::NotFound), "user \"u2\" has no profile");
}

#[tokio::test]
async fn a_shorter_ttl_in_a_new_schema_hides_older_values() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let events = vec![
        event("u1", "browse", 10 * DAY_MS, "old", &[("old_page", Value::string("a"))]),
        event("u1", "browse", DAY_MS, "new", &[("new_page", Value::string("b"))]),
    ];
    assert_eq!(counts(&write(&client, events).await), (2, 0, 0));

    let week = DEFAULT_SCHEMA_TOML.replace("ttl = \"90d\"", "ttl = \"7d\"");
    assert_ne!(week, DEFAULT_SCHEMA_TOML);
    client.apply_schema(week, false).await.unwrap();

    let p = profile(&client, "u1").await;
    let browse = family(&p, "browse");
    assert_eq!(browse.attrs.keys().collect::<Vec<_>>(), ["new_page"]);
    assert_eq!(history_ids(browse), ["new"]);
    let late = write(&client, vec![event("u1", "browse", 8 * DAY_MS, "late", &[])]).await;
    assert_eq!(counts(&late), (0, 0, 1));
}

#[tokio::test]
async fn events_already_applied_are_counted_as_duplicates() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let first = event("u1", "browse", DAY_MS, "e1", &[("clicks", Value::int(1))]);
    assert_eq!(counts(&write(&client, vec![first]).await), (1, 0, 0));

    // Same (user, event_id) again, even with other content: not applied.
    let again = event("u1", "browse", DAY_MS / 2, "e1", &[("clicks", Value::int(2))]);
    assert_eq!(counts(&write(&client, vec![again]).await), (0, 1, 0));
    // Within one request, the second copy is the duplicate.
    let twice = vec![
        event("u1", "browse", DAY_MS / 4, "e2", &[("clicks", Value::int(3))]),
        event("u1", "browse", DAY_MS / 4, "e2", &[("clicks", Value::int(4))]),
    ];
    assert_eq!(counts(&write(&client, twice).await), (1, 1, 0));
    // Scoped to the user, not the family.
    let other_family = event("u1", "trade", DAY_MS, "e1", &[("total", Value::int(1))]);
    assert_eq!(counts(&write(&client, vec![other_family]).await), (0, 1, 0));
    // Event ids are scoped to the user.
    let other_user = event("u2", "browse", DAY_MS, "e1", &[("clicks", Value::int(5))]);
    assert_eq!(counts(&write(&client, vec![other_user]).await), (1, 0, 0));

    let p = profile(&client, "u1").await;
    assert_eq!(family_names(&p), ["browse"]);
    assert_eq!(attr(&p, "browse", "clicks"), &Value::int(3));
    assert_eq!(history_ids(family(&p, "browse")), ["e2", "e1"]);
    assert_eq!(attr(&profile(&client, "u2").await, "browse", "clicks"), &Value::int(5));
}

#[tokio::test]
async fn events_without_an_id_are_never_deduplicated() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let e = event("u1", "trade", DAY_MS, "", &[("amount", Value::double(9.5))]);
    assert_eq!(counts(&write(&client, vec![e.clone(), e.clone()]).await), (2, 0, 0));
    assert_eq!(counts(&write(&client, vec![e]).await), (1, 0, 0));
    assert_eq!(family(&profile(&client, "u1").await, "trade").history.len(), 3);
}

/// Sends `[valid event of a fresh user, bad]`; checks the error message and
/// that nothing of the request was stored.
async fn assert_invalid(client: &PortraitClient, case: usize, bad: Event, expected: &str) {
    let good_user = format!("good-{case}");
    let good = event(&good_user, "browse", DAY_MS, "g", &[("page", Value::string("home"))]);
    let bad_user = bad.user_id.clone();
    let message = rejected(client.write(vec![good, bad]).await, Code::InvalidArgument);
    assert!(message.starts_with(expected), "case {case}: {message:?} does not start with {expected:?}");
    assert_no_profile(client, &good_user).await;
    if (1..=256).contains(&bad_user.len()) {
        assert_no_profile(client, &bad_user).await;
    }
}

#[tokio::test]
async fn a_request_with_an_invalid_event_is_rejected_whole() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let ok = |user: &str| event(user, "browse", DAY_MS, "b", &[("page", Value::string("x"))]);
    let too_many: Vec<_> =
        (0..=MAX_ATTRS_PER_EVENT).map(|i| (format!("a{i}"), Value::int(i as i64))).collect();
    let mut no_kind = ok("bad-6");
    no_kind.attrs.insert("color".into(), Value { kind: None });
    let cases = [
        (Event { user_id: String::new(), ..ok("") }, "events[1].user_id: must not be empty".to_string()),
        (
            Event { user_id: "u".repeat(257), ..ok("") },
            "events[1].user_id: 257 bytes is over the limit of 256".into(),
        ),
        (
            Event { family: "nope".into(), ..ok("bad-2") },
            format!("events[1].family: unknown family \"nope\" (schema has: {DEFAULT_FAMILIES})"),
        ),
        (
            Event { event_time_ms: 0, ..ok("bad-3") },
            "events[1].event_time_ms: required: milliseconds since the Unix epoch".into(),
        ),
        (Event { event_time_ms: 5, ..ok("bad-4") }, "events[1].event_time_ms: 5 is before 2000-01-01".into()),
        (
            Event { attrs: too_many.into_iter().collect(), ..ok("bad-5") },
            "events[1].attrs: 65 attributes is over the limit of 64".into(),
        ),
        (no_kind, "events[1].attrs.color: value has no kind set (string, int, double or bool)".into()),
    ];
    for (case, (bad, expected)) in cases.into_iter().enumerate() {
        assert_invalid(&client, case, bad, &expected).await;
    }

    // More than 5 minutes ahead of the node's clock; the index is the event's.
    let ahead = Event { event_time_ms: now_ms() + 10 * MINUTE_MS, ..ok("f3") };
    let future = rejected(client.write(vec![ok("f1"), ok("f2"), ahead]).await, Code::InvalidArgument);
    assert!(future.starts_with("events[2].event_time_ms: "), "{future}");
    assert!(future.ends_with(" ms in the future; at most 300000 ms ahead is accepted"), "{future}");
    for user in ["f1", "f2", "f3"] {
        assert_no_profile(&client, user).await;
    }

    // At the limits, the same shapes are accepted.
    let max_attrs: Vec<_> =
        (0..MAX_ATTRS_PER_EVENT).map(|i| (format!("a{i}"), Value::int(i as i64))).collect();
    let at_limits = vec![
        Event { attrs: max_attrs.into_iter().collect(), ..ok("edge") },
        Event { event_time_ms: now_ms() + 4 * MINUTE_MS, event_id: "soon".into(), ..ok("edge") },
    ];
    assert_eq!(counts(&write(&client, at_limits).await), (2, 0, 0));
    assert_eq!(family(&profile(&client, "edge").await, "browse").attrs.len(), MAX_ATTRS_PER_EVENT + 1);
}

#[tokio::test]
async fn oversized_and_empty_requests_are_rejected() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let many = |n: usize| (0..n).map(|_| event("bulk", "browse", DAY_MS, "", &[])).collect::<Vec<_>>();

    let message = rejected(client.write(many(MAX_EVENTS_PER_REQUEST + 1)).await, Code::InvalidArgument);
    assert_eq!(message, "events: 10001 events is over the limit of 10000 per request");
    assert_no_profile(&client, "bulk").await;
    assert_eq!(rejected(client.write(vec![]).await, Code::InvalidArgument), "events: must not be empty");

    let huge = event("huge", "browse", DAY_MS, "h", &[("blob", Value::string("x".repeat(17 << 20)))]);
    // Past the gRPC message limit tonic rejects the request before it is decoded.
    let message = rejected(client.write(vec![huge]).await, Code::OutOfRange);
    assert!(message.ends_with(&format!("the limit is: {MAX_MESSAGE_BYTES} bytes")), "{message}");
    assert_no_profile(&client, "huge").await;

    let response = write(&client, many(MAX_EVENTS_PER_REQUEST)).await;
    assert_eq!(counts(&response), (10_000, 0, 0));
    assert_eq!(family(&profile(&client, "bulk").await, "browse").history.len(), 50, "browse keeps 50");
}

#[tokio::test]
async fn acknowledged_data_survives_a_graceful_restart() {
    let mut node = TestNode::start().await;
    let client = node.client().await;
    let schema = client.apply_schema(schema_with_app_usage(), false).await.unwrap();
    let events = vec![
        event("u1", "registration", 400 * DAY_MS, "r1", &[("city", Value::string("Oslo"))]),
        event("u1", "browse", DAY_MS, "b1", &[("page", Value::string("cart"))]),
        event("u1", "app_usage", DAY_MS, "a1", &[("minutes", Value::int(42))]),
        event("u2", "trade", 2 * DAY_MS, "t1", &[("total", Value::double(12.25))]),
    ];
    assert_eq!(counts(&write(&client, events.clone()).await), (4, 0, 0));
    let before = [profile(&client, "u1").await, profile(&client, "u2").await];
    let applied_before = client.cluster_status().await.unwrap().applied_index;

    node.stop().await;
    node.restart().await;
    let client = node.client().await;

    let after = [profile(&client, "u1").await, profile(&client, "u2").await];
    assert_eq!(after, before);
    let restored = client.get_schema().await.unwrap();
    assert_eq!((restored.version, restored.toml), (schema.version, schema_with_app_usage()));
    let status = client.cluster_status().await.unwrap();
    assert_eq!((status.role.as_str(), status.leader_id), ("Leader", 1));
    assert!(status.applied_index >= applied_before, "{status:?}");
    // The dedupe markers survived too.
    assert_eq!(counts(&write(&client, events).await), (0, 4, 0));
}

#[tokio::test]
async fn acknowledged_data_survives_sigkill() {
    let mut node = TestNode::start().await;
    let client = node.client().await;
    // Concurrent writers, so the batcher packs several requests per entry.
    let writers: Vec<_> = (0..32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let user = format!("user-{i}");
                let events = vec![
                    event(&user, "browse", DAY_MS, "b", &[("n", Value::int(i))]),
                    event(&user, "social", DAY_MS, "s", &[("follows", Value::int(i * 10))]),
                ];
                client.write(events).await
            })
        })
        .collect();
    let mut last_index = 0;
    for writer in writers {
        let response = writer.await.unwrap().unwrap();
        assert_eq!(counts(&response), (2, 0, 0));
        last_index = last_index.max(response.log_index);
    }

    node.kill();
    node.restart().await;
    let client = node.client().await;

    let users: Vec<String> = (0..32).map(|i| format!("user-{i}")).collect();
    let response = client.batch_get_profiles(&users, &[], LINEARIZABLE).await.unwrap();
    assert!(response.read_info.unwrap().applied_index >= last_index);
    for (i, p) in response.profiles.iter().enumerate() {
        assert!(p.found, "{} lost after SIGKILL", users[i]);
        assert_eq!(attr(p, "browse", "n"), &Value::int(i as i64));
        assert_eq!(attr(p, "social", "follows"), &Value::int(i as i64 * 10));
    }
}

/// The `.sst` files of the node's state database.
fn state_sst_files(node: &TestNode) -> usize {
    let dir = node.data_dir().join("state");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    entries.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sst"))).count()
}

#[tokio::test]
async fn a_log_of_duplicates_is_flushed_by_its_bytes_so_a_restart_replays_little() {
    // The state of duplicates is a few bytes per entry: the memtables never
    // fill, and only the bound on unflushed log bytes makes the node flush.
    let mut node = TestNode::start_with(1, |dir| {
        let config = dir.join("portrait.toml");
        std::fs::write(&config, "[raft]\nmax_unflushed_log_bytes = 1048576\n").unwrap();
        vec!["--config".into(), config.display().to_string()]
    })
    .await;
    let client = node.client().await;
    let blob = Value::string("x".repeat(1_000));
    let events: Vec<Event> = (0..100)
        .map(|i| event(&format!("user-{i}"), "browse", DAY_MS, "e1", &[("note", blob.clone())]))
        .collect();
    assert_eq!(counts(&write(&client, events.clone()).await), (100, 0, 0));
    let before = state_sst_files(&node);
    // About 110 KB of log per request: 4 MiB of log, 4 times the bound.
    for _ in 0..40 {
        assert_eq!(counts(&write(&client, events.clone()).await), (0, 100, 0));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while state_sst_files(&node) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no flush of the state after 4 MiB of log\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(node.log().contains("flushing it"), "{}", node.log());

    // Nothing is lost by it: after SIGKILL the events are still known.
    node.kill();
    node.restart().await;
    let client = node.client().await;
    assert_eq!(counts(&write(&client, events).await), (0, 100, 0));
    assert_eq!(attr(&profile(&client, "user-7").await, "browse", "note"), &blob);
}

#[tokio::test]
async fn health_check_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let node = TestNode::start().await;
    let channel = tonic::transport::Endpoint::from_shared(node.endpoint()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "portrait.v1.Ingest", "portrait.v1.Profiles", "portrait.v1.Admin"] {
        let request = HealthCheckRequest { service: service.into() };
        let response = health.check(request).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "portrait.v1.Nope".into() }).await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn get_schema_returns_the_default_families() {
    let node = TestNode::start().await;
    let schema = node.client().await.get_schema().await.unwrap();
    assert_eq!(schema.version, 0);
    assert_eq!(schema.toml, DEFAULT_SCHEMA_TOML);
    assert_eq!(schema.families, default_specs());
}

#[tokio::test]
async fn malformed_schema_is_rejected_and_the_schema_is_unchanged() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let cases = [
        ("[families.browse\nttl = 1", "toml: schema is not valid TOML: "),
        ("[families.browse]\nttl = \"9x\"", "toml: families.browse.ttl: invalid duration \"9x\""),
        ("[families.Browse]\nttl = \"1d\"", "toml: families.Browse: name must match [a-z][a-z0-9_]{0,31}"),
        ("[ingest]\ndedupe_window = \"7d\"", "toml: families: at least one family is required"),
        ("[families.browse]\nhistory = 1", "toml: schema is not valid TOML: "),
    ];
    for (toml, expected) in cases {
        for dry_run in [true, false] {
            let message = rejected(client.apply_schema(toml.into(), dry_run).await, Code::InvalidArgument);
            assert!(message.starts_with(expected), "{toml:?}: {message:?} does not start with {expected:?}");
        }
    }
    let position = rejected(client.apply_schema(cases[0].0.into(), false).await, Code::InvalidArgument);
    assert!(position.contains("line 1"), "{position}");
    let missing = rejected(client.apply_schema(cases[4].0.into(), false).await, Code::InvalidArgument);
    assert!(missing.contains("missing field `ttl`"), "{missing}");

    // A valid dry run reports the families but changes nothing either.
    let dry = client.apply_schema(schema_with_app_usage(), true).await.unwrap();
    assert_eq!(dry.version, 0);
    assert!(dry.families.contains(&spec("app_usage", 14, 3)), "{dry:?}");

    let schema = client.get_schema().await.unwrap();
    assert_eq!((schema.version, schema.toml.as_str()), (0, DEFAULT_SCHEMA_TOML));
    assert_eq!(schema.families, default_specs());
    assert_eq!(client.cluster_status().await.unwrap().schema_version, 0);
    let message =
        rejected(client.write(vec![event("u1", "app_usage", DAY_MS, "a", &[])]).await, Code::InvalidArgument);
    assert!(message.starts_with("events[0].family: unknown family \"app_usage\""), "{message}");
}

#[tokio::test]
async fn a_custom_family_can_be_applied_and_written() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let applied = client.apply_schema(schema_with_app_usage(), false).await.unwrap();
    assert!(applied.version > 0);
    let mut expected = default_specs();
    expected.insert(0, spec("app_usage", 14, 3));
    assert_eq!(applied.families, expected);

    let schema = client.get_schema().await.unwrap();
    assert_eq!((schema.version, schema.toml), (applied.version, schema_with_app_usage()));
    assert_eq!(schema.families, expected);
    assert_eq!(client.cluster_status().await.unwrap().schema_version, applied.version);

    let events: Vec<_> = (1..=5)
        .map(|i| {
            event("u1", "app_usage", (10 - i) * MINUTE_MS, &format!("a{i}"), &[("opens", Value::int(i))])
        })
        .chain([event("u1", "app_usage", 15 * DAY_MS, "stale", &[("opens", Value::int(0))])])
        .collect();
    assert_eq!(counts(&write(&client, events).await), (5, 0, 1));
    let p = profile(&client, "u1").await;
    assert_eq!(attr(&p, "app_usage", "opens"), &Value::int(5));
    assert_eq!(history_ids(family(&p, "app_usage")), ["a5", "a4", "a3"], "history keeps the newest 3");
}

#[tokio::test]
async fn cluster_status_shows_one_voting_leader() {
    let node = TestNode::start().await;
    let client = node.client().await;
    // A new leader applies its first entries just after it is elected.
    let mut status = client.cluster_status().await.unwrap();
    for _ in 0..50 {
        if status.applied_index >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = client.cluster_status().await.unwrap();
    }
    assert_eq!(status.node_id, 1);
    assert_eq!(status.role, "Leader");
    assert_eq!(status.leader_id, 1);
    assert_eq!(status.leader_addr, node.endpoint());
    assert!(status.term >= 1);
    assert!(status.applied_index >= 1 && status.applied_index <= status.last_log_index, "{status:?}");
    assert_eq!(status.members.len(), 1, "{status:?}");
    let member = &status.members[0];
    assert_eq!((member.node_id, member.addr.as_str(), member.voter), (1, node.endpoint().as_str(), true));
    assert_eq!(status.schema_version, 0);
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn write_stream_sums_the_batches() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let batches = vec![
        WriteRequest {
            events: vec![
                event("u1", "browse", DAY_MS, "b1", &[("page", Value::string("home"))]),
                event("u2", "browse", DAY_MS, "b1", &[("page", Value::string("search"))]),
            ],
        },
        WriteRequest { events: vec![event("u1", "browse", 95 * DAY_MS, "old", &[])] },
        WriteRequest {
            events: vec![
                event("u1", "browse", DAY_MS, "b1", &[]),
                event("u1", "trade", DAY_MS, "t1", &[("total", Value::double(3.5))]),
                event("u3", "social", DAY_MS, "s1", &[("friends", Value::int(7))]),
            ],
        },
    ];
    let response = client.write_stream(futures::stream::iter(batches)).await.unwrap();
    assert_eq!(counts(&response), (4, 1, 1));
    assert_eq!(response.batches, 3);
    let status = client.cluster_status().await.unwrap();
    assert!(response.log_index > 0 && response.log_index <= status.applied_index, "{response:?}");

    let p = profile(&client, "u1").await;
    assert_eq!(attr(&p, "browse", "page"), &Value::string("home"));
    assert_eq!(attr(&p, "trade", "total"), &Value::double(3.5));

    let empty = client.write_stream(futures::stream::iter(Vec::<WriteRequest>::new())).await.unwrap();
    assert_eq!(empty, WriteResponse::default(), "an empty stream returns all zeros");
    assert_eq!(attr(&profile(&client, "u2").await, "browse", "page"), &Value::string("search"));
    assert_eq!(attr(&profile(&client, "u3").await, "social", "friends"), &Value::int(7));
}

#[tokio::test]
async fn write_stream_stops_at_the_first_rejected_batch() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let batches = vec![
        WriteRequest { events: vec![event("first", "browse", DAY_MS, "e", &[])] },
        WriteRequest {
            events: vec![event("second", "browse", DAY_MS, "e", &[]), event("", "browse", 0, "e", &[])],
        },
        WriteRequest { events: vec![event("third", "browse", DAY_MS, "e", &[])] },
    ];
    let result = client.write_stream(futures::stream::iter(batches)).await;
    let message = rejected(result, Code::InvalidArgument);
    assert_eq!(message, "batch 1 (earlier batches were applied): events[1].user_id: must not be empty");
    assert!(profile(&client, "first").await.found);
    assert_no_profile(&client, "second").await;
    assert_no_profile(&client, "third").await;
}

#[tokio::test]
async fn write_stream_says_earlier_batches_were_applied_when_a_batch_is_too_large() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let huge = "x".repeat(17 * 1024 * 1024);
    let batches = vec![
        WriteRequest { events: vec![event("first", "browse", DAY_MS, "e", &[])] },
        WriteRequest {
            events: vec![event("second", "browse", DAY_MS, "e", &[("page", Value::string(huge.as_str()))])],
        },
    ];
    let result = client.write_stream(futures::stream::iter(batches)).await;
    let message = rejected(result, Code::OutOfRange);
    assert!(message.starts_with("batch 1 (earlier batches were applied): "), "{message}");
    assert!(profile(&client, "first").await.found);
    assert_no_profile(&client, "second").await;
}

#[tokio::test]
async fn batch_get_profiles_answers_in_request_order() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let events = vec![
        event("alice", "browse", DAY_MS, "e", &[("page", Value::string("a"))]),
        event("bob", "trade", DAY_MS, "e", &[("total", Value::int(2))]),
    ];
    write(&client, events).await;
    let users: Vec<String> = ["bob", "ghost", "alice", "bob", "nobody"].map(String::from).into();
    let response = client.batch_get_profiles(&users, &[], LINEARIZABLE).await.unwrap();
    let got: Vec<_> = response.profiles.iter().map(|p| (p.user_id.as_str(), p.found)).collect();
    assert_eq!(got, [("bob", true), ("ghost", false), ("alice", true), ("bob", true), ("nobody", false)]);
    assert_eq!(attr(&response.profiles[0], "trade", "total"), &Value::int(2));
    assert_eq!(attr(&response.profiles[2], "browse", "page"), &Value::string("a"));
    assert!(response.profiles[1].families.is_empty());
    assert_eq!(response.read_info.expect("read info").node_id, 1);

    let browse_only = client.batch_get_profiles(&users, &["browse".into()], LINEARIZABLE).await.unwrap();
    let names: Vec<_> = browse_only.profiles.iter().map(family_names).collect();
    assert_eq!(names, [vec![], vec![], vec!["browse"], vec![], vec![]]);
}

#[tokio::test]
async fn families_filter_limits_the_profile() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let events = vec![
        event("u1", "browse", DAY_MS, "b", &[("page", Value::string("home"))]),
        event("u1", "trade", DAY_MS, "t", &[("total", Value::int(10))]),
        event("u1", "social", DAY_MS, "s", &[("friends", Value::int(3))]),
    ];
    assert_eq!(counts(&write(&client, events).await), (3, 0, 0));
    let get = |families: &[&str]| {
        let families: Vec<String> = families.iter().map(|f| f.to_string()).collect();
        let client = client.clone();
        async move { client.get_profile("u1", &families, LINEARIZABLE).await }
    };

    let all = get(&[]).await.unwrap().profile.unwrap();
    assert_eq!(family_names(&all), ["browse", "social", "trade"]);
    let trade = get(&["trade"]).await.unwrap().profile.unwrap();
    assert_eq!(family_names(&trade), ["trade"]);
    assert_eq!(attr(&trade, "trade", "total"), &Value::int(10));
    let two = get(&["social", "browse"]).await.unwrap().profile.unwrap();
    assert_eq!(family_names(&two), ["browse", "social"]);
    assert_eq!(two.families["browse"], all.families["browse"]);

    let message = rejected(get(&["trade", "nope"]).await, Code::InvalidArgument);
    assert_eq!(message, format!("families[1]: unknown family \"nope\" (schema has: {DEFAULT_FAMILIES})"));
    let batch = client.batch_get_profiles(&["u1".into()], &["nope".into()], LINEARIZABLE).await;
    assert!(rejected(batch, Code::InvalidArgument).starts_with("families[0]: unknown family \"nope\""));
}

#[tokio::test]
async fn reads_validate_user_ids() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let empty = client.get_profile("", &[], LINEARIZABLE).await;
    assert_eq!(rejected(empty, Code::InvalidArgument), "user_id: must not be empty");
    let batch = client.batch_get_profiles(&["a".into(), String::new()], &[], LINEARIZABLE).await;
    assert_eq!(rejected(batch, Code::InvalidArgument), "user_ids[1]: must not be empty");
    let single = client.batch_get_profiles(&[String::new()], &[], LINEARIZABLE).await;
    assert_eq!(rejected(single, Code::InvalidArgument), "user_ids[0]: must not be empty");
    let none = client.batch_get_profiles(&[], &[], LINEARIZABLE).await.unwrap();
    assert!(none.profiles.is_empty());
    let too_many: Vec<String> = (0..=MAX_BATCH_GET_USERS).map(|i| format!("u{i}")).collect();
    let batch = client.batch_get_profiles(&too_many, &[], LINEARIZABLE).await;
    assert_eq!(rejected(batch, Code::InvalidArgument), "user_ids: 1001 users is over the limit of 1000");
    let at_limit =
        client.batch_get_profiles(&too_many[..MAX_BATCH_GET_USERS], &[], LINEARIZABLE).await.unwrap();
    assert_eq!(at_limit.profiles.len(), MAX_BATCH_GET_USERS);
    assert!(at_limit.profiles.iter().all(|p| !p.found));
}

/// A raft message for a group the node hosts no replica of is refused with
/// NOT_FOUND naming the node and the group (the sender takes the replica as
/// unreachable); an undecodable one with INVALID_ARGUMENT naming `data`.
#[tokio::test]
async fn raft_messages_for_a_group_this_node_does_not_host_are_refused() {
    use portrait_client::portrait_proto::v1::raft_client::RaftClient;
    use portrait_client::portrait_proto::v1::RaftPayload;
    let node = TestNode::start().await;
    let mut raft = RaftClient::connect(node.peer_endpoint()).await.expect("connect");
    let vote = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(1, 9), None);
    let data = bincode::serialize(&vote).unwrap();
    let status = raft
        .vote(RaftPayload { data: data.clone(), group: 5, ..Default::default() })
        .await
        .expect_err("not hosted");
    assert_eq!((status.code(), status.message()), (Code::NotFound, "node 1 hosts no replica of shard 5"));
    let status =
        raft.vote(RaftPayload { data, group: 4_000, ..Default::default() }).await.expect_err("not a shard");
    assert_eq!(status.message(), "node 1 hosts no replica of shard 4000");
    let status = raft
        .vote(RaftPayload { data: vec![1, 2], group: 0, ..Default::default() })
        .await
        .expect_err("garbage");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("data: undecodable raft message"), "{}", status.message());
}

/// A forwarded read part is served only from a replica of its shard, and
/// only for that shard's users; otherwise a clear refusal, never a hop on.
#[tokio::test]
async fn forwarded_reads_are_checked_against_their_shard() {
    use portrait_client::portrait_proto::v1::raft_client::RaftClient;
    use portrait_client::portrait_proto::v1::RaftPayload;
    use portrait_core::shard::shard_of;
    use portrait_server::node::{Consistency, ForwardedRead};
    use portrait_server::store::read::Selection;
    let node = TestNode::start_sharded(common::SHARDS).await;
    let client = PortraitClient::connect(&node.endpoint()).await.unwrap();
    client.write(vec![event("u1", "browse", 0, "e1", &[])]).await.unwrap();
    let mut raft = RaftClient::connect(node.peer_endpoint()).await.expect("connect");
    let shard = shard_of("u1", common::SHARDS);
    let part = |user: &str| ForwardedRead {
        users: vec![user.to_string()],
        selection: Selection::all(),
        consistency: Consistency::Linearizable,
        max_bytes: 16 << 20,
    };
    let read = |group: u32, part: ForwardedRead| RaftPayload {
        data: bincode::serialize(&part).unwrap(),
        group,
        ..Default::default()
    };
    let reply = raft.forward_read(read(shard, part("u1"))).await.expect("served").into_inner();
    let (views, info): (Vec<portrait_server::store::read::ProfileView>, portrait_server::node::ReadInfo) =
        bincode::deserialize(&reply.data).unwrap();
    assert!(views.len() == 1 && views[0].found, "{views:?}");
    assert_eq!((info.node_id, info.shard), (1, shard));
    // The part stops at what is left of its call's response budget.
    let small = ForwardedRead { max_bytes: 10, ..part("u1") };
    let status = raft.forward_read(read(shard, small)).await.expect_err("over the budget");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("user_ids: the response would pass"), "{}", status.message());
    let other = (0..100).map(|i| format!("v{i}")).find(|u| shard_of(u, common::SHARDS) != shard).unwrap();
    let status = raft.forward_read(read(shard, part(&other))).await.expect_err("wrong shard");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), format!("users: {other:?} is not a user of shard {shard}"));
    let status = raft.forward_read(read(4_000, part("u1"))).await.expect_err("not a shard");
    assert_eq!((status.code(), status.message()), (Code::NotFound, "node 1 hosts no replica of shard 4000"));
}

/// A forwarded write part validated against a newer schema than the
/// receiving shard applied is held back (UNAVAILABLE, retry later), even
/// while the receiver's own view of the meta group is behind too; one
/// validated against the shard's own version is refused at apply as before.
#[tokio::test]
async fn a_forwarded_part_validated_against_a_newer_schema_waits_for_its_shard() {
    use portrait_client::portrait_proto::v1::raft_client::RaftClient;
    use portrait_client::portrait_proto::v1::RaftPayload;
    use portrait_core::shard::shard_of;
    let node = TestNode::start_sharded(common::SHARDS).await;
    let client = PortraitClient::connect(&node.endpoint()).await.unwrap();
    client.write(vec![event("u1", "browse", 0, "e1", &[])]).await.unwrap();
    let version = client.get_schema().await.unwrap().version;
    let mut raft = RaftClient::connect(node.peer_endpoint()).await.expect("connect");
    let part = vec![portrait_server::model::Event {
        user_id: "u1".into(),
        family: "app_usage".into(),
        time_ms: now_ms(),
        event_id: "x1".into(),
        ..portrait_server::model::Event::bare()
    }];
    let payload = |schema_version| RaftPayload {
        data: bincode::serialize(&part).unwrap(),
        group: shard_of("u1", common::SHARDS),
        schema_version,
        ..Default::default()
    };
    let status = raft.forward_write(payload(version + 1)).await.expect_err("held back");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let wanted = format!("has not applied schema version {} yet (it has {version})", version + 1);
    assert!(status.message().contains(&wanted), "{}", status.message());
    let status = raft.forward_write(payload(version)).await.expect_err("an unknown family");
    assert_ne!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(status.message().contains("app_usage"), "{}", status.message());
}

/// A forwarded read's selection checked by its sender against a newer
/// schema than the receiver has seen: UNAVAILABLE (the sender tries another
/// replica, the client retries), not INVALID_ARGUMENT for the caller.
#[tokio::test]
async fn a_forwarded_read_checked_against_a_newer_schema_is_a_retry_not_an_error() {
    use portrait_client::portrait_proto::v1::raft_client::RaftClient;
    use portrait_client::portrait_proto::v1::RaftPayload;
    use portrait_core::shard::shard_of;
    use portrait_server::node::{Consistency, ForwardedRead};
    use portrait_server::store::read::Selection;
    let node = TestNode::start_sharded(common::SHARDS).await;
    let client = PortraitClient::connect(&node.endpoint()).await.unwrap();
    client.write(vec![event("u1", "browse", 0, "e1", &[])]).await.unwrap();
    let version = client.get_schema().await.unwrap().version;
    let mut raft = RaftClient::connect(node.peer_endpoint()).await.expect("connect");
    let payload = |families: &[&str], schema_version| {
        let part = ForwardedRead {
            users: vec!["u1".into()],
            selection: Selection {
                families: Some(families.iter().map(|f| f.to_string()).collect()),
                ..Selection::all()
            },
            consistency: Consistency::Local,
            max_bytes: 1 << 20,
        };
        RaftPayload {
            data: bincode::serialize(&part).unwrap(),
            group: shard_of("u1", common::SHARDS),
            schema_version,
            ..Default::default()
        }
    };
    let status = raft.forward_read(payload(&["clicks"], version + 1)).await.expect_err("not known here yet");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let wanted = format!("has not seen schema version {} yet (it has {version})", version + 1);
    assert!(status.message().contains(&wanted), "{}", status.message());
    let status = raft.forward_read(payload(&["clicks"], version)).await.expect_err("an unknown family");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("clicks"), "{}", status.message());
    // A known family reads as usual, whatever version the sender had.
    raft.forward_read(payload(&["browse"], version + 1)).await.expect("read");
}

/// Addresses are checked before anything changes: empty, not a URL,
/// longer than the map keeps, or one address for both ports.
#[tokio::test]
async fn add_node_refuses_bad_addresses_naming_addr() {
    let node = TestNode::start().await;
    let client = PortraitClient::connect(&node.endpoint()).await.unwrap();
    let long = format!("http://{}:7700", "a".repeat(300));
    let peer = "http://n2:8700";
    for (addr, peer_addr, reason) in [
        ("", peer, "addr: must not be empty"),
        (long.as_str(), peer, "addr: 312 bytes is over the limit of 256"),
        ("http://n2:7700", "", "peer_addr: must not be empty"),
        ("http://n2:7700", "http://n2:7700", "peer_addr: must differ from addr"),
    ] {
        let e = client.add_node(2, addr, peer_addr, false).await.expect_err("refused");
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains(reason), "{e}");
    }
    let members = client.cluster_status().await.unwrap().members;
    assert_eq!(members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [1], "nothing changed");
}
