//! Which node the client talks to: the seed endpoint it was created with and,
//! once a follower has named one, the leader.
//!
//! The state is shared by every clone of a client, so one redirect serves all
//! later calls. Moves are conditional on the endpoint a call actually used, so
//! concurrent calls that fail together move the client once, not once each.
//! The router also keeps the newest map epoch answers have carried (see
//! [`crate::routing`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::routing::{Seen, CLUSTER_ID_HEADER, MAP_EPOCH_HEADER};
use crate::ClientError;

/// How long a connection may take to open.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// While a call is open, the connection is pinged this often, and closed
/// (failing its calls with `UNAVAILABLE`) when a ping is not answered
/// within [`PING_TIMEOUT`]: a node that vanished (power loss, a dropped
/// link) does not hold a call forever. Calls have no deadline of their
/// own: a restore or a backup stream may rightly take hours.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// See [`PING_INTERVAL`].
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on every connection (idle ones included).
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Longest token accepted (the server refuses longer ones too).
pub const MAX_TOKEN_BYTES: usize = 512;

/// How a client presents itself to the nodes: its bearer token (see
/// docs/security.md). The default sends no token, which a node without a
/// token file accepts.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// `Bearer <token>`, checked once here.
    authorization: Option<MetadataValue<Ascii>>,
    /// TLS (`None`: plaintext); with it, `http://` endpoints are reached
    /// over `https://`.
    tls: Option<ClientTlsConfig>,
    /// How long a call keeps retrying (`None`: [`crate::retry::RETRY_BUDGET`]).
    retry_budget: Option<Duration>,
    /// See [`ConnectOptions::deadline`].
    deadline: Option<Duration>,
    /// See [`ConnectOptions::warn_plaintext_token`].
    warn_plaintext: bool,
}

/// Never shows the token.
impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("retry_budget", &self.retry_budget())
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl ConnectOptions {
    /// No token.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long one call keeps retrying an `UNAVAILABLE` or a lost
    /// connection (redirects, backoff; see `retry.rs`), counted from its
    /// first attempt; at least one attempt is always made. The default,
    /// [`crate::retry::RETRY_BUDGET`], outlasts a shard's failover after
    /// its leader's node dies; a caller with a tighter deadline (a request
    /// path with a fallback) sets less and handles `UNAVAILABLE` itself.
    pub fn retry_for(mut self, budget: Duration) -> Self {
        self.retry_budget = Some(budget);
        self
    }

    /// See [`ConnectOptions::retry_for`].
    pub fn retry_budget(&self) -> Duration {
        self.retry_budget.unwrap_or(crate::retry::RETRY_BUDGET)
    }

    /// The longest a write or profile read (`write`, `get_profile`,
    /// `batch_get_profiles`) takes, attempts, retries and the shard map's
    /// fetch included: past it the call fails with `DEADLINE_EXCEEDED`
    /// (for a write: its outcome unknown; resent with the same
    /// `event_id`s it applies once). For callers with a request path of
    /// their own to answer in time (a recommendation or coupon service
    /// with a fallback). The default is none: the retry budget bounds the
    /// retries, and a node's own timeouts each attempt. Streams and admin
    /// calls (a backup may rightly take hours) have none.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// See [`ConnectOptions::deadline`].
    pub fn call_deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// Prints a warning to stderr, once per endpoint, for every node the
    /// token is about to be sent to in plaintext beyond loopback
    /// ([`plaintext_token_warning`]): the seed, and each node the shard map
    /// or a redirect sends calls to (the `portrait` CLI's).
    pub fn warn_plaintext_token(mut self) -> Self {
        self.warn_plaintext = true;
        self
    }

    /// Sends `token` as `authorization: Bearer <token>` on every call.
    /// Refused when empty, longer than [`MAX_TOKEN_BYTES`], or not visible
    /// ASCII (surrounding whitespace, e.g. a file's newline, is dropped).
    pub fn token(mut self, token: &str) -> Result<Self, ClientError> {
        let token = token.trim();
        let invalid = |reason: &str| ClientError::Config(format!("token: {reason}"));
        if token.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid(&format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("must be visible ASCII characters only"));
        }
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {token}").parse().map_err(|_| invalid("not a valid header value"))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// Connects over TLS, trusting nodes whose certificate this CA (PEM)
    /// signed. The host of each endpoint must be a name in the node's
    /// certificate.
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_else(|| ClientTlsConfig::new().assume_http2(true));
        self.tls = Some(tls.ca_certificate(Certificate::from_pem(pem)));
        self
    }

    /// Presents this certificate and key (PEM), for nodes that require
    /// client certificates (`--tls-client-ca`). Implies TLS.
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_else(|| ClientTlsConfig::new().assume_http2(true));
        self.tls = Some(tls.identity(Identity::from_pem(cert_pem, key_pem)));
        self
    }
}

