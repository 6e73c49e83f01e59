//! TLS for the two ports (docs/security.md, "TLS").
//!
//! - **Client port**: the node's certificate and key (`--tls-cert`,
//!   `--tls-key`); with `--tls-client-ca`, clients must also present a
//!   certificate from that CA (tokens still decide what they may call).
//! - **Peer port**: mutual TLS with the cluster's peer CA (`--peer-ca`,
//!   `--peer-cert`, `--peer-key`), which must differ from the client CA.
//!   The node serves with its node certificate and requires one from the
//!   peer CA of every caller; it calls other nodes with the same
//!   certificate and accepts only a peer CA certificate back, for the name
//!   [`PEER_NAME`]. Each node certificate also names its node
//!   ([`node_name`]); a raft message claiming to come from node N is
//!   accepted only over a connection whose certificate names node N, and
//!   no peer call at all from a certificate that names a removed node
//!   ([`check_peer`]).
//!
//! Every file is read and checked at start: unreadable, not PEM, or a key
//! that does not match its certificate stops the start with one line naming
//! the flag and the file. Certificates are not re-read while running:
//! rotation is a rolling restart (docs/security.md, "Rotating certificates").

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::types::NodeId;

/// How long a TLS handshake may take before the connection is dropped
/// (idle connections to a public port must not pile up).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The DNS name every node certificate carries; peers verify each other's
/// server certificate against it.
pub const PEER_NAME: &str = "portrait-peer";

/// The DNS name that identifies node `id` in its node certificate.
pub fn node_name(id: NodeId) -> String {
    format!("portrait-node-{id}")
}

/// The TLS files a node was given (all optional; see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub peer_ca: Option<PathBuf>,
    pub peer_cert: Option<PathBuf>,
    pub peer_key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether the client port serves TLS.
    pub fn client_tls(&self) -> bool {
        self.cert.is_some()
    }

    /// Whether the peer port uses mutual TLS.
    pub fn peer_tls(&self) -> bool {
        self.peer_cert.is_some()
    }

    /// Flags given without the ones they need.
    pub fn check_complete(&self) -> anyhow::Result<()> {
        let given = |p: &Option<PathBuf>| p.is_some();
        if given(&self.cert) != given(&self.key) {
            anyhow::bail!("--tls-cert and --tls-key go together: give both or neither");
        }
        if given(&self.client_ca) && !given(&self.cert) {
            anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)");
        }
        let peer = [&self.peer_ca, &self.peer_cert, &self.peer_key];
        if peer.iter().any(|p| given(p)) && !peer.iter().all(|p| given(p)) {
            anyhow::bail!("--peer-ca, --peer-cert and --peer-key go together: give all three or none");
        }
        Ok(())
    }
}

/// What the servers and the node's peer connections use, loaded and
/// checked.
#[derive(Clone, Default)]
pub struct Tls {
    /// The client port's server config (`None`: plaintext).
    pub client: Option<ServerTlsConfig>,
    /// The peer port's configs (`None`: plaintext).
    pub peer: Option<PeerTls>,
}

/// Mutual TLS between nodes.
#[derive(Clone)]
pub struct PeerTls {
    /// Serving the peer port: the node certificate, callers need one.
    pub server: ServerTlsConfig,
    /// Calling another node's peer port.
    pub client: ClientTlsConfig,
}

impl Tls {
    /// Reads and checks every file given; node `node`'s peer certificate
    /// must name it and [`PEER_NAME`] (else its peers would refuse it).
    pub fn load(files: &TlsFiles, node: NodeId) -> anyhow::Result<Tls> {
        files.check_complete()?;
        let mut tls = Tls::default();
        let client_ca = files.client_ca.as_ref().map(|ca| ca_cert("--tls-client-ca", ca)).transpose()?;
        if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
            let (identity, _) = identity(("--tls-cert", cert), ("--tls-key", key))?;
            let mut server = ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT);
            if let Some((ca_pem, _)) = &client_ca {
                server = server.client_ca_root(ca_pem.clone());
            }
            tls.client = Some(server);
        }
        if let (Some(ca), Some(cert), Some(key)) = (&files.peer_ca, &files.peer_cert, &files.peer_key) {
            let (ca_pem, ca_ders) = ca_cert("--peer-ca", ca)?;
            if let (Some(client_ca), Some((_, client_ders))) = (&files.client_ca, &client_ca) {
                // Every certificate of both files: a bundle (CA rotation)
                // holding the other port's CA trusts it as well.
                if client_ders.iter().any(|c| ca_ders.contains(c)) {
                    anyhow::bail!(
                        "--peer-ca {}: a CA also in --tls-client-ca {} (the same CA, or a bundle holding \
                         it); the peer CA must be its own, so a client certificate can never reach the peer \
                         port",
                        ca.display(),
                        client_ca.display()
                    );
                }
            }
            let (identity, leaf) = identity(("--peer-cert", cert), ("--peer-key", key))?;
            for (name, who) in
                [(node_name(node), format!("node {node}")), (PEER_NAME.to_string(), "every node".into())]
            {
                if !names(&leaf, &name) {
                    anyhow::bail!(
                        "--peer-cert {}: does not name {name}, which {who}'s peer certificate must (portrait \
                         certs init makes node-<id>-peer.pem for each node)",
                        cert.display()
                    );
                }
            }
            let server = ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca_pem.clone())
                .timeout(HANDSHAKE_TIMEOUT);
            let client =
                ClientTlsConfig::new().ca_certificate(ca_pem).identity(identity).domain_name(PEER_NAME);
            tls.peer = Some(PeerTls { server, client });
        }
        Ok(tls)
    }
}

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{flag} {}: cannot read: {e}", path.display()))
}

