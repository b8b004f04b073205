//! The session driver: runs the protocol's pure `AgentSession` over one QUIC stream. It moves
//! bytes between the stream and the machine, carries out the machine's requests on the store
//! (reads on the blocking pool, writes through the store's writer), samples heartbeats, relays
//! the API's allowance requests and their answers, and installs renewed certificates. Every
//! decision (what to send, when, what an answer means) is the machine's. I/O side.

use outpost_protocol::io::read_frame;
use outpost_protocol::session::agent::{
    Adopted, AgentEvent, AgentMarks, AgentRequest, AgentSession, AgentSessionConfig,
    ApplyMasterFailure, Rewound, StoreFailure,
};
use outpost_protocol::{CentralMsg, FrameError, Heartbeat};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use super::renewal::RENEW_CHECK;
use super::{
    INBOUND_QUEUE_DEPTH, MAX_COALESCE_BYTES, SessionEnd, SyncClient, SyncError, TaskGuard,
    WRITE_TIMEOUT,
};
use crate::health::HealthProbe;
use crate::store::{IncarnationChange, Marks, ReadError, Store, WriteError, now_ms};
use crate::tls::RenewalRequest;
use crate::topup::AllowanceAnswer;

/// Where the acker stands: the highest ack persisted, and the first failure (which ends the
/// session).
#[derive(Clone, Debug, Default)]
struct AckState {
    persisted: u64,
    failed: Option<(u64, String)>,
}

fn marks_of(m: &Marks) -> AgentMarks {
    AgentMarks {
        last_seq: m.last_seq,
        acked_seq: m.acked_seq,
        master_rev: m.master_rev,
        retained_from_seq: m.retained_from_seq,
        central_incarnation: m.central_incarnation,
    }
}

/// A store read on the blocking pool: redb reads block, and the session loop shares the
/// executor with the API.
async fn read<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&Store) -> Result<T, ReadError> + Send + 'static,
) -> Result<T, SyncError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?
        .map_err(SyncError::StoreRead)
}