/// Adds the client's `authorization` header to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that carries the client's token.
pub(crate) type Chan = InterceptedService<Channel, Bearer>;

/// One endpoint and its channel (cheap to clone).
#[derive(Clone)]
pub(crate) struct Conn {
    pub endpoint: String,
    pub channel: Chan,
}

struct Targets {
    seed: Conn,
    leader: Option<Conn>,
    on_leader: bool,
    /// The endpoints of the nodes the shard map names, in node id order
    /// (see [`Router::know_nodes`]).
    nodes: Vec<String>,
}

impl Targets {
    fn current(&self) -> &Conn {
        match (&self.leader, self.on_leader) {
            (Some(leader), true) => leader,
            _ => &self.seed,
        }
    }

    /// The endpoint to try after `failed` (`None`: there is no other), in
    /// the ring of the map's nodes (in node id order) and then a known
    /// leader the map does not name, so that every node is tried in turn.
    /// A seed that is no node of the map (a load balancer's address, or no
    /// map yet) takes every other turn: after another node, the seed; after
    /// the seed, the node after the last other one used.
    fn next_after(&self, failed: &str) -> Option<String> {
        let seed = self.seed.endpoint.as_str();
        let last = self.leader.as_ref().map(|l| l.endpoint.as_str());
        let mut ring: Vec<&str> = Vec::new();
        for node in self.nodes.iter().map(String::as_str).chain(last) {
            if !ring.contains(&node) {
                ring.push(node);
            }
        }
        if !ring.contains(&seed) {
            if failed != seed {
                return Some(seed.to_string());
            }
            let next = match last.and_then(|l| ring.iter().position(|e| *e == l)) {
                Some(at) => ring[(at + 1) % ring.len()],
                None => *ring.first()?,
            };
            return Some(next.to_string());
        }
        let at = ring.iter().position(|e| *e == failed).unwrap_or(0);
        (1..ring.len()).map(|step| ring[(at + step) % ring.len()]).find(|e| *e != failed).map(str::to_string)
    }
}

/// The shared, switchable connection of a client.
#[derive(Clone)]
pub(crate) struct Router {
    targets: Arc<Mutex<Targets>>,
    /// The cluster (`x-portrait-cluster-id`) and the largest map epoch
    /// within it (`x-portrait-map-epoch`) answers carried.
    seen: Arc<Mutex<Seen>>,
    options: Arc<ConnectOptions>,
}

