//! A node-wide bound on the bytes of client requests being received: each
//! client-facing service is wrapped in [`WithReceiveBudget`], which counts
//! every data frame of a request body against the node's
//! [`ReceiveBudget`] (`MAX_RECEIVING_BYTES`) from the moment the body is
//! read until the message it belongs to is complete (and decoded). A frame
//! that would pass the budget fails its request at once with UNAVAILABLE
//! ("retry"), naming the limit; nothing of it was applied. A request whose
//! message stops arriving for `RECEIVE_STALL` (a sender that stalled or
//! vanished) fails with DEADLINE_EXCEEDED, so that what it held is free for
//! the others.
//!
//! Without it, each request's bytes were bounded (`MAX_MESSAGE_BYTES`) but
//! their number was not: a thousand batch loaders each sending a 16 MiB
//! write held 16 GiB between their arrival and the write queue's own budget
//! (`MAX_QUEUED_WRITE_BYTES`), which counts a request only once decoded.
//!
//! What is counted: the bytes of a message tonic buffers until it is
//! complete. The body's gRPC framing (a 5-byte header with the message's
//! length, then the message) says where messages end. The bytes of the
//! messages a frame completes are given back as it is handed over: tonic
//! decodes them in the same poll (it reads a frame, then decodes what it
//! holds), so they are uncounted only while one message is decoded; what is
//! left is given back when the body is dropped. So a stream (WriteStream)
//! holds only the message it is receiving, not the ones being written. Not
//! counted: HTTP/2's own receive buffers (at most a connection's
//! flow-control window) and the decoded message, which the write queue's
//! budget and the per-request limits bound.
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
use crate::limits::RECEIVE_STALL;

/// Bytes of client requests a node holds undecoded, all calls together.
pub struct ReceiveBudget {
    held: AtomicUsize,
    limit: usize,
    /// How long a message may go without a byte arriving (`RECEIVE_STALL`).
    stall: std::time::Duration,
}

