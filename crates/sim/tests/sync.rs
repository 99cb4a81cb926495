//! The sync hubs in the simulated world: sessions reach exactly the peers that may hold them,
//! through relays and across partitions, output bytes follow their references, heartbeats
//! travel without touching any document, and hostile input is dropped.

use automerge::Automerge;
use automerge::sync::{State as SyncState, SyncDoc};
use caisey_doc::fleet::{Fleet, Presence, Role};
use caisey_doc::id::{Id128, NodeId};
use caisey_doc::record::{RecordKind, Signer};
use caisey_doc::session::*;
use caisey_peer::hub::{Input, Output};
use caisey_peer::wire::{DocKind, Frame};
use caisey_sim::Sim;
use caisey_sim::org::Org;

#[test]
fn a_session_reaches_its_agent_through_the_relay_but_not_other_agents() {
    let o = Org::new(2);
    let (t, r, a0, a1) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id(), o.agents[1].node_id());
    let mut net = o.sim(0);
    net.connect(a0, r);
    net.connect(a1, r);
    net.run_until_quiet();
    // Technician creates the session while only connected to the relay.
    net.connect(t, r);
    let (sid, doc) = o.session_for(a0, 1);
    net.create(t, sid, DocKind::Session, doc);
    net.run_until_quiet();
    assert_eq!(net.heads(a0, sid), net.heads(t, sid));
    assert_eq!(net.heads(r, sid), net.heads(t, sid));
    assert_eq!(net.heads(a1, sid), None, "another agent learnt of the session");
    assert!(net.hub(t).in_sync_with(&r));
}

#[test]
fn a_fresh_technician_is_not_in_sync_until_every_offered_session_arrived() {
    let o = Org::new(1);
    let (t, r) = (o.tech.node_id(), o.relay.node_id());
    let mut relay = o.hub(&o.relay);
    for sid in 1..=3 {
        let (id, doc) = o.session_for(o.agents[0].node_id(), sid);
        relay.create(id, DocKind::Session, doc, 0);
    }
    let mut net = Sim::new(vec![o.hub(&o.tech), relay], 0);
    net.connect(t, r);
    // Step by step: whenever some session is still missing, the technician is not in sync.
    let mut saw_partial = false;
    while net.step() {
        let sessions_here = net.hub(t).docs().filter(|(_, k)| *k == DocKind::Session).count();
        if sessions_here < 3 {
            saw_partial = true;
            assert!(!net.hub(t).in_sync_with(&r), "in sync with only {sessions_here} of 3 sessions");
        }
    }
    assert!(saw_partial);
    assert!(net.hub(t).in_sync_with(&r));
}

#[test]
fn store_and_forward_while_technician_and_agent_are_never_online_together() {
    let o = Org::new(1);
    let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
    let mut net = o.sim(0);
    net.connect(t, r);
    let (sid, doc) = o.session_for(a, 2);
    net.create(t, sid, DocKind::Session, doc);
    net.run_until_quiet();
    net.disconnect(t, r);
    net.run_until_quiet();

    net.connect(a, r);
    net.run_until_quiet();
    let chunk = OutputChunk { request: Id128([102; 16]), seq: 0, stream: Stream::Stdout, data: b"up 3 days".to_vec() };
    net.output(a, sid, &o.agents[0], vec![chunk]);
    net.run_until_quiet();
    net.disconnect(a, r);
    net.run_until_quiet();

    net.connect(t, r);
    net.run_until_quiet();
    assert_eq!(net.heads(t, sid), net.heads(a, sid));
    let fleet = Fleet::read(&o.fleet).unwrap();
    let view = net.view(t, sid, &fleet);
    assert_eq!(view.commands[0].output[0].data, b"up 3 days");
    assert!(net.hub(t).in_sync_with(&r));
}

