//! Group commit, one task for the whole node: concurrent write requests
//! are queued per shard, and each shard's waiting requests are packed into
//! one raft entry of that shard's log (up to `MAX_ENTRY_BYTES` of encoded
//! requests and `MAX_EVENTS_PER_ENTRY` events), with a bounded number of
//! entries in flight per shard, so one log append and one fsync carry many
//! client requests. Each request keeps its own all-or-nothing outcome: a
//! request (already one shard's part of a client `Write`) is never split,
//! and one larger than the byte cap is an entry of its own. The
//! queued-bytes budget is the node's, shared by every shard.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::client_write_error;
use super::gate::{Pass, ProposalGate};
use super::replica::{Registry, Replica};
use crate::error::{Error, Result, OUTCOME_UNKNOWN};
use crate::limits::{
    MAX_ENTRY_BYTES, MAX_EVENTS_PER_ENTRY, MAX_QUEUED_WRITE_BYTES, MAX_WAITING_WRITE_BYTES, QUEUE_WAIT,
};
use crate::model::{Event, WriteCounts};
use crate::types::{Command, CommandResult, GroupId, WriteOutcome};

/// Entries proposed and not yet applied, at most. Two keep the pipeline
/// full (one entry applying while the next is appended and committed) and
/// let requests that arrive meanwhile gather into large entries, which the
/// parallel apply splits across its threads. Measured on 2 cores, 32
/// clients, alternating runs: 2 in flight 39.5k–47.1k events/s, 3 in flight
/// 35.1k–42.1k, 8 in flight 38.7k–42.5k; 3 nodes: 16.8k vs 15.4k (2 vs 8).
/// Per shard: shards do not wait for each other's entries, but see
/// [`NODE_PIPELINE`].
const MAX_IN_FLIGHT: usize = 2;

/// Entries in flight on the node, all shards together, from which a shard
/// that already has one in flight waits for it instead of proposing a
/// second. A shard with none in flight always proposes (a request's parts
/// in 16 shards go out at once). A second entry keeps one busy shard's
/// pipeline full; when many shards are busy the node's pipeline is full
/// already, and a shard's waiting requests gather into its next, larger
/// entry: every entry costs a log append, an AppendEntries item per
/// follower and an apply on every replica, whatever its size. Measured on
/// 2 cores, 3 nodes, S = 16 (`cluster_bench`, alternating runs): see
/// docs/benchmarks.md, session 11.
const NODE_PIPELINE: usize = 16;

/// Whether a shard with `shard` entries in flight may propose one more
/// while the node has `node` in flight.
fn may_propose(shard: usize, node: usize) -> bool {
    shard == 0 || (shard < MAX_IN_FLIGHT && node < NODE_PIPELINE)
}

type Reply = oneshot::Sender<Result<(WriteCounts, u64)>>;

pub struct Pending {
    /// The shard (raft group) whose log the request goes to.
    gid: GroupId,
    events: Vec<Event>,
    /// The request's encoded size in the entry (see [`encoded_len`]).
    bytes: usize,
    reply: Reply,
    /// Its share of [`MAX_QUEUED_WRITE_BYTES`], released when the request
    /// is answered (the reply is sent and the pending request dropped).
    queued: OwnedSemaphorePermit,
}

/// The request's bincode size inside a `Command::Write`. Exact, and cheap:
/// bincode's size pass walks the events without allocating. Measured
/// (release, this machine): 3.7 µs for 100 events with two attributes
/// (encoding them: 15.6 µs), 3.3 ms for 9,000 events with a 1.75 KB string
/// (encoding: 51 ms); at 80k events/s that is 0.3 % of one core. It runs
/// on the caller's task, not on the batching loop.
fn encoded_len(events: &[Event]) -> usize {
    bincode::serialized_size(events).map_or(usize::MAX, |n| n as usize)
}

/// Whether `p` fits a batch that holds `events` events and `bytes` bytes
/// (anything fits an empty batch).
fn fits(batch: (usize, usize), p: &Pending) -> bool {
    let (events, bytes) = batch;
    events == 0
        || (events + p.events.len() <= MAX_EVENTS_PER_ENTRY
            && bytes.saturating_add(p.bytes) <= MAX_ENTRY_BYTES)
}

