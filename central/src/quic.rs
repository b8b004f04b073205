//! The sync server (quinn + rustls, mutual TLS): accepts agent connections, takes each site's
//! identity from its client certificate, runs the Hello/Welcome session (starting the site's
//! reconciliation report and topping it up), ingests uploaded batches (ack only after the
//! durable commit), answers allowance requests and pushes master-data changes (grants included)
//! as the revision advances. I/O shell around `outpost_protocol::session`.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::identity::site_id_from_cert_der;
use outpost_protocol::io::{read_frame, write_frame};
use outpost_protocol::session::{IngestError, check_hello};
use outpost_protocol::{
    ALPN, AgentMsg, CentralMsg, EventEnvelope, FrameError, MAX_CHANGES_PER_FRAME, MasterBatch,
    PROTOCOL_VERSION, Refuse, RefuseCode, Welcome,
};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::certs::{CertError, load_certs, load_key};
use crate::config::QuicConfig;
use crate::registry::Registry;
use crate::store::{AllowanceAnswer, IngestBatchError, Store};

/// Most simultaneous agent connections: a few hundred sites per central, with room for
/// reconnect overlap. Connections beyond it are refused at the handshake.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most handshakes queued in quinn at once (a flood of Initials is cut here).
pub const MAX_INCOMING: usize = 256;
/// Streams an agent may open at once: the protocol uses one; a few spare for a racing reconnect.
pub const MAX_BIDI_STREAMS: u32 = 4;
/// Per-stream and per-connection receive windows: several full frames in flight, bounded memory
/// per connection.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
pub const RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Bytes of not-yet-accepted handshake data buffered per incoming connection and in total.
pub const INCOMING_BUFFER_BYTES: u64 = 64 * 1024;
pub const INCOMING_BUFFER_TOTAL_BYTES: u64 = 16 * 1024 * 1024;
/// Limit on the TLS handshake of one connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent has, after the handshake, to open its stream and send Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit on writing one frame to an agent; a peer that does not read is cut off.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a Refuse, how long central waits for the agent to close before closing itself, so that
/// the Refuse frame is delivered rather than discarded by an immediate close.
pub const REFUSE_LINGER: Duration = Duration::from_secs(1);
/// Frames read ahead of processing per session; the reader waits when full (QUIC flow control
/// then slows the agent).
pub const INBOUND_QUEUE: usize = 4;
/// How long shutdown waits for sessions to say goodbye before aborting them.
pub const SESSION_DRAIN: Duration = Duration::from_secs(3);

/// Application close codes on the QUIC connection.
pub const CLOSE_NORMAL: u32 = 0;
pub const CLOSE_REFUSED: u32 = 1;
pub const CLOSE_NO_IDENTITY: u32 = 2;
pub const CLOSE_SHUTDOWN: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("the fleet CA certificate is not usable as a trust root: {0}")]
    Roots(rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration refused: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Builds the QUIC server configuration: TLS 1.3 only with the ring provider, client certificates
/// required and verified against the fleet CA, the Outpost ALPN, no 0-RTT, explicit limits.
pub fn server_config(cfg: &QuicConfig) -> Result<quinn::ServerConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&cfg.ca_cert)? {
        roots.add(ca).map_err(TlsSetupError::Roots)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data is replayable; the sync protocol never needs it.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg)));
    server
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER_BYTES)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL_BYTES);
    Ok(server)
}

fn transport_config(cfg: &QuicConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .keep_alive_interval(Some(Duration::from_millis(cfg.keep_alive_ms)));
    // validate() bounds idle_timeout_ms far below the VarInt limit.
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(cfg.idle_timeout_ms))
        .expect("idle timeout validated to be at most MAX_IDLE_TIMEOUT_MS");
    t.max_idle_timeout(Some(idle));
    t
}

/// What every session needs.
#[derive(Clone)]
pub struct SyncContext {
    pub store: Store,
    pub registry: Arc<Registry>,
}

/// Accepts connections until `shutdown` turns true, then tells every session to end, waits for
/// them (bounded) and closes the endpoint.
pub async fn run(endpoint: Endpoint, ctx: SyncContext, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown.clone();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
                    incoming.refuse();
                    continue;
                };
                let span = tracing::info_span!("conn", remote = %incoming.remote_address(), site.id = tracing::field::Empty);
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                sessions.spawn(async move {
                    handle_incoming(incoming, ctx, shutdown).await;
                    drop(permit);
                }.instrument(span));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    endpoint.set_server_config(None);
    let drained = tokio::time::timeout(SESSION_DRAIN, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = sessions.len(),
            "sessions did not end in time; aborting them"
        );
        sessions.abort_all();
    }
    endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"central shutting down");
    if tokio::time::timeout(SESSION_DRAIN, endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("QUIC endpoint did not become idle in time");
    }
}

