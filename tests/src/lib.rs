//! Test harness for Outpost's end-to-end tests: lays out a fleet with `outpost-central dev init`,
//! starts central and agents as real child processes on loopback with ephemeral ports, and talks to
//! their HTTP APIs. Every wait is bounded in time; every process started is stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

pub mod bench;
pub mod events;
pub mod pg;
pub mod proxy;
pub mod quic_client;

pub use proxy::{ProxyStats, UdpProxy, proxies_for};

/// Longest a process may take to bind its listeners and write its ready file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any "eventually" condition in a test may take (sync after reconnect, master push...).
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between polls of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Directory holding the workspace's built binaries (`target/<profile>`), derived from this
/// executable's own path: a test executable lives in `target/<profile>/deps/`, a binary such as
/// `outpost-bench` in `target/<profile>/` itself (next to `outpost-central`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let parent = exe.parent().expect("executable has a parent directory");
    let central = format!("outpost-central{}", std::env::consts::EXE_SUFFIX);
    if parent.join(&central).exists() || parent.file_name().is_none_or(|n| n != "deps") {
        return parent.to_path_buf();
    }
    parent
        .parent()
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Clears every inherited `OUTPOST_*` variable from a child's environment: the binaries read them
/// as config overrides, while in a test run they are the test's own knobs (`OUTPOST_SEED`,
/// `OUTPOST_LONG`...). A child gets only the overrides a test passes explicitly.
pub fn hermetic(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OUTPOST_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Path of a workspace binary; fails with instructions if it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: run the tests with `cargo test --workspace`, which builds it",
        p.display()
    );
    p
}

/// One entry of `fleet.json`.
#[derive(Clone, Debug)]
pub struct Member {
    pub id: String,
    pub token: String,
    pub command: Vec<String>,
    pub data_dir: PathBuf,
    pub config: PathBuf,
}

/// A fleet laid out on disk by `outpost-central dev init` with ephemeral ports.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub central: Member,
    pub sites: Vec<Member>,
    pub fleet_json: Value,
}

/// Reads one `fleet.json` entry (`central` or an element of `sites`).
pub fn member(v: &Value, id: &str) -> Result<Member> {
    let command: Vec<String> = v["command"]
        .as_array()
        .context("command")?
        .iter()
        .map(|s| s.as_str().map(str::to_string).context("command item"))
        .collect::<Result<_>>()?;
    let config = PathBuf::from(command.last().context("command has a config path")?);
    Ok(Member {
        id: id.to_string(),
        token: v["token"].as_str().context("token")?.to_string(),
        data_dir: PathBuf::from(v["data_dir"].as_str().context("data_dir")?),
        command,
        config,
    })
}

