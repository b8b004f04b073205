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
use quinn::{Connection, Endpoint, VarInt};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::certs::{CertError, load_certs, load_key};
use crate::config::QuicConfig;
use crate::memory::{MemoryGauge, run_memory_sampler};
use crate::registry::Registry;
use crate::store::Store;

mod session;

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

/// Why a connection's client certificate names no site.
#[derive(Debug, thiserror::Error)]
pub enum CertSiteError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("unexpected peer identity type")]
    UnexpectedIdentity,
    #[error("empty client certificate chain")]
    EmptyChain,
    #[error(transparent)]
    NoSite(#[from] outpost_protocol::identity::SiteIdError),
}

/// The site id in the verified client certificate, or why there is none.
pub fn cert_site(conn: &Connection) -> Result<String, CertSiteError> {
    let identity = conn.peer_identity().ok_or(CertSiteError::NoCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| CertSiteError::UnexpectedIdentity)?;
    let leaf = certs.first().ok_or(CertSiteError::EmptyChain)?;
    Ok(site_id_from_cert_der(leaf)?)
}

/// End of the validity of the client certificate (ms since the epoch), if it can be read.
pub(crate) fn peer_cert_not_after_ms(conn: &Connection) -> Option<i64> {
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
    let session = session::Session {
        conn: conn.clone(),
        site,
        version,
        ctx,
        shutdown,
    };
    session.run().await;
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
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

pub(crate) fn truncate(reason: &str) -> &[u8] {
    let b = reason.as_bytes();
    &b[..b.len().min(outpost_protocol::MAX_TEXT_LEN)]
}

/// Aborts a task when dropped, however its owner ends.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
