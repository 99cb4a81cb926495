//! A node whose disk is full: it acknowledges nothing it could not write, sends nothing that is
//! not durable, keeps what it made, and catches up with nothing lost once space returns.

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{OutputChunk, Stream};
use caisey_peer::wire::DocKind;
use caisey_sim::Sim;
use caisey_sim::org::Org;

fn chunk(seq: u64) -> OutputChunk {
    OutputChunk { request: Id128([107; 16]), seq, stream: Stream::Stdout, data: format!("line {seq}\n").into_bytes() }
}

/// Technician, relay and agent, connected through the relay, with session 7 at all three.
fn world(o: &Org) -> (Sim, NodeId, NodeId, NodeId, DocId) {
    let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
    let mut sim = o.sim(7);
    sim.connect(t, r);
    sim.connect(a, r);
    let (sid, doc) = o.session_for(a, 7);
    assert!(sim.create(t, sid, DocKind::Session, doc));
    sim.run_until_quiet();
    assert!(sim.heads(a, sid).is_some());
    (sim, t, r, a, sid)
}

fn output_lines(sim: &Sim, at: NodeId, sid: DocId, o: &Org) -> Vec<u64> {
    let view = sim.view(at, sid, &o.read_fleet());
    view.commands.iter().flat_map(|c| c.output.iter().map(|c| c.seq)).collect()
}

#[test]
fn a_relay_with_a_full_disk_acknowledges_and_passes_on_nothing_until_it_can_write() {
    let o = Org::new(1);
    let (mut sim, t, r, a, sid) = world(&o);
    sim.nodes.get_mut(&r).unwrap().disk.full = true;
    assert!(sim.output(a, sid, &o.agents[0], vec![chunk(0)]), "the agent's own disk is fine");
    sim.run_until_quiet();
    // The relay took the change in before its write failed, but neither passes it on nor
    // acknowledges it.
    let first = sim.heads(a, sid);
    assert_eq!(sim.heads(r, sid), first);
    assert_ne!(sim.heads(t, sid), first, "the relay passed on a change it could not write");
    assert!(!sim.hub(a).in_sync_with(&r), "the relay acknowledged a change it could not write");
    for seq in 1..5 {
        assert!(sim.output(a, sid, &o.agents[0], vec![chunk(seq)]));
        sim.run_until_quiet();
    }
    // Nothing more is taken in meanwhile: memory does not grow with what cannot be written.
    assert_eq!(sim.heads(r, sid), first, "the relay kept taking in changes it could not write");
    let relay = sim.hub(r);
    assert!(relay.unwritable().is_some_and(|u| u.error.contains("No space")));
    // Nothing reached the technician, and the agent does not count the relay as holding it.
    assert!(output_lines(&sim, t, sid, &o).is_empty(), "output passed on that the relay could not write");
    assert!(!sim.hub(a).in_sync_with(&r), "the relay acknowledged what it could not write");
    assert!(!sim.nodes[&r].disk.chunks.values().any(|c| c.starts_with(b"line")));

    // Still full a while later: the relay keeps trying, and still holds back.
    sim.run_for(5_000);
    assert!(sim.hub(r).unwritable().is_some());
    assert!(output_lines(&sim, t, sid, &o).is_empty());

    // Space returns: the next retry succeeds and everything flows, in order, nothing lost.
    sim.nodes.get_mut(&r).unwrap().disk.full = false;
    sim.run_for(3_000);
    assert!(sim.hub(r).unwritable().is_none());
    assert!(sim.converged(sid));
    assert_eq!(output_lines(&sim, t, sid, &o), (0..5).collect::<Vec<_>>());
    assert!(sim.hub(a).in_sync_with(&r) && sim.hub(t).in_sync_with(&r));
    // And it is on the relay's disk: a restarted relay serves it all.
    sim.crash(r);
    sim.restart(r);
    assert_eq!(output_lines(&sim, r, sid, &o), (0..5).collect::<Vec<_>>());
}

#[test]
fn an_agent_with_a_full_disk_sends_nothing_it_could_not_keep_and_loses_nothing_it_acknowledged() {
    let o = Org::new(1);
    let (mut sim, t, _r, a, sid) = world(&o);
    assert!(sim.output(a, sid, &o.agents[0], vec![chunk(0)]));
    sim.run_until_quiet();
    sim.nodes.get_mut(&a).unwrap().disk.full = true;
    // Output made while the disk is full is not acknowledged, and does not leave the agent.
    assert!(!sim.output(a, sid, &o.agents[0], vec![chunk(1)]));
    sim.run_until_quiet();
    assert_eq!(output_lines(&sim, t, sid, &o), vec![0]);
    // The agent dies before space returns: what it never acknowledged is gone everywhere
    // alike; what it acknowledged is still there.
    sim.crash(a);
    sim.restart(a);
    sim.nodes.get_mut(&a).unwrap().disk.full = false;
    assert_eq!(output_lines(&sim, a, sid, &o), vec![0]);

    // Full again, output kept in memory; space returns before any crash: it is written and sent.
    sim.nodes.get_mut(&a).unwrap().disk.full = true;
    assert!(!sim.output(a, sid, &o.agents[0], vec![chunk(1)]));
    assert!(!sim.output(a, sid, &o.agents[0], vec![chunk(2)]));
    sim.connect(a, o.relay.node_id());
    sim.run_for(2_500);
    assert_eq!(output_lines(&sim, t, sid, &o), vec![0]);
    sim.nodes.get_mut(&a).unwrap().disk.full = false;
    sim.run_for(1_500);
    assert!(sim.hub(a).unwritable().is_none());
    assert_eq!(output_lines(&sim, t, sid, &o), vec![0, 1, 2]);
    sim.crash(a);
    sim.restart(a);
    assert_eq!(output_lines(&sim, a, sid, &o), vec![0, 1, 2]);
    assert!(sim.converged(sid));
}