/// The site id in the verified client certificate, or why there is none.
pub fn cert_site(conn: &Connection) -> Result<String, String> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| "no client certificate".to_string())?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| "empty client certificate chain".to_string())?;
    site_id_from_cert_der(leaf).map_err(|e| e.to_string())
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    ctx: SyncContext,
    shutdown: watch::Receiver<bool>,
) {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "incoming connection failed");
            return;
        }
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!("handshake timed out");
            return;
        }
    };
    let site = match cert_site(&conn) {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!(reason = %why, "client certificate names no valid site; closing");
            let reason = format!("no site identity: {why}");
            conn.close(VarInt::from_u32(CLOSE_NO_IDENTITY), truncate(&reason));
            return;
        }
    };
    tracing::Span::current().record("site.id", site.as_str());
    let session = Session {
        conn: conn.clone(),
        site,
        ctx,
        shutdown,
    };
    session.run().await;
}

fn truncate(reason: &str) -> &[u8] {
    let b = reason.as_bytes();
    &b[..b.len().min(outpost_protocol::MAX_TEXT_LEN)]
}

/// How a session ended, for the log.
enum End {
    /// The agent closed its stream or the connection went away.
    Gone(String),
    /// Central refused (Refuse frame sent).
    Refused(Refuse),
}

struct Session {
    conn: Connection,
    site: String,
    ctx: SyncContext,
    shutdown: watch::Receiver<bool>,
}

/// Aborts the reader task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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

