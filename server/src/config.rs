//! `portraitd` configuration: flags override environment variables
//! (`PORTRAIT_*`), which override the TOML config file, which overrides the
//! defaults. With nothing given, a single node starts on `./data` listening
//! on `127.0.0.1:7700` with the embedded default schema.

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::clock::ClockOptions;
use crate::duration::parse_duration_ms;
use crate::node::NodeOptions;
use crate::raft::RaftTuning;
use crate::tls::TlsFiles;

/// `portraitd --version`; a build with fault injection says so.
#[cfg(not(feature = "fault-injection"))]
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
#[cfg(feature = "fault-injection")]
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (with fault injection: for tests only)");

#[derive(Debug, Parser)]
#[command(
    name = "portraitd",
    version = VERSION,
    about = "Portrait node: replicated user profiles with per-family TTL, over gRPC"
)]
pub struct Cli {
    /// TOML config file (keys: node_id, data_dir, listen, advertise, peer_listen, peer_advertise, bootstrap, join, log, token_file, tls_cert, tls_key, tls_client_ca, peer_ca, peer_cert, peer_key, insecure, insecure_peer, audit_log, shards, replication, max_moves, replica_dead_after, backup_stream_stall, [raft], [clock]).
    #[arg(long, env = "PORTRAIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's raft id, at least 1 and stable across restarts (default 1, the node that
    /// creates a cluster; required with --join or --no-bootstrap).
    #[arg(long, env = "PORTRAIT_NODE_ID")]
    pub node_id: Option<u64>,
    /// Where RocksDB data lives.
    #[arg(long, env = "PORTRAIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client port: Ingest, Profiles, Admin, health, reflection (default 127.0.0.1:7700).
    #[arg(long, env = "PORTRAIT_LISTEN")]
    pub listen: Option<String>,
    /// Address clients use to reach this node (default: http://<listen>).
    #[arg(long, env = "PORTRAIT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Peer port: raft and the other node-to-node calls, for the cluster's nodes only
    /// (default: the --listen host, port + 1000).
    #[arg(long, env = "PORTRAIT_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Address the other nodes use to reach this node's peer port (default: http://<peer-listen>).
    #[arg(long, env = "PORTRAIT_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Do not form a single-node cluster on first start (for nodes that will join a multi-node cluster).
    #[arg(long, env = "PORTRAIT_NO_BOOTSTRAP")]
    pub no_bootstrap: bool,
    /// Join the cluster of this node's peer address (comma-separated list tried in turn) on first
    /// start; implies --no-bootstrap.
    #[arg(long, env = "PORTRAIT_JOIN", value_delimiter = ',', value_name = "ADDR")]
    pub join: Vec<String>,
    /// Allow Admin.SetPartition to drop raft messages to chosen peers (tests only; refused by a
    /// build without the cargo feature `fault-injection`).
    #[arg(long, env = "PORTRAIT_FAULT_INJECTION", hide = true)]
    pub fault_injection: bool,
    /// Log filter, e.g. `info` or `portrait_server=debug,openraft=warn`.
    #[arg(long, env = "PORTRAIT_LOG")]
    pub log: Option<String>,
    /// Bearer tokens and their roles (TOML; docs/security.md). Given: every client call needs a
    /// token with the RPC's role; re-read on SIGHUP. Not given: no token checks.
    #[arg(long, env = "PORTRAIT_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The client port's TLS certificate (PEM); with --tls-key, the client port serves TLS only.
    #[arg(long, env = "PORTRAIT_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "PORTRAIT_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Also require client certificates from this CA (PEM) on the client port.
    #[arg(long, env = "PORTRAIT_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
    /// The cluster's peer CA (PEM): with --peer-cert and --peer-key, the peer port uses mutual TLS.
    #[arg(long, env = "PORTRAIT_PEER_CA", value_name = "PATH")]
    pub peer_ca: Option<PathBuf>,
    /// This node's certificate from the peer CA (PEM; names portrait-node-<id> and portrait-peer).
    #[arg(long, env = "PORTRAIT_PEER_CERT", value_name = "PATH")]
    pub peer_cert: Option<PathBuf>,
    /// The key of --peer-cert (PEM).
    #[arg(long, env = "PORTRAIT_PEER_KEY", value_name = "PATH")]
    pub peer_key: Option<PathBuf>,
    /// Append one JSON line per administrative action to this file (they also go to the log).
    #[arg(long, env = "PORTRAIT_AUDIT_LOG", value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// Serve the client port in plaintext, or without --token-file, on an address other than
    /// loopback (refused without this flag). The peer port needs --insecure-peer for the same.
    #[arg(long, env = "PORTRAIT_INSECURE")]
    pub insecure: bool,
    /// Serve the peer port in plaintext (no mutual TLS) on an address other than loopback:
    /// whoever reaches it can read and write any user and join nodes (refused without this flag).
    #[arg(long, env = "PORTRAIT_INSECURE_PEER")]
    pub insecure_peer: bool,
    /// A node whose clock is further than this from a quorum of its peers does not lead (default 500ms).
    #[arg(long, env = "PORTRAIT_MAX_CLOCK_OFFSET", value_name = "DURATION")]
    pub max_clock_offset: Option<String>,
    /// A clock that jumps further than this ahead needs a quorum's or an operator's confirmation (default 24h).
    #[arg(long, env = "PORTRAIT_MAX_CLOCK_JUMP", value_name = "DURATION")]
    pub max_clock_jump: Option<String>,
    /// Shards of a new cluster (fixed at creation; 1 to 4096, default 64). A node with data, or one
    /// joining through --join, takes its cluster's; a different value is refused.
    #[arg(long, env = "PORTRAIT_SHARDS", value_name = "N")]
    pub shards: Option<u32>,
    /// Replicas each shard of a new cluster aims for (1 to 7, default 3; a shard has
    /// min(this, nodes)). Fixed at creation; ignored by a node that joins.
    #[arg(long, env = "PORTRAIT_REPLICATION", value_name = "RF")]
    pub replication: Option<u32>,
    /// Replica moves (and leadership transfers) the meta group's leader keeps under way at
    /// once to balance replicas and shard leaders over the nodes (default 2; 0 turns balancing
    /// off: new nodes then get replicas only where a shard is short of its replication factor,
    /// and leaders stay where elections put them).
    #[arg(long, env = "PORTRAIT_MAX_MOVES", value_name = "N")]
    pub max_moves: Option<usize>,
    /// A node that has not answered the other nodes for this long is drained by the meta
    /// group's leader, so that its replicas are re-created on the others (default 10m).
    #[arg(long, env = "PORTRAIT_REPLICA_DEAD_AFTER", value_name = "DURATION")]
    pub replica_dead_after: Option<String>,
    /// A backup or restore stream whose caller takes or sends nothing for this long is ended,
    /// freeing the node's one export-or-restore slot (default 60s, at least 1s).
    #[arg(long, env = "PORTRAIT_BACKUP_STREAM_STALL", value_name = "DURATION")]
    pub backup_stream_stall: Option<String>,
    /// Test only (needs --fault-injection): milliseconds added to this node's wall clock.
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub test_clock_offset_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    advertise: Option<String>,
    peer_listen: Option<String>,
    peer_advertise: Option<String>,
    bootstrap: Option<bool>,
    join: Option<Vec<String>>,
    log: Option<String>,
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    peer_ca: Option<PathBuf>,
    peer_cert: Option<PathBuf>,
    peer_key: Option<PathBuf>,
    insecure: Option<bool>,
    insecure_peer: Option<bool>,
    audit_log: Option<PathBuf>,
    shards: Option<u32>,
    replication: Option<u32>,
    max_moves: Option<usize>,
    replica_dead_after: Option<String>,
    backup_stream_stall: Option<String>,
    #[serde(default)]
    raft: FileRaft,
    #[serde(default)]
    clock: FileClock,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClock {
    max_offset: Option<String>,
    max_jump: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRaft {
    heartbeat_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    snapshot_every_entries: Option<u64>,
    keep_logs_after_snapshot: Option<u64>,
    snapshot_every_bytes: Option<u64>,
    keep_log_bytes_after_snapshot: Option<u64>,
    max_unflushed_log_bytes: Option<u64>,
    tick_interval_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    quiet_idle_groups: Option<bool>,
    snapshot_send_mb_per_sec: Option<u64>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    /// The peer port's listen address.
    pub peer_listen: String,
    pub log: String,
    /// Where the accepted tokens are (`None`: no token checks).
    pub token_file: Option<PathBuf>,
    /// Certificates and keys of the two ports.
    pub tls: TlsFiles,
    /// A plaintext client port, or one without caller checks, on a
    /// non-loopback address was asked for (`--insecure`).
    pub insecure: bool,
    /// A plaintext peer port on a non-loopback address was asked for
    /// (`--insecure-peer`).
    pub insecure_peer: bool,
    /// Where audit entries are appended besides the log (`--audit-log`).
    pub audit_log: Option<PathBuf>,
    pub node: NodeOptions,
    /// Seeds to join through on first start (`--join`); empty: none.
    pub join: Vec<String>,
}

impl Config {
    pub fn resolve(cli: Cli) -> anyhow::Result<Config> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let clock = clock_options(&cli, &file.clock)?;
        let listen = cli.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:7700".into());
        let tls = TlsFiles {
            cert: cli.tls_cert.or(file.tls_cert),
            key: cli.tls_key.or(file.tls_key),
            client_ca: cli.tls_client_ca.or(file.tls_client_ca),
            peer_ca: cli.peer_ca.or(file.peer_ca),
            peer_cert: cli.peer_cert.or(file.peer_cert),
            peer_key: cli.peer_key.or(file.peer_key),
        };
        tls.check_complete()?;
        let insecure = cli.insecure || file.insecure.unwrap_or(false);
        let insecure_peer = cli.insecure_peer || file.insecure_peer.unwrap_or(false);
        let advertise =
            advertised("listen", &listen, "advertise", cli.advertise.or(file.advertise), tls.client_tls())?;
        let peer_listen = match cli.peer_listen.or(file.peer_listen) {
            Some(peer) => peer,
            None => default_peer_listen(&listen)?,
        };
        if peer_listen == listen && !listen.ends_with(":0") {
            anyhow::bail!(
                "--peer-listen {peer_listen}: must differ from --listen (peers get a port of their own)"
            );
        }
        let peer_advertise = advertised(
            "peer-listen",
            &peer_listen,
            "peer-advertise",
            cli.peer_advertise.or(file.peer_advertise),
            tls.peer_tls(),
        )?;
        // Each port has its own waiver: a client port behind a proxy that
        // ends TLS must not open the peer port, which checks no token.
        for (flag, addr, on, tls_flags, waiver, waived) in [
            ("listen", &listen, tls.client_tls(), "--tls-cert and --tls-key", "--insecure", insecure),
            (
                "peer-listen",
                &peer_listen,
                tls.peer_tls(),
                "--peer-ca, --peer-cert and --peer-key",
                "--insecure-peer",
                insecure_peer,
            ),
        ] {
            if !on && !waived && !is_loopback(addr) {
                anyhow::bail!(
                    "--{flag} {addr}: plaintext on an address other than loopback; give {tls_flags} (docs/security.md), \
                     or {waiver} to serve plaintext anyway"
                );
            }
        }
        let advertise = advertise_scheme("advertise", advertise, ("client", tls.client_tls(), "--tls-cert"))?;
        let peer_advertise =
            advertise_scheme("peer-advertise", peer_advertise, ("peer", tls.peer_tls(), "--peer-cert"))?;
        #[cfg(not(feature = "fault-injection"))]
        if cli.fault_injection {
            anyhow::bail!("--fault-injection: {}", crate::raft::fault::NO_FAULT_INJECTION);
        }
        let join = if cli.join.is_empty() { file.join.unwrap_or_default() } else { cli.join };
        let join = join
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| seed_url(s))
            .collect::<Result<Vec<_>, _>>()?;
        let d = RaftTuning::default();
        let tuning = RaftTuning {
            heartbeat_ms: file.raft.heartbeat_ms.unwrap_or(d.heartbeat_ms),
            election_timeout_min_ms: file.raft.election_timeout_min_ms.unwrap_or(d.election_timeout_min_ms),
            election_timeout_max_ms: file.raft.election_timeout_max_ms.unwrap_or(d.election_timeout_max_ms),
            snapshot_every_entries: file.raft.snapshot_every_entries.unwrap_or(d.snapshot_every_entries),
            keep_logs_after_snapshot: file
                .raft
                .keep_logs_after_snapshot
                .unwrap_or(d.keep_logs_after_snapshot),
            snapshot_every_bytes: file.raft.snapshot_every_bytes.unwrap_or(d.snapshot_every_bytes).max(1),
            keep_log_bytes_after_snapshot: file
                .raft
                .keep_log_bytes_after_snapshot
                .unwrap_or(d.keep_log_bytes_after_snapshot),
            max_unflushed_log_bytes: file
                .raft
                .max_unflushed_log_bytes
                .unwrap_or(d.max_unflushed_log_bytes)
                .max(1024 * 1024),
            tick_interval_ms: file.raft.tick_interval_ms.unwrap_or(d.tick_interval_ms).max(10),
            write_timeout_ms: file.raft.write_timeout_ms.unwrap_or(d.write_timeout_ms).max(100),
            quiet_idle_groups: file.raft.quiet_idle_groups.unwrap_or(d.quiet_idle_groups),
            snapshot_send_mb_per_sec: file
                .raft
                .snapshot_send_mb_per_sec
                .unwrap_or(d.snapshot_send_mb_per_sec),
        };
        let replica_dead_after = match cli.replica_dead_after.as_ref().or(file.replica_dead_after.as_ref()) {
            None => crate::node::DEFAULT_REPLICA_DEAD_AFTER,
            Some(t) => match parse_duration_ms(t) {
                Ok(ms) if ms >= 1000 => std::time::Duration::from_millis(ms as u64),
                Ok(_) => anyhow::bail!("replica_dead_after {t}: must be at least 1s"),
                Err(e) => anyhow::bail!("replica_dead_after: {e}"),
            },
        };
        let backup_stream_stall = match cli.backup_stream_stall.as_ref().or(file.backup_stream_stall.as_ref())
        {
            None => crate::limits::BACKUP_STREAM_STALL,
            Some(t) => match parse_duration_ms(t) {
                Ok(ms) if ms >= 1000 => std::time::Duration::from_millis(ms as u64),
                Ok(_) => anyhow::bail!("backup_stream_stall {t}: must be at least 1s"),
                Err(e) => anyhow::bail!("backup_stream_stall: {e}"),
            },
        };
        let node = NodeOptions {
            node_id: match cli.node_id.or(file.node_id) {
                Some(0) => anyhow::bail!("node_id 0: must be at least 1 (0 means \"no node\" in the API)"),
                Some(id) => id,
                // The node that creates a cluster is node 1 by default;
                // any other needs an id of its own.
                None if !join.is_empty() || cli.no_bootstrap || file.bootstrap == Some(false) => {
                    anyhow::bail!(
                        "node_id: required with --join or --no-bootstrap (each node of a cluster needs an id \
                         of its own; the node that created it is usually 1)"
                    )
                }
                None => 1,
            },
            data_dir: cli.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("data")),
            advertise,
            peer_advertise,
            bootstrap: !cli.no_bootstrap && join.is_empty() && file.bootstrap.unwrap_or(true),
            tuning,
            fault_injection: cli.fault_injection,
            clock,
            shards: cli.shards.or(file.shards),
            replication: cli.replication.or(file.replication),
            max_moves: cli.max_moves.or(file.max_moves).unwrap_or(crate::node::DEFAULT_MAX_MOVES),
            replica_dead_after,
            backup_stream_stall,
            seeds: join.clone(),
        };
        let log = cli.log.or(file.log).unwrap_or_else(|| "info,openraft=warn".into());
        let token_file = cli.token_file.or(file.token_file);
        // Client certificates are no substitute: without tokens every
        // holder of one (every application) could call every RPC, admin
        // ones included, and the audit trail could name none of them.
        if token_file.is_none() && !insecure && !is_loopback(&listen) {
            let certs = match tls.client_ca.is_some() {
                true => " (--tls-client-ca only decides who may connect: every client certificate would be an admin)",
                false => "",
            };
            anyhow::bail!(
                "--listen {listen}: no --token-file on an address other than loopback: anyone who reaches the \
                 port could call every RPC, admin ones included (backups, restores, RemoveNode){certs}; give \
                 --token-file (docs/security.md), or --insecure to serve without checks anyway"
            );
        }
        let audit_log = cli.audit_log.or(file.audit_log);
        Ok(Config {
            listen,
            peer_listen,
            log,
            token_file,
            tls,
            insecure,
            insecure_peer,
            audit_log,
            node,
            join,
        })
    }
}

