//! A node-wide bound on the bytes of client requests being received: each
//! client-facing service is wrapped in [`WithReceiveBudget`], which counts
//! every data frame of a request body against the node's
//! [`ReceiveBudget`] (`MAX_RECEIVING_BYTES`) from the moment the body is
//! read until the message it belongs to has been decoded. A frame that
//! would pass the budget fails its request at once with UNAVAILABLE
//! ("retry"), naming the limit; nothing of it was applied.
//!
//! Without it, each request's bytes were bounded (`MAX_MESSAGE_BYTES`) but
//! their number was not: a thousand batch loaders each sending a 16 MiB
//! write held 16 GiB between their arrival and the write queue's own budget
//! (`MAX_QUEUED_WRITE_BYTES`), which counts a request only once decoded.
//!
//! What is counted: the bytes tonic buffers for a message it has not yet
//! decoded. The body's gRPC framing (a 5-byte header with the message's
//! length, then the message) says where messages end; tonic reads the body
//! again only once the messages it holds are decoded, so the bytes of the
//! messages completed by earlier frames are given back at the next read,
//! and all that is left when the body is dropped (a unary call's body is
//! dropped once its one message is decoded). Not counted: HTTP/2's own
//! receive buffers (at most a connection's flow-control window) and the
//! decoded message, which the write queue's budget and the per-request
//! limits bound.
//!
//! The budget is taken, never waited for: a request that waited with part
//! of its message held could block the others that hold the rest.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tonic::body::Body as TonicBody;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{Bytes, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::error::Error;

/// Bytes of client requests a node holds undecoded, all calls together.
pub struct ReceiveBudget {
    held: AtomicUsize,
    limit: usize,
}

impl ReceiveBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ReceiveBudget { held: AtomicUsize::new(0), limit })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    fn refusal(&self) -> Status {
        Status::from(Error::Unavailable(format!(
            "request: this node is already receiving {} MiB of requests, its limit (MAX_RECEIVING_BYTES); retry \
             later or send smaller requests",
            self.limit >> 20
        )))
    }
}

/// A service whose request bodies count against the node's [`ReceiveBudget`].
#[derive(Clone)]
pub struct WithReceiveBudget<S> {
    inner: S,
    budget: Arc<ReceiveBudget>,
}

impl<S> WithReceiveBudget<S> {
    pub fn new(inner: S, budget: Arc<ReceiveBudget>) -> Self {
        WithReceiveBudget { inner, budget }
    }
}

impl<S, RB> Service<Request<TonicBody>> for WithReceiveBudget<S>
where
    S: Service<Request<Counted>, Response = Response<RB>, Error = Infallible>,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<TonicBody>) -> Self::Future {
        let budget = self.budget.clone();
        self.inner.call(request.map(|body| Counted::new(body, budget)))
    }
}

impl<S: NamedService> NamedService for WithReceiveBudget<S> {
    const NAME: &'static str = S::NAME;
}

/// A request body whose undecoded bytes are held in the budget.
pub struct Counted {
    body: TonicBody,
    budget: Arc<ReceiveBudget>,
    framing: Framing,
    /// Bytes taken from the budget and not given back.
    held: usize,
    /// Of those, the bytes of messages complete when last read: decoded by
    /// the time the body is read again.
    decoded_by_next_read: usize,
}