#[test]
fn an_agent_s_machine_document_reaches_technicians_through_the_relay() {
    let o = Org::new(1);
    let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
    let mut net = o.sim(0);
    net.connect(a, r);
    net.connect(t, r);
    net.run_until_quiet();
    let id = caisey_doc::machine::machine_doc_id(&a);
    let card = caisey_doc::fleet::MachineCard { hostname: "ws-0".into(), ..Default::default() };
    let doc = caisey_doc::machine::MachineDoc::create(&o.agents[0], &card, vec!["127.0.0.1:9".into()], 7).unwrap();
    net.create(a, id, DocKind::Machine, doc);
    net.run_until_quiet();
    // A later card update must flow too (the relay's entry was made by the first, change-less message).
    let agent = o.agents[0].clone();
    net.change(a, id, move |d| caisey_doc::machine::MachineDoc::put(d, &agent, &card, vec![], 8).unwrap());
    net.run_until_quiet();
    assert_eq!(net.hub(t).fleet().presence.get(&a).map(|p| p.at), Some(8));
    assert_eq!(net.hub(t).fleet().cards.get(&a).map(|c| c.hostname.as_unescaped_str()), Some("ws-0"));
    assert_eq!(net.heads(r, id), net.heads(a, id));
}

#[test]
fn a_non_member_is_disconnected_and_learns_nothing() {
    let o = Org::new(1);
    let stranger = Signer::from_secret([77; 32]);
    let r = o.relay.node_id();
    let mut relay = o.hub(&o.relay);
    let (sid, doc) = o.session_for(o.agents[0].node_id(), 3);
    relay.create(sid, DocKind::Session, doc, 0);
    let out = relay.handle(1, Input::Connected { peer: stranger.node_id(), conn: 1, stored: vec![] });
    assert!(matches!(out.as_slice(), [Output::Disconnect { .. }]), "{out:?}");
    // Even a frame asking for the session gets nothing back.
    let probe = Automerge::new();
    let msg = probe.generate_sync_message(&mut SyncState::new()).unwrap();
    let out = relay.handle(
        2,
        Input::Frame {
            peer: stranger.node_id(),
            conn: 1,
            frame: Frame::Sync { doc: sid, kind: DocKind::Session, message: msg.encode() },
        },
    );
    assert!(out.is_empty(), "relay {r:?} answered a stranger: {out:?}");
}

#[test]
fn a_fleet_that_stops_reading_leaves_the_last_good_one_in_force() {
    let o = Org::new(1);
    let (r, a) = (o.relay.node_id(), o.agents[0].node_id());
    let mut net = Sim::new(vec![o.hub(&o.relay), o.hub(&o.agents[0])], 0);
    net.connect(a, r);
    net.run_until_quiet();
    let before = net.heads(r, o.fleet_id);
    // The agent deletes the org's genesis record in its copy of the fleet.
    net.change(a, o.fleet_id, |d| {
        use automerge::transaction::Transactable;
        d.transact::<_, _, automerge::AutomergeError>(|tx| tx.delete(automerge::ROOT, "genesis")).unwrap();
    });
    net.run_until_quiet();
    // Automerge changes are not signed, so the relay takes the change; but it keeps the last
    // fleet that read, instead of disconnecting every member.
    assert_ne!(net.heads(r, o.fleet_id), before);
    assert_eq!(net.hub(r).fleet().role_of(&a), Some(Role::Agent));
    assert!(net.hub(r).peers().iter().any(|p| p.peer == a), "the relay dropped its members");
}

#[test]
fn malformed_messages_drop_the_connection() {
    let o = Org::new(1);
    let mut relay = o.hub(&o.relay);
    let t = o.tech.node_id();
    relay.handle(0, Input::Connected { peer: t, conn: 5, stored: vec![] });
    let out = relay.handle(
        1,
        Input::Frame {
            peer: t,
            conn: 5,
            frame: Frame::Sync { doc: Id128([4; 16]), kind: DocKind::Session, message: vec![0xff; 40] },
        },
    );
    assert!(out.iter().any(|o| matches!(o, Output::Disconnect { .. })), "{out:?}");
}

