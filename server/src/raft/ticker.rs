//! Time-driven tags: while this node leads, it checks the timer index every
//! tick interval and, when a user's wake time has come, proposes a
//! `Command::Tick` stamped with its clock. Every replica then re-evaluates
//! exactly the due users when it applies the tick.
//!
//! Each proposal takes a pass from the [`ProposalGate`] first; while a
//! leadership transfer holds proposals off, the round is skipped.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use super::gate::ProposalGate;
use crate::store::apply::first_timer;
use crate::store::SmStore;
use crate::types::{Command, CommandResult, Raft};

pub fn start(raft: Raft, sm: Arc<SmStore>, gate: ProposalGate, interval: Duration) {
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        loop {
            tokio::time::sleep(interval).await;
            let state = metrics.borrow_and_update().state;
            match state {
                ServerState::Shutdown => return,
                ServerState::Leader => {}
                _ => continue,
            }
            reevaluate(&raft, &sm, &gate).await;
            // Drain: a tick handles a bounded number of users.
            loop {
                let now = crate::wall_clock_ms();
                match first_timer(&sm.db()) {
                    Ok(Some(t)) if t <= now => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the timer index");
                        break;
                    }
                }
                let Some(_pass) = gate.try_pass() else { break };
                match raft.client_write(Command::Tick { stamp_ms: now }).await {
                    Ok(resp) if matches!(resp.data, CommandResult::Ticked { users: 0 }) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "tick not committed");
                        break;
                    }
                }
            }
        }
    });
}

/// Users per `Reevaluate` entry.
const REEVAL_BATCH: u32 = 500;
/// `Reevaluate` entries per ticker round, so ingest keeps its share.
const REEVAL_ROUNDS: usize = 20;

/// Drives the background re-evaluation after a schema change.
async fn reevaluate(raft: &Raft, sm: &SmStore, gate: &ProposalGate) {
    for _ in 0..REEVAL_ROUNDS {
        let Some(_pass) = gate.try_pass() else { return };
        let progress = match sm.reeval_progress() {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "reading re-evaluation progress"),
        };
        let command = Command::Reevaluate {
            stamp_ms: crate::wall_clock_ms(),
            version: progress.version,
            after: progress.cursor,
            limit: REEVAL_BATCH,
        };
        if let Err(e) = raft.client_write(command).await {
            return tracing::debug!(error = %e, "re-evaluation batch not committed");
        }
    }
}
