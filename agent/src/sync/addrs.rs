//! Which of central's addresses the next attempt goes to (pure). `[sync] central_addr` may list
//! several addresses of the same central (for instance over the plant's WAN and over a backup
//! line). The agent uses one at a time:
//! - after a welcomed session that central ended itself (a restart, a shutdown), it tries the
//!   same address again: the address works;
//! - after a welcomed session whose link was lost (the QUIC idle timeout: the node or the path
//!   is gone), and after a failed attempt, it moves to the next, so a lost node costs one
//!   detection and one handshake;
//! - it backs off only after a whole round of failed attempts, so a central that is down
//!   everywhere is not hammered.
//!
//! Each address keeps its own last RTT, which bounds its attempts: a slow backup line is given
//! the full connect timeout until it has answered once, whatever the fast one measured.

use std::time::Duration;

/// When the next attempt may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextAttempt {
    /// After a pause of at most the initial backoff, without growing it: the last session
    /// was welcomed, or another address in this round has not been tried yet.
    Soon,
    /// After the next (growing) backoff delay: every address failed since the last Welcome.
    BackOff,
}

/// How a session towards the current address ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Welcomed, then central closed the connection itself.
    ClosedByCentral,
    /// Welcomed, then the link was lost (idle timeout, reset, a stuck write).
    Lost,
    /// No Welcome: the attempt failed or was refused.
    Failed,
}

/// The addresses and where the agent stands in them.
#[derive(Clone, Debug)]
pub struct CentralAddrs {
    addrs: Vec<String>,
    /// The last RTT measured through each address.
    rtts: Vec<Option<Duration>>,
    current: usize,
    /// Attempts without a Welcome since the last one, or since the last full round.
    failed_in_round: usize,
}

impl CentralAddrs {
    /// `None` for an empty list (validated settings never hold one).
    pub fn new(addrs: Vec<String>) -> Option<Self> {
        (!addrs.is_empty()).then(|| CentralAddrs {
            rtts: vec![None; addrs.len()],
            addrs,
            current: 0,
            failed_in_round: 0,
        })
    }

    /// The address the next attempt goes to.
    pub fn current(&self) -> &str {
        &self.addrs[self.current]
    }

    /// The last RTT measured through the current address, if it ever answered.
    pub fn current_rtt(&self) -> Option<Duration> {
        self.rtts[self.current]
    }

    /// Records the RTT a connection through the current address measured.
    pub fn set_current_rtt(&mut self, rtt: Duration) {
        self.rtts[self.current] = Some(rtt);
    }

    /// The session towards `current()` ended as `how`: says when to try, and moves to the next
    /// address unless the current one is to be tried again.
    pub fn ended(&mut self, how: Ended) -> NextAttempt {
        match how {
            Ended::ClosedByCentral => {
                self.failed_in_round = 0;
                NextAttempt::Soon
            }
            Ended::Lost => {
                self.failed_in_round = 0;
                self.advance();
                NextAttempt::Soon
            }
            Ended::Failed => {
                self.advance();
                self.failed_in_round += 1;
                if self.failed_in_round >= self.addrs.len() {
                    self.failed_in_round = 0;
                    NextAttempt::BackOff
                } else {
                    NextAttempt::Soon
                }
            }
        }
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % self.addrs.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> CentralAddrs {
        CentralAddrs::new((1..=n).map(|i| format!("node-{i}:7601")).collect()).unwrap()
    }

    /// Goal: one address behaves as before the list existed: every failure backs off, a
    /// welcomed session does not. Method: drive the rotation.
    #[test]
    fn one_address_backs_off_on_every_failure() {
        let mut a = addrs(1);
        for _ in 0..3 {
            assert_eq!(a.ended(Ended::Failed), NextAttempt::BackOff);
            assert_eq!(a.current(), "node-1:7601");
        }
        assert_eq!(a.ended(Ended::Lost), NextAttempt::Soon);
        assert_eq!(a.ended(Ended::ClosedByCentral), NextAttempt::Soon);
        assert_eq!(a.current(), "node-1:7601");
    }

    /// Goal: with three nodes, a lost node is left at once and the others are tried before any
    /// backoff; backoff starts only when every node failed since the last Welcome.
    #[test]
    fn a_round_of_failures_before_backing_off() {
        let mut a = addrs(3);
        assert_eq!(a.current(), "node-1:7601");
        // node-1's link is lost: node-2 next, soon.
        assert_eq!(a.ended(Ended::Lost), NextAttempt::Soon);
        assert_eq!(a.current(), "node-2:7601");
        // node-2 and node-3 fail: soon, then node-1 (just lost) fails: the round is complete.
        assert_eq!(a.ended(Ended::Failed), NextAttempt::Soon);
        assert_eq!(a.current(), "node-3:7601");
        assert_eq!(a.ended(Ended::Failed), NextAttempt::Soon);
        assert_eq!(a.current(), "node-1:7601");
        assert_eq!(a.ended(Ended::Failed), NextAttempt::BackOff);
        assert_eq!(a.current(), "node-2:7601");
        // A new round starts: two soon attempts, then a backoff again.
        assert_eq!(a.ended(Ended::Failed), NextAttempt::Soon);
        assert_eq!(a.ended(Ended::Failed), NextAttempt::Soon);
        assert_eq!(a.ended(Ended::Failed), NextAttempt::BackOff);
        // A Welcome clears the round.
        assert_eq!(a.ended(Ended::Lost), NextAttempt::Soon);
        assert_eq!(a.ended(Ended::Failed), NextAttempt::Soon);
    }

    /// Goal: central restarting (closing its sessions itself) does not move a site off a working
    /// address, e.g. from the plant's WAN line to its backup line.
    #[test]
    fn central_closing_a_welcomed_session_keeps_the_address() {
        let mut a = addrs(2);
        for _ in 0..3 {
            assert_eq!(a.ended(Ended::ClosedByCentral), NextAttempt::Soon);
            assert_eq!(a.current(), "node-1:7601");
        }
        // While it restarts, attempts fail: then the other address is tried.
        assert_eq!(a.ended(Ended::Failed), NextAttempt::Soon);
        assert_eq!(a.current(), "node-2:7601");
    }

    /// Goal: each address is timed by its own RTT: a fast primary's RTT never shortens the
    /// first attempts on a slow backup line.
    #[test]
    fn each_address_keeps_its_own_rtt() {
        let mut a = addrs(2);
        a.set_current_rtt(Duration::from_millis(2));
        assert_eq!(a.ended(Ended::Lost), NextAttempt::Soon);
        assert_eq!(a.current_rtt(), None, "the backup never answered");
        a.set_current_rtt(Duration::from_millis(700));
        assert_eq!(a.ended(Ended::Lost), NextAttempt::Soon);
        assert_eq!(a.current_rtt(), Some(Duration::from_millis(2)));
        assert_eq!(a.ended(Ended::Failed), NextAttempt::Soon);
        assert_eq!(a.current_rtt(), Some(Duration::from_millis(700)));
    }

    #[test]
    fn empty_list_is_refused() {
        assert!(CentralAddrs::new(Vec::new()).is_none());
    }
}
