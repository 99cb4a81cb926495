//! `caisey service install` and `uninstall`: the technician's node under the user's own service
//! manager (a systemd user unit), so it runs from login without a terminal, serves the org on a
//! LAN with no relay, and clients never wait for it to start.

use std::path::Path;

use anyhow::Result;
use caisey_peer::service::{self, Root, Scope, Unit, UnitHead};

/// The unit's name: `caisey.service`.
pub const SERVICE: &str = "caisey";

/// Installs and starts the unit running `binary up` for the home and config in `env` (only what
/// was set on the command line or in the environment; the rest the node finds as a command
/// would). Returns what was done.
pub fn install(binary: &Path, env: &[(&str, String)]) -> Result<Vec<String>> {
    service::install(&unit(binary, env), &Root::new(None)?)
}

/// Stops and removes the unit (the home is untouched).
pub fn uninstall() -> Result<Vec<String>> {
    service::uninstall(Scope::User, SERVICE, &Root::new(None)?)
}

fn unit(binary: &Path, env: &[(&str, String)]) -> Unit {
    let head = UnitHead {
        written_by: "caisey service install",
        removed_by: "caisey service uninstall",
        description: "Caisey technician node: keeps your sessions in sync and serves your org's machines",
        exec: format!("{} up", binary.display()),
        env: env.to_vec(),
        after_network: false,
    };
    let text = head.render(
        "# A user's own unit cannot take much away; these cost the node nothing.
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
SystemCallArchitectures=native
",
        "default.target",
    );
    Unit { name: SERVICE.to_string(), scope: Scope::User, text }
}