impl Fleet {
    /// Runs `dev init` for `sites` sites with every listener on an ephemeral port.
    pub fn init(sites: usize) -> Result<Fleet> {
        let mut dir = tempfile::Builder::new().prefix("outpost-e2e").tempdir()?;
        // For post-mortems: keep the fleet directory (configs, stores, logs) after the test.
        if std::env::var("OUTPOST_TEST_KEEP_DIRS").is_ok_and(|v| v == "1") {
            dir.disable_cleanup(true);
            eprintln!("keeping fleet directory {}", dir.path().display());
        }
        let out = hermetic(&mut Command::new(bin("outpost-central")))
            .args(["dev", "init", "--dir"])
            .arg(dir.path())
            .args([
                "--sites",
                &sites.to_string(),
                "--base-port",
                "0",
                "--agent-bin",
            ])
            .arg(bin("outpost-agent"))
            .output()?;
        if !out.status.success() {
            bail!("dev init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let fleet_json: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("fleet.json"))?)?;
        let central = member(&fleet_json["central"], "central")?;
        let sites = fleet_json["sites"]
            .as_array()
            .context("sites")?
            .iter()
            .map(|s| member(s, s["id"].as_str().unwrap_or("?")))
            .collect::<Result<_>>()?;
        Ok(Fleet {
            dir,
            central,
            sites,
            fleet_json,
        })
    }

    pub fn site(&self, id: &str) -> &Member {
        self.sites
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("no site {id} in fleet"))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts central. `fixed` pins its ports (to restart it where agents expect it).
    pub fn start_central(&self, fixed: Option<&Ready>) -> Result<Proc> {
        self.start_central_with(fixed, &[])
    }

    /// Starts central with extra `OUTPOST_*` environment overrides (config keys).
    pub fn start_central_with(
        &self,
        fixed: Option<&Ready>,
        extra: &[(&str, String)],
    ) -> Result<Proc> {
        let mut env: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        if let Some(r) = fixed {
            env.push(("OUTPOST_API__LISTEN".to_string(), r.api.clone()));
            env.push((
                "OUTPOST_QUIC__LISTEN".to_string(),
                r.quic.clone().context("central ready file has quic")?,
            ));
        }
        Proc::start(&self.central, &env, &self.path().join("logs"))
    }

    /// Starts a site's agent pointed at central's QUIC address, plus extra env overrides.
    pub fn start_agent(
        &self,
        id: &str,
        central_quic: &str,
        extra: &[(&str, String)],
    ) -> Result<Proc> {
        let mut env = vec![(
            "OUTPOST_SYNC__CENTRAL_ADDR".to_string(),
            central_quic.to_string(),
        )];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Proc::start(self.site(id), &env, &self.path().join("logs"))
    }
}

/// What a process wrote in its ready file.
#[derive(Clone, Debug)]
pub struct Ready {
    pub pid: u32,
    pub api: String,
    pub quic: Option<String>,
}

/// A child process that is killed (SIGKILL) if still running when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub ready: Ready,
    pub token: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(m: &Member, env: &[(String, String)], log_dir: &Path) -> Result<Proc> {
        std::fs::create_dir_all(log_dir)?;
        let ready_file = m.data_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready_file);
        let log = log_dir.join(format!("{}.log", m.id));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(&m.command[0]);
        hermetic(&mut cmd)
            .args(&m.command[1..])
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {:?}", m.command))?;
        let mut p = Proc {
            name: m.id.clone(),
            child,
            ready: Ready {
                pid: 0,
                api: String::new(),
                quic: None,
            },
            token: m.token.clone(),
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited early with {status}; log:\n{}",
                    p.name,
                    p.log_tail()
                );
            }
            if let Ok(bytes) = std::fs::read(&ready_file)
                && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                && v["pid"].as_u64() == Some(u64::from(p.child.id()))
            {
                p.ready = Ready {
                    pid: p.child.id(),
                    api: v["api"].as_str().context("ready.api")?.to_string(),
                    quic: v["quic"].as_str().map(str::to_string),
                };
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {READY_TIMEOUT:?}; log:\n{}",
                    p.name,
                    p.log_tail()
                );
            }
            // Poll interval of the bounded wait around it, not a wait for a condition by itself.
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.ready.api, path)
    }

    /// The last lines of the process log, for failure messages.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the process is still running (it has not exited, on its own or killed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns whether it exited with status 0.
    pub fn terminate(&mut self) -> Result<bool> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st.success());
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("{} did not exit within 15 s of SIGTERM", self.name);
            }
            // Poll interval of the bounded wait around it, not a wait for a condition by itself.
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP client for one process's API, with its bearer token.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

/// A response reduced to what tests look at.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
}

impl Api {
    pub fn new(p: &Proc) -> Api {
        Api {
            base: format!("http://{}", p.ready.api),
            token: p.token.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
        }
    }

