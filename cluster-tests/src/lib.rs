//! Real multi-process Portrait clusters on loopback, for tests.
//!
//! [`Cluster::start`] runs N `portraitd` processes (the release binary of this
//! workspace, or `$PORTRAITD`) on free 127.0.0.1 ports with their own temp
//! data dirs; node 1 bootstraps, the others join through `AddNode`. Nodes can
//! be killed with SIGKILL and restarted on the same dir, port and flags.
//! [`Cluster::spawn_joining`] starts a node that joins by itself (`--join`).

pub mod linearizability;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portrait_client::PortraitClient;
use tempfile::TempDir;

/// The `portraitd` binary under test.
pub fn portraitd() -> PathBuf {
    if let Ok(p) = std::env::var("PORTRAITD") {
        return p.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("release/portraitd");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --bins` (make test does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `portraitd` process.
pub struct NodeProc {
    pub id: u64,
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// portraitd config file contents (`--config`), if any.
    config: Option<String>,
    /// More flags, given on every start.
    args: Vec<String>,
}

impl NodeProc {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self, bootstrap: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("node.log"))
            .unwrap();
        let mut cmd = Command::new(portraitd());
        cmd.args(["--node-id", &self.id.to_string(), "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--fault-injection")
            .env_remove("PORTRAIT_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if !bootstrap {
            cmd.arg("--no-bootstrap");
        }
        cmd.args(&self.args);
        if let Some(config) = &self.config {
            let path = self.dir.path().join("portraitd.toml");
            std::fs::write(&path, config).unwrap();
            cmd.arg("--config").arg(path);
        }
        self.child = Some(cmd.spawn().expect("start portraitd"));
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- node {} log ----\n{}", self.id, self.log());
        }
        self.kill();
    }
}

/// A running cluster.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
}

impl Cluster {
    /// Starts `n` nodes and forms one cluster with all of them as voters.
    pub async fn start(n: u64) -> Cluster {
        Cluster::start_with_config(n, None).await
    }

    /// Like [`Cluster::start`], each node with this `portraitd` config file.
    pub async fn start_with_config(n: u64, config: Option<&str>) -> Cluster {
        let mut nodes: Vec<NodeProc> = (1..=n)
            .map(|id| NodeProc {
                id,
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                child: None,
                config: config.map(str::to_string),
                args: Vec::new(),
            })
            .collect();
        for node in &mut nodes {
            node.spawn(node.id == 1);
        }
        let cluster = Cluster { nodes };
        for node in &cluster.nodes {
            cluster.wait_answering(node.id).await;
        }
        cluster.wait_leader(&[1]).await;
        let seed = cluster.client(1).await;
        for node in &cluster.nodes[1..] {
            seed.add_node(node.id, &node.endpoint(), false).await.expect("add node");
        }
        cluster
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    pub async fn client(&self, id: u64) -> PortraitClient {
        PortraitClient::connect(&self.node(id).endpoint()).await.expect("connect")
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        self.nodes[(id - 1) as usize].kill();
    }

    /// Starts one more process (not yet a member; add it with `AddNode`).
    /// Returns its id.
    pub async fn spawn_node(&mut self) -> u64 {
        self.spawn_with_args(Vec::new()).await
    }

    /// Starts one more process with `--join` through the nodes `seeds`: it
    /// adds itself to the cluster. Returns its id.
    pub async fn spawn_joining(&mut self, seeds: &[u64]) -> u64 {
        let seeds: Vec<String> = seeds.iter().map(|&s| self.node(s).endpoint()).collect();
        self.spawn_with_args(vec!["--join".into(), seeds.join(",")]).await
    }

    async fn spawn_with_args(&mut self, args: Vec<String>) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let config = self.nodes[0].config.clone();
        let dir = tempfile::tempdir().unwrap();
        let mut node = NodeProc { id, port: free_port(), dir, child: None, config, args };
        node.spawn(false);
        self.nodes.push(node);
        self.wait_answering(id).await;
        id
    }

    /// Cuts raft traffic between the nodes of `a` and those of `b` (both
    /// directions), through each node's fault-injection filter.
    pub async fn partition(&self, a: &[u64], b: &[u64]) {
        for (side, other) in [(a, b), (b, a)] {
            for &id in side {
                if self.node(id).is_running() {
                    self.client(id).await.set_partition(other.to_vec()).await.expect("set partition");
                }
            }
        }
    }

    /// Removes every partition.
    pub async fn heal(&self) {
        for node in &self.nodes {
            if node.is_running() {
                self.client(node.id).await.set_partition(Vec::new()).await.expect("heal");
            }
        }
    }

    /// Restarts node `id` on its data dir and port with `extra` flags (this
    /// start only; the flags it was created with are kept).
    pub async fn restart_with(&mut self, id: u64, extra: &[&str]) {
        let node = &mut self.nodes[(id - 1) as usize];
        let kept = node.args.clone();
        node.args.extend(extra.iter().map(|a| a.to_string()));
        node.spawn(false);
        node.args = kept;
        self.wait_answering(id).await;
    }

    /// Restarts node `id` on its data dir and port.
    pub async fn restart(&mut self, id: u64) {
        self.nodes[(id - 1) as usize].spawn(false);
        self.wait_answering(id).await;
    }

    async fn wait_answering(&self, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = PortraitClient::connect(&self.node(id).endpoint()).await {
                if c.cluster_status().await.is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "node {id} did not start:\n{}", self.node(id).log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until one of `candidates` reports itself leader; returns its id.
    pub async fn wait_leader(&self, candidates: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for &id in candidates {
                if !self.node(id).is_running() {
                    continue;
                }
                if let Ok(c) = PortraitClient::connect(&self.node(id).endpoint()).await {
                    if let Ok(s) = c.cluster_status().await {
                        if s.role == "Leader" {
                            return id;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader among {candidates:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every node in `ids` reports `leader` as the leader (and
    /// `leader` itself reports the `Leader` role).
    pub async fn wait_agreed_leader(&self, ids: &[u64], leader: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        'poll: loop {
            assert!(Instant::now() < deadline, "nodes {ids:?} did not all name node {leader} as leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
            for &id in ids {
                let Ok(s) = self.client(id).await.cluster_status().await else { continue 'poll };
                if s.leader_id != leader || (id == leader && s.role != "Leader") {
                    continue 'poll;
                }
            }
            return;
        }
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = self.client(id).await;
        loop {
            if client.cluster_status().await.is_ok_and(|s| s.applied_index >= index) {
                return;
            }
            assert!(Instant::now() < deadline, "node {id} did not apply index {index}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
