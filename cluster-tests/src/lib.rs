//! Real multi-process Portrait clusters on loopback, for tests.
//!
//! [`Cluster::start`] runs N `portraitd-faults` processes (this workspace's
//! `portraitd` with fault injection compiled in, or `$PORTRAITD`) on free
//! 127.0.0.1 ports with their own temp data dirs; node 1 bootstraps, the
//! others join through `AddNode`. Nodes can be killed with SIGKILL and
//! restarted on the same dir, port and flags. [`Cluster::spawn_joining`]
//! starts a node that joins by itself (`--join`). [`Cluster::start_proxied`]
//! puts a TCP fault proxy ([`proxy`]) in front of every peer port: peers reach
//! each other only through them, and links can drop, delay or reset.
//! [`replicas`] finds each shard's replicas and checks that every one holds
//! each acknowledged event exactly once.

pub mod cpu;
pub mod linearizability;
pub mod owner;
pub mod proxy;
pub mod replicas;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use owner::Owners;
use portrait_client::PortraitClient;
use proxy::{Mode, Proxy};
use tempfile::TempDir;

/// The `release` directory the running test or example was built into:
/// found from the executable's own path (`<target>/release/deps/` or
/// `.../examples/`), so a test binary built from another checkout with the
/// same target dir still finds its neighbours; else `$CARGO_TARGET_DIR` or
/// the workspace's `target/`.
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    if let Some(dir) = dir.filter(|d| d.file_name().is_some_and(|n| n == "deps" || n == "examples")) {
        if let Some(release) = dir.parent() {
            return release.to_path_buf();
        }
    }
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("release")
}

/// The `portrait` CLI built next to the tests (`cargo build --release -p
/// portrait-client`).
pub fn portrait_cli() -> PathBuf {
    let path = release_dir().join("portrait");
    assert!(path.exists(), "{} is missing: run `cargo build --release -p portrait-client`", path.display());
    path
}