/// The URL announced for `listen`: `given`, or `http(s)://<listen>` unless
/// that is a wildcard no one can dial.
fn advertised(
    flag: &str,
    listen: &str,
    advertise_flag: &str,
    given: Option<String>,
    tls: bool,
) -> anyhow::Result<String> {
    let scheme = if tls { "https" } else { "http" };
    match given {
        Some(a) => Ok(a),
        None if listen.starts_with("0.0.0.0:") || listen.starts_with("[::]:") => anyhow::bail!(
            "--{flag} {listen} is not an address others can reach; set --{advertise_flag} (e.g. {scheme}://my-host:{})",
            listen.rsplit(':').next().unwrap_or("7700")
        ),
        None => Ok(format!("{scheme}://{listen}")),
    }
}

/// `addr` (the value of `--{flag}`) with its scheme in lower case: `https`
/// when its port serves TLS (`tls`, turned on by `tls_flag`), else `http`.
fn advertise_scheme(
    flag: &str,
    addr: String,
    (port, tls, tls_flag): (&str, bool, &str),
) -> anyhow::Result<String> {
    match portrait_proto::addr::http_scheme(&addr) {
        Err(e) => anyhow::bail!("--{flag} {addr}: {e}; e.g. http://my-host:7700"),
        Ok("http") if tls => anyhow::bail!("--{flag} {addr}: the {port} port serves TLS; use https://"),
        Ok("https") if !tls => {
            anyhow::bail!("--{flag} {addr}: the {port} port serves plaintext (no {tls_flag}); use http://")
        }
        Ok(_) => Ok(portrait_proto::addr::dial_uri(&addr, false)),
    }
}

