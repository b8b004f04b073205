//! Online allowance top-up: while central is reachable, an order that would otherwise be pending
//! asks the sync task for more allowance and waits, within a short deadline, for central's answer
//! and for the granted revision to be applied locally. Async shell between the API and the sync
//! task; it never decides a promise itself (the store's writer does, in the order's transaction).

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::Pool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout_at};

use crate::link::LinkState;

/// Depth of the queue of allowance requests from the API to the sync task. When it is full the
/// order does not wait for a place: it is captured with what the site holds (pending beyond it).
/// 64 is far more than the orders a site takes within one request deadline.
pub const ASK_QUEUE_DEPTH: usize = 64;

/// One request for more allowance, from an order waiting in the API.
#[derive(Debug)]
pub struct AllowanceAsk {
    pub pool: Pool,
    pub qty: i64,
    /// After this the order has moved on; the sync task drops the request instead of sending it.
    pub deadline: Instant,
    pub reply: oneshot::Sender<AllowanceAnswer>,
}

/// Central's answer to an `AllowanceAsk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowanceAnswer {
    pub granted: i64,
    /// Revision of the grant's master change (0 when nothing was granted).
    pub rev: u64,
    pub reason: String,
}

/// What a top-up achieved, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopUpOutcome {
    /// Requests handed to the sync task.
    pub asked: usize,
    /// Requests central answered with a grant that is now applied locally.
    pub granted: usize,
    /// Whether the deadline ran out before every answer (and grant) was in.
    pub timed_out: bool,
}

/// The API's handle for asking central for more allowance.
#[derive(Clone)]
pub struct TopUp {
    tx: mpsc::Sender<AllowanceAsk>,
    deadline: Duration,
    master_rev: watch::Receiver<u64>,
    link: Arc<LinkState>,
}

impl TopUp {
    /// `master_rev` follows the store's applied revision; `deadline` bounds every top-up.
    pub fn new(
        tx: mpsc::Sender<AllowanceAsk>,
        deadline: Duration,
        master_rev: watch::Receiver<u64>,
        link: Arc<LinkState>,
    ) -> Self {
        TopUp {
            tx,
            deadline,
            master_rev,
            link,
        }
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Asks for every `(pool, qty)` at once and waits until each is answered and every granted
    /// revision is applied, or the deadline passes. Never fails: whatever did not arrive in time
    /// simply leaves the order's lines pending. Does nothing while disconnected.
    pub async fn request(&self, needs: Vec<(Pool, i64)>) -> TopUpOutcome {
        let mut out = TopUpOutcome::default();
        if needs.is_empty() || !self.link.is_connected() {
            return out;
        }
        let deadline = Instant::now() + self.deadline;
        let mut answers = Vec::with_capacity(needs.len());
        for (pool, qty) in needs {
            let (reply, rx) = oneshot::channel();
            let ask = AllowanceAsk {
                pool,
                qty,
                deadline,
                reply,
            };
            // A full queue means the sync task is far behind: do not wait for it.
            if self.tx.try_send(ask).is_ok() {
                out.asked += 1;
                answers.push(rx);
            }
        }
        let mut wanted_rev = 0;
        let mut granted = 0;
        for rx in answers {
            match timeout_at(deadline, rx).await {
                Ok(Ok(a)) if a.granted > 0 => {
                    wanted_rev = wanted_rev.max(a.rev);
                    granted += 1;
                }
                Ok(Ok(a)) => tracing::debug!(reason = %a.reason, "central granted nothing"),
                // The session ended (the request died with it) or the sync task dropped it.
                Ok(Err(_)) => {}
                Err(_) => {
                    out.timed_out = true;
                    return out;
                }
            }
        }
        if granted > 0 {
            let mut rev = self.master_rev.clone();
            match timeout_at(deadline, rev.wait_for(|r| *r >= wanted_rev)).await {
                Ok(Ok(_)) => out.granted = granted,
                Ok(Err(_)) => {}
                Err(_) => out.timed_out = true,
            }
        }
        out
    }
}
