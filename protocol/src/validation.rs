//! The error a message field or record reports when it breaks a documented limit, shared by
//! `messages` and `trace` (pure types; a leaf module that imports nothing from the crate).

/// A field of a message or record that breaks a documented limit.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("{field} must be 1..={max} characters of [A-Za-z0-9._:-], got {len}")]
    BadId {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("Idempotency-Key must be 1..={MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters")]
    BadIdempotencyKey,
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} is out of range: {detail}")]
    OutOfRange { field: &'static str, detail: String },
}

/// Longest accepted `Idempotency-Key`: room for a UUID, a ULID or a client's own composite key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
