//! `outpost-central` command line: parses flags, sets up tracing and calls into the library (the
//! server) or into the client tools declared here (operator CLI, dev fleet, traffic simulator).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_central::certs::{self, DEFAULT_CENTRAL_NAME};
use outpost_central::config::{CentralConfig, LoadConfigError};

use cli::{CliError, Remote};
use dev::{DEFAULT_BASE_PORT, DEFAULT_SITES, InitOptions, UpOptions};
use traffic::TrafficOptions;

// The clients of the server: they use the library (`outpost_central`) and it never uses them.
mod cli;
mod dev;
mod fleet_file;
mod traffic;

#[derive(Parser)]
#[command(
    name = "outpost-central",
    version,
    about = "Outpost central coordinator"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run central (HTTP API + QUIC sync server) until SIGINT/SIGTERM.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Load and validate a config file; print "config OK" or every problem (exit 1).
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the configuration reference (Markdown): every key of the config file with its
    /// default, unit, allowed values, environment variable and meaning.
    ConfigReference,
    /// Create the fleet CA and certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCmd,
    },
    /// Development fleet on this machine.
    Dev {
        #[command(subcommand)]
        command: DevCmd,
    },
    /// The exception queue: orders held for an operator (talks to central's HTTP API).
    Exceptions {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: ExceptionsCmd,
    },
    /// The fleet's sites, and revoking or reinstating one (talks to central's HTTP API; admin
    /// token needed for revoke and reinstate).
    Sites {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: SitesCmd,
    },
    /// Fleet health: every site's state, backlog, lag and reasons, and the alerts (talks to
    /// central's HTTP API). Exit code 2 when central cannot be reached or refuses.
    Fleet {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: FleetCmd,
    },
    /// Disaster-recovery drills: cut sites off on purpose (isolation, central outage, central
    /// restored from a backup), then report how they recovered (talks to central's HTTP API;
    /// admin token needed for start and abort). `start --wait` exits 0 when the drill passed,
    /// 1 when it failed; exit code 2 when central cannot be reached or refuses.
    Drill {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: cli::drill::DrillCmd,
    },
    /// Print the SHA-256 of a bearer token read from stdin (what [[api.tokens]] holds), or with
    /// --generate make a new token and print it with its config entry.
    HashToken {
        /// Generate a new random token instead of reading one.
        #[arg(long)]
        generate: bool,
        /// The client's name in the printed entry (with --generate).
        #[arg(long, default_value = "erp")]
        name: String,
        /// The client's role in the printed entry (with --generate).
        #[arg(long, default_value = "erp", value_parser = ["erp", "admin"])]
        role: String,
    },
    /// A site's reconciliation reports, newest first (talks to central's HTTP API).
    Reconciliations {
        #[command(flatten)]
        remote: RemoteArgs,
        site: String,
        /// Most reports shown.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Take a consistent backup of central's store while it keeps serving, and download it to
    /// FILE (talks to central's HTTP API; admin token needed). Central also keeps the newest
    /// backups in its data directory's backups/.
    Backup {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Where to write the backup (via FILE.tmp, renamed once complete).
        #[arg(long)]
        out: PathBuf,
    },
    /// Put a backup in place as the store of an empty data directory, under a new incarnation,
    /// and print what happens next (central must not be running on that directory).
    Restore {
        /// The backup file (from `outpost-central backup`).
        #[arg(long)]
        from: PathBuf,
        /// Central's config: the store goes into its data_dir.
        #[arg(
            long,
            required_unless_present = "data_dir",
            conflicts_with = "data_dir"
        )]
        config: Option<PathBuf>,
        /// The data directory (instead of --config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Where central's API is: `--api URL --token T`, or `--fleet DIR/fleet.json`.
