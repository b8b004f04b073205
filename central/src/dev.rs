//! Development fleet tooling: `dev init` writes a CA, certificates, configs, tokens and
//! `fleet.json` for one central and N sites; `dev up` starts them as child processes, seeds a
//! demo catalogue through central's HTTP API and stops them on Ctrl-C. I/O shell (files,
//! processes, HTTP), in the binary: a client of the server library, never used by it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fleet_file::{FLEET_FILE, Fleet, FleetCentral, FleetSite};
use serde_json::{Value, json};

use outpost_central::certs::{self, CertError, DEFAULT_CENTRAL_NAME};
use outpost_central::paths::READY_FILE;

pub const DEFAULT_SITES: usize = 3;
pub const DEFAULT_BASE_PORT: u16 = 7600;
/// Most sites `dev init` writes: a development fleet on one machine, not a load test.
pub const MAX_DEV_SITES: usize = 64;
/// Bytes of randomness in each generated bearer token.
pub const TOKEN_BYTES: usize = 32;
/// How long `dev up` waits for each process's ready file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `dev up` waits for children to exit after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit on each seeding HTTP request.
pub const SEED_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `dev up` checks its children.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of a failed child's log shown in the error.
const LOG_TAIL_LINES: usize = 20;

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    pub sites: usize,
    pub base_port: u16,
    pub force: bool,
    /// The agent binary; default: `outpost-agent` next to the running executable.
    pub agent_bin: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists; pass --force to overwrite the fleet")]
    FleetExists(PathBuf),
    #[error("--sites must be 1..={MAX_DEV_SITES}, got {0}")]
    SiteCount(usize),
    #[error("--base-port {base} leaves no room for {needed} consecutive ports")]
    Ports { base: u16, needed: usize },
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{path} is not a valid fleet file: {source}")]
    FleetFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{name}: empty command in fleet.json")]
    EmptyCommand { name: String },
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited before it was ready ({status}); last lines of {log}:\n{tail}")]
    DiedEarly {
        name: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("{name} did not write {ready} within {secs} s; see {log}", secs = READY_TIMEOUT.as_secs())]
    NotReady {
        name: String,
        ready: String,
        log: String,
    },
    #[error("seeding the demo catalogue failed: {0}")]
    Seed(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Site ids of a dev fleet of `n`: `n - n/3` plants, then `n/3` warehouses.
pub fn site_names(n: usize) -> Vec<String> {
    let warehouses = n / 3;
    let plants = n - warehouses;
    (1..=plants)
        .map(|i| format!("plant-{i}"))
        .chain((1..=warehouses).map(|i| format!("warehouse-{i}")))
        .collect()
}

/// A random bearer token: `TOKEN_BYTES` bytes as lower-case hex.
pub fn random_token() -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    outpost_protocol::secret::to_hex(&bytes)
}

/// A TOML string literal (quoted and escaped).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn port(base: u16, offset: usize) -> u16 {
    if base == 0 { 0 } else { base + offset as u16 }
}

fn absolute(p: &Path) -> Result<PathBuf, DevError> {
    std::path::absolute(p).map_err(io_err(p))
}