#[test]
fn a_disk_with_room_for_small_writes_only_is_not_taken_for_writable_until_everything_waiting_is_written() {
    let o = Org::new(1);
    let (mut sim, t, r, a, sid) = world(&o);
    sim.faults.reorder = true;
    // Room for heartbeats and sync states, not for output.
    sim.nodes.get_mut(&a).unwrap().disk.room = Some(2_000);
    let big = |seq: u64| OutputChunk { data: vec![b'x'; 4_000], ..chunk(seq) };
    assert!(!sim.output(a, sid, &o.agents[0], vec![big(0)]));
    let since = sim.hub(a).unwritable().map(|u| u.since);
    for round in 0..20u64 {
        // Small writes succeed now and then (a heartbeat), the output still does not fit.
        let beat = caisey_doc::fleet::Presence {
            node: a,
            addrs: vec![],
            at: 100 + round,
            relay_server: None,
            vitals: None,
            unwritable: None,
        };
        let record = o.agents[0].sign(caisey_doc::record::RecordKind::Presence, &beat);
        let out = sim.nodes.get_mut(&a).unwrap().hub.announce(record);
        sim.apply(a, out);
        sim.run_for(700);
        // Unwritable all along, not back and forth.
        assert_eq!(
            sim.hub(a).unwritable().map(|u| u.since),
            since,
            "round {round}: a small write was taken for recovery"
        );
    }
    assert_eq!(sim.heads(t, sid), sim.heads(r, sid));
    assert_ne!(sim.heads(t, sid), sim.heads(a, sid), "output left the agent before it was written");
    sim.nodes.get_mut(&a).unwrap().disk.room = None;
    sim.run_for(3_000);
    assert!(sim.hub(a).unwritable().is_none());
    assert!(sim.converged(sid));
    assert_eq!(sim.view(t, sid, &o.read_fleet()).commands[0].output.len(), 1);
}

#[test]
fn output_written_on_a_disk_where_space_comes_and_goes_all_arrives_once_it_stays() {
    for seed in 0..20 {
        let o = Org::new(1);
        let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
        let mut sim = o.sim(seed);
        sim.faults.reorder = true;
        sim.connect_all();
        let (sid, doc) = o.session_for(a, 7);
        assert!(sim.create(t, sid, DocKind::Session, doc));
        sim.run_for(500);
        sim.nodes.get_mut(&a).unwrap().disk.flaky = Some(3);
        let mut written = 0;
        for seq in 0..60 {
            // As the runner does: more output only once what came before is durable.
            if sim.hub(a).unwritable().is_none() {
                sim.output(a, sid, &o.agents[0], vec![chunk(written)]);
                written += 1;
            }
            sim.run_for(20 + seq % 7);
        }
        sim.nodes.get_mut(&a).unwrap().disk.flaky = None;
        sim.run_for(5_000);
        assert!(sim.hub(a).unwritable().is_none(), "seed {seed}");
        assert!(sim.converged(sid), "seed {seed}: not converged");
        for at in [t, r] {
            assert_eq!(
                output_lines(&sim, at, sid, &o),
                (0..written).collect::<Vec<_>>(),
                "seed {seed} at {}",
                at.short()
            );
        }
    }
}

#[test]
fn a_stored_session_that_no_longer_loads_is_fetched_again_from_a_peer_and_stored_whole() {
    let o = Org::new(1);
    let (mut sim, t, r, a, sid) = world(&o);
    for seq in 0..3 {
        assert!(sim.output(a, sid, &o.agents[0], vec![chunk(seq)]));
    }
    sim.run_until_quiet();
    // The relay's stored copy of the session is damaged while it is down.
    sim.crash(r);
    let (_, pieces) = sim.nodes.get_mut(&r).unwrap().disk.docs.get_mut(&sid).unwrap();
    pieces.last_mut().unwrap()[10..30].fill(0xff);
    sim.restart(r);
    assert_eq!(sim.heads(r, sid), Some(vec![]), "the damaged session is held empty, to be fetched");
    sim.connect(t, r);
    sim.connect(a, r);
    sim.run_for(1_000);
    assert!(sim.converged(sid));
    assert_eq!(output_lines(&sim, r, sid, &o), vec![0, 1, 2]);
    // What it stored now loads: restarted again, it has it all without asking anyone.
    sim.crash(r);
    sim.restart(r);
    assert_eq!(sim.heads(r, sid), sim.heads(t, sid));
}
