//! TLS end to end: three nodes with certificates from `portrait certs init`
//! (`portrait_client::certs`), TLS on the client ports and mutual TLS on
//! the peer ports. Writes and linearizable reads work across shards; a
//! plaintext client is refused; the peer port refuses callers without a
//! node certificate, and a node certificate that names another node than
//! the message claims; a removed node's certificate reaches no peer call.

use portrait_client::portrait_proto::v1::admin_client::AdminClient;
use portrait_client::portrait_proto::v1::raft_client::RaftClient;
use portrait_client::portrait_proto::v1::{
    AddNodeRequest, ClockRequest, ClusterStatusRequest, RemoveNodeRequest, StartElectionRequest,
};
use portrait_client::{Consistency, PortraitClient};
use portrait_cluster_tests::replicas::wait_placed;
use portrait_cluster_tests::workload::order;
use portrait_cluster_tests::Cluster;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const SHARDS: u32 = 4;

/// A raft client of `peer_url` presenting `identity` (`None`: no
/// certificate), trusting the peer CA of `certs`.
async fn peer_client(
    certs: &std::path::Path,
    peer_url: &str,
    identity: Option<(&str, &str)>,
) -> Result<RaftClient<tonic::transport::Channel>, tonic::transport::Error> {
    let ca = Certificate::from_pem(std::fs::read(certs.join("peer-ca.pem")).unwrap());
    let mut tls = ClientTlsConfig::new().ca_certificate(ca).domain_name("portrait-peer");
    if let Some((cert, key)) = identity {
        let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    let channel = Endpoint::from_shared(peer_url.to_string())?.tls_config(tls)?.connect().await?;
    Ok(RaftClient::new(channel))
}

#[tokio::test]
async fn a_tls_cluster_serves_clients_and_its_peer_ports_take_only_node_certificates() {
    let cluster = Cluster::start_tls(3, SHARDS).await;
    let placed = wait_placed(&cluster, &[1, 2, 3], SHARDS).await;
    assert_eq!(placed.len(), SHARDS as usize);

    // Clients over TLS: a write spanning shards, linearizable reads elsewhere.
    let events: Vec<_> = (0..16).map(order).collect();
    let written = cluster.client(2).await.write(events.clone()).await.expect("write over TLS");
    assert_eq!(written.applied, 16, "{written:?}");
    let reader = cluster.client(3).await;
    for event in &events {
        let profile = reader.get_profile(&event.user_id, &[], Consistency::Linearizable).await.unwrap();
        assert!(profile.profile.unwrap().found, "{}", event.user_id);
    }

    // A plaintext client gets nowhere on a TLS client port.
    let plain = format!("http://127.0.0.1:{}", cluster.node(1).port);
    let refused = match PortraitClient::connect(&plain).await {
        Ok(client) => client.cluster_status().await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext client was served on a TLS client port");

    // The peer port: a node certificate is served...
    let certs = cluster.certs();
    let peer = cluster.node(1).peer_endpoint();
    let node2 = Some(("node-2-peer.pem", "node-2-peer.key"));
    let mut as_node2 = peer_client(certs, &peer, node2).await.expect("node 2 connects");
    as_node2.clock(ClockRequest { from: 2 }).await.expect("node 2's certificate is served");
    // ...but not for a message claiming to come from another node.
    let claim =
        |leader_id| StartElectionRequest { leader_id, term: 1, last_log_index: 0, dry_run: true, group: 0 };
    let status = as_node2.start_election(claim(3)).await.expect_err("node 2 posing as node 3");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("does not name node 3"), "{status:?}");
    let own = as_node2.start_election(claim(2)).await;
    assert_ne!(
        own.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied),
        "its own id is checked by raft"
    );
    let join = |node_id| AddNodeRequest {
        node_id,
        addr: "https://x:1".into(),
        peer_addr: "https://x:2".into(),
        learner: true,
    };
    let status = as_node2.join(join(7)).await.expect_err("node 2 joining as node 7");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // No certificate, or a client certificate (client CA): no peer service.
    let client_cert = Some(("client.pem", "client.key"));
    for (who, identity) in [("no certificate", None), ("a client certificate", client_cert)] {
        let served = match peer_client(certs, &peer, identity).await {
            Ok(mut raft) => raft.clock(ClockRequest { from: 9 }).await.is_ok(),
            Err(_) => false,
        };
        assert!(!served, "the peer port served a caller with {who}");
    }

    // The client port, reached as a client reaches it, serves no raft.
    let client_ca = || Certificate::from_pem(std::fs::read(certs.join("client-ca.pem")).unwrap());
    let as_client = |id: u64| {
        let tls = ClientTlsConfig::new().ca_certificate(client_ca());
        Endpoint::from_shared(cluster.node(id).endpoint()).unwrap().tls_config(tls).unwrap()
    };
    let channel = as_client(1).connect().await.expect("the client port over TLS");
    let status = RaftClient::new(channel).clock(ClockRequest { from: 2 }).await.expect_err("raft");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");

    // A redirect names the leader's client address, never its peer one.
    let mut redirects = 0;
    for id in [1, 2, 3] {
        let mut admin = AdminClient::new(as_client(id).connect().await.unwrap());
        // Node 99 does not exist: the meta leader says so, the others redirect.
        let status = admin.remove_node(RemoveNodeRequest { node_id: 99 }).await.expect_err("no node 99");
        if status.code() != tonic::Code::Unavailable {
            assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
            continue;
        }
        let meta = status.metadata();
        let leader: u64 = meta.get("x-portrait-leader-id").unwrap().to_str().unwrap().parse().unwrap();
        let hint = meta.get("x-portrait-leader").expect("a leader hint").to_str().unwrap();
        assert_eq!(hint, cluster.node(leader).endpoint(), "node {id}'s redirect");
        redirects += 1;
    }
    assert_eq!(redirects, 2, "two of three nodes do not lead the meta group");
}

