//! The cluster tests: real `portraitd-faults` processes on loopback, one
//! test binary (one link of the node and its dependencies), a module per
//! subject. Run one module with `cargo test --release -p
//! portrait-cluster-tests --test cluster -- exact_once::`.

mod backup;
mod clock;
mod durability;
mod elastic;
mod exact_once;
mod forwarded_reads;
mod join;
mod lag;
mod large_entries;
mod linearizable;
mod membership;
mod move_faults;
mod placement;
mod proxy_faults;
mod quiet;
mod read_storm;
mod replication;
mod routing;
mod schema_change;
mod shard_faults;
mod shards;
mod snapshot_catch_up;
mod tls;
mod transfer;
