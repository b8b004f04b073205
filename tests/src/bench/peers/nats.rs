//! The NATS JetStream peer: Debian's `nats-server` started as a child process with JetStream on a
//! temp store dir (file storage), driven with the official `async-nats` client. Publishes events
//! with acks (256 in flight, then 1 in flight) and drains them with a pull consumer. JetStream's
//! publish ack is not fsynced (`sync_interval` defaults to 2 min, and Debian's 2.9.10 rejects the
//! setting), so this peer is faster than a durable equal would be; it is reported anyway, as the
//! broker teams would otherwise deploy. Async shell around a child process.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

use crate::bench::hist::Hist;

/// The binary's name, looked up on `PATH` (and in `/usr/sbin`, where Debian installs it).
pub const NATS_SERVER_BIN: &str = "nats-server";
/// What to do when the binary is missing.
pub const INSTALL_HINT: &str = "nats-server not installed: apt-get install nats-server";
/// Longest the server may take to accept connections after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the server may take to exit after it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The stream, its subject and the drain consumer.
const STREAM: &str = "OUTPOST_PEER";
const SUBJECT: &str = "outpost.peer.milestones";
const CONSUMER: &str = "drain";
/// Bounds of the stream, well above what one run publishes: 2 × 200 k + 40 k events of ~200 B
/// is under 100 MiB; a run that somehow publishes more discards the oldest rather than filling
/// the disk.
const STREAM_MAX_BYTES: i64 = 256 * 1024 * 1024;
const STREAM_MAX_MESSAGES: i64 = 2_000_000;
/// Messages the pull consumer asks for at once.
const DRAIN_BATCH: usize = 1_000;
/// Longest one wait for the next drained message may take before the drain is declared stuck.
const DRAIN_STALL: Duration = Duration::from_secs(5);
/// Bytes of each published event (a milestone envelope padded to this size).
pub const PAYLOAD_BYTES: usize = 200;

/// Finds `bin`: a path with a separator is taken as it is; a bare name is looked up on `PATH`,
/// then in `/usr/sbin` (Debian's place for it, not on every user's `PATH`).
pub fn find_binary(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// A `nats-server -js` child on 127.0.0.1 with its store in a temp dir. Killed, waited for and
/// its store removed on drop.
pub struct NatsServer {
    child: Child,
    pub addr: SocketAddr,
    /// Holds the store (`-sd`) and the server's log; removed on drop, after the kill.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `bin` with JetStream on a fresh store under `parent` and waits (bounded by
    /// [`READY_TIMEOUT`]) until it accepts TCP connections.
    pub fn start(bin: &Path, parent: &Path) -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("outpost-peer-nats-")
            .tempdir_in(parent)
            .context("temp dir for the JetStream store")?;
        let store = dir.path().join("store");
        let log = std::fs::File::create(dir.path().join("nats-server.log"))?;
        // An ephemeral port, released for the server to bind (a race with another process
        // taking it in between is possible and shows as a start failure).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(bin)
            .arg("-js")
            .arg("-sd")
            .arg(&store)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut server = NatsServer { child, addr, dir };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "nats-server exited before accepting connections ({status}); log: {}",
                    server.log_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, POLL_INTERVAL).is_ok() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server did not accept connections on {addr} within {READY_TIMEOUT:?}; log: {}",
                    server.log_tail()
                );
            }
            // Poll interval of the bounded wait around it, not a wait for a condition by itself.
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The last lines of the server's log, for error messages.
    fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Kills the server and waits for it (bounded by [`EXIT_TIMEOUT`]).
    fn stop(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                // Poll interval of the bounded wait for the exit.
                Ok(None) => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sizes of one run.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Events published with 256 acks outstanding, and the time limit for it.
    pub pipelined: u64,
    /// Events published one at a time (next publish after the previous ack).
    pub sequential: u64,
    /// Time limit of each phase (publish 256, publish 1, drain).
    pub limit: Duration,
}

