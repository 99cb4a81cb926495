//! A simulated world for the sync hubs: a clock, a network and a disk per node, all in one
//! thread and all decided by a seed, so that a schedule that breaks a guarantee can be replayed
//! exactly.
//!
//! It drives [`Hub`] the way the node's driver does — persists first, their outcome reported
//! back, sends only after a successful write — and adds what a real deployment does to it:
//! - **the network** delivers frames per connection in order (a QUIC stream), while frames of
//!   different connections interleave in a random order; heartbeats and output chunks may
//!   arrive twice (two peers relay the same one); links break and heal, and a partition breaks
//!   every link across it;
//! - **the disk** keeps exactly what each node persisted, can be made full (every write then
//!   fails until it is freed), and is all a crashed node comes back with;
//! - **the clock** moves on with every delivered frame, and jumps to the next hub timer when
//!   nothing else is due.
//!
//! [`org`] builds a small org (a technician, a relay, agents) to run in it, and [`agents`] runs
//! the agents' real decision core on their nodes, with simulated commands.

pub mod agents;
pub mod org;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::{Automerge, ChangeHash};
use caisey_doc::fleet::Fleet;
use caisey_doc::id::{DocId, NodeId};
use caisey_doc::record::Signer;
use caisey_doc::session::{ChunkHash, OutputChunk, OutputRef, SessionView, SessionWriter, chunk_hash};
use caisey_peer::hub::{ConnId, Hub, Input, Output, Persists};
use caisey_peer::store::{LedgerKey, LedgerRecord};
use caisey_peer::wire::{DocKind, Frame};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// A node's ledger (an agent's: what it used, started, denied or let expire).
pub type Records = BTreeMap<LedgerKey, LedgerRecord>;
/// Ledger entries written with a change.
pub type LedgerEntries = Vec<(LedgerKey, LedgerRecord)>;

/// What one node has on disk: all it comes back with after a crash.
#[derive(Debug, Default, Clone)]
pub struct Disk {
    /// Each document as its stored pieces (a compaction replaces them all).
    pub docs: BTreeMap<DocId, (DocKind, Vec<Vec<u8>>)>,
    pub chunks: BTreeMap<ChunkHash, Vec<u8>>,
    pub presences: BTreeMap<NodeId, Vec<u8>>,
    /// Sync states saved per (peer, document), handed to the hub when that peer connects.
    pub states: BTreeMap<(NodeId, DocId), Vec<u8>>,
    /// The node's own records (an agent's ledger), written in the same transaction as changes.
    pub records: Records,
    /// Refuses every write while set, like a full filesystem.
    pub full: bool,
    /// Bytes left, when limited: a write that needs more fails, a smaller one fits (and uses
    /// them up), like a filesystem that is almost full.
    pub room: Option<usize>,
    /// When set to n, only every n-th write succeeds: a filesystem at its limit, where space
    /// comes and goes as other files grow and shrink.
    pub flaky: Option<u32>,
    writes: u32,
}

impl Disk {
    /// Carries out one transaction's persists (and `records`), all or nothing.
    fn write(&mut self, outputs: &[Output], records: &[(LedgerKey, LedgerRecord)]) -> Result<(), String> {
        let writes = !records.is_empty()
            || outputs.iter().any(|o| {
                matches!(
                    o,
                    Output::PersistDoc { .. }
                        | Output::PersistChunk { .. }
                        | Output::PersistPresence { .. }
                        | Output::PersistSyncState { .. }
                        | Output::CheckWritable
                )
            });
        if !writes {
            return Ok(());
        }
        let size: usize = outputs
            .iter()
            .map(|o| match o {
                Output::PersistDoc { bytes, .. } => bytes.len(),
                Output::PersistChunk { data, .. } => data.len(),
                Output::PersistPresence { record, .. } => record.len(),
                Output::PersistSyncState { state, .. } => state.len(),
                _ => 8,
            })
            .sum::<usize>()
            + records.len() * 32;
        self.writes = self.writes.wrapping_add(1);
        let flaked = self.flaky.is_some_and(|n| !self.writes.is_multiple_of(n.max(1)));
        if self.full || flaked || self.room.is_some_and(|room| size > room) {
            return Err("No space left on device (os error 28)".into());
        }
        if let Some(room) = &mut self.room {
            *room -= size;
        }
        for o in outputs {
            match o {
                Output::PersistDoc { doc, kind, bytes, compact, .. } => {
                    let (_, pieces) = self.docs.entry(*doc).or_insert_with(|| (*kind, Vec::new()));
                    if *compact {
                        pieces.clear();
                    }
                    pieces.push(bytes.clone());
                }
                Output::PersistChunk { hash, data, .. } => {
                    self.chunks.insert(*hash, data.clone());
                }
                Output::PersistPresence { node, record } => {
                    self.presences.insert(*node, record.clone());
                }
                Output::PersistSyncState { doc, peer, state } => {
                    self.states.insert((*peer, *doc), state.clone());
                }
                _ => {}
            }
        }
        for (key, record) in records {
            self.records.entry(*key).or_insert(*record);
        }
        Ok(())
    }

