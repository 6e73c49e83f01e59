//! Token checks end to end: a real `portraitd` started with a token file.
//!
//! - Every RPC of every service the node serves (walked from the proto
//!   descriptors, so a new RPC cannot be forgotten) × {no token, an unknown
//!   token, reader, writer, admin}: exactly the calls the table allows get
//!   past the check; the others are `UNAUTHENTICATED` or
//!   `PERMISSION_DENIED`. The peer RPCs are not served on the client port
//!   (`UNIMPLEMENTED`); the peer port serves them and nothing else.
//! - Every admin call that got through is in the audit log, naming the
//!   token; none that was refused.
//! - SIGHUP re-reads the file; a malformed file then keeps the tokens in use;
//!   a write stream or a backup stream whose token it removed ends.
//! - A malformed token file stops the start with a one-line reason naming it.

#[allow(dead_code)] // the token tests start their own nodes
use crate::common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::v1::{backup_shard_chunk, BackupShardChunk};
use portrait_client::{json, ConnectOptions, Consistency, PortraitClient};
use portrait_server::auth::{access, hex, sha256, Access, Role, RPCS};
use prost::Message;
use tonic::transport::Channel;

const TOKENS: [(&str, &str, Role); 3] = [
    ("dashboard", "reader-secret-0123456789abcdef", Role::Reader),
    ("ingest", "writer-secret-0123456789abcdef", Role::Writer),
    ("ops", "admin-secret-0123456789abcdef", Role::Admin),
];

fn token_file(extra: &[(&str, &str, &str)]) -> String {
    let mut text = String::new();
    let all = TOKENS.iter().map(|(n, t, r)| (*n, *t, r.name())).chain(extra.iter().copied());
    for (name, token, role) in all {
        let digest = hex(&sha256(token));
        text += &format!("[[token]]\nname = \"{name}\"\nsha256 = \"{digest}\"\nroles = [\"{role}\"]\n\n");
    }
    text
}

/// Every gRPC method path of the services in these descriptor sets.
fn methods(sets: &[&[u8]]) -> Vec<String> {
    let mut paths = Vec::new();
    for bytes in sets {
        let set = prost_types::FileDescriptorSet::decode(*bytes).expect("descriptor set");
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
    }
    paths
}

/// A `portraitd` started in `dir` (its `tokens.toml` must exist), killed on
/// drop; its log is printed if the test panics.
struct Node {
    child: Child,
    port: u16,
    peer_port: u16,
    dir: std::path::PathBuf,
}

impl Node {
    fn spawn(dir: &Path) -> Node {
        let (port, peer_port) = (common::free_port(), common::free_port());
        let child = common::portraitd(dir, (port, peer_port), 2)
            .arg("--token-file")
            .arg(dir.join("tokens.toml"))
            .arg("--audit-log")
            .arg(dir.join("audit.jsonl"))
            .spawn()
            .expect("spawn portraitd");
        Node { child, port, peer_port, dir: dir.to_path_buf() }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("portraitd.log")).unwrap_or_default()
    }

    /// A channel once the node serves (a reader token sees a leader).
    async fn connect(&mut self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(20);
        let endpoint = format!("http://127.0.0.1:{}", self.port);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("portraitd exited with {status}\n{}", self.log());
            }
            if let Ok(channel) = Channel::from_shared(endpoint.clone()).unwrap().connect().await {
                if call(&channel, "/portrait.v1.Admin/ClusterStatus", Some(TOKENS[0].1)).await.is_ok() {
                    return channel;
                }
            }
            assert!(Instant::now() < deadline, "portraitd did not serve\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- portraitd log ----\n{}", self.log());
        }
    }
}

/// Calls `path` with one empty message and `token`; `Err` carries the code.
async fn call(channel: &Channel, path: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(futures::stream::iter([()]));
    if let Some(t) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request.set_timeout(Duration::from_secs(10));
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = path.parse().unwrap();
    grpc.streaming(request, path, codec).await.map(|_| ())
}

