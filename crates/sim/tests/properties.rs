//! Random schedules in the simulated world, each from a seed: output streams while links break
//! and heal, frames interleave and arrive twice, disks fill and free, and nodes crash and come
//! back from what they persisted. Whatever happened, once the network heals and the disks have
//! room, every node holds the same sessions, and nothing any node acknowledged is lost.
//!
//! A failing case prints its seed; `CAISEY_SIM_SEED=<seed> cargo test -p caisey-sim --test
//! properties` replays it alone.

use std::collections::BTreeSet;

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{OutputChunk, SessionNote, SessionWriter, Stream};
use caisey_peer::wire::DocKind;
use caisey_sim::Faults;
use caisey_sim::org::Org;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    /// An agent writes output for its session (`size` bytes).
    Output {
        agent: usize,
        size: usize,
    },
    /// The technician writes a note into an agent's session.
    Note {
        agent: usize,
    },
    /// The link between two nodes (by index) breaks, or comes back.
    Toggle {
        a: usize,
        b: usize,
    },
    /// A node's disk fills up, or is freed; or keeps room for small writes only.
    Disk {
        node: usize,
        state: u8,
    },
    Crash {
        node: usize,
    },
    Run {
        ms: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, 1..20_000usize).prop_map(|(agent, size)| Step::Output { agent, size }),
        1 => (0..2usize).prop_map(|agent| Step::Note { agent }),
        2 => (0..4usize, 0..4usize).prop_map(|(a, b)| Step::Toggle { a, b }),
        2 => (0..4usize, 0..3u8).prop_map(|(node, state)| Step::Disk { node, state }),
        1 => (0..4usize).prop_map(|node| Step::Crash { node }),
        3 => (1..3_000u64).prop_map(|ms| Step::Run { ms }),
    ]
}

/// What some node acknowledged (wrote durably) and so must be everywhere in the end.
#[derive(Default)]
struct Acknowledged {
    output: BTreeSet<(DocId, u64)>,
    notes: BTreeSet<(DocId, Id128)>,
}

fn run(seed: u64, steps: &[Step]) -> Result<(), String> {
    let o = Org::new(2);
    let nodes: Vec<NodeId> = [&o.tech, &o.relay, &o.agents[0], &o.agents[1]].iter().map(|s| s.node_id()).collect();
    let (t, r) = (nodes[0], nodes[1]);
    let mut sim = o.sim(seed);
    sim.faults = Faults { reorder: true, duplicate: 0.1, batch: seed.is_multiple_of(2) };
    sim.connect_all();
    let mut sessions = Vec::new();
    for (i, agent) in o.agents.iter().enumerate() {
        let (sid, doc) = o.session_for(agent.node_id(), 20 + i as u8);
        assert!(sim.create(t, sid, DocKind::Session, doc));
        sessions.push(sid);
    }
    sim.run_for(1_000);
    let mut acked = Acknowledged::default();
    let mut seq = [0u64; 2];
    let mut down = BTreeSet::new();
    for (n, s) in steps.iter().enumerate() {
        match s {
            Step::Output { agent, size } => {
                let at = nodes[2 + agent];
                if down.contains(&at) {
                    continue;
                }
                let sid = sessions[*agent];
                let chunk = OutputChunk {
                    request: Id128([20 + *agent as u8 + 100; 16]),
                    seq: seq[*agent],
                    stream: Stream::Stdout,
                    data: format!("{n}:").bytes().chain(std::iter::repeat_n(b'.', *size)).collect(),
                };
                // A real runner waits until its output is durable before it writes more (so a
                // sequence number is never reused for other bytes).
                if sim.hub(at).unwritable().is_some() {
                    continue;
                }
                if sim.output(at, sid, &o.agents[*agent], vec![chunk]) {
                    acked.output.insert((sid, seq[*agent]));
                }
                seq[*agent] += 1;
            }
            Step::Note { agent } => {
                if down.contains(&t) {
                    continue;
                }
                let sid = sessions[*agent];
                let note = SessionNote {
                    session: sid,
                    id: Id128([n as u8; 16]),
                    text: format!("note {n}").into(),
                    at: n as u64,
                };
                let tech = o.tech.clone();
                let (written, durable) = sim.change(t, sid, move |d| SessionWriter::note(d, &tech, &note).is_ok());
                if written && durable {
                    acked.notes.insert((sid, Id128([n as u8; 16])));
                }
            }
            Step::Toggle { a, b } => sim.toggle_link(nodes[*a], nodes[*b], &down.iter().copied().collect::<Vec<_>>()),
            Step::Disk { node, state } => sim.set_disk(nodes[*node], *state, 3_000),
            Step::Crash { node } => {
                let at = nodes[*node];
                if down.remove(&at) {
                    sim.restart(at);
                } else {
                    sim.crash(at);
                    down.insert(at);
                }
            }
            Step::Run { ms } => sim.run_for(*ms),
        }
    }
    // Heal: everyone back, every disk with room, every link up.
    for at in std::mem::take(&mut down) {
        sim.restart(at);
    }
    sim.heal();
    sim.run_for(20_000);
    let fleet = o.read_fleet();
    for &at in &nodes {
        if let Some(u) = sim.hub(at).unwritable() {
            return Err(format!("{} still cannot write: {}", at.short(), u.error));
        }
    }
    for &sid in &sessions {
        if !sim.converged(sid) {
            let heads: Vec<_> = nodes.iter().map(|n| sim.heads(*n, sid).map(|h| h.len())).collect();
            return Err(format!("session {} did not converge: {heads:?}", sid.short()));
        }
        for &at in &[t, r] {
            let view = sim.view(at, sid, &fleet);
            let output: BTreeSet<u64> = view.commands.iter().flat_map(|c| c.output.iter().map(|c| c.seq)).collect();
            if let Some((_, lost)) = acked.output.iter().find(|(s, q)| *s == sid && !output.contains(q)) {
                return Err(format!(
                    "output {lost} of session {} acknowledged but missing at {}",
                    sid.short(),
                    at.short()
                ));
            }
            let notes: BTreeSet<Id128> = view.notes.iter().map(|n| n.note.id).collect();
            if let Some((_, lost)) = acked.notes.iter().find(|(s, id)| *s == sid && !notes.contains(id)) {
                return Err(format!("note {} acknowledged but missing at {}", lost.short(), at.short()));
            }
            if sim.hub(at).missing_output(&sid) > 0 {
                return Err(format!("{} still lacks output bytes of {}", at.short(), sid.short()));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_node_converges_and_nothing_acknowledged_is_lost(seed in any::<u64>(), steps in prop::collection::vec(step(), 1..60)) {
        if let Ok(only) = std::env::var("CAISEY_SIM_SEED") && only != seed.to_string() {
            return Ok(());
        }
        if let Err(e) = run(seed, &steps) {
            panic!("seed {seed}: {e}\nsteps: {steps:?}");
        }
    }
}