/// Handle to the batching task.
#[derive(Clone)]
pub struct WriteBatcher {
    tx: mpsc::Sender<Pending>,
    /// [`MAX_QUEUED_WRITE_BYTES`] in KiB permits.
    queued: Arc<Semaphore>,
    /// All the permits there are.
    budget_units: u32,
    /// [`MAX_WAITING_WRITE_BYTES`] in KiB permits: the requests waiting
    /// for room in `queued`.
    waiting: Arc<Semaphore>,
    /// How long a request may wait for room ([`QUEUE_WAIT`]).
    wait: Duration,
}

/// A request's share of the node's queued-write budget, and its encoded
/// size (measured once, when it was admitted).
pub struct Admitted {
    queued: OwnedSemaphorePermit,
    bytes: usize,
}

/// Whether a request may wait for room in the queued-write budget
/// ([`WriteBatcher::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Wait (in arrival order, bounded): a client's request.
    Wait,
    /// Refuse at once: what another node forwarded, which holds that node's
    /// budget while it waits for the answer.
    Now,
}

/// Permits of the queued-bytes budget are KiB (a semaphore takes at most
/// `u32` permits at once).
const QUEUE_UNIT: usize = 1024;

impl WriteBatcher {
    /// The handle, and the receiving end for [`run`] (which the node runs
    /// as one of its owned tasks).
    pub fn channel() -> (WriteBatcher, mpsc::Receiver<Pending>) {
        Self::with_budget(MAX_QUEUED_WRITE_BYTES, MAX_WAITING_WRITE_BYTES, QUEUE_WAIT)
    }

    fn with_budget(bytes: usize, waiting: usize, wait: Duration) -> (WriteBatcher, mpsc::Receiver<Pending>) {
        let (tx, rx) = mpsc::channel(4096);
        let units = |bytes: usize| (bytes / QUEUE_UNIT).clamp(1, u32::MAX as usize) as u32;
        let budget_units = units(bytes);
        let queued = Arc::new(Semaphore::new(budget_units as usize));
        let waiting = Arc::new(Semaphore::new(units(waiting) as usize));
        (WriteBatcher { tx, queued, budget_units, waiting, wait }, rx)
    }

    /// Proposes one validated request, all of whose users are in shard
    /// `gid`, through that shard's log; returns its counts and log index.
    pub async fn write(&self, gid: GroupId, events: Vec<Event>) -> Result<(WriteCounts, u64)> {
        let bytes = encoded_len(&events);
        let queued = self.hold(bytes, Room::Wait).await?;
        self.write_held(gid, events, Admitted { queued, bytes }).await
    }

    /// Admits a request to be proposed through `gate`: takes its share of
    /// the node's budget first (or refuses at once, "write queue full"),
    /// then waits at the gate (at most `within`), so that writes held up
    /// by a leadership transfer count in the budget while they wait. Hand
    /// the permit to [`WriteBatcher::write_held`], and keep the pass until
    /// its answer.
    pub async fn admit(
        &self,
        gate: &ProposalGate,
        within: Duration,
        events: &[Event],
        room: Room,
    ) -> Result<(Admitted, Pass)> {
        let bytes = encoded_len(events);
        let queued = self.hold(bytes, room).await?;
        let pass = gate.pass(within).await?;
        Ok((Admitted { queued, bytes }, pass))
    }

    /// [`WriteBatcher::write`] for a request admitted already
    /// ([`WriteBatcher::admit`]).
    pub async fn write_held(
        &self,
        gid: GroupId,
        events: Vec<Event>,
        admitted: Admitted,
    ) -> Result<(WriteCounts, u64)> {
        let (reply, rx) = oneshot::channel();
        let Admitted { queued, bytes } = admitted;
        self.tx.send(Pending { gid, events, bytes, reply, queued }).await.map_err(|_| shutting_down())?;
        // Queued requests are answered "shutting down" at a stop; a reply
        // dropped unsent is a proposal cut off at shutdown, which may
        // still commit.
        rx.await.map_err(|_| {
            Error::Unavailable(format!(
                "the node stopped while the write was being proposed; {OUTCOME_UNKNOWN}: retry with the \
                 same event_ids, duplicates are skipped"
            ))
        })?
    }
}