impl SyncClient {
    pub(super) async fn converse(
        &mut self,
        conn: &quinn::Connection,
        welcomed: &mut bool,
    ) -> Result<SessionEnd, SyncError> {
        let limit = self.settings.connect_timeout;
        let (mut send, mut recv) = timeout(limit, conn.open_bi())
            .await
            .map_err(|_| SyncError::Timeout("opening the stream"))??;
        // The handshake only completes on an ALPN both sides list (`tls::client_config`).
        let version = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .and_then(|p| outpost_protocol::version_of_alpn(&p))
            .ok_or(SyncError::NoVersion)?;
        let marks = read(&self.store, Store::marks).await?;
        let cfg = AgentSessionConfig {
            site: self.site.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: version,
            window: self.settings.window_events,
            max_batch: self.settings.batch_max_events,
            welcome_timeout: limit,
            heartbeat_every: self.heartbeat.as_ref().map(|(every, _)| *every),
            renew_check_every: RENEW_CHECK,
        };
        let mut m = AgentSession::new(cfg, marks_of(&marks), now_ms(), std::time::Instant::now());

        let (in_tx, mut inbound) = mpsc::channel(INBOUND_QUEUE_DEPTH);
        let link = self.link.clone();
        // No timeout on each read: central may rightly say nothing for long stretches. A dead
        // link is detected by the QUIC idle timeout (keep-alives hold a healthy one open), which
        // fails the read. A dedicated reader keeps frame reads whole (`read_frame` is not
        // cancel-safe).
        let reader = tokio::spawn(
            async move {
                loop {
                    let msg = read_frame::<CentralMsg, _>(&mut recv).await;
                    let end = !matches!(msg, Ok(Some(_)));
                    if !end {
                        link.heard(now_ms());
                    }
                    if in_tx.send(msg).await.is_err() || end {
                        break;
                    }
                }
            }
            .in_current_span(),
        );
        // Acks are persisted off the session loop, coalesced, so the upload does not wait for
        // the fsync; the acker reports back, and a failure ends the session.
        let (ack_tx, ack_rx) = watch::channel(None::<u64>);
        let (acked_tx, mut acked_rx) = watch::channel(AckState::default());
        let acker =
            tokio::spawn(persist_acks(self.store.clone(), ack_rx, acked_tx).in_current_span());
        // Heartbeat samples come back through a one-slot queue.
        let (hb_tx, mut heartbeats) = mpsc::channel::<Option<Heartbeat>>(1);
        let _guard = TaskGuard(vec![reader, acker]);
        // Dropped with the session: the orders waiting on these requests then go on at once.
        let mut pending: HashMap<u64, oneshot::Sender<AllowanceAnswer>> = HashMap::new();
        let mut renewal: Option<RenewalRequest> = None;
        let mut buf: Vec<u8> = Vec::new();

        loop {
            // Carry out what the machine asked, in order.
            while let Some(req) = m.poll_request() {
                self.execute(&mut m, req, &ack_tx, &hb_tx, &mut renewal)
                    .await?;
            }
            while let Some(ev) = m.poll_event() {
                match ev {
                    AgentEvent::IncarnationAdopted { .. } => *welcomed = true,
                    AgentEvent::Connected {
                        acked_seq,
                        last_seq,
                        master_rev,
                        central_rev,
                        central_version,
                    } => {
                        self.link.heard(now_ms());
                        self.link.set_protocol_version(version);
                        self.link.set_connected(true);
                        tracing::info!(
                            acked_seq,
                            last_seq,
                            master_rev,
                            central_rev,
                            %central_version,
                            protocol_version = version,
                            "connected to central"
                        );
                    }
                    AgentEvent::Rewound { from, to } => tracing::warn!(
                        central_acked_seq = to,
                        agent_acked_seq = from,
                        resent = from - to,
                        "central is behind what it acknowledged (restored from a backup?): \
                         re-sending {} events",
                        from - to
                    ),
                    AgentEvent::AllowanceAnswered {
                        request_id,
                        granted,
                        rev,
                        reason,
                    } => {
                        tracing::debug!(request_id, granted, rev, %reason, "allowance reply");
                        if let Some(reply) = pending.remove(&request_id) {
                            let _ = reply.send(AllowanceAnswer {
                                granted,
                                rev,
                                reason,
                            });
                        }
                    }
                    // Its order stopped waiting before the answer came; a grant still arrives
                    // as a master change and stays in the site's allowance.
                    AgentEvent::AllowanceLate { request_id } => {
                        pending.remove(&request_id);
                        tracing::debug!(request_id, "late allowance reply");
                    }
                    AgentEvent::AllowanceNotSent => tracing::warn!(
                        pending = pending.len(),
                        "too many allowance requests unanswered; not sending another"
                    ),
                    AgentEvent::Certificate { chain_pem } => {
                        self.install_certificate(renewal.take(), chain_pem).await
                    }
                    AgentEvent::CertificateUnasked => {
                        tracing::warn!("central sent a certificate that was not asked for; ignored")
                    }
                    AgentEvent::RenewalRefused { reason } => {
                        renewal = None;
                        tracing::warn!(%reason, "central refused to renew the certificate; asking again later");
                        self.link.update_certificate(|c| {
                            c.last_error = Some(format!("central refused: {reason}"))
                        });
                    }
                    AgentEvent::HeartbeatSkipped { error } => {
                        tracing::warn!(%error, "cannot encode a heartbeat")
                    }
                    AgentEvent::Sent { range } => tracing::trace!(?range, "events sent"),
                }
            }
            // Everything the machine queued, several frames per write.
            while let Some(frame) = m.poll_transmit() {
                buf.extend_from_slice(&frame);
                if buf.len() >= MAX_COALESCE_BYTES {
                    write_all(&mut send, &buf).await?;
                    buf.clear();
                }
            }
            if !buf.is_empty() {
                write_all(&mut send, &buf).await?;
                buf.clear();
            }
            if let Some(e) = m.poll_end() {
                return Err(SyncError::Session { source: e });
            }
            // A request may have produced more requests (a read after a read).
            if m.has_requests() {
                continue;
            }

            let deadline = m.poll_timeout().map(Instant::from_std);
            tokio::select! {
                msg = inbound.recv(), if m.wants_input() => match msg {
                    Some(Ok(Some(msg))) => m.handle_message(std::time::Instant::now(), msg),
                    Some(Ok(None)) | None => return Ok(SessionEnd::Closed),
                    Some(Err(e)) if e.is_protocol_violation() => m.handle_read_error(e),
                    Some(Err(e)) => return Err(reader_error(conn, e)),
                },
                _ = self.store.new_events().notified(), if m.is_live() => {
                    let last_seq = read(&self.store, Store::marks).await?.last_seq;
                    m.handle_new_events(last_seq);
                }
                Some(hb) = heartbeats.recv() => m.handle_heartbeat(hb),
                changed = acked_rx.changed() => {
                    if changed.is_err() {
                        return Err(SyncError::Task("the ack persister stopped".into()));
                    }
                    let state = acked_rx.borrow_and_update().clone();
                    match state.failed {
                        Some((through, error)) => m.handle_ack_persist_failed(through, error),
                        None => m.handle_ack_persisted(state.persisted),
                    }
                }
                ask = self.asks.recv(), if self.asks_open => match ask {
                    Some(ask) if ask.reply.is_closed() => {}
                    Some(ask) => {
                        let now = std::time::Instant::now();
                        if let Some(id) = m.handle_ask(now, ask.pool.clone(), ask.qty, ask.deadline.into_std()) {
                            tracing::debug!(request_id = id, pool = %ask.pool.key(), qty = ask.qty, "allowance requested");
                            pending.retain(|_, r| !r.is_closed());
                            pending.insert(id, ask.reply);
                        }
                    }
                    None => self.asks_open = false,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    m.handle_timeout(std::time::Instant::now());
                }
            }
        }
    }

