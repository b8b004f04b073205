//! Which of central's addresses the next attempt goes to (pure). `[sync] central_addr` may list
//! the nodes of one central; any node serves any site, because central's store decides every
//! upload and grant. The agent uses one address at a time and moves to the next whenever a
//! session ends or an attempt fails, so a lost node costs one detection (the QUIC idle
//! timeout) and one handshake. It backs off only after a whole round of failed attempts, so a
//! central that is down everywhere is not hammered.

/// When the next attempt may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextAttempt {
    /// After a pause of at most the initial backoff, without growing it: the last session
    /// was welcomed, or another address in this round has not been tried yet.
    Soon,
    /// After the next (growing) backoff delay: every address failed since the last Welcome.
    BackOff,
}

/// The addresses and where the agent stands in them.
#[derive(Clone, Debug)]
pub struct CentralAddrs {
    addrs: Vec<String>,
    current: usize,
    /// Attempts without a Welcome since the last one, or since the last full round.
    failed_in_round: usize,
}

impl CentralAddrs {
    /// `None` for an empty list (validated settings never hold one).
    pub fn new(addrs: Vec<String>) -> Option<Self> {
        (!addrs.is_empty()).then_some(CentralAddrs {
            addrs,
            current: 0,
            failed_in_round: 0,
        })
    }

    /// The address the next attempt goes to.
    pub fn current(&self) -> &str {
        &self.addrs[self.current]
    }

    /// A session towards `current()` ended; `welcomed`: it got as far as central's Welcome.
    /// Moves to the next address and says when to try it.
    pub fn ended(&mut self, welcomed: bool) -> NextAttempt {
        self.current = (self.current + 1) % self.addrs.len();
        if welcomed {
            self.failed_in_round = 0;
            return NextAttempt::Soon;
        }
        self.failed_in_round += 1;
        if self.failed_in_round >= self.addrs.len() {
            self.failed_in_round = 0;
            NextAttempt::BackOff
        } else {
            NextAttempt::Soon
        }
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
            assert_eq!(a.ended(false), NextAttempt::BackOff);
            assert_eq!(a.current(), "node-1:7601");
        }
        assert_eq!(a.ended(true), NextAttempt::Soon);
        assert_eq!(a.current(), "node-1:7601");
    }

    /// Goal: with three nodes, a lost node is left at once and the others are tried before any
    /// backoff; backoff starts only when every node failed since the last Welcome.
    #[test]
    fn a_round_of_failures_before_backing_off() {
        let mut a = addrs(3);
        assert_eq!(a.current(), "node-1:7601");
        // node-1's session ends (node lost): node-2 next, soon.
        assert_eq!(a.ended(true), NextAttempt::Soon);
        assert_eq!(a.current(), "node-2:7601");
        // node-2 and node-3 fail: soon, then node-1 (just lost) fails: the round is complete.
        assert_eq!(a.ended(false), NextAttempt::Soon);
        assert_eq!(a.current(), "node-3:7601");
        assert_eq!(a.ended(false), NextAttempt::Soon);
        assert_eq!(a.current(), "node-1:7601");
        assert_eq!(a.ended(false), NextAttempt::BackOff);
        assert_eq!(a.current(), "node-2:7601");
        // A new round starts: two soon attempts, then a backoff again.
        assert_eq!(a.ended(false), NextAttempt::Soon);
        assert_eq!(a.ended(false), NextAttempt::Soon);
        assert_eq!(a.ended(false), NextAttempt::BackOff);
        // A Welcome clears the round.
        assert_eq!(a.ended(true), NextAttempt::Soon);
        assert_eq!(a.ended(false), NextAttempt::Soon);
    }

    #[test]
    fn empty_list_is_refused() {
        assert!(CentralAddrs::new(Vec::new()).is_none());
    }
}
