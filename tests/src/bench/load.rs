//! An HTTP/1.1 keep-alive load generator on plain tokio `TcpStream`s: `conns` connection tasks,
//! each sending its requests one after the other (closed loop) until `duration` has passed, with
//! every request's latency (write of the request to the last byte of the body) in a [`Hist`].
//!
//! Responses must carry `Content-Length` (chunked bodies are not supported and count as errors).
//! A non-2xx status counts as an error (and its latency is still recorded); an I/O or parse error
//! counts as an error and the connection is re-opened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::hist::Hist;

/// What a load run measured.
#[derive(Clone, Debug)]
pub struct LoadResult {
    /// Requests answered (any status).
    pub requests: u64,
    /// Requests answered with a non-2xx status, plus I/O and protocol errors.
    pub errors: u64,
    /// Wall time from the start of the first connection to the end of the last.
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
    pub mean: Duration,
    /// The first error seen, for diagnostics.
    pub first_error: Option<String>,
}

impl LoadResult {
    /// Successful requests per second.
    pub fn ok_per_s(&self) -> f64 {
        (self.requests.saturating_sub(self.errors)) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Requests (any status) per second.
    pub fn req_per_s(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One HTTP response as the load generator sees it.
struct Answer {
    status: u16,
}

/// A connection with a read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` that hold data not yet consumed start at `start` and end at `end`.
    start: usize,
    end: usize,
}

fn find_header_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn parse_head(head: &[u8]) -> Result<(u16, usize), String> {
    let text = std::str::from_utf8(head).map_err(|_| "non-UTF-8 response head".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut len = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                return Err("chunked responses are not supported".to_string());
            }
        }
    }
    match (len, status) {
        (Some(n), _) => Ok((status, n)),
        (None, 204 | 304) | (None, 100..=199) => Ok((status, 0)),
        (None, _) => Err(format!("no Content-Length in {status_line:?}")),
    }
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        })
    }

    async fn fill(&mut self) -> Result<(), String> {
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len();
                self.buf.resize(n * 2, 0);
            }
        }
        let n = self
            .stream
            .read(&mut self.buf[self.end..])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed by server".to_string());
        }
        self.end += n;
        Ok(())
    }

    async fn roundtrip(&mut self, req: &[u8]) -> Result<Answer, String> {
        self.stream
            .write_all(req)
            .await
            .map_err(|e| e.to_string())?;
        let head_len = loop {
            if let Some(h) = find_header_end(&self.buf[self.start..self.end]) {
                break h;
            }
            self.fill().await?;
        };
        let (status, body_len) = parse_head(&self.buf[self.start..self.start + head_len])?;
        self.start += head_len;
        while self.end - self.start < body_len {
            self.fill().await?;
        }
        self.start += body_len;
        Ok(Answer { status })
    }
}

struct TaskOut {
    hist: Hist,
    requests: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `conns` keep-alive connections against `addr` for `duration`; request number `n` (unique
/// across connections, from 0) is the bytes `make_request(n)` returns (a whole HTTP/1.1 request).
pub async fn http_load(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    make_request: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> LoadResult {
    run_load(addr, conns, duration, u64::MAX, make_request).await
}

/// `http_load` that also stops after `count` requests (numbered `0..count`) have been sent.
pub async fn http_load_n(
    addr: SocketAddr,
    conns: usize,
    count: u64,
    max_duration: Duration,
    make_request: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> LoadResult {
    run_load(addr, conns, max_duration, count, make_request).await
}

async fn run_load(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    limit: u64,
    make_request: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> LoadResult {
    let make = Arc::new(make_request);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns.max(1) {
        let make = make.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = TaskOut {
                hist: Hist::new(),
                requests: 0,
                errors: 0,
                first_error: None,
            };
            let mut conn: Option<Conn> = None;
            let mut consecutive_errors = 0u32;
            while Instant::now() < deadline {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::open(addr).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            out.errors += 1;
                            out.first_error
                                .get_or_insert_with(|| format!("connect: {e}"));
                            consecutive_errors += 1;
                            if consecutive_errors > 100 {
                                break;
                            }
                            // A pause between reconnects (at most 100 in a row), not a wait for a condition.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    break;
                }
                let req = make(n);
                let t0 = Instant::now();
                // Bounded: a request that hangs ends the connection at the deadline (+1 s).
                let limit = deadline.saturating_duration_since(t0) + Duration::from_secs(1);
                match tokio::time::timeout(limit, c.roundtrip(&req)).await {
                    Ok(Ok(a)) => {
                        out.hist.record(t0.elapsed());
                        out.requests += 1;
                        consecutive_errors = 0;
                        if !(200..300).contains(&a.status) {
                            out.errors += 1;
                            out.first_error
                                .get_or_insert_with(|| format!("HTTP status {}", a.status));
                        }
                    }
                    Ok(Err(e)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                        conn = None;
                        consecutive_errors += 1;
                        if consecutive_errors > 100 {
                            break;
                        }
                    }
                    Err(_) => {
                        out.errors += 1;
                        out.first_error
                            .get_or_insert_with(|| "request timed out".to_string());
                        break;
                    }
                }
            }
            out
        }));
    }
    let mut hist = Hist::new();
    let (mut requests, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        match t.await {
            Ok(o) => {
                hist.merge(&o.hist);
                requests += o.requests;
                errors += o.errors;
                if first_error.is_none() {
                    first_error = o.first_error;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("task: {e}"));
            }
        }
    }
    let elapsed = started.elapsed();
    LoadResult {
        requests,
        errors,
        elapsed,
        p50: hist.quantile(0.5),
        p99: hist.quantile(0.99),
        p999: hist.quantile(0.999),
        max: hist.max(),
        mean: hist.mean(),
        first_error,
    }
}

/// A GET request with optional bearer token.
pub fn get_request(host: &str, path: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n").into_bytes()
}

/// A POST request with a JSON body, optional bearer token and extra header lines (`"K: v\r\n"`).
pub fn post_json(host: &str, path: &str, token: Option<&str>, extra: &str, body: &[u8]) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}
