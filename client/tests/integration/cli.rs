//! The `portrait` binary end to end against in-process fake nodes: output,
//! exit codes and the one-line error format.

use crate::fake;

use std::process::Stdio;

use fake::{Fake, Node};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn portrait(endpoint: &str, args: &[&str], stdin: &str) -> Run {
    portrait_with(&[], endpoint, args, stdin).await
}

/// `portrait` with these extra environment variables.
async fn portrait_with(envs: &[(&str, &str)], endpoint: &str, args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portrait"))
        .args(args)
        .env("PORTRAIT_ENDPOINT", endpoint)
        .env_remove("PORTRAIT_TOKEN")
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("{{\"user_id\":\"u{i}\",\"family\":\"browse\",\"type\":\"view\"}}\n")).collect()
}

#[tokio::test]
async fn put_through_a_follower_prints_counts() {
    let leader = Node::start(Fake { id: 7, ..Default::default() }).await;
    let follower = Node::start(Fake { id: 1, ..Default::default() }).await;
    follower.fake.set_hint(Some(&leader.url()));
    // With event ids: a write is resent to the leader the follower names
    // only when resending cannot apply an event twice.
    let events = r#"[{"user_id":"u1","family":"browse","type":"view","event_id":"e1","attrs":{"price":399.0}},
                     {"user_id":"u2","family":"browse","type":"view","event_id":"e2"}]"#;
    let run = portrait(&follower.addr, &["put", "--json", events], "").await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""));
    assert_eq!(run.stdout, "applied=2 duplicates=0 expired=0 log_index=7\n");
}

#[tokio::test]
async fn load_from_stdin_in_batches() {
    let node = Node::start(Fake { id: 1, ..Default::default() }).await;
    let run = portrait(&node.addr, &["load", "-", "--batch", "100", "--concurrency", "2"], &lines(250)).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""));
    assert!(
        run.stdout.starts_with("events=250 applied=250 duplicates=0 expired=0 elapsed="),
        "{}",
        run.stdout
    );
    assert_eq!(node.fake.calls(), 3);
}

#[tokio::test]
async fn load_from_a_file() {
    let node = Node::start(Fake { id: 1, ..Default::default() }).await;
    let path = std::env::temp_dir().join(format!("portrait-cli-test-{}.jsonl", std::process::id()));
    std::fs::write(&path, lines(5)).unwrap();
    let run = portrait(&node.addr, &["load", path.to_str().unwrap(), "--batch", "2"], "").await;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("events=5 applied=5 "), "{}", run.stdout);
    assert_eq!(node.fake.calls(), 3);
}

#[tokio::test]
async fn load_stops_at_a_bad_line_without_sending_its_batch() {
    let node = Node::start(Fake { id: 1, ..Default::default() }).await;
    let input = format!("{}\n{{\"user_id\":\"u\"}}\n{}", lines(150), lines(10));
    let run = portrait(&node.addr, &["load", "-", "--batch", "100"], &input).await;
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr,
        "error: stopped: lines 1-100 were written (100 events); line 152: missing field `family`\n"
    );
    assert_eq!(run.stdout, "");
    assert_eq!(node.fake.calls(), 1);
}

#[tokio::test]
async fn get_prints_text_or_json() {
    let node = Node::start(Fake { id: 3, ..Default::default() }).await;
    let run = portrait(&node.addr, &["get", "u1", "--linearizable"], "").await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let expected = "user u1 (node 3, applied index 9, lag 0)\n\n[browse]\n\
        \x20 category  \"phone\"  (at 2023-11-14T22:13:20.000Z, expires never)\n";
    assert_eq!(run.stdout, expected);

    let run = portrait(&node.addr, &["get", "u2", "--json"], "").await;
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["found"], false);
    assert_eq!(json["read_info"]["node_id"], 3);
}

#[tokio::test]
async fn server_errors_are_one_line() {
    let node = Node::start(Fake { id: 1, ..Default::default() }).await;
    let event = r#"{"user_id":"","family":"browse","type":"view"}"#;
    let run = portrait(&node.url(), &["put", "--json", event], "").await;
    assert_eq!(run.code, 1);
    assert_eq!(run.stderr, "error: INVALID_ARGUMENT: events[0].user_id: must not be empty\n");
}

#[tokio::test]
async fn unreachable_endpoint_and_usage_errors() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let run = portrait(&closed, &["status"], "").await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.starts_with(&format!("error: cannot connect to http://{closed}: ")), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1);

    let run = portrait(&closed, &["get"], "").await;
    assert_eq!(run.code, 2);
}

#[tokio::test]
async fn the_token_from_the_flag_or_the_environment_reaches_the_leader_too() {
    let leader = Node::start(Fake { id: 7, ..Default::default() }).await;
    let follower = Node::start(Fake { id: 1, ..Default::default() }).await;
    follower.fake.set_hint(Some(&leader.url()));
    let event = r#"{"user_id":"u1","family":"browse","type":"view","event_id":"e1"}"#;
    let run = portrait(&follower.addr, &["put", "--json", event, "--token", "from-flag"], "").await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""));
    let env = [("PORTRAIT_TOKEN", "from-env")];
    let run = portrait_with(&env, &follower.addr, &["put", "--json", event], "").await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""));
    let (flag, env) = ("Bearer from-flag", "Bearer from-env");
    // The follower is asked for the shard map, then redirects the write.
    assert_eq!(follower.fake.authorizations(), [flag, flag, env, env], "the follower");
    assert_eq!(leader.fake.authorizations(), [flag, env], "the leader, which applied");

    let run = portrait(&follower.addr, &["status", "--token", "two words"], "").await;
    assert_eq!(run.code, 1);
    assert_eq!(run.stderr, "error: invalid client settings: token: must be visible ASCII characters only\n");
}
