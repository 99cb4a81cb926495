//! Peers across real networks of our own (`caisey_tests::netns`): machines behind Linux NAT
//! routers, a relay on a "public" segment, a shop's LAN with no relay at all. The real binaries
//! run inside the namespaces; nothing here touches an address outside them.

use std::time::{Duration, Instant};

use caisey_tests::netns::{Net, output_in};
use caisey_tests::{World, wait_for};

/// The "internet": a segment 10.77.0.0/24 with the org's relay at 10.77.0.10, running.
fn internet(net: &mut Net, world: &World) -> (String, String, caisey_tests::Running) {
    let public = net.segment("pub");
    let relay = net.host("relay");
    net.plug(&relay, "eth0", &public, "10.77.0.10/24");
    world.place("relay", &relay, "10.77.0.10:0");
    let (running, ticket) = world.start_relay("relay");
    (public, ticket, running)
}

/// A host on its own LAN 192.168.`lan`.0/24 behind a home router whose WAN address on `public`
/// is `wan`. Returns (host namespace, router namespace, host address).
fn behind_nat(net: &mut Net, public: &str, name: &str, wan: &str, lan: u8) -> (String, String, String) {
    let router = net.host(&format!("{name}-router"));
    net.plug(&router, "wan", public, &format!("{wan}/24"));
    let home_lan = net.segment(&format!("{name}-lan"));
    net.plug(&router, "lan", &home_lan, &format!("192.168.{lan}.1/24"));
    let host = net.host(name);
    let ip = format!("192.168.{lan}.10");
    net.plug(&host, "eth0", &home_lan, &format!("{ip}/24"));
    net.route(&host, &format!("192.168.{lan}.1"));
    net.nat(&router, "wan");
    (host, router, ip)
}

/// alice's view of `machine`: its path, from `caisey machines --json`.
fn path_to(world: &World, machine: &str) -> Option<String> {
    let out = world.command("caisey", "alice", &["machines", "--json"]).output().ok()?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let m = list.as_array()?.iter().find(|m| m["name"] == machine)?.clone();
    m["path"].as_str().map(str::to_string)
}

/// alice's node's view of peer `name`: its path, from `caisey status --json`.
fn status_path(world: &World, name: &str) -> Option<String> {
    let out = world.command("caisey", "alice", &["status", "--json"]).output().ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let peer = status["peers"].as_array()?.iter().find(|p| p["name"] == name)?.clone();
    peer["path"].as_str().map(str::to_string)
}

fn enroll_and_start(world: &World, ticket: &str, agent: &str) -> caisey_tests::Running {
    world.caisey("alice", &["init", "--org", "Acme", "--name", "alice"]).ok();
    world.caisey("alice", &["relay", "add", ticket]).ok();
    let token = world.caisey("alice", &["invite", "agent", "--name", agent]).ok().stdout.trim().to_string();
    world.agent_cmd(agent, &["enroll", &token]).ok();
    world.start_agent(agent)
}

/// Asks `machine` to run `script`, approves it there, and returns what `caisey run` printed.
fn run_approved(world: &World, machine: &str, script: &str) -> caisey_tests::Output {
    world.run_approved("alice", machine, &["--machine", machine, "--timeout", "120s", "--", script])
}

const SIXTEEN_MIB: usize = 16 * 1024 * 1024;
const SIXTEEN_MIB_SCRIPT: &str = "seq 1 3000000 | head -c 16777216";

#[test]
fn behind_two_nats_technician_and_agent_hole_punch_a_direct_path_and_fall_back_to_the_relay() {
    let mut net = Net::new();
    let world = World::new();
    let (public, ticket, _relay) = internet(&mut net, &world);
    let (tech, tech_router, tech_ip) = behind_nat(&mut net, &public, "tech", "10.77.0.2", 1);
    let (agent, agent_router, agent_ip) = behind_nat(&mut net, &public, "agent", "10.77.0.3", 2);
    world.place("alice", &tech, &format!("{tech_ip}:0"));
    world.place("pc1", &agent, &format!("{agent_ip}:0"));

    let started = Instant::now();
    let _agent = enroll_and_start(&world, &ticket, "pc1");
    let took = wait_for(Duration::from_secs(60), || {
        (status_path(&world, "pc1").as_deref() == Some("direct")).then(|| started.elapsed())
    })
    .unwrap_or_else(|| panic!("no direct path between the two NATs: alice sees {:?}", status_path(&world, "pc1")));
    eprintln!("direct path through two NATs {took:?} after the agent started");
    assert_eq!(path_to(&world, "pc1").as_deref(), Some("direct"), "the machine card says so too");
    // The path runs router to router: each NAT holds a UDP mapping to the other's WAN address.
    let flows = output_in(&tech_router, "conntrack", &["-L", "-p", "udp"]);
    assert!(flows.contains("dst=10.77.0.3"), "no UDP flow from NAT to NAT:\n{flows}");

    let out = run_approved(&world, "pc1", SIXTEEN_MIB_SCRIPT);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stdout.len(), SIXTEEN_MIB, "all 16 MiB arrived");
    assert_eq!(status_path(&world, "pc1").as_deref(), Some("direct"), "it streamed over the direct path");

    // No UDP between the two NATs any more: the command still completes, through the relay.
    net.block_udp(&tech_router, "10.77.0.3");
    net.block_udp(&agent_router, "10.77.0.2");
    let out = run_approved(&world, "pc1", "echo through-the-relay");
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stdout.contains("through-the-relay"), "{out:?}");
}

