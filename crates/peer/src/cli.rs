//! What every Caisey binary shares on its command line: the `--home`, `--listen` and `--config`
//! flags, the `config`, `completions` and `man` subcommands, the log subscriber, duration
//! parsing, and the documented exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{CONFIG_ENV, Layers};
use crate::home::{HOME_ENV, Home};
use crate::node::NodeOptions;

/// Environment variable for `--listen`.
pub const LISTEN_ENV: &str = "CAISEY_LISTEN";

/// Exit code: the remote command failed or was denied.
pub const EXIT_REMOTE_FAILED: u8 = 1;
/// Exit code: usage or local error.
pub const EXIT_LOCAL_ERROR: u8 = 2;

/// Flags every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// This node's home: key, store, socket. Several nodes can run on one machine with several homes.
    #[arg(long, global = true, env = HOME_ENV, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Address the node's endpoint binds and advertises (tests use 127.0.0.1:0).
    #[arg(long, global = true, env = LISTEN_ENV, value_name = "ADDR", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// Settings file (TOML). Flags and environment variables win over it.
    #[arg(long, global = true, env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl NodeArgs {
    pub fn options(&self, app: &str) -> anyhow::Result<NodeOptions> {
        Ok(NodeOptions { home: Home::new(self.home.clone(), app)?, listen: self.listen })
    }
}

/// Subcommands every binary has, about the binary itself.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Tools {
    /// The effective settings, and where each came from: flag, environment, config file, default.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script, e.g. `caisey completions bash > /etc/bash_completion.d/caisey`.
    Completions { shell: clap_complete::Shell },
    /// Print the man page, or with --out write one page per subcommand into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print every setting with its value and source.
    Show {
        #[arg(long)]
        json: bool,
    },
}

impl Tools {
    /// Runs the subcommand for the binary `C` parsed into `layers`.
    pub fn run<C: clap::CommandFactory>(&self, layers: &Layers) -> ExitCode {
        match self.run_inner::<C>(layers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_LOCAL_ERROR)
            }
        }
    }

    fn run_inner<C: clap::CommandFactory>(&self, layers: &Layers) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut command = C::command();
        let name = command.get_name().to_string();
        match self {
            Tools::Config(ConfigCommand::Show { json: true }) => {
                println!("{}", serde_json::to_string_pretty(&layers.effective())?)
            }
            Tools::Config(ConfigCommand::Show { json: false }) => print!("{}", layers.render()),
            Tools::Completions { shell } => {
                let mut out = std::io::stdout().lock();
                clap_complete::generate(*shell, &mut command, &name, &mut out);
                out.flush()?;
            }
            Tools::Man { out: None } => {
                let mut out = std::io::stdout().lock();
                clap_mangen::Man::new(command).render(&mut out)?;
                out.flush()?;
            }
            Tools::Man { out: Some(dir) } => {
                std::fs::create_dir_all(dir)?;
                clap_mangen::generate_to(command, dir)
                    .map_err(|e| anyhow::anyhow!("writing man pages into {}: {e}", dir.display()))?;
            }
        }
        Ok(())
    }
}

/// What is not logged by default: iroh's reports of connections ending as they do.
const QUIET: &str = "iroh::socket::transports::relay=off,iroh_relay::server::client=error";

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings, and info for daemons).
pub fn init_tracing() {
    init_tracing_with("warn,caisey_agent=info,caisey_relay=info")
}

/// Like [`init_tracing`] with another default filter.
pub fn init_tracing_with(default: &str) {
    // iroh logs `relay_recv_channel closed` as an error each time an endpoint with a relay
    // server closes (every short-lived command), and a relay server warns each time a client
    // goes without a TLS goodbye: noise to a user, so off unless asked for.
    // A `RUST_LOG` that says nothing of iroh keeps them quiet too.
    let filter = match std::env::var("RUST_LOG") {
        Ok(asked) if !asked.trim().is_empty() => {
            if asked.contains("iroh") {
                asked
            } else {
                format!("{asked},{QUIET}")
            }
        }
        _ => format!("{default},{QUIET}"),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},{QUIET}")));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// Parses durations like `60s`, `10m`, `24h`.
/// A time (ms since the epoch) as people read it in listings: `2026-11-30 09:00:05Z`.
pub fn format_time(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string().replace('T', " ")
}

/// A byte count for people: `512 B`, `3.0 KiB`, `200.0 MiB`, `1.5 GiB`.
pub fn format_size(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 10m, 24h)"))
}

/// A reader that goes away (`caisey machines | head`) ends the command quietly, as it ends any
/// Unix tool: printing to a closed pipe would otherwise panic with a backtrace. Exits 0: what
/// the reader wanted, it got.
pub fn quiet_on_closed_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if message.is_some_and(|m| m.starts_with("failed printing to std") && m.contains("Broken pipe")) {
            std::process::exit(0);
        }
        report(info);
    }));
}

/// Runs a binary's async main on a fresh runtime, printing any error once, as one line.
pub fn run_main<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(f: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the runtime: {e}");
            return ExitCode::from(EXIT_LOCAL_ERROR);
        }
    };
    match rt.block_on(f) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_LOCAL_ERROR)
        }
    }
}

/// Standard output for what a command streams (an export, `show --json`): a reader that goes
/// away (`caisey export … | head`) ends the command quietly with exit 0, as a failed print does
/// (see [`quiet_on_closed_pipe`]). Other write errors are returned as they are.
#[derive(Debug, Default)]
pub struct Stdout;

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write(buf).inspect_err(exit_if_reader_gone)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush().inspect_err(exit_if_reader_gone)
    }
}

fn exit_if_reader_gone(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
}

/// Resolves when the process is asked to stop: Ctrl-C, or SIGTERM from a service manager.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