    /// Carries out one request of the machine and reports its outcome back.
    async fn execute(
        &mut self,
        m: &mut AgentSession,
        req: AgentRequest,
        ack_tx: &watch::Sender<Option<u64>>,
        hb_tx: &mpsc::Sender<Option<Heartbeat>>,
        renewal: &mut Option<RenewalRequest>,
    ) -> Result<(), SyncError> {
        let now = std::time::Instant::now;
        match req {
            AgentRequest::AdoptIncarnation {
                incarnation,
                master_from_rev,
                hello_last_seq,
            } => {
                let outcome = self
                    .store
                    .adopt_central_incarnation(incarnation, master_from_rev, hello_last_seq)
                    .await;
                let outcome = outcome.map(|c| log_incarnation(c, incarnation, master_from_rev));
                let marks = read(&self.store, Store::marks).await?;
                m.handle_incarnation_adopted(
                    now(),
                    outcome.map_err(|e| StoreFailure(e.to_string())),
                    marks_of(&marks),
                );
            }
            AgentRequest::Rewind { to } => {
                let outcome = match self.store.rewind_acked(to).await {
                    Ok(from) => Ok(Rewound::From(from)),
                    Err(WriteError::NotRetained { retained_from, .. }) => {
                        Ok(Rewound::NotRetained { retained_from })
                    }
                    Err(e) => Err(StoreFailure(e.to_string())),
                };
                let marks = read(&self.store, Store::marks).await?;
                m.handle_rewound(now(), outcome, marks_of(&marks));
            }
            AgentRequest::PersistAck { through } => {
                ack_tx.send_replace(Some(through));
            }
            AgentRequest::ApplyMaster(batch) => {
                let (from, through, n) = (batch.from_rev, batch.through_rev, batch.changes.len());
                let outcome = match self.store.apply_master(batch).await {
                    Ok(applied) => {
                        tracing::debug!(from, through, changes = n, applied, "master batch");
                        Ok(())
                    }
                    Err(WriteError::BadMasterBatch(reason)) => {
                        Err(ApplyMasterFailure::BadBatch(reason))
                    }
                    Err(e) => Err(ApplyMasterFailure::Store(StoreFailure(e.to_string()))),
                };
                m.handle_master_applied(outcome);
            }
            AgentRequest::ReadOutbox(range) => {
                let events = read(&self.store, move |s| s.outbox_range(range)).await;
                let events = match events {
                    Ok(e) => e,
                    Err(e) => return Err(e),
                };
                // One line per event, so a trace can be followed from the request to the upload.
                if tracing::enabled!(tracing::Level::DEBUG) {
                    for e in &events {
                        tracing::debug!(
                            trace_id = %e.trace_id,
                            seq = e.seq,
                            event_id = %e.event_id,
                            "event sent to central"
                        );
                    }
                }
                m.handle_outbox(Ok(events));
            }
            AgentRequest::SampleHeartbeat => {
                let Some((_, probe)) = self.heartbeat.clone() else {
                    m.handle_heartbeat(None);
                    return Ok(());
                };
                let out = hb_tx.clone();
                // Sampled off the session loop; the answer comes back through `heartbeats`.
                tokio::spawn(
                    async move {
                        let _ = out.send(sample_heartbeat(probe).await).await;
                    }
                    .in_current_span(),
                );
            }
            AgentRequest::CheckRenewal => {
                let request = self.renewal_request().await;
                m.handle_renewal_request(request.as_ref().map(|r| r.csr_der.clone()));
                if let Some(r) = request {
                    tracing::info!(
                        "asked central to renew the site certificate (new key made here)"
                    );
                    *renewal = Some(r);
                }
            }
        }
        Ok(())
    }
}

