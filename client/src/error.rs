//! The client's one error type.
//!
//! `Rpc` keeps the server's `tonic::Status` so callers can branch on its code;
//! its `Display` is the stable wire form `CODE: message`, e.g.
//! `INVALID_ARGUMENT: events[0].user_id: must not be empty`.

use tonic::{Code, Status};

/// Everything a Portrait client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is malformed or could not be reached.
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server (or the transport, once connected) answered with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(Status),
    /// A JSON event could not be converted; `line` is 1-based.
    #[error("line {line}: {reason}")]
    Json { line: usize, reason: String },
    /// A client setting (token, certificate) is unusable.
    #[error("invalid client settings: {0}")]
    Config(String),
    /// A backup or restore could not go on (`crate::backup`): what and why.
    #[error("{0}")]
    Backup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The gRPC code of an `Rpc` error.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rpc(status) => Some(status.code()),
            _ => None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Rpc(status)
    }
}

/// The canonical upper-case name of a gRPC code, as in the gRPC spec.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_display_is_code_and_message() {
        let err = ClientError::from(Status::invalid_argument("events[0].user_id: must not be empty"));
        assert_eq!(err.to_string(), "INVALID_ARGUMENT: events[0].user_id: must not be empty");
        assert_eq!(err.code(), Some(Code::InvalidArgument));
    }

    #[test]
    fn json_display_names_the_line() {
        let err = ClientError::Json { line: 7, reason: "missing field `user_id`".into() };
        assert_eq!(err.to_string(), "line 7: missing field `user_id`");
    }
}
