//! How an approved command's processes are started and stopped on this platform, so that what
//! the session says of a command is what happened to it.
//!
//! The choice: a command never outlives its agent unsupervised. (The alternative, a supervisor
//! that keeps the command and its output safe across an agent crash, would let a command run
//! on while nobody can see or stop it; a diagnostic can simply be asked again.)
//! - It runs in a process group of its own, so a timeout kills the command *and everything it
//!   started*, not just its shell.
//! - On Linux it runs under `setpriv --pdeathsig TERM -- timeout -s KILL SECS`: when the agent
//!   dies (even by kill -9) the kernel signals `timeout`, which passes the signal to the whole
//!   group; and `timeout` kills the group at the deadline by itself, so the timeout holds while
//!   no agent is there to enforce it.
//! - A command that ignores that signal survives until the agent restarts: the agent records
//!   each running group ([`Running`]) and, at restart, kills what is left of it and says so in
//!   the session.
//!
//! Windows (a job object) and macOS slot in here.

use std::time::Duration;

use caisey_doc::session::Shell;
use serde::{Deserialize, Serialize};

/// How long after the agent's own deadline the backstop kills the command: the agent normally
/// does it first and records the timeout.
const BACKSTOP_AFTER: Duration = Duration::from_secs(2);

/// The program and arguments that run `script` in `shell` (without the process supervision).
pub fn shell_command(shell: Shell, script: &str) -> (String, Vec<String>) {
    match shell {
        Shell::Sh => ("sh".into(), vec!["-c".into(), script.into()]),
        Shell::Bash => ("bash".into(), vec!["-c".into(), script.into()]),
        Shell::Pwsh => {
            ("pwsh".into(), vec!["-NoProfile".into(), "-NonInteractive".into(), "-Command".into(), script.into()])
        }
        Shell::Cmd => ("cmd".into(), vec!["/C".into(), script.into()]),
    }
}

/// The program and arguments that run `script` in `shell` supervised as the module says: dies
/// with the agent, killed at `timeout` even without it.
pub fn supervised_command(shell: Shell, script: &str, timeout: Duration) -> (String, Vec<String>) {
    let (program, args) = shell_command(shell, script);
    // A shell that is not installed fails to start as itself (and is reported so), not as a
    // program `timeout` could not find.
    if !cfg!(target_os = "linux") || !tools_present() || !on_path(&program) {
        return (program, args);
    }
    let secs = (timeout + BACKSTOP_AFTER).as_secs().max(1);
    let mut wrapped: Vec<String> =
        ["--pdeathsig", "TERM", "--", "timeout", "-s", "KILL", &format!("{secs}s"), &program]
            .iter()
            .map(|s| s.to_string())
            .collect();
    wrapped.extend(args);
    ("setpriv".into(), wrapped)
}

/// Whether `setpriv` (util-linux) and `timeout` (coreutils) are there; asked once.
fn tools_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        let found = ["setpriv", "timeout"].iter().all(|tool| on_path(tool));
        if !found {
            tracing::warn!(
                "setpriv or timeout is missing: commands will not die with the agent (they are killed at its restart)"
            );
        }
        found
    })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A running command's process group, as recorded while it runs: enough to find it again after
/// the agent restarts, and to tell it from an unrelated process that got the same id since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub group: u32,
    /// When the group's leader started, in the kernel's ticks since boot (`None` where the
    /// platform does not say).
    pub started: Option<u64>,
}

impl Running {
    /// The group led by `pid`, just spawned.
    pub fn of(pid: u32) -> Running {
        Running { group: pid, started: start_ticks(pid) }
    }

    /// Kills what is left of the group, if its leader is still the process recorded. Whether
    /// anything was killed.
    pub fn kill_survivors(&self) -> bool {
        if self.started.is_none() || start_ticks(self.group) != self.started {
            return false;
        }
        self.kill()
    }

    /// Kills the whole group now.
    pub fn kill(&self) -> bool {
        let Some(pid) = rustix::process::Pid::from_raw(self.group as i32) else { return false };
        rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).is_ok()
    }
}

/// When process `pid` started (field 22 of `/proc/PID/stat`), on Linux.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_its_start_time_and_a_stale_record_kills_nothing() {
        let me = Running::of(std::process::id());
        assert!(me.started.is_some(), "this process's start time is readable");
        let stale = Running { group: std::process::id(), started: me.started.map(|t| t + 1) };
        assert!(!stale.kill_survivors(), "a recorded group whose leader is another process is left alone");
        assert!(!Running { group: 0, started: None }.kill_survivors());
    }
}
