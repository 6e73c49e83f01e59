//! A node-wide bound on the bytes of read responses waiting for their
//! readers (`MAX_UNSENT_RESPONSE_BYTES`).
//!
//! Each `GetProfile` / `BatchGetProfiles` response is at most
//! `MAX_RESPONSE_BYTES`, but the number of them a node holds was not
//! bounded. tonic encodes a response whole, and HTTP/2 keeps the encoded
//! bytes until the reader's flow-control window lets them out. A reader
//! that asks and then does not read (a stuck consumer, a client that lost
//! interest but kept the connection) kept its response in the node's
//! memory: a thousand of them at 16 MiB held 16 GiB.
//!
//! Now the Profiles service takes a response's encoded size from the
//! node's [`SendBudget`] before it answers, or answers UNAVAILABLE
//! ("retry"), naming the limit. The response carries its [`SendHold`] in
//! its extensions; [`WithSendHold`] moves it into the bytes of the body's
//! data, so it is given back when HTTP/2 drops them: once they were written
//! to the connection, or the stream or connection ended. Reading the
//! response ends its hold; cancelling the call (a client deadline) does too.
//!
//! A reader that neither reads nor cancels keeps its hold until its
//! connection closes; while such holds fill the budget, reads with large
//! answers are refused and small ones still fit. A node's memory is the
//! bound kept: refusing reads, which can be retried, instead of growing
//! without end. So that one such connection cannot fill the node's budget
//! alone, once the node holds more than half its budget the responses of
//! one connection (by the client's address and port) may hold at most
//! `MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION`. A client that vanished
//! without closing its connections is found by HTTP/2 keepalive pings
//! (`CLIENT_KEEPALIVE_INTERVAL`), which ends them and frees their holds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{Bytes, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::error::Error;

/// A read is refused before it reads when less than this is left of the
/// node's budget (or of its connection's share, once that applies): hardly
/// any answer would fit.
pub const MIN_ANSWER_ROOM: usize = 64 * 1024;

/// Encoded bytes of responses a node holds until their readers take them,
/// all calls together.
pub struct SendBudget {
    held: AtomicUsize,
    limit: usize,
    /// Bytes held by each client connection holding any, and the most one
    /// may hold.
    connections: Mutex<HashMap<SocketAddr, usize>>,
    connection_limit: usize,
}

impl SendBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Self::with_connection_limit(limit, limit)
    }

    /// A budget of `limit` bytes, of which one connection may hold at most
    /// `connection_limit`.
    pub fn with_connection_limit(limit: usize, connection_limit: usize) -> Arc<Self> {
        let connections = Mutex::new(HashMap::new());
        Arc::new(SendBudget { held: AtomicUsize::new(0), limit, connections, connection_limit })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Takes `bytes` for one response to the connection from `peer` (when
    /// known) until its [`SendHold`] is dropped, or refuses at once with
    /// UNAVAILABLE naming the limit it would pass. Never waits: the bytes
    /// come back only as readers read.
    pub fn take(self: &Arc<Self>, bytes: usize, peer: Option<SocketAddr>) -> Result<SendHold, Status> {
        // The connection's share first, under its lock; given back if the
        // node's budget refuses. Counted always, held to its limit only
        // while the node holds more than half its budget: a busy, healthy
        // connection is not refused while there is room.
        if let Some(peer) = peer {
            let pressed = self.held().saturating_add(bytes) > self.limit / 2;
            let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            let held = connections.get(&peer).copied().unwrap_or(0);
            match held.checked_add(bytes).filter(|total| !pressed || *total <= self.connection_limit) {
                Some(total) => drop(connections.insert(peer, total)),
                None => return Err(self.connection_full(held, &format!("this one's {bytes} bytes"))),
            }
        }
        let taken = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(bytes).filter(|total| *total <= self.limit)
        });
        match taken {
            Ok(_) => Ok(SendHold { _held: Arc::new(Held { budget: self.clone(), bytes, peer }) }),
            Err(node_held) => {
                self.give_back_connection(peer, bytes);
                Err(self.node_full(node_held, &format!("this one's {bytes} bytes")))
            }
        }
    }

    /// Refuses a read before it reads (UNAVAILABLE, as [`SendBudget::take`]
    /// would after) when less than [`MIN_ANSWER_ROOM`] is left of the
    /// node's budget, or, while the node holds more than half its budget,
    /// of the share of the connection from `peer`: the read's work would
    /// be thrown away for all but the smallest answers. Takes nothing: a
    /// read let through may still be refused by `take` once its answer's
    /// size is known.
    pub fn has_room(&self, peer: Option<SocketAddr>) -> Result<(), Status> {
        let node_held = self.held();
        let answer = format!("an answer (less than {} KiB is left)", MIN_ANSWER_ROOM >> 10);
        if node_held.saturating_add(MIN_ANSWER_ROOM) > self.limit {
            return Err(self.node_full(node_held, &answer));
        }
        if let Some(peer) = peer.filter(|_| node_held.saturating_add(MIN_ANSWER_ROOM) > self.limit / 2) {
            let held = self.held_by(peer);
            if held.saturating_add(MIN_ANSWER_ROOM) > self.connection_limit {
                return Err(self.connection_full(held, &answer));
            }
        }
        Ok(())
    }

    /// The refusal when the node's budget, holding `node_held`, has no
    /// room for `what`.
    fn node_full(&self, node_held: usize, what: &str) -> Status {
        Status::from(Error::Unavailable(format!(
            "response: this node holds {} MiB of read responses their readers have not taken yet, and {what} \
             would pass its limit of {} MiB (MAX_UNSENT_RESPONSE_BYTES); retry later or ask for fewer users or \
             families",
            node_held >> 20,
            self.limit >> 20
        )))
    }

    /// The refusal when a connection's share, holding `held`, has no room
    /// for `what`.
    fn connection_full(&self, held: usize, what: &str) -> Status {
        Status::from(Error::Unavailable(format!(
            "response: this connection's read responses its reader has not taken yet hold {} MiB, and {what} \
             would pass the limit of {} MiB per connection (MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION); read \
             the answers already sent, or retry later",
            held >> 20,
            self.connection_limit >> 20
        )))
    }

    /// Gives back `bytes` of the share of the connection from `peer` (its
    /// entry goes once it holds nothing).
    fn give_back_connection(&self, peer: Option<SocketAddr>, bytes: usize) {
        let Some(peer) = peer else { return };
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = connections.get_mut(&peer) {
            debug_assert!(*held >= bytes, "a connection gives back more than it holds");
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                connections.remove(&peer);
            }
        }
    }

    /// Bytes held now by the responses of the connection from `peer`.
    pub fn held_by(&self, peer: SocketAddr) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.get(&peer).copied().unwrap_or(0)
    }
}

