//! openraft's storage conformance suite against the RocksDB stores: one
//! group's log on the node's log engine and the state machine, each built
//! on a fresh temp dir (real RocksDB on disk). The unit tests of
//! `store::log_store` also run it next to neighbour groups.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use portrait_server::store::{LogEngine, LogStore, PurgeGuard, StateDb, StateMachine};
use portrait_server::types::{GroupId, StorageError, TypeConfig};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDb::open(dir.path()).expect("open the state database");
        let sm = state.open_group(GroupId(3)).expect("open the group's state");
        let engine = LogEngine::open(dir.path()).expect("open log engine");
        let guard: Arc<dyn PurgeGuard> = sm.clone();
        let log = engine.group(GroupId(3), Some(guard)).expect("open group");
        let state_machine = StateMachine::new(sm, dir.path()).expect("snapshot dir");
        Ok((dir, log, state_machine))
    }
}

#[test]
fn rocksdb_stores_pass_openraft_suite() {
    Suite::test_all(RocksBuilder).expect("storage suite");
}
