//! Who may call what (docs/security.md): bearer tokens mapped to roles, and
//! one table that gives every RPC its access. Pure: no tonic, no I/O but
//! reading the token file.
//!
//! - A token is a random secret the client sends as `authorization: Bearer
//!   <token>`. The node keeps only its SHA-256 digest (a token file leaks no
//!   token) and compares digests in constant time, against every entry, so
//!   the time taken says nothing of which entry nearly matched. Tokens are
//!   256-bit random values, so a fast hash is enough: there is nothing to
//!   brute-force, unlike a password.
//! - Roles: `reader` (profiles, schema, cluster status and the map),
//!   `writer` (ingest), `admin` (schema changes, membership, clocks, fault
//!   injection). A token holds one or more roles; one does not imply
//!   another.
//! - [`RPCS`] lists every RPC the node serves with its [`Access`]; a path
//!   missing from it is refused (fail closed). A test walks the services of
//!   the proto descriptor and fails on any RPC without an entry.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a token may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Reader, Role::Writer, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
}

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health and reflection (probes and tools must work before
    /// they hold a token).
    Open,
    /// Other nodes of the cluster: raft, forwarding, joining. Served on
    /// the peer port only (`--peer-listen`), never on the client port, and
    /// not checked against tokens (docs/security.md, "Peer port").
    Peer,
    /// A token holding this role.
    Role(Role),
    /// Any token of the file, whatever its roles: the shard map, which a
    /// routing client fetches whether it reads or writes.
    AnyToken,
}

use Access::{Open, Peer};
const READER: Access = Access::Role(Role::Reader);
const WRITER: Access = Access::Role(Role::Writer);
const ADMIN: Access = Access::Role(Role::Admin);

/// Every RPC the node serves, by gRPC path, with who may call it.
pub const RPCS: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/Check", Open),
    ("/grpc.health.v1.Health/Watch", Open),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Open),
    ("/portrait.v1.Ingest/Write", WRITER),
    ("/portrait.v1.Ingest/WriteStream", WRITER),
    ("/portrait.v1.Profiles/GetProfile", READER),
    ("/portrait.v1.Profiles/BatchGetProfiles", READER),
    ("/portrait.v1.Admin/GetSchema", READER),
    ("/portrait.v1.Admin/ClusterStatus", READER),
    ("/portrait.v1.Admin/ShardMap", Access::AnyToken),
    ("/portrait.v1.Admin/Locate", Access::AnyToken),
    ("/portrait.v1.Admin/ApplySchema", ADMIN),
    ("/portrait.v1.Admin/BackupShard", ADMIN),
    ("/portrait.v1.Admin/RestoreShard", ADMIN),
    ("/portrait.v1.Admin/AddNode", ADMIN),
    ("/portrait.v1.Admin/RemoveNode", ADMIN),
    ("/portrait.v1.Admin/DrainNode", ADMIN),
    ("/portrait.v1.Admin/TransferLeader", ADMIN),
    ("/portrait.v1.Admin/SetPartition", ADMIN),
    ("/portrait.v1.Admin/ConfirmClock", ADMIN),
    ("/portrait.v1.Admin/SetClockOffset", ADMIN),
    ("/portrait.v1.Raft/AppendEntries", Peer),
    ("/portrait.v1.Raft/AppendEntriesBatch", Peer),
    ("/portrait.v1.Raft/Vote", Peer),
    ("/portrait.v1.Raft/InstallSnapshot", Peer),
    ("/portrait.v1.Raft/StartElection", Peer),
    ("/portrait.v1.Raft/Clock", Peer),
    ("/portrait.v1.Raft/ForwardWrite", Peer),
    ("/portrait.v1.Raft/ForwardWrites", Peer),
    ("/portrait.v1.Raft/ForwardRead", Peer),
    ("/portrait.v1.Raft/Status", Peer),
    ("/portrait.v1.Raft/Join", Peer),
    ("/portrait.v1.Raft/BalanceLeader", Peer),
    ("/portrait.v1.Raft/CheckSchema", Peer),
    ("/portrait.v1.Raft/ReadIndex", Peer),
];

/// The access of the RPC at `path` (`/package.Service/Method`), if it has
/// an entry.
pub fn access(path: &str) -> Option<Access> {
    RPCS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// One token of the token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Who holds it (logs and the audit trail name it; never the secret).
    pub name: String,
    digest: [u8; 32],
    pub roles: BTreeSet<Role>,
}

impl Token {
    /// The SHA-256 of the token's secret (what the token file holds).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
}

