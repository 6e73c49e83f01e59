//! `portrait cluster status`: the answering node's state (as in `portrait
//! status`), then the cluster by node (shards hosted and led, lag) and by
//! shard (leader, replicas and their applied indexes), from the shard map
//! and every node's `ClusterStatus`. The per-shard table is long with the
//! default 64 shards: it is shown with `--shards`; otherwise one summary
//! line names the shards without a leader and the largest lag.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use portrait_client::portrait_proto::v1::{ClusterStatusResponse, ShardMapResponse, ShardReplicas};
use portrait_client::{human_bytes, PortraitClient};

/// Shard ids listed at most in the summary line.
const LISTED: usize = 8;

/// Every node's status, or why it gave none.
type Statuses = BTreeMap<u64, Result<ClusterStatusResponse, String>>;

pub async fn run(client: &PortraitClient, all_shards: bool) -> anyhow::Result<String> {
    let (status, map) = tokio::try_join!(client.cluster_status(), client.shard_map())?;
    let mut statuses: Statuses = client.node_statuses(&map).await;
    let node = super::status::render(&status);
    statuses.insert(status.node_id, Ok(status));
    Ok(format!("{node}\n{}", render(&map, &statuses, all_shards)))
}

/// The node's applied index in `shard`, if it reported one.
fn applied(statuses: &Statuses, node: u64, shard: u32) -> Option<u64> {
    let status = statuses.get(&node)?.as_ref().ok()?;
    status.shard_status.iter().find(|s| s.shard == shard).map(|s| s.applied_index)
}

/// Entries `node` is behind the leader's last log index in `s`.
fn lag(statuses: &Statuses, s: &ShardReplicas, node: u64) -> Option<u64> {
    let leader = statuses.get(&s.leader_id)?.as_ref().ok()?;
    let last = leader.shard_status.iter().find(|x| x.shard == s.shard)?.last_log_index;
    Some(last.saturating_sub(applied(statuses, node, s.shard)?))
}

fn render(map: &ShardMapResponse, statuses: &Statuses, all_shards: bool) -> String {
    let mut out = format!(
        "cluster         {} nodes, {} shards (replication {}, map epoch {}, id {:016x})\n",
        map.nodes.len(),
        map.shards,
        map.replication,
        map.epoch,
        map.cluster_id
    );
    out.push_str(&node_table(map, statuses));
    out.push_str(&shard_summary(map, statuses));
    out.push_str(&moves_line(map, statuses));
    out.push_str(&rules_line(statuses));
    out.push_str(&restores_line(statuses));
    if all_shards {
        out.push_str(&shard_table(map, statuses));
    } else {
        out.push_str("                (per-shard table: --shards)\n");
    }
    out
}

/// Per node: shards hosted and led, the logical bytes of its replicas,
/// and its largest lag with the shard.
fn node_table(map: &ShardMapResponse, statuses: &Statuses) -> String {
    let width = map.nodes.iter().map(|n| n.addr.len()).max().unwrap_or(0).max(4);
    let mut out = format!("  {:>3}  {:<width$}  hosted  led      bytes  lag\n", "id", "addr");
    // Nodes that some peer found answering from another data dir.
    let replaced: BTreeSet<u64> = statuses
        .values()
        .filter_map(|s| s.as_ref().ok())
        .flat_map(|s| s.replaced_peers.iter().copied())
        .collect();
    for n in &map.nodes {
        let hosted: Vec<&ShardReplicas> =
            map.shard_replicas.iter().filter(|s| s.replicas.iter().any(|r| r.node_id == n.node_id)).collect();
        let led = map.shard_replicas.iter().filter(|s| s.leader_id == n.node_id).count();
        let lag = match statuses.get(&n.node_id) {
            Some(Err(e)) => format!("unreachable: {e}"),
            _ => hosted.iter().filter_map(|s| Some((lag(statuses, s, n.node_id)?, s.shard))).max().map_or(
                "?".into(),
                |(lag, shard)| match lag {
                    0 => "0".into(),
                    _ => format!("{lag} (shard {shard})"),
                },
            ),
        };
        let mut draining = if map.draining.contains(&n.node_id) { "  (draining)" } else { "" }.to_string();
        if replaced.contains(&n.node_id) {
            draining.push_str("  (REPLACED data dir: takes no part in raft; drain and remove it)");
        }
        let bytes = match statuses.get(&n.node_id) {
            Some(Ok(s)) => s.shard_status.iter().filter_map(|s| s.state_bytes).reduce(|a, b| a + b),
            _ => None,
        };
        let bytes = bytes.map_or("?".into(), human_bytes);
        let _ = writeln!(
            out,
            "  {:>3}  {:<width$}  {:>6}  {led:>3}  {bytes:>9}  {lag}{draining}",
            n.node_id,
            n.addr,
            hosted.len()
        );
    }
    out
}