fn certificates(flag: &str, path: &Path, pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {}: not a PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{flag} {}: no PEM certificate in the file", path.display());
    }
    Ok(certs)
}

/// A certificate and its key, checked to belong together, with the leaf
/// certificate.
fn identity(
    (cert_flag, cert): (&str, &Path),
    (key_flag, key): (&str, &Path),
) -> anyhow::Result<(Identity, CertificateDer<'static>)> {
    let cert_pem = read(cert_flag, cert)?;
    let key_pem = read(key_flag, key)?;
    let chain = certificates(cert_flag, cert, &cert_pem)?;
    let leaf = chain[0].clone();
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("{key_flag} {}: not a PEM private key: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
        anyhow::anyhow!("{key_flag} {}: not the key of {cert_flag} {} ({e})", key.display(), cert.display())
    })?;
    Ok((Identity::from_pem(cert_pem, key_pem), leaf))
}

/// A CA certificate file, as tonic takes it and as its first DER.
fn ca_cert(flag: &str, path: &Path) -> anyhow::Result<(Certificate, Vec<CertificateDer<'static>>)> {
    let pem = read(flag, path)?;
    let all = certificates(flag, path, &pem)?;
    Ok((Certificate::from_pem(pem), all))
}

/// With peer TLS on: whether the caller's certificate (the first of
/// `certs`, which the handshake already checked against the peer CA) may
/// make a peer call. It must name node `claimed` when the call claims a
/// sender, be a node certificate (name [`PEER_NAME`]), and name no node of
/// `gone` (removed and out of the cluster: `Node::gone_ids`): a removed
/// node's key reaches no peer call. `Err` says why not, for
/// PERMISSION_DENIED.
pub fn check_peer(
    certs: Option<&[CertificateDer<'static>]>,
    claimed: Option<NodeId>,
    gone: &std::collections::BTreeSet<NodeId>,
) -> Result<(), String> {
    let Some(first) = certs.and_then(|c| c.first()) else {
        return Err("no peer certificate".into());
    };
    // Parsed once for every name checked (no signature is verified here).
    let Ok(cert) = webpki::EndEntityCert::try_from(first) else {
        return Err("the peer certificate cannot be read".into());
    };
    let has = |name: String| {
        ServerName::try_from(name).is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    };
    if let Some(claimed) = claimed {
        if !has(node_name(claimed)) {
            return Err(format!(
                "the peer certificate does not name node {claimed} ({})",
                node_name(claimed)
            ));
        }
    }
    if !has(PEER_NAME.to_string()) {
        return Err(format!("the peer certificate does not name {PEER_NAME}: not a node certificate"));
    }
    match gone.iter().find(|id| has(node_name(**id))) {
        Some(id) => {
            Err(format!("the peer certificate names node {id}: {}", portrait_core::meta::retired(*id)))
        }
        None => Ok(()),
    }
}

/// Whether `cert` is valid for the DNS name `name` (in its subject
/// alternative names); an unreadable certificate names nothing.
fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else { return false };
    let Ok(name) = ServerName::try_from(name.to_string()) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The TLS this process calls other nodes' peer ports with, set once at
/// start by `portraitd` (a process is one node; nodes built in tests
/// without it call in plaintext).
static PEER_CLIENT: std::sync::OnceLock<ClientTlsConfig> = std::sync::OnceLock::new();

/// Makes every later [`peer_endpoint`] use `config`. Only the first call
/// counts.
pub fn set_peer_client(config: ClientTlsConfig) {
    let _ = PEER_CLIENT.set(config);
}

/// How often an HTTP/2 ping checks a connection to a peer, and how long
/// its answer may take.
pub const PEER_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// See [`PEER_PING_INTERVAL`]: long enough that a peer whose runtime is
/// busy for a while (a large snapshot install) keeps its connection.
pub const PEER_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// An endpoint for another node's peer port at `addr`: with mutual TLS
/// when the process has it ([`set_peer_client`]), `addr` then dialed as
/// `https://` whatever its scheme (never in plaintext). With `node`, the
/// peer's certificate must name that node ([`node_name`]): a holder of
/// another node's key (a removed node's, say) answering at its address is
/// refused at the handshake. Without (a seed whose id is not known yet),
/// any node certificate ([`PEER_NAME`]) is accepted.
pub fn peer_endpoint(
    addr: &str,
    node: Option<NodeId>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let tls = PEER_CLIENT.get();
    let endpoint =
        tonic::transport::Endpoint::from_shared(portrait_proto::addr::dial_uri(addr, tls.is_some()))?
            // A connection whose packets are dropped silently (a partition
            // healed behind a stale NAT entry, a peer that lost power) is
            // found dead within 30 s and dialed again, instead of after
            // TCP's retransmission timeouts (minutes).
            .http2_keep_alive_interval(PEER_PING_INTERVAL)
            .keep_alive_timeout(PEER_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(PEER_PING_INTERVAL));
    match (tls, node) {
        (Some(config), Some(node)) => endpoint.tls_config(config.clone().domain_name(node_name(node))),
        (Some(config), None) => endpoint.tls_config(config.clone()),
        (None, _) => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_flags_are_named() {
        let path = || Some(PathBuf::from("x.pem"));
        let only_cert = TlsFiles { cert: path(), ..TlsFiles::default() };
        assert!(only_cert.check_complete().unwrap_err().to_string().contains("--tls-cert and --tls-key"));
        let ca_alone = TlsFiles { client_ca: path(), ..TlsFiles::default() };
        assert!(ca_alone.check_complete().unwrap_err().to_string().contains("--tls-client-ca needs"));
        let two_of_three = TlsFiles { peer_ca: path(), peer_cert: path(), ..TlsFiles::default() };
        assert!(two_of_three.check_complete().unwrap_err().to_string().contains("all three"));
        assert!(TlsFiles::default().check_complete().is_ok());
    }

    /// The check every raft message, StartElection and Join passes with
    /// mutual TLS on, on certificates from `portrait certs init`.
    #[test]
    fn a_sender_is_the_node_its_certificate_names() {
        let dir = tempfile::tempdir().unwrap();
        portrait_client::certs::init(dir.path(), 3, &["127.0.0.1".to_string()], false).unwrap();
        let der = |name: &str| {
            let pem = std::fs::read(dir.path().join(name)).unwrap();
            CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap()
        };
        let none = std::collections::BTreeSet::new();
        let node2 = [der("node-2-peer.pem")];
        assert_eq!(check_peer(Some(&node2), Some(2), &none), Ok(()));
        assert_eq!(check_peer(Some(&node2), None, &none), Ok(()));
        assert_eq!(
            check_peer(Some(&node2), Some(3), &none),
            Err("the peer certificate does not name node 3 (portrait-node-3)".into())
        );
        assert_eq!(check_peer(None, Some(2), &none), Err("no peer certificate".into()));
        assert_eq!(check_peer(Some(&[]), None, &none), Err("no peer certificate".into()));
        // A client-port certificate names hosts, not nodes.
        assert!(check_peer(Some(&[der("node-2.pem")]), Some(2), &none).is_err());
        assert_eq!(
            check_peer(Some(&[der("node-2.pem")]), None, &none),
            Err("the peer certificate does not name portrait-peer: not a node certificate".into())
        );
        // A removed node's certificate reaches nothing, with a claim or
        // without; the other nodes' still do.
        let retired = std::collections::BTreeSet::from([2, 9]);
        for claimed in [Some(2), None] {
            let err = check_peer(Some(&node2), claimed, &retired).unwrap_err();
            assert!(err.starts_with("the peer certificate names node 2: node 2 was removed"), "{err}");
            assert!(err.contains(portrait_core::meta::RETIRED_ID), "{err}");
        }
        assert_eq!(check_peer(Some(&[der("node-3-peer.pem")]), Some(3), &retired), Ok(()));
    }

    #[test]
    fn a_peer_certificate_must_name_its_node() {
        let dir = tempfile::tempdir().unwrap();
        portrait_client::certs::init(dir.path(), 2, &["127.0.0.1".to_string()], false).unwrap();
        let path = |name: &str| Some(dir.path().join(name));
        let files = |cert: &str, key: &str| TlsFiles {
            peer_ca: path("peer-ca.pem"),
            peer_cert: path(cert),
            peer_key: path(key),
            ..TlsFiles::default()
        };
        assert!(Tls::load(&files("node-2-peer.pem", "node-2-peer.key"), 2).unwrap().peer.is_some());
        let err = Tls::load(&files("node-2-peer.pem", "node-2-peer.key"), 1).err().unwrap().to_string();
        assert!(err.contains("does not name portrait-node-1"), "{err}");
        // A client-port certificate carries neither node names nor portrait-peer.
        let err = Tls::load(&files("node-1.pem", "node-1.key"), 1).err().unwrap().to_string();
        assert!(err.contains("does not name portrait-node-1"), "{err}");
    }
}