/// What one publish phase measured.
#[derive(Debug)]
pub struct PublishResult {
    pub acked: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl PublishResult {
    pub fn per_s(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the drain measured.
#[derive(Debug)]
pub struct DrainResult {
    pub drained: u64,
    pub elapsed: Duration,
}

impl DrainResult {
    pub fn per_s(&self) -> f64 {
        self.drained as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct NatsResult {
    pub pipelined: PublishResult,
    pub sequential: PublishResult,
    pub drain: DrainResult,
}

/// Event number `n` as a milestone envelope of exactly [`PAYLOAD_BYTES`] bytes.
pub fn payload(n: u64) -> Vec<u8> {
    let mut p = format!(
        r#"{{"event_id":"peer-evt-{n:012}","shipment_id":"SH-{}","milestone":"loaded","scanner_id":"scanner-{}","at":"2026-11-26T10:00:00Z","pad":""#,
        n % 10_000,
        n % 64
    )
    .into_bytes();
    let closing = br#""}"#;
    p.resize(
        PAYLOAD_BYTES.saturating_sub(closing.len()).max(p.len()),
        b'x',
    );
    p.extend_from_slice(closing);
    p
}

/// Publishes up to `count` events (stopping at `limit`) with at most `window` acks
/// outstanding, numbering them from `first`; each event's latency runs from its publish to its
/// ack.
async fn publish(
    js: &jetstream::Context,
    first: u64,
    count: u64,
    window: usize,
    limit: Duration,
) -> Result<PublishResult> {
    let started = Instant::now();
    let deadline = started + limit;
    let mut hist = Hist::new();
    let mut pending: VecDeque<(Instant, jetstream::context::PublishAckFuture)> =
        VecDeque::with_capacity(window);
    let mut acked = 0u64;
    let mut n = 0u64;
    while n < count || !pending.is_empty() {
        let full = pending.len() >= window.max(1);
        let done_sending = n >= count || Instant::now() >= deadline;
        if full || done_sending {
            // Acks of one stream come back in publish order, so the oldest is the next one.
            let Some((t0, ack)) = pending.pop_front() else {
                break;
            };
            ack.await.context("JetStream publish ack")?;
            hist.record(t0.elapsed());
            acked += 1;
            continue;
        }
        let t0 = Instant::now();
        let ack = js
            .publish(SUBJECT, payload(first + n).into())
            .await
            .context("JetStream publish")?;
        pending.push_back((t0, ack));
        n += 1;
    }
    Ok(PublishResult {
        acked,
        elapsed: started.elapsed(),
        p50: hist.quantile(0.5),
        p99: hist.quantile(0.99),
    })
}

/// Reads `expected` messages from the start of the stream with a durable pull consumer,
/// acknowledging each batch with its last message (`AckPolicy::All`), stopping at `limit`.
async fn drain(stream: &stream::Stream, expected: u64, limit: Duration) -> Result<DrainResult> {
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER.to_string()),
            ack_policy: consumer::AckPolicy::All,
            ..Default::default()
        })
        .await
        .context("create the pull consumer")?;
    let started = Instant::now();
    let deadline = started + limit;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(DRAIN_BATCH)
        .messages()
        .await
        .context("pull consumer stream")?;
    let mut drained = 0u64;
    while drained < expected && Instant::now() < deadline {
        let next = tokio::time::timeout(DRAIN_STALL, messages.next()).await;
        let msg = match next {
            Ok(Some(m)) => m.map_err(|e| anyhow!("pull consumer: {e}"))?,
            Ok(None) => break,
            Err(_) => bail!("no message for {DRAIN_STALL:?} after {drained} of {expected}"),
        };
        drained += 1;
        if drained.is_multiple_of(DRAIN_BATCH as u64) || drained == expected {
            msg.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        }
    }
    Ok(DrainResult {
        drained,
        elapsed: started.elapsed(),
    })
}

/// Starts a server from `bin` under `parent`, runs the three phases and stops the server.
pub async fn run(bin: &Path, parent: &Path, sizes: Sizes) -> Result<NatsResult> {
    let bin = bin.to_path_buf();
    let parent = parent.to_path_buf();
    // The readiness wait blocks (bounded); keep it off the async workers.
    let server = tokio::task::spawn_blocking(move || NatsServer::start(&bin, &parent))
        .await
        .map_err(|e| anyhow!("start task: {e}"))??;
    let result = measure(server.addr, sizes).await;
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .map_err(|e| anyhow!("stop task: {e}"))?;
    result
}

async fn measure(addr: SocketAddr, sizes: Sizes) -> Result<NatsResult> {
    let client = tokio::time::timeout(READY_TIMEOUT, async_nats::connect(format!("nats://{addr}")))
        .await
        .map_err(|_| anyhow!("connecting to nats-server on {addr} timed out"))?
        .context("connect to nats-server")?;
    let js = jetstream::new(client);
    let stream = tokio::time::timeout(
        READY_TIMEOUT,
        js.create_stream(stream::Config {
            name: STREAM.to_string(),
            subjects: vec![SUBJECT.to_string()],
            storage: stream::StorageType::File,
            max_bytes: STREAM_MAX_BYTES,
            max_messages: STREAM_MAX_MESSAGES,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }),
    )
    .await
    .map_err(|_| anyhow!("creating the JetStream stream timed out"))?
    .map_err(|e| anyhow!("create the JetStream stream: {e}"))?;
    let pipelined = publish(&js, 0, sizes.pipelined, 256, sizes.limit).await?;
    let sequential = publish(&js, pipelined.acked, sizes.sequential, 1, sizes.limit).await?;
    let total = pipelined.acked + sequential.acked;
    let drain = drain(&stream, total, sizes.limit).await?;
    Ok(NatsResult {
        pipelined,
        sequential,
        drain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_stated_size_and_are_json() {
        for n in [0, 7, 123_456_789] {
            let p = payload(n);
            assert_eq!(p.len(), PAYLOAD_BYTES);
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["event_id"], format!("peer-evt-{n:012}"));
        }
    }

    #[test]
    fn a_missing_binary_is_not_found() {
        assert_eq!(find_binary(Path::new("/nonexistent/bin/nats-server")), None);
        assert_eq!(find_binary(Path::new("no-such-binary-outpost-peer")), None);
    }

    /// Goal: with `nats-server` installed, every published event is acked and drained, and the
    /// server's store is gone afterwards. Method: a tiny run under a temp parent dir. Skipped
    /// through `crate::skip` where the binary is absent (a failure under `CI=true`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_and_drains_when_installed() {
        let Some(bin) = find_binary(Path::new(NATS_SERVER_BIN)) else {
            crate::skip("the NATS JetStream peer's own test", INSTALL_HINT);
            return;
        };
        let parent = tempfile::tempdir().unwrap();
        let sizes = Sizes {
            pipelined: 500,
            sequential: 50,
            limit: Duration::from_secs(10),
        };
        let r = run(&bin, parent.path(), sizes).await.unwrap();
        assert_eq!((r.pipelined.acked, r.sequential.acked), (500, 50));
        assert_eq!(r.drain.drained, 550);
        assert!(r.pipelined.p50 <= r.pipelined.p99);
        let left: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
        assert!(left.is_empty(), "store dir left behind: {left:?}");
    }
}
