//! The sync server (quinn + rustls, mutual TLS): accepts agent connections within the configured
//! limits (live connections, handshakes per source address, central's own memory), takes each
//! site's identity from its client certificate, refuses revoked sites, runs the Hello/Welcome
//! session (estimating the site's clock offset, starting its reconciliation report and topping
//! it up), ingests uploaded batches (ack only after the durable commit), answers allowance
//! requests and pushes master-data changes (grants included) as the revision advances. I/O shell
//! around `outpost_protocol::session`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocol::identity::site_id_from_cert_der;
use outpost_protocol::io::{read_frame, write_frame};
use outpost_protocol::session::{IngestError, check_hello};
use outpost_protocol::{
    AgentMsg, CentralMsg, EventEnvelope, FrameError, MAX_CHANGES_PER_FRAME, MasterBatch, Refuse,
    RefuseCode, Welcome,
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
use crate::memory::{MemoryGauge, run_memory_sampler};
use crate::registry::{EndSignal, Registry};
use crate::store::{AllowanceAnswer, HelloMarks, IngestBatchError, Store};

// The connection, handshake, stream, window and memory limits are config (`[quic]`, see
// `config.rs` for their defaults and why).

/// At most one warning per this interval while connections are refused for memory or per-address
/// limits; the rest are counted into the next warning.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// A clock offset beyond this is logged as a warning (certificates and logs get confusing).
pub const CLOCK_OFFSET_WARN_MS: i64 = 5 * 60 * 1000;
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
    // Every version this build speaks, newest first, up to `[quic] protocol_version_max`: an
    // agent one release behind settles on the version before.
    tls.alpn_protocols = outpost_protocol::alpn_protocols(cfg.protocol_version_max);
    // 0-RTT data is replayable; the sync protocol never needs it.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg)));
    server
        .max_incoming(cfg.max_incoming)
        .incoming_buffer_size(cfg.incoming_buffer_bytes)
        .incoming_buffer_size_total(cfg.incoming_buffer_total_bytes);
    Ok(server)
}

fn varint(v: u64) -> VarInt {
    // validate() bounds every window far below the VarInt limit (2^62).
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

fn transport_config(cfg: &QuicConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Unidirectional streams and datagrams are not part of the protocol: none are accepted, so
    // a peer cannot make central buffer them.
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .stream_receive_window(varint(cfg.stream_receive_window_bytes))
        .receive_window(varint(cfg.receive_window_bytes))
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
    /// Signs renewed site certificates (`[renewal]`).
    pub signer: Arc<crate::renewal::Signer>,
}

/// What the accept loop enforces before a handshake starts (from `[quic]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptLimits {
    pub max_connections: usize,
    pub max_handshakes_per_ip: usize,
    pub memory_limit_bytes: u64,
}

impl AcceptLimits {
    pub fn from_config(cfg: &QuicConfig) -> Self {
        AcceptLimits {
            max_connections: cfg.max_connections,
            max_handshakes_per_ip: cfg.max_handshakes_per_ip,
            memory_limit_bytes: cfg.memory_limit_mib.saturating_mul(1024 * 1024),
        }
    }
}

/// Handshakes in flight per source address.
#[derive(Debug, Default)]
struct Handshakes(Mutex<HashMap<IpAddr, usize>>);

impl Handshakes {
    /// Counts a handshake from `ip` if fewer than `max` are in flight; the slot is freed when
    /// the returned guard drops.
    fn try_start(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<HandshakeSlot> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot {
            table: self.clone(),
            ip,
        })
    }
}

struct HandshakeSlot {
    table: Arc<Handshakes>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut g = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.ip);
            }
        }
    }
}

/// Why an incoming connection was refused before its handshake; counted and logged at most once
/// per `REFUSAL_LOG_INTERVAL` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RefusedFor {
    Connections,
    HandshakesPerIp,
    Memory,
}

#[derive(Default)]
struct RefusalLog(HashMap<RefusedFor, (Option<Instant>, u64)>);

impl RefusalLog {
    fn refused(&mut self, why: RefusedFor, remote: std::net::SocketAddr, gauge: &MemoryGauge) {
        let (last, count) = self.0.entry(why).or_insert((None, 0));
        *count += 1;
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_INTERVAL) {
            return;
        }
        let n = std::mem::take(count);
        *last = Some(Instant::now());
        match why {
            RefusedFor::Connections => {
                tracing::warn!(%remote, refused = n, "connection limit (quic.max_connections) reached; refusing")
            }
            RefusedFor::HandshakesPerIp => {
                tracing::warn!(%remote, refused = n, "too many handshakes in flight from this address (quic.max_handshakes_per_ip); refusing")
            }
            RefusedFor::Memory => {
                tracing::warn!(%remote, refused = n, rss_mib = gauge.rss_bytes() >> 20, "memory above quic.memory_limit_mib; refusing new connections")
            }
        }
    }
}