    /// A client for `p` whose every request gives up after `timeout` (chaos workloads count a
    /// request that took longer as an unknown outcome instead of waiting the default 10 s).
    pub fn with_timeout(p: &Proc, timeout: Duration) -> Api {
        Api {
            base: format!("http://{}", p.ready.api),
            token: p.token.clone(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("http client"),
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Resp> {
        let r = rb.bearer_auth(&self.token).send().await?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| anyhow!("non-JSON body ({e}): {}", String::from_utf8_lossy(&bytes)))?
        };
        Ok(Resp { status, body })
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Resp> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value, idem: Option<&str>) -> Result<Resp> {
        let mut rb = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(k) = idem {
            rb = rb.header("Idempotency-Key", k);
        }
        self.send(rb).await
    }
}

/// Polls `f` until it returns `Some`, failing after `timeout` with `what` in the message.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// How many times each of `site`'s event ids is in central's feed.
pub async fn feed_counts(
    central: &Api,
    site: &str,
) -> Result<std::collections::HashMap<String, usize>> {
    let mut counts = std::collections::HashMap::new();
    for e in read_feed(central).await? {
        if e["site"] == site {
            *counts
                .entry(e["id"].as_str().context("feed id")?.to_string())
                .or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// Reads central's whole event feed, page by page (bounded number of pages).
pub async fn read_feed(central: &Api) -> Result<Vec<Value>> {
    Ok(read_feed_after(central, 0).await?.0)
}

/// Reads central's event feed after cursor `after`, page by page (bounded number of pages), and
/// returns the entries and the cursor to continue from (`after` itself when nothing is new).
pub async fn read_feed_after(central: &Api, mut after: u64) -> Result<(Vec<Value>, u64)> {
    let mut all = Vec::new();
    for _ in 0..10_000 {
        let r = central
            .get(&format!("/v1/events?after={after}&limit=1000"))
            .await?;
        if r.status != 200 {
            bail!("feed returned {}: {}", r.status, r.body);
        }
        let events = r.body["events"].as_array().context("events")?.clone();
        let next = r.body["next"].as_u64().context("next")?;
        if events.is_empty() {
            return Ok((all, after));
        }
        if next <= after {
            bail!("feed cursor did not advance: {after} -> {next}");
        }
        all.extend(events);
        after = next;
    }
    bail!("feed longer than 10,000 pages")
}

/// A small master-data set: two SKUs with list prices and one customer price, two customers,
/// ATP for every given site.
pub fn demo_master(sites: &[&str]) -> (Value, Value, Value) {
    let prices = serde_json::json!([
        {"sku": "BOLT-M8", "customer": null, "unit_price": "0.25", "currency": "EUR"},
        {"sku": "GEAR-12T", "customer": null, "unit_price": "12.50", "currency": "EUR"},
        {"sku": "GEAR-12T", "customer": "ACME", "unit_price": "11.00", "currency": "EUR"},
    ]);
    let customers = serde_json::json!([
        {"id": "ACME", "name": "Acme Corp", "credit_limit": "50000", "on_hold": false},
        {"id": "GLOBEX", "name": "Globex", "credit_limit": "1000", "on_hold": true},
    ]);
    let atp: Vec<Value> = sites
        .iter()
        .flat_map(|s| {
            [
                serde_json::json!({"sku": "BOLT-M8", "site": s, "available": 10000}),
                serde_json::json!({"sku": "GEAR-12T", "site": s, "available": 40}),
            ]
        })
        .collect();
    (prices, Value::Array(atp), customers)
}

/// Pushes `demo_master` to central and returns the resulting revision.
pub async fn push_demo_master(central: &Api, sites: &[&str]) -> Result<u64> {
    let (prices, atp, customers) = demo_master(sites);
    let mut rev = 0;
    for (path, body) in [
        ("/v1/master/prices", &prices),
        ("/v1/master/atp", &atp),
        ("/v1/master/customers", &customers),
    ] {
        let r = central.put(path, body).await?;
        if r.status != 200 {
            bail!("PUT {path} returned {}: {}", r.status, r.body);
        }
        rev = r.body["revision"].as_u64().context("revision")?;
    }
    Ok(rev)
}

/// Waits until the agent reports `master_rev >= rev`.
pub async fn wait_master(agent: &Api, rev: u64) -> Result<()> {
    eventually("agent master revision", CONVERGE_TIMEOUT, || async {
        let h = agent.get("/v1/health").await?;
        Ok((h.body["master_rev"].as_u64().unwrap_or(0) >= rev).then_some(()))
    })
    .await
}

/// Waits until the agent's outbox is empty and it reports being connected.
pub async fn wait_drained(agent: &Api) -> Result<()> {
    eventually("agent outbox drained", CONVERGE_TIMEOUT, || async {
        let h = agent.get("/v1/health").await?;
        Ok(
            (h.body["outbox_depth"].as_u64() == Some(0)
                && h.body["connected"] == Value::Bool(true))
            .then_some(()),
        )
    })
    .await
}

/// The agent's `GET /v1/health` body.
pub async fn health(agent: &Api) -> Result<Value> {
    let r = agent.get("/v1/health").await?;
    if r.status != 200 {
        bail!("health returned {}: {}", r.status, r.body);
    }
    Ok(r.body)
}

/// Waits until the agent reports `connected == want`.
pub async fn wait_connected(agent: &Api, want: bool) -> Result<()> {
    eventually(
        if want {
            "agent connected"
        } else {
            "agent notices it is cut off"
        },
        CONVERGE_TIMEOUT,
        || async { Ok((health(agent).await?["connected"] == want).then_some(())) },
    )
    .await
}

/// Sync settings for chaos tests: an outage is noticed within ~2 s and a healed link is used again
/// within ~0.5 s, so partitions shorter than a test's patience still end sessions.
pub const FAST_IDLE_TIMEOUT_MS: u64 = 2_000;

/// Agent env overrides for chaos tests (see `FAST_IDLE_TIMEOUT_MS`).
pub fn fast_agent_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "OUTPOST_SYNC__IDLE_TIMEOUT_MS",
            FAST_IDLE_TIMEOUT_MS.to_string(),
        ),
        ("OUTPOST_SYNC__KEEP_ALIVE_MS", "500".to_string()),
        ("OUTPOST_SYNC__CONNECT_TIMEOUT_MS", "2000".to_string()),
        ("OUTPOST_SYNC__BACKOFF_MAX_MS", "500".to_string()),
    ]
}

/// Central env overrides for chaos tests (see `FAST_IDLE_TIMEOUT_MS`).
pub fn fast_central_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "OUTPOST_QUIC__IDLE_TIMEOUT_MS",
            FAST_IDLE_TIMEOUT_MS.to_string(),
        ),
        ("OUTPOST_QUIC__KEEP_ALIVE_MS", "500".to_string()),
    ]
}

