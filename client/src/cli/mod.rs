//! The `portrait` commands. Each module turns parsed arguments into client
//! calls and returns the text to print; formatting helpers are pure so they
//! can be tested without a server.

mod cluster;
mod format;
mod get;
mod load;
mod locate;
mod put;
mod schema;
mod status;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portrait_client::{ConnectOptions, PortraitClient};

/// Command-line client for Portrait, the distributed user feature store.
#[derive(Debug, Parser)]
#[command(name = "portrait", version)]
pub struct Cli {
    /// Node to talk to (`http://host:port` or `host:port`); followers
    /// redirect writes to the leader.
    #[arg(long, global = true, env = "PORTRAIT_ENDPOINT", default_value = "http://127.0.0.1:7700")]
    endpoint: String,
    /// Bearer token sent with every call, for nodes started with a token
    /// file (docs/security.md). Prefer the variable: a flag shows in `ps`.
    #[arg(long, global = true, env = "PORTRAIT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify nodes that serve TLS with; connects over https.
    #[arg(long, global = true, env = "PORTRAIT_CA_CERT", value_name = "PATH")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM), for nodes started with --tls-client-ca.
    #[arg(long, global = true, env = "PORTRAIT_CERT", value_name = "PATH", requires = "key")]
    cert: Option<PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, global = true, env = "PORTRAIT_KEY", value_name = "PATH", requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write one event or a JSON array of events as one atomic batch.
    Put {
        /// e.g. '{"user_id":"u1","family":"browse","type":"view","attrs":{"category":"phone"}}'
        #[arg(long)]
        json: String,
    },
    /// Show a user's profile.
    Get {
        user: String,
        /// Only this family (repeatable). With no --family/--feature/--tag, everything.
        #[arg(long = "family", value_name = "FAMILY")]
        families: Vec<String>,
        /// Only this feature (repeatable).
        #[arg(long = "feature", value_name = "FEATURE")]
        features: Vec<String>,
        /// Only this tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Confirm with the leader before reading (raft read index).
        #[arg(long)]
        linearizable: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Bulk-load JSON-lines events (one event per line; `-` reads stdin).
    Load {
        file: PathBuf,
        /// Events per write, at most 10,000, a node's limit per request (a
        /// write also ends once its events reach 8 MiB encoded).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
        /// Writes in flight at once.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
    },
    /// Show or change the attribute-family schema.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Show the answering node's raft and membership state.
    Status,
    /// Show a user's shard, the shard's replicas and its leader.
    Locate {
        user: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cluster membership and leadership: add-node, remove-node, transfer-leader, status.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Copy every shard of the serving cluster into DIR (a new directory): one archive per
    /// shard, the schema and a manifest with checksums. Backups hold personal data: keep
    /// them encrypted and access-controlled (docs/operations.md).
    Backup { dir: PathBuf },
    /// Load a backup DIR into a new, empty cluster created with the backup's shard count
    /// (any number of nodes): checks the files, applies the schema, restores every shard.
    Restore { dir: PathBuf },
    /// Certificates: `init` makes a development CA pair and every node's certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a client CA, a peer CA and certificates for nodes 1..N and one client (development use).
    Init {
        /// Where to write them.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Nodes to make certificates for (ids 1 to N).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        nodes: u32,
        /// Names and addresses clients reach the nodes' client ports at (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Add a node: as a learner until it has caught up, then as a voter.
    AddNode {
        id: u64,
        /// Its client address (--advertise), e.g. http://10.0.0.2:7700
        addr: String,
        /// Its peer address (--peer-advertise), e.g. http://10.0.0.2:8700
        #[arg(long)]
        peer_addr: String,
        /// Keep it a learner (it replicates but does not vote).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node (voter or learner) from the cluster; refused while it holds shard
    /// replicas (drain it first).
    RemoveNode { id: u64 },
    /// Move every shard replica off node ID (to the other nodes, a few at a time) and give
    /// it no new ones; waits until it holds none, showing progress, then say how to remove it.
    Drain {
        id: u64,
        /// Return once the drain is recorded, without waiting for the moves.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make voter ID the leader of a shard, or of every shard the answering node leads
    /// (writes pause for about one leader lease).
    TransferLeader {
        id: u64,
        /// Only this shard (`portrait locate USER` names a user's shard).
        #[arg(long)]
        shard: Option<u32>,
    },
    /// Accept the connected node's clock as it is now, after its clock guard refused a jump.
    ConfirmClock,
    /// The answering node's state, then every node's shards and lag, and the shards' leaders.
    Status {
        /// Also print one row per shard: leader, replicas and their applied indexes.
        #[arg(long)]
        shards: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SchemaCommand {
    /// Print the current schema (TOML) and its version.
    Show,
    /// Validate and replicate a TOML schema (`-` reads stdin).
    Apply {
        file: PathBuf,
        /// Only validate; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs one command; returns what to print on stdout. Commands check their
/// input before connecting, so a typo is reported as such even with no server.
pub async fn run(cli: Cli) -> anyhow::Result<String> {
    if let Command::Certs(CertsCommand::Init { dir, nodes, hosts, force }) = &cli.command {
        return portrait_client::certs::init(dir, *nodes, hosts, *force);
    }
    let mut options = ConnectOptions::new();
    if let Some(token) = &cli.token {
        options = options.token(token)?;
    }
    if let Some(ca) = &cli.ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("--ca-cert {}: cannot read", ca.display()))?;
        options = options.ca_certificate(pem);
    }
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p).with_context(|| format!("--{flag} {}: cannot read", p.display()))
        };
        options = options.identity(read("cert", cert)?, read("key", key)?);
    }
    // Each node the token goes to in plaintext beyond loopback is warned
    // of as it is first dialed: the seed, and the nodes the shard map or a
    // redirect leads to.
    options = options.warn_plaintext_token();
    let endpoint = &Target { endpoint: cli.endpoint, options };
    match cli.command {
        Command::Put { json } => put::run(endpoint, &json).await,
        Command::Get { user, families, features, tags, linearizable, json } => {
            let selection = get::Selection { families, features, tags };
            get::run(&endpoint.connect().await?, &user, selection, linearizable, json).await
        }
        Command::Load { file, batch, concurrency } => {
            load::run(endpoint, &file, batch as usize, concurrency as usize).await
        }
        Command::Schema(SchemaCommand::Show) => schema::show(&endpoint.connect().await?).await,
        Command::Schema(SchemaCommand::Apply { file, dry_run }) => {
            schema::apply(endpoint, &file, dry_run).await
        }
        Command::Status => status::run(&endpoint.connect().await?).await,
        Command::Backup { dir } => {
            let client = endpoint.connect().await?;
            let manifest = portrait_client::backup::backup(&client, &dir, |line| eprintln!("{line}")).await?;
            Ok(format!(
                "backup {} of {} shards written to {}\n",
                manifest.backup_id,
                manifest.shards,
                dir.display()
            ))
        }
        Command::Restore { dir } => {
            let client = endpoint.connect().await?;
            let restored =
                portrait_client::backup::restore(&client, &dir, |line| eprintln!("{line}")).await?;
            let rows: u64 = restored.iter().map(|r| r.rows).sum();
            Ok(format!("restored {} shards ({rows} rows) from {}\n", restored.len(), dir.display()))
        }
        Command::Locate { user, json } => locate::run(&endpoint.connect().await?, &user, json).await,
        Command::Cluster(ClusterCommand::Status { shards }) => {
            cluster::run(&endpoint.connect().await?, shards).await
        }
        Command::Cluster(ClusterCommand::AddNode { id, addr, peer_addr, learner }) => {
            let r = endpoint.connect().await?.add_node(id, &addr, &peer_addr, learner).await?;
            Ok(status::members_text(r.log_index, &r.members))
        }
        Command::Cluster(ClusterCommand::TransferLeader { id, shard }) => {
            let r = endpoint.connect().await?.transfer_leader_of(id, shard).await?;
            let of = shard.map_or(String::new(), |s| format!(" of shard {s}"));
            Ok(format!("leader{of} is node {} at {}\n", r.leader_id, r.leader_addr))
        }
        Command::Cluster(ClusterCommand::ConfirmClock) => {
            let r = endpoint.connect().await?.confirm_clock().await?;
            Ok(status::confirmed_text(&r))
        }
        Command::Certs(_) => unreachable!("handled before connecting"),
        Command::Cluster(ClusterCommand::RemoveNode { id }) => {
            let r = endpoint.connect().await?.remove_node(id).await?;
            Ok(status::members_text(r.log_index, &r.members))
        }
        Command::Cluster(ClusterCommand::Drain { id, no_wait }) => {
            let client = endpoint.connect().await?;
            let r = client.drain_node(id).await?;
            let remove = format!("remove it with `portrait cluster remove-node {id}`");
            if no_wait {
                return Ok(format!(
                    "node {id} is draining ({} replicas to move); when `portrait cluster status` shows it \
                     holding none, {remove}",
                    r.replicas
                ));
            }
            eprintln!("node {id} is draining: {} replicas to move", r.replicas);
            cluster::drain_wait(&client, id, r.replicas as usize).await
        }
    }
}

/// The node to talk to and how.
pub struct Target {
    endpoint: String,
    options: ConnectOptions,
}

impl Target {
    async fn connect(&self) -> anyhow::Result<PortraitClient> {
        Ok(PortraitClient::connect_with(&self.endpoint, self.options.clone()).await?)
    }
}

/// Reads a whole file, or stdin for `-`.
fn read_input(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        return std::io::read_to_string(std::io::stdin()).context("cannot read stdin");
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn endpoint_is_global_and_defaults() {
        let cli = Cli::try_parse_from(["portrait", "status"]).unwrap();
        assert!(!cli.endpoint.is_empty());
        let cli = Cli::try_parse_from([
            "portrait",
            "get",
            "u1",
            "--endpoint",
            "n2:7700",
            "--family",
            "a",
            "--family",
            "b",
        ])
        .unwrap();
        assert_eq!(cli.endpoint, "n2:7700");
        assert!(matches!(cli.command, Command::Get { families, .. } if families == ["a", "b"]));
    }

    #[test]
    fn cluster_transfer_leader_takes_a_node_id() {
        let cli = Cli::try_parse_from(["portrait", "cluster", "transfer-leader", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cluster(ClusterCommand::TransferLeader { id: 3, shard: None })
        ));
        let cli =
            Cli::try_parse_from(["portrait", "cluster", "transfer-leader", "3", "--shard", "5"]).unwrap();
        let shard = Some(5);
        assert!(
            matches!(cli.command, Command::Cluster(ClusterCommand::TransferLeader { id: 3, shard: s }) if s == shard)
        );
        assert!(Cli::try_parse_from(["portrait", "cluster", "transfer-leader", "x"]).is_err());
    }

    #[test]
    fn token_is_global() {
        let cli = Cli::try_parse_from(["portrait", "status", "--token", "abc"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("abc"));
    }

    #[test]
    fn load_rejects_zero_batch() {
        assert!(Cli::try_parse_from(["portrait", "load", "x.jsonl", "--batch", "0"]).is_err());
        assert!(Cli::try_parse_from(["portrait", "load", "x.jsonl", "--batch", "10001"]).is_err());
        assert!(Cli::try_parse_from(["portrait", "load", "x.jsonl", "--batch", "10000"]).is_ok());
    }
}