/// Accepts connections until `shutdown` turns true, then tells every session to end, waits for
/// them (bounded) and closes the endpoint. Before a handshake starts, a connection is refused
/// when central holds `max_connections` already, when its address has `max_handshakes_per_ip`
/// handshakes in flight, or while central's memory is above its limit.
pub async fn run(
    endpoint: Endpoint,
    ctx: SyncContext,
    limits: AcceptLimits,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Handshakes::default());
    let gauge = Arc::new(MemoryGauge::default());
    let sampler = AbortOnDrop(tokio::spawn(run_memory_sampler(
        gauge.clone(),
        limits.memory_limit_bytes,
        shutdown.clone(),
    )));
    let mut refusals = RefusalLog::default();
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                if gauge.over_limit() {
                    refusals.refused(RefusedFor::Memory, remote, &gauge);
                    ctx.registry.accept_refusals().memory.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                }
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    refusals.refused(RefusedFor::Connections, remote, &gauge);
                    ctx.registry.accept_refusals().connections.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                };
                let Some(slot) = handshakes.try_start(remote.ip(), limits.max_handshakes_per_ip) else {
                    refusals.refused(RefusedFor::HandshakesPerIp, remote, &gauge);
                    ctx.registry.accept_refusals().handshakes_per_ip.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                };
                let span = tracing::info_span!("conn", %remote, site.id = tracing::field::Empty);
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                sessions.spawn(async move {
                    handle_incoming(incoming, slot, ctx, shutdown).await;
                    drop(permit);
                }.instrument(span));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(sampler);
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