/// Writes the dev fleet into `opts.dir` and returns what it wrote to `fleet.json`.
pub fn init(opts: &InitOptions) -> Result<Fleet, DevError> {
    if opts.sites == 0 || opts.sites > MAX_DEV_SITES {
        return Err(DevError::SiteCount(opts.sites));
    }
    let needed = opts.sites + 2;
    if opts.base_port != 0 && opts.base_port as usize + needed - 1 > u16::MAX as usize {
        return Err(DevError::Ports {
            base: opts.base_port,
            needed,
        });
    }
    let dir = absolute(&opts.dir)?;
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let fleet_path = dir.join(FLEET_FILE);
    if fleet_path.exists() && !opts.force {
        return Err(DevError::FleetExists(fleet_path));
    }
    let exe = std::env::current_exe().map_err(io_err(Path::new("current_exe")))?;
    let exe = absolute(&exe)?;
    let agent_bin = match &opts.agent_bin {
        Some(p) => absolute(p)?,
        None => exe.with_file_name("outpost-agent"),
    };

    let certs_dir = dir.join("certs");
    certs::create_ca(&certs_dir, opts.force)?;
    let central_files =
        certs::issue_central(&certs_dir, &certs_dir, DEFAULT_CENTRAL_NAME, opts.force)?;
    let ca_pem = certs_dir.join(certs::CA_CERT_FILE);

    let api_port = port(opts.base_port, 0);
    let quic_port = port(opts.base_port, 1);
    let central_data = dir.join("data").join("central");
    std::fs::create_dir_all(&central_data).map_err(io_err(&central_data))?;
    let central_token = random_token();
    let erp_token = random_token();
    let central_toml = dir.join("central.toml");
    let central_cfg = format!(
        "# Written by `outpost-central dev init`.\n\
         data_dir = {data}\n\n\
         [api]\n\
         listen = {api}\n\n\
         # API clients: the SHA-256 of each bearer token (the tokens are in fleet.json).\n\
         [[api.tokens]]\n\
         name = \"erp\"\n\
         role = \"erp\"\n\
         sha256 = {erp_hash}\n\n\
         [[api.tokens]]\n\
         name = \"admin\"\n\
         role = \"admin\"\n\
         sha256 = {admin_hash}\n\n\
         [quic]\n\
         listen = {quic}\n\
         ca_cert = {ca}\n\
         cert = {cert}\n\
         key = {key}\n\n\
         # Allowances escrowed at each site (these are the defaults).\n\
         [allowance]\n\
         atp_target = {atp_target}\n\
         credit_target_fraction = {credit_fraction}\n\
         reclaim_silent_secs = {silent}\n\n\
         # Site certificates are renewed over the sync connection, signed with this CA.\n\
         [renewal]\n\
         ca_dir = {ca_dir}\n",
        data = toml_str(&path_str(&central_data)),
        api = toml_str(&format!("127.0.0.1:{api_port}")),
        erp_hash = toml_str(&outpost_central::config::sha256_hex(&erp_token)),
        admin_hash = toml_str(&outpost_central::config::sha256_hex(&central_token)),
        quic = toml_str(&format!("127.0.0.1:{quic_port}")),
        ca = toml_str(&path_str(&ca_pem)),
        cert = toml_str(&path_str(&central_files.cert)),
        key = toml_str(&path_str(&central_files.key)),
        atp_target = outpost_central::store::DEFAULT_ATP_TARGET,
        credit_fraction = outpost_central::store::DEFAULT_CREDIT_TARGET_FRACTION,
        silent = outpost_central::store::DEFAULT_RECLAIM_SILENT_SECS,
        ca_dir = toml_str(&path_str(&certs_dir)),
    );
    write_secret(&central_toml, &central_cfg)?;

    let mut sites = Vec::new();
    for (i, id) in site_names(opts.sites).into_iter().enumerate() {
        let files = certs::issue_site(&certs_dir, &id, &certs_dir, opts.force)?;
        let site_port = port(opts.base_port, 2 + i);
        let data = dir.join("data").join(&id);
        std::fs::create_dir_all(&data).map_err(io_err(&data))?;
        // One client per role of the agent's API, each named after its role. The config gets
        // only the SHA-256 of each token; the tokens themselves go to fleet.json.
        let tokens: std::collections::BTreeMap<String, String> =
            ["reader", "scanner", "order-entry", "admin"]
                .into_iter()
                .map(|role| (role.to_string(), random_token()))
                .collect();
        let token = tokens["admin"].clone();
        let clients: String = tokens
            .iter()
            .map(|(role, t)| {
                let hash = outpost_central::config::sha256_hex(t);
                // The dev fleet's tests and load drills drive each site through its admin
                // client, so that one is not held to the default rate limit; the other roles are.
                let rate = if role == "admin" {
                    "# Dev fleet: tests drive load with this client.\nrate_per_sec = 1000000\n"
                } else {
                    ""
                };
                format!(
                    "[[api.tokens]]\nname = {name}\nrole = {name}\nsha256 = {hash}\n{rate}\n",
                    name = toml_str(role),
                    hash = toml_str(&hash),
                )
            })
            .collect();
        let toml_path = dir.join(format!("{id}.toml"));
        let cfg = format!(
            "# Written by `outpost-central dev init`.\n\
             site_id = {site}\n\
             data_dir = {data}\n\n\
             [api]\n\
             listen = {api}\n\n\
             # Clients of the local API: SHA-256 of each bearer token (`outpost-agent hash-token`).\n\
             {clients}\
             [sync]\n\
             central_addr = {central}\n\
             central_name = {name}\n\
             ca_cert = {ca}\n\
             cert = {cert}\n\
             key = {key}\n",
            site = toml_str(&id),
            data = toml_str(&path_str(&data)),
            api = toml_str(&format!("127.0.0.1:{site_port}")),
            central = toml_str(&format!("127.0.0.1:{quic_port}")),
            name = toml_str(DEFAULT_CENTRAL_NAME),
            ca = toml_str(&path_str(&ca_pem)),
            cert = toml_str(&path_str(&files.cert)),
            key = toml_str(&path_str(&files.key)),
        );
        write_secret(&toml_path, &cfg)?;
        sites.push(FleetSite {
            id,
            api: format!("http://127.0.0.1:{site_port}"),
            token,
            tokens,
            command: vec![
                path_str(&agent_bin),
                "run".into(),
                "--config".into(),
                path_str(&toml_path),
            ],
            data_dir: path_str(&data),
        });
    }
    let fleet = Fleet {
        central: FleetCentral {
            api: format!("http://127.0.0.1:{api_port}"),
            token: central_token,
            erp_token,
            quic: format!("127.0.0.1:{quic_port}"),
            command: vec![
                path_str(&exe),
                "serve".into(),
                "--config".into(),
                path_str(&central_toml),
            ],
            data_dir: path_str(&central_data),
        },
        sites,
    };
    let json = serde_json::to_string_pretty(&fleet).expect("Fleet serialises");
    write_secret(&fleet_path, &(json + "\n"))?;
    Ok(fleet)
}