impl WriteBatcher {
    /// Takes `bytes` of the node's queued-write budget until the permit is
    /// dropped: what a request proposed here holds until its answer, and
    /// what a part forwarded to another node's leader holds while it is in
    /// flight. When the budget has no room, the request waits for it, in
    /// arrival order, at most [`QUEUE_WAIT`] and while the requests waiting
    /// hold at most [`MAX_WAITING_WRITE_BYTES`]; else it is refused
    /// (UNAVAILABLE, "write queue full", nothing proposed). With
    /// [`Room::Now`] it is refused at once instead of waiting.
    ///
    /// In arrival order: bytes given back go to the waiting requests
    /// first, the oldest first, so a large request is not starved by small
    /// ones that would each fit the room left (tokio's semaphore hands
    /// released permits to its queue before new callers can take them).
    /// The price: while a request waits, every later one waits behind it,
    /// whatever its shard, for at most [`QUEUE_WAIT`].
    pub async fn hold(&self, bytes: usize, room: Room) -> Result<OwnedSemaphorePermit> {
        use tokio::sync::TryAcquireError;
        let units = queue_units(bytes, self.budget_units);
        let full = |waited: &str| {
            Error::Unavailable(format!(
                "write queue full: this node holds {} MiB of write requests waiting for raft{waited}; retry later",
                MAX_QUEUED_WRITE_BYTES >> 20
            ))
        };
        match self.queued.clone().try_acquire_many_owned(units) {
            Ok(held) => return Ok(held),
            Err(TryAcquireError::Closed) => return Err(shutting_down()),
            Err(TryAcquireError::NoPermits) if room == Room::Wait => {}
            Err(TryAcquireError::NoPermits) => return Err(full("")),
        }
        // The request's decoded events stay in memory while it waits:
        // bounded by the room to wait in.
        let waiting_units = queue_units(bytes, u32::MAX);
        let _waiting = match self.waiting.clone().try_acquire_many_owned(waiting_units) {
            Ok(w) => w,
            Err(_) => {
                return Err(full(&format!(", and {} MiB more wait for room", MAX_WAITING_WRITE_BYTES >> 20)))
            }
        };
        match tokio::time::timeout(self.wait, self.queued.clone().acquire_many_owned(units)).await {
            Ok(Ok(held)) => Ok(held),
            Ok(Err(_closed)) => Err(shutting_down()),
            Err(_) => Err(full(&format!(" (waited {} ms for room)", self.wait.as_millis()))),
        }
    }
}

/// The permits a request of `bytes` encoded bytes takes (at least one; a
/// request larger than the whole budget takes all of it).
fn queue_units(bytes: usize, budget_units: u32) -> u32 {
    bytes.div_ceil(QUEUE_UNIT).clamp(1, budget_units as usize) as u32
}

fn shutting_down() -> Error {
    Error::Unavailable("node is shutting down".into())
}

/// One shard's requests waiting, and its entries in flight.
#[derive(Default)]
struct ShardQueue {
    waiting: VecDeque<Pending>,
    in_flight: usize,
}

impl ShardQueue {
    /// Drops the waiting requests whose callers are gone (they timed out,
    /// answered "outcome unknown"), giving their bytes back to the node's
    /// budget. A shard whose leader has lost its quorum never takes them:
    /// they would hold the budget, and refuse every shard's writes, until
    /// it recovers.
    fn drop_abandoned(&mut self) {
        self.waiting.retain(|p| !p.reply.is_closed());
    }
}

/// How often the waiting requests are checked for abandoned ones (the
/// write timeout is seconds).
const PRUNE_EVERY: Duration = Duration::from_millis(500);

/// The node's proposals in flight.
struct Proposals {
    tasks: JoinSet<()>,
    /// Which shard each proposal task serves (also when it panicked).
    shard_of_task: HashMap<tokio::task::Id, GroupId>,
    /// Where the next round of proposals starts: after the shard served
    /// last, so that shards take turns at the node's pipeline.
    next_start: GroupId,
}