/// Once node 4 is removed, its certificate (still signed by the peer CA:
/// nothing revokes it) reaches no peer call of the nodes that stay, not
/// even those that name no sender; node 4 started again on an empty data
/// dir under its old id stops at once, saying why, instead of asking on.
#[tokio::test]
async fn a_removed_node_s_certificate_reaches_no_peer_call() {
    let mut cluster = Cluster::start_tls(4, SHARDS).await;
    wait_placed(&cluster, &[1, 2, 3, 4], SHARDS).await;
    let admin = cluster.client(1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Drained first: the removal is refused until its replicas have moved.
    admin.drain_node(4).await.expect("drain node 4");
    while let Err(e) = admin.remove_node(4).await {
        assert!(std::time::Instant::now() < deadline, "node 4 was never removed: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    cluster.kill(4);

    let certs = cluster.certs();
    let peer = cluster.node(1).peer_endpoint();
    let node4 = Some(("node-4-peer.pem", "node-4-peer.key"));
    let mut as_node4 = peer_client(certs, &peer, node4).await.expect("the handshake still succeeds");
    let denied = |status: tonic::Status, call: &str| {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{call}: {status:?}");
        assert!(
            status.message().starts_with("the peer certificate names node 4: node 4 was removed"),
            "{call}: {status:?}"
        );
    };
    // Refused once node 1 has applied the removal (out of the map and of
    // the meta group), a moment after the call returned.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while as_node4.clock(ClockRequest { from: 4 }).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "node 1 still serves node 4's certificate");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    denied(as_node4.clock(ClockRequest { from: 4 }).await.expect_err("clock"), "Clock");
    denied(as_node4.status(ClusterStatusRequest {}).await.expect_err("status"), "Status");
    let claim = StartElectionRequest { leader_id: 4, term: 1, last_log_index: 0, dry_run: true, group: 0 };
    denied(as_node4.start_election(claim).await.expect_err("election"), "StartElection");
    // The nodes that stay are served as before.
    let node2 = Some(("node-2-peer.pem", "node-2-peer.key"));
    let mut as_node2 = peer_client(certs, &peer, node2).await.unwrap();
    as_node2.clock(ClockRequest { from: 2 }).await.expect("node 2 is served");

    // Node 4 on an empty data dir, joining under its removed id: the seed
    // refuses its certificate when it asks for the number of shards, and
    // it stops there.
    std::fs::remove_dir_all(cluster.node(4).data_dir()).unwrap();
    let seed = cluster.node(1).advertised();
    cluster.start_again_with(4, &["--join", &seed]);
    // Seen exited before it is reaped (the harness's crash check).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while cluster.node(4).is_running() {
        assert!(std::time::Instant::now() < deadline, "node 4 still runs:\n{}", cluster.node(4).log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let status = cluster.wait_exit(4, std::time::Duration::from_secs(1)).await;
    assert!(!status.success(), "{status}");
    let log = cluster.node(4).log();
    assert!(log.contains("cannot join the cluster: "), "{log}");
    assert!(log.contains(portrait_core::meta::RETIRED_ID), "{log}");
}
