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
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::NotLeader { .. } | Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Internal(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        let meta = status.metadata_mut();
        meta.insert(ERROR_CODE_KEY, MetadataValue::from_static(e.code()));
        if let Error::NotLeader { leader_id, leader_addr, .. } = &e {
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

/// The other way, for a call this node made to a peer on a client's
/// behalf (a forwarded write part): the peer's answer as the error it was
/// there, so the client sees the same code, message and redirect.
pub fn error_from_status(status: &Status) -> Error {
    let message = status.message().to_string();
    let meta = status.metadata();
    let code = meta.get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if code == "NOT_LEADER" {
        let leader_addr = meta.get(LEADER_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
        let leader_id = meta.get(LEADER_ID_KEY).and_then(|v| v.to_str().ok()?.parse().ok());
        return Error::NotLeader { leader_id, leader_addr, group: group_named(&message) };
    }
    match status.code() {
        Code::InvalidArgument => match message.split_once(": ") {
            Some((field, reason)) => Error::invalid(field, reason),
            None => Error::invalid("events", message),
        },
        Code::NotFound => Error::NotFound(message),
        Code::FailedPrecondition => Error::FailedPrecondition(message),
        Code::AlreadyExists => Error::AlreadyExists(message),
        Code::DeadlineExceeded => Error::DeadlineExceeded(message),
        Code::ResourceExhausted => Error::ResourceExhausted(message),
        Code::Internal => Error::Internal(message.trim_start_matches("internal error: ").to_string()),
        _ => Error::Unavailable(message),
    }
}

/// The group a NOT_LEADER message names (`shard 3: not the leader...`,
/// `meta: not the leader...`), if any.
fn group_named(message: &str) -> Option<crate::types::GroupId> {
    use crate::types::GroupId;
    match message.split_once(": not the leader")?.0 {
        "meta" => Some(GroupId::META),
        named => named.strip_prefix("shard ")?.parse().ok().map(GroupId),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::GroupId;

    #[test]
    fn invalid_argument_names_the_field() {
        let s = Status::from(Error::invalid("events[2].family", "unknown family \"x\""));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "events[2].family: unknown family \"x\"");
        assert_eq!(s.metadata().get(ERROR_CODE_KEY).unwrap(), "INVALID_ARGUMENT");
    }

    #[test]
    fn a_forwarded_error_comes_back_as_it_was() {
        let errors = [
            Error::NotLeader {
                leader_id: Some(2),
                leader_addr: Some("http://127.0.0.1:7702".into()),
                group: None,
            },
            Error::NotLeader { leader_id: None, leader_addr: None, group: None }.in_shard(GroupId(3)),
            Error::NotLeader { leader_id: Some(1), leader_addr: None, group: None }.in_shard(GroupId::META),
            Error::invalid("events", "bad"),
            Error::FailedPrecondition("schema changed".into()),
            Error::AlreadyExists("shard 0 was already restored".into()),
            Error::Unavailable("no quorum".into()),
        ];
        for e in errors {
            let back = error_from_status(&Status::from(e.clone()));
            assert_eq!((back.code(), back.to_string()), (e.code(), e.to_string()));
            assert_eq!(back, e);
        }
        let named =
            Error::NotLeader { leader_id: Some(2), leader_addr: None, group: None }.in_shard(GroupId(3));
        assert_eq!(named.to_string(), "shard 3: not the leader; node 2 leads");
    }

    #[test]
    fn not_leader_carries_the_leader_address() {
        let e = Error::NotLeader {
            leader_id: Some(2),
            leader_addr: Some("http://127.0.0.1:7702".into()),
            group: None,
        };
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_KEY).unwrap(), "http://127.0.0.1:7702");
        assert_eq!(s.metadata().get(LEADER_ID_KEY).unwrap(), "2");
        assert_eq!(s.metadata().get(ERROR_CODE_KEY).unwrap(), "NOT_LEADER");
    }
}
