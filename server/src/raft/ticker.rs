//! Time-driven tags: one task for the whole node. Every tick interval it
//! looks at each shard this node leads (their rounds run concurrently) and,
//! when a user's wake time has come in that shard's timer index, proposes a
//! `Command::Tick` stamped with its clock in that shard's log. Every
//! replica of the shard then re-evaluates exactly the due users when it
//! applies the tick.
//!
//! Each proposal takes a pass from the [`ProposalGate`] first; while a
//! leadership transfer holds proposals off, the round is skipped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::gate::ProposalGate;
use super::replica::Registry;
use super::stamp::Stamper;
use crate::store::apply::first_timer;
use crate::store::GroupState;
use crate::types::{Command, CommandResult, Raft};

/// Runs the ticker until `stop` turns true.
pub async fn run(registry: Arc<Registry>, interval: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let leading: Vec<_> = registry.all().into_iter().filter(|r| r.is_leader()).collect();
        if leading.is_empty() {
            continue;
        }
        let rounds = leading.iter().map(|r| round(&r.raft, &r.sm, &r.gate, &r.stamper));
        // A round may wait on raft (no quorum): the stop signal cuts it short.
        tokio::select! {
            _ = futures::future::join_all(rounds) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One leader round: re-evaluation batches, then ticks while timers are due.
async fn round(raft: &Raft, sm: &GroupState, gate: &ProposalGate, stamper: &Stamper) {
    reevaluate(raft, sm, gate, stamper).await;
    // Drain: a tick handles a bounded number of users.
    loop {
        let now = match stamper.stamp() {
            Ok(stamp) => stamp,
            Err(e) => return tracing::debug!(error = %e, "no tick: the clock is refused"),
        };
        match first_timer(&sm.db(), sm.gid()) {
            Ok(Some(t)) if t <= now => {}
            Ok(_) => return,
            Err(e) => return tracing::warn!(error = %e, "reading the timer index"),
        }
        let Some(_pass) = gate.try_pass() else { return };
        match raft.client_write(Command::Tick { stamp_ms: now }).await {
            Ok(resp) if matches!(resp.data, CommandResult::Ticked { users: 0 }) => return,
            Ok(_) => {}
            Err(e) => return tracing::debug!(error = %e, "tick not committed"),
        }
    }
}

/// Users per `Reevaluate` entry.
const REEVAL_BATCH: u32 = 500;
/// `Reevaluate` entries per ticker round, so ingest keeps its share.
const REEVAL_ROUNDS: usize = 20;

/// Drives the background re-evaluation after a schema change.
async fn reevaluate(raft: &Raft, sm: &GroupState, gate: &ProposalGate, stamper: &Stamper) {
    for _ in 0..REEVAL_ROUNDS {
        let progress = match sm.reeval_progress() {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "reading re-evaluation progress"),
        };
        // Only now: a pass wakes a group at rest (see `super::quiet`).
        let Some(_pass) = gate.try_pass() else { return };
        let stamp_ms = match stamper.stamp() {
            Ok(stamp) => stamp,
            Err(e) => return tracing::debug!(error = %e, "no re-evaluation: the clock is refused"),
        };
        let command = Command::Reevaluate {
            stamp_ms,
            version: progress.version,
            after: progress.cursor,
            limit: REEVAL_BATCH,
        };
        if let Err(e) = raft.client_write(command).await {
            return tracing::debug!(error = %e, "re-evaluation batch not committed");
        }
    }
}