/// The tokens a node accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenBook {
    tokens: Vec<Token>,
}

/// Bounds of a token file: more would be a mistake, not a deployment.
pub const MAX_TOKEN_FILE_BYTES: u64 = 1 << 20;
pub const MAX_TOKENS: usize = 1000;
/// A presented token longer than this is refused before it is hashed.
pub const MAX_TOKEN_BYTES: usize = 512;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<FileToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    name: String,
    sha256: String,
    roles: Vec<Role>,
}

impl TokenBook {
    /// Reads a token file (TOML: `[[token]]` tables with `name`, `sha256`
    /// and `roles`); the error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<TokenBook, String> {
        use std::io::Read;
        let at = path.display();
        // Checked before the open too: opening a FIFO for reading blocks
        // until a writer comes, which would hang the start or, on SIGHUP,
        // every later reload. Checked again on the open file (the path may
        // have been replaced in between).
        let not_regular = || format!("token file {at}: not a regular file");
        if !std::fs::metadata(path).map_err(|e| format!("token file {at}: {e}"))?.is_file() {
            return Err(not_regular());
        }
        let file = std::fs::File::open(path).map_err(|e| format!("token file {at}: {e}"))?;
        if !file.metadata().map_err(|e| format!("token file {at}: {e}"))?.is_file() {
            return Err(not_regular());
        }
        // Bounded by what is read, not by the size the file had a moment
        // before: it may grow in between.
        let mut text = String::new();
        file.take(MAX_TOKEN_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("token file {at}: {e}"))?;
        if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
            return Err(format!("token file {at}: more than the {MAX_TOKEN_FILE_BYTES} bytes allowed"));
        }
        TokenBook::parse(&text).map_err(|e| format!("token file {at}: {e}"))
    }

    /// Parses a token file's text.
    pub fn parse(text: &str) -> Result<TokenBook, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            // Where: a file of a thousand entries is not searched by eye.
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {column}: ")
            });
            format!("{}{}", at.unwrap_or_default(), e.message())
        })?;
        if file.token.len() > MAX_TOKENS {
            return Err(format!("{} tokens, more than the {MAX_TOKENS} allowed", file.token.len()));
        }
        let mut names = BTreeSet::new();
        let mut digests = BTreeSet::new();
        let mut tokens = Vec::with_capacity(file.token.len());
        for (i, t) in file.token.into_iter().enumerate() {
            let which = format!("token {} ({})", i + 1, portrait_core::validate::shown(&t.name));
            if t.name.is_empty() || t.name.len() > 128 || t.name.chars().any(char::is_control) {
                return Err(format!("{which}: name must be 1 to 128 bytes of printable characters"));
            }
            if !names.insert(t.name.clone()) {
                return Err(format!("{which}: the name is used twice"));
            }
            let digest = parse_digest(&t.sha256).ok_or_else(|| {
                format!("{which}: sha256 must be 64 hex digits (the SHA-256 of the token, not the token)")
            })?;
            if digest == sha256("") {
                return Err(format!(
                    "{which}: sha256 is the SHA-256 of an empty token (was the variable piped to sha256sum \
                     unset?); an empty token is never accepted"
                ));
            }
            if !digests.insert(digest) {
                return Err(format!("{which}: the same token as an earlier entry"));
            }
            if t.roles.is_empty() {
                return Err(format!("{which}: roles is empty (reader, writer, admin)"));
            }
            tokens.push(Token { name: t.name, digest, roles: t.roles.into_iter().collect() });
        }
        Ok(TokenBook { tokens })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Each token's name and its roles' names (never a digest): what the
    /// audit trail of a reload compares.
    pub fn grants(&self) -> std::collections::BTreeMap<String, Vec<&'static str>> {
        self.tokens.iter().map(|t| (t.name.clone(), t.roles.iter().map(|r| r.name()).collect())).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The names in both books whose token (its digest) differs in
    /// `newer`: a replaced secret, which [`TokenBook::grants`] cannot show.
    pub fn secrets_changed(&self, newer: &TokenBook) -> Vec<String> {
        let mut names: Vec<String> = self
            .tokens
            .iter()
            .filter(|t| newer.tokens.iter().any(|n| n.name == t.name && n.digest != t.digest))
            .map(|t| t.name.clone())
            .collect();
        names.sort();
        names
    }

    /// The entry of `presented`, if any. Every entry is compared, each in
    /// constant time.
    pub fn find(&self, presented: &str) -> Option<&Token> {
        if presented.is_empty() || presented.len() > MAX_TOKEN_BYTES {
            return None;
        }
        self.find_digest(&sha256(presented))
    }

    fn find_digest(&self, digest: &[u8; 32]) -> Option<&Token> {
        let mut found = None;
        for t in &self.tokens {
            if equal_in_constant_time(&t.digest, digest) {
                found = Some(t);
            }
        }
        found
    }

    /// Whether the token whose SHA-256 is `digest` is (still) in the book
    /// with what the RPC at `path` needs: a call that runs on (a stream)
    /// is checked again after a reload.
    pub fn still_allows(&self, digest: &[u8; 32], path: &str) -> bool {
        match (access(path), self.find_digest(digest)) {
            (Some(Access::Role(role)), Some(token)) => token.roles.contains(&role),
            (Some(Access::AnyToken), Some(_)) => true,
            _ => false,
        }
    }

    /// Whether the caller presenting `authorization` (the header's value)
    /// may call the RPC at `path`; `Ok` names the token (`None` when the
    /// RPC needs none).
    pub fn check(&self, path: &str, authorization: Option<&str>) -> Result<Option<&Token>, Denied> {
        let required = match access(path) {
            None => return Err(Denied::Permission(format!("{path} has no access rule: refused"))),
            Some(Open) => return Ok(None),
            // Not served on the client port; refused should one ever be.
            Some(Peer) => return Err(Denied::Permission(format!("{path} is served to peers only"))),
            Some(Access::Role(role)) => Some(role),
            Some(Access::AnyToken) => None,
        };
        let Some(header) = authorization else {
            return Err(Denied::Unauthenticated(
                "no token: send `authorization: Bearer <token>` (portrait --token or PORTRAIT_TOKEN)".into(),
            ));
        };
        let Some(presented) = header.strip_prefix("Bearer ").map(str::trim) else {
            return Err(Denied::Unauthenticated("the authorization header is not `Bearer <token>`".into()));
        };
        let Some(token) = self.find(presented) else {
            return Err(Denied::Unauthenticated("unknown token".into()));
        };
        if let Some(required) = required.filter(|r| !token.roles.contains(r)) {
            return Err(Denied::Permission(format!(
                "token {:?} lacks the role {} that {path} needs",
                token.name,
                required.name()
            )));
        }
        Ok(Some(token))
    }
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or not one of ours: `UNAUTHENTICATED`.
    Unauthenticated(String),
    /// A known token without the role: `PERMISSION_DENIED`.
    Permission(String),
}

