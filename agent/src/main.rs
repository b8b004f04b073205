//! `outpost-agent`: the site agent's command line (run, check-config, hash-token). Thin: parses
//! flags, sets up tracing and calls into the library.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "outpost-agent", version, about = "Outpost site agent")]
struct Cli {
    /// Log as JSON lines (for log shippers) instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// Agent config file (TOML); `OUTPOST_*` environment variables override its keys.
        #[arg(long)]
        config: PathBuf,
    },
    /// Install a site's enrolment bundle (from `outpost-central sites add`): check it, write the
    /// CA, certificate and key into the TLS directory, write a new config or update site_id and
    /// [sync] of the existing one, and validate the result as check-config does. A refusal
    /// changes nothing.
    Enroll {
        /// The bundle file.
        bundle: PathBuf,
        /// The agent's config: written if absent, else only site_id and [sync] are updated.
        #[arg(long, default_value = outpost_agent::enroll::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where ca.pem, site.pem and site.key go (default: `agent` next to the config file).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// The data directory written into a new config (ignored when the config exists).
        #[arg(long, default_value = outpost_agent::enroll::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Enrol even if the config or the store belongs to another site.
        #[arg(long)]
        force: bool,
    },
    /// Load and validate a config file; print "config OK" or every problem; exit 0 or 1.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the configuration reference (Markdown): every key of the config file with its
    /// default, unit, allowed values, environment variable and meaning.
    ConfigReference,
    /// Print the SHA-256 of a bearer token read from standard input (for `[[api.tokens]] sha256`),
    /// or with --generate make a new random token and print it with a ready `[[api.tokens]]` table.
    HashToken {
        /// Make a new random 32-byte token instead of reading one.
        #[arg(long)]
        generate: bool,
        /// Client name for the printed table (with --generate).
        #[arg(long, default_value = "client", requires = "generate")]
        name: String,
        /// Role for the printed table (with --generate): reader, scanner, order-entry or admin.
        #[arg(long, default_value = "reader", requires = "generate")]
        role: String,
    },
}

/// Most bytes read from standard input by `hash-token`: a token is at most `MAX_TOKEN_LEN`;
/// leave room for surrounding whitespace, refuse the rest.
const MAX_STDIN_BYTES: u64 = 4096;

fn hash_token(generate: bool, name: &str, role: &str) -> ExitCode {
    use outpost_agent::config::{self, Role};
    if generate {
        if !config::valid_client_name(name) {
            eprintln!(
                "--name must be 1..={} characters of A-Z a-z 0-9 . _ -",
                config::MAX_CLIENT_NAME_LEN
            );
            return ExitCode::FAILURE;
        }
        let Some(role) = Role::parse(role) else {
            let roles = Role::ALL.map(Role::as_str).join(", ");
            eprintln!("--role must be one of {roles}");
            return ExitCode::FAILURE;
        };
        let token = config::generate_token();
        let hash = config::to_hex(&config::hash_token(token.as_bytes()));
        println!("token: {token}");
        println!();
        println!("# Give the token to the client; put only this table in the agent's config.");
        println!("[[api.tokens]]");
        println!("name = \"{name}\"");
        println!("role = \"{role}\"");
        println!("sha256 = \"{hash}\"");
        return ExitCode::SUCCESS;
    }
    if std::io::stdin().is_terminal() {
        eprintln!("reading the token from standard input; end it with Enter and Ctrl-D");
    }
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut input)
    {
        eprintln!("cannot read the token from standard input: {e}");
        return ExitCode::FAILURE;
    }
    if input.len() as u64 > MAX_STDIN_BYTES {
        eprintln!("standard input is longer than {MAX_STDIN_BYTES} bytes: not a token");
        return ExitCode::FAILURE;
    }
    let Ok(text) = std::str::from_utf8(&input) else {
        eprintln!("the token must be visible ASCII characters");
        return ExitCode::FAILURE;
    };
    let token = text.trim();
    if let Err(e) = config::check_token(token) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    println!("{}", config::to_hex(&config::hash_token(token.as_bytes())));
    ExitCode::SUCCESS
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        // Span fields (the request's `trace_id`, the session's site) go into each line's
        // `span`/`spans` objects and event fields to the top level, so one grep finds a trace.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Enroll {
            bundle,
            config,
            tls_dir,
            data_dir,
            force,
        } => {
            use outpost_agent::enroll::{self, EnrollOptions};
            let opts = EnrollOptions {
                bundle,
                config,
                tls_dir,
                data_dir,
                force,
            };
            match enroll::enroll(&opts) {
                Ok(done) => {
                    print!("{}", enroll::report(&done));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let tail = if e.changed_nothing() {
                        "nothing was changed"
                    } else {
                        "enrolment is incomplete: fix the cause and run it again"
                    };
                    eprintln!("error: enrolment refused: {e}\n({tail})");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ConfigReference => {
            let text = outpost_agent::config::reference_markdown();
            match std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cannot write the reference: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::HashToken {
            generate,
            name,
            role,
        } => hash_token(generate, &name, &role),
        Command::CheckConfig { config } => match outpost_agent::config::load(&config) {
            Ok(_) => {
                println!("config OK");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {} problem(s)", config.display(), e.problems().len());
                for p in e.problems() {
                    eprintln!("  {p}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            // The config is read first because it chooses the log format (`[log] format`).
            let settings = match outpost_agent::config::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    init_tracing(cli.log_json);
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_tracing(
                cli.log_json || settings.log_format == outpost_agent::config::LogFormat::Json,
            );
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(outpost_agent::run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "agent failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
