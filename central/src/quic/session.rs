//! The session driver: runs the protocol's pure `CentralSession` over one agent's QUIC stream.
//! It moves frames between the stream and the machine and carries out the machine's requests:
//! admission (deny list, registry, drills), the store's session start, ingest, allowance grants
//! and master-change reads (reads on the blocking pool), certificate signing, heartbeats into
//! the registry. Every decision (what is refused, when an Ack may leave, what is pushed) is the
//! machine's. I/O side.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use outpost_protocol::io::read_frame;
use outpost_protocol::session::central::{
    Begun, CentralEnd, CentralEvent, CentralRequest, CentralSession, CentralSessionConfig,
    EndReason, IngestFailure, Refusal, SignRefused, StoreFailure,
};
use outpost_protocol::{AgentMsg, FrameError, Hello};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    AbortOnDrop, CLOCK_OFFSET_WARN_MS, CLOSE_NORMAL, CLOSE_REFUSED, HELLO_TIMEOUT, INBOUND_QUEUE,
    REFUSE_LINGER, SyncContext, WRITE_TIMEOUT, clock_offset_ms, peer_cert_not_after_ms, truncate,
    unix_ms,
};
use crate::registry::{EndSignal, Registry};
use crate::store::{HelloMarks, IngestBatchError, SessionStart};

/// Unregisters the session from the registry when it ends.
struct Registered {
    registry: Arc<Registry>,
    site: String,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.unregister(&self.site, self.id);
    }
}

/// One agent's session.
pub(super) struct Session {
    pub conn: Connection,
    pub site: String,
    /// Protocol version of this session, negotiated by ALPN.
    pub version: u16,
    pub ctx: SyncContext,
    pub shutdown: watch::Receiver<bool>,
}

/// What the driver holds besides the machine.
#[derive(Default)]
struct Held {
    registered: Option<Registered>,
    end_signal: Option<oneshot::Receiver<EndSignal>>,
    revision: Option<watch::Receiver<u64>>,
    /// The latest Hello and when it was read (ms since the epoch).
    hello: Option<(Hello, i64)>,
    start: Option<SessionStart>,
}