/// The remaining allowance the agent reports for a SKU (`GET /v1/atp/{sku}` `allowance`).
pub async fn allowance(agent: &Api, sku: &str) -> Result<i64> {
    let r = agent.get(&format!("/v1/atp/{sku}")).await?;
    if r.status != 200 {
        bail!("GET /v1/atp/{sku} returned {}: {}", r.status, r.body);
    }
    r.body["allowance"]
        .as_i64()
        .with_context(|| format!("allowance is an integer: {}", r.body))
}

/// Waits until the agent holds exactly `want` of `sku`'s allowance.
pub async fn wait_allowance(agent: &Api, sku: &str, want: i64) -> Result<()> {
    eventually(
        &format!("allowance of {sku} == {want}"),
        CONVERGE_TIMEOUT,
        || async { Ok((allowance(agent, sku).await? == want).then_some(())) },
    )
    .await
}

/// Every exception at central (`status=all`).
pub async fn exceptions(central: &Api, status: &str) -> Result<Vec<Value>> {
    let r = central
        .get(&format!("/v1/exceptions?status={status}"))
        .await?;
    if r.status != 200 {
        bail!("GET /v1/exceptions returned {}: {}", r.status, r.body);
    }
    r.body
        .as_array()
        .cloned()
        .with_context(|| format!("exceptions are a JSON array: {}", r.body))
}

/// The order id an exception is about (`event.order_id`, falling back to the event id).
pub fn exception_order_id(x: &Value) -> Option<&str> {
    x["event"]["order_id"]
        .as_str()
        .or_else(|| x["event_id"].as_str())
}