/// One response's share of the [`SendBudget`], given back when the last
/// clone is dropped. Cloned only because HTTP extensions must be.
#[derive(Clone)]
pub struct SendHold {
    _held: Arc<Held>,
}

struct Held {
    budget: Arc<SendBudget>,
    bytes: usize,
    peer: Option<SocketAddr>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.give_back_connection(self.peer, self.bytes);
    }
}

/// A service whose responses' [`SendHold`]s (in their extensions) last
/// until HTTP/2 has let go of the response's bytes.
#[derive(Clone)]
pub struct WithSendHold<S> {
    inner: S,
}

impl<S> WithSendHold<S> {
    pub fn new(inner: S) -> Self {
        WithSendHold { inner }
    }
}

impl<S, B, RB> Service<Request<B>> for WithSendHold<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Sending<RB>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let answer = self.inner.call(request);
        Box::pin(async move {
            let (mut parts, body) = answer.await?.into_parts();
            let hold = parts.extensions.remove::<SendHold>();
            Ok(Response::from_parts(parts, Sending { body, hold }))
        })
    }
}

impl<S: NamedService> NamedService for WithSendHold<S> {
    const NAME: &'static str = S::NAME;
}

/// A response body whose first data frame carries the response's hold.
/// (`Default`, an empty body, is what a refusal in front of it answers.)
#[derive(Default)]
pub struct Sending<B> {
    body: B,
    hold: Option<SendHold>,
}

/// A data frame's bytes and the hold they keep: dropped together, by
/// whoever drops the last reference to the bytes.
struct HeldBytes {
    bytes: Bytes,
    _hold: SendHold,
}