impl Proposals {
    /// Proposes `q`'s waiting requests while [`may_propose`] lets it.
    fn fill(&mut self, registry: &Registry, gid: GroupId, q: &mut ShardQueue) {
        while !q.waiting.is_empty() && may_propose(q.in_flight, self.tasks.len()) {
            self.next_start = GroupId(gid.0.saturating_add(1));
            let batch = gather(&mut q.waiting);
            if batch.is_empty() {
                break; // every request left was abandoned
            }
            let Some(replica) = registry.get(gid) else {
                // It moved away since the write looked (nothing was
                // proposed): retryable, unlike NOT_FOUND.
                let e = Error::Unavailable(format!(
                    "this node no longer hosts a replica of {gid} (it moved away; retry)"
                ));
                batch.into_iter().for_each(|p| drop(p.reply.send(Err(e.clone()))));
                continue;
            };
            q.in_flight += 1;
            let task = self.tasks.spawn(async move { propose(&replica, batch).await });
            self.shard_of_task.insert(task.id(), gid);
        }
    }
}

/// Batches and proposes until `stop` turns true (or every handle is gone);
/// then waits for the entries in flight, so no proposal outlives the node's
/// shutdown. Requests still queued are answered "shutting down". A request
/// for a shard this node hosts no replica of is answered NOT_FOUND.
pub async fn run(registry: Arc<Registry>, mut rx: mpsc::Receiver<Pending>, mut stop: watch::Receiver<bool>) {
    let mut queues: BTreeMap<GroupId, ShardQueue> = BTreeMap::new();
    let mut proposals =
        Proposals { tasks: JoinSet::new(), shard_of_task: HashMap::new(), next_start: GroupId(0) };
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = prune.tick() => queues.values_mut().for_each(ShardQueue::drop_abandoned),
            next = rx.recv() => match next {
                Some(p) => queues.entry(p.gid).or_default().waiting.push_back(p),
                None => break,
            },
            Some(done) = proposals.tasks.join_next_with_id(), if !proposals.tasks.is_empty() => {
                let id = match &done { Ok((id, ())) => *id, Err(e) => e.id() };
                if let Some(q) = proposals.shard_of_task.remove(&id).and_then(|gid| queues.get_mut(&gid)) {
                    q.in_flight -= 1;
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
        // Requests that arrived meanwhile join their shard's next entry.
        while let Ok(p) = rx.try_recv() {
            queues.entry(p.gid).or_default().waiting.push_back(p);
        }
        let start = proposals.next_start;
        for (gid, q) in queues.range_mut(start..) {
            proposals.fill(&registry, *gid, q);
        }
        for (gid, q) in queues.range_mut(..start) {
            proposals.fill(&registry, *gid, q);
        }
        queues.retain(|_, q| q.in_flight > 0 || !q.waiting.is_empty());
    }
    // Never proposed: said so (a reply dropped unsent means the outcome is
    // unknown, see `WriteBatcher::write`).
    rx.close();
    let queued =
        queues.into_values().flat_map(|q| q.waiting).chain(std::iter::from_fn(|| rx.try_recv().ok()));
    for p in queued {
        let _ = p.reply.send(Err(shutting_down()));
    }
    while proposals.tasks.join_next().await.is_some() {}
}

/// Takes requests from the front of a shard's queue while they fit one
/// entry (at least one, if any is still awaited); requests whose callers
/// are gone are dropped on the way.
fn gather(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut size = (0, 0);
    let mut batch = Vec::new();
    while let Some(p) = waiting.front() {
        if p.reply.is_closed() {
            waiting.pop_front();
            continue;
        }
        if !fits(size, p) {
            break;
        }
        size = (size.0 + p.events.len(), size.1.saturating_add(p.bytes));
        batch.extend(waiting.pop_front());
    }
    batch
}

async fn propose(replica: &Replica, batch: Vec<Pending>) {
    let (raft, sm, stamper) = (&replica.raft, &replica.sm, &replica.stamper);
    // The requests' queue permits are held until their replies are sent.
    let mut _queued = Vec::with_capacity(batch.len());
    let (requests, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| {
            _queued.push(p.queued);
            (p.events, p.reply)
        })
        .unzip();
    let stamp_ms = match stamper.stamp() {
        Ok(stamp) => stamp,
        Err(e) => return replies.into_iter().for_each(|r| drop(r.send(Err(e.clone())))),
    };
    let command = Command::Write { stamp_ms, requests: requests.into() };
    // openraft answers a proposal only when its index is applied or its
    // entry truncated: a deposed leader that catches up by a snapshot past
    // its own entries never hears of them. Once every caller has given up
    // (each waits at most its write timeout), nobody is left to answer:
    // the proposal's shard slot and queue bytes are freed. The entry may
    // still commit; event ids make the callers' retries exactly-once.
    let mut replies = replies;
    let Some(written) = unless_abandoned(raft.client_write(command), &mut replies).await else {
        tracing::debug!(group = %replica.gid, "every caller of a proposal gave up; not waiting for it");
        return;
    };
    match written {
        Ok(resp) => {
            let index = resp.log_id.index;
            // Acknowledge what a read will see: the entry's batch may still
            // be on its way into the database (see the state machine).
            // Committed: whatever fails from here on, the entry applies on
            // the followers (and here on replay), so its outcome is unknown
            // to the callers, not an internal error they must not retry.
            let committed = |e: String| {
                Error::Unavailable(format!(
                    "{e} after the write committed at index {index}; {OUTCOME_UNKNOWN}: retry with the same \
                     event_ids, duplicates are skipped"
                ))
            };
            if let Err(e) = sm.wait_written(index).await {
                return replies.into_iter().for_each(|r| drop(r.send(Err(committed(e.clone())))));
            }
            let outcomes = match resp.data {
                CommandResult::Write(outcomes) if outcomes.len() == replies.len() => outcomes,
                other => {
                    let e = format!("unexpected apply result {other:?}");
                    return replies.into_iter().for_each(|r| drop(r.send(Err(committed(e.clone())))));
                }
            };
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let result = match outcome {
                    WriteOutcome::Applied(counts) => Ok((counts, index)),
                    WriteOutcome::Rejected { reason } => Err(Error::FailedPrecondition(reason)),
                    WriteOutcome::Deferred { reason } => Err(Error::Unavailable(reason)),
                };
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            let voters = raft.metrics().borrow().membership_config.membership().voter_ids().count();
            let e = redirect_of_a_write(client_write_error(e), voters);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// A failed write proposal of a group of `voters` voters. openraft answers
/// ForwardToLeader both to a proposal it refused (no longer the leader:
/// nothing was appended) and to one whose entry it appended and then
/// truncated (a new leader's log conflicted). With 3 voters or fewer that
/// entry can never commit: the new leader was elected without it, so at
/// most the old leader held it. With more, a later leader may hold it and
/// commit it: the outcome is unknown (a redirect would be followed, and
/// events without an id applied twice).
fn redirect_of_a_write(e: Error, voters: usize) -> Error {
    match e {
        Error::NotLeader { .. } if voters > 3 => Error::Unavailable(format!(
            "{e} (the proposal may have been appended before leadership moved); {OUTCOME_UNKNOWN}: retry \
             with the same event_ids, duplicates are skipped"
        )),
        e => e,
    }
}

/// `work`'s output, or `None` once every one of `replies` is closed (their
/// callers gave up) before it is done.
async fn unless_abandoned<F: std::future::Future, T>(
    work: F,
    replies: &mut [oneshot::Sender<T>],
) -> Option<F::Output> {
    let abandoned = async {
        for reply in replies.iter_mut() {
            reply.closed().await;
        }
    };
    tokio::select! {
        done = work => Some(done),
        () = abandoned => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Result<(WriteCounts, u64)>>;

    /// A request, and where its caller waits (dropping it abandons it).
    fn request(events: usize, bytes: usize) -> (Pending, Answer) {
        let event = Event::bare();
        let queued = Arc::new(Semaphore::new(0)).try_acquire_many_owned(0).expect("no permits needed");
        let (reply, answer) = oneshot::channel();
        (Pending { gid: GroupId(0), events: vec![event; events], bytes, reply, queued }, answer)
    }

    #[tokio::test]
    async fn abandoned_requests_give_their_budget_back_while_their_shard_is_stuck() {
        let events = || vec![Event::bare(); 40];
        let size = encoded_len(&events());
        // Room for two such requests, not three.
        let (batcher, mut rx) = WriteBatcher::with_budget(
            2 * size + size / 2 + QUEUE_UNIT,
            MAX_WAITING_WRITE_BYTES,
            Duration::ZERO,
        );
        let (a, b) = (batcher.clone(), batcher.clone());
        let gave_up = tokio::spawn(async move { a.write(GroupId(0), events()).await });
        let awaited = tokio::spawn(async move { b.write(GroupId(0), events()).await });
        // Both wait in a shard that proposes nothing (no quorum).
        let mut q = ShardQueue::default();
        q.waiting.extend([rx.recv().await.unwrap(), rx.recv().await.unwrap()]);
        let e = batcher.hold(size, Room::Wait).await.expect_err("the budget is taken");
        assert!(matches!(&e, Error::Unavailable(m) if m.starts_with("write queue full")), "{e}");
        assert!(e.leader_refused(), "not sent to another replica");
        q.drop_abandoned();
        assert_eq!(q.waiting.len(), 2, "both callers still wait");
        // One caller times out (its future is dropped).
        gave_up.abort();
        let _ = gave_up.await;
        q.drop_abandoned();
        assert_eq!(q.waiting.len(), 1, "the abandoned one is dropped");
        drop(batcher.hold(size, Room::Wait).await.expect("its bytes are back"));
        // The other is still proposed when the shard takes entries again;
        // an abandoned one at the front is skipped, and a queue of only
        // abandoned ones gathers nothing.
        q.waiting.push_front(request(1, 10).0);
        let batch = gather(&mut q.waiting);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].events.len(), 40);
        q.waiting.push_back(request(1, 10).0);
        assert!(gather(&mut q.waiting).is_empty() && q.waiting.is_empty());
        drop(batch);
        let e = awaited.await.unwrap().unwrap_err();
        assert!(e.outcome_unknown(), "a reply dropped unsent may have been proposed: {e}");
    }

    /// A proposal openraft never answers (a deposed leader that caught up
    /// by a snapshot past its own entries) is let go once every caller has
    /// given up, so its shard slot and queue bytes come back; while one
    /// still waits, it is awaited.
    #[tokio::test]
    async fn a_proposal_is_let_go_once_every_caller_gave_up() {
        let (pending, mut answers): (Vec<_>, Vec<_>) = (0..3).map(|_| request(1, 10)).unzip();
        let mut replies: Vec<_> = pending.into_iter().map(|p| p.reply).collect();
        let never = std::future::pending::<()>;
        let waiting =
            tokio::time::timeout(Duration::from_millis(100), unless_abandoned(never(), &mut replies));
        assert!(waiting.await.is_err(), "callers still wait: the proposal is awaited");
        answers.truncate(1);
        let waiting =
            tokio::time::timeout(Duration::from_millis(100), unless_abandoned(never(), &mut replies));
        assert!(waiting.await.is_err(), "one caller still waits");
        answers.clear();
        let let_go = tokio::time::timeout(Duration::from_secs(5), unless_abandoned(never(), &mut replies));
        assert_eq!(let_go.await.expect("let go at once"), None);
        let (p, _answer) = request(1, 10);
        let mut live = vec![p.reply];
        assert_eq!(unless_abandoned(async { 7 }, &mut live).await, Some(7), "a done proposal is answered");
    }

    #[test]
    fn a_redirect_of_a_write_is_an_unknown_outcome_only_with_more_than_three_voters() {
        let redirect =
            || Error::NotLeader { leader_id: Some(2), leader_addr: Some("n2".into()), group: None };
        for voters in [1, 2, 3] {
            assert_eq!(redirect_of_a_write(redirect(), voters), redirect(), "{voters} voters");
        }
        for voters in [4, 5, 7] {
            let e = redirect_of_a_write(redirect(), voters);
            assert!(e.outcome_unknown() && e.to_string().starts_with("not the leader; node 2 leads"), "{e}");
        }
        let other = Error::Unavailable("node is shutting down".into());
        assert_eq!(redirect_of_a_write(other.clone(), 5), other);
    }

    /// Writes held at a leadership transfer's gate hold their bytes: they
    /// cannot pile up beyond the node's budget while the transfer runs.
    #[tokio::test]
    async fn writes_waiting_at_a_paused_gate_count_in_the_budget() {
        let events = || vec![Event::bare(); 40];
        let size = encoded_len(&events());
        // Room for one such request, not two.
        let (batcher, _rx) =
            WriteBatcher::with_budget(size + size / 2 + QUEUE_UNIT, MAX_WAITING_WRITE_BYTES, Duration::ZERO);
        let gate = ProposalGate::default();
        let pause = gate.pause(Duration::from_millis(10)).await.unwrap();
        let waiting = tokio::spawn({
            let (batcher, gate) = (batcher.clone(), gate.clone());
            async move { batcher.admit(&gate, Duration::from_secs(5), &events(), Room::Wait).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "it waits at the gate");
        let e = batcher
            .admit(&gate, Duration::from_secs(5), &events(), Room::Wait)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(&e, Error::Unavailable(m) if m.starts_with("write queue full")), "{e}");
        drop(pause);
        waiting.await.unwrap().expect("admitted once the transfer ends");
        let admitted = batcher.admit(&gate, Duration::from_secs(5), &events(), Room::Wait).await;
        assert!(admitted.is_ok(), "its bytes came back when it was answered");
    }

    #[tokio::test]
    async fn a_full_write_queue_refuses_at_once_and_frees_as_requests_are_answered() {
        let events = || vec![Event::bare(); 40];
        let size = encoded_len(&events());
        // Room for one such request, not two.
        let (batcher, mut rx) =
            WriteBatcher::with_budget(size + size / 2 + QUEUE_UNIT, MAX_WAITING_WRITE_BYTES, Duration::ZERO);
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.write(GroupId(0), events()).await }
        });
        let queued = rx.recv().await.expect("the first request is queued");
        let e = batcher.write(GroupId(1), events()).await.expect_err("no room for a second, in any shard");
        assert!(matches!(&e, Error::Unavailable(m) if m.starts_with("write queue full")), "{e}");
        // Answered (here: dropped unanswered), the first frees its share.
        drop(queued);
        assert!(matches!(first.await.unwrap(), Err(Error::Unavailable(_))));
        let second = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.write(GroupId(0), events()).await }
        });
        let queued = rx.recv().await.expect("queued now");
        assert_eq!(queued.events.len(), 40);
        // Bytes held for a forwarded part count against the same budget.
        let e = batcher.hold(size, Room::Wait).await.expect_err("no room beside the queued request");
        assert!(matches!(&e, Error::Unavailable(m) if m.starts_with("write queue full")), "{e}");
        drop((queued, second));
        let held = batcher.hold(size, Room::Wait).await.expect("room once it is answered");
        let e = batcher.write(GroupId(1), events()).await.expect_err("the held part takes the room");
        assert!(matches!(&e, Error::Unavailable(m) if m.starts_with("write queue full")), "{e}");
        drop(held);
    }

    /// A large request that finds the budget full waits for room, and the
    /// bytes given back go to it first: small requests that would each fit
    /// what is left no longer take it before it (before, it was refused
    /// while they kept the budget full). One that waits too long, or finds
    /// the room to wait in full, is refused naming the limit.
    #[tokio::test]
    async fn a_large_request_waits_for_room_ahead_of_small_ones_that_come_later() {
        let unit = QUEUE_UNIT;
        let (batcher, _rx) = WriteBatcher::with_budget(10 * unit, 8 * unit, Duration::from_secs(30));
        let mut small: Vec<_> = Vec::new();
        for _ in 0..10 {
            small.push(batcher.hold(unit, Room::Wait).await.expect("room for a small request"));
        }
        let large = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.hold(5 * unit, Room::Wait).await }
        });
        // Until the large one waits (before, it was refused at once).
        for _ in 0..1000 {
            if batcher.waiting.available_permits() < 8 || large.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(!large.is_finished(), "the large request waits: {:?}", large.await);
        // A part another node forwarded does not wait.
        let e = batcher.hold(unit, Room::Now).await.expect_err("no room now");
        assert!(matches!(&e, Error::Unavailable(m) if m.starts_with("write queue full")), "{e}");
        // Beside it, the room to wait in holds 3 KiB more: a request of 4 is
        // refused at once.
        let e = batcher.hold(4 * unit, Room::Wait).await.expect_err("no room to wait in");
        assert!(matches!(&e, Error::Unavailable(m) if m.starts_with("write queue full")), "{e}");
        assert!(e.to_string().contains("wait for room"), "{e}");
        for freed in 1..=4 {
            drop(small.pop());
            // What was given back went to the waiting request, not to a
            // small one that comes later and would fit it.
            assert_eq!(batcher.queued.available_permits(), 0, "after {freed} freed");
            batcher.hold(unit, Room::Now).await.expect_err("a later small one does not pass it");
            tokio::task::yield_now().await;
            assert!(!large.is_finished(), "the large one needs 5, {freed} were freed");
        }
        drop(small.pop());
        let held = large.await.unwrap().expect("the large request has its room");
        assert_eq!(batcher.waiting.available_permits(), 8, "it no longer counts as waiting");
        drop(held);
        assert_eq!(batcher.queued.available_permits(), 5, "its room is back");

        // A request that waits longer than its wait is refused, and what
        // was given back to it while it waited is free again.
        let (batcher, _rx) = WriteBatcher::with_budget(4 * unit, 8 * unit, Duration::from_millis(200));
        let mut all: Vec<_> = Vec::new();
        for _ in 0..4 {
            all.push(batcher.hold(unit, Room::Wait).await.expect("room"));
        }
        let waiting = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.hold(3 * unit, Room::Wait).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        all.truncate(2);
        assert_eq!(batcher.queued.available_permits(), 0, "the two freed went to the waiting request");
        let e = waiting.await.unwrap().expect_err("no room within the wait");
        assert!(e.to_string().contains("waited 200 ms for room"), "{e}");
        assert_eq!(batcher.queued.available_permits(), 2, "its partial share came back");
        assert_eq!(batcher.waiting.available_permits(), 8, "a refused request no longer waits");
    }

    #[test]
    fn a_second_entry_in_flight_only_while_the_node_pipeline_has_room() {
        // A shard with nothing in flight always proposes.
        assert!(may_propose(0, 0));
        assert!(may_propose(0, NODE_PIPELINE));
        assert!(may_propose(0, 10 * NODE_PIPELINE));
        // A second entry while the node has room (one group: always).
        assert!(may_propose(1, 1));
        assert!(may_propose(1, NODE_PIPELINE - 1));
        assert!(!may_propose(1, NODE_PIPELINE));
        // Never a third.
        assert!(!may_propose(MAX_IN_FLIGHT, 0));
    }

    #[test]
    fn a_request_takes_its_kib_and_at_most_the_whole_budget() {
        assert_eq!(queue_units(0, 100), 1);
        assert_eq!(queue_units(1, 100), 1);
        assert_eq!(queue_units(QUEUE_UNIT + 1, 100), 2);
        assert_eq!(queue_units(usize::MAX, 100), 100);
    }

    /// Batches as (events, bytes) of each request, gathered from `queue`.
    fn batches(queue: Vec<(Pending, Answer)>) -> Vec<Vec<(usize, usize)>> {
        let (queue, _answers): (Vec<_>, Vec<_>) = queue.into_iter().unzip();
        let mut waiting: VecDeque<Pending> = queue.into();
        let mut out = Vec::new();
        while !waiting.is_empty() {
            let batch = gather(&mut waiting);
            out.push(batch.iter().map(|p| (p.events.len(), p.bytes)).collect());
        }
        out
    }

    #[test]
    fn entries_are_capped_by_bytes_and_requests_are_never_split() {
        const MB: usize = 1024 * 1024;
        let queue = vec![request(10, MB), request(10, 2 * MB), request(10, 2 * MB), request(10, 16 * MB)];
        let got = batches(queue);
        // 1 + 2 MiB fit; the next 2 MiB would pass 4 MiB; 16 MiB goes alone.
        assert_eq!(got, [vec![(10, MB), (10, 2 * MB)], vec![(10, 2 * MB)], vec![(10, 16 * MB)]]);
    }

    #[test]
    fn entries_are_still_capped_by_events() {
        let half = MAX_EVENTS_PER_ENTRY / 2;
        let got = batches(vec![request(half, 100), request(half, 100), request(1, 100)]);
        assert_eq!(got, [vec![(half, 100), (half, 100)], vec![(1, 100)]]);
    }

    #[test]
    fn encoded_len_is_the_size_inside_the_entry() {
        let events = request(3, 0).0.events;
        let one = Command::Write { stamp_ms: 1, requests: Arc::new(vec![events.clone()]) };
        let two = Command::Write { stamp_ms: 1, requests: Arc::new(vec![events.clone(), events.clone()]) };
        let grow = crate::store::codec::encode(&two).len() - crate::store::codec::encode(&one).len();
        assert_eq!(encoded_len(&events), grow);
    }
}
