//! `portrait status`: the answering node's raft and membership state.

use std::fmt::Write;

use portrait_client::portrait_proto::v1::{ClockStatus, ClusterStatusResponse, ConfirmClockResponse, Member};
use portrait_client::PortraitClient;

pub async fn run(client: &PortraitClient) -> anyhow::Result<String> {
    Ok(render(&client.cluster_status().await?))
}

/// The node's state, as `portrait status` prints it.
pub fn render(s: &ClusterStatusResponse) -> String {
    let leader = match s.leader_id {
        0 => "unknown".to_string(),
        id if s.leader_addr.is_empty() => id.to_string(),
        id => format!("{id} at {}", s.leader_addr),
    };
    let mut out = format!("node            {} ({})\n", s.node_id, s.role);
    let _ = writeln!(out, "leader          {leader}");
    let _ = writeln!(out, "term            {}", s.term);
    let _ = writeln!(
        out,
        "log index       last={} applied={} snapshot={} purged={}",
        s.last_log_index, s.applied_index, s.snapshot_index, s.purged_index
    );
    let contact = match s.leader_contact_age_ms {
        Some(ms) => format!("leader contact {ms} ms ago"),
        None => "no leader contact since start".into(),
    };
    let _ = writeln!(out, "lag             {} entries, {contact}", s.lag_entries);
    let _ = writeln!(out, "schema version  {}", s.schema_version);
    if s.reevaluating {
        let _ =
            writeln!(out, "re-evaluating   existing users for the new schema: {} done", s.reevaluated_users);
    }
    if let Some(clock) = &s.clock {
        let _ = writeln!(out, "clock           {}", clock_text(clock));
    }
    if !s.version.is_empty() {
        let _ = writeln!(out, "server version  {}", s.version);
    }
    let _ = writeln!(out, "members         {}", s.members.len());
    out.push_str(&member_lines(&s.members));
    if !s.meta_voters.is_empty() {
        let voters: Vec<String> = s.meta_voters.iter().map(u64::to_string).collect();
        let leader = match s.meta_leader_id {
            0 => "unknown".to_string(),
            id => id.to_string(),
        };
        let _ = writeln!(out, "meta group      leader {leader}, voters {}", voters.join(", "));
    }
    if s.incarnation != 0 {
        let _ = writeln!(out, "data dir        incarnation {:x}", s.incarnation);
    }
    for peer in &s.replaced_peers {
        let _ = writeln!(
            out,
            "PROBLEM         node {peer} answers from another data dir than the cluster recorded for it: it \
             lost its raft state and takes no part in raft; drain and remove it, then add it under a new id on an empty data dir"
        );
    }
    out
}

/// `ok (peers: 2 +1 ms, 3 -2 ms)`, or the problem the node reports.
fn clock_text(c: &ClockStatus) -> String {
    if !c.problem.is_empty() {
        return format!("PROBLEM: {}", c.problem);
    }
    let peers: Vec<String> = c.peers.iter().map(|p| format!("{} {:+} ms", p.node_id, p.offset_ms)).collect();
    match peers.is_empty() {
        true => "ok".into(),
        false => format!("ok (peers: {})", peers.join(", ")),
    }
}

/// The answer of `cluster confirm-clock`.
pub fn confirmed_text(r: &ConfirmClockResponse) -> String {
    match r.reference_ms {
        0 => format!("clock confirmed at {} (unix ms); there was no reference\n", r.now_ms),
        reference => format!(
            "clock confirmed at {} (unix ms), {} ms ahead of the reference it replaces\n",
            r.now_ms,
            r.now_ms - reference
        ),
    }
}

/// One line per member; replication progress only in the leader's answer.
fn member_lines(members: &[Member]) -> String {
    let mut out = String::new();
    // The client address; a node the map does not have yet by its peer one.
    let addr = |m: &Member| match m.addr.is_empty() {
        true => format!("peer {}", m.peer_addr),
        false => m.addr.clone(),
    };
    let width = members.iter().map(|m| addr(m).len()).max().unwrap_or(0);
    for m in members {
        let kind = if m.voter { "voter" } else { "learner" };
        let line = format!("  {:>3}  {:<width$}  {kind:<7}", m.node_id, addr(m));
        let _ = match m.lag_entries {
            Some(lag) => writeln!(out, "{line}  matched={}  lag={lag}", m.matched_index),
            None => writeln!(out, "{}", line.trim_end()),
        };
    }
    out
}