/// The `portraitd` binary under test: `$PORTRAITD`, or the
/// `portraitd-faults` example of this package (see docs/development.md).
pub fn portraitd() -> PathBuf {
    if let Ok(p) = std::env::var("PORTRAITD") {
        return p.into();
    }
    let path = release_dir().join("examples/portraitd-faults");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release -p portrait-cluster-tests --examples` \
         (`make test` and `cargo test --release -p portrait-cluster-tests` do)",
        path.display()
    );
    path
}

/// Whether the binary has fault injection compiled in (its `--version` says
/// so): only then is it given `--fault-injection` (the release `portraitd`
/// refuses the flag; `make bench` runs the cluster benchmark on it).
fn has_fault_injection(binary: &Path) -> bool {
    static CACHE: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap();
    if let Some((_, has)) = cache.iter().find(|(p, _)| p == binary) {
        return *has;
    }
    let out = Command::new(binary).arg("--version").output().expect("run portraitd --version");
    let has = String::from_utf8_lossy(&out.stdout).contains("fault injection");
    cache.push((binary.to_path_buf(), has));
    has
}

/// Shards of a cluster from [`Cluster::start_sharded`]: more than one, so
/// that writes and reads cross shards, and few, so that starts stay quick
/// on a small machine. The other constructors make clusters of one shard:
/// their tests compare log indexes of one raft log.
pub const TEST_SHARDS: u32 = 4;

/// A port nothing listens on, below the kernel's ephemeral range (32768
/// and up by default): a port the kernel hands out (`bind :0`) can be taken
/// by another test's outgoing connection before `portraitd` binds it. Each
/// port is handed out once per process (a permutation of 20000-31999 from a
/// per-process start).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (std::process::id().wrapping_mul(7919) ^ nanos) % SPAN
    });
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left in {LOW}-{}", LOW + SPAN - 1);
        // 37 is prime to SPAN: n -> start + 37 n covers every port once.
        let port = (LOW + (start + n * 37) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One `portraitd` process.
pub struct NodeProc {
    pub id: u64,
    /// The client port.
    pub port: u16,
    /// The peer port (raft and the other node-to-node calls).
    pub peer_port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// portraitd config file contents (`--config`), if any.
    config: Option<String>,
    /// More flags, given on every start.
    args: Vec<String>,
    /// Environment variables set on every start (see [`Cluster::set_env`]).
    env: Vec<(String, String)>,
    /// The fault proxy peers reach this node through, if any.
    pub proxy: Option<Proxy>,
    /// Node processes by pid (shared by the cluster's proxies).
    owners: Owners,
    /// The directory of `portrait certs init` files, when both ports serve TLS.
    certs: Option<PathBuf>,
}

impl NodeProc {
    fn new(id: u64, config: Option<String>, mut args: Vec<String>, owners: Owners, shards: u32) -> NodeProc {
        let dir = tempfile::tempdir().unwrap();
        // A node given seeds learns the number of shards from them.
        if !args.iter().any(|a| a == "--join") {
            args.extend(["--shards".to_string(), shards.to_string()]);
        }
        let (port, peer_port) = (free_port(), free_port());
        NodeProc {
            id,
            port,
            peer_port,
            dir,
            child: None,
            config,
            args,
            env: Vec::new(),
            proxy: None,
            owners,
            certs: None,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.certs.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The node's client port (clients of tests use it).
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.port)
    }

    /// The node's own peer port.
    pub fn peer_endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.peer_port)
    }

    /// The peer address in the memberships: the proxy's, if the node has
    /// one (peers reach it only through the proxy).
    pub fn advertised(&self) -> String {
        self.proxy.as_ref().map_or_else(|| self.peer_endpoint(), Proxy::endpoint)
    }

    fn spawn(&mut self, bootstrap: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("node.log"))
            .unwrap();
        let binary = portraitd();
        let mut cmd = Command::new(&binary);
        cmd.args(["--node-id", &self.id.to_string(), "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--peer-listen", &format!("127.0.0.1:{}", self.peer_port)])
            .args(["--advertise", &self.endpoint(), "--peer-advertise", &self.advertised()])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .env_remove("PORTRAIT_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if has_fault_injection(&binary) {
            cmd.arg("--fault-injection");
        }
        if !bootstrap {
            cmd.arg("--no-bootstrap");
        }
        if let Some(certs) = &self.certs {
            let file = |name: String| certs.join(name).into_os_string();
            let id = self.id;
            cmd.arg("--tls-cert").arg(file(format!("node-{id}.pem")));
            cmd.arg("--tls-key").arg(file(format!("node-{id}.key")));
            cmd.arg("--peer-ca").arg(file("peer-ca.pem".into()));
            cmd.arg("--peer-cert").arg(file(format!("node-{id}-peer.pem")));
            cmd.arg("--peer-key").arg(file(format!("node-{id}-peer.key")));
        }
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(config) = &self.config {
            let path = self.dir.path().join("portraitd.toml");
            std::fs::write(&path, config).unwrap();
            cmd.arg("--config").arg(path);
        }
        let child = cmd.spawn().expect("start portraitd");
        self.owners.write().unwrap().insert(child.id(), self.id);
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.owners.write().unwrap().remove(&c.id());
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Started, not stopped by the test, and not exited by itself (a
    /// crash): its process is not a zombie yet (Linux `/proc`).
    pub fn is_running(&self) -> bool {
        let Some(child) = &self.child else { return false };
        match std::fs::read_to_string(format!("/proc/{}/stat", child.id())) {
            // `pid (comm) state ...`; comm may hold spaces and parentheses.
            Ok(stat) => {
                stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            }
            Err(_) => false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// The node's `--data-dir` (for a test to inspect or damage while the
    /// node is down).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Whether the process ended by itself (a crash) before the test
            // failed, or was running (killed here).
            let state = match self.child.as_mut().map(Child::try_wait) {
                None => "stopped by the test".to_string(),
                Some(Ok(None)) => "running".to_string(),
                Some(Ok(Some(status))) => format!("EXITED BY ITSELF: {status}"),
                Some(Err(e)) => format!("state unknown: {e}"),
            };
            eprintln!("---- node {} log ({state}) ----\n{}", self.id, self.log());
        }
        self.kill();
    }
}

thread_local! {
    /// The message of the last panic on this thread (see [`record_panics`]).
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keeps each panic's message and place for [`Cluster`]'s drop, which
/// prints it again after the nodes' logs: a CI log cut to its last lines
/// then still says why the test failed. Installed once per process; the
/// default hook still prints as before.
fn record_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LAST_PANIC.with(|last| *last.borrow_mut() = Some(info.to_string()));
            previous(info);
        }));
    });
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // The nodes' logs first (each node's drop prints its own), then
        // what failed, last.
        self.nodes.clear();
        let thread = std::thread::current();
        let message =
            LAST_PANIC.with(|last| last.borrow_mut().take()).unwrap_or_else(|| "not recorded".into());
        eprintln!(
            "---- {} failed (repeated after the node logs) ----\n{message}",
            thread.name().unwrap_or("the test")
        );
    }
}

/// A running cluster.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    /// The number of shards every node is started with.
    shards: u32,
    /// How test clients connect (TLS clusters: the client CA).
    options: portrait_client::ConnectOptions,
    /// Certificates of a TLS cluster (see [`Cluster::start_tls`]).
    certs: Option<TempDir>,
}

impl Cluster {
    /// Starts `n` nodes and forms one cluster with all of them as voters.
    pub async fn start(n: u64) -> Cluster {
        Cluster::start_with_config(n, None).await
    }

    /// Like [`Cluster::start`], each node with this `portraitd` config file.
    pub async fn start_with_config(n: u64, config: Option<&str>) -> Cluster {
        Cluster::launch(n, config, false, 1).await
    }

    /// Like [`Cluster::start`], with `shards` shards (each on min(3, n)
    /// nodes: the default replication factor).
    pub async fn start_sharded(n: u64, shards: u32) -> Cluster {
        Cluster::launch(n, None, false, shards).await
    }

    /// Like [`Cluster::start_sharded`], with replication factor
    /// `replication` (in every node's config file; the first node, which
    /// creates the cluster, records it in the map).
    pub async fn start_placed(n: u64, shards: u32, replication: u32) -> Cluster {
        let config = format!("replication = {replication}\n");
        Cluster::launch(n, Some(&config), false, shards).await
    }

    /// Like [`Cluster::start_sharded`], each node with this `portraitd`
    /// config file.
    pub async fn start_sharded_with_config(n: u64, shards: u32, config: &str) -> Cluster {
        Cluster::launch(n, Some(config), false, shards).await
    }

    /// Like [`Cluster::start`], with a fault proxy in front of every node:
    /// the membership records the proxies' addresses, so every raft message
    /// (and every leader redirect) goes through them. See [`Cluster::link`].
    pub async fn start_proxied(n: u64) -> Cluster {
        Cluster::launch(n, None, true, 1).await
    }

    /// Like [`Cluster::start_proxied`], with `shards` shards (each on
    /// min(3, n) nodes), each node with this `portraitd` config file.
    pub async fn start_proxied_sharded_with_config(n: u64, shards: u32, config: &str) -> Cluster {
        Cluster::launch(n, Some(config), true, shards).await
    }

    /// Like [`Cluster::start_sharded`], with TLS on both ports: each node
    /// serves its client port with its certificate from `portrait certs
    /// init` and talks to its peers over mutual TLS; [`Cluster::client`]
    /// trusts the client CA. [`Cluster::certs`] has the files.
    pub async fn start_tls(n: u64, shards: u32) -> Cluster {
        Cluster::launch_with(n, None, false, shards, true, None, &[]).await
    }

    /// Like [`Cluster::start_tls`], each node with this `portraitd` config
    /// file.
    pub async fn start_tls_with_config(n: u64, shards: u32, config: &str) -> Cluster {
        Cluster::launch_with(n, Some(config), false, shards, true, None, &[]).await
    }

    /// Like [`Cluster::start_sharded`], with a fault-injection marker file
    /// `file` in node `id`'s data dir before it first starts.
    pub async fn start_sharded_with_marker(n: u64, shards: u32, id: u64, file: &str) -> Cluster {
        Cluster::launch_with(n, None, false, shards, false, Some((id, file)), &[]).await
    }

    /// Like [`Cluster::start_sharded_with_config`] (`None`: no config
    /// file), every node started with the environment variables `env`
    /// (until [`Cluster::set_env`] changes them), from its first start on.
    pub async fn start_sharded_with_env(
        n: u64,
        shards: u32,
        config: Option<&str>,
        env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::launch_with(n, config, false, shards, false, None, env).await
    }

    /// The certificates of a [`Cluster::start_tls`] cluster.
    pub fn certs(&self) -> &Path {
        self.certs.as_ref().expect("a TLS cluster").path()
    }

    async fn launch(n: u64, config: Option<&str>, proxied: bool, shards: u32) -> Cluster {
        Cluster::launch_with(n, config, proxied, shards, false, None, &[]).await
    }

    async fn launch_with(
        n: u64,
        config: Option<&str>,
        proxied: bool,
        shards: u32,
        tls: bool,
        marker: Option<(u64, &str)>,
        env: &[(&str, &str)],
    ) -> Cluster {
        record_panics();
        let owners = Owners::default();
        let mut nodes: Vec<NodeProc> = (1..=n)
            .map(|id| NodeProc::new(id, config.map(str::to_string), Vec::new(), owners.clone(), shards))
            .collect();
        for node in &mut nodes {
            node.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        }
        let mut options = portrait_client::ConnectOptions::new();
        let certs = match tls {
            false => None,
            true => {
                let dir = tempfile::tempdir().unwrap();
                let hosts = ["127.0.0.1".to_string()];
                portrait_client::certs::init(dir.path(), n as u32, &hosts, false).expect("certs init");
                options = options.ca_certificate(std::fs::read(dir.path().join("client-ca.pem")).unwrap());
                nodes.iter_mut().for_each(|node| node.certs = Some(dir.path().to_path_buf()));
                Some(dir)
            }
        };
        for node in &mut nodes {
            if proxied {
                let target = format!("127.0.0.1:{}", node.peer_port).parse().unwrap();
                node.proxy = Some(Proxy::start(target, owners.clone()));
            }
        }
        if let Some((id, file)) = marker {
            let dir = nodes[id as usize - 1].data_dir();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file), "1").unwrap();
        }
        for node in &mut nodes {
            node.spawn(node.id == 1);
        }
        let cluster = Cluster { nodes, shards, options, certs };
        for node in &cluster.nodes {
            cluster.wait_answering(node.id).await;
        }
        cluster.wait_leader(&[1]).await;
        let seed = cluster.client(1).await;
        for node in &cluster.nodes[1..] {
            seed.add_node(node.id, &node.endpoint(), &node.advertised(), false).await.expect("add node");
        }
        cluster
    }

    /// The number of shards the nodes were started with.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    pub async fn client(&self, id: u64) -> PortraitClient {
        self.connect(id).await.expect("connect")
    }

    /// A client of node `id` that sends each call once (redirects
    /// followed, no retry after a failure): for writers that retry on
    /// their own.
    pub async fn client_once(&self, id: u64) -> PortraitClient {
        let once = self.options.clone().retry_for(Duration::ZERO);
        PortraitClient::connect_with(&self.node(id).endpoint(), once).await.expect("connect")
    }

    /// A client of node `id`, connected as the cluster's clients connect.
    pub async fn connect(&self, id: u64) -> Result<PortraitClient, portrait_client::ClientError> {
        PortraitClient::connect_with(&self.node(id).endpoint(), self.options.clone()).await
    }

    /// Waits until node `id`'s process exits on its own (at most
    /// `within`); returns its exit status.
    pub async fn wait_exit(&mut self, id: u64, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let node = &mut self.nodes[(id - 1) as usize];
        loop {
            let child = node.child.as_mut().expect("node running");
            if let Some(status) = child.try_wait().expect("wait for portraitd") {
                let pid = child.id();
                node.child = None;
                node.owners.write().unwrap().remove(&pid);
                return status;
            }
            assert!(Instant::now() < deadline, "node {id} still runs after {within:?}:\n{}", node.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        self.nodes[(id - 1) as usize].kill();
    }

    /// Starts one more process (not yet a member; add it with `AddNode`).
    /// Returns its id.
    pub async fn spawn_node(&mut self) -> u64 {
        self.spawn_with_args(Vec::new(), &[]).await
    }

    /// [`Cluster::spawn_node`] with the environment variable `key` =
    /// `value`.
    pub async fn spawn_node_with_env(&mut self, key: &str, value: &str) -> u64 {
        self.spawn_with_args(Vec::new(), &[(key, value)]).await
    }

    /// Starts one more process with `--join` through the nodes `seeds`: it
    /// adds itself to the cluster. Returns its id.
    pub async fn spawn_joining(&mut self, seeds: &[u64]) -> u64 {
        let seeds: Vec<String> = seeds.iter().map(|&s| self.node(s).advertised()).collect();
        self.spawn_with_args(vec!["--join".into(), seeds.join(",")], &[]).await
    }

    /// [`Cluster::spawn_joining`] with the environment variable `key` =
    /// `value`.
    pub async fn spawn_joining_with_env(&mut self, seeds: &[u64], key: &str, value: &str) -> u64 {
        let seeds: Vec<String> = seeds.iter().map(|&s| self.node(s).advertised()).collect();
        self.spawn_with_args(vec!["--join".into(), seeds.join(",")], &[(key, value)]).await
    }

    async fn spawn_with_args(&mut self, args: Vec<String>, env: &[(&str, &str)]) -> u64 {
        self.spawn_process(args, env, false).await
    }

    /// Starts one more process as [`Cluster::spawn_node`] does, but without
    /// `--no-bootstrap`: it creates a one-node cluster of its own (an
    /// operator's slip). Returns its id.
    pub async fn spawn_node_of_its_own_cluster(&mut self) -> u64 {
        self.spawn_process(Vec::new(), &[], true).await
    }

    async fn spawn_process(&mut self, args: Vec<String>, env: &[(&str, &str)], bootstrap: bool) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let config = self.nodes[0].config.clone();
        let mut node = NodeProc::new(id, config, args, self.nodes[0].owners.clone(), self.shards);
        node.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        node.spawn(bootstrap);
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

    /// Sets (`Some`) or removes (`None`) environment variable `key` for
    /// node `id`'s next starts.
    pub fn set_env(&mut self, id: u64, key: &str, value: Option<&str>) {
        let env = &mut self.nodes[(id - 1) as usize].env;
        env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            env.push((key.to_string(), value.to_string()));
        }
    }

    /// Restarts node `id` on its data dir and port with `extra` flags (this
    /// start only; the flags it was created with are kept).
    pub async fn restart_with(&mut self, id: u64, extra: &[&str]) {
        self.start_again_with(id, extra);
        self.wait_answering(id).await;
    }

    /// Sets what the proxy of node `to` does with connections from node
    /// `from` (needs [`Cluster::start_proxied`]).
    pub fn link(&self, from: u64, to: u64, mode: Mode) {
        self.node(to).proxy.as_ref().expect("a proxied cluster").set(Some(from), mode);
    }

    /// Cuts the links between the nodes of `a` and those of `b`, both ways,
    /// in the proxies (real TCP blackholes, not the nodes' filters).
    pub fn cut(&self, a: &[u64], b: &[u64]) {
        for (&x, &y) in a.iter().flat_map(|x| b.iter().map(move |y| (x, y))) {
            self.link(x, y, Mode::Drop);
            self.link(y, x, Mode::Drop);
        }
    }

    /// Every proxy link back to `Pass`.
    pub fn heal_links(&self) {
        self.nodes.iter().filter_map(|n| n.proxy.as_ref()).for_each(Proxy::heal);
    }

    /// Starts node `id` again on its data dir and port, without waiting
    /// for it to answer (it may exit at once: see [`Cluster::wait_exit`]).
    pub fn start_again(&mut self, id: u64) {
        self.start_again_with(id, &[]);
    }

    /// [`Cluster::start_again`] with `extra` flags (this start only).
    pub fn start_again_with(&mut self, id: u64, extra: &[&str]) {
        let node = &mut self.nodes[(id - 1) as usize];
        let kept = node.args.clone();
        node.args.extend(extra.iter().map(|a| a.to_string()));
        node.spawn(false);
        node.args = kept;
    }

    /// Restarts node `id` on its data dir and port.
    pub async fn restart(&mut self, id: u64) {
        self.nodes[(id - 1) as usize].spawn(false);
        self.wait_answering(id).await;
    }

    async fn wait_answering(&self, id: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = self.connect(id).await {
                if c.cluster_status().await.is_ok() {
                    return;
                }
            }
            assert!(self.node(id).is_running(), "node {id} exited as it started:\n{}", self.node(id).log());
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
                if let Ok(c) = self.connect(id).await {
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
