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
    let run = world.spawn("caisey", "alice", &["run", "--machine", machine, "--timeout", "120s", "--", script]);
    let id = world.wait_pending(machine);
    world.agent_cmd(machine, &["approve", &id]).ok();
    run.wait(Duration::from_secs(120))
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
