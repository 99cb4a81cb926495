//! `caisey-agent install` and `uninstall`: the agent as a machine service, the consent window
//! in every graphical login, and the group of users who may approve.
//!
//! What an install leaves on the machine (each path under `--root` when one is given):
//! - `/etc/caisey/agent.toml`: the settings every `caisey-agent` command on the machine reads
//!   (its home, its consent group);
//! - `/var/lib/caisey-agent`: the home, enrolled with the token;
//! - `/etc/systemd/system/caisey-agent.service`: the daemon, enabled and started;
//! - `/etc/xdg/autostart/caisey-agent-prompt.desktop`: the consent window at each login;
//! - the group `caisey-consent`, whose members may see, approve and deny requests.
//!
//! Installing again is safe: a machine already enrolled keeps its enrollment (the token is not
//! needed again) and gets fresh files. Uninstalling removes all of it, asking before the store.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use caisey_doc::token::InviteToken;
use caisey_peer::accounts;
use caisey_peer::node::{Node, NodeOptions};
use caisey_peer::service::{self, Root, Scope, Unit, UnitHead, toml_string};

/// The unit's name, and the name of the home and config under `/var/lib` and `/etc/caisey`.
pub const SERVICE: &str = "caisey-agent";
/// The group whose members may approve.
pub const CONSENT_GROUP: &str = "caisey-consent";
/// The system-wide settings file.
pub const CONFIG: &str = "/etc/caisey/agent.toml";
/// The home of an installed agent.
pub const HOME: &str = "/var/lib/caisey-agent";
/// The consent window's autostart entry.
pub const AUTOSTART: &str = "/etc/xdg/autostart/caisey-agent-prompt.desktop";

/// What `install` was asked.
#[derive(Debug, Clone)]
pub struct Install {
    pub token: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<String>,
    /// Users who may approve (added to the consent group).
    pub users: Vec<String>,
    pub root: Root,
    /// The binary the unit runs (default: this one).
    pub binary: PathBuf,
    /// Where the node listens while enrolling.
    pub listen: std::net::SocketAddr,
}

/// Installs; returns what was done, a line an item.
pub async fn install(req: Install) -> Result<Vec<String>> {
    if req.root.is_live() && !service::is_root() {
        bail!("installing the agent as a service needs root: run `sudo caisey-agent install TOKEN`");
    }
    let mut done = Vec::new();
    // What can fail for local reasons comes before the token is spent.
    if accounts::ensure_group(&req.root, CONSENT_GROUP)? {
        done.push(format!("created group {CONSENT_GROUP}"));
    }
    for user in &req.users {
        accounts::add_to_group(&req.root, user, CONSENT_GROUP).with_context(|| format!("letting {user:?} approve"))?;
        done.push(format!("{user} may approve requests (group {CONSENT_GROUP})"));
    }
    // A running agent holds the store: stop it while its enrollment is checked, and bring it
    // back if the install goes no further (a refused token leaves the machine as it was).
    let stopped = service::stop(Scope::System, SERVICE, &req.root);
    let enrolled = async {
        let home = caisey_peer::home::Home::new(Some(req.root.at(HOME)), SERVICE)?;
        let node = Node::start(NodeOptions { home, listen: req.listen }).await?;
        let enrolled = enroll_once(&node, &req).await;
        node.shutdown().await;
        enrolled
    }
    .await;
    match enrolled {
        Ok(line) => done.push(line),
        Err(e) => {
            if stopped {
                service::start(Scope::System, SERVICE, &req.root)?;
            }
            return Err(e);
        }
    }
    let config = req.root.at(CONFIG);
    service::write_file(&config, &config_text(), 0o644)?;
    done.push(format!("wrote {}", config.display()));
    let autostart = req.root.at(AUTOSTART);
    service::write_file(&autostart, &autostart_text(&req.binary), 0o644)?;
    done.push(format!("wrote {}", autostart.display()));
    done.extend(service::install(&unit(&req.binary), &req.root)?);
    Ok(done)
}

/// Enrolls the home with the token, unless it already is (then the token must be for its org).
async fn enroll_once(node: &Node, req: &Install) -> Result<String> {
    let token = match &req.token {
        Some(t) => Some(InviteToken::decode(t, caisey_peer::now_ms())?),
        None => None,
    };
    if node.fleet_doc().await?.is_some() {
        let fleet = node.fleet().await?;
        if let Some(token) = &token
            && fleet.org_key != Some(token.cert.org_key)
        {
            bail!(
                "this machine is already enrolled in org {:?}; the token is for another org: run `caisey-agent uninstall` first",
                fleet.org_name
            );
        }
        let name = fleet.members.get(&node.id()).map(|m| m.name.clone()).unwrap_or_default();
        return Ok(format!("already enrolled as {name:?} in org {:?}; kept", fleet.org_name));
    }
    let Some(token) = token else {
        bail!("this machine is not enrolled yet: give the token from `caisey invite agent`")
    };
    if token.cert.role != caisey_doc::fleet::Role::Agent {
        bail!("this token enrolls a {}; use `caisey join` for technicians", token.cert.role);
    }
    let name = req.name.clone().unwrap_or_else(|| crate::card::read(0).hostname.into_unescaped_string());
    let fleet = caisey_peer::enroll::join(node, &token, &name, &req.groups).await?;
    // The org's record is the truth: a name in the token wins over the one asked for.
    let name = fleet.members.get(&node.id()).map(|m| m.name.clone()).unwrap_or_else(|| name.into());
    Ok(format!("enrolled as {name:?} in org {:?}", fleet.org_name))
}

