//! Requests that would cost memory in proportion to their size are refused
//! fast, and the server's peak RSS (`VmHWM` of the real `portraitd`) grows by
//! less than [`MAX_RSS_GROWTH`] for each: oversized messages, huge read
//! selections, repeated user ids, undeclared attribute names without end
//! and long `distinct_count` / `top_k` values.

#[allow(dead_code)]
use crate::common;

use std::time::{Duration, Instant};

use common::TestNode;
use portrait_client::json::now_ms;
use portrait_client::portrait_proto::v1::{BatchGetProfilesRequest, GetProfileRequest};
use portrait_client::{ClientError, Consistency, Event, Value};
use portrait_server::limits::{MAX_DISTINCT_VALUE_BYTES, MAX_FAMILIES, MAX_UNDECLARED_ATTRS_PER_FAMILY};
use tonic::Code;

/// What one rejected request may add to the server's peak RSS (the issue's
/// reproduction added 571 MB).
const MAX_RSS_GROWTH: u64 = 64 * 1024 * 1024;
/// How long a rejected request may take: a hang guard only, wide for a
/// loaded 2-core CI machine (the times are printed). The peak RSS bound is
/// the real check (the reproduction took 5 s, and 571 MB).
const FAST: Duration = Duration::from_secs(10);

/// A `status` field of `/proc/PID/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    let kb: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB");
    kb * 1024
}

