//! A single node with several shards: one write spans every shard and is
//! read back from each user's shard; the number of shards is fixed in the
//! data dir.

use crate::common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{TestNode, SHARDS};
use portrait_client::json::now_ms;
use portrait_client::{Consistency, Event, Value};
use portrait_core::shard::shard_of;

fn event(user: &str, id: &str) -> Event {
    Event {
        user_id: user.into(),
        family: "browse".into(),
        r#type: "view".into(),
        event_time_ms: now_ms() - 1_000,
        event_id: id.into(),
        attrs: [("page".to_string(), Value::string(format!("p-{user}")))].into(),
    }
}

/// Users enough to cover every shard, several in each.
fn users() -> Vec<String> {
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let shards: BTreeSet<u32> = users.iter().map(|u| shard_of(u, SHARDS)).collect();
    assert_eq!(shards.len(), SHARDS as usize, "the test users cover every shard");
    users
}

#[tokio::test]
async fn one_write_spans_every_shard_and_each_user_is_read_from_its_shard() {
    let node = TestNode::start_sharded(SHARDS).await;
    let client = node.client().await;
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.shards, SHARDS);
    assert_eq!(status.shard_status.len(), SHARDS as usize);
    assert!(status.shard_status.iter().all(|s| s.leader_id == 1 && s.role == "Leader"), "{status:?}");

    let users = users();
    let events: Vec<Event> = users.iter().map(|u| event(u, &format!("e-{u}"))).collect();
    let written = client.write(events.clone()).await.expect("write");
    assert_eq!((written.applied, written.duplicates), (users.len() as u32, 0));
    let shards: Vec<u32> = written.shards.iter().map(|s| s.shard).collect();
    assert_eq!(shards, (0..SHARDS).collect::<Vec<_>>(), "one result per shard, in shard order");
    for part in &written.shards {
        let in_shard = users.iter().filter(|u| shard_of(u, SHARDS) == part.shard).count() as u32;
        assert_eq!(part.applied, in_shard, "shard {}", part.shard);
        assert!(part.log_index > 0);
    }
    assert_eq!(written.log_index, written.shards.iter().map(|s| s.log_index).max().unwrap());

    // Each user from its own shard, at both consistencies.
    for consistency in [Consistency::Local, Consistency::Linearizable] {
        for user in &users {
            let got = client.get_profile(user, &[], consistency).await.expect("get");
            let info = got.read_info.expect("read info");
            assert_eq!(info.shard, shard_of(user, SHARDS), "{user}");
            let browse = &got.profile.expect("profile").families["browse"];
            let page = browse.attrs["page"].value.clone().expect("page");
            assert_eq!(page, Value::string(format!("p-{user}")));
        }
    }

    // A batch across shards comes back in request order, repeats included.
    let mut asked: Vec<String> = users.iter().rev().cloned().collect();
    asked.push(users[0].clone());
    asked.push("nobody".into());
    let batch = client.batch_get_profiles(&asked, &[], Consistency::Linearizable).await.expect("batch");
    let ids: Vec<&str> = batch.profiles.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(ids, asked.iter().map(String::as_str).collect::<Vec<_>>());
    let found: Vec<bool> = batch.profiles.iter().map(|p| p.found).collect();
    assert!(found[..asked.len() - 1].iter().all(|f| *f) && !found[asked.len() - 1]);

    // Written again: every event is a duplicate, in every shard.
    let again = client.write(events).await.expect("write again");
    assert_eq!((again.applied, again.duplicates), (0, users.len() as u32));
}

#[tokio::test]
async fn a_restart_with_another_number_of_shards_is_refused() {
    let mut node = TestNode::start_sharded(SHARDS).await;
    node.stop().await;
    let (status, stderr) = common::exit_of(
        Command::new(env!("CARGO_BIN_EXE_portraitd"))
            .arg("--data-dir")
            .arg(node.data_dir())
            .args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0", "--shards", "8"])
            .env_remove("PORTRAIT_CONFIG"),
    );
    assert!(!status.success(), "{stderr}");
    let expected = format!(
        "--shards 8: the data dir {} belongs to a cluster of {SHARDS} shards",
        node.data_dir().display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    // The same number, or none, starts.
    node.restart().await;
    assert_eq!(node.client().await.cluster_status().await.unwrap().shards, SHARDS);
    // What the other tests start: one shard.
    let mut one = TestNode::start().await;
    assert_eq!(one.client().await.cluster_status().await.unwrap().shards, 1);
    one.kill();
}

/// The state a dropped replica left behind (its raft log already gone: a
/// drop whose state deletion was refused, or a crash between its two
/// deletions) is deleted by the node's first placement pass after a
/// restart; the node opens only the groups its raft log has, so nothing
/// else would find it.
#[tokio::test]
async fn the_state_a_dropped_replica_left_behind_is_deleted_after_a_restart() {
    use openraft::CommittedLeaderId;
    use portrait_server::store::keys::{meta, CF_META, META_APPLIED};
    use portrait_server::store::{codec, sm_db::cf, StateDb};
    use portrait_server::types::{GroupId, LogId};
    let mut node = TestNode::start_sharded(SHARDS).await;
    node.stop().await;
    // Every shard is hosted here: the left-behind state is a group above them.
    let orphan = GroupId(SHARDS + 5);
    {
        let db = StateDb::open(&node.data_dir()).unwrap();
        let raw = db.db();
        let applied = codec::encode(&LogId::new(CommittedLeaderId::new(3, 2), 7));
        raw.put_cf(cf(&raw, CF_META), meta(orphan, META_APPLIED), applied).unwrap();
        db.persist().unwrap();
        assert!(db.groups_with_state().unwrap().contains(&orphan));
    }
    node.restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !node.log().contains("deleted the state a dropped replica left") {
        assert!(std::time::Instant::now() < deadline, "never deleted:\n{}", node.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    node.stop().await;
    let groups = StateDb::open(&node.data_dir()).unwrap().groups_with_state().unwrap();
    assert!(!groups.contains(&orphan), "{groups:?}");
    assert!((0..SHARDS).all(|s| groups.contains(&GroupId(s))), "the node's shards keep theirs: {groups:?}");
}
