//! Timestamps as RFC 3339 text for the API, the CLI and logs. A leaf: no I/O.

use std::time::{Duration, UNIX_EPOCH};

/// Largest timestamp rendered (9999-12-31T23:59:59.999Z); remote clocks are not trusted to stay
/// inside what RFC 3339 can express.
pub const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds), clamped to the range
/// RFC 3339 can express.
pub fn rfc3339_ms(ms: i64) -> String {
    let ms = ms.clamp(0, MAX_RFC3339_MS) as u64;
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}