#[test]
fn concurrent_output_from_partitioned_peers_converges_in_any_order() {
    let o = Org::new(1);
    let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
    let mut net = o.sim(0);
    net.connect(t, a);
    let (sid, doc) = o.session_for(a, 4);
    net.create(t, sid, DocKind::Session, doc);
    net.run_until_quiet();
    assert!(net.heads(a, sid).is_some(), "agent did not receive its session");
    net.disconnect(t, a);
    net.run_until_quiet();
    // Both write while apart; then they meet only through the relay, in either order.
    for seq in 0..20 {
        let c = OutputChunk { request: Id128([104; 16]), seq, stream: Stream::Stdout, data: vec![seq as u8; 100] };
        net.output(a, sid, &o.agents[0], vec![c]);
    }
    let tech = o.tech.clone();
    net.change(t, sid, move |d| {
        let command = CommandSpec {
            shell: Shell::Sh,
            script: "df".into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 1000,
            collect: None,
        };
        let req = CommandRequest {
            id: Id128([55; 16]),
            session: sid,
            target: a,
            command,
            description: Default::default(),
            requested_at: 2,
            expires_at: 10,
        };
        SessionWriter::request(d, &tech, &req).unwrap();
    });
    net.connect(a, r);
    net.run_until_quiet();
    net.connect(t, r);
    net.run_until_quiet();
    assert_eq!(net.heads(t, sid), net.heads(a, sid));
    assert_eq!(net.heads(r, sid), net.heads(a, sid));
    let fleet = Fleet::read(&o.fleet).unwrap();
    for at in [r, t] {
        let view = net.view(at, sid, &fleet);
        assert_eq!(view.commands.len(), 2);
        assert_eq!(view.commands.iter().map(|c| c.output.len()).sum::<usize>(), 20);
    }
    assert!(net.nodes[&r].disk.docs.contains_key(&sid), "the relay did not persist the session");
}

#[test]
fn heartbeats_reach_technicians_through_the_relay_without_changing_any_document() {
    let o = Org::new(2);
    let (t, r, a0, a1) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id(), o.agents[1].node_id());
    let mut net = o.sim(0);
    net.connect(a0, r);
    net.connect(a1, r);
    net.connect(t, r);
    net.run_until_quiet();
    let heads = |net: &Sim| -> Vec<_> {
        [t, r, a0, a1].iter().flat_map(|n| net.hub(*n).docs().map(|(id, _)| net.heads(*n, id))).collect()
    };
    let before = heads(&net);
    let beat = |s: &Signer, node: NodeId, at| {
        s.sign(
            RecordKind::Presence,
            &Presence {
                node,
                addrs: vec!["127.0.0.1:7".into()],
                at,
                relay_server: None,
                vitals: None,
                unwritable: None,
            },
        )
    };
    let out = net.nodes.get_mut(&a0).unwrap().hub.announce(beat(&o.agents[0], a0, 50));
    net.apply(a0, out);
    net.run_until_quiet();
    assert_eq!(net.hub(t).fleet().presence.get(&a0).map(|p| p.at), Some(50));
    assert!(!net.hub(a1).fleet().presence.contains_key(&a0), "another agent saw the heartbeat");
    // A heartbeat for a0 signed by another agent, or an older one, changes nothing.
    let forged = Frame::Presence { record: beat(&o.agents[1], a0, 99) };
    net.inject(a1, r, forged);
    let out = net.nodes.get_mut(&a0).unwrap().hub.announce(beat(&o.agents[0], a0, 40));
    net.apply(a0, out);
    net.run_until_quiet();
    assert_eq!(net.hub(t).fleet().presence.get(&a0).map(|p| p.at), Some(50));
    assert_eq!(heads(&net), before, "a heartbeat changed a document");
    // A technician starting afresh gets the newest heartbeat when it connects.
    net.disconnect(t, r);
    net.run_until_quiet();
    let fresh = o.hub(&o.tech);
    net.nodes.get_mut(&t).unwrap().hub = fresh;
    net.connect(t, r);
    net.run_until_quiet();
    assert_eq!(net.hub(t).fleet().presence.get(&a0).map(|p| p.at), Some(50));
}

