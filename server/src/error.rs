//! The node's error type. Services map it to `tonic::Status` in one place
//! (`service::status`), with a stable machine-readable code in the
//! `x-portrait-error` metadata key.

/// An error a Portrait call can end with (serializable: a part of a
/// forwarded write answers with its own).
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// Bad input; `field` is a path such as `events[3].attrs.price`.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but cannot be applied in the current state
    /// (e.g. the schema changed under it).
    #[error("{0}")]
    FailedPrecondition(String),
    /// What the call would create exists already (a shard restored from
    /// the same backup by an earlier run).
    #[error("{0}")]
    AlreadyExists(String),
    /// This node is not the leader; retry on `leader_addr` when known.
    /// Inside the cluster the address is a peer address; answers to
    /// clients carry the leader's client address instead (see
    /// `service::epoch`). The message names the node, and the group
    /// (shard) once known (`in_shard`).
    #[error("{}not the leader{}", group.map(|g| format!("{g}: ")).unwrap_or_default(), leader_id.map(|l| format!("; node {l} leads")).unwrap_or_else(|| "; no leader is known yet".into()))]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String>, group: Option<crate::types::GroupId> },
    /// Temporarily unable to serve (shutting down, election in progress).
    #[error("{0}")]
    Unavailable(String),
    /// A bounded wait ran out before the operation could finish (e.g. a
    /// leadership transfer whose target did not catch up or win in time).
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The node lacks a resource the call needs (e.g. free disk for a
    /// backup's scratch files); retry elsewhere or once it is freed. Last:
    /// errors cross nodes bincode-encoded, by variant position, so a new
    /// variant goes after the others (nodes of two versions stay readable
    /// to each other).
    #[error("{0}")]
    ResourceExhausted(String),
}

/// Part of every UNAVAILABLE message about a write that may have been
/// proposed (and so may yet apply): [`Error::outcome_unknown`]. The
/// client reads it too.
pub use portrait_proto::OUTCOME_UNKNOWN;

/// Part of every UNAVAILABLE message of a shard's leader that refused a
/// write for now (its write queue is full, its shard is behind the schema):
/// [`Error::leader_refused`].
pub const RETRY_LATER: &str = "retry later";

impl Error {
    /// Whether this failure of a write leaves its outcome unknown: it may
    /// have been proposed and may still apply, so it must not be sent to
    /// another node (events without an id would apply twice); the caller
    /// retries with the same event ids instead.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Unavailable(m) if m.contains(OUTCOME_UNKNOWN))
    }

    /// Whether the shard's leader refused a write for now: nothing was
    /// proposed, and another replica would only redirect to that leader,
    /// so the part is not sent on; the caller retries later.
    pub fn leader_refused(&self) -> bool {
        matches!(self, Error::Unavailable(m) if m.contains(RETRY_LATER))
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    pub fn internal(e: impl std::fmt::Display) -> Error {
        Error::Internal(e.to_string())
    }

    /// Prefixes the field path, e.g. `user_id` → `events[3].user_id`.
    pub fn within(self, prefix: &str) -> Error {
        match self {
            Error::InvalidArgument { field, reason } => {
                Error::InvalidArgument { field: format!("{prefix}.{field}"), reason }
            }
            other => other,
        }
    }

    /// Names the shard an error came from: `shard 3: ...`. A field path
    /// already points into the request; a redirect to the shard's leader
    /// keeps its metadata (what a client follows) and names the shard in
    /// its message.
    pub fn in_shard(self, group: crate::types::GroupId) -> Error {
        match self {
            Error::NotLeader { leader_id, leader_addr, group: None } => {
                Error::NotLeader { leader_id, leader_addr, group: Some(group) }
            }
            Error::NotFound(m) => Error::NotFound(format!("{group}: {m}")),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(format!("{group}: {m}")),
            Error::Unavailable(m) => Error::Unavailable(format!("{group}: {m}")),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(format!("{group}: {m}")),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(format!("{group}: {m}")),
            Error::Internal(m) => Error::Internal(format!("{group}: {m}")),
            other => other,
        }
    }

    /// An error about item `n` of a part of a request (`events[n]...`, in
    /// a field path or at the start of a message) names the item's place
    /// in the whole request, `positions[n]`, instead.
    pub fn reindexed(self, list: &str, positions: &[usize]) -> Error {
        let at = |path: &str| -> Option<String> {
            let rest = path.strip_prefix(list)?.strip_prefix('[')?;
            let (n, rest) = rest.split_once(']')?;
            let i = positions.get(n.parse::<usize>().ok()?)?;
            Some(format!("{list}[{i}]{rest}"))
        };
        match self {
            Error::InvalidArgument { field, reason } => {
                Error::InvalidArgument { field: at(&field).unwrap_or(field), reason }
            }
            Error::FailedPrecondition(m) => Error::FailedPrecondition(at(&m).unwrap_or(m)),
            Error::Unavailable(m) => Error::Unavailable(at(&m).unwrap_or(m)),
            other => other,
        }
    }

    /// Stable code for clients to branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::NotFound(_) => "NOT_FOUND",
            Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Error::AlreadyExists(_) => "ALREADY_EXISTS",
            Error::NotLeader { .. } => "NOT_LEADER",
            Error::Unavailable(_) => "UNAVAILABLE",
            Error::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Error::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Error::Internal(_) => "INTERNAL",
        }
    }
}