#[derive(clap::Args)]
struct RemoteArgs {
    /// Central's API base URL, e.g. http://127.0.0.1:7600.
    #[arg(long, global = true, env = "OUTPOST_CENTRAL_API")]
    api: Option<String>,
    /// Central's API bearer token.
    #[arg(
        long,
        global = true,
        env = "OUTPOST_CENTRAL_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// The dev fleet's fleet.json (or its directory): central's address and token are read
    /// from it (and from central's ready.json when its port is 0).
    #[arg(long, global = true)]
    fleet: Option<PathBuf>,
    /// Print central's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum ExceptionsCmd {
    /// List exceptions (open ones by default), oldest first.
    List {
        #[arg(long, default_value = "open", value_parser = ["open", "resolved", "all"])]
        status: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one exception with the data the site used.
    Show { id: u64 },
    /// Accept the order as is (it enters the feed) or reject it (its units are released and the
    /// site is told).
    Resolve {
        id: u64,
        #[arg(long, conflicts_with = "reject", required_unless_present = "reject")]
        accept: bool,
        #[arg(long)]
        reject: bool,
        /// Why (required with --reject; the site shows it).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Re-run the checks against current master data; the order enters the feed if it passes.
    Replay { id: u64 },
}

#[derive(Subcommand)]
enum SitesCmd {
    /// Every site: connected, last seen, acked seq, clock offset, revoked.
    List,
    /// Refuse the site from now on and close its live connection (its agent keeps its outbox).
    Revoke {
        site: String,
        /// Why (shown in the site list and in the agent's log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Admit a revoked site again; its agent reconnects at its next attempt.
    Reinstate { site: String },
    /// Issue a site's certificate and key with the fleet CA and write them, with the CA and
    /// where central is, into one enrolment bundle (mode 0600) for `outpost-agent enroll`.
    /// Works on files only (no --api/--token needed).
    Add {
        site: String,
        /// Directory holding the fleet CA (ca.pem, ca.key).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Central's QUIC address as the site reaches it, host:port; several addresses of the
        /// same central (over the WAN and over a backup line, say) separated by commas, in the
        /// order the agent tries them.
        #[arg(long)]
        central_addr: String,
        /// The name in central's certificate.
        #[arg(long, default_value = DEFAULT_CENTRAL_NAME)]
        central_name: String,
        /// Validity of the site certificate in days, from now.
        #[arg(long, default_value_t = certs::LEAF_VALIDITY_DAYS)]
        days: i64,
        /// The bundle file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing bundle file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum FleetCmd {
    /// One line per site (state, outbox backlog, oldest unsynced, master lag, last seen,
    /// version, reasons) and a summary; --json prints central's answer.
    Status,
    /// Reprint the status every --interval seconds until Ctrl-C (or --count times).
    Watch {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
        /// Stop after this many tables (for scripts).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// The newest alerts (site state changes), oldest first.
    Alerts {
        /// Most alerts shown.
        #[arg(long, default_value_t = cli::fleet::DEFAULT_ALERTS_LIMIT,
              value_parser = clap::value_parser!(u64).range(1..=cli::fleet::MAX_ALERTS_LIMIT))]
        limit: u64,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create the fleet CA: OUT/ca.pem and OUT/ca.key.
    Ca {
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue central's server certificate: OUT/central.pem and OUT/central.key.
    Central {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = DEFAULT_CENTRAL_NAME)]
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Issue a site's client certificate: OUT/<site>.pem and OUT/<site>.key.
    Site {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Write certificates, configs, tokens, data dirs and fleet.json into DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = DEFAULT_SITES)]
        sites: usize,
        /// Central API on P, QUIC on P+1, site i's API on P+2+i; 0 makes every port ephemeral.
        #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
        base_port: u16,
        /// Overwrite an existing fleet.
        #[arg(long)]
        force: bool,
        /// The agent binary (default: outpost-agent next to this executable).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
    },
    /// Start central and every agent of DIR (running init first if needed), seed a demo
    /// catalogue, and stop them all on Ctrl-C.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = DEFAULT_SITES)]
        sites: usize,
        #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
        base_port: u16,
        /// Do not seed the demo catalogue.
        #[arg(long)]
        no_seed: bool,
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Also run the traffic simulator against the fleet (default rates), recording every
        /// acknowledged write in DIR/traffic.json.
        #[arg(long)]
        traffic: bool,
    },
    /// Drive realistic load at the sites' local APIs (orders with Idempotency-Key retries,
    /// shipment milestones in order, ATP and price reads), print live rates and a summary, and
    /// record every acknowledged write.
    Traffic {
        /// The fleet's fleet.json (or its directory).
        #[arg(long)]
        fleet: PathBuf,
        /// Sites to drive, comma-separated (default: every site of the fleet).
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// Orders per second per site.
        #[arg(long, default_value_t = 5.0)]
        orders_per_sec: f64,
        /// Shipment milestones per second per site.
        #[arg(long, default_value_t = 10.0)]
        milestones_per_sec: f64,
        /// ATP and price reads per second per site.
        #[arg(long, default_value_t = 20.0)]
        reads_per_sec: f64,
        /// Percent of acknowledged orders sent again with the same Idempotency-Key.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
        retry_pct: u8,
        /// How long to run (30s, 5m, 1h); 0 runs until Ctrl-C or SIGTERM.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Write every acknowledged write (order key, order id, event id, seq) to this JSON file.
        #[arg(long)]
        record: Option<PathBuf>,
        /// No live line on stderr.
        #[arg(long)]
        quiet: bool,
        /// Seed of the simulated clients' choices (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// SKUs to order and read, comma-separated (default: the demo catalogue's).
        #[arg(long, value_delimiter = ',')]
        skus: Vec<String>,
        /// Customers to order for, comma-separated (default: the demo catalogue's).
        #[arg(long, value_delimiter = ',')]
        customers: Vec<String>,
    },
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only on a terminal: `dev up` sends each process's output to a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        // Span fields (a session's site, a request's path) go into each line's `span`/`spans`
        // objects and event fields (`trace_id`, `seq`) to the top level, for one grep per trace.
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init();
    } else {
        builder.init();
    }
}

