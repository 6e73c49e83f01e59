//! TLS settings a node refuses to start with, each with one line naming
//! the flag and the file: an unreadable certificate, a key that is not the
//! certificate's, a peer certificate of another node, a peer CA that is
//! also the client CA, and plaintext on a
//! non-loopback address without `--insecure`. Certificates come from
//! `portrait certs init` (`portrait_client::certs`). TLS serving itself is
//! tested end to end in `cluster-tests/tests/cluster/tls.rs`.

#[allow(dead_code)] // these tests start no TestNode
use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

/// Runs `portraitd` with `args` in a fresh dir under `base` until it exits
/// (it must); returns its `portraitd: ...` line.
fn refusal(base: &Path, args: &[&str]) -> String {
    let dir = tempfile::tempdir_in(base).unwrap();
    let dir = dir.path();
    let ports = (common::free_port(), common::free_port());
    let mut child = common::portraitd(dir, ports, 1).args(args).spawn().expect("spawn portraitd");
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = || std::fs::read_to_string(dir.join("portraitd.log")).unwrap_or_default();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("portraitd started with {args:?}\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{}", log());
    let log = log();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("portraitd:")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    lines[0].to_string()
}

#[test]
fn bad_tls_settings_stop_the_start_naming_the_flag_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    portrait_client::certs::init(&certs, 2, &["127.0.0.1".to_string()], false).unwrap();
    let file = |name: &str| certs.join(name).to_str().unwrap().to_string();
    let missing = file("nope.pem");

    let line = refusal(dir.path(), &["--tls-cert", &missing, "--tls-key", &file("node-1.key")]);
    assert!(line.contains(&format!("--tls-cert {missing}: cannot read")), "{line}");

    let line = refusal(dir.path(), &["--tls-cert", &file("node-1.pem"), "--tls-key", &file("node-2.key")]);
    let expected =
        format!("--tls-key {}: not the key of --tls-cert {}", file("node-2.key"), file("node-1.pem"));
    assert!(line.contains(&expected), "{line}");

    let line = refusal(dir.path(), &["--tls-cert", &file("node-1.pem"), "--tls-key", &file("client-ca.pem")]);
    assert!(line.contains(&format!("--tls-key {}: not a PEM private key", file("client-ca.pem"))), "{line}");

    let same_ca = [
        "--tls-cert",
        &file("node-1.pem"),
        "--tls-key",
        &file("node-1.key"),
        "--tls-client-ca",
        &file("client-ca.pem"),
        "--peer-ca",
        &file("client-ca.pem"),
        "--peer-cert",
        &file("node-1-peer.pem"),
        "--peer-key",
        &file("node-1-peer.key"),
    ];
    let line = refusal(dir.path(), &same_ca);
    assert!(line.contains("the peer CA must be its own"), "{line}");

    // A client CA bundle (as for a rotation) that also holds the peer CA.
    let bundle = certs.join("client-and-peer-ca.pem");
    let pems = [std::fs::read(file("client-ca.pem")).unwrap(), std::fs::read(file("peer-ca.pem")).unwrap()];
    std::fs::write(&bundle, pems.concat()).unwrap();
    let mut in_bundle = same_ca.map(String::from);
    in_bundle[5] = bundle.to_str().unwrap().to_string();
    in_bundle[7] = file("peer-ca.pem");
    let line = refusal(dir.path(), &in_bundle.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(line.contains("a CA also in --tls-client-ca"), "{line}");

    // The helper starts node 1: node 2's peer certificate would get each
    // of its raft messages refused by its peers.
    let peer = |cert: &str, key: &str| {
        [
            "--peer-ca".to_string(),
            file("peer-ca.pem"),
            "--peer-cert".into(),
            file(cert),
            "--peer-key".into(),
            file(key),
        ]
    };
    let args = peer("node-2-peer.pem", "node-2-peer.key");
    let line = refusal(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        line.contains(&format!("--peer-cert {}: does not name portrait-node-1", file("node-2-peer.pem"))),
        "{line}"
    );

    let line =
        refusal(dir.path(), &["--peer-ca", &file("peer-ca.pem"), "--peer-cert", &file("node-1-peer.pem")]);
    assert!(line.contains("--peer-ca, --peer-cert and --peer-key go together"), "{line}");
}

#[test]
fn plaintext_beyond_loopback_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portraitd"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--listen",
            "0.0.0.0:7700",
            "--advertise",
            "http://n1:7700",
            "--peer-advertise",
            "http://n1:8700",
        ])
        .env_remove("PORTRAIT_CONFIG")
        .env_remove("PORTRAIT_INSECURE")
        .output()
        .expect("run portraitd");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("portraitd: --listen 0.0.0.0:7700: plaintext on an address other than loopback"),
        "{stderr}"
    );
    assert!(stderr.contains("--insecure"), "{stderr}");
}

/// A node dialing a peer it knows by id accepts only a certificate naming
/// that node: a holder of another node's key (a removed node's, say)
/// answering at the address is refused at the handshake. A seed dialed
/// before its id is known may be any node.
#[tokio::test]
async fn a_peer_answering_with_another_nodes_certificate_is_refused() {
    use portrait_server::tls::{peer_endpoint, set_peer_client, Tls, TlsFiles};
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    portrait_client::certs::init(&certs, 3, &["127.0.0.1".to_string()], false).unwrap();
    let peer = |id: u64| {
        let files = TlsFiles {
            peer_ca: Some(certs.join("peer-ca.pem")),
            peer_cert: Some(certs.join(format!("node-{id}-peer.pem"))),
            peer_key: Some(certs.join(format!("node-{id}-peer.key"))),
            ..TlsFiles::default()
        };
        Tls::load(&files, id).unwrap().peer.expect("peer TLS")
    };
    // Node 2's peer port (its health service is enough for a handshake).
    let port = common::free_port();
    let (_health, service) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder().tls_config(peer(2).server).unwrap().add_service(service);
    tokio::spawn(server.serve(format!("127.0.0.1:{port}").parse().unwrap()));
    set_peer_client(peer(1).client);
    let addr = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = peer_endpoint(&addr, Some(2)).unwrap().connect().await {
        assert!(Instant::now() < deadline, "node 2 never answered as node 2: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peer_endpoint(&addr, None).unwrap().connect().await.expect("a seed may be any node");
    let e = peer_endpoint(&addr, Some(3)).unwrap().connect().await.expect_err("node 2 taken for node 3");
    let chain = format!("{e:?}");
    assert!(chain.contains("NotValidForName"), "{chain}");
}
