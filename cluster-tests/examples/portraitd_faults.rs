//! `portraitd-faults`: `portraitd` built with the cargo feature
//! `fault-injection` (`Admin.SetPartition` and its message filters), run by
//! the cluster tests. Same daemon code; never shipped.

fn main() {
    portrait_server::daemon::main()
}
