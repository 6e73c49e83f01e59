//! Which node opened a loopback TCP connection (Linux `/proc`).
//!
//! A node reaches its peers at the addresses in the membership, the same
//! for every node, so a proxy in front of node `b` cannot tell `a -> b` from
//! `c -> b` by the address. It can by the process: the connecting socket
//! (the accepted connection's peer address) appears in `/proc/net/tcp` with
//! its inode, and exactly one process has that inode among its fds.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

/// The pid of each running node process, with its node id.
pub type Owners = Arc<RwLock<HashMap<u32, u64>>>;

/// The node whose process owns the socket connected from `peer` to `local`
/// (`None`: not a node, e.g. the test itself, or not found).
pub fn node_of(owners: &Owners, peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    let inode = socket_inode(peer, local)?;
    let nodes: Vec<(u32, u64)> = owners.read().unwrap().iter().map(|(&p, &n)| (p, n)).collect();
    nodes.into_iter().find(|&(pid, _)| has_fd(pid, inode)).map(|(_, node)| node)
}

/// `/proc/net/tcp`'s spelling of an IPv4 address: `0100007F:1F90`.
fn proc_addr(addr: SocketAddr) -> Option<String> {
    let IpAddr::V4(ip) = addr.ip() else { return None };
    Some(format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), addr.port()))
}

/// The inode of the socket whose own address is `peer`, connected to `local`.
/// Entries without an inode (0: a closed connection in TIME_WAIT with the
/// same ports) are skipped: they belong to no process.
fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    let (own, remote) = (proc_addr(peer)?, proc_addr(local)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let inode: u64 = (f.len() > 9 && f[1] == own && f[2] == remote).then(|| f[9].parse().ok())??;
        (inode != 0).then_some(inode)
    })
}

fn has_fd(pid: u32, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_process_of_a_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        let owners: Owners = Arc::default();
        owners.write().unwrap().insert(std::process::id(), 7);
        assert_eq!(node_of(&owners, peer, local), Some(7));
        owners.write().unwrap().clear();
        assert_eq!(node_of(&owners, peer, local), None);
    }
}
