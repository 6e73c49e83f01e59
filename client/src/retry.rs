//! Leader redirect and retry of unary calls.
//!
//! A follower answers a call it cannot serve with `UNAVAILABLE` and the
//! leader's endpoint in the `x-portrait-leader` metadata key. A unary call then
//! moves to that endpoint and is sent again (at most [`MAX_REDIRECTS`] times in
//! a row; a loop of redirects, nodes naming each other while a new leader
//! takes over, backs off as below); an `UNAVAILABLE` without a hint
//! (node down, election in progress) is retried with exponential backoff for
//! up to [`RETRY_BUDGET`] (or [`crate::ConnectOptions::retry_for`]), each retry with a fresh count of redirects (a
//! follower keeps naming a leader that is between terms; only the budget
//! ends such a call). A connection lost during the call ([`connection_lost`])
//! is retried like an `UNAVAILABLE` whose outcome is unknown. Every other
//! status is returned at once. Retrying a write is safe when its events carry an
//! `event_id`: each shard's part is applied whole or not at all, and a
//! retried event whose first attempt did commit (in that shard's part, or
//! in a part that committed after the call timed out) is counted as a
//! duplicate. Events without an `event_id` are never deduplicated, so a
//! write with one is not resent ([`crate::PortraitClient::write`]), but
//! for one attempt at the next node when its connection was never made.
//! Which node an attempt goes to after a failure: [`Router::avoid`].

use std::future::Future;
use std::time::Duration;

use portrait_proto::OUTCOME_UNKNOWN;
use tokio::time::Instant;
use tonic::{Code, Response, Status};

use crate::conn::{Chan, Router};
use crate::ClientError;

/// Metadata key naming the leader's endpoint on an `UNAVAILABLE` status.
pub const LEADER_HEADER: &str = "x-portrait-leader";
/// Leader redirects followed by one call.
pub const MAX_REDIRECTS: u32 = 3;
/// How long one call keeps retrying `UNAVAILABLE` without a leader hint,
/// unless set otherwise ([`crate::ConnectOptions::retry_for`]). Longer than
/// a shard's failover after its leader's node dies: the followers campaign
/// once the node has been silent for an election timeout (1 s), and the
/// election takes one or two more; writers to such a shard were measured
/// waiting 1.2 to 5.1 s (cluster-tests `shard_faults.rs`, 2026-12-06), so
/// a budget of 3 s failed some of their calls.
pub const RETRY_BUDGET: Duration = Duration::from_secs(8);

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Metadata key of the stable error code every status a node sends carries.
const ERROR_HEADER: &str = "x-portrait-error";

/// Whether `status` is a connection lost during the call (the node was
/// killed, or the connection reset), not a node's answer: tonic reports
/// those as `UNKNOWN`, `INTERNAL` or `CANCELLED` made here from the
/// transport's error (its source), while every status a node sends carries
/// `x-portrait-error` and none has a source here. The call may have
/// reached the node: its outcome is unknown.
pub fn connection_lost(status: &Status) -> bool {
    use std::error::Error as _;
    matches!(status.code(), Code::Unknown | Code::Internal | Code::Cancelled)
        && status.metadata().get(ERROR_HEADER).is_none()
        && status.source().is_some()
}

/// Whether `status` is a transport failure made here (no node's answer)
/// after which the call may have reached the node: a connection lost
/// during the call, or an `UNAVAILABLE` of a connection that was made
/// (a keep-alive timeout).
pub fn lost_after_sent(status: &Status) -> bool {
    use std::error::Error as _;
    let transport_unavailable = status.code() == Code::Unavailable
        && status.metadata().get(ERROR_HEADER).is_none()
        && status.source().is_some();
    connection_lost(status) || (transport_unavailable && !portrait_proto::never_sent(status))
}

/// Whether a call that failed with `status` may be sent again elsewhere
/// or later: `Some(outcome unknown)` if so. A node's `UNAVAILABLE` says
/// itself whether the outcome is unknown; one made here from a transport
/// failure is unknown unless the connection was never made (a keep-alive
/// timeout fails a call the node may have acted on as `UNAVAILABLE` too).
fn retryable(status: &Status) -> Option<bool> {
    use std::error::Error as _;
    match status.code() {
        Code::Unavailable if status.metadata().get(ERROR_HEADER).is_none() && status.source().is_some() => {
            Some(!portrait_proto::never_sent(status))
        }
        Code::Unavailable => Some(status.message().contains(OUTCOME_UNKNOWN)),
        _ => connection_lost(status).then_some(true),
    }
}

