//! `outpost-agent`: the site agent's command line (run, check-config). Thin: parses flags, sets up
//! tracing and calls into the library.

use std::io::IsTerminal;
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
    /// Load and validate a config file; print "config OK" or every problem; exit 0 or 1.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
            init_tracing(cli.log_json);
            let settings = match outpost_agent::config::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
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