    fn states_for(&self, peer: NodeId) -> Vec<(DocId, Vec<u8>)> {
        self.states.iter().filter(|((p, _), _)| *p == peer).map(|((_, d), s)| (*d, s.clone())).collect()
    }

    /// A hub loaded from this disk, as a restarted node loads it (the fleet first).
    pub fn load(&self, me: NodeId) -> Hub {
        let mut hub = Hub::new(me);
        let mut docs: Vec<_> = self.docs.iter().collect();
        docs.sort_by_key(|(_, (kind, _))| *kind != DocKind::Fleet);
        for (id, (kind, pieces)) in docs {
            let bytes = pieces.concat();
            if let Err(e) = hub.load(*id, *kind, &bytes, &|h| self.chunks.contains_key(h)) {
                // As the node does: fetched again from peers (the fleet must load).
                assert!(*kind != DocKind::Fleet, "the fleet persisted by {} does not load: {e}", me.short());
                hub.load_damaged(*id, *kind);
            }
        }
        for record in self.presences.values() {
            hub.load_presence(record.clone());
        }
        hub
    }
}

/// One simulated node: its hub (lost in a crash) and its disk (kept).
pub struct SimNode {
    pub hub: Hub,
    pub disk: Disk,
}

/// How the network misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Deliver frames of different connections in a random order (each connection stays FIFO).
    pub reorder: bool,
    /// Chance that a heartbeat or output chunk is delivered twice.
    pub duplicate: f64,
    /// Hand a node every frame waiting for it at once and carry out all its outputs as one
    /// transaction, as the node's driver does under load.
    pub batch: bool,
}

/// The simulated world. `now` is in milliseconds.
pub struct Sim {
    pub now: u64,
    pub nodes: BTreeMap<NodeId, SimNode>,
    /// Frames on their way, per directed connection, in order.
    wires: BTreeMap<(NodeId, NodeId), VecDeque<Input>>,
    /// Events for one node that do not travel on a wire (connects, disconnects).
    events: VecDeque<(NodeId, Input)>,
    links: BTreeMap<(NodeId, NodeId), ConnId>,
    next_conn: ConnId,
    rng: Xoshiro256PlusPlus,
    pub faults: Faults,
    /// Frames delivered so far.
    pub delivered: u64,
    /// Documents changed at each node since last taken ([`Sim::take_changed`]).
    changed: Vec<(NodeId, DocId)>,
}

impl Sim {
    /// A world of these hubs, each with an empty disk, no links, and faults off.
    pub fn new(hubs: Vec<Hub>, seed: u64) -> Self {
        Sim {
            now: 1,
            nodes: hubs.into_iter().map(|hub| (hub.me(), SimNode { hub, disk: Disk::default() })).collect(),
            wires: BTreeMap::new(),
            events: VecDeque::new(),
            links: BTreeMap::new(),
            next_conn: 1,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            faults: Faults::default(),
            delivered: 0,
            changed: Vec::new(),
        }
    }

    pub fn hub(&self, at: NodeId) -> &Hub {
        &self.nodes[&at].hub
    }

    pub fn linked(&self, a: NodeId, b: NodeId) -> bool {
        self.links.contains_key(&(a, b))
    }