/// Config files and fleet.json hold bearer tokens: owner-only.
fn write_secret(path: &Path, contents: &str) -> Result<(), DevError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    Ok(())
}

pub fn load_fleet(dir: &Path) -> Result<Fleet, DevError> {
    let path = dir.join(FLEET_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    serde_json::from_slice(&bytes).map_err(|source| DevError::FleetFile { path, source })
}

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub init: InitOptions,
    pub seed: bool,
    /// Run the traffic simulator against the fleet once it is up (until Ctrl-C); its record
    /// goes to `DIR/traffic.json` unless the options name another file.
    pub traffic: Option<crate::traffic::TrafficOptions>,
}

/// The traffic simulator's record file in a `dev up --traffic` fleet's directory.
pub const TRAFFIC_RECORD_FILE: &str = "traffic.json";
/// How often `dev up --traffic` prints the simulator's live line: rarely enough that the
/// fleet's summary above it stays readable.
const UP_TRAFFIC_LIVE_EVERY: Duration = Duration::from_secs(10);

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    ready: PathBuf,
}

impl Proc {
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown status: {e}")),
        }
    }
}

/// Stops every child still running: SIGTERM (through `kill`, since this crate has no unsafe
/// code), a bounded wait, then SIGKILL for stragglers.
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if p.exited().is_none() {
            let pid = p.child.id().to_string();
            let sent = Command::new("kill")
                .args(["-TERM", &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !matches!(sent, Ok(s) if s.success()) {
                let _ = p.child.kill();
            }
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let running: Vec<&str> = procs
            .iter_mut()
            .filter_map(|p| p.exited().is_none().then_some(p.name.as_str()))
            .collect();
        if running.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "killing processes that did not stop in time: {}",
                running.join(", ")
            );
            for p in procs.iter_mut() {
                if p.exited().is_none() {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                }
            }
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn spawn(
    name: &str,
    command: &[String],
    data_dir: &Path,
    logs: &Path,
    env: &[(&str, String)],
) -> Result<Proc, DevError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| DevError::EmptyCommand {
            name: name.to_string(),
        })?;
    let ready = data_dir.join(READY_FILE);
    match std::fs::remove_file(&ready) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&ready)(e)),
        _ => {}
    }
    let log = logs.join(format!("{name}.log"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_err(&log))?;
    let err = out.try_clone().map_err(io_err(&log))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(|source| DevError::Spawn {
        name: name.to_string(),
        program: program.clone(),
        source,
    })?;
    Ok(Proc {
        name: name.to_string(),
        child,
        log,
        ready,
    })
}

