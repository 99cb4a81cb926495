//! The machine's groups, the one platform-specific piece of deciding who may approve: a group
//! made for an installed agent, its users added, the group removed again. On Linux that is
//! shadow-utils (`groupadd`, `usermod`, `groupdel`), which also edit a [`Root`] other than `/`
//! (`--prefix`). macOS (`dseditgroup`) and Windows (local groups) slot in here.

use anyhow::{Context, Result, bail};

use crate::service::Root;

/// Creates the system group `name` unless it exists; whether it made it.
pub fn ensure_group(root: &Root, name: &str) -> Result<bool> {
    if group_exists(root, name) {
        return Ok(false);
    }
    run_tool(root, "groupadd", &["--system", name])?;
    Ok(true)
}

/// Adds `user` to `group`.
pub fn add_to_group(root: &Root, user: &str, group: &str) -> Result<()> {
    run_tool(root, "usermod", &["-aG", group, user])
}

/// Removes the group `name` if it exists; whether it did.
pub fn remove_group(root: &Root, name: &str) -> Result<bool> {
    if !group_exists(root, name) {
        return Ok(false);
    }
    run_tool(root, "groupdel", &[name])?;
    Ok(true)
}

fn group_exists(root: &Root, name: &str) -> bool {
    if root.is_live() {
        return crate::local::socket::group_id(name).is_ok();
    }
    std::fs::read_to_string(root.at("/etc/group"))
        .is_ok_and(|text| text.lines().any(|l| l.split(':').next() == Some(name)))
}

/// Runs a shadow-utils tool, on the root's own user database.
fn run_tool(root: &Root, tool: &str, args: &[&str]) -> Result<()> {
    let mut cmd = std::process::Command::new(tool);
    if !root.is_live() {
        cmd.arg("--prefix").arg(root.at("/"));
    }
    let out = cmd.args(args).output().with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