/// An id from JSON as it goes into a URL path: a string as is, a number in decimal.
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A JSON list answer: the array itself, or the only array inside a wrapper object
/// (`{"reports": [...]}`), for routes whose contract does not pin the wrapper.
pub fn as_list(v: &Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) => Some(a.clone()),
        Value::Object(m) => {
            let arrays: Vec<&Vec<Value>> = m.values().filter_map(Value::as_array).collect();
            match arrays.as_slice() {
                [only] => Some((*only).clone()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A `picked` milestone body for the agent's `POST /v1/shipments/{id}/milestones`.
pub fn picked_milestone(event_id: &str) -> Value {
    serde_json::json!({"event_id": event_id, "milestone": "picked", "scanner_id": "scanner-1", "at": "2026-11-26T10:00:00Z"})
}

/// Posts `n` milestones with event ids `{prefix}-{i}` for shipment `SH-{prefix}`, one after the
/// other; fails on the first answer that is not 2xx. Returns the event ids.
pub async fn post_milestones(agent: &Api, prefix: &str, n: usize) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let r = agent
            .post(
                &format!("/v1/shipments/SH-{prefix}/milestones"),
                &picked_milestone(&id),
                None,
            )
            .await?;
        if r.status / 100 != 2 {
            bail!("milestone {id}: {} {}", r.status, r.body);
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Output of a command-line run.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a workspace binary with `args`, killing it if it takes longer than `timeout`.
pub fn run_cli(name: &str, args: &[&str], timeout: Duration) -> Result<CliOutput> {
    run_cli_env(name, args, &[], timeout)
}

/// `run_cli` with extra environment variables for the child.
pub fn run_cli_env(
    name: &str,
    args: &[&str],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<CliOutput> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(bin(name));
    hermetic(&mut cmd)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} {args:?} did not finish within {timeout:?}");
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        std::thread::sleep(POLL_INTERVAL);
    };
    Ok(CliOutput {
        success: status.success(),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    })
}

/// Where Debian's `faketime` package puts the preload library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The libfaketime preload library (`OUTPOST_LIBFAKETIME` or Debian's path), or `None` after
/// `skip` reported that `what` was not tested (under CI, `skip` fails the test instead).
pub fn libfaketime(what: &str) -> Option<PathBuf> {
    let p = std::env::var_os("OUTPOST_LIBFAKETIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LIBFAKETIME));
    if p.exists() {
        return Some(p);
    }
    skip(
        what,
        &format!(
            "needs libfaketime at {} (Debian package `faketime`; `bash .ci/test` installs it)",
            p.display()
        ),
    );
    None
}

/// File under the workspace's target directory collecting the skip lines of a run outside CI:
/// the test harness captures what a passing test prints, so `.ci/test` deletes this file before
/// the tests and prints it after them.
pub const SKIPS_FILE: &str = "test-skips.txt";

/// Whether this is a CI run (`CI=true`, as GitHub Actions, GitLab CI and most others set it).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The workspace's target directory: `CARGO_TARGET_DIR` (a relative one taken from the workspace
/// root, where `.ci/test` runs cargo), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

/// Reports that `what` was not tested because `why` (a missing tool or privilege; `why` says
/// how to get it). The one way a test in this crate skips. Under CI (`under_ci`) it panics
/// instead: `.ci/test` installs every prerequisite and CI runs as root, so a skip there is a broken
/// setup and must not pass. Elsewhere it writes the line to the process's stderr directly (the
/// harness captures `println!` and `eprintln!` of a passing test, not this) and appends it to
/// `SKIPS_FILE` under `target_dir()`, which `.ci/test` prints at the end of the run.
pub fn skip(what: &str, why: &str) {
    use std::io::Write;
    // libtest names each test's thread after the test (the main thread runs it under
    // --test-threads=1), which tells apart the skips of tests sharing one `what`.
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let line = format!("SKIPPED: {what}{test}: {why}. Nothing of it was tested.");
    if under_ci() {
        panic!("{line} Under CI=true a missing tool or privilege fails the test.");
    }
    let _ = writeln!(std::io::stderr(), "\n!!! {line} !!!");
    let dir = target_dir();
    let appended = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SKIPS_FILE))?
            .write_all(format!("{line}\n").as_bytes())
    });
    if let Err(e) = appended {
        let _ = writeln!(
            std::io::stderr(),
            "(could not record the skip in {}: {e})",
            dir.join(SKIPS_FILE).display()
        );
    }
}
