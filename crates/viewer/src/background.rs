//! Starting the home's node in the background, the one platform-specific piece of the client:
//! the `caisey` binary runs `up --idle-exit …` detached from the terminal that started it (its
//! own process group, so a Ctrl-C there does not reach it), with no stdin and its log in the
//! home. On Windows, a detached process (`DETACHED_PROCESS`) slots in here.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use caisey_peer::home::Home;
use caisey_peer::node::NodeOptions;

/// Environment variable: how long a node started on demand stays up without clients.
pub const IDLE_ENV: &str = "CAISEY_IDLE_EXIT";
/// The default for [`IDLE_ENV`].
pub const DEFAULT_IDLE_EXIT: &str = "10m";

/// How a client starts the home's node when none runs: this `caisey` binary, stopping after
/// `idle_exit` with no client.
#[derive(Debug, Clone)]
pub struct Starter {
    pub exe: PathBuf,
    pub idle_exit: Duration,
}

impl Starter {
    /// The running `caisey` binary.
    pub fn this_binary(idle_exit: Duration) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the caisey binary to start the node with")?;
        Ok(Self { exe, idle_exit })
    }
}

/// A log longer than this is moved aside (to `node.log.1`) when the next node starts.
const LOG_KEEP: u64 = 4 * 1024 * 1024;

/// A node started in the background, and where its log began.
#[derive(Debug)]
pub struct Started {
    child: Child,
    log: std::path::PathBuf,
    log_from: u64,
}

impl Started {
    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last error line this node (not an earlier one) logged.
    pub fn last_error(&self) -> Option<String> {
        use std::io::{Read, Seek};
        let mut file = std::fs::File::open(&self.log).ok()?;
        file.seek(std::io::SeekFrom::Start(self.log_from)).ok()?;
        let mut text = String::new();
        file.take(LOG_KEEP).read_to_string(&mut text).ok()?;
        text.lines().rev().find_map(|l| l.strip_prefix("error: ")).map(str::to_string)
    }
}

/// Starts `caisey up` for `opts`' home in the background.
pub fn start_node(starter: &Starter, opts: &NodeOptions) -> Result<Started> {
    let idle = humantime::format_duration(starter.idle_exit).to_string();
    let path = opts.home.log_path();
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_KEEP) {
        let _ = std::fs::rename(&path, path.with_extension("log.1"));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let log_from = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new(&starter.exe);
    cmd.arg("--home")
        .arg(opts.home.dir())
        .arg("--listen")
        .arg(opts.listen.to_string())
        .args(["up", "--idle-exit", &idle])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    detach(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("starting {} up", starter.exe.display()))?;
    Ok(Started { child, log: path, log_from })
}

#[cfg(unix)]
fn detach(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
}

#[cfg(not(unix))]
fn detach(_cmd: &mut Command) {}

/// The pid a node of `home` wrote, if one runs.
pub fn pid_of(home: &Home) -> Option<u32> {
    std::fs::read_to_string(home.dir().join("node.pid")).ok().and_then(|p| p.trim().parse().ok())
}

/// Asks the node with `pid` to stop (SIGTERM), for when it cannot be asked over its socket
/// (it speaks another version of the API).
pub fn stop_pid(pid: u32) -> Result<()> {
    let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().context("running kill")?;
    if !status.success() {
        anyhow::bail!("could not signal the node (pid {pid})");
    }
    Ok(())
}