/// Whether `listen` (`host:port`) binds loopback only.
fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The peer port when none is given: the client port's host, port + 1000.
fn default_peer_listen(listen: &str) -> anyhow::Result<String> {
    let port = listen.rsplit_once(':').and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)));
    match port {
        Some((host, port)) if port != 0 && port <= u16::MAX - 1000 => Ok(format!("{host}:{}", port + 1000)),
        _ => anyhow::bail!("--listen {listen}: cannot derive a peer port from it; set --peer-listen"),
    }
}

/// The clock guard's bounds (flag > env > file > default).
fn clock_options(cli: &Cli, file: &FileClock) -> anyhow::Result<ClockOptions> {
    let d = ClockOptions::default();
    let duration = |name: &str, text: Option<&String>, default: i64| -> anyhow::Result<i64> {
        match text {
            None => Ok(default),
            Some(t) => match parse_duration_ms(t) {
                Ok(ms) if ms > 0 => Ok(ms),
                Ok(_) => anyhow::bail!("{name} {t}: must be more than 0"),
                Err(e) => anyhow::bail!("{name}: {e}"),
            },
        }
    };
    let test_offset_ms = cli.test_clock_offset_ms.unwrap_or(0);
    if test_offset_ms != 0 && !cli.fault_injection {
        anyhow::bail!("--test-clock-offset-ms needs --fault-injection (it is for tests only)");
    }
    Ok(ClockOptions {
        max_offset_ms: duration(
            "max_clock_offset",
            cli.max_clock_offset.as_ref().or(file.max_offset.as_ref()),
            d.max_offset_ms,
        )?,
        max_jump_ms: duration(
            "max_clock_jump",
            cli.max_clock_jump.as_ref().or(file.max_jump.as_ref()),
            d.max_jump_ms,
        )?,
        test_offset_ms,
    })
}