/// Cuts a reason sent to an agent to `MAX_TEXT_LEN` bytes (on a character boundary).
fn bounded(mut reason: String) -> String {
    if reason.len() > outpost_protocol::MAX_TEXT_LEN {
        let mut cut = outpost_protocol::MAX_TEXT_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

fn refuse(code: RefuseCode, reason: impl Into<String>) -> Refuse {
    Refuse {
        code,
        reason: bounded(reason.into()),
    }
}

fn refuse_for_ingest(e: &IngestError) -> Refuse {
    let code = match e {
        IngestError::ForeignSite { .. } => RefuseCode::WrongSite,
        _ => RefuseCode::ProtocolViolation,
    };
    refuse(code, e.to_string())
}

impl Session {
    async fn run(self) {
        let (mut send, mut recv) =
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
        let hello =
            match tokio::time::timeout(HELLO_TIMEOUT, read_frame::<AgentMsg, _>(&mut recv)).await {
                Ok(Ok(Some(AgentMsg::Hello(h)))) => h,
                Ok(Ok(Some(_))) => {
                    let r = refuse(
                        RefuseCode::ProtocolViolation,
                        "the first message must be Hello",
                    );
                    self.send_refuse(&mut send, r).await;
                    return;
                }
                Ok(Ok(None)) => {
                    tracing::info!("agent closed the stream before Hello");
                    return;
                }
                Ok(Err(e)) => {
                    self.frame_error(&mut send, e).await;
                    return;
                }
                Err(_) => {
                    let r = refuse(RefuseCode::ProtocolViolation, "no Hello in time");
                    self.send_refuse(&mut send, r).await;
                    return;
                }
            };
        if let Err(r) = check_hello(&self.site, &hello) {
            self.send_refuse(&mut send, r).await;
            return;
        }
        let ticket = self.ctx.registry.register(&self.site);
        let _registered = Registered {
            registry: self.ctx.registry.clone(),
            site: self.site.clone(),
            id: ticket.id,
        };
        // Durably opens this session's reconciliation report and tops the site up before the
        // Welcome, so the Welcome's revision already covers the grants.
        let start = match self
            .ctx
            .store
            .begin_session(&self.site, hello.last_seq)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let r = refuse(
                    RefuseCode::Unavailable,
                    format!("central cannot record the session: {e}"),
                );
                self.send_refuse(&mut send, r).await;
                return;
            }
        };
        let acked_seq = start.acked_seq;
        let mut rev_rx = self.ctx.store.subscribe_revision();
        let central_rev = *rev_rx.borrow_and_update();
        let welcome = CentralMsg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            central_version: crate::VERSION.to_string(),
            acked_seq,
            master_rev: central_rev,
        });
        if let Err(e) = self.write(&mut send, &welcome).await {
            tracing::info!(error = %e, "cannot send Welcome");
            return;
        }
        tracing::info!(
            agent_version = %hello.agent_version,
            agent_rev = hello.master_rev,
            agent_last_seq = hello.last_seq,
            acked_seq,
            central_rev,
            session = start.session,
            "session started"
        );
        let end = self
            .serve(
                send,
                recv,
                ticket.superseded,
                rev_rx,
                hello.master_rev,
                central_rev,
            )
            .await;
        match end {
            End::Gone(why) => tracing::info!(reason = %why, "session ended"),
            End::Refused(r) => {
                tracing::warn!(code = ?r.code, reason = %r.reason, "session refused")
            }
        }
        // Best effort: the store may already be closing during shutdown.
        let _ = self.ctx.store.touch_site(&self.site).await;
    }

    async fn serve(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
        mut superseded: tokio::sync::oneshot::Receiver<()>,
        mut rev_rx: watch::Receiver<u64>,
        mut agent_rev: u64,
        mut central_rev: u64,
    ) -> End {
        // A dedicated reader keeps frame reads whole: `read_frame` is not cancel-safe, so it
        // must not sit in the select below.
        let (frames_tx, mut frames) = mpsc::channel::<Result<AgentMsg, FrameError>>(INBOUND_QUEUE);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            loop {
                let r = read_frame::<AgentMsg, _>(&mut recv).await;
                let stop = !matches!(r, Ok(Some(_)));
                let msg = match r {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                if frames_tx.send(msg).await.is_err() || stop {
                    break;
                }
            }
        }));
        let mut shutdown = self.shutdown.clone();
        let mut rev_open = true;
        let mut warned_agent_ahead = false;
        loop {
            if agent_rev > central_rev && !warned_agent_ahead {
                tracing::warn!(
                    agent_rev,
                    central_rev,
                    "agent has applied a higher master revision than central holds (central store replaced?)"
                );
                warned_agent_ahead = true;
            }
            tokio::select! {
                biased;
                _ = &mut superseded => {
                    let r = refuse(RefuseCode::Superseded, "a newer connection from this site replaced this one");
                    self.send_refuse(&mut send, r.clone()).await;
                    return End::Refused(r);
                }
                _ = async { drop(shutdown.wait_for(|s| *s).await) } => {
                    let r = refuse(RefuseCode::Unavailable, "central is shutting down");
                    self.send_refuse(&mut send, r.clone()).await;
                    return End::Refused(r);
                }
                msg = frames.recv() => {
                    match msg {
                        None => {
                            self.conn.close(VarInt::from_u32(CLOSE_NORMAL), b"stream closed");
                            return End::Gone("agent closed the stream".into());
                        }
                        Some(Err(e)) => {
                            return self.frame_error(&mut send, e).await;
                        }
                        Some(Ok(AgentMsg::Hello(_))) => {
                            let r = refuse(RefuseCode::ProtocolViolation, "Hello sent twice");
                            self.send_refuse(&mut send, r.clone()).await;
                            return End::Refused(r);
                        }
                        Some(Ok(AgentMsg::AllowanceRequest { request_id, pool, qty })) => {
                            self.ctx.registry.touch(&self.site);
                            let a = self.allowance(pool, qty).await;
                            // Push the Grant right after the reply: the agent waits for both.
                            central_rev = central_rev.max(a.rev);
                            let reply = CentralMsg::AllowanceReply {
                                request_id,
                                granted: a.granted,
                                rev: a.rev,
                                reason: bounded(a.reason),
                            };
                            if let Err(e) = self.write(&mut send, &reply).await {
                                return End::Gone(format!("cannot send AllowanceReply: {e}"));
                            }
                        }
                        Some(Ok(AgentMsg::Events(batch))) => {
                            self.ctx.registry.touch(&self.site);
                            match self.ingest(batch).await {
                                Ok(through_seq) => {
                                    if let Err(e) = self.write(&mut send, &CentralMsg::Ack { through_seq }).await {
                                        return End::Gone(format!("cannot send Ack: {e}"));
                                    }
                                }
                                Err(r) => {
                                    self.send_refuse(&mut send, r.clone()).await;
                                    return End::Refused(r);
                                }
                            }
                        }
                    }
                }
                _ = std::future::ready(()), if agent_rev < central_rev => {
                    match self.push_master(&mut send, agent_rev, central_rev).await {
                        Ok(through) => agent_rev = through,
                        Err(end) => return end,
                    }
                }
                changed = rev_rx.changed(), if rev_open => {
                    if changed.is_err() {
                        rev_open = false;
                    } else {
                        central_rev = *rev_rx.borrow_and_update();
                    }
                }
            }
        }
    }

    /// Durably applies what is new in the batch; returns the site's high-water mark to ack. A
    /// batch of duplicates only is written too: the session's reconciliation report counts them.
    async fn ingest(&self, batch: Vec<EventEnvelope>) -> Result<u64, Refuse> {
        let n = batch.len();
        match self.ctx.store.ingest(&self.site, batch).await {
            Ok(out) => {
                tracing::debug!(
                    events = n,
                    stored = out.stored,
                    duplicates = out.duplicates,
                    dead_letters = out.dead_letters,
                    exceptions = out.exceptions,
                    hwm = out.new_hwm,
                    "batch committed"
                );
                Ok(out.new_hwm)
            }
            Err(IngestBatchError::Plan(e)) => Err(refuse_for_ingest(&e)),
            Err(IngestBatchError::Unavailable(e)) => Err(refuse(
                RefuseCode::Unavailable,
                format!("central cannot store events right now: {e}"),
            )),
        }
    }

    /// Answers an allowance request. A store that cannot write right now grants nothing: the
    /// agent falls back to pending lines, which is always safe.
    async fn allowance(&self, pool: outpost_protocol::Pool, qty: i64) -> AllowanceAnswer {
        let key = pool.key();
        match self
            .ctx
            .store
            .allowance_request(&self.site, pool, qty)
            .await
        {
            Ok(a) => {
                tracing::debug!(pool = %key, asked = qty, granted = a.granted, rev = a.rev, "allowance request answered");
                a
            }
            Err(e) => {
                tracing::warn!(pool = %key, error = %e, "cannot grant allowance");
                AllowanceAnswer {
                    granted: 0,
                    rev: 0,
                    reason: format!("central cannot grant right now: {e}"),
                }
            }
        }
    }

    /// Sends one Master frame with the changes after `from` (at most `MAX_CHANGES_PER_FRAME`
    /// scanned); returns the revision the agent is at afterwards.
    async fn push_master(
        &self,
        send: &mut SendStream,
        from: u64,
        central_rev: u64,
    ) -> Result<u64, End> {
        let scanned = match self.ctx.store.changes_after(from, MAX_CHANGES_PER_FRAME) {
            Ok(c) => c,
            Err(e) => {
                let r = refuse(
                    RefuseCode::Unavailable,
                    format!("central cannot read master data: {e}"),
                );
                self.send_refuse(send, r.clone()).await;
                return Err(End::Refused(r));
            }
        };
        let Some(&(through_rev, _)) = scanned.last() else {
            // The revision said there is more, the log has nothing: nothing to send.
            return Ok(central_rev);
        };
        let changes: Vec<_> = scanned
            .into_iter()
            .filter(|(_, c)| c.concerns(&self.site))
            .map(|(_, c)| c)
            .collect();
        let n = changes.len();
        let msg = CentralMsg::Master(MasterBatch {
            from_rev: from,
            through_rev,
            changes,
        });
        if let Err(e) = self.write(send, &msg).await {
            return Err(End::Gone(format!("cannot send Master: {e}")));
        }
        tracing::debug!(from, through_rev, changes = n, "master changes sent");
        Ok(through_rev)
    }

    async fn write(&self, send: &mut SendStream, msg: &CentralMsg) -> Result<(), String> {
        match tokio::time::timeout(WRITE_TIMEOUT, write_frame(send, msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("write timed out".into()),
        }
    }

    async fn frame_error(&self, send: &mut SendStream, e: FrameError) -> End {
        if e.is_protocol_violation() {
            let r = refuse(RefuseCode::ProtocolViolation, format!("bad frame: {e}"));
            self.send_refuse(send, r.clone()).await;
            End::Refused(r)
        } else {
            End::Gone(format!("read failed: {e}"))
        }
    }

    /// Sends `Refuse`, gives the agent a moment to read it and close, then closes.
    async fn send_refuse(&self, send: &mut SendStream, r: Refuse) {
        let reason = r.reason.clone();
        if self.write(send, &CentralMsg::Refuse(r)).await.is_ok() {
            let _ = send.finish();
            let _ = tokio::time::timeout(REFUSE_LINGER, self.conn.closed()).await;
        }
        self.conn
            .close(VarInt::from_u32(CLOSE_REFUSED), truncate(&reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_bounded_and_codes_follow_the_error() {
        let long = "é".repeat(400);
        let r = refuse(RefuseCode::ProtocolViolation, long);
        assert!(r.reason.len() <= outpost_protocol::MAX_TEXT_LEN);
        let foreign = IngestError::ForeignSite {
            seq: 1,
            claimed: "plant-2".into(),
            site: "plant-1".into(),
        };
        assert_eq!(refuse_for_ingest(&foreign).code, RefuseCode::WrongSite);
        let gap = IngestError::Gap {
            expected: 2,
            got: 5,
        };
        assert_eq!(refuse_for_ingest(&gap).code, RefuseCode::ProtocolViolation);
    }
}
