//! A fault-injecting UDP proxy for chaos tests (I/O side: real loopback sockets). It sits between
//! agents and central's QUIC port and, under the test's control, drops everything (a partition), a
//! seeded random share of datagrams (both ways or one way only), or sends a seeded share twice
//! (duplication), or flaps (up, then down, every N ms). The kernel here has no `tc netem`, so faults come from user
//! space (see the reliability reference).
//!
//! One upstream socket per client address, so central sees each agent (and each of its endpoints
//! after a restart) as a distinct peer, exactly as without the proxy. Without a delay nothing is
//! queued; with one, held-back datagrams are capped (`MAX_DELAYED`, `set_queue_cap`) and the
//! excess is dropped and counted.

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
/// Default cap on datagrams held back by a delay at once (see `UdpProxy::set_queue_cap`).
pub const MAX_DELAYED: u64 = 1024;
/// Pause after a socket error before reading again, so a persistent error cannot spin a core.
const ERROR_PAUSE: Duration = Duration::from_millis(5);

/// What the test controls, shared with the forwarding tasks.
struct Control {
    partitioned: AtomicBool,
    /// Share of datagrams dropped in each direction, in percent (0..=100).
    loss_pct: AtomicU32,
    /// Extra one-way loss in percent, per direction: index 0 client to central, 1 back.
    oneway_pct: [AtomicU32; 2],
    /// Share of forwarded datagrams sent twice, in percent.
    dup_pct: AtomicU32,
    /// Flapping half-period in ms (0 = off): the link is up for this long, then down as long.
    flap_ms: AtomicU64,
    /// Reference point for the flapping phase.
    epoch: Instant,
    /// Fixed delay and uniform jitter (0..=jitter) added to each datagram, in ms; jitter reorders.
    delay_ms: AtomicU64,
    jitter_ms: AtomicU64,
    /// Datagrams waiting out their delay, and the most allowed; past it a datagram is dropped.
    queued: AtomicU64,
    queue_cap: AtomicU64,
    overflowed: AtomicU64,
    rng: Mutex<StdRng>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
}

/// Which way a datagram goes through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client (agent) to upstream (central).
    Up = 0,
    /// Upstream (central) back to the client.
    Down = 1,
}

impl Control {
    /// Seeded roll: true with probability `pct` percent.
    fn roll(&self, pct: u32) -> bool {
        pct > 0
            && self
                .rng
                .lock()
                .expect("proxy rng lock is never held across a panic")
                .random_range(0..100u32)
                < pct
    }

    /// How many copies of the next datagram going `dir` to send: 0 (dropped), 1, or 2
    /// (duplicated).
    fn copies(&self, dir: Direction) -> usize {
        let flap = self.flap_ms.load(Ordering::SeqCst);
        let flapped_down = flap > 0 && (self.epoch.elapsed().as_millis() as u64 / flap) % 2 == 1;
        if self.partitioned.load(Ordering::SeqCst)
            || flapped_down
            || self.roll(self.loss_pct.load(Ordering::SeqCst))
            || self.roll(self.oneway_pct[dir as usize].load(Ordering::SeqCst))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        if self.roll(self.dup_pct.load(Ordering::SeqCst)) {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
            return 2;
        }
        1
    }

    /// This datagram's delay, or `None` when no delay is configured.
    fn delay(&self) -> Option<Duration> {
        let (d, j) = (
            self.delay_ms.load(Ordering::SeqCst),
            self.jitter_ms.load(Ordering::SeqCst),
        );
        if d == 0 && j == 0 {
            return None;
        }
        let extra = if j == 0 {
            0
        } else {
            self.rng
                .lock()
                .expect("proxy rng lock is never held across a panic")
                .random_range(0..=j)
        };
        Some(Duration::from_millis(d + extra))
    }
}

