//! A TCP fault proxy on loopback, in front of one node's peer port.
//!
//! Peers reach a node through its proxy (the peer address recorded in the
//! memberships is the proxy's), so faults happen in real TCP connections,
//! not in the node's own filters. The proxy tells who connects by the
//! process that owns the connecting socket ([`crate::owner`]): each source
//! node has its own [`Mode`], so a link `a -> b` can be cut while `c -> b`
//! flows. Anything else uses the mode of source `None` (test clients use
//! the nodes' client ports, not the proxies).
//!
//! Modes, applied to new and existing connections at once:
//! - `Pass`: forward bytes both ways;
//! - `Drop`: a blackhole; connections are accepted and held, nothing is
//!   forwarded either way (bytes wait in the socket buffers, as a cut
//!   network's retransmissions would, and flow again on `Pass`);
//! - `Delay(d)`: every chunk is forwarded `d` after it was read (a delay
//!   line: latency, not a bandwidth limit);
//! - `Reset`: connections are closed with a TCP RST (`SO_LINGER` 0), new
//!   ones as soon as they are accepted.
//!
//! Proxies run on a runtime of their own, so a test thread that blocks (a
//! `wait` for a killed process) never stalls the cluster's traffic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::owner::Owners;

/// What a link does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Drop,
    Delay(Duration),
    Reset,
}

/// Chunks read ahead of a delayed (or blackholed) writer, per direction.
const QUEUE: usize = 64;
const CHUNK: usize = 16 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("fault proxy runtime")
    })
}

/// The modes of one proxy, per source node, and what it has done.
struct Links {
    modes: Mutex<HashMap<Option<u64>, watch::Sender<Mode>>>,
    resets: AtomicU64,
    owners: Owners,
}

impl Links {
    fn sender(&self, from: Option<u64>) -> watch::Sender<Mode> {
        let mut modes = self.modes.lock().unwrap();
        modes.entry(from).or_insert_with(|| watch::channel(Mode::Pass).0).clone()
    }
}

/// A listener on 127.0.0.1 forwarding to `target`; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    links: Arc<Links>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target`; `owners` maps the pids of node
    /// processes to node ids (the sources of connections).
    pub fn start(target: SocketAddr, owners: Owners) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let links = Arc::new(Links { modes: Mutex::default(), resets: AtomicU64::new(0), owners });
        let accept = runtime().spawn(accept_loop(listener, target, links.clone()));
        Proxy { addr, links, accept }
    }

    /// `http://` address of the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the mode of connections from node `from` (`None`: from anything
    /// that is not a node of the cluster).
    pub fn set(&self, from: Option<u64>, mode: Mode) {
        self.links.sender(from).send_replace(mode);
    }

    /// Every source back to `Pass`.
    pub fn heal(&self) {
        for sender in self.links.modes.lock().unwrap().values() {
            sender.send_replace(Mode::Pass);
        }
    }

    /// Connections closed with a reset so far.
    pub fn resets(&self) -> u64 {
        self.links.resets.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Dropping the senders ends every connection (see `wait_open`).
        self.links.modes.lock().unwrap().clear();
    }
}

async fn accept_loop(listener: std::net::TcpListener, target: SocketAddr, links: Arc<Links>) {
    let listener = TcpListener::from_std(listener).expect("proxy listener");
    loop {
        let Ok((client, peer)) = listener.accept().await else { continue };
        let links = links.clone();
        tokio::spawn(async move {
            let local = client.local_addr().ok();
            let from = match local {
                Some(l) => source(&links.owners, peer, l).await,
                None => None,
            };
            let mode = links.sender(from).subscribe();
            connection(client, target, mode, &links.resets).await;
        });
    }
}

/// The node that opened a connection. A lookup can miss while the kernel's
/// tables catch up (longer on a loaded machine); a node's connection taken
/// for an unknown source's would pass a cut link, and only nodes connect to
/// a peer port, so a miss is retried for up to a second.
async fn source(owners: &Owners, peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    for _ in 0..100 {
        if let Some(node) = crate::owner::node_of(owners, peer, local) {
            return Some(node);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("proxy: no node owns the connection from {peer}; it takes the links of source None");
    None
}

/// How a connection or one of its directions ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The sender closed its side cleanly.
    Eof,
    /// `Reset` mode, an I/O error or the proxy's end: both sides get a RST.
    Reset,
}

/// Forwards one connection until it ends; counts it in `resets` (before
/// the sockets close) if it ends with a reset.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mode: watch::Receiver<Mode>,
    resets: &AtomicU64,
) {
    let _ = client.set_nodelay(true);
    let current = *mode.borrow();
    let server = match current {
        Mode::Reset => None,
        _ => TcpStream::connect(target).await.ok(),
    };
    let Some(mut server) = server else {
        let _ = client.set_zero_linger();
        resets.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let _ = server.set_nodelay(true);
    let end = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = direction(cr, sw, mode.clone());
        let down = direction(sr, cw, mode);
        tokio::pin!(up, down);
        tokio::select! {
            e = &mut up => if e == End::Eof { down.await } else { e },
            e = &mut down => if e == End::Eof { up.await } else { e },
        }
    };
    if end == End::Reset {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
        resets.fetch_add(1, Ordering::SeqCst);
    }
}

/// Forwards one direction: a reader filling a queue of stamped chunks and a
/// writer sending each when its delay is up and the link is open.
async fn direction<R, W>(mut from: R, mut to: W, mode: watch::Receiver<Mode>) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let mut read_mode = mode.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            if let Err(end) = wait_open(&mut read_mode).await {
                return end;
            }
            let n = tokio::select! {
                r = from.read(&mut buf) => match r { Ok(n) => n, Err(_) => return End::Reset },
                changed = read_mode.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return End::Reset,
                },
            };
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                return End::Eof;
            }
        }
    };
    let mut write_mode = mode;
    let writer = async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            let current = *write_mode.borrow();
            if let Mode::Delay(d) = current {
                tokio::time::sleep_until(read_at + d).await;
            }
            if let Err(end) = wait_open(&mut write_mode).await {
                return end;
            }
            if to.write_all(&chunk).await.is_err() {
                return End::Reset;
            }
        }
        let _ = to.shutdown().await;
        End::Eof
    };
    tokio::pin!(reader, writer);
    tokio::select! {
        e = &mut reader => if e == End::Eof { writer.await } else { e },
        e = &mut writer => e,
    }
}

/// Waits while the link drops; `Err` when it resets or the proxy is gone.
async fn wait_open(mode: &mut watch::Receiver<Mode>) -> Result<(), End> {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Pass | Mode::Delay(_) => return Ok(()),
            Mode::Reset => return Err(End::Reset),
            Mode::Drop => {
                if mode.changed().await.is_err() {
                    return Err(End::Reset);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
