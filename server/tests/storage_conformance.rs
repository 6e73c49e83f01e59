//! openraft's storage conformance suite against the RocksDB log store and
//! state machine, each built on a fresh temp dir (real RocksDB on disk).

use openraft::testing::{StoreBuilder, Suite};
use portrait_server::store::{GroupState, LogStore, StateMachine};
use portrait_server::types::{StorageError, TypeConfig};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let sm = GroupState::open(dir.path()).expect("open state machine");
        let log = LogStore::open(dir.path(), Some(sm.clone())).expect("open log store");
        let state_machine = StateMachine::new(sm, dir.path()).expect("snapshot dir");
        Ok((dir, log, state_machine))
    }
}

#[test]
fn rocksdb_stores_pass_openraft_suite() {
    Suite::test_all(RocksBuilder).expect("storage suite");
}
