//! `caisey-relay install` and `uninstall`: the relay as a service on a small VM.
//!
//! It writes `/etc/caisey/relay.toml` (home, listen address, HTTP address for transcripts) and a
//! systemd unit that runs the relay as a throwaway user with almost nothing of the machine
//! (see the unit's comments), keeps its home in `/var/lib/caisey-relay`, and starts it.
//! Installing again rewrites both and restarts it; the relay's key, ports and store are kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use caisey_peer::service::{self, Root, Scope, Unit, UnitHead, toml_string};

pub const SERVICE: &str = "caisey-relay";
pub const CONFIG: &str = "/etc/caisey/relay.toml";
pub const HOME: &str = "/var/lib/caisey-relay";
/// The port an installed relay listens on (UDP, QUIC) when none is given: members keep its
/// address from the ticket, so it must not change at each start.
pub const DEFAULT_PORT: u16 = 4433;

#[derive(Debug, Clone)]
pub struct Install {
    pub listen: SocketAddr,
    pub http: Option<SocketAddr>,
    pub public_url: Option<String>,
    pub root: Root,
    pub binary: PathBuf,
}

/// Installs and (on a live system with systemd) starts the relay; returns what was done.
pub fn install(req: &Install) -> Result<Vec<String>> {
    if req.root.is_live() && !service::is_root() {
        bail!("installing the relay as a service needs root: run `sudo caisey-relay install`");
    }
    let mut listen = req.listen;
    if listen.port() == 0 {
        listen.set_port(DEFAULT_PORT);
    }
    let config = req.root.at(CONFIG);
    service::write_file(&config, &config_text(listen, req.http, req.public_url.as_deref()), 0o644)?;
    let mut done = vec![format!("wrote {}", config.display())];
    done.extend(service::install(&unit(&req.binary), &req.root)?);
    done.push(format!(
        "members reach it on UDP port {} (open it in the firewall); its ticket, for `caisey relay add`: \
         `sudo caisey-relay ticket`",
        listen.port()
    ));
    Ok(done)
}

/// Stops and removes the service and its config; the home is kept unless `delete_store`.
pub fn uninstall(root: &Root, delete_store: bool) -> Result<Vec<String>> {
    if root.is_live() && !service::is_root() {
        bail!("removing the relay service needs root: run `sudo caisey-relay uninstall`");
    }
    let mut done = service::uninstall(Scope::System, SERVICE, root)?;
    let config = root.at(CONFIG);
    if service::remove_file(&config, &root.at("/etc"))? {
        done.push(format!("removed {}", config.display()));
    }
    // systemd keeps a DynamicUser's state in /var/lib/private, with a link in /var/lib.
    for dir in [HOME, "/var/lib/private/caisey-relay"] {
        let path = root.at(dir);
        if path.symlink_metadata().is_err() {
            continue;
        }
        if delete_store {
            service::remove_file(&path, &root.at("/"))?;
            done.push(format!("removed {}", path.display()));
        } else if !path.is_symlink() {
            done.push(format!("kept {} (the relay's key and store); delete it to forget them", path.display()));
        }
    }
    Ok(done)
}

fn config_text(listen: SocketAddr, http: Option<SocketAddr>, public_url: Option<&str>) -> String {
    let mut text = format!(
        "# Written by `caisey-relay install`. Each setting is also a flag and an environment\n\
         # variable (`caisey-relay config show`). Restart the service after a change.\n\
         home = {}\n\
         listen = {}\n",
        toml_string(HOME),
        toml_string(&listen.to_string())
    );
    if http.is_some() || public_url.is_some() {
        text.push_str("\n[run]\n");
    }
    if let Some(http) = http {
        text.push_str(&format!("http = {}\n", toml_string(&http.to_string())));
    }
    if let Some(url) = public_url {
        text.push_str(&format!("public_url = {}\n", toml_string(url)));
    }
    text
}

/// The relay's unit: it needs the network and its own home, nothing else.
fn unit(binary: &Path) -> Unit {
    let head = UnitHead {
        written_by: "caisey-relay install",
        removed_by: "caisey-relay uninstall",
        description: "Caisey relay: stores and forwards an org's sessions, and helps its members through NAT",
        exec: format!("{} run", binary.display()),
        env: vec![("CAISEY_CONFIG", CONFIG.to_string())],
        after_network: true,
    };
    let text = head.render(
        "# A user made up for the service at each start: the relay owns nothing else on the machine.
# It implies a read-only system (ProtectSystem=strict), a private /tmp and no privilege gain.
DynamicUser=yes
StateDirectory=caisey-relay
UMask=0077
# Ports below 1024 (a relay on 443, say) and nothing else of root.
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE
# No home directories, devices, kernel knobs, modules, logs, clock or hostname.
ProtectHome=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# IP for members, netlink to watch its own addresses, Unix for the local socket.
RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
# The system calls of an ordinary service; any other fails with EPERM rather than killing it.
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

",
        "multi-user.target",
    );
    Unit { name: SERVICE.to_string(), scope: Scope::System, text }
}
