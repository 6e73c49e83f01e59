//! Certificates for `portrait certs init` (and the TLS tests): a development CA pair and certificates for a
//! cluster, with rcgen (ECDSA P-256). Two CAs, so that a client certificate
//! can never reach a peer port: the client CA signs each node's client-port
//! certificate (and one client certificate), the peer CA each node's peer
//! certificate, which names `portrait-node-<id>` and `portrait-peer`
//! (docs/security.md).
//!
//! Files (keys are written mode 0600; nothing is overwritten without
//! `--force`): `client-ca.pem`, `peer-ca.pem` (and their keys, kept for
//! issuing more), `node-<id>.pem`/`.key` (client port), `node-<id>-peer.pem`
//! /`.key` (peer port), `client.pem`/`.key`.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The names a node's peer certificate carries (as the server checks them).
fn peer_names(id: u64) -> Vec<String> {
    vec![format!("portrait-node-{id}"), "portrait-peer".to_string()]
}

struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> anyhow::Result<Ca> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    let key_pem = key.serialize_pem();
    Ok(Ca { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key) })
}

/// A leaf certificate for `names` (DNS names or IP addresses) and its key.
fn leaf(
    ca: &Ca,
    common_name: &str,
    names: Vec<String>,
    usages: &[ExtendedKeyUsagePurpose],
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(names).context("a name is neither a DNS name nor an IP address")?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages.to_vec();
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes every file under `dir`: the CAs, and for nodes 1 to `nodes` a
/// client-port certificate for `hosts` and a peer certificate; returns a
/// line to print.
pub fn init(dir: &Path, nodes: u32, hosts: &[String], force: bool) -> anyhow::Result<String> {
    if hosts.is_empty() {
        anyhow::bail!("--hosts: at least one name or address clients connect to");
    }
    let mut files: Vec<(String, String, bool)> = Vec::new(); // (name, contents, secret)
    let client_ca = ca("Portrait client CA (development)")?;
    let peer_ca = ca("Portrait peer CA (development)")?;
    files.push(("client-ca.pem".into(), client_ca.cert_pem.clone(), false));
    files.push(("client-ca.key".into(), client_ca.key_pem.clone(), true));
    files.push(("peer-ca.pem".into(), peer_ca.cert_pem.clone(), false));
    files.push(("peer-ca.key".into(), peer_ca.key_pem.clone(), true));
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    for id in 1..=u64::from(nodes) {
        let (cert, key) = leaf(&client_ca, &format!("portrait node {id}"), hosts.to_vec(), &[ServerAuth])?;
        files.push((format!("node-{id}.pem"), cert, false));
        files.push((format!("node-{id}.key"), key, true));
        let (cert, key) =
            leaf(&peer_ca, &format!("portrait-node-{id}"), peer_names(id), &[ServerAuth, ClientAuth])?;
        files.push((format!("node-{id}-peer.pem"), cert, false));
        files.push((format!("node-{id}-peer.key"), key, true));
    }
    let (cert, key) = leaf(&client_ca, "portrait client", vec!["portrait-client".into()], &[ClientAuth])?;
    files.push(("client.pem".into(), cert, false));
    files.push(("client.key".into(), key, true));

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !force {
        if let Some((name, _, _)) = files.iter().find(|(name, _, _)| dir.join(name).exists()) {
            anyhow::bail!("{} exists; nothing was written (--force overwrites)", dir.join(name).display());
        }
    }
    for (name, contents, secret) in &files {
        write(&dir.join(name), contents, *secret)?;
    }
    Ok(format!(
        "wrote {} files to {} for nodes 1-{nodes} (client port names: {}); development use only\n",
        files.len(),
        dir.display(),
        hosts.join(", ")
    ))
}

/// Writes `contents` to a new file beside `path` (mode 0600 for a
/// `secret`, else 0644, from its creation on), syncs it, and renames it
/// over `path`: an overwritten key is replaced, never rewritten in place, so
/// a process holding the old file open (it may have been readable by more
/// users) never sees the new key, and a symlink at `path` is replaced, not
/// followed.
fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_two_cas_and_each_nodes_certificates_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let out = init(dir.path(), 2, &hosts, false).unwrap();
        assert!(out.starts_with("wrote 14 files"), "{out}");
        for name in ["client-ca.pem", "peer-ca.pem", "node-1.pem", "node-2-peer.key", "client.key"] {
            assert!(dir.path().join(name).exists(), "{name}");
        }
        let pem = std::fs::read_to_string(dir.path().join("node-1-peer.pem")).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node-1.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let before = std::fs::read(dir.path().join("peer-ca.pem")).unwrap();
        let err = init(dir.path(), 2, &hosts, false).unwrap_err().to_string();
        assert!(err.ends_with("exists; nothing was written (--force overwrites)"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("peer-ca.pem")).unwrap(), before);
        // --force replaces each file: a key that was readable by others,
        // held open by some process, never receives the new key.
        let key = dir.path().join("node-1.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let old_key = std::fs::read(&key).unwrap();
        let mut held = std::fs::File::open(&key).unwrap();
        init(dir.path(), 2, &hosts, true).unwrap();
        assert_ne!(std::fs::read(dir.path().join("peer-ca.pem")).unwrap(), before);
        let mut seen = Vec::new();
        std::io::Read::read_to_end(&mut held, &mut seen).unwrap();
        assert_eq!(seen, old_key, "the open handle still reads the old key");
        assert_ne!(std::fs::read(&key).unwrap(), old_key);
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
