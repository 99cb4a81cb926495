//! Random schedules with agents at work: technicians ask, the designated approver and the
//! endpoint users approve and deny, while links break, disks fill and any node — agents
//! included — is killed and started again. Whatever happened, once everything heals:
//! - no command was started twice;
//! - nothing ran without a matching approval;
//! - every command has a final state, and it is the same on every node that holds it;
//! - a command shown as run was run, and one that ran is not shown as "not run" or expired.
//!
//! A failing case prints its seed and schedule; `CAISEY_SIM_SEED=<seed>` replays only it.

use std::collections::BTreeMap;

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{SessionView, Verdict};
use caisey_sim::agents::AgentWorld;
use caisey_sim::org::Org;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    /// The technician asks agent `agent` to run a command that expires after `ttl` ms.
    Ask {
        agent: usize,
        ttl: u64,
    },
    /// The designated approver approves the `pick`-th request asked so far.
    Approve {
        pick: usize,
    },
    /// An agent's user approves (or denies) the oldest request waiting there.
    Decide {
        agent: usize,
        approve: bool,
    },
    Toggle {
        a: usize,
        b: usize,
    },
    /// A node's disk fills, keeps room for small writes only, or is freed.
    Disk {
        node: usize,
        state: u8,
    },
    /// A node is killed (or, if down, started again).
    Crash {
        node: usize,
    },
    Run {
        ms: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..2usize, 200..6_000u64).prop_map(|(agent, ttl)| Step::Ask { agent, ttl }),
        3 => (0..20usize).prop_map(|pick| Step::Approve { pick }),
        3 => (0..2usize, any::<bool>()).prop_map(|(agent, approve)| Step::Decide { agent, approve }),
        1 => (0..4usize, 0..4usize).prop_map(|(a, b)| Step::Toggle { a, b }),
        1 => (0..4usize, 0..3u8).prop_map(|(node, state)| Step::Disk { node, state }),
        2 => (0..4usize).prop_map(|node| Step::Crash { node }),
        3 => (1..1_500u64).prop_map(|ms| Step::Run { ms }),
    ]
}

fn run(seed: u64, steps: &[Step]) -> Result<(), String> {
    let o = Org::new(2);
    let (mut world, nodes, sessions) = AgentWorld::for_org(&o, seed);
    let t = nodes[0];
    // The session's own first request (from the fixture) is left to expire.
    let mut asked: Vec<(DocId, Id128)> = Vec::new();
    let mut down: Vec<NodeId> = Vec::new();
    for (n, s) in steps.iter().enumerate() {
        match s {
            Step::Ask { agent, ttl } => {
                if down.contains(&t) {
                    continue;
                }
                let target = o.agents[*agent].node_id();
                // Ids of their own (the fixture's sessions and requests use repeated bytes).
                let mut id = [0xee; 16];
                id[..8].copy_from_slice(&(n as u64).to_be_bytes());
                let id = Id128(id);
                world.request(&o.tech, sessions[*agent], target, id, *ttl);
                asked.push((sessions[*agent], id));
            }
            Step::Approve { pick } => {
                if down.contains(&t) || asked.is_empty() {
                    continue;
                }
                let (sid, id) = asked[pick % asked.len()];
                world.approve_remote(t, &o.approver, sid, id, 3_000);
            }
            Step::Decide { agent, approve } => world.decide_local(o.agents[*agent].node_id(), *approve),
            Step::Toggle { a, b } => world.sim.toggle_link(nodes[*a], nodes[*b], &down),
            Step::Disk { node, state } => world.sim.set_disk(nodes[*node], *state, 2_000),
            Step::Crash { node } => world.crash_or_restart(nodes[*node], &mut down),
            Step::Run { ms } => world.run_for(*ms),
        }
    }
    // Heal: everyone back, every disk with room, every link up; then long past every expiry.
    world.heal(&mut down);
    world.run_for(30_000);

    let fleet = o.read_fleet();
    if let Some((id, n)) = world.starts.iter().find(|(_, n)| **n > 1) {
        return Err(format!("request {} started {n} times", id.short()));
    }
    for &sid in &sessions {
        if !world.sim.converged(sid) {
            return Err(format!("session {} did not converge", sid.short()));
        }
        let mut states: BTreeMap<Id128, Vec<&'static str>> = BTreeMap::new();
        for &at in &nodes {
            let Some(doc) = world.sim.hub(at).doc(&sid) else { continue };
            let view = SessionView::read_without_output(doc, &fleet).map_err(|e| e.to_string())?;
            for c in &view.commands {
                if !c.is_final() {
                    return Err(format!(
                        "{} shows {} as {:?}, not final",
                        at.short(),
                        c.request.id.short(),
                        c.status()
                    ));
                }
                states.entry(c.request.id).or_default().push(c.status());
                let started = world.starts.get(&c.request.id).copied().unwrap_or(0);
                if let Some(start) = &c.start {
                    // Nothing ran without a matching approval.
                    let approved =
                        c.decision.as_ref().is_some_and(|d| d.verdict == Verdict::Approved && d.nonce == start.nonce);
                    if !approved || c.decided_by_node.is_none() {
                        return Err(format!("{} started without a matching approval", c.request.id.short()));
                    }
                }
                match c.status() {
                    "exited" if started != 1 => {
                        return Err(format!("{} shown as run, but it started {started} times", c.request.id.short()));
                    }
                    "not run" | "expired" | "denied" if started > 0 => {
                        return Err(format!("{} ran but is shown as {}", c.request.id.short(), c.status()));
                    }
                    _ => {}
                }
            }
        }
        for (id, seen) in states {
            if seen.windows(2).any(|w| w[0] != w[1]) {
                return Err(format!("{} has different final states on different nodes: {seen:?}", id.short()));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_command_starts_twice_or_unapproved_and_every_final_state_is_the_same_everywhere(
        seed in any::<u64>(),
        steps in prop::collection::vec(step(), 1..50),
    ) {
        if let Ok(only) = std::env::var("CAISEY_SIM_SEED") && only != seed.to_string() {
            return Ok(());
        }
        if let Err(e) = run(seed, &steps) {
            panic!("seed {seed}: {e}\nsteps: {steps:?}");
        }
    }
}