/// `host:port` → `http://host:port`; rejects what is not a URL.
fn seed_url(seed: &str) -> anyhow::Result<String> {
    let seed = seed.trim().trim_end_matches('/');
    let url = if seed.contains("://") { seed.to_string() } else { format!("http://{seed}") };
    if let Err(e) = portrait_proto::addr::http_scheme(&url) {
        anyhow::bail!("--join {seed}: {e}");
    }
    match url.parse::<tonic::transport::Uri>() {
        Ok(uri) if uri.host().is_some() => Ok(url),
        _ => anyhow::bail!("--join {seed}: not an address (a seed's peer address, e.g. http://portrait-0.portrait-headless:8700)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_start_a_local_single_node() {
        let c = Config::resolve(Cli::parse_from(["portraitd"])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7700");
        assert_eq!(c.node.advertise, "http://127.0.0.1:7700");
        assert_eq!(c.peer_listen, "127.0.0.1:8700");
        assert_eq!(c.node.peer_advertise, "http://127.0.0.1:8700");
        assert_eq!(c.node.data_dir, PathBuf::from("data"));
        assert_eq!(c.node.node_id, 1);
        assert!(c.node.bootstrap);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        let toml = "node_id = 3\nlisten = \"127.0.0.1:9000\"\n[raft]\nheartbeat_ms = 50\nquiet_idle_groups = false\n";
        std::fs::write(&path, toml).unwrap();
        let cli =
            Cli::parse_from(["portraitd", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:9100"]);
        let c = Config::resolve(cli).unwrap();
        assert_eq!(c.node.node_id, 3);
        assert_eq!(c.listen, "127.0.0.1:9100");
        assert_eq!(c.node.tuning.heartbeat_ms, 50);
        assert!(!c.node.tuning.quiet_idle_groups);
    }

    #[test]
    fn plaintext_beyond_loopback_needs_insecure() {
        let parse = |args: &[&str]| Config::resolve(Cli::parse_from([&["portraitd"], args].concat()));
        let wide = [
            "--listen",
            "0.0.0.0:7700",
            "--advertise",
            "http://n1:7700",
            "--peer-advertise",
            "http://n1:8700",
        ];
        let err = parse(&wide).unwrap_err().to_string();
        assert!(
            err.starts_with("--listen 0.0.0.0:7700: plaintext on an address other than loopback"),
            "{err}"
        );
        assert!(err.contains("--insecure"), "{err}");
        // The client port's waiver does not open the peer port.
        let err = parse(&[&wide[..], &["--insecure"]].concat()).unwrap_err().to_string();
        assert!(
            err.starts_with("--peer-listen 0.0.0.0:8700: plaintext on an address other than loopback"),
            "{err}"
        );
        assert!(err.ends_with("or --insecure-peer to serve plaintext anyway"), "{err}");
        let c = parse(&[&wide[..], &["--insecure", "--insecure-peer"]].concat()).unwrap();
        assert!(c.insecure && c.insecure_peer);
        let loopback_peer = parse(&[&wide[..], &["--insecure", "--peer-listen", "127.0.0.1:8700"]].concat());
        assert!(loopback_peer.is_ok_and(|c| !c.insecure_peer));
        assert!(is_loopback("127.0.0.1:7700") && is_loopback("localhost:7700") && is_loopback("[::1]:7700"));
        assert!(!is_loopback("10.0.0.1:7700") && !is_loopback("0.0.0.0:7700"));
        // TLS on one port only: the other is still plaintext.
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--advertise", "https://n1:7700"];
        let err =
            parse(&[&["--listen", "0.0.0.0:7700", "--peer-advertise", "http://n1:8700"], &tls[..]].concat())
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("--peer-listen 0.0.0.0:8700: plaintext"), "{err}");
        // TLS on both ports, but no check of who calls: refused too.
        let peer_tls = ["--peer-ca", "a.pem", "--peer-cert", "p.pem", "--peer-key", "p.key"];
        let both =
            [&["--listen", "0.0.0.0:7700", "--peer-advertise", "https://n1:8700"], &tls[..], &peer_tls[..]];
        let err = parse(&both.concat()).unwrap_err().to_string();
        assert!(
            err.starts_with("--listen 0.0.0.0:7700: no --token-file on an address other than loopback"),
            "{err}"
        );
        assert!(err.contains("--insecure"), "{err}");
        assert!(parse(&[&both.concat()[..], &["--token-file", "t.toml"]].concat()).is_ok());
        // Client certificates only decide who connects, not what it may call.
        let err =
            parse(&[&both.concat()[..], &["--tls-client-ca", "c.pem"]].concat()).unwrap_err().to_string();
        assert!(
            err.contains("no --token-file") && err.contains("every client certificate would be an admin"),
            "{err}"
        );
        assert!(parse(
            &[&both.concat()[..], &["--tls-client-ca", "c.pem", "--token-file", "t.toml"]].concat()
        )
        .is_ok());
        assert!(parse(&[&both.concat()[..], &["--insecure"]].concat()).is_ok());
        let c = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert_eq!(c.node.advertise, "https://127.0.0.1:7700", "TLS: https by default");
        let err =
            parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--advertise", "http://n:1"]).unwrap_err();
        assert!(err.to_string().contains("use https://"), "{err}");
        let err = parse(&["--advertise", "https://n:1"]).unwrap_err();
        assert!(
            err.to_string().contains("the client port serves plaintext (no --tls-cert); use http://"),
            "{err}"
        );
        // The scheme in any case is read as such (a TLS port is never
        // advertised for plaintext dialing); another scheme is refused.
        let err =
            parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--advertise", "HTTP://n:1"]).unwrap_err();
        assert!(err.to_string().contains("the client port serves TLS; use https://"), "{err}");
        let c = parse(&["--advertise", "HTTP://n:1", "--peer-advertise", "Http://n:2"]).unwrap();
        assert_eq!((c.node.advertise.as_str(), c.node.peer_advertise.as_str()), ("http://n:1", "http://n:2"));
        let err = parse(&["--peer-advertise", "grpc://n:2"]).unwrap_err();
        assert!(err.to_string().contains("scheme \"grpc\" is neither http nor https"), "{err}");
        let err = parse(&["--join", "grpc://n:8700", "--node-id", "2"]).unwrap_err();
        assert!(err.to_string().starts_with("--join grpc://n:8700: scheme"), "{err}");
        let err = parse(&["--tls-cert", "c.pem"]).unwrap_err();
        assert!(err.to_string().contains("--tls-cert and --tls-key go together"), "{err}");
    }

    #[test]
    fn the_peer_port_is_its_own() {
        let parse = |args: &[&str]| Config::resolve(Cli::parse_from([&["portraitd"], args].concat()));
        let c = parse(&["--listen", "127.0.0.1:9000", "--peer-listen", "127.0.0.1:9001"]).unwrap();
        assert_eq!(
            (c.peer_listen.as_str(), c.node.peer_advertise.as_str()),
            ("127.0.0.1:9001", "http://127.0.0.1:9001")
        );
        let err = parse(&["--listen", "127.0.0.1:9000", "--peer-listen", "127.0.0.1:9000"]).unwrap_err();
        assert!(err.to_string().contains("must differ from --listen"), "{err}");
        let err = parse(&["--listen", "127.0.0.1:65000"]).unwrap_err();
        assert!(err.to_string().contains("set --peer-listen"), "{err}");
        let err = parse(&["--listen", "0.0.0.0:7700", "--advertise", "http://n1:7700"]).unwrap_err();
        assert!(err.to_string().contains("--peer-listen 0.0.0.0:8700 is not an address"), "{err}");
        assert!(err.to_string().contains("set --peer-advertise (e.g. http://my-host:8700)"), "{err}");
        let c = parse(&[
            "--listen",
            "0.0.0.0:7700",
            "--advertise",
            "http://n1:7700",
            "--peer-advertise",
            "http://n1:8700",
            "--insecure",
            "--insecure-peer",
        ])
        .unwrap();
        assert_eq!(c.node.peer_advertise, "http://n1:8700");
    }

    #[test]
    fn wildcard_listen_needs_an_advertise_address() {
        let err = Config::resolve(Cli::parse_from(["portraitd", "--listen", "0.0.0.0:7700"])).unwrap_err();
        assert!(err.to_string().contains("set --advertise"), "{err}");
        let cli = Cli::parse_from([
            "portraitd",
            "--listen",
            "0.0.0.0:7700",
            "--advertise",
            "http://n1:7700",
            "--peer-advertise",
            "http://n1:8700",
            "--insecure",
            "--insecure-peer",
        ]);
        assert_eq!(Config::resolve(cli).unwrap().node.advertise, "http://n1:7700");
    }

    #[test]
    fn join_turns_bootstrap_off_and_takes_a_list() {
        let cli = Cli::parse_from(["portraitd", "--node-id", "2", "--join", "n1:7700, http://n2:7700/"]);
        let c = Config::resolve(cli).unwrap();
        assert_eq!(c.join, ["http://n1:7700", "http://n2:7700"]);
        assert!(!c.node.bootstrap);
        let err = Config::resolve(Cli::parse_from(["portraitd", "--node-id", "2", "--join", "not a host"]))
            .unwrap_err();
        assert!(err.to_string().contains("--join not a host: not an address"), "{err}");
        assert!(Config::resolve(Cli::parse_from(["portraitd"])).unwrap().join.is_empty());
    }

    #[test]
    fn clock_bounds_come_from_flags_or_the_file() {
        let c = Config::resolve(Cli::parse_from(["portraitd"])).unwrap();
        assert_eq!((c.node.clock.max_offset_ms, c.node.clock.max_jump_ms), (500, 86_400_000));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[clock]\nmax_offset = \"250ms\"\nmax_jump = \"2h\"\n").unwrap();
        let cli =
            Cli::parse_from(["portraitd", "--config", path.to_str().unwrap(), "--max-clock-jump", "3h"]);
        let c = Config::resolve(cli).unwrap();
        assert_eq!((c.node.clock.max_offset_ms, c.node.clock.max_jump_ms), (250, 3 * 3_600_000));
        let err = Config::resolve(Cli::parse_from(["portraitd", "--max-clock-offset", "soon"])).unwrap_err();
        assert!(err.to_string().contains("max_clock_offset: invalid duration"), "{err}");
        let err =
            Config::resolve(Cli::parse_from(["portraitd", "--test-clock-offset-ms", "-5"])).unwrap_err();
        assert!(err.to_string().contains("needs --fault-injection"), "{err}");
    }

    #[test]
    fn fault_injection_needs_a_build_with_the_feature() {
        let c = Config::resolve(Cli::parse_from(["portraitd", "--fault-injection"]));
        #[cfg(not(feature = "fault-injection"))]
        assert!(c.unwrap_err().to_string().contains("this build has no fault injection"));
        #[cfg(feature = "fault-injection")]
        assert!(c.unwrap().node.fault_injection);
    }

    #[test]
    fn shards_come_from_the_flag_or_the_file() {
        assert_eq!(Config::resolve(Cli::parse_from(["portraitd"])).unwrap().node.shards, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "shards = 16\n").unwrap();
        let file = Cli::parse_from(["portraitd", "--config", path.to_str().unwrap()]);
        assert_eq!(Config::resolve(file).unwrap().node.shards, Some(16));
        let flag = Cli::parse_from(["portraitd", "--config", path.to_str().unwrap(), "--shards", "4"]);
        assert_eq!(Config::resolve(flag).unwrap().node.shards, Some(4));
        let rf = Cli::parse_from(["portraitd", "--config", path.to_str().unwrap(), "--replication", "1"]);
        assert_eq!(Config::resolve(rf).unwrap().node.replication, Some(1));
    }

    #[test]
    fn balancing_moves_come_from_the_flag_or_the_file() {
        let default = Config::resolve(Cli::parse_from(["portraitd"])).unwrap();
        assert_eq!(default.node.max_moves, crate::node::DEFAULT_MAX_MOVES);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "max_moves = 0\n").unwrap();
        let file = Cli::parse_from(["portraitd", "--config", path.to_str().unwrap()]);
        assert_eq!(Config::resolve(file).unwrap().node.max_moves, 0);
        let flag = Cli::parse_from(["portraitd", "--config", path.to_str().unwrap(), "--max-moves", "5"]);
        assert_eq!(Config::resolve(flag).unwrap().node.max_moves, 5);
        assert_eq!(default.node.replica_dead_after, crate::node::DEFAULT_REPLICA_DEAD_AFTER);
        let dead = Cli::parse_from(["portraitd", "--replica-dead-after", "30s"]);
        assert_eq!(
            Config::resolve(dead).unwrap().node.replica_dead_after,
            std::time::Duration::from_secs(30)
        );
        let short = Cli::parse_from(["portraitd", "--replica-dead-after", "10ms"]);
        assert!(Config::resolve(short).unwrap_err().to_string().contains("must be at least 1s"));
    }

    #[test]
    fn the_backup_stream_stall_comes_from_the_flag_or_the_file_and_is_at_least_1s() {
        let default = Config::resolve(Cli::parse_from(["portraitd"])).unwrap();
        assert_eq!(default.node.backup_stream_stall, crate::limits::BACKUP_STREAM_STALL);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "backup_stream_stall = \"5m\"\n").unwrap();
        let file = Cli::parse_from(["portraitd", "--config", path.to_str().unwrap()]);
        assert_eq!(
            Config::resolve(file).unwrap().node.backup_stream_stall,
            std::time::Duration::from_secs(300)
        );
        let flag =
            Cli::parse_from(["portraitd", "--config", path.to_str().unwrap(), "--backup-stream-stall", "2s"]);
        assert_eq!(
            Config::resolve(flag).unwrap().node.backup_stream_stall,
            std::time::Duration::from_secs(2)
        );
        for bad in ["500ms", "soon"] {
            let err = Config::resolve(Cli::parse_from(["portraitd", "--backup-stream-stall", bad]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("backup_stream_stall"), "{err}");
        }
    }

    #[test]
    fn a_node_that_does_not_create_the_cluster_needs_an_id_and_none_is_0() {
        for args in [&["--join", "n1:8700"][..], &["--no-bootstrap"]] {
            let cli = Cli::parse_from(["portraitd"].iter().chain(args));
            let err = Config::resolve(cli).unwrap_err().to_string();
            assert!(err.starts_with("node_id: required with --join or --no-bootstrap"), "{args:?}: {err}");
        }
        let err = Config::resolve(Cli::parse_from(["portraitd", "--node-id", "0"])).unwrap_err().to_string();
        assert!(err.starts_with("node_id 0: must be at least 1"), "{err}");
        let c = Config::resolve(Cli::parse_from(["portraitd", "--node-id", "4", "--no-bootstrap"])).unwrap();
        assert_eq!((c.node.node_id, c.node.bootstrap), (4, false));
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "nodeid = 3\n").unwrap();
        let err =
            Config::resolve(Cli::parse_from(["portraitd", "--config", path.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("unknown field `nodeid`"), "{err}");
    }
}
