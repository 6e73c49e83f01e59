//! Time-driven tags: while this node leads, it checks the timer index every
//! tick interval and, when a user's wake time has come, proposes a
//! `Command::Tick` stamped with its clock. Every replica then re-evaluates
//! exactly the due users when it applies the tick.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use crate::store::apply::first_timer;
use crate::store::SmStore;
use crate::types::{Command, CommandResult, Raft};

pub fn start(raft: Raft, sm: Arc<SmStore>, interval: Duration) {
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
