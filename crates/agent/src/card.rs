//! The machine card: what technicians see about an endpoint before asking it anything.

use caisey_doc::fleet::{MachineCard, Software, Vitals};
use sysinfo::System;

/// Reads the card from the running system.
pub fn read(now: u64) -> MachineCard {
    let mut sys = System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    let cpus = sys.cpus();
    MachineCard {
        hostname: System::host_name().unwrap_or_default().into(),
        os_name: System::name().unwrap_or_else(|| std::env::consts::OS.to_string()).into(),
        os_version: System::os_version().unwrap_or_default().into(),
        kernel: System::kernel_version().unwrap_or_default().into(),
        uptime_secs: System::uptime(),
        cpu: cpus.first().map(|c| c.brand().trim().to_string()).unwrap_or_default().into(),
        cpu_count: cpus.len() as u32,
        memory_total: sys.total_memory(),
        memory_used: sys.used_memory(),
        at: now,
        software: installed_software(),
    }
}

/// The machine's live state for its heartbeat: uptime, memory, the system disk, who is logged
/// in, its addresses. Cheap enough for every heartbeat.
pub fn vitals() -> Vitals {
    let mut sys = System::new();
    sys.refresh_memory();
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let root = disks.list().iter().find(|d| d.mount_point() == std::path::Path::new(SYSTEM_MOUNT));
    let (disk_total, disk_free) = root.map(|d| (d.total_space(), d.available_space())).unwrap_or_default();
    let networks = sysinfo::Networks::new_with_refreshed_list();
    let mut ips: Vec<String> = networks
        .list()
        .values()
        .flat_map(|n| n.ip_networks())
        .filter(|ip| !ip.addr.is_loopback() && !ip.addr.is_unspecified())
        .map(|ip| ip.addr.to_string())
        .collect();
    ips.sort();
    ips.dedup();
    ips.truncate(MAX_LISTED);
    Vitals {
        uptime_secs: System::uptime(),
        memory_used: sys.used_memory(),
        memory_total: sys.total_memory(),
        disk_used: disk_total.saturating_sub(disk_free),
        disk_total,
        users: crate::sessions::logged_in(),
        ips,
    }
}

/// The mount holding the system.
const SYSTEM_MOUNT: &str = if cfg!(windows) { "C:\\" } else { "/" };

/// At most this many users or addresses go in the vitals.
pub const MAX_LISTED: usize = 32;

/// At most this many packages go on the card (it travels in every technician's copy).
const MAX_SOFTWARE: usize = 5000;

/// Installed packages from dpkg's database, where there is one; empty elsewhere.
fn installed_software() -> Vec<Software> {
    std::fs::read_to_string("/var/lib/dpkg/status").map(|s| parse_dpkg_status(&s)).unwrap_or_default()
}

/// Whether a package is something a technician asks about (an application or service), rather
/// than a library, headers, documentation or data that comes with one. Keeps the card small: on
/// a typical Debian machine about a quarter of the packages.
fn is_application(name: &str) -> bool {
    const PARTS: [&str; 5] = ["lib", "fonts-", "python3-", "perl-", "x11-"];
    const SUFFIXES: [&str; 5] = ["-dev", "-doc", "-data", "-common", "-dbg"];
    !PARTS.iter().any(|p| name.starts_with(p)) && !SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The installed applications in a dpkg status file (stanzas of `Field: value` lines).
fn parse_dpkg_status(status: &str) -> Vec<Software> {
    let mut out = Vec::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')).map(str::trim))
        };
        if field("Status").is_some_and(|s| s.ends_with(" installed"))
            && let (Some(name), Some(version)) = (field("Package"), field("Version"))
            && is_application(name)
        {
            out.push(Software { name: name.into(), version: version.into() });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.truncate(MAX_SOFTWARE);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn dpkg_status_lists_installed_applications_only() {
        let status = "Package: curl\nStatus: install ok installed\nVersion: 7.88\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: libc6\nStatus: install ok installed\nVersion: 2.36\n\n\
                      Package: bash\nStatus: install ok installed\nPriority: required\nVersion: 5.2\n";
        let got: Vec<(caisey_doc::text::PeerText, caisey_doc::text::PeerText)> =
            super::parse_dpkg_status(status).into_iter().map(|s| (s.name, s.version)).collect();
        assert_eq!(got, vec![("bash".into(), "5.2".into()), ("curl".into(), "7.88".into())]);
    }
}