impl Session {
    pub(super) async fn run(self) {
        let (mut send, recv) =
            match tokio::time::timeout(HELLO_TIMEOUT, self.conn.accept_bi()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "connection ended before a stream was opened");
                    return;
                }
                Err(_) => {
                    tracing::info!("no stream opened in time; closing");
                    self.conn
                        .close(VarInt::from_u32(CLOSE_REFUSED), b"no stream opened in time");
                    return;
                }
            };
        let mut m = CentralSession::new(
            CentralSessionConfig {
                site: self.site.clone(),
                protocol_version: self.version,
                central_version: crate::VERSION.to_string(),
                hello_timeout: HELLO_TIMEOUT,
            },
            Instant::now(),
        );
        let (frames_tx, mut frames) = mpsc::channel::<Result<AgentMsg, FrameError>>(INBOUND_QUEUE);
        let _reader = AbortOnDrop(tokio::spawn(read_frames(recv, frames_tx)));
        let mut held = Held::default();
        let mut shutdown = self.shutdown.clone();
        let mut rev_open = true;
        let end = loop {
            while let Some(req) = m.poll_request() {
                self.execute(&mut m, req, &mut held).await;
            }
            while let Some(ev) = m.poll_event() {
                self.event(ev, &held);
            }
            let mut write_failed = false;
            while let Some(frame) = m.poll_transmit() {
                if write_failed {
                    continue;
                }
                if let Err(e) = write(&mut send, &frame).await {
                    write_failed = true;
                    m.handle_write_failed(e.to_string());
                }
            }
            if let Some(end) = m.poll_end() {
                break end;
            }
            if m.has_requests() {
                continue;
            }
            let deadline = m.poll_timeout();
            tokio::select! {
                biased;
                signal = async { held.end_signal.as_mut().expect("guarded").await }, if held.end_signal.is_some() => {
                    held.end_signal = None;
                    m.handle_end(match signal {
                        Ok(EndSignal::Revoked) => EndReason::Revoked,
                        Ok(EndSignal::Drill) => EndReason::Drill,
                        // A dropped sender means the registry replaced this session too.
                        Ok(EndSignal::Superseded) | Err(_) => EndReason::Superseded,
                    });
                }
                _ = async { drop(shutdown.wait_for(|s| *s).await) } => m.handle_end(EndReason::Shutdown),
                msg = frames.recv(), if m.wants_input() => match msg {
                    None => m.handle_closed(),
                    Some(Err(e)) => m.handle_read_error(e),
                    Some(Ok(msg)) => {
                        if let AgentMsg::Hello(h) = &msg {
                            held.hello = Some((h.clone(), unix_ms(SystemTime::now())));
                        }
                        m.handle_message(msg);
                    }
                },
                changed = async { held.revision.as_mut().expect("guarded").changed().await }, if rev_open && held.revision.is_some() => {
                    match changed {
                        Ok(()) => {
                            let rev = *held.revision.as_mut().expect("guarded").borrow_and_update();
                            m.handle_revision(rev);
                        }
                        Err(_) => rev_open = false,
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => m.handle_timeout(Instant::now()),
            }
        };
        match end {
            CentralEnd::Gone(why) => {
                self.conn
                    .close(VarInt::from_u32(CLOSE_NORMAL), b"stream closed");
                tracing::info!(reason = %why, "session ended");
            }
            CentralEnd::Refused(r) => {
                // The Refuse was the last frame written: give the agent a moment to read it and
                // close, then close.
                let _ = send.finish();
                let _ = tokio::time::timeout(REFUSE_LINGER, self.conn.closed()).await;
                self.conn
                    .close(VarInt::from_u32(CLOSE_REFUSED), truncate(&r.reason));
                if held.start.is_some() {
                    tracing::warn!(code = ?r.code, reason = %r.reason, "session refused");
                } else {
                    tracing::info!(code = ?r.code, reason = %r.reason, "site refused");
                }
            }
        }
        if held.start.is_some() {
            // Best effort: the store may already be closing during shutdown.
            let _ = self.ctx.store.touch_site(&self.site).await;
        }
    }

    /// Carries out one request of the machine and reports its outcome back.
    async fn execute(&self, m: &mut CentralSession, req: CentralRequest, held: &mut Held) {
        let store = &self.ctx.store;
        match req {
            CentralRequest::Admit => m.handle_admission(self.admit(held)),
            CentralRequest::Begin(hello) => {
                // Durably opens this session's reconciliation report, records what a restored
                // central lost, resets the site's allowances after a restore, and tops the site
                // up before the Welcome, so the Welcome's revision already covers the grants.
                match store
                    .begin_session(&self.site, HelloMarks::from(&hello))
                    .await
                {
                    Ok(start) => {
                        let mut rev = store.subscribe_revision();
                        let central_rev = *rev.borrow_and_update();
                        held.revision = Some(rev);
                        let begun = Begun {
                            acked_seq: start.acked_seq,
                            incarnation: start.incarnation,
                            master_from_rev: start.master_from_rev,
                            central_rev,
                        };
                        held.start = Some(start);
                        m.handle_begun(Ok(begun));
                    }
                    Err(e) => m.handle_begun(Err(StoreFailure(e.to_string()))),
                }
            }
            CentralRequest::Ingest(batch) => {
                let n = batch.len();
                // A drill tracks its sites' events (a copy only while the site is in one).
                let drills = self.ctx.registry.drills();
                let tracked = drills.site_drill(&self.site).map(|_| batch.clone());
                match store.ingest(&self.site, batch).await {
                    Ok(out) => {
                        if let Some(events) = tracked {
                            let offset = self.ctx.registry.clock_offset(&self.site).unwrap_or(0);
                            drills.on_ingest(
                                &self.site,
                                &events,
                                out.new_hwm,
                                offset,
                                unix_ms(SystemTime::now()),
                            );
                        }
                        tracing::debug!(
                            events = n,
                            stored = out.stored,
                            duplicates = out.duplicates,
                            dead_letters = out.dead_letters,
                            exceptions = out.exceptions,
                            hwm = out.new_hwm,
                            "batch committed"
                        );
                        m.handle_ingested(Ok(out.new_hwm));
                    }
                    Err(IngestBatchError::Plan(e)) => {
                        m.handle_ingested(Err(IngestFailure::Plan(e)))
                    }
                    Err(IngestBatchError::Unavailable(e)) => {
                        m.handle_ingested(Err(IngestFailure::Unavailable(e.to_string())))
                    }
                }
            }
            CentralRequest::Allowance { pool, qty } => {
                // A store that cannot write right now grants nothing: the agent falls back to
                // pending lines, which is always safe.
                let key = pool.key();
                match store.allowance_request(&self.site, pool, qty).await {
                    Ok(a) => {
                        tracing::debug!(pool = %key, asked = qty, granted = a.granted, rev = a.rev, "allowance request answered");
                        m.handle_allowance(a.granted, a.rev, a.reason);
                    }
                    Err(e) => {
                        tracing::warn!(pool = %key, error = %e, "cannot grant allowance");
                        m.handle_allowance(0, 0, format!("central cannot grant right now: {e}"));
                    }
                }
            }
            CentralRequest::ReadChanges { from, max } => {
                let store = store.clone();
                let read =
                    tokio::task::spawn_blocking(move || store.changes_after(from, max)).await;
                m.handle_changes(match read {
                    Ok(r) => r.map_err(|e| StoreFailure(e.to_string())),
                    Err(e) => Err(StoreFailure(format!("read task failed: {e}"))),
                });
            }
            CentralRequest::Sign { csr_der } => {
                let signer = self.ctx.signer.clone();
                let site = self.site.clone();
                let signed = tokio::task::spawn_blocking(move || {
                    signer
                        .sign(&site, &csr_der)
                        .map_err(|e| SignRefused(e.to_string()))
                })
                .await
                .unwrap_or_else(|e| Err(SignRefused(format!("signing task failed: {e}"))));
                match &signed {
                    Ok(_) => {
                        crate::renewal::RENEWED.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("signed a renewed certificate for the site's new key");
                    }
                    Err(reason) => {
                        crate::renewal::REFUSED.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%reason, "certificate renewal refused");
                    }
                }
                m.handle_signed(signed);
            }
            CentralRequest::RecordHeartbeat {
                heartbeat,
                central_rev,
            } => {
                // Fleet health signals: kept in the registry, where the health monitor derives
                // the site's state from them.
                let received_ms = unix_ms(SystemTime::now());
                let offset = clock_offset_ms(heartbeat.agent_time_ms, received_ms, self.conn.rtt());
                self.ctx.registry.record_heartbeat(
                    &self.site,
                    heartbeat,
                    received_ms,
                    offset,
                    central_rev,
                );
            }
            CentralRequest::Touch => self.ctx.registry.touch(&self.site),
        }
    }

    /// The deny list, registration and drills, in an order that closes the races: a
    /// revocation or drill that starts between the first check and the registration found no
    /// session to end, and is seen by the checks after it.
    fn admit(&self, held: &mut Held) -> Option<Refusal> {
        if let Some(r) = self.revoked() {
            return Some(r);
        }
        let ticket = self.ctx.registry.register(&self.site);
        held.registered = Some(Registered {
            registry: self.ctx.registry.clone(),
            site: self.site.clone(),
            id: ticket.id,
        });
        held.end_signal = Some(ticket.end);
        if let Some(r) = self.revoked() {
            return Some(r);
        }
        if let Some(why) = self.ctx.registry.drills().refusal(&self.site) {
            return Some(Refusal::Drill(why));
        }
        self.ctx.registry.set_session_info(
            &self.site,
            crate::registry::SessionInfo {
                protocol_version: self.version,
                cert_not_after_ms: peer_cert_not_after_ms(&self.conn),
            },
        );
        if let Some((hello, received_ms)) = &held.hello {
            let offset_ms = clock_offset_ms(hello.agent_time_ms, *received_ms, self.conn.rtt());
            self.ctx.registry.set_clock_offset(&self.site, offset_ms);
            if offset_ms.unsigned_abs() > CLOCK_OFFSET_WARN_MS.unsigned_abs() {
                tracing::warn!(
                    clock_offset_ms = offset_ms,
                    "the site's clock is more than 5 minutes off central's (events are ordered by sequence, not by clock; certificates and logs may be affected)"
                );
            }
        }
        None
    }

    /// A `Refusal` when the site is on the deny list. A store that cannot be read admits the
    /// site: the certificate check has passed, and refusing every site whenever a read fails
    /// would turn a storage hiccup into a fleet-wide outage.
    fn revoked(&self) -> Option<Refusal> {
        match self.ctx.store.revoked_site(&self.site) {
            Ok(Some(r)) => {
                tracing::info!(reason = %r.reason, "revoked site refused");
                Some(Refusal::Revoked {
                    at: crate::timefmt::rfc3339_ms(r.at_ms),
                    reason: r.reason,
                })
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the revocation list; admitting the site");
                None
            }
        }
    }

    fn event(&self, ev: CentralEvent, held: &Held) {
        match ev {
            CentralEvent::Welcomed { hello, begun } => {
                let received_ms = held.hello.as_ref().map_or(0, |(_, at)| *at);
                self.ctx.registry.drills().on_connect(
                    &self.site,
                    hello.last_seq,
                    hello.acked_seq,
                    begun.acked_seq,
                    received_ms,
                );
                let (incarnation_changed, session) = held
                    .start
                    .as_ref()
                    .map_or((false, 0), |s| (s.incarnation_changed, s.session));
                tracing::info!(
                    agent_version = %hello.agent_version,
                    protocol_version = self.version,
                    agent_rev = hello.master_rev,
                    agent_last_seq = hello.last_seq,
                    agent_acked_seq = hello.acked_seq,
                    retained_from_seq = hello.retained_from_seq,
                    acked_seq = begun.acked_seq,
                    central_rev = begun.central_rev,
                    master_from_rev = begun.master_from_rev,
                    incarnation_changed,
                    session,
                    "session started"
                );
            }
            CentralEvent::AgentAhead {
                agent_rev,
                central_rev,
            } => tracing::warn!(
                agent_rev,
                central_rev,
                "agent has applied a higher master revision than central holds (central store replaced?)"
            ),
            CentralEvent::Committed { hwm } => tracing::trace!(hwm, "ack sent"),
            CentralEvent::MasterSent {
                from,
                through,
                changes,
            } => tracing::debug!(from, through_rev = through, changes, "master changes sent"),
        }
    }
}

/// Reads frames into the session's queue until the stream ends or fails. A dedicated reader
/// keeps frame reads whole: `read_frame` is not cancel-safe, so it must not sit in a select.
async fn read_frames(mut recv: RecvStream, out: mpsc::Sender<Result<AgentMsg, FrameError>>) {
    loop {
        let r = read_frame::<AgentMsg, _>(&mut recv).await;
        let stop = !matches!(r, Ok(Some(_)));
        let msg = match r {
            Ok(Some(m)) => Ok(m),
            Ok(None) => break,
            Err(e) => Err(e),
        };
        if out.send(msg).await.is_err() || stop {
            break;
        }
    }
}

/// Why a frame could not be written to the agent.
#[derive(Debug, thiserror::Error)]
enum WriteFrameError {
    #[error("write timed out")]
    Timeout,
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
}

/// Writes one encoded frame; a peer that does not read within `WRITE_TIMEOUT` is cut off.
async fn write(send: &mut SendStream, frame: &[u8]) -> Result<(), WriteFrameError> {
    tokio::time::timeout(WRITE_TIMEOUT, send.write_all(frame))
        .await
        .map_err(|_| WriteFrameError::Timeout)??;
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