impl ReceiveBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Self::with_stall(limit, RECEIVE_STALL)
    }

    pub fn with_stall(limit: usize, stall: std::time::Duration) -> Arc<Self> {
        Arc::new(ReceiveBudget { held: AtomicUsize::new(0), limit, stall })
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

/// A request body whose incomplete message's bytes are held in the budget.
pub struct Counted {
    body: TonicBody,
    budget: Arc<ReceiveBudget>,
    framing: Framing,
    /// Bytes taken from the budget and not given back: the message being
    /// received.
    held: usize,
    /// While part of a message is held and no more has come: when the
    /// request fails as stalled.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Counted {
    fn new(body: TonicBody, budget: Arc<ReceiveBudget>) -> Self {
        Counted { body, budget, framing: Framing::default(), held: 0, stall: None }
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
        let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) else {
            if this.held > 0 {
                let after = this.budget.stall;
                let stall = this.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
                if std::future::Future::poll(stall.as_mut(), cx).is_ready() {
                    return Poll::Ready(Some(Err(Status::from(Error::DeadlineExceeded(format!(
                        "request: no byte of its message came for {} ms (the sender stalled); ended so that \
                         the {} bytes it held of the node's MAX_RECEIVING_BYTES are free",
                        after.as_millis(),
                        this.held
                    ))))));
                }
            }
            return Poll::Pending;
        };
        this.stall = None;
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            let data = data.map_or(&[][..], |d| d.as_ref());
            if !this.budget.try_take(data.len()) {
                return Poll::Ready(Some(Err(this.budget.refusal())));
            }
            this.held += data.len();
            // Decoded in the poll that takes this frame.
            let complete = this.framing.feed(data);
            this.budget.give(complete);
            this.held -= complete;
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

    /// A body of the given frames (all there, then its end).
    fn counted_frames(frames: VecDeque<Vec<u8>>) -> TonicBody {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        for f in frames {
            sender.send(Ok(Frame::data(Bytes::from(f)))).expect("the receiver is here");
        }
        TonicBody::new(StreamBody(receiver))
    }

    fn read(body: &mut Counted) -> Option<Result<usize, Status>> {
        let waker = std::task::Waker::noop();
        match Pin::new(body).poll_frame(&mut Context::from_waker(waker)) {
            Poll::Ready(frame) => frame.map(|f| f.map(|f| f.into_data().map_or(0, |d| d.len()))),
            Poll::Pending => unreachable!("the frames are all there"),
        }
    }

    #[test]
    fn bytes_are_held_until_their_message_is_complete_and_refused_past_the_limit() {
        let budget = ReceiveBudget::new(100);
        let whole = message(45); // 50 bytes
        let mut first = Counted::new(
            counted_frames(VecDeque::from([whole[..30].to_vec(), whole[30..].to_vec()])),
            budget.clone(),
        );
        assert_eq!(read(&mut first).unwrap().unwrap(), 30);
        assert_eq!(budget.held(), 30);
        assert_eq!(read(&mut first).unwrap().unwrap(), 20);
        assert_eq!(budget.held(), 0, "complete: decoded in the same poll, and given back");
        // Two bodies with 60 and 40 bytes of a message: the budget is full,
        // and a byte more is refused.
        let big = message(95); // 100 bytes
        let mut second = Counted::new(counted_frames(VecDeque::from([big[..60].to_vec()])), budget.clone());
        assert_eq!(read(&mut second).unwrap().unwrap(), 60);
        let mut third = Counted::new(
            counted_frames(VecDeque::from([big[..41].to_vec(), big[..40].to_vec()])),
            budget.clone(),
        );
        let refusal = read(&mut third).unwrap().unwrap_err();
        assert_eq!(refusal.code(), tonic::Code::Unavailable);
        assert!(refusal.message().contains("MAX_RECEIVING_BYTES"), "{}", refusal.message());
        assert_eq!(budget.held(), 60, "a refused frame takes nothing");
        assert_eq!(read(&mut third).unwrap().unwrap(), 40);
        assert_eq!(budget.held(), 100);
        // Dropping a body gives back all it held.
        drop(second);
        assert_eq!(budget.held(), 40);
        drop(third);
        drop(first);
        assert_eq!(budget.held(), 0);
        let mut fourth = Counted::new(counted_frames(VecDeque::from([big])), budget.clone());
        assert_eq!(read(&mut fourth).unwrap().unwrap(), 100);
        assert_eq!(budget.held(), 0);
    }

    /// A body that stops bringing bytes mid-message fails after
    /// RECEIVE_STALL, and gives back what it held.
    #[tokio::test]
    async fn a_stalled_message_fails_and_frees_its_bytes() {
        const STALL: std::time::Duration = std::time::Duration::from_millis(300);
        let budget = ReceiveBudget::with_stall(100, STALL);
        let whole = message(45);
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, Status>>();
        let stream = StreamBody(receiver);
        let mut body = Counted::new(TonicBody::new(stream), budget.clone());
        sender.send(Ok(Frame::data(Bytes::from(whole[..30].to_vec())))).unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        assert_eq!(budget.held(), 30);
        // Bytes within the stall time keep it going.
        tokio::time::sleep(STALL - std::time::Duration::from_millis(100)).await;
        sender.send(Ok(Frame::data(Bytes::from(whole[30..40].to_vec())))).unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        assert_eq!(budget.held(), 40);
        let started = tokio::time::Instant::now();
        let stalled = next(&mut body).await.unwrap().unwrap_err();
        let took = started.elapsed();
        assert!(took >= STALL && took < STALL * 5, "{took:?}");
        assert_eq!(stalled.code(), tonic::Code::DeadlineExceeded);
        assert!(stalled.message().contains("the sender stalled"), "{}", stalled.message());
        drop(body);
        assert_eq!(budget.held(), 0);
        drop(sender);
    }

    async fn next(body: &mut Counted) -> Option<Result<Frame<Bytes>, Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    /// A body of the frames a channel brings, with tonic's error type.
    struct StreamBody(tokio::sync::mpsc::UnboundedReceiver<Result<Frame<Bytes>, Status>>);

    impl Body for StreamBody {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            self.get_mut().0.poll_recv(cx)
        }
    }
}