#[test]
fn output_a_relay_lacks_is_passed_on_when_it_arrives_and_unreferenced_bytes_are_refused() {
    let o = Org::new(1);
    let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
    let mut net = o.sim(0);
    net.connect(t, r);
    net.connect(a, r);
    let (sid, doc) = o.session_for(a, 5);
    net.create(t, sid, DocKind::Session, doc);
    net.run_until_quiet();
    // The agent's references reach the relay, but the agent is gone before the bytes do.
    // (Its references are written before its bytes are at hand, so the sync of the
    // references completes whatever rounds it takes, and no byte leaves before the agent
    // goes: cutting the link mid-sync instead made this depend on Automerge's bloom filters.)
    let chunk = OutputChunk { request: Id128([105; 16]), seq: 0, stream: Stream::Stdout, data: b"disk ok\n".to_vec() };
    let refs = [chunk.reference()];
    net.change(a, sid, |d| SessionWriter::append_output(d, &o.agents[0], &refs).unwrap());
    net.run_until_quiet();
    net.disconnect(a, r);
    net.run_until_quiet();
    let held = net.nodes.get_mut(&a).unwrap().hub.hold_chunks(sid, vec![(chunk_hash(&chunk.data), chunk.data.clone())]);
    net.apply(a, held);
    assert_eq!(net.heads(t, sid), net.heads(a, sid), "the references did not reach the technician");
    assert_eq!(net.hub(t).missing_output(&sid), 1);
    assert_eq!(net.hub(r).missing_output(&sid), 1);
    // The relay answered "lacking": the technician is not left waiting on it.
    assert!(net.hub(t).in_sync_with(&r));
    // Bytes nobody references are not taken, whoever sends them.
    let junk = Frame::Chunk { doc: sid, data: b"rm -rf /".to_vec() };
    net.inject(r, t, junk);
    net.run_until_quiet();
    assert!(!net.nodes[&t].disk.chunks.contains_key(&chunk_hash(b"rm -rf /")));
    // The agent comes back: the relay fetches the chunk and passes it on to the technician.
    net.connect(a, r);
    net.run_until_quiet();
    assert_eq!(net.hub(t).missing_output(&sid), 0);
    let fleet = Fleet::read(&o.fleet).unwrap();
    assert_eq!(net.view(t, sid, &fleet).commands[0].output, vec![chunk]);
    assert!(net.hub(t).in_sync_with(&r));
}

#[test]
fn output_asked_of_a_peer_that_dies_before_answering_is_asked_of_the_others() {
    let o = Org::new(1);
    let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
    let mut net = o.sim(0);
    net.connect(t, r);
    net.connect(a, r);
    net.connect(t, a);
    let (sid, doc) = o.session_for(a, 6);
    net.create(t, sid, DocKind::Session, doc);
    net.run_until_quiet();
    // The agent's references reach the technician directly, and the agent dies before it
    // answers the technician's request for the bytes; the relay got them meanwhile.
    let chunk = OutputChunk { request: Id128([106; 16]), seq: 0, stream: Stream::Stdout, data: b"mem ok\n".to_vec() };
    net.output(a, sid, &o.agents[0], vec![chunk.clone()]);
    net.disconnect(t, a);
    net.run_until_quiet();
    assert_eq!(net.hub(r).missing_output(&sid), 0, "the relay has the bytes");
    assert_eq!(net.hub(t).missing_output(&sid), 0, "the technician asked the relay instead");
    let fleet = Fleet::read(&o.fleet).unwrap();
    assert_eq!(net.view(t, sid, &fleet).commands[0].output, vec![chunk]);
    assert!(net.hub(t).in_sync_with(&r));
}
