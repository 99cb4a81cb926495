//! The machine card: what technicians see about an endpoint before asking it anything.

use caisey_doc::fleet::MachineCard;
use sysinfo::System;

/// Reads the card from the running system.
pub fn read(now: u64) -> MachineCard {
    let mut sys = System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    let cpus = sys.cpus();
    MachineCard {
        hostname: System::host_name().unwrap_or_default(),
        os_name: System::name().unwrap_or_else(|| std::env::consts::OS.to_string()),
        os_version: System::os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        uptime_secs: System::uptime(),
        cpu: cpus.first().map(|c| c.brand().trim().to_string()).unwrap_or_default(),
        cpu_count: cpus.len() as u32,
        memory_total: sys.total_memory(),
        memory_used: sys.used_memory(),
        at: now,
    }
}
