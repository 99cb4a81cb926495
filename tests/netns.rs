//! Networks of our own for tests: Linux network namespaces joined by veth pairs and bridges,
//! with NAT routers (iptables MASQUERADE plus the usual home-router WAN firewall) where a test
//! wants machines behind NAT. Addresses are assigned only inside these namespaces. Everything a
//! [`Net`] made is deleted when it is dropped, also when the test fails.
//!
//! Needs root, `ip` (iproute2) and `iptables`; CI runs as root and installs iptables. Without
//! them the test fails saying so: it never passes silently.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `ip ARGS`, panicking with its error output if it fails.
fn ip(args: &[&str]) {
    run("ip", args);
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("this test builds network namespaces and needs `{program}` (run as root; CI installs it): {e}")
    });
    assert!(
        out.status.success(),
        "`{program} {}` failed (this test needs root to build network namespaces): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` inside namespace `ns`.
pub fn in_ns(ns: &str, program: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    ip(&all);
}

/// What `program ARGS` prints inside namespace `ns`.
pub fn output_in(ns: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} in {ns}: {e}"));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A set of namespaces, links and bridges, deleted on drop.
pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
    ports: usize,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Net {
    /// An empty network; names are unique to this process and test.
    pub fn new() -> Net {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        Net { prefix: format!("cz{}x{n}", std::process::id() % 100_000), namespaces: vec![], ports: 0 }
    }

    /// The full name of namespace `name` of this network (what `ip netns exec` takes).
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A namespace with loopback up.
    pub fn host(&mut self, name: &str) -> String {
        let ns = self.ns(name);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        in_ns(&ns, "ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// A bridge in a namespace of its own: a network segment to plug hosts into.
    pub fn segment(&mut self, name: &str) -> String {
        let ns = self.host(name);
        in_ns(&ns, "ip", &["link", "add", "br0", "type", "bridge"]);
        in_ns(&ns, "ip", &["link", "set", "br0", "up"]);
        ns
    }

    /// Plugs namespace `host` into `segment` as interface `dev`, with address `cidr`.
    pub fn plug(&mut self, host: &str, dev: &str, segment: &str, cidr: &str) {
        self.ports += 1;
        let port = format!("port{}", self.ports);
        ip(&["link", "add", dev, "netns", host, "type", "veth", "peer", "name", &port, "netns", segment]);
        in_ns(segment, "ip", &["link", "set", &port, "master", "br0"]);
        in_ns(segment, "ip", &["link", "set", &port, "up"]);
        in_ns(host, "ip", &["addr", "add", cidr, "dev", dev]);
        in_ns(host, "ip", &["link", "set", dev, "up"]);
    }

    /// A default route in `host` via `gateway`.
    pub fn route(&mut self, host: &str, gateway: &str) {
        in_ns(host, "ip", &["route", "add", "default", "via", gateway]);
    }

    /// Makes `router` a home router: forwards, masquerades what leaves by `wan`, and drops new
    /// connections arriving on `wan` addressed to itself (a home router's WAN firewall; without
    /// it a peer's early probe can claim the mapped port and defeat hole punching).
    pub fn nat(&mut self, router: &str, wan: &str) {
        in_ns(router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        in_ns(router, "iptables", &["-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"]);
        in_ns(router, "iptables", &["-A", "INPUT", "-i", wan, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"]);
    }

    /// Drops UDP that `router` forwards to or from `peer` (no direct path through it).
    pub fn block_udp(&mut self, router: &str, peer: &str) {
        in_ns(router, "iptables", &["-I", "FORWARD", "-p", "udp", "-d", peer, "-j", "DROP"]);
        in_ns(router, "iptables", &["-I", "FORWARD", "-p", "udp", "-s", peer, "-j", "DROP"]);
    }

    /// Replaces `host`'s address on `dev` (a laptop given a new DHCP lease).
    pub fn readdress(&mut self, host: &str, dev: &str, old: &str, new: &str) {
        in_ns(host, "ip", &["addr", "del", old, "dev", dev]);
        in_ns(host, "ip", &["addr", "add", new, "dev", dev]);
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Killing what runs inside first: a namespace with processes in it lingers.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "pids", ns]).output().map(|out| {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
