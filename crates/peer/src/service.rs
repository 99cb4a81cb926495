//! Putting a Caisey process under the platform's service manager: the one platform-specific
//! piece of `install` and `uninstall`. On Linux that is systemd: a unit file written where
//! systemd looks for it, enabled, and started when systemd is running. launchd (a plist in
//! `/Library/LaunchDaemons`) and a Windows service (the service control manager) slot in here
//! behind the same functions.
//!
//! Every path is taken under a [`Root`]: `/` for a real install, another directory to prepare an
//! image (or in tests), the way `systemctl --root` works. Under another root nothing is started.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Whether a unit belongs to the machine (runs as root or its own user, from boot) or to the
/// user who installs it (runs from their login, as them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    System,
    User,
}

/// The filesystem files are written into: `/`, or a directory standing for it.
#[derive(Debug, Clone)]
pub struct Root(PathBuf);

impl Root {
    pub fn new(dir: Option<PathBuf>) -> Result<Self> {
        let dir = dir.unwrap_or_else(|| PathBuf::from("/"));
        Ok(Self(std::path::absolute(&dir).with_context(|| format!("finding {}", dir.display()))?))
    }

    /// Whether this is the running system's own root.
    pub fn is_live(&self) -> bool {
        self.0 == Path::new("/")
    }

    /// `path` (absolute, as the installed system sees it) under this root.
    pub fn at(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        self.0.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// A unit to install: its name (`caisey-agent` for `caisey-agent.service`) and its text.
#[derive(Debug, Clone)]
pub struct Unit {
    pub name: String,
    pub scope: Scope,
    pub text: String,
}

/// What a unit file says, before the service's own settings.
#[derive(Debug, Clone)]
pub struct UnitHead<'a> {
    /// The command that writes it and removes it again (`caisey-agent install`).
    pub written_by: &'a str,
    pub removed_by: &'a str,
    pub description: &'a str,
    /// The command line, and its environment.
    pub exec: String,
    pub env: Vec<(&'a str, String)>,
    /// Whether it waits for the network to be up (a system service that talks to peers).
    pub after_network: bool,
}

impl UnitHead<'_> {
    /// The unit's text: this head, `body` (the service's own settings, one a line, with their
    /// comments), restarts on failure, and the target that starts it.
    pub fn render(&self, body: &str, wanted_by: &str) -> String {
        let network =
            if self.after_network { "Wants=network-online.target\nAfter=network-online.target\n" } else { "" };
        let env: String =
            self.env.iter().map(|(k, v)| format!("Environment=\"{k}={}\"\n", v.replace('"', "\\\""))).collect();
        format!(
            "# Written by `{}`; `{}` removes it.\n[Unit]\nDescription={}\n{network}\n[Service]\nType=exec\n\
             ExecStart={}\n{env}Restart=on-failure\nRestartSec=5s\n{}\n\n[Install]\nWantedBy={wanted_by}\n",
            self.written_by,
            self.removed_by,
            self.description,
            self.exec,
            body.trim_end()
        )
    }
}

/// Where a unit's file goes, as the installed system sees it.
pub fn unit_path(scope: Scope, name: &str) -> Result<PathBuf> {
    Ok(match scope {
        Scope::System => PathBuf::from("/etc/systemd/system").join(format!("{name}.service")),
        Scope::User => directories::BaseDirs::new()
            .context("no home directory to put a user service in (set HOME)")?
            .config_dir()
            .join("systemd/user")
            .join(format!("{name}.service")),
    })
}

/// Writes the unit, enables it, and starts (or restarts) it when its manager is running here.
/// Returns what was done, one line an item, to print.
pub fn install(unit: &Unit, root: &Root) -> Result<Vec<String>> {
    let path = root.at(unit_path(unit.scope, &unit.name)?);
    write_file(&path, &unit.text, 0o644)?;
    let mut done = vec![format!("wrote {}", path.display())];
    let file = format!("{}.service", unit.name);
    let manager = Manager::new(unit.scope, root);
    if manager.live {
        manager.run(&["daemon-reload"])?;
    }
    manager.run(&["enable", &file])?;
    done.push(format!("enabled {file}"));
    if manager.live {
        manager.run(&["restart", &file])?;
        done.push(format!("started {file}"));
    } else if root.is_live() {
        let when = match unit.scope {
            Scope::System => "at next boot",
            Scope::User => "at your next login",
        };
        done.push(format!("{file} starts {when} (systemd is not running here to start it now)"));
    }
    Ok(done)
}

/// Stops, disables and removes the unit; a unit that is not there is fine.
pub fn uninstall(scope: Scope, name: &str, root: &Root) -> Result<Vec<String>> {
    let path = root.at(unit_path(scope, name)?);
    let file = format!("{name}.service");
    let mut done = vec![];
    if !path.exists() {
        return Ok(done);
    }
    let manager = Manager::new(scope, root);
    if manager.live {
        // Stopping a unit that is not running is not an error worth stopping for.
        let _ = manager.run(&["stop", &file]);
        done.push(format!("stopped {file}"));
    }
    manager.run(&["disable", &file])?;
    // Directories made for the unit go with it, up to the manager's own.
    let stop = match scope {
        Scope::System => root.at("/etc"),
        Scope::User => path.parent().and_then(Path::parent).and_then(Path::parent).unwrap_or(&path).to_path_buf(),
    };
    remove_file(&path, &stop)?;
    done.push(format!("removed {}", path.display()));
    if manager.live {
        manager.run(&["daemon-reload"])?;
    }
    Ok(done)
}

/// Stops the unit if its manager runs it (before its store is opened by another process);
/// whether it did, so that [`start`] can bring it back if what follows fails.
pub fn stop(scope: Scope, name: &str, root: &Root) -> bool {
    let manager = Manager::new(scope, root);
    let installed = unit_path(scope, name).is_ok_and(|p| root.at(p).exists());
    manager.live && installed && manager.run(&["stop", &format!("{name}.service")]).is_ok()
}

/// Starts the unit again after [`stop`].
pub fn start(scope: Scope, name: &str, root: &Root) -> Result<()> {
    Manager::new(scope, root).run(&["start", &format!("{name}.service")])
}

/// systemd for one scope of one root, and whether it is running there: the live root, booted
/// with systemd (and for a user unit, with the user's manager reachable). Asked once.
struct Manager<'a> {
    scope: Scope,
    root: &'a Root,
    live: bool,
}