/// The answer of `cluster add-node` / `remove-node`.
pub fn members_text(log_index: u64, members: &[Member]) -> String {
    format!(
        "membership changed at log index {log_index}; members {}\n{}",
        members.len(),
        member_lines(members)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use portrait_client::portrait_proto::v1::PeerClock;

    #[test]
    fn renders_every_field() {
        let member = |node_id, voter| Member {
            node_id,
            addr: format!("http://127.0.0.1:770{node_id}"),
            peer_addr: format!("http://127.0.0.1:870{node_id}"),
            voter,
            matched_index: 9,
            lag_entries: Some(0),
        };
        let status = ClusterStatusResponse {
            node_id: 1,
            role: "Leader".into(),
            leader_id: 1,
            leader_addr: "http://127.0.0.1:7701".into(),
            term: 3,
            last_log_index: 9,
            applied_index: 9,
            snapshot_index: 5,
            purged_index: 4,
            members: vec![member(1, true), member(4, false)],
            schema_version: 7,
            version: "0.1.0".into(),
            reevaluating: true,
            reevaluated_users: 1500,
            lag_entries: 0,
            leader_contact_age_ms: Some(3),
            logical_clock_ms: 1_800_000_000_000,
            clock: Some(ClockStatus {
                now_ms: 1_800_000_000_100,
                peers: vec![
                    PeerClock { node_id: 2, offset_ms: 3, uncertainty_ms: 1, age_ms: 400 },
                    PeerClock { node_id: 3, offset_ms: -12, uncertainty_ms: 1, age_ms: 400 },
                ],
                ..ClockStatus::default()
            }),
            shards: 4,
            shard_status: vec![],
            log_fsyncs: 0,
            raft_batches_sent: 0,
            raft_batch_items_sent: 0,
            meta_voters: vec![1],
            snapshot_bytes_sent: 0,
            meta_leader_id: 1,
            incarnation: 0xfeed,
            replaced_peers: vec![3],
            ..ClusterStatusResponse::default()
        };
        let expected = "node            1 (Leader)\n\
            leader          1 at http://127.0.0.1:7701\n\
            term            3\n\
            log index       last=9 applied=9 snapshot=5 purged=4\n\
            lag             0 entries, leader contact 3 ms ago\n\
            schema version  7\n\
            re-evaluating   existing users for the new schema: 1500 done\n\
            clock           ok (peers: 2 +3 ms, 3 -12 ms)\n\
            server version  0.1.0\n\
            members         2\n\
            \x20   1  http://127.0.0.1:7701  voter    matched=9  lag=0\n\
            \x20   4  http://127.0.0.1:7704  learner  matched=9  lag=0\n\
            meta group      leader 1, voters 1\n\
            data dir        incarnation feed\n\
            PROBLEM         node 3 answers from another data dir than the cluster recorded for it: it lost \
            its raft state and takes no part in raft; drain and remove it, then add it under a new id on an empty data dir\n";
        assert_eq!(render(&status), expected);
        let skewed =
            ClockStatus { problem: "this node's clock is 3000 ms off".into(), ..ClockStatus::default() };
        assert_eq!(clock_text(&skewed), "PROBLEM: this node's clock is 3000 ms off");
    }

    #[test]
    fn a_follower_has_no_replication_progress() {
        let m = Member { node_id: 2, addr: "http://n2:7700".into(), voter: true, ..Default::default() };
        assert_eq!(member_lines(&[m]), "    2  http://n2:7700  voter\n");
        let joining = Member { node_id: 3, peer_addr: "http://n3:8700".into(), ..Default::default() };
        assert_eq!(member_lines(&[joining]), "    3  peer http://n3:8700  learner\n");
    }
}