impl AsRef<[u8]> for HeldBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl<B> Body for Sending<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        let frame = match frame {
            Some(Ok(frame)) if frame.is_data() && this.hold.is_some() => {
                let bytes = frame.into_data().unwrap_or_else(|_| unreachable!("a data frame"));
                let hold = this.hold.take().expect("checked above");
                Some(Ok(Frame::data(Bytes::from_owner(HeldBytes { bytes, _hold: hold }))))
            }
            other => other,
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_taken_up_to_the_limit_and_given_back_when_dropped() {
        let budget = SendBudget::new(100);
        let a = budget.take(60, None).expect("fits");
        let status = budget.take(41, None).err().expect("over the limit");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("MAX_UNSENT_RESPONSE_BYTES"), "{}", status.message());
        let b = budget.take(40, None).expect("exactly the limit fits");
        assert_eq!(budget.held(), 100);
        let copy = a.clone();
        drop(a);
        assert_eq!(budget.held(), 100, "a clone still holds");
        drop(copy);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn once_the_node_is_half_full_one_connection_holds_at_most_its_share() {
        let budget = SendBudget::with_connection_limit(100, 20);
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let (a, b, c, d) = (addr(1000), addr(1001), addr(1002), addr(1003));
        // Up to half the node's budget, a busy connection is not held to
        // its share.
        let a1 = budget.take(30, Some(a)).expect("room: not held to its share");
        let a2 = budget.take(15, Some(a)).expect("45 of 100: still under half");
        let status = budget.take(10, Some(a)).err().expect("past half, and over the connection's share");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let message = status.message().to_string();
        assert!(message.contains("MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION"), "{message}");
        assert_eq!((budget.held(), budget.held_by(a)), (45, 45), "the refusal took nothing");
        // Past half, each other connection still gets its share.
        let b1 = budget.take(20, Some(b)).expect("b's share");
        budget.take(1, Some(b)).err().expect("over b's share");
        let c1 = budget.take(20, Some(c)).expect("c's share");
        // The node's budget bounds them all; its refusal gives the
        // connection's share back.
        let status = budget.take(20, Some(d)).err().expect("105 of 100");
        assert!(status.message().contains("MAX_UNSENT_RESPONSE_BYTES)"), "{}", status.message());
        assert_eq!(budget.held_by(d), 0);
        let rest = budget.take(15, None).expect("exactly the limit, no connection known");
        budget.take(1, None).err().expect("the node's budget is full");
        assert_eq!(budget.held(), 100);
        drop((a1, a2, rest));
        assert_eq!((budget.held(), budget.held_by(a)), (40, 0));
        assert_eq!(budget.connections.lock().unwrap().len(), 2, "only b and c still hold");
        drop((b1, c1));
        assert!(budget.connections.lock().unwrap().is_empty());
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_read_is_refused_before_it_reads_only_when_hardly_any_answer_would_fit() {
        const K: usize = 1024;
        let budget = SendBudget::with_connection_limit(1024 * K, 256 * K);
        let (a, b) = (SocketAddr::from(([127, 0, 0, 1], 1)), SocketAddr::from(([127, 0, 0, 1], 2)));
        budget.has_room(Some(a)).expect("empty");
        // Under half the node's budget a connection is not held to its share.
        let a1 = budget.take(400 * K, Some(a)).unwrap();
        budget.has_room(Some(a)).expect("400 KiB of 1 MiB: not pressed");
        let b1 = budget.take(200 * K, Some(b)).unwrap();
        let status = budget.has_room(Some(a)).expect_err("pressed, and a is over its share");
        assert!(
            status.message().contains("MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("less than 64 KiB is left"), "{}", status.message());
        budget.has_room(Some(b)).expect_err("b too: 200 of its 256 KiB, less than 64 left");
        budget.has_room(None).expect("the node has 424 KiB left");
        let rest = budget.take(1024 * K - 600 * K - 64 * K, None).unwrap();
        budget.has_room(None).expect("exactly 64 KiB left");
        let last = budget.take(1, None).unwrap();
        let status = budget.has_room(None).expect_err("less than 64 KiB left");
        assert!(status.message().contains("(MAX_UNSENT_RESPONSE_BYTES)"), "{}", status.message());
        assert_eq!(budget.held(), 960 * K + 1, "a check takes nothing");
        drop((a1, b1, rest, last));
        budget.has_room(Some(a)).expect("all given back");
    }

    /// The hold moves into the first data frame's bytes, and lasts as long
    /// as any slice of them; frames after it pass as they are.
    #[tokio::test]
    async fn the_first_data_frame_keeps_the_hold_until_its_bytes_are_dropped() {
        use http_body_util::BodyExt;

        let budget = SendBudget::new(1 << 20);
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"message"))),
            Ok(Frame::data(Bytes::from_static(b"more"))),
        ];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let mut body = Sending { body: inner, hold: Some(budget.take(7, None).unwrap()) };
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"message");
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&second[..], b"more");
        drop(body);
        assert_eq!(budget.held(), 7, "the bytes of the first frame are still held");
        let tail = first.slice(3..);
        drop(first);
        assert_eq!(budget.held(), 7, "a slice of them still holds");
        drop(tail);
        assert_eq!(budget.held(), 0);
    }
}