/// What `uninstall` was asked.
#[derive(Debug, Clone)]
pub struct Uninstall {
    pub root: Root,
    /// Delete the home (the enrollment and every session on this machine) too.
    pub delete_store: bool,
}

/// Removes everything `install` made, the home only if asked; returns what was done.
pub fn uninstall(req: &Uninstall) -> Result<Vec<String>> {
    if req.root.is_live() && !service::is_root() {
        bail!("removing the agent service needs root: run `sudo caisey-agent uninstall`");
    }
    let mut done = service::uninstall(Scope::System, SERVICE, &req.root)?;
    for file in [AUTOSTART, CONFIG] {
        let path = req.root.at(file);
        // Up to /etc: `/etc/caisey` and `/etc/xdg/autostart` go if they are left empty.
        if service::remove_file(&path, &req.root.at("/etc"))? {
            done.push(format!("removed {}", path.display()));
        }
    }
    if accounts::remove_group(&req.root, CONSENT_GROUP)? {
        done.push(format!("removed group {CONSENT_GROUP}"));
    }
    let home = req.root.at(HOME);
    if home.exists() {
        if req.delete_store {
            service::remove_file(&home, &req.root.at("/"))?;
            done.push(format!("removed {} (enrollment and sessions)", home.display()));
        } else {
            done.push(format!("kept {} (enrollment and sessions); delete it to forget them", home.display()));
        }
    }
    Ok(done)
}

fn config_text() -> String {
    format!(
        "# Written by `caisey-agent install`; every `caisey-agent` command on this machine reads it.\n\
         # Each setting is also a flag and an environment variable, which win over this file\n\
         # (`caisey-agent config show` says which value came from where).\n\
         home = {}\n\n\
         [run]\n\
         # Members of this group may see, approve and deny requests (the consent window).\n\
         consent_group = {}\n",
        toml_string(HOME),
        toml_string(CONSENT_GROUP)
    )
}

fn autostart_text(binary: &Path) -> String {
    format!(
        "[Desktop Entry]\n\
         Type=Application\n\
         Name=Caisey consent window\n\
         Comment=Approve or deny the diagnostics a technician asks to run on this machine\n\
         Exec={} --config {CONFIG} prompt\n\
         Terminal=false\n\
         NoDisplay=true\n\
         X-GNOME-Autostart-enabled=true\n",
        desktop_quote(&binary.display().to_string())
    )
}

/// A desktop entry's Exec argument, quoted when it needs to be.
fn desktop_quote(arg: &str) -> String {
    if arg.chars().all(|c| c.is_ascii_alphanumeric() || "/-_.+".contains(c)) {
        arg.to_string()
    } else {
        format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\"").replace('`', "\\`").replace('$', "\\$"))
    }
}

/// The agent's systemd unit. It runs as root: diagnostics read the whole machine (disks, logs,
/// every user's processes). Hardening is what leaves that intact; see each setting's comment.
fn unit(binary: &Path) -> Unit {
    let head = UnitHead {
        written_by: "caisey-agent install",
        removed_by: "caisey-agent uninstall",
        description: "Caisey agent: runs the diagnostics technicians ask for, once this machine's user approves",
        exec: format!("{} run", binary.display()),
        env: vec![("CAISEY_CONFIG", CONFIG.to_string())],
        after_network: true,
    };
    let text = head.render(
        "# Stopping the agent stops the commands it runs, with it: a session never shows a command as
# interrupted while it runs on unseen.
KillMode=control-group
TimeoutStopSec=20s
# The home (key, store), 0710 so the consent group can reach the socket and nothing else.
StateDirectory=caisey-agent
StateDirectoryMode=0710
# Files the agent makes (store, key, spooled output) are its own alone.
UMask=0077
# Hardening that diagnostics do not notice: no privilege gained through setuid files or
# capabilities beyond root's own, no setuid files made, no realtime scheduling, no personality
# tricks, native system calls only, the cgroup tree read-only.
NoNewPrivileges=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
ProtectControlGroups=yes
# Left out on purpose, because a diagnostic needs what they take away: ProtectSystem and
# ProtectHome (reading configs, logs and home directories), PrivateTmp (what is in /tmp),
# PrivateDevices and ProtectClock (disks and SMART data; ProtectClock also limits devices),
# ProtectKernelLogs (dmesg), ProtectKernelModules (lsmod, modinfo), ProtectKernelTunables
# (sysctl), RestrictNamespaces (containers), MemoryDenyWriteExecute (JIT runtimes such as
# PowerShell or node).
",
        "multi-user.target",
    );
    Unit { name: SERVICE.to_string(), scope: Scope::System, text }
}
