//! A hand-rolled sync client for tests (I/O side: real QUIC with mutual TLS on loopback), so a test
//! controls every frame an "agent" sends: hellos naming another site, forged or corrupt events.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_protocol::io::{read_frame, write_frame};
use outpost_protocol::*;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A bounded wait for any single network step of the hand-rolled client.
pub const STEP: Duration = Duration::from_secs(10);

/// Client TLS config trusting `ca_pem` and presenting `cert_pem`/`key_pem`, with Outpost's ALPN.
pub fn client_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<quinn::ClientConfig> {
    client_config_alpn(ca_pem, cert_pem, key_pem, vec![ALPN.to_vec()])
}

/// `client_config` offering the ALPN identifiers `alpn` (e.g. only the previous version's).
pub fn client_config_alpn(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: Vec<Vec<u8>>,
) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c?)?;
    }
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut &key_pem[..])?.context("no private key in PEM")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = alpn;
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    Ok(quinn::ClientConfig::new(Arc::new(q)))
}

/// Client TLS config trusting `ca_pem` that presents no client certificate at all.
pub fn client_config_without_certificate(ca_pem: &[u8]) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    Ok(quinn::ClientConfig::new(Arc::new(q)))
}

/// Reads `certs/<name>` of a fleet directory.
pub fn read_cert(dir: &Path, name: &str) -> Result<Vec<u8>> {
    std::fs::read(dir.join("certs").join(name)).with_context(|| format!("certs/{name}"))
}

/// Client config for `site` with the fleet's own CA and that site's certificate.
pub fn site_client_config(fleet_dir: &Path, site: &str) -> Result<quinn::ClientConfig> {
    client_config(
        &read_cert(fleet_dir, "ca.pem")?,
        &read_cert(fleet_dir, &format!("{site}.pem"))?,
        &read_cert(fleet_dir, &format!("{site}.key"))?,
    )
}

/// One connection with its sync stream.
pub struct Session {
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// Connects and opens the sync stream. Errors if the handshake is refused.
pub async fn open(addr: SocketAddr, cfg: quinn::ClientConfig) -> Result<Session> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = tokio::time::timeout(
        STEP,
        endpoint.connect_with(cfg, addr, "central.outpost.local")?,
    )
    .await??;
    let (send, recv) = tokio::time::timeout(STEP, conn.open_bi()).await??;
    Ok(Session {
        _endpoint: endpoint,
        conn,
        send,
        recv,
    })
}

impl Session {
    pub async fn send(&mut self, msg: &AgentMsg) -> Result<()> {
        self.send_as(msg).await
    }

    pub async fn recv(&mut self) -> Result<CentralMsg> {
        self.recv_as().await
    }

    /// Sends a message of any message type, e.g. a frozen previous version's.
    pub async fn send_as<T: serde::Serialize>(&mut self, msg: &T) -> Result<()> {
        tokio::time::timeout(STEP, write_frame(&mut self.send, msg)).await??;
        Ok(())
    }

    /// Receives a frame decoded as `T`, e.g. a frozen previous version's message type.
    pub async fn recv_as<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        match tokio::time::timeout(STEP, read_frame::<T, _>(&mut self.recv)).await?? {
            Some(m) => Ok(m),
            None => bail!("stream closed by central"),
        }
    }

    /// Receives until a frame other than `Master` arrives (master pushes are interleaved freely).
    pub async fn recv_skipping_master(&mut self) -> Result<CentralMsg> {
        // Bounded: central sends at most a few master frames per revision it has.
        for _ in 0..10_000 {
            match self.recv().await? {
                CentralMsg::Master(_) => continue,
                other => return Ok(other),
            }
        }
        bail!("only master frames from central")
    }
}

/// A hello for `site` at `version` claiming `last_seq` events in the outbox.
pub fn hello(site: &str, version: u16, last_seq: u64) -> AgentMsg {
    AgentMsg::Hello(Hello {
        protocol_version: version,
        agent_version: "test".into(),
        site: site.into(),
        master_rev: 0,
        last_seq,
        agent_time_ms: 0,
        acked_seq: 0,
        retained_from_seq: 0,
        central_incarnation: 0,
    })
}

/// A well-formed milestone event.
pub fn milestone_event(site: &str, seq: u64, id: &str) -> EventEnvelope {
    EventEnvelope::new(
        site,
        seq,
        id,
        1_764_000_000_000,
        &EventBody::Milestone(Milestone {
            shipment_id: "SH-1".into(),
            milestone: MilestoneKind::Picked,
            scanner_id: "scanner-1".into(),
            at: "2026-11-26T10:00:00Z".into(),
        }),
    )
}