impl<'a> Manager<'a> {
    fn new(scope: Scope, root: &'a Root) -> Self {
        let booted = root.is_live() && Path::new("/run/systemd/system").exists();
        let live = booted
            && match scope {
                Scope::System => true,
                Scope::User => Command::new("systemctl")
                    .args(["--user", "is-system-running"])
                    .output()
                    .is_ok_and(|o| !o.stdout.is_empty()),
            };
        Self { scope, root, live }
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new("systemctl");
        if self.scope == Scope::User {
            cmd.arg("--user");
        }
        if !self.live {
            // Offline: edits the files only, as for an image.
            cmd.arg(format!("--root={}", self.root.0.display()));
        }
        let out = cmd.args(args).output().context("running systemctl (is systemd installed?)")?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            bail!("systemctl {} failed: {}", args.join(" "), why.trim());
        }
        Ok(())
    }
}

/// Writes `text` to `path` with `mode`, creating its directory; atomic (a temporary file moved
/// into place), so a half-written file is never left for a manager to read.
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    let dir = path.parent().context("a file needs a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions on {}", path.display()))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}

/// Removes the file, link or directory tree at `path` if present; then its directory, and that
/// one's, up to `stop`, while empty. Whether there was anything to remove.
pub fn remove_file(path: &Path, stop: &Path) -> Result<bool> {
    let existed = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map(|_| true),
        Ok(_) => std::fs::remove_file(path).map(|_| true),
        Err(_) => Ok(false),
    }
    .with_context(|| format!("removing {}", path.display()))?;
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == stop || !d.starts_with(stop) || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(existed)
}

/// Whether this process runs as root (what a system install needs).
#[cfg(unix)]
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(not(unix))]
pub fn is_root() -> bool {
    false
}

/// Text for a TOML string: quoted, with `"` and `\` escaped.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
