//! The simulated network between agents and central, at the level the sync protocol sees it.
//!
//! The protocol runs one QUIC stream per connection: within a connection, messages arrive in
//! order, once, or not at all (the connection dies). Packet loss, duplication and reordering
//! below that show up as delay (retransmissions) and as dead connections (idle timeout), and
//! across connections as old messages still arriving after a new connection started. That is
//! what this models: per connection and direction an in-order queue with a random latency per
//! message, extra delay per lost transmission, blocked directions (full and one-way partitions,
//! a flapping link), and each end closing on its own when it has not heard from the other for
//! the idle timeout.

use std::collections::VecDeque;

use rand::Rng;
use rand::rngs::StdRng;

/// An end that has heard nothing for this long closes the connection (QUIC idle timeout; the
/// agent's default is 3 s).
pub const IDLE_TIMEOUT_MS: u64 = 3_000;
/// Delay added to a message for each time it is lost and sent again.
pub const RETRANSMIT_MS: u64 = 200;

/// The faults on one site's link to central.
#[derive(Clone, Debug)]
pub struct LinkFaults {
    /// Agent → central packets are dropped.
    pub up_blocked: bool,
    /// Central → agent packets are dropped.
    pub down_blocked: bool,
    /// Percent of transmissions lost (each loss costs a retransmission).
    pub loss_pct: u32,
    /// One-way latency range in ms; a wide range reorders packets, which the stream turns into
    /// head-of-line delay.
    pub latency_ms: (u64, u64),
    /// A flapping link: (period ms, start time): up for one period, down for the next.
    pub flap: Option<(u64, u64)>,
}

impl Default for LinkFaults {
    fn default() -> Self {
        LinkFaults {
            up_blocked: false,
            down_blocked: false,
            loss_pct: 0,
            latency_ms: (1, 5),
            flap: None,
        }
    }
}

impl LinkFaults {
    fn flapped_down(&self, now: u64) -> bool {
        match self.flap {
            Some((period, start)) if period > 0 => ((now.saturating_sub(start)) / period) % 2 == 1,
            _ => false,
        }
    }

    pub fn up_open(&self, now: u64) -> bool {
        !self.up_blocked && !self.flapped_down(now)
    }

    pub fn down_open(&self, now: u64) -> bool {
        !self.down_blocked && !self.flapped_down(now)
    }

    /// When a message sent now would arrive, ignoring blocked periods (the queue holds it until
    /// the direction opens again).
    pub fn arrival(&self, now: u64, rng: &mut StdRng) -> u64 {
        let (lo, hi) = self.latency_ms;
        let mut t = now + rng.random_range(lo..=hi.max(lo));
        let mut losses = 0;
        while losses < 8 && rng.random_range(0..100) < self.loss_pct {
            t += RETRANSMIT_MS;
            losses += 1;
        }
        t
    }
}

/// One direction of a connection: encoded frames with their earliest arrival time, in order.
#[derive(Debug, Default)]
pub struct Pipe {
    queue: VecDeque<(u64, Vec<u8>)>,
}

impl Pipe {
    pub fn push(&mut self, at: u64, frame: Vec<u8>) {
        // In-order delivery: never before the frame ahead of it.
        let at = self.queue.back().map_or(at, |(t, _)| at.max(*t));
        self.queue.push_back((at, frame));
    }

    /// The next frame due by `now`, if the direction is open.
    pub fn pop_due(&mut self, now: u64, open: bool) -> Option<Vec<u8>> {
        if !open {
            return None;
        }
        match self.queue.front() {
            Some((t, _)) if *t <= now => self.queue.pop_front().map(|(_, f)| f),
            _ => None,
        }
    }
}

/// One QUIC connection between a site's agent and central.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub site: usize,
    pub up: Pipe,
    pub down: Pipe,
    /// Whether each end still has the connection open.
    pub agent_open: bool,
    pub central_open: bool,
    /// When each end last heard from the other.
    pub agent_heard: u64,
    pub central_heard: u64,
}

impl Conn {
    pub fn new(id: u64, site: usize, now: u64) -> Conn {
        Conn {
            id,
            site,
            up: Pipe::default(),
            down: Pipe::default(),
            agent_open: true,
            central_open: true,
            agent_heard: now,
            central_heard: now,
        }
    }

    pub fn is_dead(&self) -> bool {
        !self.agent_open && !self.central_open
    }
}