/// Sends `data` to `to` through `sock` as the faults say: dropped, once or twice, now or after a
/// delay (in a bounded queue: past its cap the datagram is dropped and counted).
async fn forward(
    ctl: &Arc<Control>,
    sock: &Arc<UdpSocket>,
    data: &[u8],
    to: SocketAddr,
    dir: Direction,
) {
    for _ in 0..ctl.copies(dir) {
        let Some(delay) = ctl.delay() else {
            // UDP semantics: a failed send is a lost datagram, which QUIC recovers from.
            let _ = sock.send_to(data, to).await;
            continue;
        };
        if ctl.queued.fetch_add(1, Ordering::SeqCst) >= ctl.queue_cap.load(Ordering::SeqCst) {
            ctl.queued.fetch_sub(1, Ordering::SeqCst);
            ctl.overflowed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (ctl, sock, data) = (ctl.clone(), sock.clone(), data.to_vec());
        // Each waiting datagram is one short task; their number is capped above.
        tokio::spawn(async move {
            // The injected delay itself (the fault), not a wait for a condition.
            tokio::time::sleep(delay).await;
            let _ = sock.send_to(&data, to).await;
            ctl.queued.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Counters of what the proxy did, for assertions that the fault really happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyStats {
    pub forwarded: u64,
    pub dropped: u64,
    /// Datagrams sent a second time (counted once in `forwarded`).
    pub duplicated: u64,
    /// Delayed datagrams dropped because the delay queue was full (counted in `forwarded` too).
    pub overflowed: u64,
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
            oneway_pct: [AtomicU32::new(0), AtomicU32::new(0)],
            dup_pct: AtomicU32::new(0),
            flap_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            delay_ms: AtomicU64::new(0),
            jitter_ms: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queue_cap: AtomicU64::new(MAX_DELAYED),
            overflowed: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
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

    /// Drops `pct` percent of datagrams going `dir` only (seeded, on top of `set_loss`), clamped
    /// to 0..=100; 100 is a one-way partition.
    pub fn set_oneway_loss(&self, dir: Direction, pct: u32) {
        self.ctl.oneway_pct[dir as usize].store(pct.min(100), Ordering::SeqCst);
    }

    /// Sends `pct` percent of forwarded datagrams twice, both ways (seeded), clamped to 0..=100.
    pub fn set_duplication(&self, pct: u32) {
        self.ctl.dup_pct.store(pct.min(100), Ordering::SeqCst);
    }

    /// Flapping link: up for `half_period_ms`, down (everything dropped both ways) as long, and
    /// so on; 0 stops flapping.
    pub fn set_flapping(&self, half_period_ms: u64) {
        self.ctl.flap_ms.store(half_period_ms, Ordering::SeqCst);
    }

    /// Delays every datagram by `delay_ms` plus a seeded uniform 0..=`jitter_ms` (so datagrams
    /// overtake each other); both 0 forwards at once again.
    pub fn set_delay(&self, delay_ms: u64, jitter_ms: u64) {
        self.ctl.delay_ms.store(delay_ms, Ordering::SeqCst);
        self.ctl.jitter_ms.store(jitter_ms, Ordering::SeqCst);
    }

    /// Most datagrams held back by a delay at once (default `MAX_DELAYED`).
    pub fn set_queue_cap(&self, cap: u64) {
        self.ctl.queue_cap.store(cap, Ordering::SeqCst);
    }

    /// Clears every fault: no partition, no loss, no duplication, no flapping, no delay.
    pub fn heal(&self) {
        self.set_delay(0, 0);
        self.set_flapping(0);
        self.partition(false);
        self.set_loss(0);
        self.set_oneway_loss(Direction::Up, 0);
        self.set_oneway_loss(Direction::Down, 0);
        self.set_duplication(0);
    }

    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            forwarded: self.ctl.forwarded.load(Ordering::Relaxed),
            dropped: self.ctl.dropped.load(Ordering::Relaxed),
            duplicated: self.ctl.duplicated.load(Ordering::Relaxed),
            overflowed: self.ctl.overflowed.load(Ordering::Relaxed),
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
                // A pause after a socket error, so a persistent one does not spin the loop.
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
        forward(&ctl, &up, &buf[..n], upstream, Direction::Up).await;
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
                // A pause after a socket error, so a persistent one does not spin the loop.
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        // Unconnected socket: ignore anything that is not from central.
        if from != upstream {
            continue;
        }
        forward(&ctl, &listener, &buf[..n], client, Direction::Down).await;
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

    /// Goal: one-way loss drops only the chosen direction, and duplication sends datagrams twice.
    /// Method: a counting UDP sink behind the proxy (upstream direction) and an echo (downstream).
    #[tokio::test]
    async fn one_way_loss_and_duplication() -> Result<()> {
        let echo = UdpSocket::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let echo_task = tokio::spawn(async move {
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut b).await {
                let _ = tx.send(b[..n].to_vec());
                let _ = echo.send_to(&b[..n], from).await;
            }
        });
        let proxy = UdpProxy::start(echo_addr, 11).await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        let wait = Duration::from_millis(300);
        let mut b = [0u8; 64];

        // Downstream cut: the server still receives, the client gets nothing back.
        proxy.set_oneway_loss(Direction::Down, 100);
        client.send_to(b"one", proxy.addr()).await?;
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .context("upstream still passes")?;
        assert_eq!(got.as_deref(), Some(&b"one"[..]));
        assert!(
            tokio::time::timeout(wait, client.recv_from(&mut b))
                .await
                .is_err(),
            "nothing comes back through a downstream cut"
        );

        // Upstream cut: the server receives nothing.
        proxy.heal();
        proxy.set_oneway_loss(Direction::Up, 100);
        client.send_to(b"two", proxy.addr()).await?;
        assert!(
            tokio::time::timeout(wait, rx.recv()).await.is_err(),
            "nothing reaches the server through an upstream cut"
        );

        // Full duplication: each datagram arrives twice at the server and four times back.
        proxy.heal();
        proxy.set_duplication(100);
        client.send_to(b"dup", proxy.addr()).await?;
        let mut at_server = 0;
        while let Ok(Some(_)) = tokio::time::timeout(wait, rx.recv()).await {
            at_server += 1;
        }
        let mut back = 0;
        while tokio::time::timeout(wait, client.recv_from(&mut b))
            .await
            .is_ok()
        {
            back += 1;
        }
        assert_eq!((at_server, back), (2, 4));
        assert!(proxy.stats().duplicated >= 3, "{:?}", proxy.stats());
        drop(proxy);
        echo_task.abort();
        Ok(())
    }

    /// Goal: a flapping link passes some datagrams and drops others, and heals.
    /// Method: send one datagram every 10 ms for 1 s through a link flapping every 100 ms.
    #[tokio::test]
    async fn flapping_link() -> Result<()> {
        let sink = UdpSocket::bind("127.0.0.1:0").await?;
        let proxy = UdpProxy::start(sink.local_addr()?, 3).await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        proxy.set_flapping(100);
        for i in 0..100u32 {
            client.send_to(&i.to_be_bytes(), proxy.addr()).await?;
            // The sending pace (the stimulus): one datagram per 10 ms against the flapping.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = proxy.stats();
        assert!(
            (20..=80).contains(&s.forwarded) && (20..=80).contains(&s.dropped),
            "{s:?}"
        );
        proxy.heal();
        let before = proxy.stats().forwarded;
        for i in 0..20u32 {
            client.send_to(&i.to_be_bytes(), proxy.addr()).await?;
            // The sending pace (the stimulus): one datagram per 10 ms against the flapping.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The forwarding task counts as it goes: poll (bounded) until all 20 are counted.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.stats().forwarded - before < 20 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(proxy.stats().forwarded - before, 20);
        Ok(())
    }

    /// Goal: delay holds datagrams back, jitter reorders them, and the delay queue is bounded.
    /// Method: a sink behind the proxy records arrival order and time.
    #[tokio::test]
    async fn delay_jitter_and_bounded_queue() -> Result<()> {
        let sink = UdpSocket::bind("127.0.0.1:0").await?;
        let sink_addr = sink.local_addr()?;
        let proxy = UdpProxy::start(sink_addr, 5).await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        let mut b = [0u8; 64];
        let wait = Duration::from_millis(500);

        proxy.set_delay(200, 0);
        let t0 = Instant::now();
        client.send_to(b"late", proxy.addr()).await?;
        tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut b))
            .await
            .context("delayed datagram arrives")??;
        assert!(
            t0.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t0.elapsed()
        );

        proxy.set_delay(0, 100);
        for i in 0..50u32 {
            client.send_to(&i.to_be_bytes(), proxy.addr()).await?;
        }
        let mut order = Vec::new();
        while let Ok(Ok((n, _))) = tokio::time::timeout(wait, sink.recv_from(&mut b)).await {
            order.push(u32::from_be_bytes(b[..n].try_into()?));
        }
        assert_eq!(order.len(), 50);
        assert!(order.windows(2).any(|w| w[0] > w[1]), "jitter reorders");

        // A long delay so all 30 arrive while the first 10 still wait.
        proxy.set_delay(2_000, 0);
        proxy.set_queue_cap(10);
        for i in 0..30u32 {
            client.send_to(&i.to_be_bytes(), proxy.addr()).await?;
        }
        let mut got = 0;
        while tokio::time::timeout(Duration::from_secs(3), sink.recv_from(&mut b))
            .await
            .is_ok()
        {
            got += 1;
        }
        assert_eq!((got, proxy.stats().overflowed), (10, 20));
        Ok(())
    }
}
