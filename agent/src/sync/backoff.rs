//! Reconnection timing: capped exponential backoff with full jitter, and how long one
//! connection attempt may take given the last link's round trip. Pure: randomness is passed in.

use std::time::Duration;

/// Shortest time one connection attempt is given, however fast the last link was.
pub const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// An attempt is given this many times the last measured RTT (capped by
/// `[sync] connect_timeout_ms`): a handshake needs about two round trips.
pub const ATTEMPT_RTTS: u32 = 10;

/// How long one connection attempt may take: `connect_timeout`, shortened to
/// `ATTEMPT_RTTS` × the last session's RTT (at least `MIN_ATTEMPT_TIMEOUT`) once one is known,
/// so that while central is unreachable the agent tries again often enough to notice it is back
/// within about a second on a fast link, and a slow link still gets the time it needs.
pub fn attempt_timeout(connect_timeout: Duration, last_rtt: Option<Duration>) -> Duration {
    match last_rtt {
        Some(rtt) => (rtt * ATTEMPT_RTTS)
            .max(MIN_ATTEMPT_TIMEOUT)
            .min(connect_timeout),
        None => connect_timeout,
    }
}

/// Capped exponential backoff with full jitter: the n-th delay is uniform in
/// `0..=min(max, initial * 2^n)`. Pure; the randomness is passed in.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The cap for the next attempt (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, given a uniform sample in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let cap = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(unit.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}
