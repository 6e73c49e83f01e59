//! The `portraitd` this package builds has no fault injection: the flag is
//! refused at start and `Admin.SetPartition` is refused with a reason. (A
//! build that unifies the `fault-injection` feature in, such as a bare
//! `cargo test --workspace`, leaves these tests out; `make test` does not.)
#![cfg(not(feature = "fault-injection"))]

#[allow(dead_code)]
use crate::common;

use common::TestNode;
use portrait_client::ClientError;
use tonic::Code;

#[tokio::test]
async fn set_partition_is_refused_with_the_reason() {
    let node = TestNode::start().await;
    let err = node.client().await.set_partition(vec![2]).await.unwrap_err();
    let ClientError::Rpc(status) = err else { panic!("{err}") };
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("this build has no fault injection"), "{status:?}");
}

#[test]
fn the_flag_is_refused_and_the_version_says_nothing_of_faults() {
    let bin = env!("CARGO_BIN_EXE_portraitd");
    // Its own data dir and free ports, should it start after all.
    let dir = tempfile::tempdir().unwrap();
    let ports = (common::free_port(), common::free_port());
    let (status, stderr) = common::exit_of(common::portraitd(dir.path(), ports, 1).arg("--fault-injection"));
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("--fault-injection: this build has no fault injection"), "{stderr}");
    let version = std::process::Command::new(bin).arg("--version").output().unwrap();
    assert!(!String::from_utf8_lossy(&version.stdout).contains("fault"));
}
