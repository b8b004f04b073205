//! A fault-injecting UDP proxy for chaos tests (I/O side: real loopback sockets). It sits between
//! agents and central's QUIC port and, under the test's control, drops everything (a partition) or
//! a seeded random share of datagrams. The kernel here has no `tc netem`, so faults come from user
//! space (see the reliability reference).
//!
//! One upstream socket per client address, so central sees each agent (and each of its endpoints
//! after a restart) as a distinct peer, exactly as without the proxy. Nothing is queued: a datagram
//! is forwarded or dropped as it arrives, so the only buffers are one receive buffer per socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinSet};

/// Largest UDP payload on loopback; QUIC datagrams are far smaller.
const MAX_DATAGRAM: usize = 65_535;
/// Most client addresses served at once. An agent opens a new endpoint (new port) on every restart
/// and possibly every reconnect; beyond this the least recently active client is forgotten.
pub const MAX_CLIENTS: usize = 64;
/// Pause after a socket error before reading again, so a persistent error cannot spin a core.
const ERROR_PAUSE: Duration = Duration::from_millis(5);

/// What the test controls, shared with the forwarding tasks.
struct Control {
    partitioned: AtomicBool,
    /// Share of datagrams dropped in each direction, in percent (0..=100).
    loss_pct: AtomicU32,
    rng: Mutex<StdRng>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

impl Control {
    /// Whether the next datagram passes.
    fn pass(&self) -> bool {
        if self.partitioned.load(Ordering::SeqCst) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let loss = self.loss_pct.load(Ordering::SeqCst);
        if loss > 0 {
            let roll = self
                .rng
                .lock()
                .expect("proxy rng lock is never held across a panic")
                .random_range(0..100u32);
            if roll < loss {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Counters of what the proxy did, for assertions that the fault really happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyStats {
    pub forwarded: u64,
    pub dropped: u64,
}

/// A running proxy; stopped (every task aborted, every socket closed) when dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    ctl: Arc<Control>,
    task: AbortHandle,
}

struct Client {
    upstream: Arc<UdpSocket>,
    last_active: Instant,
    task: AbortHandle,
}

impl UdpProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`; `seed` drives the loss
    /// RNG.
    pub async fn start(upstream: SocketAddr, seed: u64) -> Result<UdpProxy> {
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = listener.local_addr()?;
        let ctl = Arc::new(Control {
            partitioned: AtomicBool::new(false),
            loss_pct: AtomicU32::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(listener, upstream, ctl.clone())).abort_handle();
        Ok(UdpProxy { addr, ctl, task })
    }

    /// The address agents should use as central's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts (`true`) or heals (`false`) a full partition: every datagram dropped both ways.
    pub fn partition(&self, on: bool) {
        self.ctl.partitioned.store(on, Ordering::SeqCst);
    }

    pub fn is_partitioned(&self) -> bool {
        self.ctl.partitioned.load(Ordering::SeqCst)
    }

    /// Drops `pct` percent of datagrams in each direction (seeded), clamped to 0..=100.
    pub fn set_loss(&self, pct: u32) {
        self.ctl.loss_pct.store(pct.min(100), Ordering::SeqCst);
    }

    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            forwarded: self.ctl.forwarded.load(Ordering::Relaxed),
            dropped: self.ctl.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every per-client task.
        self.task.abort();
    }
}

/// Reads from clients, forwards to central through that client's own upstream socket.
async fn run(listener: Arc<UdpSocket>, upstream: SocketAddr, ctl: Arc<Control>) {
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // Reap finished per-client tasks so the set stays bounded too.
        while tasks.try_join_next().is_some() {}
        let (n, from) = match listener.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let up = match clients.get_mut(&from) {
            Some(c) => {
                c.last_active = Instant::now();
                c.upstream.clone()
            }
            None => {
                if clients.len() >= MAX_CLIENTS
                    && let Some(oldest) = clients
                        .iter()
                        .min_by_key(|(_, c)| c.last_active)
                        .map(|(a, _)| *a)
                    && let Some(old) = clients.remove(&oldest)
                {
                    old.task.abort();
                }
                let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let sock = Arc::new(sock);
                let task = tasks.spawn(back(
                    sock.clone(),
                    listener.clone(),
                    from,
                    upstream,
                    ctl.clone(),
                ));
                clients.insert(
                    from,
                    Client {
                        upstream: sock.clone(),
                        last_active: Instant::now(),
                        task,
                    },
                );
                sock
            }
        };
        if ctl.pass() {
            // UDP semantics: a failed send is a lost datagram, which QUIC recovers from.
            let _ = up.send_to(&buf[..n], upstream).await;
        }
    }
}

/// Forwards central's datagrams for one client back to it.
async fn back(
    sock: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    upstream: SocketAddr,
    ctl: Arc<Control>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        // Unconnected socket: ignore anything that is not from central.
        if from != upstream || !ctl.pass() {
            continue;
        }
        let _ = listener.send_to(&buf[..n], client).await;
    }
}

/// Starts one proxy per site in front of `central_quic` (seeds derived from `seed`).
pub async fn proxies_for(
    central_quic: &str,
    sites: &[&str],
    seed: u64,
) -> Result<HashMap<String, UdpProxy>> {
    let upstream: SocketAddr = central_quic
        .parse()
        .with_context(|| format!("central quic address {central_quic:?}"))?;
    let mut out = HashMap::new();
    for (i, s) in sites.iter().enumerate() {
        out.insert(
            s.to_string(),
            UdpProxy::start(upstream, seed.wrapping_add(i as u64)).await?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: the proxy forwards both ways, a partition drops both ways and heals, and seeded loss
    /// drops roughly the configured share.
    /// Method: a UDP echo server behind the proxy; count the replies.
    #[tokio::test]
    async fn forwards_partitions_and_drops() -> Result<()> {
        let echo = UdpSocket::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?;
        let echo_task = tokio::spawn(async move {
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut b).await {
                let _ = echo.send_to(&b[..n], from).await;
            }
        });
        let proxy = UdpProxy::start(echo_addr, 7).await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        let wait = Duration::from_millis(300);
        let mut b = [0u8; 64];

        client.send_to(b"ping", proxy.addr()).await?;
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut b))
            .await
            .context("echo through the proxy")??;
        assert_eq!((&b[..n], from), (&b"ping"[..], proxy.addr()));

        proxy.partition(true);
        client.send_to(b"lost", proxy.addr()).await?;
        assert!(
            tokio::time::timeout(wait, client.recv_from(&mut b))
                .await
                .is_err(),
            "nothing passes a partition"
        );
        assert!(proxy.stats().dropped >= 1);
        proxy.partition(false);
        client.send_to(b"back", proxy.addr()).await?;
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut b))
            .await
            .context("echo after healing")??;
        assert_eq!(&b[..n], b"back");

        proxy.set_loss(50);
        let before = proxy.stats();
        for i in 0..400u32 {
            client.send_to(&i.to_be_bytes(), proxy.addr()).await?;
        }
        let mut got = 0;
        while tokio::time::timeout(wait, client.recv_from(&mut b))
            .await
            .is_ok()
        {
            got += 1;
            if got > 400 {
                break;
            }
        }
        let after = proxy.stats();
        // Each echo crosses the proxy twice at 50 % loss: about a quarter comes back.
        assert!((40..=180).contains(&got), "{got} of 400 echoes came back");
        assert!(after.dropped - before.dropped >= 150, "{after:?}");
        drop(proxy);
        echo_task.abort();
        Ok(())
    }
}
