//! `TestNode`: one real `portraitd` process on a temp dir and two free
//! loopback ports (client and peer), for integration tests that go through
//! the network.
//!
//! The node bootstraps a single-node cluster; [`TestNode::start`] returns once
//! it answers `ClusterStatus` with a leader. `stop` sends SIGTERM (graceful),
//! `kill` sends SIGKILL, `restart` starts the binary again on the same data
//! dir and port. The node's stdout and stderr go to `portraitd.log` in the
//! temp dir; when a test panics, dropping the node prints that log.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portrait_client::PortraitClient;
use tempfile::TempDir;
use tokio::time::{sleep, timeout, Instant};

/// Shards of a node from [`TestNode::start_sharded`]: several, so that a
/// request spans shards; fewer than the default 64 to start quickly.
#[allow(dead_code)] // not every test binary starts one
pub const SHARDS: u32 = 4;

/// How long a start (or restart) may take until a leader is known.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one readiness probe may hang (the port is bound before serving).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a node may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestNode {
    dir: TempDir,
    port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// `--shards` (the number of shards the node is created with).
    shards: u32,
    /// More flags, given at every start.
    args: Vec<String>,
}

impl TestNode {
    /// Starts a fresh node of one shard and waits until it leads its
    /// one-node cluster. One shard: these tests compare log indexes of one
    /// raft log (each shard has its own).
    pub async fn start() -> TestNode {
        Self::start_sharded(1).await
    }

    /// Starts a fresh node of `shards` shards.
    pub async fn start_sharded(shards: u32) -> TestNode {
        Self::start_with(shards, |_| Vec::new()).await
    }

    /// Starts a fresh node of `shards` shards with more flags: `args` is
    /// given the node's temp dir (for files the flags name) and returns them.
    #[allow(dead_code)] // not every test binary starts one
    pub async fn start_with(shards: u32, args: impl FnOnce(&Path) -> Vec<String>) -> TestNode {
        let dir = tempfile::tempdir().expect("create temp dir");
        let args = args(dir.path());
        let mut node = TestNode { dir, port: free_port(), peer_port: free_port(), child: None, shards, args };
        node.launch().await;
        node
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PEER_PORT`: the internal services' port.
    #[allow(dead_code)] // not every test binary calls peers
    pub fn peer_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The running `portraitd`'s process id (to read its `/proc` entries).
    #[allow(dead_code)] // not every test binary reads it
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node is running").id()
    }

    /// Everything the node has logged so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// A new client connected to this node.
    pub async fn client(&self) -> PortraitClient {
        match PortraitClient::connect(&self.endpoint()).await {
            Ok(client) => client,
            Err(e) => panic!("connect to {}: {e}\n{}", self.endpoint(), self.log()),
        }
    }

    /// Graceful shutdown: SIGTERM, then wait for a clean exit.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("the node is running");
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for portraitd") {
                assert!(status.success(), "portraitd exited with {status} after SIGTERM\n{}", self.log());
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("portraitd did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}", self.log());
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Crash: SIGKILL, no chance to flush or shut down.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the node is running");
        child.kill().expect("SIGKILL portraitd");
        child.wait().expect("reap portraitd");
    }

    /// Starts the binary again on the same data dir and port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the node before restarting it");
        self.launch().await;
    }

    #[allow(dead_code)] // not every test binary reads it
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("portraitd.log")
    }

    async fn launch(&mut self) {
        let mut command = portraitd(self.dir.path(), (self.port, self.peer_port), self.shards);
        command.args(&self.args);
        self.child = Some(command.spawn().expect("spawn portraitd"));
        self.wait_for_leader().await;
    }

    async fn wait_for_leader(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("the node is running");
            if let Some(status) = child.try_wait().expect("poll portraitd") {
                self.child = None;
                panic!("portraitd exited with {status} while starting\n{}", self.log());
            }
            if timeout(PROBE_TIMEOUT, self.has_leader()).await == Ok(true) {
                return;
            }
            if Instant::now() > deadline {
                panic!("portraitd had no leader after {READY_TIMEOUT:?}\n{}", self.log());
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn has_leader(&self) -> bool {
        let Ok(client) = PortraitClient::connect(&self.endpoint()).await else { return false };
        client.cluster_status().await.is_ok_and(|s| s.leader_id != 0)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- portraitd log ({}) ----\n{}", self.log_path().display(), self.log());
        }
    }
}

/// `portraitd` as node 1 of a new cluster of `shards` shards on the client
/// and peer ports of `ports`, with its data in `dir/data` and its output appended to
/// `dir/portraitd.log`; no `PORTRAIT_*` variable of the test's environment
/// reaches it. Add flags, then spawn.
pub fn portraitd(dir: &Path, (port, peer_port): (u16, u16), shards: u32) -> Command {
    let log =
        File::options().create(true).append(true).open(dir.join("portraitd.log")).expect("open log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_portraitd"));
    command
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--peer-listen", &format!("127.0.0.1:{peer_port}")])
        .args(["--node-id", "1", "--log", "info,openraft=warn"])
        .args(["--shards", &shards.to_string()])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log);
    // The environment must not reconfigure the node behind the flags' back.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTRAIT_") {
            command.env_remove(key);
        }
    }
    command
}

/// A loopback port nothing listens on right now, below the kernel's
/// ephemeral range (32768 and up by default) and apart from the cluster
/// tests' (20000-31999): a port from `bind :0` can be handed out again
/// before `portraitd` binds it (it once got the same one for `--listen` and
/// `--peer-listen`), or be taken by an outgoing connection. Each port is
/// handed out once per process (a permutation of 10000-19999 from a
/// per-process start).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    const LOW: u32 = 10_000;
    const SPAN: u32 = 10_000;
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

/// Runs `command` with its stderr piped until it exits, at most 30 s (a
/// `portraitd` that does not refuse to start serves forever: it is killed
/// and the test fails); returns its exit status and stderr.
#[allow(dead_code)] // not every test binary starts a refused node
pub fn exit_of(command: &mut Command) -> (std::process::ExitStatus, String) {
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn portraitd");
    let mut pipe = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut stderr = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        stderr
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for portraitd") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portraitd still runs after 30 s: {command:?}\n{}", reader.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().expect("read stderr"))
}