fn refused(result: &Result<(), tonic::Status>) -> Option<tonic::Code> {
    match result {
        Err(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
            Some(s.code())
        }
        _ => None,
    }
}

#[tokio::test]
async fn exactly_the_calls_a_tokens_roles_allow_get_through() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokens.toml"), token_file(&[])).unwrap();
    let mut node = Node::spawn(dir.path());
    let channel = node.connect().await;

    let served = methods(&[
        portrait_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    ]);
    for path in &served {
        assert!(access(path).is_some(), "{path} has no entry in auth::RPCS");
    }
    for (path, _) in RPCS {
        assert!(served.iter().any(|s| s == path), "auth::RPCS lists {path}, which no descriptor has");
    }

    let presented: Vec<(String, Option<&str>, Option<Role>)> = [("no token".to_string(), None, None)]
        .into_iter()
        .chain([("an unknown token".to_string(), Some("not-a-token"), None)])
        .chain(
            TOKENS
                .iter()
                .map(|(name, token, role)| (format!("{name} ({})", role.name()), Some(*token), Some(*role))),
        )
        .collect();
    let mut checked = 0;
    for path in &served {
        // Peer RPCs are not served on the client port at all, whatever the
        // token. Open ones answer anyone.
        let rule = access(path).unwrap();
        for (who, token, role) in &presented {
            let result = call(&channel, path, *token).await;
            if rule == Access::Peer {
                let code = result.as_ref().err().map(tonic::Status::code);
                assert_eq!(code, Some(tonic::Code::Unimplemented), "{path} with {who} on the client port");
                checked += 1;
                continue;
            }
            let allowed = match rule {
                Access::Open | Access::Peer => true,
                Access::Role(needed) => *role == Some(needed),
                Access::AnyToken => role.is_some(),
            };
            match (allowed, refused(&result)) {
                (true, None) => {}
                (false, Some(code)) => {
                    let want = if role.is_some() {
                        tonic::Code::PermissionDenied
                    } else {
                        tonic::Code::Unauthenticated
                    };
                    assert_eq!(code, want, "{path} with {who}: {result:?}");
                }
                (true, Some(_)) => panic!("{path} with {who} was refused: {result:?}"),
                (false, None) => panic!("{path} with {who} got through: {result:?}"),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, served.len() * 5);
    println!("{checked} calls checked over {} RPCs", served.len());

    // The peer port: raft without a token, no client service.
    let peer = Channel::from_shared(format!("http://127.0.0.1:{}", node.peer_port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for path in served.iter().filter(|p| access(p) == Some(Access::Peer)) {
        let code = call(&peer, path, None).await.err().map(|s| s.code());
        assert_ne!(code, Some(tonic::Code::Unimplemented), "{path} is not served on the peer port");
    }
    assert!(call(&peer, "/portrait.v1.Raft/Clock", None).await.is_ok());
    for path in
        ["/portrait.v1.Ingest/Write", "/portrait.v1.Admin/RemoveNode", "/portrait.v1.Profiles/GetProfile"]
    {
        let code = call(&peer, path, TOKENS[2].1.into()).await.err().map(|s| s.code());
        assert_eq!(code, Some(tonic::Code::Unimplemented), "{path} on the peer port");
    }

    // What the table says, spelled out apart from it (docs/security.md).
    let [reader, writer, admin] = TOKENS.map(|(_, token, _)| Some(token));
    let expect = [
        ("/portrait.v1.Ingest/Write", reader, Some(tonic::Code::PermissionDenied)),
        ("/portrait.v1.Ingest/Write", writer, None),
        ("/portrait.v1.Profiles/GetProfile", admin, Some(tonic::Code::PermissionDenied)),
        ("/portrait.v1.Profiles/GetProfile", reader, None),
        ("/portrait.v1.Admin/ApplySchema", writer, Some(tonic::Code::PermissionDenied)),
        ("/portrait.v1.Admin/RemoveNode", None, Some(tonic::Code::Unauthenticated)),
        ("/portrait.v1.Admin/RemoveNode", admin, None),
        ("/grpc.health.v1.Health/Check", None, None),
    ];
    for (path, token, code) in expect {
        assert_eq!(refused(&call(&channel, path, token).await), code, "{path} with {token:?}");
    }

    // Every admin RPC the admin token reached left exactly its audit
    // entries, naming the token; no refused call did.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let audited: std::collections::BTreeSet<String> =
        entries.iter().map(|e| format!("/portrait.v1.{}", e["rpc"].as_str().unwrap())).collect();
    // (The peer-port check above sent a Join too: audited as the node.)
    let mut expected: std::collections::BTreeSet<String> =
        RPCS.iter().filter(|(_, a)| *a == Access::Role(Role::Admin)).map(|(p, _)| p.to_string()).collect();
    expected.insert("/portrait.v1.Raft/Join".into());
    assert_eq!(audited, expected, "every admin RPC and joining is audited, and nothing else");
    let by_admin = entries.iter().filter(|e| e["rpc"].as_str().unwrap().starts_with("Admin/"));
    assert!(by_admin.into_iter().all(|e| e["caller"] == "ops" && e["remote"].is_string()), "{audit}");
    assert!(entries.iter().all(|e| e["at_ms"].is_u64() && e["ok"].is_boolean()), "{audit}");
    let removals = entries.iter().filter(|e| e["rpc"] == "Admin/RemoveNode").count();
    assert_eq!(removals, 2, "the matrix's and the spot check's, not the refused ones: {audit}");

    // The Rust client carries its token on every call, to both shards.
    let endpoint = format!("127.0.0.1:{}", node.port);
    let client = |token: &str| {
        let options = ConnectOptions::new().token(token).unwrap();
        PortraitClient::connect_with(&endpoint, options)
    };
    let events: Vec<_> = (0..8)
        .map(|i| {
            json::event_from_json(
                &serde_json::json!({"user_id": format!("u{i}"), "family": "browse", "type": "view"}),
            )
            .unwrap()
        })
        .collect();
    let writer = client(TOKENS[1].1).await.unwrap();
    let written = writer.write(events.clone()).await.unwrap();
    assert_eq!((written.applied, written.shards.len()), (8, 2), "{written:?}");
    let reader = client(TOKENS[0].1).await.unwrap();
    let refused = reader.write(events).await.unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::PermissionDenied), "{refused}");
    let profile = reader.get_profile("u3", &[], Consistency::Linearizable).await.unwrap();
    assert!(profile.profile.unwrap().found);
    let stranger = client("not-a-token").await.unwrap();
    let refused = stranger.get_profile("u3", &[], Consistency::Local).await.unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::Unauthenticated), "{refused}");
}