#[test]
fn with_only_the_agent_behind_nat_the_technician_reaches_it_directly() {
    let mut net = Net::new();
    let world = World::new();
    let (public, ticket, _relay) = internet(&mut net, &world);
    let tech = net.host("tech");
    net.plug(&tech, "eth0", &public, "10.77.0.20/24");
    let (agent, _router, agent_ip) = behind_nat(&mut net, &public, "agent", "10.77.0.3", 2);
    world.place("alice", &tech, "10.77.0.20:0");
    world.place("pc1", &agent, &format!("{agent_ip}:0"));

    let _agent = enroll_and_start(&world, &ticket, "pc1");
    wait_for(Duration::from_secs(60), || (path_to(&world, "pc1").as_deref() == Some("direct")).then_some(()))
        .unwrap_or_else(|| panic!("no direct path to the agent behind NAT: {:?}", path_to(&world, "pc1")));
    let out = run_approved(&world, "pc1", SIXTEEN_MIB_SCRIPT);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stdout.len(), SIXTEEN_MIB);
}

/// Address a LAN host gets: 10.88.0.`n`/24.
fn lan_host(net: &mut Net, lan: &str, name: &str, n: u8) -> String {
    let host = net.host(name);
    net.plug(&host, "eth0", lan, &format!("10.88.0.{n}/24"));
    // mDNS goes out on the interface of the default route.
    caisey_tests::netns::in_ns(&host, "ip", &["route", "add", "default", "dev", "eth0"]);
    host
}

#[test]
fn a_shop_lan_with_no_relay_finds_its_members_by_mdns_even_after_an_address_changes() {
    let mut net = Net::new();
    let world = World::new();
    let lan = net.segment("lan");
    let tech = lan_host(&mut net, &lan, "tech", 10);
    world.place("alice", &tech, "0.0.0.0:0");
    world.caisey("alice", &["init", "--org", "Shop", "--name", "alice"]).ok();
    let agents = ["ws-01", "ws-02", "ws-03"];
    let mut running = Vec::new();
    for (i, name) in agents.iter().enumerate() {
        let host = lan_host(&mut net, &lan, name, 21 + i as u8);
        world.place(name, &host, "0.0.0.0:0");
        let token = world.caisey("alice", &["invite", "agent", "--name", name, "--group", "shop"]).ok().stdout;
        world.agent_cmd(name, &["enroll", token.trim()]).ok();
        running.push(world.start_agent(name));
    }
    let run = world.spawn("caisey", "alice", &["run", "--group", "shop", "--", "echo served-on-the-lan"]);
    for a in agents {
        let id = world.wait_pending(a);
        world.agent_cmd(a, &["approve", &id]).ok();
    }
    let out = run.wait(Duration::from_secs(60));
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout.matches("out] served-on-the-lan").count(), 3, "{out:?}");

    // The technician's laptop gets a new address while ws-03 is switched off.
    let ws03 = running.pop().expect("ws-03");
    ws03.stop();
    net.readdress(&tech, "eth0", "10.88.0.10/24", "10.88.0.99/24");
    caisey_tests::netns::in_ns(&tech, "ip", &["route", "replace", "default", "dev", "eth0"]);
    let moved = Instant::now();
    let out = run_approved(&world, "ws-02", "echo after-the-move");
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("after-the-move"), "{out:?}");
    eprintln!("a command answered {:?} after the technician's address changed", moved.elapsed());

    // ws-03 comes back knowing only the old address; nobody dials it (agents dial technicians):
    // it finds the technician on the LAN by mDNS, and gets what was asked of it meanwhile.
    let asked = world.caisey("alice", &["run", "--machine", "ws-03", "--detach", "--", "echo found-by-mdns"]);
    assert_eq!(asked.code(), 0, "{asked:?}");
    let _ws03 = world.start_agent("ws-03");
    let id = world.wait_pending("ws-03");
    world.agent_cmd("ws-03", &["approve", &id]).ok();
    let shown = wait_for(Duration::from_secs(30), || {
        let out = world.command("caisey", "alice", &["sessions", "--json"]).output().ok()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        list.as_array()?
            .iter()
            .any(|s| s["status"] == "exited" && s["machines"][0] == "ws-03" && s["scripts"][0] == "echo found-by-mdns")
            .then_some(())
    });
    assert!(shown.is_some(), "ws-03's answer did not come back");

    // A second technician joins through alice's node, found on the LAN, and sees every session.
    let bob_host = lan_host(&mut net, &lan, "bob", 30);
    world.place("bob", &bob_host, "0.0.0.0:0");
    let token = world.caisey("alice", &["invite", "technician", "--name", "bob"]).ok().stdout.trim().to_string();
    world.caisey("bob", &["join", &token]).ok();
    let seen = wait_for(Duration::from_secs(30), || {
        let out = world.command("caisey", "bob", &["sessions", "--json"]).output().ok()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (list.as_array()?.len() == 5).then_some(())
    });
    assert!(seen.is_some(), "bob does not see the five sessions");
}