impl Counted {
    fn new(body: TonicBody, budget: Arc<ReceiveBudget>) -> Self {
        Counted { body, budget, framing: Framing::default(), held: 0, decoded_by_next_read: 0 }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.decoded_by_next_read > 0 {
            this.budget.give(this.decoded_by_next_read);
            this.held -= this.decoded_by_next_read;
            this.decoded_by_next_read = 0;
        }
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            let data = data.map_or(&[][..], |d| d.as_ref());
            if !this.budget.try_take(data.len()) {
                return Poll::Ready(Some(Err(this.budget.refusal())));
            }
            this.held += data.len();
            this.decoded_by_next_read = this.framing.feed(data);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a body is in its gRPC messages: a 5-byte header (compression
/// flag, big-endian length), then that many bytes of message.
#[derive(Default)]
struct Framing {
    header: [u8; 5],
    header_len: usize,
    /// Message bytes still to come (`None`: reading a header).
    remaining: Option<usize>,
    /// Bytes of the current message (header included) read so far.
    current: usize,
}

impl Framing {
    /// Reads `data`; returns the bytes of the messages it completed
    /// (each counted from its header, in whichever frame that came).
    fn feed(&mut self, mut data: &[u8]) -> usize {
        let mut completed = 0;
        loop {
            if let Some(left) = self.remaining {
                let take = left.min(data.len());
                self.current += take;
                data = &data[take..];
                if take == left {
                    completed += std::mem::take(&mut self.current);
                    self.remaining = None;
                } else {
                    self.remaining = Some(left - take);
                }
            }
            if data.is_empty() {
                return completed;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            self.current += take;
            data = &data[take..];
            if self.header_len == 5 {
                self.header_len = 0;
                let length =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.remaining = Some(length as usize);
            } else {
                return completed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend((len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn framing_finds_where_messages_end_across_frames() {
        let mut f = Framing::default();
        // A header split over two frames, then the message in two more.
        let m = message(10);
        assert_eq!(f.feed(&m[..3]), 0);
        assert_eq!(f.feed(&m[3..8]), 0);
        assert_eq!(f.feed(&m[8..]), 15);
        // Two whole messages and the start of a third in one frame.
        let mut frame = message(0);
        frame.extend(message(4));
        let third = message(6);
        frame.extend(&third[..7]);
        assert_eq!(f.feed(&frame), 5 + 9);
        assert_eq!(f.feed(&third[7..]), 11);
        // An empty message whose header ends the frame.
        assert_eq!(f.feed(&message(0)), 5);
    }

    /// A body of the given frames, with tonic's error type.
    struct Frames(VecDeque<Vec<u8>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|f| Ok(Frame::data(Bytes::from(f)))))
        }
    }

    fn counted_frames(frames: VecDeque<Vec<u8>>) -> TonicBody {
        TonicBody::new(Frames(frames))
    }

    fn read(body: &mut Counted) -> Option<Result<usize, Status>> {
        let waker = std::task::Waker::noop();
        match Pin::new(body).poll_frame(&mut Context::from_waker(waker)) {
            Poll::Ready(frame) => frame.map(|f| f.map(|f| f.into_data().map_or(0, |d| d.len()))),
            Poll::Pending => unreachable!("the frames are all there"),
        }
    }

    #[test]
    fn bytes_are_held_until_their_message_is_decoded_and_refused_past_the_limit() {
        let budget = ReceiveBudget::new(100);
        let whole = message(45); // 50 bytes
        let mut first = Counted::new(
            counted_frames(VecDeque::from([whole[..30].to_vec(), whole[30..].to_vec()])),
            budget.clone(),
        );
        assert_eq!(read(&mut first).unwrap().unwrap(), 30);
        assert_eq!(budget.held(), 30);
        assert_eq!(read(&mut first).unwrap().unwrap(), 20);
        assert_eq!(budget.held(), 50, "held until tonic reads on, having decoded it");
        // A second body takes the other 50; a third byte more is refused.
        let mut second = Counted::new(counted_frames(VecDeque::from([message(45)])), budget.clone());
        assert_eq!(read(&mut second).unwrap().unwrap(), 50);
        let mut third = Counted::new(counted_frames(VecDeque::from([vec![0u8]])), budget.clone());
        let refusal = read(&mut third).unwrap().unwrap_err();
        assert_eq!(refusal.code(), tonic::Code::Unavailable);
        assert!(refusal.message().contains("MAX_RECEIVING_BYTES"), "{}", refusal.message());
        assert_eq!(budget.held(), 100, "a refused frame takes nothing");
        // Reading on (the end of the body) gives back what was decoded.
        assert!(read(&mut first).is_none());
        assert_eq!(budget.held(), 50);
        // Dropping a body gives back all it held.
        drop(second);
        drop(third);
        assert_eq!(budget.held(), 0);
        drop(first);
        assert_eq!(budget.held(), 0);
        let mut fourth = Counted::new(counted_frames(VecDeque::from([message(95)])), budget.clone());
        assert_eq!(read(&mut fourth).unwrap().unwrap(), 100);
    }
}
