//! The one place where domain errors become `tonic::Status`.
//!
//! Metadata: `x-portrait-error` carries the stable error code; a
//! non-leader adds `x-portrait-leader` (the leader's address) and
//! `x-portrait-leader-id`, so clients can retry there.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::Error;

pub const ERROR_CODE_KEY: &str = "x-portrait-error";
pub const LEADER_KEY: &str = "x-portrait-leader";
pub const LEADER_ID_KEY: &str = "x-portrait-leader-id";

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::NotLeader { .. } | Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        let meta = status.metadata_mut();
        meta.insert(ERROR_CODE_KEY, MetadataValue::from_static(e.code()));
        if let Error::NotLeader { leader_id, leader_addr } = &e {
            if let Some(addr) = leader_addr.as_deref().and_then(|a| a.parse().ok()) {
                meta.insert(LEADER_KEY, addr);
            }
            if let Some(id) = leader_id {
                meta.insert(LEADER_ID_KEY, MetadataValue::from(*id));
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let s = Status::from(Error::invalid("events[2].family", "unknown family \"x\""));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "events[2].family: unknown family \"x\"");
        assert_eq!(s.metadata().get(ERROR_CODE_KEY).unwrap(), "INVALID_ARGUMENT");
    }

    #[test]
    fn not_leader_carries_the_leader_address() {
        let e = Error::NotLeader { leader_id: Some(2), leader_addr: Some("http://127.0.0.1:7702".into()) };
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_KEY).unwrap(), "http://127.0.0.1:7702");
        assert_eq!(s.metadata().get(LEADER_ID_KEY).unwrap(), "2");
        assert_eq!(s.metadata().get(ERROR_CODE_KEY).unwrap(), "NOT_LEADER");
    }
}
