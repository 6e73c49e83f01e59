//! The core's error: input that breaks a limit or the schema. The server
//! turns it into its own `Error::InvalidArgument`, so a client sees
//! INVALID_ARGUMENT with this exact message.

/// Bad input; `field` is a path such as `events[3].attrs.price`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid { field: field.into(), reason: reason.into() }
    }

    /// Prefixes the field path, e.g. `user_id` → `events[3].user_id`.
    pub fn within(self, prefix: &str) -> Invalid {
        Invalid { field: format!("{prefix}.{}", self.field), reason: self.reason }
    }
}