/// Runs `call`, checks it fails with `code` within [`FAST`] and that the
/// node's peak RSS grew by less than [`MAX_RSS_GROWTH`]; returns the message.
async fn refused<T: std::fmt::Debug>(
    node: &TestNode,
    code: Code,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> String {
    let peak_before = proc_status_bytes(node.pid(), "VmHWM:");
    let start = Instant::now();
    let result = call.await;
    let took = start.elapsed();
    let growth = proc_status_bytes(node.pid(), "VmHWM:").saturating_sub(peak_before);
    let status = match result {
        Err(ClientError::Rpc(status)) => status,
        other => panic!("expected {code:?}, got {other:?}"),
    };
    assert_eq!(status.code(), code, "{status:?}");
    println!("refused with {code:?} after {took:?}");
    assert!(took < FAST, "refused after {took:?}");
    assert!(growth < MAX_RSS_GROWTH, "peak RSS grew by {} MB", growth >> 20);
    status.message().to_string()
}

fn event(user: &str, id: &str, attrs: Vec<(String, Value)>) -> Event {
    Event {
        user_id: user.into(),
        family: "browse".into(),
        r#type: "view".into(),
        event_time_ms: now_ms() - 1_000,
        event_id: id.into(),
        attrs: attrs.into_iter().collect(),
    }
}

fn names(name: &str, n: usize) -> Vec<String> {
    vec![name.to_string(); n]
}

/// Writes user `big`'s 3.2 MiB profile: 50 history events (the browse
/// family's length) × 16 attributes × 4 KiB.
async fn write_large_profile(client: &portrait_client::PortraitClient) {
    let attrs = || (0..16).map(|a| (format!("note{a}"), Value::string("x".repeat(4096)))).collect();
    for part in 0..2 {
        let events = (0..25).map(|i| event("big", &format!("e{part}-{i}"), attrs())).collect();
        client.write(events).await.expect("write a large profile");
    }
}

/// A raw gRPC call of `method` (`/portrait.v1.Service/Method`) on an HTTP/2
/// connection of its own, its request headers sent: the sender (dropping it
/// ends the call), the answer to come, the request body's stream and the
/// connection's task.
async fn raw_call(
    address: &str,
    method: &str,
) -> (
    h2::client::SendRequest<tonic::codegen::Bytes>,
    h2::client::ResponseFuture,
    h2::SendStream<tonic::codegen::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(address).await.expect("connect");
    let (sender, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let mut sender = sender.ready().await.expect("ready");
    let (response, stream) = sender.send_request(grpc_request(address, method), false).expect("send");
    (sender, response, stream, connection)
}

/// The headers of a gRPC call of `method` at `address`.
fn grpc_request(address: &str, method: &str) -> tonic::codegen::http::Request<()> {
    tonic::codegen::http::Request::post(format!("http://{address}{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// `message` as a gRPC request body: uncompressed, its length, itself.
fn grpc_body(message: &impl prost::Message) -> tonic::codegen::Bytes {
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend((encoded.len() as u32).to_be_bytes());
    body.extend(encoded);
    body.into()
}

/// Calls `call` until it succeeds, for at most 30 s: a budget in use is
/// given back once what held it is gone.
async fn once_freed<T, F: std::future::Future<Output = Result<T, ClientError>>>(
    mut call: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        match call().await {
            Ok(done) => return done,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                println!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the budget was not freed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unbounded_reads_are_refused_cheaply() {
    let node = TestNode::start().await;
    let client = node.client().await;
    client.write(vec![event("u1", "e1", vec![])]).await.expect("write");

    // The reproduction: 1,000,000 names, about 9 MB, over the
    // Profiles service's 1 MiB decode limit.
    let huge = GetProfileRequest {
        user_id: "u1".into(),
        families: names("browse", 1_000_000),
        ..Default::default()
    };
    let message = refused(&node, Code::OutOfRange, client.get_profile_request(huge)).await;
    assert!(message.contains("message length too large"), "{message}");

    // Under the decode limit but over the selection bound.
    let many =
        GetProfileRequest { user_id: "u1".into(), families: names("browse", 100_000), ..Default::default() };
    let message = refused(&node, Code::InvalidArgument, client.get_profile_request(many)).await;
    assert_eq!(message, format!("families: 100000 names is over the limit of {MAX_FAMILIES}"));

    // Unknown names are named, first one first.
    let unknown = GetProfileRequest {
        user_id: "u1".into(),
        features: vec!["browse_7d".into(), "nope".into(), "nada".into()],
        ..Default::default()
    };
    let message = refused(&node, Code::InvalidArgument, client.get_profile_request(unknown)).await;
    assert!(message.starts_with("features[1]: unknown feature \"nope\""), "{message}");

    // Repeats are fine: read once, served once.
    let repeated =
        GetProfileRequest { user_id: "u1".into(), families: names("browse", 50), ..Default::default() };
    let profile = client.get_profile_request(repeated).await.expect("read").profile.expect("profile");
    assert_eq!(profile.families.keys().collect::<Vec<_>>(), ["browse"]);
}

/// A `Write` small on the wire but huge decoded (2,000,000 empty events,
/// 4 MB; about 300 MB as prost's messages) is refused from its bytes,
/// before it is decoded (`service::decode_check`); so is an event with too
/// many attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_too_many_events_is_refused_before_it_is_decoded() {
    use portrait_client::portrait_proto::v1::ingest_client::IngestClient;
    use portrait_client::portrait_proto::v1::WriteRequest;
    use portrait_server::limits::{MAX_ATTRS_PER_EVENT, MAX_EVENTS_PER_REQUEST};
    let node = TestNode::start().await;
    let mut ingest = IngestClient::connect(node.endpoint()).await.expect("connect");
    let empty = WriteRequest { events: vec![Event::default(); 2_000_000] };
    let call = async { ingest.write(empty).await.map_err(ClientError::Rpc) };
    let message = refused(&node, Code::InvalidArgument, call).await;
    assert_eq!(
        message,
        format!("events: 2000000 events is over the limit of {MAX_EVENTS_PER_REQUEST} per request")
    );
    let attrs = (0..=MAX_ATTRS_PER_EVENT).map(|i| (format!("a{i}"), Value::int(1))).collect();
    let wide = WriteRequest { events: vec![event("u1", "e1", vec![]), event("u1", "e2", attrs)] };
    let call = async { ingest.write(wide).await.map_err(ClientError::Rpc) };
    let message = refused(&node, Code::InvalidArgument, call).await;
    assert_eq!(message, format!("events[1].attrs: 65 attributes is over the limit of {MAX_ATTRS_PER_EVENT}"));
    // The node still takes writes.
    node.client().await.write(vec![event("u1", "e3", vec![])]).await.expect("write");
}

/// A `Write` whose bytes the wire check passes but prost cannot decode
/// (a `user_id` that is not UTF-8) is the caller's INVALID_ARGUMENT, not
/// the server's INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_prost_cannot_decode_is_invalid_argument() {
    /// `WriteRequest` with each event as its raw bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawWrite {
        #[prost(bytes = "vec", repeated, tag = "1")]
        events: Vec<Vec<u8>>,
    }
    let node = TestNode::start().await;
    let channel = tonic::transport::Endpoint::from_shared(node.endpoint()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    // Field 1 (`user_id`), two bytes that are not UTF-8.
    let request = RawWrite { events: vec![vec![0x0a, 0x02, 0xff, 0xfe]] };
    let codec: tonic_prost::ProstCodec<RawWrite, portrait_client::portrait_proto::v1::WriteResponse> =
        tonic_prost::ProstCodec::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/portrait.v1.Ingest/Write");
    let status = grpc.unary(tonic::Request::new(request), path, codec).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("request: not a valid protobuf message ("), "{}", status.message());
    assert_eq!(status.metadata().get("x-portrait-error").unwrap(), "INVALID_ARGUMENT");
}

/// Writes whose messages are still arriving hold node memory: at most
/// `MAX_RECEIVING_BYTES` of them, all calls together. Twelve raw HTTP/2
/// streams each announce a 16 MiB write and send 15 MiB of it, then stop:
/// at most eight fit, so at least four are refused with UNAVAILABLE naming
/// the limit, while the node goes on serving writes. Once the streams are
/// gone, what they held is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_being_received_share_one_byte_budget() {
    use portrait_server::limits::{MAX_MESSAGE_BYTES, MAX_RECEIVING_BYTES};

    const STREAMS: usize = 12;
    const SENT: usize = 15 << 20;
    const { assert!(STREAMS * SENT > MAX_RECEIVING_BYTES + 3 * SENT) };
    let node = TestNode::start().await;
    let client = node.client().await;
    let address = node.endpoint().trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    let mut answers = tokio::task::JoinSet::new();
    let mut body = vec![0u8];
    body.extend((MAX_MESSAGE_BYTES as u32).to_be_bytes());
    body.resize(SENT, 0x0a);
    let body = tonic::codegen::Bytes::from(body);
    for _ in 0..STREAMS {
        let (sender, response, mut stream, _) = raw_call(&address, "/portrait.v1.Ingest/Write").await;
        stream.send_data(body.clone(), false).expect("send the body");
        answers.spawn(async move {
            let response = response.await.expect("an answer");
            let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
            (header("grpc-status"), header("grpc-message"))
        });
        held.push((sender, stream));
    }
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused < STREAMS - MAX_RECEIVING_BYTES / SENT {
        let answer = tokio::time::timeout_at(deadline.into(), answers.join_next()).await;
        let (code, message) = answer.expect("refusals within 60 s").expect("an answer").expect("no panic");
        assert_eq!(code.as_deref(), Some("14"), "UNAVAILABLE: {message:?}");
        assert!(message.as_deref().unwrap_or_default().contains("MAX_RECEIVING_BYTES"), "{message:?}");
        refused += 1;
    }
    println!("{refused} of {STREAMS} half-sent writes refused");
    // The node still takes writes, and more once the streams are gone.
    client.write(vec![event("u1", "during", vec![])]).await.expect("a write while the budget is in use");
    drop(held);
    answers.abort_all();
    // About 14.3 MB: more than the streams left free while they were held.
    let big: Vec<Event> = (0..3_500)
        .map(|i| {
            event(
                &format!("big{}", i % 350),
                &format!("b{i}"),
                vec![("text".into(), Value::string("x".repeat(4_000)))],
            )
        })
        .collect();
    once_freed(|| client.write(big.clone())).await;
}

/// Read responses waiting for their readers share one node-wide budget,
/// `MAX_UNSENT_RESPONSE_BYTES`. Raw HTTP/2 streams each ask for the same
/// large `BatchGetProfiles` answer and never read it (HTTP/2 flow control
/// keeps all but the first 64 KiB in the node): exactly as many are
/// answered as fit the budget, the next is refused with UNAVAILABLE naming
/// the limit, a small read still succeeds, and once the readers are gone
/// the large read is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_waiting_for_their_readers_share_one_byte_budget() {
    use portrait_server::limits::MAX_UNSENT_RESPONSE_BYTES;
    use prost::Message;

    let node = TestNode::start().await;
    let client = node.client().await;
    // A 3.2 MiB profile, read four times in one answer.
    write_large_profile(&client).await;
    client.write(vec![event("small", "s1", vec![])]).await.expect("write a small profile");
    let large = names("big", 4);
    let size = client.batch_get_profiles(&large, &[], Consistency::Local).await.expect("read").encoded_len();
    let fit = MAX_UNSENT_RESPONSE_BYTES / size;
    println!("a response of {size} bytes: {fit} fit the budget");
    assert!((4..=16).contains(&fit), "{fit}");

    let body = grpc_body(&BatchGetProfilesRequest { user_ids: large.clone(), ..Default::default() });
    let address = node.endpoint().trim_start_matches("http://").to_string();
    // Each reader on a connection of its own, its answer never read.
    let mut readers = Vec::new();
    let refusal = loop {
        assert!(readers.len() <= fit, "{} answers held, {fit} fit", readers.len());
        let (sender, response, mut stream, connection) =
            raw_call(&address, "/portrait.v1.Profiles/BatchGetProfiles").await;
        stream.send_data(body.clone(), true).expect("send the request");
        let response = tokio::time::timeout(Duration::from_secs(30), response)
            .await
            .expect("an answer within 30 s")
            .expect("an answer");
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        match header("grpc-status") {
            // A refusal is trailers-only: its status is in the headers.
            Some(code) => break (code, header("grpc-message").unwrap_or_default()),
            None => readers.push((sender, response, connection)),
        }
    };
    println!("{} answers waiting for their readers, then: {refusal:?}", readers.len());
    assert_eq!(readers.len(), fit, "as many answers as fit the budget");
    assert_eq!(refusal.0, "14", "UNAVAILABLE: {refusal:?}");
    assert!(refusal.1.contains("MAX_UNSENT_RESPONSE_BYTES"), "{refusal:?}");
    // Through tonic too (a raw client: the Rust client would retry).
    let mut raw =
        portrait_client::portrait_proto::v1::profiles_client::ProfilesClient::connect(node.endpoint())
            .await
            .expect("connect");
    let again = BatchGetProfilesRequest { user_ids: large.clone(), ..Default::default() };
    let status = raw.batch_get_profiles(again).await.expect_err("no room for another answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("MAX_UNSENT_RESPONSE_BYTES"), "{status:?}");
    let small = client.get_profile("small", &[], Consistency::Local).await.expect("a small read still fits");
    assert!(small.profile.is_some());

    // The readers go away: what their answers held is free again.
    for (_, _, connection) in &readers {
        connection.abort();
    }
    drop(readers);
    let answer = once_freed(|| client.batch_get_profiles(&large, &[], Consistency::Local)).await;
    assert_eq!(answer.encoded_len(), size);
}

/// Sends `body` as calls of `method` on one new connection, never reading
/// an answer, until one is refused: how many were answered, the refusal's
/// `(grpc-status, grpc-message)`, and the connection's task.
async fn fill_one_connection(
    address: &str,
    method: &str,
    body: tonic::codegen::Bytes,
    at_most: usize,
) -> (usize, (String, String), tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let (sender, first, mut stream, connection) = raw_call(address, method).await;
    stream.send_data(body.clone(), true).expect("send the request");
    let (mut pending, mut answered) = (first, Vec::new());
    loop {
        assert!(
            answered.len() <= at_most,
            "{} answers held on one connection, {at_most} fit",
            answered.len()
        );
        let response = tokio::time::timeout(Duration::from_secs(30), pending)
            .await
            .expect("an answer within 30 s")
            .expect("an answer");
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        if let Some(code) = header("grpc-status") {
            return (answered.len(), (code, header("grpc-message").unwrap_or_default()), connection);
        }
        answered.push(response);
        let mut sender = sender.clone().ready().await.expect("ready");
        let (response, mut stream) = sender.send_request(grpc_request(address, method), false).expect("send");
        stream.send_data(body.clone(), true).expect("send the request");
        pending = response;
    }
}

/// Once the node holds more than half its response budget, one client
/// connection whose large answers are not read holds at most its share
/// (`MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION`): its next large read is
/// refused naming that limit, while a read on another connection is
/// answered; once the connection is gone, another fills as far again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connections_unread_answers_hold_at_most_its_share() {
    use portrait_server::limits::{MAX_UNSENT_RESPONSE_BYTES, MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION};
    use prost::Message;

    let node = TestNode::start().await;
    let client = node.client().await;
    write_large_profile(&client).await;
    let large = names("big", 4);
    let size = client.batch_get_profiles(&large, &[], Consistency::Local).await.expect("read").encoded_len();
    // Taken while the node is at most half full, or within the share.
    let fit = (MAX_UNSENT_RESPONSE_BYTES / 2).max(MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION) / size;
    let fit_all = MAX_UNSENT_RESPONSE_BYTES / size;
    assert!(fit >= 2 && fit + 1 < fit_all, "{size} bytes: {fit} fit one connection, {fit_all} the node");

    let body = grpc_body(&BatchGetProfilesRequest { user_ids: large.clone(), ..Default::default() });
    let address = node.endpoint().trim_start_matches("http://").to_string();
    let method = "/portrait.v1.Profiles/BatchGetProfiles";
    let (answered, refusal, connection) = fill_one_connection(&address, method, body.clone(), fit).await;
    println!("{answered} answers waiting on one connection, then: {refusal:?}");
    assert_eq!(answered, fit, "as many answers as fit one connection");
    assert_eq!(refusal.0, "14", "UNAVAILABLE: {refusal:?}");
    assert!(refusal.1.contains("MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION"), "{refusal:?}");
    // Another connection's large read still fits the node's budget.
    let answer =
        client.batch_get_profiles(&large, &[], Consistency::Local).await.expect("another connection");
    assert_eq!(answer.encoded_len(), size);
    // Gone, the connection gives its share back: another fills as far.
    connection.abort();
    let start = Instant::now();
    loop {
        let (again, refusal, connection) = fill_one_connection(&address, method, body.clone(), fit).await;
        connection.abort();
        if again == fit {
            assert!(refusal.1.contains("MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION"), "{refusal:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{again} of {fit} after the first connection went"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_answers_every_position_of_a_repeated_user() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let attrs = |c: &str| vec![("category".to_string(), Value::string(c))];
    client.write(vec![event("a", "e1", attrs("phone")), event("b", "e2", attrs("tv"))]).await.expect("write");
    let ids: Vec<String> = ["a", "b", "a", "nobody", "a"].iter().map(|s| s.to_string()).collect();
    let response = client.batch_get_profiles(&ids, &[], Consistency::Linearizable).await.expect("read");
    let got: Vec<_> = response.profiles.iter().map(|p| (p.user_id.as_str(), p.found)).collect();
    assert_eq!(got, [("a", true), ("b", true), ("a", true), ("nobody", false), ("a", true)]);
    assert_eq!(response.profiles[0], response.profiles[2]);
    assert_eq!(response.profiles[0], response.profiles[4]);

    // 1,000 ids, all the same: one read.
    let same = BatchGetProfilesRequest { user_ids: names("a", 1_000), ..Default::default() };
    let start = Instant::now();
    let mut raw =
        portrait_client::portrait_proto::v1::profiles_client::ProfilesClient::connect(node.endpoint())
            .await
            .expect("connect");
    let response = raw.batch_get_profiles(same).await.expect("read").into_inner();
    assert_eq!(response.profiles.len(), 1_000);
    assert!(response.profiles.iter().all(|p| *p == response.profiles[0]));
    let took = start.elapsed();
    println!("1,000 repeats of one user read in {took:?}");
    assert!(took < FAST, "1,000 repeats of one user read in {took:?}");
}

/// A `BatchGetProfiles` whose answer would pass the response limit is
/// refused while it is read, not built whole and then dropped by tonic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_past_the_response_limit_is_refused_while_reading() {
    let node = TestNode::start().await;
    let client = node.client().await;
    write_large_profile(&client).await;
    let one = client.batch_get_profiles(&names("big", 1), &[], Consistency::Local).await.expect("read");
    assert_eq!(one.profiles[0].families["browse"].history.len(), 50);

    // Six times the same 3.2 MiB profile is over 16 MiB: refused, naming the field.
    let message = refused(
        &node,
        Code::InvalidArgument,
        client.batch_get_profiles(&names("big", 6), &[], Consistency::Local),
    )
    .await;
    assert!(message.starts_with("user_ids: the response would pass 16 MiB (at user 1 of 1)"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_attribute_names_are_bounded_per_user_and_family() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let attrs =
        |from: usize, to: usize| (from..to).map(|i| (format!("a{i}"), Value::int(i as i64))).collect();
    // 256 names in 4 events of 64.
    let fill: Vec<Event> =
        (0..4).map(|e| event("poison", &format!("f{e}"), attrs(e * 64, e * 64 + 64))).collect();
    client.write(fill).await.expect("up to the limit");
    assert_eq!(MAX_UNDECLARED_ATTRS_PER_FAMILY, 256);
    // Known names still update; a 257th name is refused with the whole request.
    let request = vec![event("poison", "ok", attrs(0, 10)), event("poison", "new", attrs(255, 257))];
    let message = refused(&node, Code::FailedPrecondition, client.write(request)).await;
    assert!(message.contains("attribute \"a256\" is over the limit of 256 attribute names"), "{message}");
    let profile = client.get_profile("poison", &[], Consistency::Linearizable).await.expect("read");
    let browse = &profile.profile.expect("profile").families["browse"];
    assert_eq!(browse.attrs.len(), 256);
    assert!(browse.history.iter().all(|h| h.event_id != "ok" && h.event_id != "new"), "nothing applied");
    // Other users and known names are unaffected.
    client.write(vec![event("poison", "again", attrs(100, 164))]).await.expect("known names");
    client.write(vec![event("other", "o", attrs(300, 364))]).await.expect("another user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_distinct_values_are_kept_short_and_still_count_apart() {
    let node = TestNode::start().await;
    let client = node.client().await;
    let long = |i: usize| format!("{}{i}", "x".repeat(4_000));
    let events = (0..3)
        .map(|i| event("u", &format!("e{i}"), vec![("category".to_string(), Value::string(long(i)))]))
        .collect();
    client.write(events).await.expect("write");
    let profile = client.get_profile("u", &[], Consistency::Linearizable).await.expect("read");
    let features = profile.profile.expect("profile").features;
    let number = |name: &str| match &features[name].kind {
        Some(portrait_client::portrait_proto::v1::rule_value::Kind::NumberValue(n)) => *n,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(number("categories_30d"), 3.0);
    let Some(portrait_client::portrait_proto::v1::rule_value::Kind::MapValue(top)) =
        &features["browse_cat_7d"].kind
    else {
        panic!("browse_cat_7d is a map")
    };
    assert_eq!(top.counts.len(), 3);
    for key in top.counts.keys() {
        assert!(key.len() <= MAX_DISTINCT_VALUE_BYTES && key.starts_with("xxx"), "{key:?}");
    }
}
