//! Starting the home's node in the background, the one platform-specific piece of the client:
//! the `caisey` binary runs `up --idle-exit …` detached from the terminal that started it (its
//! own process group, so a Ctrl-C there does not reach it), with no stdin and its log in the
//! home. On Windows, a detached process (`DETACHED_PROCESS`) slots in here.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use caisey_peer::home::Home;
use caisey_peer::node::NodeOptions;

/// Environment variable: how long a node started on demand stays up without clients.
pub const IDLE_ENV: &str = "CAISEY_IDLE_EXIT";
/// The default for [`IDLE_ENV`].
pub const DEFAULT_IDLE_EXIT: &str = "10m";

/// Starts `exe up` for `opts`' home in the background.
pub fn start_node(exe: &Path, opts: &NodeOptions) -> Result<Child> {
    let idle = std::env::var(IDLE_ENV).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| DEFAULT_IDLE_EXIT.into());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.home.log_path())
        .with_context(|| format!("opening {}", opts.home.log_path().display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--home")
        .arg(opts.home.dir())
        .arg("--listen")
        .arg(opts.listen.to_string())
        .args(["up", "--idle-exit", &idle])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    detach(&mut cmd);
    cmd.spawn().with_context(|| format!("starting {} up", exe.display()))
}

#[cfg(unix)]
fn detach(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
}

#[cfg(not(unix))]
fn detach(_cmd: &mut Command) {}

/// The last error line a node started in the background logged, if any.
pub fn last_error(home: &Home) -> Option<String> {
    let log = std::fs::read_to_string(home.log_path()).ok()?;
    log.lines().rev().find_map(|l| l.strip_prefix("error: ")).map(str::to_string)
}