#[tokio::test]
async fn sighup_rereads_the_token_file_and_a_bad_one_keeps_the_tokens_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    std::fs::write(&file, token_file(&[])).unwrap();
    let mut node = Node::spawn(dir.path());
    let channel = node.connect().await;
    let status = "/portrait.v1.Admin/ClusterStatus";
    let new = "new-reader-secret-0123456789abcdef";
    assert_eq!(refused(&call(&channel, status, Some(new)).await), Some(tonic::Code::Unauthenticated));

    let hup = |pid: u32| {
        let ok = Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -HUP");
    };
    std::fs::write(&file, token_file(&[("new", new, "reader")])).unwrap();
    hup(node.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&channel, status, Some(new)).await.is_err() {
        assert!(Instant::now() < deadline, "the new token was never accepted\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A malformed file: the node logs why and keeps every token it had.
    std::fs::write(&file, "[[token]]\nname = \"x\"\n").unwrap();
    hup(node.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log().contains("token file not reloaded") {
        assert!(Instant::now() < deadline, "no reload error logged\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(call(&channel, status, Some(new)).await.is_ok(), "a bad reload dropped the tokens");
    assert!(call(&channel, status, Some(TOKENS[0].1)).await.is_ok());

    // A FIFO in its place is refused without being opened (opening one
    // blocks until a writer comes, which hung every later reload), and
    // the next reload still runs: it replaces the secret of "new".
    std::fs::remove_file(&file).unwrap();
    assert!(Command::new("mkfifo").arg(&file).status().unwrap().success(), "mkfifo");
    hup(node.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log().contains("not a regular file") {
        assert!(Instant::now() < deadline, "the FIFO was not refused\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(&file).unwrap();
    let replaced = "new-reader-replaced-0123456789abcdef";
    std::fs::write(&file, token_file(&[("new", replaced, "reader")])).unwrap();
    hup(node.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&channel, status, Some(replaced)).await.is_err() {
        assert!(Instant::now() < deadline, "no reload after the FIFO\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused(&call(&channel, status, Some(new)).await), Some(tonic::Code::Unauthenticated));
    // Both reloads are in the audit trail: who was added, and the refusal.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let reloads: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["rpc"] == "SIGHUP/ReloadTokens")
        .collect();
    assert_eq!(reloads.len(), 4, "{audit}");
    assert_eq!(
        (&reloads[0]["ok"], &reloads[0]["caller"]),
        (&serde_json::json!(true), &serde_json::json!("(SIGHUP)"))
    );
    assert_eq!(reloads[0]["args"]["added"], serde_json::json!(["new"]), "{audit}");
    assert_eq!(reloads[0]["args"]["removed"], serde_json::json!([]), "{audit}");
    assert_eq!(reloads[0]["args"]["tokens"], serde_json::json!(TOKENS.len() + 1), "{audit}");
    assert_eq!(reloads[0]["args"]["secret_changed"], serde_json::json!([]), "{audit}");
    assert_eq!(reloads[1]["ok"], serde_json::json!(false), "{audit}");
    assert_eq!(reloads[2]["ok"], serde_json::json!(false), "{audit}");
    // A token replaced under its name shows, by name only.
    assert_eq!(reloads[3]["args"]["secret_changed"], serde_json::json!(["new"]), "{audit}");
    assert_eq!(reloads[3]["args"]["roles_changed"], serde_json::json!([]), "{audit}");
    assert!(!audit.contains(&hex(&sha256(replaced))), "no digest in the audit trail");
    assert!(!audit.contains(&hex(&sha256(new))), "no digest in the audit trail");

    // A stream outlives no reload that removes its token: its next batch
    // ends it. The batches before were applied.
    let streamer = "stream-writer-secret-0123456789abcdef";
    std::fs::write(&file, token_file(&[("streamer", streamer, "writer")])).unwrap();
    hup(node.child.id());
    let write = "/portrait.v1.Ingest/Write";
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&call(&channel, write, Some(streamer)).await) == Some(tonic::Code::Unauthenticated) {
        assert!(Instant::now() < deadline, "the streamer's token was never accepted\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let endpoint = format!("127.0.0.1:{}", node.port);
    let connect =
        |token: &str| PortraitClient::connect_with(&endpoint, ConnectOptions::new().token(token).unwrap());
    let (writer, reader) = (connect(streamer).await.unwrap(), connect(TOKENS[0].1).await.unwrap());
    let batch = |user: &str| portrait_client::WriteRequest {
        events: vec![json::event_from_json(
            &serde_json::json!({"user_id": user, "family": "browse", "type": "view"}),
        )
        .unwrap()],
    };
    let found = |user: &'static str| {
        let reader = reader.clone();
        async move {
            match reader.get_profile(user, &[], Consistency::Linearizable).await {
                Ok(p) => p.profile.is_some_and(|p| p.found),
                Err(e) if e.code() == Some(tonic::Code::NotFound) => false,
                Err(e) => panic!("reading {user}: {e}"),
            }
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let stream =
        tokio::spawn(
            async move { writer.write_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await },
        );
    tx.send(batch("s1")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !found("s1").await {
        assert!(Instant::now() < deadline, "the first batch was never applied\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&file, token_file(&[])).unwrap();
    hup(node.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&call(&channel, write, Some(streamer)).await) != Some(tonic::Code::Unauthenticated) {
        assert!(Instant::now() < deadline, "the streamer's token was never removed\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.send(batch("s2")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream)
        .await
        .expect("the stream went on after its token was removed")
        .unwrap()
        .expect_err("a stream whose token was removed");
    assert_eq!(ended.code(), Some(tonic::Code::Unauthenticated), "{ended}");
    assert!(ended.to_string().contains("batch 1 (earlier batches were applied)"), "{ended}");
    assert!(!found("s2").await, "the batch after the removal was applied");
}

/// A shard export streaming when its token is removed (SIGHUP) ends before
/// its next chunk, as a `WriteStream` does: the archive is not handed out
/// whole to a token the operator revoked.
#[tokio::test]
async fn a_backup_stream_ends_once_its_token_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let exporter = "exporter-secret-0123456789abcdef";
    std::fs::write(&file, token_file(&[("exporter", exporter, "admin")])).unwrap();
    let mut node = Node::spawn(dir.path());
    let channel = node.connect().await;
    let endpoint = format!("127.0.0.1:{}", node.port);
    let connect =
        |token: &str| PortraitClient::connect_with(&endpoint, ConnectOptions::new().token(token).unwrap());
    let (writer, admin) = (connect(TOKENS[1].1).await.unwrap(), connect(exporter).await.unwrap());
    // The data dir the node created (it holds the exports) is its user's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("data")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    // About 16 MB of text that compresses little (hex of a xorshift), one
    // user per event: several MiB of archive per shard, far more than the
    // stream buffers once its reader stops taking chunks.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = || {
        (0..256)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{x:016x}")
            })
            .collect::<String>()
    };
    for part in 0..4 {
        let events = (0..1000)
            .map(|i| {
                let user = format!("u{part}-{i}");
                let e = serde_json::json!({"user_id": user, "family": "browse", "type": "view",
                    "attrs": {"note": noise()}});
                json::event_from_json(&e).unwrap()
            })
            .collect();
        writer.write(events).await.expect("write");
    }
    let mut stream = admin.backup_shard_from(&format!("http://{endpoint}"), 0).await.expect("backup");
    let header = stream.message().await.expect("header").expect("a first message");
    assert!(matches!(header.part, Some(backup_shard_chunk::Part::Header(_))), "{header:?}");

    std::fs::write(&file, token_file(&[])).unwrap();
    let ok = Command::new("kill").args(["-HUP", &node.child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -HUP");
    let status = "/portrait.v1.Admin/ClusterStatus";
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&call(&channel, status, Some(exporter)).await) != Some(tonic::Code::Unauthenticated) {
        assert!(Instant::now() < deadline, "the exporter's token was never removed\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut data = 0usize;
    let ended = loop {
        match stream.message().await {
            Ok(Some(BackupShardChunk { part: Some(backup_shard_chunk::Part::Data(d)) })) => data += d.len(),
            Ok(other) => panic!("the stream went on to {other:?} after {data} bytes"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended}");
    assert!(ended.message().contains("was removed or lost its role"), "{ended}");
}

#[test]
fn a_malformed_or_missing_token_file_stops_the_start_naming_the_file() {
    for (text, reason) in [(Some("[[token]]\nname = \"x\"\n"), "missing field"), (None, "No such file")] {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = text {
            std::fs::write(dir.path().join("tokens.toml"), text).unwrap();
        }
        let mut node = Node::spawn(dir.path());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = node.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "portraitd started with a bad token file\n{}", node.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(1));
        let log = node.log();
        let line = log.lines().find(|l| l.starts_with("portraitd:")).unwrap_or_default();
        assert!(line.contains("tokens.toml") && line.contains(reason), "{log}");
    }
}