/// Invalid input found by the core (`validate`): INVALID_ARGUMENT with the
/// same field and reason.
impl From<portrait_core::Invalid> for Error {
    fn from(e: portrait_core::Invalid) -> Error {
        Error::InvalidArgument { field: e.field, reason: e.reason }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_keep_their_wire_positions() {
        // Errors cross nodes bincode-encoded by variant position: a node of
        // the previous version must read them alike.
        let position = |e: Error| {
            let bytes = bincode::serialize(&e).unwrap();
            u32::from_le_bytes(bytes[..4].try_into().unwrap())
        };
        let s = || "x".to_string();
        assert_eq!(position(Error::InvalidArgument { field: s(), reason: s() }), 0);
        assert_eq!(position(Error::NotLeader { leader_id: None, leader_addr: None, group: None }), 4);
        assert_eq!(position(Error::Unavailable(s())), 5);
        assert_eq!(position(Error::DeadlineExceeded(s())), 6);
        assert_eq!(position(Error::Internal(s())), 7);
        assert_eq!(position(Error::ResourceExhausted(s())), 8);
    }

    #[test]
    fn core_invalid_input_keeps_field_reason_and_code() {
        let e = Error::from(portrait_core::Invalid::new("user_id", "must not be empty").within("events[3]"));
        assert_eq!(e.code(), "INVALID_ARGUMENT");
        assert_eq!(e.to_string(), "events[3].user_id: must not be empty");
    }

    #[test]
    fn an_error_about_an_item_of_a_part_names_its_place_in_the_request() {
        let positions = [1, 4, 9];
        let e =
            Error::invalid("events[2].attrs.p", "must be a finite number").reindexed("events", &positions);
        assert_eq!(e.to_string(), "events[9].attrs.p: must be a finite number");
        let e = Error::FailedPrecondition("events[1].family: unknown family \"x\"".into());
        assert_eq!(e.reindexed("events", &positions).to_string(), "events[4].family: unknown family \"x\"");
        let e = Error::Unavailable("events[0].family: unknown; retry".into());
        assert_eq!(e.reindexed("events", &positions).to_string(), "events[1].family: unknown; retry");
        // Anything else, or an index out of the part, is left as it is.
        for kept in [
            Error::FailedPrecondition("user \"u\", family \"f\": over the limit".into()),
            Error::FailedPrecondition("events[3].family: x".into()),
            Error::FailedPrecondition("events[x].family: x".into()),
            Error::invalid("events", "must not be empty"),
            Error::NotFound("events[0]".into()),
        ] {
            assert_eq!(kept.clone().reindexed("events", &positions), kept);
        }
    }
}