/// The SHA-256 of a token's bytes.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lowercase hex of a digest (what a token file holds).
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    // Hex digits only: `from_str_radix` would also take a leading `+`.
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Compares without an early exit, so the time does not depend on where
/// the digests differ.
fn equal_in_constant_time(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> TokenBook {
        let text = format!(
            "[[token]]\nname = \"recsys\"\nsha256 = \"{}\"\nroles = [\"reader\"]\n\n\
             [[token]]\nname = \"ops\"\nsha256 = \"{}\"\nroles = [\"reader\", \"admin\"]\n",
            hex(&sha256("read-secret")),
            hex(&sha256("ops-secret")).to_uppercase(),
        );
        TokenBook::parse(&text).expect("a valid token file")
    }

    #[test]
    fn every_rpc_has_one_entry() {
        let paths: BTreeSet<&str> = RPCS.iter().map(|(p, _)| *p).collect();
        assert_eq!(paths.len(), RPCS.len(), "an RPC listed twice");
        assert_eq!(access("/portrait.v1.Ingest/Write"), Some(Access::Role(Role::Writer)));
        assert_eq!(access("/portrait.v1.Ingest/Nope"), None);
    }

    #[test]
    fn a_token_is_found_by_its_digest_and_checked_for_the_role() {
        let book = book();
        assert_eq!(book.len(), 2);
        let get = "/portrait.v1.Profiles/GetProfile";
        let write = "/portrait.v1.Ingest/Write";
        let ok = book.check(get, Some("Bearer read-secret")).unwrap();
        assert_eq!(ok.map(|t| t.name.as_str()), Some("recsys"));
        assert!(
            matches!(book.check(write, Some("Bearer read-secret")), Err(Denied::Permission(m)) if m.contains("writer"))
        );
        assert!(matches!(book.check(write, None), Err(Denied::Unauthenticated(_))));
        assert!(
            matches!(book.check(get, Some("Bearer wrong")), Err(Denied::Unauthenticated(m)) if m == "unknown token")
        );
        assert!(matches!(book.check(get, Some("Basic read-secret")), Err(Denied::Unauthenticated(_))));
        let admin = book.check("/portrait.v1.Admin/AddNode", Some("Bearer ops-secret")).unwrap();
        assert_eq!(admin.map(|t| t.name.as_str()), Some("ops"), "uppercase hex digests are read too");
        assert_eq!(book.check("/grpc.health.v1.Health/Check", None), Ok(None));
        let peer_only = book.check("/portrait.v1.Raft/Vote", Some("Bearer ops-secret"));
        assert!(matches!(peer_only, Err(Denied::Permission(m)) if m.contains("served to peers only")));
        assert!(matches!(
            book.check("/portrait.v1.Admin/Unknown", Some("Bearer ops-secret")),
            Err(Denied::Permission(_))
        ));
        assert!(book.find(&"x".repeat(MAX_TOKEN_BYTES + 1)).is_none());
        // The shard map: any token (a writer's client routes too), never none.
        let map = "/portrait.v1.Admin/ShardMap";
        assert_eq!(book.check(map, Some("Bearer ops-secret")).unwrap().map(|t| t.name.as_str()), Some("ops"));
        assert!(matches!(book.check(map, None), Err(Denied::Unauthenticated(_))));
    }

    #[test]
    fn an_empty_token_is_never_accepted() {
        let entry =
            format!("[[token]]\nname = \"unset\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n", hex(&sha256("")));
        let e = TokenBook::parse(&entry).expect_err("the digest of an empty token");
        assert!(e.contains("token 1 (\"unset\")") && e.contains("empty token"), "{e}");
        let book = book();
        let get = "/portrait.v1.Profiles/GetProfile";
        for header in ["Bearer ", "Bearer    "] {
            let denied = book.check(get, Some(header));
            assert!(matches!(denied, Err(Denied::Unauthenticated(m)) if m == "unknown token"), "{header:?}");
        }
        assert!(book.find("").is_none());
    }

    #[test]
    fn a_bad_token_file_says_which_entry_and_why() {
        let entry = |name: &str, digest: &str, roles: &str| {
            format!("[[token]]\nname = \"{name}\"\nsha256 = \"{digest}\"\nroles = {roles}\n")
        };
        let d = hex(&sha256("a"));
        let cases = [
            (entry("a", "abc", "[\"reader\"]"), "64 hex digits"),
            (entry("a", &format!("+{}", &d[1..]), "[\"reader\"]"), "64 hex digits"),
            (entry("a", &d, "[]"), "roles is empty"),
            (entry("a", &d, "[\"root\"]"), "unknown variant"),
            (entry("a", &d, "[\"reader\"]") + &entry("a", &hex(&sha256("b")), "[\"reader\"]"), "used twice"),
            (entry("a", &d, "[\"reader\"]") + &entry("b", &d, "[\"admin\"]"), "same token"),
            (entry("", &d, "[\"reader\"]"), "1 to 128"),
            ("[[token]]\nname = \"a\"\n".to_string(), "missing field"),
            ("tokens = 1\n".to_string(), "unknown field"),
            // The entry's place in the file, and a long name cut short.
            (entry("a", &d, "[\"reader\"]") + "[[token]]\nname = \"b\"\n", "line 5, column 1: missing field"),
            (entry(&"é".repeat(65), &d, "[\"reader\"]"), "1 to 128 bytes"),
            (entry(&"x".repeat(100_000), &d, "[\"reader\"]"), "(100000 bytes)"),
        ];
        for (text, wanted) in cases {
            let err = TokenBook::parse(&text).expect_err(&text);
            assert!(err.contains(wanted), "{text:?}: {err}");
            assert!(err.len() < 400, "an error repeats no long name whole: {} bytes", err.len());
        }
        assert_eq!(TokenBook::parse("").unwrap().len(), 0);
        // Bounded by the bytes read; a directory (or a pipe) is not a file.
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "#".repeat(MAX_TOKEN_FILE_BYTES as usize + 1)).unwrap();
        assert!(TokenBook::load(&big).unwrap_err().contains("more than the 1048576 bytes allowed"));
        assert!(TokenBook::load(dir.path()).unwrap_err().contains("not a regular file"));
    }

    #[test]
    fn digests_compare_equal_only_when_equal() {
        let a = sha256("a");
        let mut b = a;
        assert!(equal_in_constant_time(&a, &b));
        b[31] ^= 1;
        assert!(!equal_in_constant_time(&a, &b));
        assert_eq!(hex(&sha256("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