/// Shards without a leader, and the largest lag of any replica.
fn shard_summary(map: &ShardMapResponse, statuses: &Statuses) -> String {
    let leaderless: Vec<String> =
        map.shard_replicas.iter().filter(|s| s.leader_id == 0).map(|s| s.shard.to_string()).collect();
    let worst = map
        .shard_replicas
        .iter()
        .flat_map(|s| {
            s.replicas.iter().filter_map(move |r| Some((lag(statuses, s, r.node_id)?, s.shard, r.node_id)))
        })
        .max();
    let mut line = format!("shards          {} with a leader", map.shard_replicas.len() - leaderless.len());
    if !leaderless.is_empty() {
        let more = if leaderless.len() > LISTED { ", ..." } else { "" };
        let listed = leaderless[..leaderless.len().min(LISTED)].join(", ");
        let _ = write!(line, ", {} without: {listed}{more}", leaderless.len());
    }
    let _ = match worst {
        Some((0, ..)) => write!(line, "; every replica up to date"),
        Some((lag, shard, node)) => write!(line, "; max lag {lag} (shard {shard} on node {node})"),
        None => write!(line, "; lag unknown"),
    };
    line + "\n"
}

/// Replica moves and additions under way: shards whose membership, as
/// their leader reports it, is not the map's replicas yet (`+N`: node N
/// being added, `-N`: being removed).
fn moves_line(map: &ShardMapResponse, statuses: &Statuses) -> String {
    let mut moving = Vec::new();
    for s in map.shard_replicas.iter().filter(|s| s.leader_id != 0) {
        let Some(Ok(status)) = statuses.get(&s.leader_id) else { continue };
        let Some(group) = status.shard_status.iter().find(|g| g.shard == s.shard) else { continue };
        if group.voters.is_empty() {
            continue; // a node too old to report its membership
        }
        let wanted: BTreeSet<u64> = s.replicas.iter().map(|r| r.node_id).collect();
        let members: BTreeSet<u64> = group.voters.iter().chain(&group.learners).copied().collect();
        let learners: BTreeSet<u64> = group.learners.iter().copied().collect();
        let mut change: Vec<String> = wanted
            .iter()
            .filter(|n| !members.contains(n) || learners.contains(n))
            .map(|n| format!("+{n}"))
            .collect();
        change.extend(members.difference(&wanted).map(|n| format!("-{n}")));
        if !change.is_empty() {
            moving.push(format!("shard {} {}", s.shard, change.join(" ")));
        }
    }
    let draining = match map.draining.as_slice() {
        [] => String::new(),
        nodes => {
            format!("; draining node {}", nodes.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
        }
    };
    match moving.len() {
        0 => format!("moves           none under way{draining}\n"),
        n => {
            let more = if n > LISTED { ", ..." } else { "" };
            let listed = moving[..n.min(LISTED)].join(", ");
            format!("moves           {n} under way: {listed}{more}{draining}\n")
        }
    }
}

/// Shards a restore began in and has not ended in, as any of their
/// replicas reports (the most rows applied): empty when there are none.
fn restores_line(statuses: &Statuses) -> String {
    let mut restoring: BTreeMap<u32, (String, u64)> = BTreeMap::new();
    for g in statuses.values().filter_map(|s| s.as_ref().ok()).flat_map(|s| s.shard_status.iter()) {
        if let Some(r) = &g.restoring {
            let seen = restoring.entry(g.shard).or_insert_with(|| (r.id.clone(), r.rows));
            seen.1 = seen.1.max(r.rows);
        }
    }
    if restoring.is_empty() {
        return String::new();
    }
    let listed: Vec<String> = restoring
        .iter()
        .take(LISTED)
        .map(|(shard, (id, rows))| format!("shard {shard} ({rows} rows of {id})"))
        .collect();
    let more = if restoring.len() > LISTED { ", ..." } else { "" };
    format!(
        "restores        {} shards mid-restore: {}{more}; their writes are refused and reads see part of \
         the backup: run `portrait restore` again to finish\n",
        restoring.len(),
        listed.join(", ")
    )
}

/// Apply rules versions (docs/operations.md, "Apply rules across a
/// rolling upgrade"): the cluster's, the range each node's build applies,
/// and the shard replicas not yet at the cluster's.
fn rules_line(statuses: &Statuses) -> String {
    let answered: Vec<(u64, &ClusterStatusResponse)> =
        statuses.iter().filter_map(|(id, s)| Some((*id, s.as_ref().ok()?))).collect();
    // Nodes too old to report versions answer 0: not counted.
    let cluster = answered.iter().map(|(_, s)| s.cluster_apply_rules).max().unwrap_or(0);
    if cluster == 0 {
        return "rules           unknown\n".into();
    }
    let mut builds: BTreeMap<(u32, u32), Vec<String>> = BTreeMap::new();
    for (id, s) in &answered {
        builds.entry((s.apply_rules_oldest, s.apply_rules_newest)).or_default().push(id.to_string());
    }
    let builds: Vec<String> = builds
        .iter()
        .map(|((oldest, newest), nodes)| match newest {
            0 => format!("none reported on node {}", nodes.join(", ")),
            _ => format!("{oldest}..{newest} on node {}", nodes.join(", ")),
        })
        .collect();
    let behind = answered
        .iter()
        .flat_map(|(_, s)| s.shard_status.iter())
        .filter(|g| g.apply_rules != 0 && g.apply_rules < cluster)
        .count();
    let behind = match behind {
        0 => "every shard replica at it".to_string(),
        n => format!("{n} shard replicas not yet at it"),
    };
    format!("rules           version {cluster}; builds apply {}; {behind}\n", builds.join(", "))
}

/// One row per shard: its leader and each replica's applied index
/// (`node:index`; a learner is marked `~`).
fn shard_table(map: &ShardMapResponse, statuses: &Statuses) -> String {
    let mut out = "  shard  leader  replicas (node:applied)\n".to_string();
    for s in &map.shard_replicas {
        let leader = match s.leader_id {
            0 => "-".to_string(),
            id => id.to_string(),
        };
        let replicas: Vec<String> = s
            .replicas
            .iter()
            .map(|r| {
                let learner = if r.voter { "" } else { "~" };
                let index = applied(statuses, r.node_id, s.shard).map_or("?".into(), |i| i.to_string());
                format!("{}{learner}:{index}", r.node_id)
            })
            .collect();
        let _ = writeln!(out, "  {:>5}  {leader:>6}  {}", s.shard, replicas.join(" "));
    }
    out
}

/// `portrait cluster drain` waits while node `id`'s replicas move off it
/// (`replicas` to move when the drain began), reporting each change. A
/// look that fails (a node down, a meta election) is tried again; after
/// [`DRAIN_GIVE_UP`] of failures the wait ends with an error that says the
/// drain goes on. A drain where nothing moved for [`DRAIN_STALL`] is
/// reported, and waited for still (a large shard's move takes long).
pub async fn drain_wait(client: &PortraitClient, id: u64, replicas: usize) -> anyhow::Result<String> {
    let mut watch = DrainWatch::new(id, replicas, std::time::Instant::now());
    loop {
        let look = client.replicas_on(id).await.map_err(|e| e.to_string());
        match watch.observe(look, std::time::Instant::now()) {
            DrainStep::Done => {
                return Ok(format!(
                    "node {id} holds no replicas; remove it with `portrait cluster remove-node {id}`"
                ))
            }
            DrainStep::Show(line) => eprintln!("{line}"),
            DrainStep::Quiet => {}
            DrainStep::GiveUp(why) => anyhow::bail!(why),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Failing to read where a draining node's replicas are for this long
/// ends `portrait cluster drain`'s wait (the drain goes on).
const DRAIN_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(120);
/// A drain whose count of replicas left has not changed for this long is
/// reported (again every as long).
const DRAIN_STALL: std::time::Duration = std::time::Duration::from_secs(600);

/// What [`drain_wait`] knows between two looks.
struct DrainWatch {
    id: u64,
    shown: usize,
    changed_at: std::time::Instant,
    warned_at: std::time::Instant,
    failing_since: Option<std::time::Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum DrainStep {
    Done,
    Show(String),
    Quiet,
    GiveUp(String),
}

impl DrainWatch {
    fn new(id: u64, replicas: usize, now: std::time::Instant) -> Self {
        DrainWatch { id, shown: replicas, changed_at: now, warned_at: now, failing_since: None }
    }

    /// One look: the replicas left on the node, or why none was read.
    fn observe(&mut self, look: Result<usize, String>, now: std::time::Instant) -> DrainStep {
        let id = self.id;
        let left = match look {
            Ok(left) => left,
            Err(e) => {
                let since = *self.failing_since.get_or_insert(now);
                if now - since >= DRAIN_GIVE_UP {
                    return DrainStep::GiveUp(format!(
                        "could not read where node {id}'s replicas are for {} s (last: {e}); the drain goes on in \
                         the cluster: follow it with `portrait cluster status`, and remove the node once it holds \
                         none",
                        DRAIN_GIVE_UP.as_secs()
                    ));
                }
                return match since == now {
                    true => {
                        DrainStep::Show(format!("node {id}: could not read its replicas ({e}); trying again"))
                    }
                    false => DrainStep::Quiet,
                };
            }
        };
        self.failing_since = None;
        if left == 0 {
            return DrainStep::Done;
        }
        if left != self.shown {
            (self.shown, self.changed_at, self.warned_at) = (left, now, now);
            return DrainStep::Show(format!("node {id}: {left} replicas left"));
        }
        if now - self.changed_at >= DRAIN_STALL && now - self.warned_at >= DRAIN_STALL {
            self.warned_at = now;
            return DrainStep::Show(format!(
                "node {id}: no replica has moved off it for {} min ({left} left); the drain goes on: see the \
                 moves in `portrait cluster status` (a large shard's move takes long; a node that cannot take \
                 replicas holds it up)",
                (now - self.changed_at).as_secs() / 60
            ));
        }
        DrainStep::Quiet
    }
}

#[cfg(test)]
mod tests {
    use portrait_client::portrait_proto::v1::{MapNode, ShardReplica, ShardStatus};

    use super::*;

    #[test]
    fn a_drain_wait_reports_changes_rides_out_failures_and_gives_up_after_two_minutes() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        let mut w = DrainWatch::new(4, 3, t0);
        assert_eq!(w.observe(Ok(3), at(1)), DrainStep::Quiet);
        assert_eq!(w.observe(Ok(2), at(2)), DrainStep::Show("node 4: 2 replicas left".into()));
        // A failing look is said once, then waited out while it lasts.
        let first = w.observe(Err("meta election".into()), at(3));
        assert!(matches!(&first, DrainStep::Show(l) if l.contains("meta election")), "{first:?}");
        assert_eq!(w.observe(Err("meta election".into()), at(60)), DrainStep::Quiet);
        assert_eq!(w.observe(Ok(2), at(61)), DrainStep::Quiet, "back, nothing moved");
        let stalled = w.observe(Ok(2), at(2 + 600));
        assert!(
            matches!(&stalled, DrainStep::Show(l) if l.contains("no replica has moved off it for 10 min"))
        );
        assert_eq!(w.observe(Ok(2), at(2 + 601)), DrainStep::Quiet, "said once per stall period");
        assert_eq!(
            w.observe(Err("down".into()), at(700)),
            DrainStep::Show("node 4: could not read its replicas (down); trying again".into())
        );
        let gave_up = w.observe(Err("down".into()), at(820));
        assert!(matches!(&gave_up, DrainStep::GiveUp(w) if w.contains("the drain goes on")), "{gave_up:?}");
        let mut w = DrainWatch::new(4, 1, t0);
        assert_eq!(w.observe(Ok(0), at(1)), DrainStep::Done);
    }

    /// Three nodes, three shards on every node; shard 2 has no leader and
    /// node 3 lags 4 entries in shard 1 and does not answer for shard 0.
    fn cluster() -> (ShardMapResponse, Statuses) {
        let replicas = |learner: u64| {
            (1..=3).map(|n| ShardReplica { node_id: n, addr: String::new(), voter: n != learner }).collect()
        };
        let shard = |shard, leader_id, learner| ShardReplicas {
            shard,
            replicas: replicas(learner),
            leader_id,
            applied_index: None,
        };
        let map = ShardMapResponse {
            epoch: 0,
            shards: 3,
            replication: 3,
            nodes: (1..=3).map(|n| MapNode { node_id: n, addr: format!("http://n{n}:7700") }).collect(),
            shard_replicas: vec![shard(0, 1, 0), shard(1, 2, 3), shard(2, 0, 0)],
            node_id: 1,
            draining: vec![],
            cluster_id: 0x5eed,
        };
        let status = |indexes: &[(u32, u64)]| ClusterStatusResponse {
            shard_status: indexes
                .iter()
                .map(|&(shard, i)| ShardStatus {
                    shard,
                    last_log_index: i,
                    applied_index: i,
                    state_bytes: Some(i * 1000),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let statuses = Statuses::from([
            (1, Ok(status(&[(0, 10), (1, 20), (2, 5)]))),
            (2, Ok(status(&[(0, 10), (1, 20), (2, 5)]))),
            (3, Ok(status(&[(1, 16), (2, 5)]))),
        ]);
        (map, statuses)
    }

    #[test]
    fn nodes_show_shards_hosted_led_and_lag() {
        let (map, statuses) = cluster();
        let expected = "   id  addr            hosted  led      bytes  lag\n\
            \x20   1  http://n1:7700       3    1   34.2 KiB  0\n\
            \x20   2  http://n2:7700       3    1   34.2 KiB  0\n\
            \x20   3  http://n3:7700       3    0   20.5 KiB  4 (shard 1)\n";
        assert_eq!(node_table(&map, &statuses), expected);
        let mut down = statuses.clone();
        down.insert(3, Err("cannot connect".into()));
        assert!(node_table(&map, &down).ends_with("    0          ?  unreachable: cannot connect\n"));
        let draining = ShardMapResponse { draining: vec![2], ..map.clone() };
        assert!(node_table(&draining, &statuses).contains("    1   34.2 KiB  0  (draining)\n"));
        let mut replaced = statuses.clone();
        if let Some(Ok(one)) = replaced.get_mut(&1) {
            one.replaced_peers = vec![3];
        }
        assert!(node_table(&map, &replaced)
            .ends_with("4 (shard 1)  (REPLACED data dir: takes no part in raft; drain and remove it)\n"));
        assert_eq!(
            [0, 1023, 1024, 1536 * 1024, 5 << 40, 5000 << 40].map(human_bytes),
            ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 TiB", "5000.0 TiB"]
        );
    }

    #[test]
    fn the_summary_names_leaderless_shards_and_the_largest_lag() {
        let (map, statuses) = cluster();
        assert_eq!(
            shard_summary(&map, &statuses),
            "shards          2 with a leader, 1 without: 2; max lag 4 (shard 1 on node 3)\n"
        );
    }

    #[test]
    fn shards_mid_restore_are_listed_once_with_the_most_rows_a_replica_applied() {
        let (_, mut statuses) = cluster();
        assert_eq!(restores_line(&statuses), "", "no line while none is under way");
        let restoring = |rows| Some(portrait_proto::v1::ShardRestore { id: "b1/2".into(), rows });
        statuses.get_mut(&1).unwrap().as_mut().unwrap().shard_status[0].restoring = restoring(10);
        statuses.get_mut(&2).unwrap().as_mut().unwrap().shard_status[0].restoring = restoring(12);
        let line = restores_line(&statuses);
        assert!(
            line.starts_with("restores        1 shards mid-restore: shard 0 (12 rows of b1/2);"),
            "{line}"
        );
    }

    #[test]
    fn moves_under_way_are_shards_whose_leader_has_another_membership() {
        let (mut map, mut statuses) = cluster();
        assert_eq!(moves_line(&map, &statuses), "moves           none under way\n");
        // Shard 0 (led by node 1) moves from node 3 to node 4: node 4 is a
        // learner, node 3 still votes.
        map.shard_replicas[0].replicas[2].node_id = 4;
        let leader = statuses.get_mut(&1).unwrap().as_mut().unwrap();
        let group = &mut leader.shard_status[0];
        group.voters = vec![1, 2, 3];
        group.learners = vec![4];
        map.draining = vec![3];
        assert_eq!(
            moves_line(&map, &statuses),
            "moves           1 under way: shard 0 +4 -3; draining node 3\n"
        );
    }

    #[test]
    fn the_rules_line_shows_the_cluster_version_builds_and_replicas_behind() {
        let (_, mut statuses) = cluster();
        assert_eq!(rules_line(&statuses), "rules           unknown\n");
        for (id, s) in statuses.iter_mut() {
            let s = s.as_mut().unwrap();
            s.cluster_apply_rules = 1;
            (s.apply_rules_oldest, s.apply_rules_newest) = (1, if *id == 3 { 1 } else { 2 });
            s.shard_status.iter_mut().for_each(|g| g.apply_rules = 1);
        }
        assert_eq!(
            rules_line(&statuses),
            "rules           version 1; builds apply 1..1 on node 3, 1..2 on node 1, 2; every shard replica at it\n"
        );
        // Raised: node 1 took it already, node 2 has not yet.
        let raised =
            |s: &mut Result<ClusterStatusResponse, String>| s.as_mut().unwrap().cluster_apply_rules = 2;
        raised(statuses.get_mut(&1).unwrap());
        statuses.get_mut(&1).unwrap().as_mut().unwrap().shard_status[0].apply_rules = 2;
        assert!(rules_line(&statuses).starts_with("rules           version 2;"));
        assert!(
            rules_line(&statuses).ends_with("; 7 shard replicas not yet at it\n"),
            "{}",
            rules_line(&statuses)
        );
    }

    #[test]
    fn the_shard_table_has_a_row_per_shard() {
        let (map, statuses) = cluster();
        let expected = "  shard  leader  replicas (node:applied)\n\
            \x20     0       1  1:10 2:10 3:?\n\
            \x20     1       2  1:20 2:20 3~:16\n\
            \x20     2       -  1:5 2:5 3:5\n";
        assert_eq!(shard_table(&map, &statuses), expected);
        assert!(render(&map, &statuses, false).contains("(per-shard table: --shards)"));
        assert!(render(&map, &statuses, false).starts_with(
            "cluster         3 nodes, 3 shards (replication 3, map epoch 0, id 0000000000005eed)\n"
        ));
    }
}
