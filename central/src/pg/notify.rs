//! Wake-ups across central nodes, by LISTEN on a connection of each node's own (`NOTIFY` is
//! delivered at commit):
//! - new master revisions: the notification wakes the listener, which reads the head row and
//!   updates `watch_revision`; a poll of the head runs behind it, because notifications sent
//!   while the connection is down are lost;
//! - revocations: a revoked site (checked against the list) goes to `revocations()`, so the node
//!   holding its live session closes it; after every (re)connection, and when notifications
//!   were dropped, a `Resync` tells the node to check all its sessions.
//!
//! A lost connection is opened again with backoff.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use super::master::REVISION_CHANNEL;
use super::revoked::REVOKED_CHANNEL;
use super::{PgError, PgStore, Revocation};

/// How often the head revision is read even without a notification.
pub const REVISION_POLL: Duration = Duration::from_secs(1);
/// Pause before opening a lost listening connection again (doubling up to 8×).
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// Longest payload taken as a site id (site ids are at most 63 characters).
const MAX_SITE_PAYLOAD: usize = 64;
/// Longest query on the listening connection.
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
        let (tx, mut rx) = mpsc::channel::<Note>(NOTIFY_QUEUE);
        // The connection must be polled for the client's queries to run; it hands the
        // notifications over and ends when the connection does.
        let driver = tokio::spawn(async move {
            // Something was dropped on a full queue and the listener has not been told yet.
            let mut owed = false;
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let note = if n.channel() == REVOKED_CHANNEL {
                            let site = n.payload();
                            if site.is_empty() || site.len() > MAX_SITE_PAYLOAD {
                                continue;
                            }
                            Note::Revoked(site.to_string())
                        } else {
                            Note::Revision
                        };
                        // A full queue drops it: the poll catches up with revisions, and a
                        // dropped revocation becomes a resync as soon as there is room.
                        if owed && tx.try_send(Note::Overflow).is_ok() {
                            owed = false;
                        }
                        if tx.try_send(note).is_err() {
                            owed = true;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        });
        let _driver = AbortOnDrop(driver);
        client
            .batch_execute(&format!(
                "LISTEN {REVISION_CHANNEL}; LISTEN {REVOKED_CHANNEL}"
            ))
            .await?;
        // Whatever was revoked while no connection listened: every node checks its sessions.
        let _ = self.revoked.send(Revocation::Resync);
        let mut poll = tokio::time::interval(poll_every);
        loop {
            // A notification is only a wake-up: the revision is read from the head row and a
            // revoked site checked against the list, so a payload (anyone may NOTIFY) never
            // sets a revision nor closes a session by itself.
            let note = tokio::select! {
                n = rx.recv() => match n {
                    Some(n) => n,
                    None => return Err(PgError("the listening connection closed".into())),
                },
                _ = poll.tick() => Note::Revision,
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                    continue;
                }
            };
            match note {
                Note::Revision => {
                    let head = bounded(
                        client.query_one("SELECT revision FROM master_head WHERE id = 1", &[]),
                    )
                    .await?;
                    self.saw_revision(u64::try_from(head.get::<_, i64>(0)).unwrap_or(0));
                }
                Note::Revoked(site) => {
                    let on_list = bounded(
                        client.query_opt("SELECT 1 FROM revoked WHERE site = $1", &[&site]),
                    )
                    .await?;
                    if on_list.is_some() {
                        let _ = self.revoked.send(Revocation::Site(site));
                    }
                }
                Note::Overflow => {
                    let _ = self.revoked.send(Revocation::Resync);
                }
            }
        }
    }
}

/// What the connection hands the listener.
enum Note {
    Revision,
    Revoked(String),
    /// The queue was full: something was dropped.
    Overflow,
}

/// A query on the listening connection, bounded by `HEAD_READ_TIMEOUT`.
async fn bounded<T>(
    q: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    tokio::time::timeout(HEAD_READ_TIMEOUT, q)
        .await
        .map_err(|_| PgError("a query on the listening connection timed out".into()))?
        .map_err(PgError::from)
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
