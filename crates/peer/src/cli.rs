//! What every Caisey binary shares on its command line: the `--home` and `--listen` flags, the
//! log subscriber, duration parsing, and the documented exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
}

impl NodeArgs {
    pub fn options(&self, app: &str) -> anyhow::Result<NodeOptions> {
        Ok(NodeOptions { home: Home::new(self.home.clone(), app)?, listen: self.listen })
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
    let default = format!("{default},{QUIET}");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// Parses durations like `60s`, `10m`, `24h`.
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