/// End of the validity of the client certificate (ms since the epoch), if it can be read.
fn peer_cert_not_after_ms(conn: &Connection) -> Option<i64> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    cert.validity().not_after.timestamp().checked_mul(1000)
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    handshake_slot: HandshakeSlot,
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
    // The handshake is over: it no longer counts against its address.
    drop(handshake_slot);
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
    // The handshake only completes on an ALPN both sides list (`server_config`).
    let version = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .and_then(|p| outpost_protocol::version_of_alpn(&p));
    let Some(version) = version else {
        tracing::warn!("no Outpost protocol negotiated; closing");
        conn.close(
            VarInt::from_u32(CLOSE_REFUSED),
            b"no Outpost protocol version negotiated",
        );
        return;
    };
    let session = Session {
        conn: conn.clone(),
        site,
        version,
        ctx,
        shutdown,
    };
    session.run().await;
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The site's clock minus central's: the agent stamped its Hello `agent_time_ms` about half a
/// round trip before central read it at `received_ms`.
pub fn clock_offset_ms(agent_time_ms: i64, received_ms: i64, rtt: Duration) -> i64 {
    let half_rtt = i64::try_from(rtt.as_millis() / 2).unwrap_or(i64::MAX);
    agent_time_ms
        .saturating_sub(received_ms)
        .saturating_add(half_rtt)
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
    /// Protocol version of this session, negotiated by ALPN: `MIN_PROTOCOL_VERSION` to
    /// `PROTOCOL_VERSION`. Messages newer than it are never sent.
    version: u16,
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
        let received_ms = unix_ms(SystemTime::now());
        if let Err(r) = check_hello(&self.site, self.version, &hello) {
            self.send_refuse(&mut send, r).await;
            return;
        }
        if let Some(r) = self.refusal_if_revoked() {
            self.send_refuse(&mut send, r).await;
            return;
        }
        let ticket = self.ctx.registry.register(&self.site);
        let _registered = Registered {
            registry: self.ctx.registry.clone(),
            site: self.site.clone(),
            id: ticket.id,
        };
        // Checked again once registered: a revocation committed between the first check and the
        // registration found no session to end, and is seen here.
        if let Some(r) = self.refusal_if_revoked() {
            self.send_refuse(&mut send, r).await;
            return;
        }
        // Checked once registered, like the revocation: a drill that started before the
        // registration found no session to end.
        if let Some(why) = self.ctx.registry.drills().refusal(&self.site) {
            tracing::info!(reason = %why, "site refused: cut off by a drill");
            self.send_refuse(&mut send, refuse(RefuseCode::Unavailable, why))
                .await;
            return;
        }
        self.ctx.registry.set_session_info(
            &self.site,
            crate::registry::SessionInfo {
                protocol_version: self.version,
                cert_not_after_ms: peer_cert_not_after_ms(&self.conn),
            },
        );
        let offset_ms = clock_offset_ms(hello.agent_time_ms, received_ms, self.conn.rtt());
        self.ctx.registry.set_clock_offset(&self.site, offset_ms);
        if offset_ms.unsigned_abs() > CLOCK_OFFSET_WARN_MS.unsigned_abs() {
            tracing::warn!(
                clock_offset_ms = offset_ms,
                "the site's clock is more than 5 minutes off central's (events are ordered by sequence, not by clock; certificates and logs may be affected)"
            );
        }
        // The Hello's marks must agree with each other before central acts on them: a mark
        // beyond the agent's own last seq would move the site's high-water mark past events
        // that do not exist.
        if hello.acked_seq > hello.last_seq
            || hello.retained_from_seq > hello.last_seq.saturating_add(1)
        {
            let r = refuse(
                RefuseCode::ProtocolViolation,
                format!(
                    "inconsistent Hello: acked_seq {} and retained_from_seq {} must not exceed last_seq {} (+1)",
                    hello.acked_seq, hello.retained_from_seq, hello.last_seq
                ),
            );
            self.send_refuse(&mut send, r).await;
            return;
        }
        // Durably opens this session's reconciliation report, records what a restored central
        // lost, resets the site's allowances after a restore, and tops the site up before the
        // Welcome, so the Welcome's revision already covers the grants.
        let start = match self
            .ctx
            .store
            .begin_session(&self.site, HelloMarks::from(&hello))
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
        self.ctx.registry.drills().on_connect(
            &self.site,
            hello.last_seq,
            hello.acked_seq,
            acked_seq,
            received_ms,
        );
        let mut rev_rx = self.ctx.store.subscribe_revision();
        let central_rev = *rev_rx.borrow_and_update();
        let welcome = CentralMsg::Welcome(Welcome {
            protocol_version: self.version,
            central_version: crate::VERSION.to_string(),
            acked_seq,
            master_rev: central_rev,
            incarnation: start.incarnation,
            master_from_rev: start.master_from_rev,
        });
        if let Err(e) = self.write(&mut send, &welcome).await {
            tracing::info!(error = %e, "cannot send Welcome");
            return;
        }
        tracing::info!(
            agent_version = %hello.agent_version,
            protocol_version = self.version,
            agent_rev = hello.master_rev,
            agent_last_seq = hello.last_seq,
            agent_acked_seq = hello.acked_seq,
            retained_from_seq = hello.retained_from_seq,
            acked_seq,
            central_rev,
            master_from_rev = start.master_from_rev,
            incarnation_changed = start.incarnation_changed,
            clock_offset_ms = offset_ms,
            session = start.session,
            "session started"
        );
        let end = self
            .serve(
                send,
                recv,
                ticket.end,
                rev_rx,
                start.master_from_rev,
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
        mut end_signal: tokio::sync::oneshot::Receiver<EndSignal>,
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
                signal = &mut end_signal => {
                    let r = match signal {
                        Ok(EndSignal::Revoked) => refuse(RefuseCode::Revoked, "this site was revoked by an operator at central"),
                        Ok(EndSignal::Drill) => refuse(RefuseCode::Unavailable, "cut off by a disaster-recovery drill at central"),
                        // A dropped sender means the registry replaced this session too.
                        Ok(EndSignal::Superseded) | Err(_) => refuse(RefuseCode::Superseded, "a newer connection from this site replaced this one"),
                    };
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
                        Some(Ok(AgentMsg::Heartbeat(hb))) => {
                            // Every other field is fixed-size: bounding the version bounds
                            // what the registry keeps per beat (HEARTBEAT_HISTORY per site).
                            if hb.agent_version.len() > outpost_protocol::MAX_ID_LEN {
                                let r = refuse(
                                    RefuseCode::ProtocolViolation,
                                    format!(
                                        "heartbeat agent_version longer than {} bytes",
                                        outpost_protocol::MAX_ID_LEN
                                    ),
                                );
                                self.send_refuse(&mut send, r.clone()).await;
                                return End::Refused(r);
                            }
                            // Fleet health signals: kept in the registry, where the health
                            // monitor derives the site's state from them.
                            let received_ms = unix_ms(SystemTime::now());
                            let offset =
                                clock_offset_ms(hb.agent_time_ms, received_ms, self.conn.rtt());
                            self.ctx.registry.record_heartbeat(
                                &self.site,
                                hb,
                                received_ms,
                                offset,
                                central_rev,
                            );
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
                        Some(Ok(AgentMsg::RenewCertificate { csr_der })) => {
                            if self.version < 4 {
                                let r = refuse(
                                    RefuseCode::ProtocolViolation,
                                    "RenewCertificate is not part of protocol 3",
                                );
                                self.send_refuse(&mut send, r.clone()).await;
                                return End::Refused(r);
                            }
                            let reply = self.renew(csr_der).await;
                            if let Err(e) = self.write(&mut send, &reply).await {
                                return End::Gone(format!("cannot send the certificate: {e}"));
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

    /// Signs a renewed certificate for this session's site (on the blocking pool: it reads the
    /// CA key and signs); a refusal is an answer too, and the session goes on either way.
    async fn renew(&self, csr_der: Vec<u8>) -> CentralMsg {
        let signer = self.ctx.signer.clone();
        let site = self.site.clone();
        let signed = tokio::task::spawn_blocking(move || {
            signer.sign(&site, &csr_der).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("signing task failed: {e}")));
        match signed {
            Ok(chain_pem) => {
                crate::renewal::RENEWED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!("signed a renewed certificate for the site's new key");
                CentralMsg::Certificate { chain_pem }
            }
            Err(reason) => {
                crate::renewal::REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%reason, "certificate renewal refused");
                CentralMsg::CertificateRefused {
                    reason: bounded(reason),
                }
            }
        }
    }

    /// Durably applies what is new in the batch; returns the site's high-water mark to ack. A
    /// batch of duplicates only is written too: the session's reconciliation report counts them.
    async fn ingest(&self, batch: Vec<EventEnvelope>) -> Result<u64, Refuse> {
        let n = batch.len();
        // A drill tracks its sites' events (a copy only while the site is in one).
        let drills = self.ctx.registry.drills();
        let tracked = drills.site_drill(&self.site).map(|_| batch.clone());
        match self.ctx.store.ingest(&self.site, batch).await {
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

    /// A `Refuse` when the site is on the deny list. A store that cannot be read admits the site:
    /// the certificate check has passed, and refusing every site whenever a read fails would
    /// turn a storage hiccup into a fleet-wide outage.
    fn refusal_if_revoked(&self) -> Option<Refuse> {
        match self.ctx.store.revoked_site(&self.site) {
            Ok(Some(r)) => {
                tracing::info!(reason = %r.reason, "revoked site refused");
                Some(refuse(
                    RefuseCode::Revoked,
                    format!(
                        "this site was revoked by an operator at central at {}: {}",
                        crate::timefmt::rfc3339_ms(r.at_ms),
                        r.reason
                    ),
                ))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the revocation list; admitting the site");
                None
            }
        }
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

    #[test]
    fn refuse_codes_keep_their_wire_encoding() {
        // Guards against inserting a code in the middle: older agents decode by index.
        for (code, index) in [
            (RefuseCode::IncompatibleVersion, 0u8),
            (RefuseCode::WrongSite, 1),
            (RefuseCode::ProtocolViolation, 2),
            (RefuseCode::Superseded, 3),
            (RefuseCode::Unavailable, 4),
            (RefuseCode::Revoked, 5),
        ] {
            assert_eq!(
                postcard::to_allocvec(&code).unwrap(),
                vec![index],
                "{code:?}"
            );
        }
    }

    #[test]
    fn clock_offset_adds_half_the_round_trip() {
        let rtt = Duration::from_millis(40);
        assert_eq!(clock_offset_ms(1_000_000, 1_000_000, rtt), 20);
        // Agent two hours behind.
        assert_eq!(
            clock_offset_ms(1_000_000 - 7_200_000, 1_000_000, Duration::ZERO),
            -7_200_000
        );
        assert_eq!(clock_offset_ms(i64::MIN, i64::MAX, rtt), i64::MIN + 20);
    }

    #[test]
    fn handshakes_are_counted_per_address_and_freed_on_drop() {
        let t = Arc::new(Handshakes::default());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let s1 = t.try_start(a, 2).unwrap();
        let _s2 = t.try_start(a, 2).unwrap();
        assert!(
            t.try_start(a, 2).is_none(),
            "third from the same address refused"
        );
        let _other = t.try_start(b, 2).expect("another address is not affected");
        drop(s1);
        let _s3 = t.try_start(a, 2).expect("a freed slot is reusable");
        assert!(t.try_start(a, 2).is_none());
    }

    #[test]
    fn memory_gauge_flags_over_limit() {
        let g = MemoryGauge::default();
        assert!(!g.over_limit());
        g.record(300 << 20, 256 << 20);
        assert!(g.over_limit());
        assert_eq!(g.rss_bytes(), 300 << 20);
        g.record(100 << 20, 256 << 20);
        assert!(!g.over_limit());
    }
}