impl Router {
    /// Connects eagerly to `endpoint`, so a wrong address fails here.
    pub async fn connect(endpoint: &str, options: ConnectOptions) -> Result<Self, ClientError> {
        let endpoint = normalize_endpoint(endpoint);
        let channel = configure(&endpoint, &options)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect { endpoint: endpoint.clone(), source })?;
        let channel = InterceptedService::new(channel, Bearer(options.authorization.clone()));
        Ok(Self::new(Conn { endpoint, channel }, options))
    }

    pub(crate) fn new(seed: Conn, options: ConnectOptions) -> Self {
        let targets = Targets { seed, leader: None, on_leader: false, nodes: Vec::new() };
        Self { targets: Arc::new(Mutex::new(targets)), seen: Arc::default(), options: Arc::new(options) }
    }

    /// How new connections are made.
    pub fn options(&self) -> &ConnectOptions {
        &self.options
    }

    /// The endpoint the client was created with.
    pub fn seed(&self) -> Conn {
        self.lock().seed.clone()
    }

    /// Notes the map epoch and cluster an answer (or error) carries.
    pub fn note_epoch(&self, metadata: &MetadataMap) {
        let epoch = metadata.get(MAP_EPOCH_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
        let cluster =
            metadata.get(CLUSTER_ID_HEADER).and_then(|v| u64::from_str_radix(v.to_str().ok()?, 16).ok());
        if let Some(epoch) = epoch {
            let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *seen = seen.note(cluster.unwrap_or(0), epoch);
        }
    }

    /// The newest map answers told of.
    pub fn seen(&self) -> Seen {
        *self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection new calls should use.
    pub fn current(&self) -> Conn {
        self.lock().current().clone()
    }

    /// Switches to the leader a follower named (connecting lazily). Returns
    /// false when the hint is the endpoint that just failed, i.e. no move.
    pub fn follow(&self, hint: &str, failed: &str) -> Result<bool, ClientError> {
        let hint = normalize_endpoint(hint);
        if hint == failed {
            return Ok(false);
        }
        let mut targets = self.lock();
        if hint == targets.seed.endpoint {
            targets.on_leader = false;
        } else {
            if targets.leader.as_ref().is_none_or(|l| l.endpoint != hint) {
                let channel = lazy_channel(&hint, &self.options)?;
                targets.leader = Some(Conn { endpoint: hint, channel });
            }
            targets.on_leader = true;
        }
        Ok(true)
    }

    /// After `failed` was unreachable or had no leader to name: moves on
    /// (see `Targets::next_after`) between the seed and, in turn, the
    /// nodes the shard map names (any node serves any call), so a dead
    /// seed is left for a live node. Without a map: between the seed and
    /// the last known leader, if there is one.
    pub fn avoid(&self, failed: &str) {
        let mut targets = self.lock();
        if targets.current().endpoint != failed {
            return;
        }
        let Some(next) = targets.next_after(failed) else { return };
        if next == targets.seed.endpoint {
            targets.on_leader = false;
            return;
        }
        if targets.leader.as_ref().is_none_or(|l| l.endpoint != next) {
            // An endpoint the map names that makes no channel: stay.
            let Ok(channel) = lazy_channel(&next, &self.options) else { return };
            targets.leader = Some(Conn { endpoint: next, channel });
        }
        targets.on_leader = true;
    }

    /// The endpoints of the nodes of the shard map last taken, for
    /// [`Router::avoid`] to move on to.
    pub fn know_nodes(&self, endpoints: Vec<String>) {
        self.lock().nodes = endpoints;
    }

    fn lock(&self) -> MutexGuard<'_, Targets> {
        // The state is always consistent, so a panic elsewhere cannot poison it.
        self.targets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `host:port` → `http://host:port`; URLs with a scheme are kept as given
/// (without a trailing slash).
pub fn normalize_endpoint(endpoint: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// A channel to `endpoint` that connects on first use.
pub(crate) fn lazy_channel(endpoint: &str, options: &ConnectOptions) -> Result<Chan, ClientError> {
    let channel = configure(endpoint, options)?.connect_lazy();
    Ok(InterceptedService::new(channel, Bearer(options.authorization.clone())))
}

fn configure(endpoint: &str, options: &ConnectOptions) -> Result<Endpoint, ClientError> {
    if options.warn_plaintext && options.authorization.is_some() && options.tls.is_none() {
        if let Some(warning) = plaintext_token_warning(endpoint) {
            static WARNED: Mutex<std::collections::BTreeSet<String>> =
                Mutex::new(std::collections::BTreeSet::new());
            if WARNED.lock().unwrap_or_else(|p| p.into_inner()).insert(normalize_endpoint(endpoint)) {
                eprintln!("{warning}");
            }
        }
    }
    let connect_error = |source| ClientError::Connect { endpoint: endpoint.to_string(), source };
    // With TLS, `https://` whatever the scheme given: tonic dials any other
    // scheme in plaintext, bearer token included.
    let uri = portrait_proto::addr::dial_uri(endpoint, options.tls.is_some());
    let mut configured = Endpoint::from_shared(uri)
        .map_err(connect_error)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .http2_keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(false);
    if let Some(tls) = &options.tls {
        configured = configured.tls_config(tls.clone()).map_err(connect_error)?;
    }
    Ok(configured)
}

/// A warning for a token sent in plaintext (an endpoint not `https://`,
/// with no TLS configured) to a host other than loopback: anyone on the
/// path could read it. `None` for loopback and `https://`.
pub fn plaintext_token_warning(endpoint: &str) -> Option<String> {
    let normalized = normalize_endpoint(endpoint);
    if normalized.starts_with("https://") {
        return None;
    }
    let rest = normalized.split_once("://").map_or(normalized.as_str(), |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!(
            "warning: sending the token in plaintext to {normalized} (no --ca-cert): anyone on the path can read \
             it; use TLS (docs/security.md)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_sent_in_plaintext_beyond_loopback_is_warned_of() {
        let warn = plaintext_token_warning;
        assert!(warn("10.0.0.5:7700").is_some_and(|w| w.contains("http://10.0.0.5:7700")));
        assert!(warn("http://db.example:7700").is_some());
        for quiet in ["127.0.0.1:7700", "http://localhost:7700", "http://[::1]:7700", "127.0.0.2:7700"] {
            assert_eq!(warn(quiet), None, "{quiet}");
        }
        assert_eq!(warn("https://10.0.0.5:7700"), None, "TLS");
    }

    /// After a failure, calls move on around the seed, a known leader and
    /// the map's nodes, so a dead seed is left for a live node.
    #[tokio::test]
    async fn a_failed_node_is_left_for_the_next_one_the_map_names() {
        let (n1, n2, n3) = ("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3");
        let options = ConnectOptions::new();
        let seed = Conn { endpoint: n1.into(), channel: lazy_channel(n1, &options).unwrap() };
        let router = Router::new(seed, options);
        let at = || router.current().endpoint;
        // No map, no leader: nowhere else to go.
        router.avoid(n1);
        assert_eq!(at(), n1);
        // The seed and a named leader take turns.
        assert!(router.follow(n2, n1).unwrap());
        assert_eq!(at(), n2);
        router.avoid(n2);
        assert_eq!(at(), n1);
        router.avoid(n1);
        assert_eq!(at(), n2);
        // The seed one of the map's nodes: every node in turn.
        router.know_nodes(vec![n1.into(), n2.into(), n3.into()]);
        router.avoid(n2);
        assert_eq!(at(), n3);
        router.avoid(n1);
        assert_eq!(at(), n3, "only the failed current node is left");
        router.avoid(n3);
        assert_eq!(at(), n1);
        router.avoid(n1);
        assert_eq!(at(), n2);
        // A leader named that the map does not know joins the turn, last.
        let n4 = "http://127.0.0.1:4";
        assert!(router.follow(n4, n2).unwrap());
        router.avoid(n4);
        assert_eq!(at(), n1);

        // A seed that is no node of the map (a load balancer): between
        // each of the others.
        let lb = "http://127.0.0.1:9";
        let options = ConnectOptions::new();
        let seed = Conn { endpoint: lb.into(), channel: lazy_channel(lb, &options).unwrap() };
        let router = Router::new(seed, options);
        let at = || router.current().endpoint;
        router.know_nodes(vec![n2.into(), n3.into()]);
        for expected in [n2, lb, n3, lb, n2] {
            router.avoid(&at());
            assert_eq!(at(), expected);
        }
    }

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(normalize_endpoint("127.0.0.1:7700"), "http://127.0.0.1:7700");
        assert_eq!(normalize_endpoint("http://127.0.0.1:7700/"), "http://127.0.0.1:7700");
        assert_eq!(normalize_endpoint(" node-1:7700 "), "http://node-1:7700");
        assert_eq!(normalize_endpoint("https://portrait.example:443"), "https://portrait.example:443");
    }

    #[test]
    fn tokens_are_checked_once() {
        let options = ConnectOptions::new().token(" s3cret\n").unwrap();
        assert!(!format!("{options:?}").contains("s3cret"), "{options:?}");
        assert_eq!(options.authorization.unwrap().to_str().unwrap(), "Bearer s3cret");
        let reason = |token: &str| ConnectOptions::new().token(token).unwrap_err().to_string();
        assert_eq!(reason(""), "invalid client settings: token: must not be empty");
        assert!(reason("a b").contains("visible ASCII"));
        assert!(reason("é").contains("visible ASCII"));
        assert!(reason(&"x".repeat(MAX_TOKEN_BYTES + 1)).contains("longer than 512 bytes"));
        assert!(ConnectOptions::new().token(&"x".repeat(MAX_TOKEN_BYTES)).is_ok());
    }

    #[tokio::test]
    async fn follow_and_avoid_switch_between_seed_and_leader() {
        let options = ConnectOptions::new();
        let seed = lazy_channel("http://127.0.0.1:1", &options).unwrap();
        let router = Router::new(Conn { endpoint: "http://127.0.0.1:1".into(), channel: seed }, options);
        let seed = "http://127.0.0.1:1";
        let leader = "http://127.0.0.1:2";

        router.avoid(seed); // no leader known: stays on the seed
        assert_eq!(router.current().endpoint, seed);
        assert!(router.follow("127.0.0.1:2", seed).unwrap());
        assert_eq!(router.current().endpoint, leader);
        assert!(!router.follow(leader, leader).unwrap());
        router.avoid(seed); // a stale failure does not move the client
        assert_eq!(router.current().endpoint, leader);
        router.avoid(leader);
        assert_eq!(router.current().endpoint, seed);
        router.avoid(seed);
        assert_eq!(router.current().endpoint, leader);
        assert!(router.follow(seed, leader).unwrap());
        assert_eq!(router.current().endpoint, seed);
    }
}
