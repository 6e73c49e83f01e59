//! `portrait locate USER`: the user's shard, its replicas and leader.

use std::fmt::Write;

use portrait_client::portrait_proto::v1::LocateResponse;
use portrait_client::PortraitClient;
use serde_json::json;

pub async fn run(client: &PortraitClient, user: &str, as_json: bool) -> anyhow::Result<String> {
    let located = client.locate(user).await?;
    Ok(if as_json { to_json(user, &located) } else { to_text(user, &located) })
}

fn to_text(user: &str, l: &LocateResponse) -> String {
    let leader = match l.leader_id {
        0 => "unknown".to_string(),
        id => format!("{id} at {}", l.leader_addr),
    };
    let mut out = format!("user      {user}\nshard     {} (map epoch {})\n", l.shard, l.epoch);
    let _ = writeln!(out, "leader    {leader}");
    let _ = writeln!(out, "replicas  {}", l.replicas.len());
    let width = l.replicas.iter().map(|r| r.addr.len()).max().unwrap_or(0);
    for r in &l.replicas {
        let role = match (r.node_id == l.leader_id, r.voter) {
            (true, _) => "leader",
            (false, true) => "voter",
            (false, false) => "learner",
        };
        let _ = writeln!(out, "  {:>3}  {:<width$}  {role}", r.node_id, r.addr);
    }
    out
}

fn to_json(user: &str, l: &LocateResponse) -> String {
    let replicas: Vec<_> = l
        .replicas
        .iter()
        .map(|r| json!({"node_id": r.node_id, "addr": r.addr, "voter": r.voter, "leader": r.node_id == l.leader_id}))
        .collect();
    let leader = (l.leader_id != 0).then(|| json!({"node_id": l.leader_id, "addr": l.leader_addr}));
    let value =
        json!({"user_id": user, "shard": l.shard, "epoch": l.epoch, "leader": leader, "replicas": replicas});
    format!("{value:#}\n")
}

#[cfg(test)]
mod tests {
    use portrait_client::portrait_proto::v1::ShardReplica;

    use super::*;

    fn located() -> LocateResponse {
        let replica =
            |node_id, voter| ShardReplica { node_id, addr: format!("http://n{node_id}:7700"), voter };
        LocateResponse {
            shard: 3,
            epoch: 7,
            replicas: vec![replica(1, true), replica(2, true), replica(4, false)],
            leader_id: 2,
            leader_addr: "http://n2:7700".into(),
        }
    }

    #[test]
    fn text_names_the_shard_leader_and_replicas() {
        let expected = "user      u1\n\
            shard     3 (map epoch 7)\n\
            leader    2 at http://n2:7700\n\
            replicas  3\n\
            \x20   1  http://n1:7700  voter\n\
            \x20   2  http://n2:7700  leader\n\
            \x20   4  http://n4:7700  learner\n";
        assert_eq!(to_text("u1", &located()), expected);
        let unknown = LocateResponse { leader_id: 0, leader_addr: String::new(), ..located() };
        assert!(to_text("u1", &unknown).contains("leader    unknown\n"));
    }

    #[test]
    fn json_has_every_field() {
        let value: serde_json::Value = serde_json::from_str(&to_json("u1", &located())).unwrap();
        assert_eq!(value["shard"], 3);
        assert_eq!(value["leader"]["node_id"], 2);
        assert_eq!(
            value["replicas"][2],
            json!({"node_id": 4, "addr": "http://n4:7700", "voter": false, "leader": false})
        );
    }
}