fn log_incarnation(c: IncarnationChange, incarnation: u64, master_from_rev: u64) -> Adopted {
    match c {
        IncarnationChange::Unchanged => Adopted::Unchanged,
        IncarnationChange::First => {
            tracing::info!(incarnation, "recorded the incarnation of central's store");
            Adopted::First
        }
        IncarnationChange::Changed {
            previous,
            allowances_dropped,
            atp_dropped,
            credit_dropped,
            master_rev_before,
        } => {
            tracing::warn!(
                previous_incarnation = previous,
                incarnation,
                allowances_dropped,
                atp_dropped,
                credit_dropped,
                master_rev_before,
                master_rev = master_from_rev,
                "central's store changed (restored from a backup?): every allowance dropped to 0; \
                 master data resumes from revision {master_from_rev}"
            );
            Adopted::Changed
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One heartbeat, sampled on the blocking pool (`/proc`, `statvfs` and redb reads).
async fn sample_heartbeat(
    probe: std::sync::Arc<std::sync::Mutex<HealthProbe>>,
) -> Option<Heartbeat> {
    let sampled = tokio::task::spawn_blocking(move || {
        probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sample()
    })
    .await;
    match sampled {
        Ok(hb) => Some(hb),
        Err(e) => {
            tracing::warn!(error = %e, "sampling a heartbeat failed");
            None
        }
    }
}

/// Persists the latest acknowledged seq, coalescing acks that arrive during a commit, and
/// reports each persisted mark, or the first failure, back to the session.
async fn persist_acks(
    store: Store,
    mut rx: watch::Receiver<Option<u64>>,
    done: watch::Sender<AckState>,
) {
    while rx.changed().await.is_ok() {
        let Some(through) = *rx.borrow_and_update() else {
            continue;
        };
        match store.mark_acked(through).await {
            Ok(_) => done.send_modify(|s| s.persisted = s.persisted.max(through)),
            Err(e) => {
                // The rows stay in the outbox; the next Welcome carries central's mark again.
                done.send_modify(|s| s.failed = Some((through, e.to_string())));
                return;
            }
        }
    }
}

async fn write_all(send: &mut quinn::SendStream, buf: &[u8]) -> Result<(), SyncError> {
    timeout(WRITE_TIMEOUT, send.write_all(buf))
        .await
        .map_err(|_| SyncError::Timeout("writing to central"))??;
    Ok(())
}

/// A transport error from the reader: prefer the connection's own close reason (it says
/// whether central closed it, the idle timeout fired, or it was reset).
fn reader_error(conn: &quinn::Connection, e: FrameError) -> SyncError {
    match conn.close_reason() {
        Some(reason) => SyncError::Connection(reason),
        None => SyncError::Frame(e),
    }
}
