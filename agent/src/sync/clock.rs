//! Whether the wall clock can be trusted with certificate dates. Pure: the time is passed in.

use std::time::Duration;

use crate::tls::CertInfo;

/// No wall clock before this is sane (2026-11-01T00:00:00Z): a box without a real-time clock
/// that boots into 1970 or 2000 is below it. The site certificate's start date raises the floor.
pub const TIME_FLOOR_UNIX: i64 = 1_793_491_200;
/// How often the agent looks again at a clock it does not trust.
pub const CLOCK_RECHECK: Duration = Duration::from_secs(2);

/// The wall clock reads before what can be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the system clock ({now}) is before {what} ({floor}): waiting for a sane clock (NTP) before \
     trusting certificate dates; orders and milestones are still taken"
)]
pub struct ClockUntrusted {
    now: String,
    what: &'static str,
    floor: String,
}

/// Whether the wall clock can be trusted with certificate dates: `now` (s since the epoch) is
/// not before `TIME_FLOOR_UNIX` nor before the site certificate's start. `Err` says why not.
pub fn clock_sane(now_unix: i64, cert: Option<&CertInfo>) -> Result<(), ClockUntrusted> {
    let (floor, what) = match cert {
        Some(c) if c.not_before > TIME_FLOOR_UNIX => (c.not_before, "the site certificate's start"),
        _ => (TIME_FLOOR_UNIX, "this build's earliest sane date"),
    };
    if now_unix < floor {
        return Err(ClockUntrusted {
            now: crate::store::rfc3339_millis(now_unix.saturating_mul(1000)),
            what,
            floor: crate::store::rfc3339_millis(floor.saturating_mul(1000)),
        });
    }
    Ok(())
}