    /// Opens a connection between `a` and `b` (replacing one they had).
    pub fn connect(&mut self, a: NodeId, b: NodeId) {
        if self.linked(a, b) {
            self.disconnect(a, b);
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        self.links.insert((a, b), conn);
        self.links.insert((b, a), conn);
        let stored = self.nodes[&a].disk.states_for(b);
        self.events.push_back((a, Input::Connected { peer: b, conn, stored }));
        let stored = self.nodes[&b].disk.states_for(a);
        self.events.push_back((b, Input::Connected { peer: a, conn, stored }));
    }

    /// Breaks the connection between `a` and `b`: frames on it are lost.
    pub fn disconnect(&mut self, a: NodeId, b: NodeId) {
        let Some(conn) = self.links.remove(&(a, b)) else { return };
        self.links.remove(&(b, a));
        self.wires.remove(&(a, b));
        self.wires.remove(&(b, a));
        self.events.push_back((a, Input::Disconnected { peer: b, conn }));
        self.events.push_back((b, Input::Disconnected { peer: a, conn }));
    }

    /// Breaks the link between `a` and `b`, or makes it again if both are up (not in `down`).
    pub fn toggle_link(&mut self, a: NodeId, b: NodeId, down: &[NodeId]) {
        if a == b {
            return;
        }
        if self.linked(a, b) {
            self.disconnect(a, b);
        } else if !down.contains(&a) && !down.contains(&b) {
            self.connect(a, b);
        }
    }

    /// Sets `at`'s disk: `0` full, `1` room for small writes only (`room` bytes), else fine.
    pub fn set_disk(&mut self, at: NodeId, state: u8, room: usize) {
        let disk = &mut self.node(at).disk;
        (disk.full, disk.room) = match state {
            0 => (true, None),
            1 => (false, Some(room)),
            _ => (false, None),
        };
    }

    /// Every disk has room again, and every pair of nodes is linked.
    pub fn heal(&mut self) {
        for node in self.nodes.values_mut() {
            (node.disk.full, node.disk.room, node.disk.flaky) = (false, None, None);
        }
        self.connect_all();
    }

    /// Connects every pair of nodes.
    pub fn connect_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                if !self.linked(*a, *b) {
                    self.connect(*a, *b);
                }
            }
        }
    }

    /// Kills `at`: its memory is gone, its links break; its disk stays.
    pub fn crash(&mut self, at: NodeId) {
        let peers: Vec<NodeId> = self.links.keys().filter(|(a, _)| *a == at).map(|(_, b)| *b).collect();
        for peer in peers {
            self.disconnect(at, peer);
        }
        self.events.retain(|(n, _)| *n != at);
        let node = self.nodes.get_mut(&at).expect("no such node");
        node.hub = Hub::new(at);
    }

    /// Starts `at` again from what its disk holds (not connected to anyone yet).
    pub fn restart(&mut self, at: NodeId) {
        let node = self.nodes.get_mut(&at).expect("no such node");
        node.hub = node.disk.load(at);
    }

    /// Delivers one frame or event, if any is waiting; false when nothing was.
    pub fn step(&mut self) -> bool {
        if let Some((at, input)) = self.events.pop_front() {
            self.deliver(at, input);
            return true;
        }
        let busy: Vec<(NodeId, NodeId)> = self.wires.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if busy.is_empty() {
            return false;
        }
        let pick = if self.faults.reorder { busy[self.rng.random_range(0..busy.len())] } else { busy[0] };
        let Some(input) = self.wires.get_mut(&pick).and_then(VecDeque::pop_front) else { return true };
        self.now += 1;
        self.delivered += 1;
        if !self.faults.batch {
            self.deliver(pick.1, input);
            return true;
        }
        // Everything else waiting for the same node, each wire in order, in one batch.
        let to = pick.1;
        let now = self.now;
        let mut out = self.node(to).hub.handle(now, input);
        let wires: Vec<(NodeId, NodeId)> = self.wires.keys().filter(|(_, b)| *b == to).copied().collect();
        for wire in wires {
            while let Some(input) = self.wires.get_mut(&wire).and_then(VecDeque::pop_front) {
                self.delivered += 1;
                out.extend(self.node(to).hub.handle(now, input));
            }
        }
        self.apply(to, out);
        true
    }

    /// Delivers everything waiting, and whatever that causes, until the network is quiet.
    /// Timers do not run: a node that cannot write stays so.
    pub fn run_until_quiet(&mut self) {
        let mut steps = 0u64;
        while self.step() {
            steps += 1;
            assert!(steps < 1_000_000, "the network never went quiet");
        }
    }

    /// Runs the network and the hubs' timers until `ms` have passed.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now + ms;
        loop {
            self.run_until_quiet();
            match self.next_timer() {
                Some((at, id)) if at <= until => self.fire_timer(at, id),
                _ => break,
            }
        }
        self.now = self.now.max(until);
    }

    /// The earliest hub timer, and whose.
    pub fn next_timer(&self) -> Option<(u64, NodeId)> {
        self.nodes.iter().filter_map(|(id, n)| Some((n.hub.poll_timeout()?, *id))).min()
    }

    /// Moves the clock to `at` (if later) and runs `id`'s hub timer.
    pub fn fire_timer(&mut self, at: u64, id: NodeId) {
        self.now = self.now.max(at);
        let now = self.now;
        let out = self.node(id).hub.handle_timeout(now);
        self.apply(id, out);
    }

    /// The documents that changed at each node since the last call.
    pub fn take_changed(&mut self) -> Vec<(NodeId, DocId)> {
        std::mem::take(&mut self.changed)
    }

    fn node(&mut self, at: NodeId) -> &mut SimNode {
        self.nodes.get_mut(&at).expect("no such node")
    }

    fn deliver(&mut self, at: NodeId, input: Input) {
        let now = self.now;
        let out = self.node(at).hub.handle(now, input);
        self.apply(at, out);
    }

    /// Carries out a hub's outputs as the node's driver does: the persists as one transaction,
    /// its outcome reported back, and then the sends (when the write failed, all but sync
    /// messages, which may carry or acknowledge what is not durable).
    /// Returns whether what was to be persisted is durable.
    pub fn apply(&mut self, at: NodeId, outputs: Vec<Output>) -> bool {
        self.apply_with(at, &[], outputs)
    }

    /// Like [`Sim::apply`], with the node's own `records` in the same transaction.
    pub fn apply_with(&mut self, at: NodeId, records: &[(LedgerKey, LedgerRecord)], outputs: Vec<Output>) -> bool {
        let written = self.node(at).disk.write(&outputs, records);
        let mut persists = Persists::default();
        let mut any_write = false;
        for o in &outputs {
            match o {
                Output::PersistDoc { doc, heads, .. } => persists.docs.push((*doc, heads.clone())),
                Output::PersistChunk { doc, hash, data } => persists.chunks.push((*doc, *hash, data.clone())),
                Output::PersistPresence { .. } | Output::PersistSyncState { .. } | Output::CheckWritable => {}
                _ => continue,
            }
            any_write = true;
        }
        for o in outputs {
            match o {
                Output::Send { peer, frame, .. } if written.is_ok() || !matches!(frame, Frame::Sync { .. }) => {
                    self.transmit(at, peer, frame);
                }
                Output::SendChunks { peer, doc, hashes, .. } => {
                    for hash in hashes {
                        let frame = match self.nodes[&at].disk.chunks.get(&hash) {
                            Some(data) => Frame::Chunk { doc, data: data.clone() },
                            None => Frame::Lacking { doc, hashes: vec![hash] },
                        };
                        self.transmit(at, peer, frame);
                    }
                }
                Output::Disconnect { peer, .. } => self.disconnect(at, peer),
                Output::DocChanged { doc } => self.changed.push((at, doc)),
                _ => {}
            }
        }
        if !any_write && records.is_empty() {
            return true;
        }
        let now = self.now;
        let durable = written.is_ok();
        let report = match written {
            Ok(()) => Input::Persisted(persists),
            Err(error) => Input::PersistFailed { error, persists },
        };
        let more = self.node(at).hub.handle(now, report);
        self.apply(at, more);
        durable
    }

    /// Puts a frame on the wire from `from` to `to`, if they are linked (lost otherwise).
    fn transmit(&mut self, from: NodeId, to: NodeId, frame: Frame) {
        let Some(conn) = self.links.get(&(from, to)).copied() else { return };
        let twice = matches!(frame, Frame::Presence { .. } | Frame::Chunk { .. })
            && self.faults.duplicate > 0.0
            && self.rng.random_bool(self.faults.duplicate);
        let wire = self.wires.entry((from, to)).or_default();
        if twice {
            wire.push_back(Input::Frame { peer: from, conn, frame: frame.clone() });
        }
        wire.push_back(Input::Frame { peer: from, conn, frame });
    }

    /// Changes a document at `at`; returns the closure's result and whether the change is
    /// durable (acknowledged).
    pub fn change<R>(&mut self, at: NodeId, doc: DocId, f: impl FnOnce(&mut Automerge) -> R) -> (R, bool) {
        let now = self.now;
        let (r, out) = self.node(at).hub.change(doc, now, f).expect("no such document");
        (r, self.apply(at, out))
    }

    /// Changes a document at `at` with the verified fleet and the node's own records at hand,
    /// writing the records the closure returns in the same transaction. A closure that fails
    /// must not have changed the document (as `SessionWriter`'s transactions do). `None`: no
    /// such document; else the result and whether it is durable.
    pub fn change_guarded<R, E>(
        &mut self,
        at: NodeId,
        doc: DocId,
        f: impl FnOnce(&mut Automerge, &Fleet, &Records) -> Result<(R, LedgerEntries), E>,
    ) -> Option<(Result<R, E>, bool)> {
        let now = self.now;
        let node = self.node(at);
        let ledger = node.disk.records.clone();
        let (result, out) = node.hub.change_with_fleet(doc, now, |d, fleet| f(d, fleet, &ledger))?;
        Some(match result {
            Ok((r, records)) => {
                let durable = self.apply_with(at, &records, out);
                (Ok(r), durable)
            }
            Err(e) => (Err(e), self.apply(at, out)),
        })
    }

    /// A node's own records as its disk holds them (an agent's ledger).
    pub fn records(&self, at: NodeId) -> &Records {
        &self.nodes[&at].disk.records
    }

    /// Writes a node's own records alone; whether they are durable.
    pub fn write_records(&mut self, at: NodeId, records: &[(LedgerKey, LedgerRecord)]) -> bool {
        self.apply_with(at, records, Vec::new())
    }

    /// Adds a document made at `at`; whether it is durable.
    pub fn create(&mut self, at: NodeId, id: DocId, kind: DocKind, doc: Automerge) -> bool {
        let now = self.now;
        let out = self.node(at).hub.create(id, kind, doc, now);
        self.apply(at, out)
    }

    /// An agent's runner: the bytes, then their references, carried out together as the node
    /// does. Whether they are durable.
    pub fn output(&mut self, at: NodeId, doc: DocId, agent: &Signer, chunks: Vec<OutputChunk>) -> bool {
        let held = chunks.iter().map(|c| (chunk_hash(&c.data), c.data.clone())).collect();
        let now = self.now;
        let refs: Vec<OutputRef> = chunks.iter().map(OutputChunk::reference).collect();
        let node = self.node(at);
        let mut out = node.hub.hold_chunks(doc, held);
        let (r, more) =
            node.hub.change(doc, now, |d| SessionWriter::append_output(d, agent, &refs)).expect("no document");
        r.expect("output references are written");
        out.extend(more);
        self.apply(at, out)
    }

    /// Session `doc` as `at` holds it, output from its disk.
    pub fn view(&self, at: NodeId, doc: DocId, fleet: &Fleet) -> SessionView {
        let node = &self.nodes[&at];
        SessionView::read(node.hub.doc(&doc).expect("no document"), fleet, &node.disk.chunks).expect("session reads")
    }

    pub fn heads(&self, at: NodeId, doc: DocId) -> Option<Vec<ChangeHash>> {
        self.nodes[&at].hub.doc(&doc).map(|d| d.get_heads())
    }

    /// Whether every node that holds `doc` holds the same heads.
    pub fn converged(&self, doc: DocId) -> bool {
        let heads: BTreeSet<Vec<ChangeHash>> =
            self.nodes.values().filter_map(|n| n.hub.doc(&doc).map(|d| d.get_heads())).collect();
        heads.len() <= 1
    }

    /// Injects a frame as if `from` had sent it to `to` on their connection.
    pub fn inject(&mut self, from: NodeId, to: NodeId, frame: Frame) {
        self.transmit(from, to, frame);
    }
}