/// `status` of a call that is not sent again because its outcome is
/// unknown, saying so when it does not already.
fn outcome_unknown(status: Status) -> Status {
    if status.message().contains(OUTCOME_UNKNOWN) {
        return status;
    }
    let message =
        format!("{} ({OUTCOME_UNKNOWN}: the connection failed after the call was sent)", status.message());
    Status::with_metadata(status.code(), message, status.metadata().clone())
}

/// `status` with the node it came from, when it is a transport failure
/// made here (no node's answer: no `x-portrait-error`), whose message
/// would not say which node failed ("tcp connect error"). Only for a
/// status the caller gets: the result has no source, which the checks
/// above read.
pub(crate) fn named(status: Status, endpoint: &str) -> Status {
    use std::error::Error as _;
    if status.metadata().get(ERROR_HEADER).is_some() || status.source().is_none() {
        return status;
    }
    let message = format!("{endpoint}: {}", status.message());
    Status::with_metadata(status.code(), message, status.metadata().clone())
}

/// The leader endpoint carried by `status`, if any.
pub fn leader_hint(status: &Status) -> Option<&str> {
    let value = status.metadata().get(LEADER_HEADER)?.to_str().ok()?;
    Some(value.trim()).filter(|v| !v.is_empty())
}

/// Runs `call` on the router's current channel, redirecting and retrying as
/// described in the module docs. `call` is invoked once per attempt.
pub(crate) async fn unary<T, F, Fut>(router: &Router, call: F) -> Result<T, ClientError>
where
    F: FnMut(Chan) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    retry(router, Instant::now(), Retry::Routed { again_if_unknown: true }, call).await
}

/// [`unary`] for a call about the node the client was created for (its
/// status, its clock, its fault injection): every attempt goes to that
/// node, never to a leader learned from an earlier redirect nor to another
/// node after a failure, which would act on the wrong node.
pub(crate) async fn unary_on_seed<T, F, Fut>(router: &Router, call: F) -> Result<T, ClientError>
where
    F: FnMut(Chan) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    retry(router, Instant::now(), Retry::Seed, call).await
}

/// How [`retry`] picks its node and which failures it retries.
#[derive(Clone, Copy)]
enum Retry {
    /// The router's current node, moving with leader hints and failures;
    /// an outcome-unknown `UNAVAILABLE` is retried if `again_if_unknown`.
    Routed { again_if_unknown: bool },
    /// The seed node, every attempt; outcome-unknown failures are retried
    /// (the calls made so are idempotent).
    Seed,
}

/// [`unary`] for a change that must not be made twice (`ApplySchema`,
/// `DrainNode`, `RemoveNode`) or whose retry could only be told that it is
/// still under way (`AddNode`): an `UNAVAILABLE` saying the outcome is
/// unknown (the change may have been committed) is returned at once,
/// for the caller to check what happened before calling again.
pub(crate) async fn unary_change<T, F, Fut>(router: &Router, call: F) -> Result<T, ClientError>
where
    F: FnMut(Chan) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    retry(router, Instant::now(), Retry::Routed { again_if_unknown: false }, call).await
}

/// [`unary`] for a call whose first attempt went elsewhere at `started`
/// (straight to a shard's node): the retry budget counts from then. At
/// least one attempt is made here, whatever the budget left.
pub(crate) async fn unary_since<T, F, Fut>(
    router: &Router,
    started: Instant,
    call: F,
) -> Result<T, ClientError>
where
    F: FnMut(Chan) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    retry(router, started, Retry::Routed { again_if_unknown: true }, call).await
}