/// Whether `serve`'s config asks for JSON logs (`[log] format`). Read before tracing starts; a
/// config that does not load is reported by `serve` itself.
fn serve_logs_json(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Serve { config } => CentralConfig::load(config)
            .is_ok_and(|c| c.log.format == outpost_central::config::LogFormat::Json),
        _ => false,
    }
}

fn load_config(path: &std::path::Path) -> Result<CentralConfig, ExitCode> {
    match CentralConfig::load(path) {
        Ok(cfg) => Ok(cfg),
        Err(LoadConfigError::Invalid { path, problems }) => {
            eprintln!("config {} is invalid:", path.display());
            for p in problems {
                eprintln!("  {p}");
            }
            Err(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{e}");
            Err(ExitCode::FAILURE)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json || serve_logs_json(&cli.command));
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn remote(args: &RemoteArgs) -> Result<Remote, CliError> {
    cli::resolve_remote(args.api.clone(), args.token.clone(), args.fleet.as_deref())
}

/// Prints a CLI call's answer (JSON, or `table` of it) or its error; the exit code says which.
fn report(
    result: Result<serde_json::Value, CliError>,
    json: bool,
    table: fn(&serde_json::Value) -> String,
) -> ExitCode {
    match result {
        Ok(v) if json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(v) => {
            print!("{}", table(&v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

async fn exceptions(remote_args: RemoteArgs, command: ExceptionsCmd) -> ExitCode {
    let r = match remote(&remote_args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let json = remote_args.json;
    match command {
        ExceptionsCmd::List { status, limit } => {
            let mut path = format!("/v1/exceptions?status={status}");
            if let Some(l) = limit {
                path.push_str(&format!("&limit={l}"));
            }
            report(
                cli::call(&r, &path, None).await,
                json,
                cli::exceptions_table,
            )
        }
        ExceptionsCmd::Show { id } => report(
            cli::call(&r, &format!("/v1/exceptions/{id}"), None).await,
            true,
            pretty,
        ),
        ExceptionsCmd::Resolve {
            id,
            accept,
            reject: _,
            reason,
        } => {
            let body = serde_json::json!({
                "action": if accept { "accept" } else { "reject" },
                "reason": reason,
            });
            let path = format!("/v1/exceptions/{id}/resolve");
            report(cli::call(&r, &path, Some(body)).await, json, pretty)
        }
        ExceptionsCmd::Replay { id } => {
            let path = format!("/v1/exceptions/{id}/replay");
            let body = serde_json::json!({});
            report(cli::call(&r, &path, Some(body)).await, json, pretty)
        }
    }
}

async fn sites(remote_args: RemoteArgs, command: SitesCmd) -> ExitCode {
    if let SitesCmd::Add {
        site,
        ca_dir,
        central_addr,
        central_name,
        days,
        out,
        force,
    } = command
    {
        use cli::sites::{AddSiteOptions, add, summary};
        let opts = AddSiteOptions {
            site,
            ca_dir,
            central_addr,
            central_name,
            days,
            out,
            force,
        };
        return match add(&opts) {
            Ok(a) => {
                print!("{}", summary(&a));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: sites add: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let r = match remote(&remote_args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let json = remote_args.json;
    match command {
        SitesCmd::List => report(
            cli::call(&r, "/v1/sites", None).await,
            json,
            cli::sites_table,
        ),
        SitesCmd::Revoke { site, reason } => {
            let path = format!("/v1/sites/{site}/revoke");
            let body = serde_json::json!({ "reason": reason.unwrap_or_default() });
            report(cli::call(&r, &path, Some(body)).await, json, pretty)
        }
        SitesCmd::Reinstate { site } => {
            let path = format!("/v1/sites/{site}/revoke");
            let result = cli::call_method(&r, reqwest::Method::DELETE, &path, None).await;
            report(result, json, pretty)
        }
        SitesCmd::Add { .. } => unreachable!("handled above without central's API"),
    }
}

async fn fleet(remote_args: RemoteArgs, command: FleetCmd) -> ExitCode {
    let result = match remote(&remote_args) {
        Ok(r) => {
            let json = remote_args.json;
            let out = &mut std::io::stdout();
            match command {
                FleetCmd::Status => cli::fleet::status(&r, json, out).await,
                FleetCmd::Watch { interval, count } => {
                    let every = std::time::Duration::from_secs(interval);
                    cli::fleet::watch(&r, json, every, count, out).await
                }
                FleetCmd::Alerts { limit } => cli::fleet::alerts(&r, limit, json, out).await,
            }
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `drill ...`: exit 0, or 1 when `start --wait` saw the drill fail, or 2 when central cannot
/// be reached or refuses (or the wait ran out).
async fn drill(remote_args: RemoteArgs, command: cli::drill::DrillCmd) -> ExitCode {
    use cli::drill::Outcome;
    let result = match remote(&remote_args) {
        Ok(r) => cli::drill::run(&r, remote_args.json, command, &mut std::io::stdout()).await,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(Outcome::Done | Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `backup --out FILE`: exit 2 when central cannot be reached or refuses, 1 when the file cannot
/// be written.
async fn backup(remote_args: RemoteArgs, out: &std::path::Path) -> ExitCode {
    use cli::backup::{DownloadError, download, download_summary};
    let r = match remote(&remote_args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match download(&r, out).await {
        Ok(d) => {
            print!("{}", download_summary(&d));
            ExitCode::SUCCESS
        }
        Err(e @ DownloadError::Remote(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hash_token(generate: bool, name: &str, role: &str) -> ExitCode {
    use outpost_central::config::Role;
    let role = if role == "admin" {
        Role::Admin
    } else {
        Role::Erp
    };
    if generate {
        let token = dev::random_token();
        println!("token (give it to the client; central keeps only its hash):\n  {token}\n");
        println!("config entry for central.toml:\n");
        print!("{}", cli::client_toml(name, role, &token));
        return ExitCode::SUCCESS;
    }
    match cli::read_token(std::io::stdin().lock()) {
        Ok(token) => {
            println!("{}", outpost_central::config::sha256_hex(&token));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::ConfigReference => {
            let text = outpost_central::config::reference_markdown();
            std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())
                .context("cannot write the reference")?;
        }
        Cmd::Sites { remote, command } => return Ok(sites(remote, command).await),
        Cmd::HashToken {
            generate,
            name,
            role,
        } => return Ok(hash_token(generate, &name, &role)),
        Cmd::Exceptions { remote, command } => return Ok(exceptions(remote, command).await),
        Cmd::Fleet { remote, command } => return Ok(fleet(remote, command).await),
        Cmd::Drill { remote, command } => return Ok(drill(remote, command).await),
        Cmd::Backup { remote: args, out } => return Ok(backup(args, &out).await),
        Cmd::Restore {
            from,
            config,
            data_dir,
        } => {
            use cli::backup::{restore, restore_summary};
            use outpost_central::backup::STORE_FILE;
            let store_path = match (config, data_dir) {
                (Some(c), _) => match load_config(&c) {
                    Ok(cfg) => cfg.store_path(),
                    Err(code) => return Ok(code),
                },
                (None, Some(d)) => d.join(STORE_FILE),
                (None, None) => unreachable!("clap requires --config or --data-dir"),
            };
            return Ok(match restore(&from, &store_path) {
                Ok(r) => {
                    print!("{}", restore_summary(&from, &r));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            });
        }
        Cmd::Reconciliations {
            remote: args,
            site,
            limit,
        } => {
            let r = match remote(&args) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let mut path = format!("/v1/sites/{site}/reconciliations");
            if let Some(l) = limit {
                path.push_str(&format!("?limit={l}"));
            }
            let result = cli::call(&r, &path, None).await;
            return Ok(report(result, args.json, cli::reconciliations_table));
        }
        Cmd::Serve { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            outpost_central::run::serve(cfg, outpost_central::run::shutdown_signal()).await?;
        }
        Cmd::CheckConfig { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            // The TLS material must load too, or `serve` would fail at start.
            if let Err(e) = outpost_central::quic::server_config(&cfg.quic) {
                eprintln!("config {} is invalid:\n  quic: {e}", config.display());
                return Ok(ExitCode::FAILURE);
            }
            println!("config OK");
        }
        Cmd::Certs { command } => match command {
            CertsCmd::Ca { out, force } => {
                let f = certs::create_ca(&out, force).context("certs ca")?;
                println!("wrote {} and {}", f.cert.display(), f.key.display());
            }
            CertsCmd::Central {
                ca_dir,
                out,
                name,
                force,
            } => {
                let f =
                    certs::issue_central(&ca_dir, &out, &name, force).context("certs central")?;
                println!("wrote {} and {}", f.cert.display(), f.key.display());
            }
            CertsCmd::Site {
                ca_dir,
                site,
                out,
                force,
            } => {
                let f = certs::issue_site(&ca_dir, &site, &out, force).context("certs site")?;
                println!("wrote {} and {}", f.cert.display(), f.key.display());
            }
        },
        Cmd::Dev { command } => match command {
            DevCmd::Init {
                dir,
                sites,
                base_port,
                force,
                agent_bin,
            } => {
                let opts = InitOptions {
                    dir,
                    sites,
                    base_port,
                    force,
                    agent_bin,
                };
                let fleet = dev::init(&opts).context("dev init")?;
                let dir = std::path::absolute(&opts.dir)?;
                println!(
                    "wrote {} (central + {} sites: {})",
                    dir.join(fleet_file::FLEET_FILE).display(),
                    fleet.sites.len(),
                    fleet
                        .sites
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if base_port == 0 {
                    println!(
                        "ports are ephemeral (0): the real ones are in each data_dir/ready.json"
                    );
                }
            }
            DevCmd::Up {
                dir,
                sites,
                base_port,
                no_seed,
                agent_bin,
                traffic,
            } => {
                let opts = UpOptions {
                    init: InitOptions {
                        dir,
                        sites,
                        base_port,
                        force: false,
                        agent_bin,
                    },
                    seed: !no_seed,
                    traffic: traffic.then(TrafficOptions::default),
                };
                dev::up(&opts).await.context("dev up")?;
            }
            DevCmd::Traffic {
                fleet,
                sites,
                orders_per_sec,
                milestones_per_sec,
                reads_per_sec,
                retry_pct,
                duration,
                record,
                quiet,
                seed,
                skus,
                customers,
            } => {
                let targets = traffic::targets_from_fleet(&fleet, &sites).context("dev traffic")?;
                let defaults = TrafficOptions::default();
                let opts = TrafficOptions {
                    orders_per_sec,
                    milestones_per_sec,
                    reads_per_sec,
                    retry_pct,
                    duration: (!duration.is_zero()).then_some(duration),
                    record,
                    live_every: (!quiet).then_some(std::time::Duration::from_secs(1)),
                    seed,
                    skus: if skus.is_empty() {
                        defaults.skus.clone()
                    } else {
                        skus
                    },
                    customers: if customers.is_empty() {
                        defaults.customers.clone()
                    } else {
                        customers
                    },
                    ..defaults
                };
                let stop = outpost_central::run::shutdown_signal();
                traffic::run(targets, opts, stop)
                    .await
                    .context("dev traffic")?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