/// Waits for the process's ready file and returns its JSON.
async fn wait_ready(p: &mut Proc) -> Result<Value, DevError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(bytes) = std::fs::read(&p.ready)
            && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
        {
            return Ok(v);
        }
        if let Some(status) = p.exited() {
            return Err(DevError::DiedEarly {
                name: p.name.clone(),
                status,
                log: path_str(&p.log),
                tail: p.tail(),
            });
        }
        if Instant::now() >= deadline {
            return Err(DevError::NotReady {
                name: p.name.clone(),
                ready: path_str(&p.ready),
                log: path_str(&p.log),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn ready_addr(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Runs the dev fleet until Ctrl-C / SIGTERM, then stops every process it started. A process
/// that exits on its own is reported with the command that restarts it; the others keep running.
pub async fn up(opts: &UpOptions) -> Result<(), DevError> {
    let dir = absolute(&opts.init.dir)?;
    if !dir.join(FLEET_FILE).exists() {
        println!(
            "no {FLEET_FILE} in {}; running dev init first",
            dir.display()
        );
        init(&InitOptions {
            dir: dir.clone(),
            force: false,
            ..opts.init.clone()
        })?;
    }
    let fleet = load_fleet(&dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io_err(&logs))?;

    let mut procs: Vec<Proc> = Vec::new();
    let traffic = opts
        .traffic
        .clone()
        .map(|t| crate::traffic::TrafficOptions {
            record: t.record.or_else(|| Some(dir.join(TRAFFIC_RECORD_FILE))),
            live_every: t.live_every.map(|_| UP_TRAFFIC_LIVE_EVERY),
            ..t
        });
    let result = start_and_wait(&fleet, &dir, &logs, opts.seed, traffic, &mut procs).await;
    if !procs.is_empty() {
        println!("stopping {} process(es)...", procs.len());
        tokio::task::block_in_place(|| stop_all(&mut procs));
        println!("stopped");
    }
    result
}

async fn start_and_wait(
    fleet: &Fleet,
    dir: &Path,
    logs: &Path,
    seed: bool,
    traffic: Option<crate::traffic::TrafficOptions>,
    procs: &mut Vec<Proc>,
) -> Result<(), DevError> {
    let central_data = PathBuf::from(&fleet.central.data_dir);
    procs.push(spawn(
        "central",
        &fleet.central.command,
        &central_data,
        logs,
        &[],
    )?);
    let central_ready = wait_ready(&mut procs[0]).await?;
    let central_api = ready_addr(&central_ready, "api")
        .map(|a| format!("http://{a}"))
        .unwrap_or_else(|| fleet.central.api.clone());
    let central_quic =
        ready_addr(&central_ready, "quic").unwrap_or_else(|| fleet.central.quic.clone());

    // Agents learn central's real QUIC address through the documented env override, which also
    // makes `--base-port 0` fleets work.
    let env = [("OUTPOST_SYNC__CENTRAL_ADDR", central_quic.clone())];
    for s in &fleet.sites {
        procs.push(spawn(
            &s.id,
            &s.command,
            Path::new(&s.data_dir),
            logs,
            &env,
        )?);
    }
    let mut site_apis = Vec::new();
    for (i, s) in fleet.sites.iter().enumerate() {
        let ready = wait_ready(&mut procs[i + 1]).await?;
        let api = ready_addr(&ready, "api")
            .map(|a| format!("http://{a}"))
            .unwrap_or_else(|| s.api.clone());
        site_apis.push(api);
    }

    if seed {
        seed_catalogue(&central_api, &fleet.central.token, fleet).await?;
    }
    print_summary(fleet, dir, logs, &central_api, &central_quic, &site_apis);
    let mut traffic = traffic.map(|t| {
        if let Some(record) = &t.record {
            println!(
                "traffic simulator running; Ctrl-C stops it and writes {}",
                record.display()
            );
        }
        let targets = fleet
            .sites
            .iter()
            .zip(&site_apis)
            .map(|(s, api)| crate::traffic::Target::new(s, api.clone()))
            .collect();
        crate::traffic::spawn(targets, t)
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DevError::Io {
            path: PathBuf::from("SIGTERM handler"),
            source: e,
        })?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                println!("\nCtrl-C received");
                stop_traffic(traffic.take()).await;
                return Ok(());
            }
            _ = term.recv() => {
                println!("SIGTERM received");
                stop_traffic(traffic.take()).await;
                return Ok(());
            }
            _ = tick.tick() => {
                // The simulator stops on its own only when its record is full.
                if traffic.as_ref().is_some_and(|t| t.is_finished()) {
                    stop_traffic(traffic.take()).await;
                }
                // A process that dies is reported, not cascaded: the rest of the fleet keeps
                // running, which is exactly what a site does when central goes away. The
                // operator restarts it by hand with the command from fleet.json.
                procs.retain_mut(|p| {
                    let Some(status) = p.exited() else { return true };
                    eprintln!(
                        "{} exited ({status}); the rest of the fleet keeps running. Last lines of {}:\n{}\n\
                         restart it with: {}",
                        p.name,
                        p.log.display(),
                        p.tail(),
                        restart_hint(fleet, &p.name, &central_quic),
                    );
                    false
                });
            }
        }
    }
}

/// Stops `dev up`'s traffic simulator (it prints its summary and writes its record); its
/// failure is reported, not fatal: the fleet still stops cleanly.
async fn stop_traffic(traffic: Option<crate::traffic::Running>) {
    if let Some(t) = traffic
        && let Err(e) = t.stop().await
    {
        eprintln!("traffic simulator: {e}");
    }
}

/// The shell command that restarts fleet member `name` where the rest of the fleet expects it.
fn restart_hint(fleet: &Fleet, name: &str, central_quic: &str) -> String {
    let quote = |args: &[String]| {
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if name == "central" {
        return quote(&fleet.central.command);
    }
    match fleet.sites.iter().find(|s| s.id == name) {
        Some(s) => format!(
            "OUTPOST_SYNC__CENTRAL_ADDR={central_quic} {}",
            quote(&s.command)
        ),
        None => String::from("(unknown fleet member)"),
    }
}

/// The demo catalogue: customers (one on credit hold), list prices with customer-specific
/// prices for one customer, and ATP for every SKU at every site.
pub fn demo_catalogue(sites: &[String]) -> (Value, Value, Value) {
    let customers = json!([
        {"id": "C-ACME", "name": "Acme Industrial", "credit_limit": "50000.00", "on_hold": false},
        {"id": "C-BETA", "name": "Beta Machining", "credit_limit": "20000.00", "on_hold": false},
        {"id": "C-GAMMA", "name": "Gamma Fabrication", "credit_limit": "10000.00", "on_hold": true},
    ]);
    let prices = json!([
        {"sku": "BOLT-M8", "customer": null, "unit_price": "0.12", "currency": "EUR"},
        {"sku": "NUT-M8", "customer": null, "unit_price": "0.05", "currency": "EUR"},
        {"sku": "GEAR-12T", "customer": null, "unit_price": "14.50", "currency": "EUR"},
        {"sku": "MOTOR-2KW", "customer": null, "unit_price": "389.00", "currency": "EUR"},
        {"sku": "BOLT-M8", "customer": "C-ACME", "unit_price": "0.10", "currency": "EUR"},
        {"sku": "MOTOR-2KW", "customer": "C-ACME", "unit_price": "359.00", "currency": "EUR"},
    ]);
    let skus = [
        ("BOLT-M8", 5000),
        ("NUT-M8", 8000),
        ("GEAR-12T", 120),
        ("MOTOR-2KW", 12),
    ];
    let atp: Vec<Value> = sites
        .iter()
        .enumerate()
        .flat_map(|(i, site)| {
            skus.iter().map(move |(sku, base)| {
                json!({"sku": sku, "site": site, "available": base / (i as i64 + 1)})
            })
        })
        .collect();
    (customers, prices, Value::Array(atp))
}

async fn seed_catalogue(api: &str, token: &str, fleet: &Fleet) -> Result<(), DevError> {
    let seed_err = |e: reqwest::Error| DevError::Seed(e.to_string());
    let client = reqwest::Client::builder()
        .timeout(SEED_REQUEST_TIMEOUT)
        .build()
        .map_err(seed_err)?;
    let rev: Value = client
        .get(format!("{api}/v1/master/revision"))
        .bearer_auth(token)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(seed_err)?
        .json()
        .await
        .map_err(seed_err)?;
    if rev["revision"].as_u64() != Some(0) {
        println!(
            "central already holds master data (revision {}); not seeding",
            rev["revision"]
        );
        return Ok(());
    }
    let sites: Vec<String> = fleet.sites.iter().map(|s| s.id.clone()).collect();
    let (customers, prices, atp) = demo_catalogue(&sites);
    for (path, body) in [("customers", customers), ("prices", prices), ("atp", atp)] {
        let resp = client
            .put(format!("{api}/v1/master/{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .map_err(seed_err)?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(DevError::Seed(format!(
                "PUT /v1/master/{path}: {status} {text}"
            )));
        }
    }
    println!("seeded the demo catalogue (customers, prices, ATP)");
    Ok(())
}

fn print_summary(
    fleet: &Fleet,
    dir: &Path,
    logs: &Path,
    central_api: &str,
    central_quic: &str,
    site_apis: &[String],
) {
    let certs = dir.join("certs");
    let mut s = String::new();
    let _ = writeln!(s, "\nOutpost dev fleet is up ({})", dir.display());
    let _ = writeln!(s, "\ncentral");
    let _ = writeln!(s, "  api     {central_api}");
    // The token rides in the fragment, which the browser keeps to itself: it never reaches
    // central's request line or logs. The page moves it to sessionStorage.
    let _ = writeln!(
        s,
        "  dashboard {central_api}/#token={}",
        fleet.central.token
    );
    let _ = writeln!(s, "  quic    {central_quic}");
    let _ = writeln!(s, "  token   {} (admin)", fleet.central.token);
    let _ = writeln!(s, "  erp     {} (erp role)", fleet.central.erp_token);
    let _ = writeln!(s, "  config  {}", dir.join("central.toml").display());
    let _ = writeln!(s, "  data    {}", fleet.central.data_dir);
    let _ = writeln!(s, "  log     {}", logs.join("central.log").display());
    let _ = writeln!(
        s,
        "  cert    {}  key {}",
        certs.join("central.pem").display(),
        certs.join("central.key").display()
    );
    let _ = writeln!(
        s,
        "  ca      {}  key {}",
        certs.join("ca.pem").display(),
        certs.join("ca.key").display()
    );
    for (site, api) in fleet.sites.iter().zip(site_apis) {
        let _ = writeln!(s, "\n{}", site.id);
        let _ = writeln!(s, "  api     {api}");
        for (role, token) in &site.tokens {
            let _ = writeln!(s, "  token   {token}  ({role})");
        }
        let _ = writeln!(
            s,
            "  config  {}",
            dir.join(format!("{}.toml", site.id)).display()
        );
        let _ = writeln!(s, "  data    {}", site.data_dir);
        let _ = writeln!(
            s,
            "  log     {}",
            logs.join(format!("{}.log", site.id)).display()
        );
        let _ = writeln!(
            s,
            "  cert    {}  key {}",
            certs.join(format!("{}.pem", site.id)).display(),
            certs.join(format!("{}.key", site.id)).display()
        );
    }
    let ct = &fleet.central.token;
    let _ = writeln!(s, "\nTry:");
    let _ = writeln!(
        s,
        "  curl -s -H 'Authorization: Bearer {ct}' {central_api}/v1/sites"
    );
    let _ = writeln!(
        s,
        "  curl -s -H 'Authorization: Bearer {ct}' '{central_api}/v1/events?after=0&limit=100'"
    );
    if let Some(site) = fleet.sites.first() {
        let _ = writeln!(
            s,
            "  curl -s -H 'Authorization: Bearer {ct}' '{central_api}/v1/ledger?site={}'",
            site.id
        );
    }
    let _ = writeln!(
        s,
        "  {} exceptions list --fleet {}",
        fleet
            .central
            .command
            .first()
            .map(String::as_str)
            .unwrap_or("outpost-central"),
        dir.join(FLEET_FILE).display()
    );
    if let (Some(site), Some(api)) = (fleet.sites.first(), site_apis.first()) {
        let role = |r: &str| site.tokens.get(r).unwrap_or(&site.token).clone();
        let st = role("reader");
        let _ = writeln!(
            s,
            "  curl -s -H 'Authorization: Bearer {st}' {api}/v1/atp/BOLT-M8"
        );
        let _ = writeln!(
            s,
            "  curl -s -H 'Authorization: Bearer {st}' '{api}/v1/prices/BOLT-M8?customer=C-ACME'"
        );
        let st = role("order-entry");
        let _ = writeln!(
            s,
            "  curl -s -X POST -H 'Authorization: Bearer {st}' -H 'Idempotency-Key: demo-1' \
             -H 'Content-Type: application/json' \
             -d '{{\"customer_id\":\"C-ACME\",\"lines\":[{{\"sku\":\"BOLT-M8\",\"qty\":40}}]}}' {api}/v1/orders"
        );
        let st = role("scanner");
        let _ = writeln!(
            s,
            "  curl -s -X POST -H 'Authorization: Bearer {st}' -H 'Content-Type: application/json' \
             -d '{{\"event_id\":\"scan-1\",\"milestone\":\"picked\",\"scanner_id\":\"scanner-7\",\"at\":\"2026-01-01T08:00:00Z\"}}' \
             {api}/v1/shipments/SH-1/milestones"
        );
    }
    let _ = writeln!(
        s,
        "  curl -s -X PUT -H 'Authorization: Bearer {ct}' -H 'Content-Type: application/json' \
         -d '[{{\"sku\":\"BOLT-M8\",\"customer\":null,\"unit_price\":\"0.11\",\"currency\":\"EUR\"}}]' \
         {central_api}/v1/master/prices"
    );
    let _ = writeln!(s, "\nPress Ctrl-C to stop the fleet.");
    println!("{s}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names_split_plants_and_warehouses() {
        assert_eq!(site_names(3), vec!["plant-1", "plant-2", "warehouse-1"]);
        assert_eq!(site_names(1), vec!["plant-1"]);
        assert_eq!(
            site_names(6),
            vec![
                "plant-1",
                "plant-2",
                "plant-3",
                "plant-4",
                "warehouse-1",
                "warehouse-2"
            ]
        );
        for n in 1..=MAX_DEV_SITES {
            let names = site_names(n);
            assert_eq!(names.len(), n);
            for id in &names {
                outpost_protocol::identity::validate_site_id(id).unwrap();
            }
        }
    }

    #[test]
    fn tokens_are_64_hex_chars_and_differ() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_token());
    }

    #[test]
    fn demo_catalogue_is_valid_master_data() {
        let sites = site_names(3);
        let (customers, prices, atp) = demo_catalogue(&sites);
        assert!(
            customers
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["on_hold"] == true)
        );
        assert!(
            prices
                .as_array()
                .unwrap()
                .iter()
                .any(|p| !p["customer"].is_null())
        );
        assert_eq!(atp.as_array().unwrap().len(), 4 * sites.len());
    }

    #[test]
    fn init_writes_a_loadable_central_config_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            dir: dir.path().to_path_buf(),
            sites: 3,
            base_port: 7600,
            force: false,
            agent_bin: Some(PathBuf::from("/bin/true")),
        };
        let fleet = init(&opts).unwrap();
        assert_eq!(fleet.central.api, "http://127.0.0.1:7600");
        assert_eq!(fleet.central.quic, "127.0.0.1:7601");
        let apis: Vec<&str> = fleet.sites.iter().map(|s| s.api.as_str()).collect();
        assert_eq!(
            apis,
            vec![
                "http://127.0.0.1:7602",
                "http://127.0.0.1:7603",
                "http://127.0.0.1:7604"
            ]
        );
        assert_eq!(fleet.sites[0].command[0], "/bin/true");
        let cfg = outpost_central::config::CentralConfig::load_with_env(
            &dir.path().join("central.toml"),
            Some(Default::default()),
        )
        .unwrap();
        assert_eq!(cfg.api.token, None);
        let clients = outpost_central::api::Clients::from_config(&cfg.api.tokens);
        let admin = clients.authenticate(&fleet.central.token).unwrap();
        assert_eq!(
            (&*admin.name, admin.role),
            ("admin", outpost_central::config::Role::Admin)
        );
        let erp = clients.authenticate(&fleet.central.erp_token).unwrap();
        assert_eq!(
            (&*erp.name, erp.role),
            ("erp", outpost_central::config::Role::Erp)
        );
        let text = std::fs::read_to_string(dir.path().join("central.toml")).unwrap();
        assert!(!text.contains(&fleet.central.token) && !text.contains(&fleet.central.erp_token));
        assert_eq!(
            cfg.allowance,
            outpost_central::config::AllowanceConfig::default()
        );
        assert_eq!(load_fleet(dir.path()).unwrap(), fleet);
        let agent_cfg: toml::Table = std::fs::read_to_string(dir.path().join("warehouse-1.toml"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(agent_cfg["site_id"].as_str(), Some("warehouse-1"));
        assert_eq!(
            agent_cfg["sync"]["central_addr"].as_str(),
            Some("127.0.0.1:7601")
        );
        assert!(matches!(init(&opts), Err(DevError::FleetExists(_))));
        init(&InitOptions {
            force: true,
            ..opts
        })
        .unwrap();
    }
}