async fn retry<T, F, Fut>(
    router: &Router,
    started: Instant,
    how: Retry,
    mut call: F,
) -> Result<T, ClientError>
where
    F: FnMut(Chan) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let mut redirects = 0;
    let mut backoff = FIRST_BACKOFF;
    let budget = router.options().retry_budget();
    let again_if_unknown = match how {
        Retry::Routed { again_if_unknown } => again_if_unknown,
        Retry::Seed => true,
    };
    let pinned = matches!(how, Retry::Seed);
    loop {
        let conn = if pinned { router.seed() } else { router.current() };
        let status = match call(conn.channel).await {
            Ok(response) => {
                router.note_epoch(response.metadata());
                return Ok(response.into_inner());
            }
            Err(status) => {
                // Errors carry the node's map epoch too.
                router.note_epoch(status.metadata());
                match retryable(&status) {
                    Some(unknown) if again_if_unknown || !unknown => status,
                    Some(_) => {
                        if !pinned {
                            router.avoid(&conn.endpoint);
                        }
                        return Err(outcome_unknown(named(status, &conn.endpoint)).into());
                    }
                    None => return Err(named(status, &conn.endpoint).into()),
                }
            }
        };
        if let Some(hint) = leader_hint(&status) {
            // The node asked for refers to another: not retried there.
            if pinned {
                return Err(named(status, &conn.endpoint).into());
            }
            // A hint that is no endpoint is ignored (the server's answer,
            // not a connect error, is what the caller then sees). Past
            // `MAX_REDIRECTS` in a row (nodes naming each other while a
            // new leader takes over), the call backs off as below.
            if redirects < MAX_REDIRECTS && router.follow(hint, &conn.endpoint).unwrap_or(false) {
                redirects += 1;
                continue;
            }
        }
        if started.elapsed() + backoff > budget {
            // The next call starts elsewhere: a leader cut off from its
            // quorum answers UNAVAILABLE only after its write timeout (past
            // the budget at the first attempt), and names no other leader.
            if !pinned {
                router.avoid(&conn.endpoint);
            }
            return Err(named(status, &conn.endpoint).into());
        }
        if !pinned {
            router.avoid(&conn.endpoint);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        redirects = 0;
    }
}

