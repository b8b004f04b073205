//! Wake-ups across central nodes: each node keeps its `watch_revision` current with the other
//! nodes' commits by LISTEN on a connection of its own (`NOTIFY` is delivered at commit; it
//! wakes the listener, which reads the head row), with a poll of the head behind it, because
//! notifications sent while that connection is down are lost. A lost connection is opened again
//! with backoff.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use super::master::REVISION_CHANNEL;
use super::{PgError, PgStore};

/// How often the head revision is read even without a notification.
pub const REVISION_POLL: Duration = Duration::from_secs(1);
/// Pause before opening a lost listening connection again (doubling up to 8×).
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// Longest read of the head row on the listening connection.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Notifications queued between the connection and the listener; past it they are dropped and
/// the poll catches up.
const NOTIFY_QUEUE: usize = 64;

impl PgStore {
    /// Raises the watched revision to `rev` (never lowers it).
    pub(crate) fn saw_revision(&self, rev: u64) {
        self.revision.send_if_modified(|r| {
            let newer = rev > *r;
            if newer {
                *r = rev;
            }
            newer
        });
    }

    /// Starts the listener, polling every `REVISION_POLL`; it ends when `shutdown` turns true or
    /// when dropped.
    pub fn spawn_listener(&self, shutdown: watch::Receiver<bool>) -> Listener {
        self.spawn_listener_polling(shutdown, REVISION_POLL)
    }

    /// `spawn_listener` with another poll interval (a test makes it long, so that only a
    /// notification can deliver a revision in time).
    pub fn spawn_listener_polling(
        &self,
        shutdown: watch::Receiver<bool>,
        poll: Duration,
    ) -> Listener {
        let store = self.clone();
        Listener {
            task: tokio::spawn(async move { store.listen(shutdown, poll).await }),
        }
    }

    async fn listen(&self, mut shutdown: watch::Receiver<bool>, poll: Duration) {
        let mut pause = RECONNECT_PAUSE;
        while !*shutdown.borrow() {
            match self.listen_once(&mut shutdown, poll).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "revision listener lost its connection; reconnecting");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                r = shutdown.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
            }
            pause = (pause * 2).min(RECONNECT_PAUSE * 8);
        }
    }

    /// One listening connection, until it fails (`Err`) or shutdown (`Ok`).
    async fn listen_once(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        poll_every: Duration,
    ) -> Result<(), PgError> {
        let (client, mut conn) = self.config.connect(NoTls).await?;
        let (tx, mut rx) = mpsc::channel::<()>(NOTIFY_QUEUE);
        // The connection must be polled for the client's queries to run; it hands the
        // notifications over and ends when the connection does.
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => {
                        let _ = tx.try_send(());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        });
        let _driver = AbortOnDrop(driver);
        client
            .batch_execute(&format!("LISTEN {REVISION_CHANNEL}"))
            .await?;
        let mut poll = tokio::time::interval(poll_every);
        loop {
            // A notification is only a wake-up: the revision is read from the head row, so a
            // payload (anyone may NOTIFY) never sets it.
            tokio::select! {
                n = rx.recv() => {
                    if n.is_none() {
                        return Err(PgError("the listening connection closed".into()));
                    }
                }
                _ = poll.tick() => {}
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                    continue;
                }
            }
            let head = tokio::time::timeout(
                HEAD_READ_TIMEOUT,
                client.query_one("SELECT revision FROM master_head WHERE id = 1", &[]),
            )
            .await
            .map_err(|_| PgError("reading the master head timed out".into()))??;
            self.saw_revision(u64::try_from(head.get::<_, i64>(0)).unwrap_or(0));
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The running listener task; stops with its shutdown signal, or when dropped.
pub struct Listener {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