/// After a call that is not retried fails: still move to a named leader so
/// the caller's next attempt goes there.
pub(crate) fn note_leader(router: &Router, used_endpoint: &str, status: &Status) {
    if status.code() == Code::Unavailable {
        if let Some(hint) = leader_hint(status) {
            // A malformed hint is ignored; the status is returned either way.
            let _ = router.follow(hint, used_endpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused connection is known never to have carried the call; a
    /// node's UNAVAILABLE goes by its message.
    #[tokio::test]
    async fn a_refused_connection_is_retried_as_never_sent() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let mut client = portrait_proto::v1::admin_client::AdminClient::new(channel);
        let status =
            client.cluster_status(portrait_proto::v1::ClusterStatusRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(portrait_proto::never_sent(&status), "{status:?}");
        assert_eq!(retryable(&status), Some(false));
        let mut answered = Status::unavailable(format!("shard 2: {OUTCOME_UNKNOWN}"));
        answered.metadata_mut().insert(ERROR_HEADER, "UNAVAILABLE".parse().unwrap());
        assert_eq!(retryable(&answered), Some(true));
        let told = outcome_unknown(Status::unavailable("transport error"));
        assert!(told.message().starts_with("transport error (the outcome is unknown"), "{}", told.message());
    }

    #[test]
    fn reads_the_leader_hint() {
        let mut status = Status::unavailable("not the leader");
        assert_eq!(leader_hint(&status), None);
        status.metadata_mut().insert(LEADER_HEADER, "http://127.0.0.1:7701".parse().unwrap());
        assert_eq!(leader_hint(&status), Some("http://127.0.0.1:7701"));
        status.metadata_mut().insert(LEADER_HEADER, "".parse().unwrap());
        assert_eq!(leader_hint(&status), None);
    }

    /// Attempts `unary_since(started)` makes when every one is UNAVAILABLE
    /// without a hint.
    async fn attempts_since(started: Instant) -> u32 {
        attempts(started, true, "no leader").await
    }

    /// Attempts a call makes when every one is UNAVAILABLE with `message`.
    async fn attempts(started: Instant, again_if_unknown: bool, message: &'static str) -> u32 {
        attempts_with(started, again_if_unknown, message, Default::default()).await
    }

    async fn attempts_with(
        started: Instant,
        again_if_unknown: bool,
        message: &'static str,
        options: crate::ConnectOptions,
    ) -> u32 {
        let seed = crate::conn::Conn {
            endpoint: "http://127.0.0.1:1".into(),
            channel: crate::conn::lazy_channel("http://127.0.0.1:1", &Default::default()).unwrap(),
        };
        let router = Router::new(seed, options);
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let how = Retry::Routed { again_if_unknown };
        let result: Result<(), _> = retry(&router, started, how, |_| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move { Err(Status::unavailable(message)) }
        })
        .await;
        assert!(result.is_err());
        attempts.into_inner()
    }

    #[tokio::test]
    async fn the_retry_budget_counts_from_the_first_attempt_made_elsewhere() {
        // 1 s of budget left: attempts at about 0, 50, 150, 350 and 750 ms
        // (fewer if sleeps run late on a loaded machine), not the attempts of a
        // whole budget (0, 50, 150, 350, 750, 1250, ... 7750 ms: 19).
        let almost_spent = Instant::now() - RETRY_BUDGET + Duration::from_secs(1);
        let attempts = attempts_since(almost_spent).await;
        assert!((2..=5).contains(&attempts), "{attempts} attempts");
        let spent = Instant::now() - RETRY_BUDGET;
        assert_eq!(attempts_since(spent).await, 1, "a spent budget still tries once");
    }

    #[tokio::test]
    async fn a_client_may_set_its_own_retry_budget() {
        let none = crate::ConnectOptions::new().retry_for(Duration::ZERO);
        assert_eq!(attempts_with(Instant::now(), true, "no leader", none).await, 1, "one attempt, no retry");
        // 400 ms: attempts at about 0, 50, 150 and 350 ms (the next
        // backoff, 400 ms, would pass it), fewer if sleeps run late.
        let short = crate::ConnectOptions::new().retry_for(Duration::from_millis(400));
        let started = Instant::now();
        let attempts = attempts_with(started, true, "no leader", short).await;
        assert!((2..=4).contains(&attempts), "{attempts} attempts");
        assert!(started.elapsed() < Duration::from_millis(400), "{:?}", started.elapsed());
        assert_eq!(crate::ConnectOptions::new().retry_budget(), RETRY_BUDGET);
    }

    /// A status made here from a transport error, as tonic does.
    fn from_transport(code: Code, message: &str) -> Status {
        let mut status = Status::new(code, message);
        status.set_source(std::sync::Arc::new(std::io::Error::other("connection reset by peer")));
        status
    }

    #[test]
    fn a_connection_lost_is_told_from_a_node_answer() {
        for code in [Code::Unknown, Code::Internal, Code::Cancelled] {
            let lost = from_transport(code, "h2 protocol error: connection reset");
            assert!(connection_lost(&lost), "{code:?}");
            // A status received from the other side (a node's decode
            // error, INTERNAL without the key) has no source here.
            assert!(!connection_lost(&Status::new(code, "failed to decode Protobuf message")), "{code:?}");
            assert_eq!(retryable(&lost), Some(true), "outcome unknown");
            let mut answer = from_transport(code, "internal: storage failed");
            answer.metadata_mut().insert(ERROR_HEADER, "INTERNAL".parse().unwrap());
            assert!(!connection_lost(&answer), "{code:?} from a node");
            assert_eq!(retryable(&answer), None);
        }
        assert_eq!(retryable(&Status::unavailable("no leader")), Some(false));
        assert_eq!(retryable(&Status::unavailable(format!("timed out; {OUTCOME_UNKNOWN}"))), Some(true));
        assert_eq!(retryable(&Status::invalid_argument("events[0].user_id: empty")), None);
    }

    #[tokio::test]
    async fn a_lost_connection_is_retried_and_a_change_is_not() {
        let almost_spent = Instant::now() - RETRY_BUDGET + Duration::from_secs(1);
        let seed = || crate::conn::Conn {
            endpoint: "http://127.0.0.1:1".into(),
            channel: crate::conn::lazy_channel("http://127.0.0.1:1", &Default::default()).unwrap(),
        };
        for (again_if_unknown, expected) in [(true, 2..=5), (false, 1..=1)] {
            let router = Router::new(seed(), Default::default());
            let attempts = std::sync::atomic::AtomicU32::new(0);
            let how = Retry::Routed { again_if_unknown };
            let result: Result<(), _> = retry(&router, almost_spent, how, |_| {
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move { Err(from_transport(Code::Unknown, "transport error")) }
            })
            .await;
            assert!(result.is_err());
            let attempts = attempts.into_inner();
            assert!(
                expected.contains(&attempts),
                "{attempts} attempts (again_if_unknown {again_if_unknown})"
            );
        }
    }

    #[tokio::test]
    async fn a_change_whose_outcome_is_unknown_is_not_sent_again() {
        let unknown = "meta: the membership change was not committed within 5000 ms; the outcome is unknown: call again";
        let almost_spent = Instant::now() - RETRY_BUDGET + Duration::from_secs(1);
        assert_eq!(attempts(almost_spent, false, unknown).await, 1);
        // Any other UNAVAILABLE is retried as usual, and so is a write's
        // (its events' ids make a retry safe).
        assert!(attempts(almost_spent, false, "no leader").await >= 2);
        assert!(attempts(almost_spent, true, unknown).await >= 2);
    }
}
