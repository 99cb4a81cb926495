//! The sync core: a sans-IO state machine that decides, for every connected peer and every
//! document, what to send next — and what must be made durable first.
//!
//! It holds the documents and one `automerge::sync::State` per (peer, document), takes events
//! (`Input`) with the current time, and returns `Output`s for a driver to carry out in order:
//! persist before send, so nothing is acknowledged that a crash could lose. It owns no socket,
//! clock or file, which is what lets `tests` below run many peers, partitions and reconnects
//! deterministically in one thread.
//!
//! Decisions it makes:
//! - On connect: offer every document the peer may hold (see [`crate::access`]).
//! - On any change (local or received): persist it incrementally, then offer it to every
//!   connected peer allowed to hold it — that is what makes a relay forward, and streaming live.
//! - On a fleet change: membership may have changed, so re-offer everything and drop peers who
//!   are no longer members.
//! - Output bytes: a session references its output chunks by hash; the bytes travel beside the
//!   document. When new references arrive from a peer, ask that peer for the chunks we lack
//!   (`Want`); answer every `Want` with the chunks we hold and `Lacking` for the rest, and send
//!   those on when they arrive. Bytes are persisted before they are forwarded, and only bytes
//!   whose hash a session references are accepted.
//! - Heartbeats: an agent's signed presence travels as its own frame, not as a document change
//!   (a change every few seconds would grow every machine document's history without end). The
//!   newest per agent is kept, persisted, and passed on to whoever may see that machine.
//! - A hostile peer (non-member, malformed message, foreign org) is disconnected with a reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::sync::{Message, State as SyncState, SyncDoc};
use automerge::{Automerge, ChangeHash};
use caisey_doc::fleet::{Fleet, Presence, Role};
use caisey_doc::id::{DocId, NodeId};
use caisey_doc::record::{RecordKind, verify_kind};
use caisey_doc::session::{ChunkHash, SessionView, chunk_hash};

use crate::access::{may_introduce, may_share};
use crate::wire::{DocKind, Frame, MAX_HASHES};

/// Identifies one connection, so events from a replaced connection are told apart.
pub type ConnId = u64;

/// Compaction rewrites a document once the incremental tail outgrows the last full save (and
/// this floor), which keeps total rewriting linear in the document's size.
const COMPACT_FLOOR: usize = 1024 * 1024;

#[derive(Debug)]
pub enum Input {
    /// A connection to `peer` is up; `stored` holds sync states persisted from earlier sessions.
    Connected {
        peer: NodeId,
        conn: ConnId,
        stored: Vec<(DocId, Vec<u8>)>,
    },
    Disconnected {
        peer: NodeId,
        conn: ConnId,
    },
    Frame {
        peer: NodeId,
        conn: ConnId,
        frame: Frame,
    },
}

/// Why an older connection of a peer is dropped when a newer one arrives: routine (a peer
/// reconnecting from a new address, two dialling at once), not a fault.
pub const REPLACED: &str = "replaced by a newer connection";

#[derive(Debug, PartialEq)]
pub enum Output {
    /// Make these bytes durable for `doc`. `compact`: they replace everything stored before.
    PersistDoc {
        doc: DocId,
        kind: DocKind,
        bytes: Vec<u8>,
        compact: bool,
    },
    PersistSyncState {
        doc: DocId,
        peer: NodeId,
        state: Vec<u8>,
    },
    /// Make an agent's newest heartbeat durable (replacing the one before).
    PersistPresence {
        node: NodeId,
        record: Vec<u8>,
    },
    /// Make an output chunk durable, under its hash.
    PersistChunk {
        hash: ChunkHash,
        data: Vec<u8>,
    },
    /// Send `peer` these chunks of `doc` from the store (each as a `Frame::Chunk`).
    SendChunks {
        peer: NodeId,
        conn: ConnId,
        doc: DocId,
        hashes: Vec<ChunkHash>,
    },
    Send {
        peer: NodeId,
        conn: ConnId,
        frame: Frame,
    },
    Disconnect {
        peer: NodeId,
        conn: ConnId,
        reason: String,
    },
    /// A peer sent something we ignored (not fatal); for the log.
    Ignored {
        peer: NodeId,
        reason: String,
    },
    DocChanged {
        doc: DocId,
    },
    PeerUp {
        peer: NodeId,
    },
    PeerDown {
        peer: NodeId,
    },
}

struct Entry {
    kind: DocKind,
    doc: Automerge,
    saved_heads: Vec<ChangeHash>,
    compacted_len: usize,
    incremental_len: usize,
    /// For sessions: the agents it is shared with, re-derived on every change.
    targets: Vec<NodeId>,
    /// For sessions: how many records (besides output) failed verification, to notice which
    /// peer brought new ones.
    quarantined: usize,
    /// For sessions: the output chunks referenced, and which we hold.
    output: OutputIndex,
}

impl Entry {
    fn new(kind: DocKind, doc: Automerge) -> Self {
        Entry {
            kind,
            saved_heads: doc.get_heads(),
            doc,
            compacted_len: 0,
            incremental_len: 0,
            targets: vec![],
            quarantined: 0,
            output: OutputIndex::default(),
        }
    }
}

/// What a session's output references, and which of those bytes this node holds. Bounded by
/// the document: only referenced hashes are tracked.
#[derive(Default)]
struct OutputIndex {
    /// How far each request's output list has been scanned.
    cursors: BTreeMap<String, usize>,
    /// Every referenced chunk: true once its bytes are in our store.
    held: HashMap<ChunkHash, bool>,
    /// Peers that asked for chunks we do not hold yet; they get them when they arrive.
    wanted_by: HashMap<ChunkHash, BTreeSet<NodeId>>,
}

impl OutputIndex {
    /// Scans references added since the last scan; returns the chunks we now know we lack.
    fn scan(&mut self, doc: &Automerge, held: &dyn Fn(&ChunkHash) -> bool) -> Vec<ChunkHash> {
        let mut missing = Vec::new();
        for hash in SessionView::scan_output_refs(doc, &mut self.cursors) {
            if let std::collections::hash_map::Entry::Vacant(v) = self.held.entry(hash) {
                let have = held(&hash);
                v.insert(have);
                if !have {
                    missing.push(hash);
                }
            }
        }
        missing
    }

    fn missing(&self) -> Vec<ChunkHash> {
        self.held.iter().filter(|(_, have)| !**have).map(|(h, _)| *h).collect()
    }
}

struct Peer {
    conn: ConnId,
    /// Its role as of the current fleet. At a relay most peers are agents, and a change is
    /// offered only to the agents a document targets, found without a fleet lookup per peer.
    role: Option<Role>,
    connected_at: u64,
    last_heard: Option<u64>,
    /// The documents the peer said it offers us (and we would accept), once its index arrived.
    index: Option<BTreeSet<DocId>>,
    states: BTreeMap<DocId, SyncState>,
    /// Output chunks we asked this peer for and it has not answered yet.
    asked: BTreeSet<(DocId, ChunkHash)>,
}

/// What the hub knows about a connected peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub peer: NodeId,
    pub connected_at: u64,
    pub last_heard: Option<u64>,
}

pub struct Hub {
    me: NodeId,
    fleet_doc: Option<DocId>,
    /// The verified fleet, with each agent's presence and card merged in from its machine document.
    fleet: Fleet,
    /// Machine document id -> the agent it describes (derived from the fleet's agents).
    machine_owners: BTreeMap<DocId, NodeId>,
    docs: BTreeMap<DocId, Entry>,
    peers: BTreeMap<NodeId, Peer>,
    /// Each agent's newest heartbeat, as signed (to pass on) and as read.
    heartbeats: BTreeMap<NodeId, (Presence, Vec<u8>)>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("me", &self.me)
            .field("docs", &self.docs.len())
            .field("peers", &self.peers.len())
            .finish()
    }
}

impl Hub {
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            fleet_doc: None,
            fleet: Fleet::default(),
            machine_owners: BTreeMap::new(),
            docs: BTreeMap::new(),
            peers: BTreeMap::new(),
            heartbeats: BTreeMap::new(),
        }
    }

    /// Takes a heartbeat read from the store at startup (after the fleet is loaded).
    pub fn load_presence(&mut self, record: Vec<u8>) {
        self.take_presence(None, record, &mut Vec::new());
    }

    /// This node's own heartbeat (an agent's signed `Presence`): kept, persisted and sent to
    /// every connected peer that may see this machine.
    pub fn announce(&mut self, record: Vec<u8>) -> Vec<Output> {
        let mut out = Vec::new();
        self.take_presence(None, record, &mut out);
        out
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Adds a document read from the store at startup; `held` says which output chunks the
    /// store has.
    pub fn load(
        &mut self,
        id: DocId,
        kind: DocKind,
        bytes: &[u8],
        held: &dyn Fn(&ChunkHash) -> bool,
    ) -> Result<(), automerge::AutomergeError> {
        let doc = Automerge::load(bytes)?;
        let mut entry = Entry::new(kind, doc);
        entry.compacted_len = bytes.len();
        entry.targets = targets_of(&id, &entry, &self.fleet, self.machine_owners.get(&id));
        if kind == DocKind::Session {
            entry.quarantined =
                SessionView::read_without_output(&entry.doc, &self.fleet).map(|v| v.quarantined.len()).unwrap_or(0);
            entry.output.scan(&entry.doc, held);
        }
        self.docs.insert(id, entry);
        match kind {
            DocKind::Fleet => {
                self.fleet_doc = Some(id);
                self.refresh_fleet();
            }
            DocKind::Machine => self.merge_machine(id),
            DocKind::Session => {}
        }
        Ok(())
    }

    /// Adds a document created here (or received out of band, such as at enrollment).
    pub fn create(&mut self, id: DocId, kind: DocKind, doc: Automerge, now: u64) -> Vec<Output> {
        let mut out = Vec::new();
        // Registered empty, then changed: the one code path persists, re-derives access and offers.
        self.docs.insert(id, Entry::new(kind, Automerge::new()));
        if kind == DocKind::Fleet {
            self.fleet_doc = Some(id);
        }
        if let Some(entry) = self.docs.get_mut(&id) {
            entry.doc = doc;
        }
        let missing = self.after_change(id, now, &mut out);
        self.ask_everyone(id, missing, &mut out);
        out
    }

    /// Changes a document locally; returns the closure's result and what to do about the change.
    pub fn change<R>(&mut self, id: DocId, now: u64, f: impl FnOnce(&mut Automerge) -> R) -> Option<(R, Vec<Output>)> {
        self.change_with_fleet(id, now, |doc, _| f(doc))
    }

    /// Like [`Hub::change`], with the verified fleet at hand (to check the change against it).
    pub fn change_with_fleet<R>(
        &mut self,
        id: DocId,
        now: u64,
        f: impl FnOnce(&mut Automerge, &Fleet) -> R,
    ) -> Option<(R, Vec<Output>)> {
        let entry = self.docs.get_mut(&id)?;
        let r = f(&mut entry.doc, &self.fleet);
        let mut out = Vec::new();
        let missing = self.after_change(id, now, &mut out);
        self.ask_everyone(id, missing, &mut out);
        Some((r, out))
    }

    /// Takes output bytes produced here (an agent's runner) for session `id`. Call it before
    /// the change that references them and carry out both outputs together, so the bytes are
    /// durable no later than their references.
    /// Each chunk comes with its hash, computed once for its reference.
    pub fn hold_chunks(&mut self, id: DocId, chunks: Vec<(ChunkHash, Vec<u8>)>) -> Vec<Output> {
        let mut out = Vec::new();
        for (hash, data) in chunks {
            self.take_chunk(id, None, hash, data, &mut out);
        }
        out
    }

    /// Output bytes of session `id` found damaged in the store: no longer held, and asked of
    /// every peer that may hold them.
    pub fn lost_chunks(&mut self, id: DocId, hashes: Vec<ChunkHash>) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(e) = self.docs.get_mut(&id) else { return out };
        let lost: Vec<ChunkHash> = hashes.into_iter().filter(|h| e.output.held.contains_key(h)).collect();
        for h in &lost {
            e.output.held.insert(*h, false);
        }
        self.ask_everyone(id, lost, &mut out);
        out
    }

    pub fn doc(&self, id: &DocId) -> Option<&Automerge> {
        self.docs.get(id).map(|e| &e.doc)
    }

    /// How many output chunks session `id` references that are not here yet (0 for other
    /// documents): a command's end is only the whole story once this is 0.
    pub fn missing_output(&self, id: &DocId) -> usize {
        self.docs.get(id).map(|e| e.output.held.values().filter(|have| !**have).count()).unwrap_or(0)
    }

    pub fn kind(&self, id: &DocId) -> Option<DocKind> {
        self.docs.get(id).map(|e| e.kind)
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    pub fn fleet_doc(&self) -> Option<DocId> {
        self.fleet_doc
    }

    pub fn docs(&self) -> impl Iterator<Item = (DocId, DocKind)> + '_ {
        self.docs.iter().map(|(id, e)| (*id, e.kind))
    }

    pub fn peers(&self) -> Vec<PeerInfo> {
        self.peers
            .iter()
            .map(|(p, s)| PeerInfo { peer: *p, connected_at: s.connected_at, last_heard: s.last_heard })
            .collect()
    }

    /// True once we hold every document `peer` offered, and it holds exactly our heads of every
    /// document it may hold: nothing left to exchange.
    pub fn in_sync_with(&self, peer: &NodeId) -> bool {
        let Some(p) = self.peers.get(peer) else { return false };
        let Some(index) = &p.index else { return false };
        let in_sync = |id: &DocId, e: &Entry| {
            let ours: BTreeSet<_> = e.doc.get_heads().into_iter().collect();
            p.states
                .get(id)
                .and_then(|s| s.their_heads.as_ref())
                .is_some_and(|h| h.iter().copied().collect::<BTreeSet<_>>() == ours)
        };
        p.asked.is_empty()
            && index.iter().all(|id| self.docs.get(id).is_some_and(|e| in_sync(id, e)))
            && self
                .docs
                .iter()
                .filter(|(_, e)| may_share(&self.fleet, peer, e.kind, &e.targets))
                .all(|(id, e)| in_sync(id, e))
    }

    /// Why [`Hub::in_sync_with`] is false, for logs: each lagging document and what is missing.
    pub fn sync_lag(&self, peer: &NodeId) -> Vec<String> {
        let Some(p) = self.peers.get(peer) else { return vec!["not connected".into()] };
        let Some(index) = &p.index else { return vec!["no index received yet".into()] };
        let mut lag = Vec::new();
        if !p.asked.is_empty() {
            lag.push(format!("{} output chunk(s) asked of it, not answered yet", p.asked.len()));
        }
        let shared =
            self.docs.iter().filter(|(_, e)| may_share(&self.fleet, peer, e.kind, &e.targets)).map(|(id, _)| *id);
        for id in index.iter().copied().chain(shared).collect::<BTreeSet<_>>() {
            let Some(e) = self.docs.get(&id) else {
                lag.push(format!("{}: offered but not received", id.short()));
                continue;
            };
            let theirs = p.states.get(&id).and_then(|s| s.their_heads.clone());
            let ours = e.doc.get_heads();
            if theirs.as_ref().map(|h| h.iter().collect::<BTreeSet<_>>()) != Some(ours.iter().collect()) {
                lag.push(format!(
                    "{} ({:?}): ours {} heads, theirs {:?}",
                    id.short(),
                    e.kind,
                    ours.len(),
                    theirs.map(|h| h.len())
                ));
            }
        }
        lag
    }

    pub fn handle(&mut self, now: u64, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Connected { peer, conn, stored } => self.on_connected(peer, conn, stored, now, &mut out),
            Input::Disconnected { peer, conn } => self.on_disconnected(peer, conn, &mut out),
            Input::Frame { peer, conn, frame } => {
                if self.peers.get(&peer).is_some_and(|p| p.conn == conn) {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.last_heard = Some(now);
                    }
                    self.on_frame(peer, conn, frame, now, &mut out);
                }
            }
        }
        out
    }

    fn on_connected(
        &mut self,
        peer: NodeId,
        conn: ConnId,
        stored: Vec<(DocId, Vec<u8>)>,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        let Some(role) = self.fleet.role_of(&peer) else {
            out.push(Output::Disconnect { peer, conn, reason: "not a member of this org".into() });
            return;
        };
        if let Some(old) = self.peers.remove(&peer) {
            self.save_states(peer, &old, out);
            out.push(Output::Disconnect { peer, conn: old.conn, reason: REPLACED.into() });
        }
        let states =
            stored.into_iter().filter_map(|(doc, bytes)| Some((doc, SyncState::decode(&bytes).ok()?))).collect();
        self.peers.insert(
            peer,
            Peer {
                conn,
                role: Some(role),
                connected_at: now,
                last_heard: None,
                index: None,
                states,
                asked: BTreeSet::new(),
            },
        );
        out.push(Output::PeerUp { peer });
        let offered: Vec<(DocId, DocKind)> = self
            .docs
            .iter()
            .filter(|(_, e)| may_share(&self.fleet, &peer, e.kind, &e.targets))
            .map(|(id, e)| (*id, e.kind))
            .collect();
        out.push(Output::Send { peer, conn, frame: Frame::Index { docs: offered } });
        for (node, (_, record)) in &self.heartbeats {
            if may_share(&self.fleet, &peer, DocKind::Machine, &[*node]) {
                out.push(Output::Send { peer, conn, frame: Frame::Presence { record: record.clone() } });
            }
        }
        let ids: Vec<DocId> = self.docs.keys().copied().collect();
        for id in ids {
            self.offer(peer, id, out);
            // Output still missing here may be on this peer (a reconnecting agent, say).
            let missing = self.docs.get(&id).map(|e| e.output.missing()).unwrap_or_default();
            self.ask(peer, id, missing, out);
        }
    }

    fn on_disconnected(&mut self, peer: NodeId, conn: ConnId, out: &mut Vec<Output>) {
        if self.peers.get(&peer).is_some_and(|p| p.conn == conn) {
            if let Some(p) = self.peers.remove(&peer) {
                self.save_states(peer, &p, out);
                // Output asked of it and never received is asked of everyone else who may hold
                // it: a peer that died mid-answer must not leave a session waiting for good.
                let mut unanswered: BTreeMap<DocId, Vec<ChunkHash>> = BTreeMap::new();
                for (doc, hash) in p.asked {
                    if self.docs.get(&doc).is_some_and(|e| e.output.held.get(&hash) == Some(&false)) {
                        unanswered.entry(doc).or_default().push(hash);
                    }
                }
                for (doc, hashes) in unanswered {
                    self.ask_everyone(doc, hashes, out);
                }
            }
            out.push(Output::PeerDown { peer });
        }
    }

    fn save_states(&self, peer: NodeId, p: &Peer, out: &mut Vec<Output>) {
        for (doc, state) in &p.states {
            out.push(Output::PersistSyncState { doc: *doc, peer, state: state.encode() });
        }
    }

    fn on_frame(&mut self, peer: NodeId, conn: ConnId, frame: Frame, now: u64, out: &mut Vec<Output>) {
        let (id, kind, message) = match frame {
            Frame::Sync { doc, kind, message } => (doc, kind, message),
            Frame::Want { doc, hashes } => return self.on_want(peer, conn, doc, hashes, out),
            Frame::Presence { record } => return self.take_presence(Some(peer), record, out),
            Frame::Chunk { doc, data } => {
                let hash = chunk_hash(&data);
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.asked.remove(&(doc, hash));
                }
                return self.take_chunk(doc, Some(peer), hash, data, out);
            }
            Frame::Lacking { doc, hashes } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    hashes.iter().for_each(|h| {
                        p.asked.remove(&(doc, *h));
                    });
                }
                return;
            }
            Frame::Index { docs } => {
                // Only what we would accept counts; the rest will never arrive here.
                let accepted = docs
                    .into_iter()
                    .filter(|(id, kind)| match (self.docs.get(id), kind) {
                        (Some(e), _) => e.kind == *kind,
                        (None, kind) => may_introduce(&self.fleet, &peer, *kind, self.machine_owners.get(id).copied()),
                    })
                    .map(|(id, _)| id)
                    .collect();
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.index = Some(accepted);
                }
                return;
            }
            Frame::Hello { .. } => return, // a second Hello is harmless
        };
        let drop = |reason: &str| Output::Disconnect { peer, conn, reason: reason.to_string() };
        let ignore = |reason: String| Output::Ignored { peer, reason };
        // A machine document's id is derived from its agent: nothing else may take that id.
        if kind != DocKind::Machine && self.machine_owners.contains_key(&id) {
            return out.push(ignore(format!("a {kind:?} document under machine document id {}", id.short())));
        }
        match self.docs.get(&id) {
            Some(e) if e.kind != kind => {
                return out.push(ignore(format!("document {} offered as {kind:?}, held as {:?}", id.short(), e.kind)));
            }
            Some(e) if !may_share(&self.fleet, &peer, e.kind, &e.targets) => {
                return out.push(Output::Ignored {
                    peer,
                    reason: format!("changes to document {} it may not hold", id.short()),
                });
            }
            Some(_) => {}
            None if kind == DocKind::Fleet => return out.push(drop("offered a fleet document of another org")),
            None if !may_introduce(&self.fleet, &peer, kind, self.machine_owners.get(&id).copied()) => {
                return out.push(Output::Ignored {
                    peer,
                    reason: format!("offered {kind:?} document {} it may not introduce", id.short()),
                });
            }
            None => {
                let mut entry = Entry::new(kind, Automerge::new());
                // Now, not at the first change: a first sync message usually carries none, and
                // the owner of a machine document must be allowed to send the next one.
                entry.targets = targets_of(&id, &entry, &self.fleet, self.machine_owners.get(&id));
                self.docs.insert(id, entry);
            }
        }
        let message = match Message::decode(&message) {
            Ok(m) => m,
            Err(e) => return out.push(drop(&format!("malformed sync message: {e}"))),
        };
        let Some(entry) = self.docs.get_mut(&id) else { return };
        let state = self.peers.get_mut(&peer).map(|p| p.states.entry(id).or_default());
        let Some(state) = state else { return };
        let before = entry.doc.get_heads();
        if let Err(e) = entry.doc.receive_sync_message(state, message) {
            return out.push(drop(&format!("sync message could not be applied: {e}")));
        }
        if entry.kind == DocKind::Session && entry.doc.get_heads() != before {
            let quarantined =
                SessionView::read_without_output(&entry.doc, &self.fleet).map(|v| v.quarantined).unwrap_or_default();
            let now_quarantined = quarantined.len();
            if now_quarantined > entry.quarantined {
                let n = now_quarantined - entry.quarantined;
                let why = quarantined.last().map(|q| format!("{}: {}", q.place, q.why)).unwrap_or_default();
                out.push(Output::Ignored {
                    peer,
                    reason: format!(
                        "delivered {n} invalid record(s) in session {}, quarantined (last: {why})",
                        id.short()
                    ),
                });
            }
            entry.quarantined = now_quarantined;
        }
        let missing = self.after_change(id, now, out);
        // Whoever sent the references holds the bytes, or will.
        self.ask(peer, id, missing, out);
        self.offer(peer, id, out);
    }

    /// A peer asks for output chunks: send what we hold, say what we lack, and remember who
    /// is waiting for it.
    fn on_want(&mut self, peer: NodeId, conn: ConnId, doc: DocId, hashes: Vec<ChunkHash>, out: &mut Vec<Output>) {
        let (mut have, mut lacking) = (Vec::new(), Vec::new());
        match self.docs.get_mut(&doc) {
            Some(e) if e.kind == DocKind::Session && may_share(&self.fleet, &peer, e.kind, &e.targets) => {
                for h in hashes {
                    match e.output.held.get(&h) {
                        Some(true) => have.push(h),
                        Some(false) => {
                            e.output.wanted_by.entry(h).or_default().insert(peer);
                            lacking.push(h);
                        }
                        None => lacking.push(h),
                    }
                }
            }
            // Nothing is said about documents it may not hold: all "lacking".
            _ => lacking = hashes,
        }
        if !have.is_empty() {
            out.push(Output::SendChunks { peer, conn, doc, hashes: have });
        }
        if !lacking.is_empty() {
            out.push(Output::Send { peer, conn, frame: Frame::Lacking { doc, hashes: lacking } });
        }
    }

    /// Output bytes arrived (from `from`, or produced here): keep them if `doc` references them
    /// and we lacked them, then pass them to whoever asked us.
    fn take_chunk(&mut self, doc: DocId, from: Option<NodeId>, hash: ChunkHash, data: Vec<u8>, out: &mut Vec<Output>) {
        let Some(e) = self.docs.get_mut(&doc).filter(|e| e.kind == DocKind::Session) else { return };
        match (from, e.output.held.get(&hash)) {
            // Received: only bytes we referenced and lacked (duplicates are normal; ignored).
            (Some(_), Some(false)) | (None, Some(false) | None) => {}
            _ => return,
        }
        e.output.held.insert(hash, true);
        let waiting = e.output.wanted_by.remove(&hash).unwrap_or_default();
        let targets = e.targets.clone();
        for peer in waiting.into_iter().filter(|p| Some(*p) != from) {
            if let Some(p) = self.peers.get(&peer)
                && may_share(&self.fleet, &peer, DocKind::Session, &targets)
            {
                out.push(Output::Send { peer, conn: p.conn, frame: Frame::Chunk { doc, data: data.clone() } });
            }
        }
        // Persisting comes first when carried out (the driver persists before it sends).
        out.push(Output::PersistChunk { hash, data });
        if from.is_some() {
            out.push(Output::DocChanged { doc });
        }
    }

    /// A heartbeat arrived (from `from`, or made here): if it is an agent's own, signed and newer
    /// than what we have, keep it and pass it on. Older or invalid ones are dropped quietly (a
    /// heartbeat relayed by two peers arrives twice).
    fn take_presence(&mut self, from: Option<NodeId>, record: Vec<u8>, out: &mut Vec<Output>) {
        let Ok(v) = verify_kind(&record, RecordKind::Presence) else { return };
        let Ok(p) = v.json::<Presence>() else { return };
        if p.node != v.author || self.fleet.role_of(&p.node) != Some(Role::Agent) {
            return;
        }
        if self.fleet.presence.get(&p.node).is_some_and(|known| known.at >= p.at) {
            return;
        }
        let node = p.node;
        self.fleet.presence.insert(node, p.clone());
        self.heartbeats.insert(node, (p, record.clone()));
        for (peer, state) in &self.peers {
            // Agents never see another agent's presence: skipped without a fleet lookup.
            if Some(*peer) != from
                && state.role != Some(Role::Agent)
                && may_share(&self.fleet, peer, DocKind::Machine, &[node])
            {
                out.push(Output::Send {
                    peer: *peer,
                    conn: state.conn,
                    frame: Frame::Presence { record: record.clone() },
                });
            }
        }
        out.push(Output::PersistPresence { node, record });
    }

    /// Asks `peer` for output chunks of `doc` (if it may hold the session).
    fn ask(&mut self, peer: NodeId, doc: DocId, hashes: Vec<ChunkHash>, out: &mut Vec<Output>) {
        let (Some(e), Some(p)) = (self.docs.get(&doc), self.peers.get_mut(&peer)) else { return };
        if hashes.is_empty() || !may_share(&self.fleet, &peer, e.kind, &e.targets) {
            return;
        }
        for batch in hashes.chunks(MAX_HASHES) {
            p.asked.extend(batch.iter().map(|h| (doc, *h)));
            out.push(Output::Send { peer, conn: p.conn, frame: Frame::Want { doc, hashes: batch.to_vec() } });
        }
    }

    /// Asks every connected peer that may hold `doc` (references made here without their bytes,
    /// which a well-behaved node never does, or a document created from elsewhere).
    fn ask_everyone(&mut self, doc: DocId, hashes: Vec<ChunkHash>, out: &mut Vec<Output>) {
        if hashes.is_empty() {
            return;
        }
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.ask(peer, doc, hashes.clone(), out);
        }
    }

    /// Persists and announces whatever changed in `id` since it was last saved; returns the
    /// output chunks it newly references that we lack.
    fn after_change(&mut self, id: DocId, _now: u64, out: &mut Vec<Output>) -> Vec<ChunkHash> {
        let Some(entry) = self.docs.get_mut(&id) else { return vec![] };
        let heads = entry.doc.get_heads();
        if heads == entry.saved_heads {
            return vec![];
        }
        let missing = match entry.kind {
            DocKind::Session => entry.output.scan(&entry.doc, &|_| false),
            _ => vec![],
        };
        let incremental = entry.doc.save_after(&entry.saved_heads);
        entry.saved_heads = heads;
        let (bytes, compact) = if entry.incremental_len + incremental.len() > entry.compacted_len.max(COMPACT_FLOOR) {
            // Uncompressed: command output is mostly incompressible or already written once, and
            // deflating the whole document on every compaction dominated streaming CPU (measured
            // with perf on caisey-bench: about half of all samples in zlib).
            let full = entry.doc.save_nocompress();
            entry.compacted_len = full.len();
            entry.incremental_len = 0;
            (full, true)
        } else {
            entry.incremental_len += incremental.len();
            (incremental, false)
        };
        out.push(Output::PersistDoc { doc: id, kind: entry.kind, bytes, compact });
        out.push(Output::DocChanged { doc: id });
        let kind = entry.kind;
        let fleet_changed = kind == DocKind::Fleet;
        if kind == DocKind::Machine {
            self.merge_machine(id);
        }
        if fleet_changed {
            self.refresh_fleet();
            // Anyone no longer a member goes.
            let gone: Vec<(NodeId, ConnId)> =
                self.peers.iter().filter(|(p, _)| self.fleet.role_of(p).is_none()).map(|(p, s)| (*p, s.conn)).collect();
            for (peer, conn) in gone {
                out.push(Output::Disconnect { peer, conn, reason: "no longer a member".into() });
            }
        } else if let Some(entry) = self.docs.get(&id) {
            let targets = targets_of(&id, entry, &self.fleet, self.machine_owners.get(&id));
            if let Some(e) = self.docs.get_mut(&id) {
                e.targets = targets;
            }
        }
        let targets = self.docs.get(&id).map(|e| e.targets.as_slice()).unwrap_or_default();
        let peers: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(peer, p)| fleet_changed || p.role != Some(Role::Agent) || targets.contains(peer))
            .map(|(peer, _)| *peer)
            .collect();
        let docs: Vec<DocId> = if fleet_changed { self.docs.keys().copied().collect() } else { vec![id] };
        for peer in peers {
            for doc in &docs {
                self.offer(peer, *doc, out);
            }
        }
        missing
    }

    /// Re-reads the fleet document, then everything derived from it: which agent each machine
    /// document describes, their presence and cards, and every document's targets.
    fn refresh_fleet(&mut self) {
        let Some(doc) = self.fleet_doc.and_then(|id| self.docs.get(&id)) else { return };
        // A fleet document that no longer reads (e.g. its genesis overwritten) changes nothing:
        // the last good fleet stays, rather than every member being disconnected.
        match Fleet::read(&doc.doc) {
            Ok(fleet) => self.fleet = fleet,
            Err(e) if self.fleet.org_key.is_some() => {
                tracing::warn!("the fleet document no longer reads ({e}); keeping the last good fleet");
                return;
            }
            Err(_) => self.fleet = Fleet::default(),
        }
        self.machine_owners = self
            .fleet
            .members_with_role(caisey_doc::fleet::Role::Agent)
            .map(|m| (caisey_doc::machine::machine_doc_id(&m.node), m.node))
            .collect();
        let machines: Vec<DocId> = self.machine_owners.keys().copied().collect();
        for id in machines {
            self.merge_machine(id);
        }
        for (node, (p, _)) in &self.heartbeats {
            if self.fleet.presence.get(node).is_none_or(|known| known.at < p.at) {
                self.fleet.presence.insert(*node, p.clone());
            }
        }
        let (fleet, owners) = (&self.fleet, &self.machine_owners);
        for (id, e) in self.docs.iter_mut() {
            e.targets = targets_of(id, e, fleet, owners.get(id));
        }
        for (peer, p) in self.peers.iter_mut() {
            p.role = fleet.role_of(peer);
        }
    }

    /// Takes an agent's presence and card from its machine document into the fleet view.
    fn merge_machine(&mut self, id: DocId) {
        let (Some(owner), Some(entry)) = (self.machine_owners.get(&id), self.docs.get(&id)) else { return };
        // Relays forward cards but never show them: they keep presence only.
        let with_card = self.fleet.role_of(&self.me) != Some(caisey_doc::fleet::Role::Relay);
        let (presence, card) = caisey_doc::machine::MachineDoc::read(&entry.doc, owner, with_card);
        // The newest wins: heartbeats arrive as frames, the document holds the one written with
        // the card.
        if let Some(p) = presence.filter(|p| self.fleet.presence.get(owner).is_none_or(|known| known.at < p.at)) {
            self.fleet.presence.insert(*owner, p);
        }
        if let Some(c) = card {
            self.fleet.cards.insert(*owner, c);
        }
    }

    /// Sends `peer` the next sync message for `id`, if it may hold it and there is one.
    fn offer(&mut self, peer: NodeId, id: DocId, out: &mut Vec<Output>) {
        let (Some(entry), Some(p)) = (self.docs.get(&id), self.peers.get_mut(&peer)) else { return };
        if !may_share(&self.fleet, &peer, entry.kind, &entry.targets) {
            return;
        }
        let state = p.states.entry(id).or_default();
        if let Some(msg) = entry.doc.generate_sync_message(state) {
            out.push(Output::Send {
                peer,
                conn: p.conn,
                frame: Frame::Sync { doc: id, kind: entry.kind, message: msg.encode() },
            });
        }
    }
}

fn targets_of(id: &DocId, entry: &Entry, fleet: &Fleet, machine_owner: Option<&NodeId>) -> Vec<NodeId> {
    match entry.kind {
        DocKind::Fleet => vec![],
        // A session whose info names another id is a copy: shared with no agent.
        DocKind::Session => match SessionView::read_info(&entry.doc) {
            Ok((info, _)) if info.id == *id => SessionView::read_targets(&entry.doc, fleet),
            _ => vec![],
        },
        DocKind::Machine => machine_owner.into_iter().copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    //! A deterministic network of hubs: messages are queued and delivered in one thread, so
    //! partitions and reconnects are exact and repeatable.
    use super::*;
    use caisey_doc::fleet::Membership;
    use caisey_doc::id::Id128;
    use caisey_doc::record::{RecordKind, Signer};
    use caisey_doc::session::*;
    use std::collections::VecDeque;

    struct Net {
        hubs: BTreeMap<NodeId, Hub>,
        queue: VecDeque<(NodeId, Input)>,
        links: BTreeSet<(NodeId, NodeId)>,
        next_conn: ConnId,
        conns: BTreeMap<(NodeId, NodeId), ConnId>,
        persisted: BTreeMap<NodeId, usize>,
        /// Each hub's chunk store.
        chunks: BTreeMap<NodeId, BTreeMap<ChunkHash, Vec<u8>>>,
    }

    impl Net {
        fn new(hubs: Vec<Hub>) -> Self {
            Net {
                hubs: hubs.into_iter().map(|h| (h.me(), h)).collect(),
                queue: VecDeque::new(),
                links: BTreeSet::new(),
                next_conn: 1,
                conns: BTreeMap::new(),
                persisted: BTreeMap::new(),
                chunks: BTreeMap::new(),
            }
        }
        fn connect(&mut self, a: NodeId, b: NodeId) {
            let conn = self.next_conn;
            self.next_conn += 1;
            self.links.insert((a, b));
            self.links.insert((b, a));
            self.conns.insert((a, b), conn);
            self.conns.insert((b, a), conn);
            self.queue.push_back((a, Input::Connected { peer: b, conn, stored: vec![] }));
            self.queue.push_back((b, Input::Connected { peer: a, conn, stored: vec![] }));
        }
        fn disconnect(&mut self, a: NodeId, b: NodeId) {
            self.links.remove(&(a, b));
            self.links.remove(&(b, a));
            let conn = self.conns[&(a, b)];
            self.queue.push_back((a, Input::Disconnected { peer: b, conn }));
            self.queue.push_back((b, Input::Disconnected { peer: a, conn }));
        }
        fn apply(&mut self, at: NodeId, outputs: Vec<Output>) {
            for o in outputs {
                match o {
                    Output::Send { peer, conn, frame } if self.links.contains(&(at, peer)) => {
                        self.queue.push_back((peer, Input::Frame { peer: at, conn, frame }));
                    }
                    Output::PersistDoc { .. } => *self.persisted.entry(at).or_default() += 1,
                    Output::PersistChunk { hash, data } => {
                        self.chunks.entry(at).or_default().insert(hash, data);
                    }
                    Output::SendChunks { peer, conn, doc, hashes } if self.links.contains(&(at, peer)) => {
                        for h in hashes {
                            let data = self.chunks[&at][&h].clone();
                            self.queue
                                .push_back((peer, Input::Frame { peer: at, conn, frame: Frame::Chunk { doc, data } }));
                        }
                    }
                    Output::Disconnect { peer, .. } => {
                        self.links.remove(&(at, peer));
                        self.links.remove(&(peer, at));
                    }
                    _ => {}
                }
            }
        }
        fn run_until_quiescent(&mut self) {
            let mut steps = 0;
            while let Some((at, input)) = self.queue.pop_front() {
                steps += 1;
                assert!(steps < 100_000, "sync did not converge");
                let out = self.hubs.get_mut(&at).unwrap().handle(steps, input);
                self.apply(at, out);
            }
        }
        fn change(&mut self, at: NodeId, doc: DocId, f: impl FnOnce(&mut Automerge)) {
            let (_, out) = self.hubs.get_mut(&at).unwrap().change(doc, 0, f).unwrap();
            self.apply(at, out);
        }
        /// An agent's runner: stores the bytes, then appends their references.
        fn output(&mut self, at: NodeId, doc: DocId, agent: &Signer, chunks: Vec<OutputChunk>) {
            let held = chunks.iter().map(|c| (chunk_hash(&c.data), c.data.clone())).collect();
            let out = self.hubs.get_mut(&at).unwrap().hold_chunks(doc, held);
            self.apply(at, out);
            let refs: Vec<OutputRef> = chunks.iter().map(OutputChunk::reference).collect();
            self.change(at, doc, |d| SessionWriter::append_output(d, agent, &refs).unwrap());
        }
        fn view(&self, at: NodeId, doc: DocId, fleet: &Fleet) -> SessionView {
            let none = BTreeMap::new();
            SessionView::read(self.hubs[&at].doc(&doc).unwrap(), fleet, self.chunks.get(&at).unwrap_or(&none)).unwrap()
        }
        fn create(&mut self, at: NodeId, id: DocId, kind: DocKind, doc: Automerge) {
            let out = self.hubs.get_mut(&at).unwrap().create(id, kind, doc, 0);
            self.apply(at, out);
        }
        fn heads(&self, at: NodeId, doc: DocId) -> Option<Vec<ChangeHash>> {
            self.hubs[&at].doc(&doc).map(|d| d.get_heads())
        }
    }

    struct Org {
        org: Signer,
        tech: Signer,
        relay: Signer,
        agents: Vec<Signer>,
        fleet_id: DocId,
        fleet: Automerge,
    }

    fn org(agents: u8) -> Org {
        let org = Signer::from_secret([1; 32]);
        let tech = Signer::from_secret([2; 32]);
        let relay = Signer::from_secret([3; 32]);
        let fleet_id = Id128([9; 16]);
        let mut fleet = Fleet::create("Acme", &org, &tech, "alice", fleet_id, 0).unwrap();
        let mut add = |s: &Signer, role, name: &str| {
            let m = Membership {
                approves: vec![],
                node: s.node_id(),
                role,
                name: name.into(),
                groups: vec!["g".into()],
                at: 0,
                invite: None,
            };
            Fleet::put_member(&mut fleet, &org.sign(RecordKind::Membership, &m), &s.node_id()).unwrap();
        };
        add(&relay, Role::Relay, "relay");
        let agents: Vec<Signer> = (0..agents).map(|i| Signer::from_secret([10 + i; 32])).collect();
        for (i, a) in agents.iter().enumerate() {
            add(a, Role::Agent, &format!("ws-{i}"));
        }
        Org { org, tech, relay, agents, fleet_id, fleet }
    }

    impl Org {
        /// A network of every node of the org (technician, relay, agents), none connected yet.
        fn net(&self) -> Net {
            let nodes = [&self.tech, &self.relay].into_iter().chain(&self.agents);
            Net::new(nodes.map(|s| hub_with_fleet(self, s)).collect())
        }
    }

    fn hub_with_fleet(o: &Org, s: &Signer) -> Hub {
        let mut h = Hub::new(s.node_id());
        h.load(o.fleet_id, DocKind::Fleet, &o.fleet.save(), &|_| false).unwrap();
        h
    }

    fn session_for(o: &Org, target: NodeId, sid: u8) -> (DocId, Automerge) {
        let id = Id128([sid; 16]);
        let info = SessionInfo { id, name: format!("s{sid}"), labels: vec![], created_at: 0, org_key: o.org.node_id() };
        let mut doc = SessionWriter::create(&o.tech, &info).unwrap();
        let command = CommandSpec {
            shell: Shell::Sh,
            script: "uptime".into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 1000,
        };
        let req = CommandRequest {
            id: Id128([sid + 100; 16]),
            session: id,
            target,
            command,
            description: String::new(),
            requested_at: 1,
            expires_at: 10,
        };
        SessionWriter::request(&mut doc, &o.tech, &req).unwrap();
        (id, doc)
    }

    #[test]
    fn a_session_reaches_its_agent_through_the_relay_but_not_other_agents() {
        let o = org(2);
        let (t, r, a0, a1) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id(), o.agents[1].node_id());
        let mut net = o.net();
        net.connect(a0, r);
        net.connect(a1, r);
        net.run_until_quiescent();
        // Technician creates the session while only connected to the relay.
        net.connect(t, r);
        let (sid, doc) = session_for(&o, a0, 1);
        net.create(t, sid, DocKind::Session, doc);
        net.run_until_quiescent();
        assert_eq!(net.heads(a0, sid), net.heads(t, sid));
        assert_eq!(net.heads(r, sid), net.heads(t, sid));
        assert_eq!(net.heads(a1, sid), None, "another agent learnt of the session");
        assert!(net.hubs[&t].in_sync_with(&r));
    }

    #[test]
    fn a_fresh_technician_is_not_in_sync_until_every_offered_session_arrived() {
        let o = org(1);
        let (t, r) = (o.tech.node_id(), o.relay.node_id());
        let mut relay = hub_with_fleet(&o, &o.relay);
        for sid in 1..=3 {
            let (id, doc) = session_for(&o, o.agents[0].node_id(), sid);
            relay.create(id, DocKind::Session, doc, 0);
        }
        let mut net = Net::new(vec![hub_with_fleet(&o, &o.tech), relay]);
        net.connect(t, r);
        // Step by step: whenever some session is still missing, the technician is not in sync.
        let mut saw_partial = false;
        let mut steps = 0;
        while let Some((at, input)) = net.queue.pop_front() {
            steps += 1;
            let out = net.hubs.get_mut(&at).unwrap().handle(steps, input);
            net.apply(at, out);
            let sessions_here = net.hubs[&t].docs().filter(|(_, k)| *k == DocKind::Session).count();
            if sessions_here < 3 {
                saw_partial = true;
                assert!(!net.hubs[&t].in_sync_with(&r), "in sync with only {sessions_here} of 3 sessions");
            }
        }
        assert!(saw_partial);
        assert!(net.hubs[&t].in_sync_with(&r));
    }

    #[test]
    fn store_and_forward_while_technician_and_agent_are_never_online_together() {
        let o = org(1);
        let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
        let mut net = o.net();
        net.connect(t, r);
        let (sid, doc) = session_for(&o, a, 2);
        net.create(t, sid, DocKind::Session, doc);
        net.run_until_quiescent();
        net.disconnect(t, r);
        net.run_until_quiescent();

        net.connect(a, r);
        net.run_until_quiescent();
        let chunk =
            OutputChunk { request: Id128([102; 16]), seq: 0, stream: Stream::Stdout, data: b"up 3 days".to_vec() };
        net.output(a, sid, &o.agents[0], vec![chunk]);
        net.run_until_quiescent();
        net.disconnect(a, r);
        net.run_until_quiescent();

        net.connect(t, r);
        net.run_until_quiescent();
        assert_eq!(net.heads(t, sid), net.heads(a, sid));
        let fleet = Fleet::read(&o.fleet).unwrap();
        let view = net.view(t, sid, &fleet);
        assert_eq!(view.commands[0].output[0].data, b"up 3 days");
        assert!(net.hubs[&t].in_sync_with(&r));
    }

    #[test]
    fn an_agent_s_machine_document_reaches_technicians_through_the_relay() {
        let o = org(1);
        let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
        let mut net = o.net();
        net.connect(a, r);
        net.connect(t, r);
        net.run_until_quiescent();
        let id = caisey_doc::machine::machine_doc_id(&a);
        let card = caisey_doc::fleet::MachineCard { hostname: "ws-0".into(), ..Default::default() };
        let doc = caisey_doc::machine::MachineDoc::create(&o.agents[0], &card, vec!["127.0.0.1:9".into()], 7).unwrap();
        net.create(a, id, DocKind::Machine, doc);
        net.run_until_quiescent();
        // A later card update must flow too (the relay's entry was made by the first, change-less message).
        let agent = o.agents[0].clone();
        net.change(a, id, move |d| caisey_doc::machine::MachineDoc::put(d, &agent, &card, vec![], 8).unwrap());
        net.run_until_quiescent();
        assert_eq!(net.hubs[&t].fleet().presence.get(&a).map(|p| p.at), Some(8));
        assert_eq!(net.hubs[&t].fleet().cards.get(&a).map(|c| c.hostname.as_str()), Some("ws-0"));
        assert_eq!(net.heads(r, id), net.heads(a, id));
    }

    #[test]
    fn a_non_member_is_disconnected_and_learns_nothing() {
        let o = org(1);
        let stranger = Signer::from_secret([77; 32]);
        let r = o.relay.node_id();
        let mut relay = hub_with_fleet(&o, &o.relay);
        let (sid, doc) = session_for(&o, o.agents[0].node_id(), 3);
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
        let o = org(1);
        let (r, a) = (o.relay.node_id(), o.agents[0].node_id());
        let mut net = Net::new(vec![hub_with_fleet(&o, &o.relay), hub_with_fleet(&o, &o.agents[0])]);
        net.connect(a, r);
        net.run_until_quiescent();
        let before = net.heads(r, o.fleet_id);
        // The agent deletes the org's genesis record in its copy of the fleet.
        net.change(a, o.fleet_id, |d| {
            use automerge::transaction::Transactable;
            d.transact::<_, _, automerge::AutomergeError>(|tx| tx.delete(automerge::ROOT, "genesis")).unwrap();
        });
        net.run_until_quiescent();
        // Automerge changes are not signed, so the relay takes the change; but it keeps the last
        // fleet that read, instead of disconnecting every member.
        assert_ne!(net.heads(r, o.fleet_id), before);
        assert_eq!(net.hubs[&r].fleet().role_of(&a), Some(Role::Agent));
        assert!(net.hubs[&r].peers().iter().any(|p| p.peer == a), "the relay dropped its members");
    }

    #[test]
    fn malformed_messages_drop_the_connection() {
        let o = org(1);
        let mut relay = hub_with_fleet(&o, &o.relay);
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
        let o = org(1);
        let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
        let mut net = o.net();
        net.connect(t, a);
        let (sid, doc) = session_for(&o, a, 4);
        net.create(t, sid, DocKind::Session, doc);
        net.run_until_quiescent();
        assert!(net.heads(a, sid).is_some(), "agent did not receive its session");
        net.disconnect(t, a);
        net.run_until_quiescent();
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
            };
            let req = CommandRequest {
                id: Id128([55; 16]),
                session: sid,
                target: a,
                command,
                description: String::new(),
                requested_at: 2,
                expires_at: 10,
            };
            SessionWriter::request(d, &tech, &req).unwrap();
        });
        net.connect(a, r);
        net.run_until_quiescent();
        net.connect(t, r);
        net.run_until_quiescent();
        assert_eq!(net.heads(t, sid), net.heads(a, sid));
        assert_eq!(net.heads(r, sid), net.heads(a, sid));
        let fleet = Fleet::read(&o.fleet).unwrap();
        for at in [r, t] {
            let view = net.view(at, sid, &fleet);
            assert_eq!(view.commands.len(), 2);
            assert_eq!(view.commands.iter().map(|c| c.output.len()).sum::<usize>(), 20);
        }
        assert!(net.persisted[&r] > 0);
    }

    #[test]
    fn heartbeats_reach_technicians_through_the_relay_without_changing_any_document() {
        let o = org(2);
        let (t, r, a0, a1) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id(), o.agents[1].node_id());
        let mut net = o.net();
        net.connect(a0, r);
        net.connect(a1, r);
        net.connect(t, r);
        net.run_until_quiescent();
        let heads = |net: &Net| -> Vec<_> {
            [t, r, a0, a1].iter().flat_map(|n| net.hubs[n].docs().map(|(id, _)| net.heads(*n, id))).collect()
        };
        let before = heads(&net);
        let beat = |s: &Signer, node: NodeId, at| {
            s.sign(
                RecordKind::Presence,
                &Presence { node, addrs: vec!["127.0.0.1:7".into()], at, relay_server: None, vitals: None },
            )
        };
        let out = net.hubs.get_mut(&a0).unwrap().announce(beat(&o.agents[0], a0, 50));
        net.apply(a0, out);
        net.run_until_quiescent();
        assert_eq!(net.hubs[&t].fleet().presence.get(&a0).map(|p| p.at), Some(50));
        assert!(!net.hubs[&a1].fleet().presence.contains_key(&a0), "another agent saw the heartbeat");
        // A heartbeat for a0 signed by another agent, or an older one, changes nothing.
        let forged = Frame::Presence { record: beat(&o.agents[1], a0, 99) };
        net.queue.push_back((r, Input::Frame { peer: a1, conn: net.conns[&(r, a1)], frame: forged }));
        let out = net.hubs.get_mut(&a0).unwrap().announce(beat(&o.agents[0], a0, 40));
        net.apply(a0, out);
        net.run_until_quiescent();
        assert_eq!(net.hubs[&t].fleet().presence.get(&a0).map(|p| p.at), Some(50));
        assert_eq!(heads(&net), before, "a heartbeat changed a document");
        // A technician starting afresh gets the newest heartbeat when it connects.
        net.disconnect(t, r);
        net.run_until_quiescent();
        let mut fresh = hub_with_fleet(&o, &o.tech);
        std::mem::swap(net.hubs.get_mut(&t).unwrap(), &mut fresh);
        net.connect(t, r);
        net.run_until_quiescent();
        assert_eq!(net.hubs[&t].fleet().presence.get(&a0).map(|p| p.at), Some(50));
    }

    #[test]
    fn output_a_relay_lacks_is_passed_on_when_it_arrives_and_unreferenced_bytes_are_refused() {
        let o = org(1);
        let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
        let mut net = o.net();
        net.connect(t, r);
        net.connect(a, r);
        let (sid, doc) = session_for(&o, a, 5);
        net.create(t, sid, DocKind::Session, doc);
        net.run_until_quiescent();
        // The agent's references reach the relay, but the agent is gone before the bytes do.
        // (Its references are written before its bytes are at hand, so the sync of the
        // references completes whatever rounds it takes, and no byte leaves before the agent
        // goes: cutting the link mid-sync instead made this depend on Automerge's bloom filters.)
        let chunk =
            OutputChunk { request: Id128([105; 16]), seq: 0, stream: Stream::Stdout, data: b"disk ok\n".to_vec() };
        let refs = [chunk.reference()];
        net.change(a, sid, |d| SessionWriter::append_output(d, &o.agents[0], &refs).unwrap());
        net.run_until_quiescent();
        net.disconnect(a, r);
        net.run_until_quiescent();
        let held = net.hubs.get_mut(&a).unwrap().hold_chunks(sid, vec![(chunk_hash(&chunk.data), chunk.data.clone())]);
        net.apply(a, held);
        assert_eq!(net.heads(t, sid), net.heads(a, sid), "the references did not reach the technician");
        assert_eq!(net.hubs[&t].missing_output(&sid), 1);
        assert_eq!(net.hubs[&r].missing_output(&sid), 1);
        // The relay answered "lacking": the technician is not left waiting on it.
        assert!(net.hubs[&t].in_sync_with(&r));
        // Bytes nobody references are not taken, whoever sends them.
        let junk = Frame::Chunk { doc: sid, data: b"rm -rf /".to_vec() };
        net.queue.push_back((t, Input::Frame { peer: r, conn: net.conns[&(t, r)], frame: junk }));
        net.run_until_quiescent();
        assert!(!net.chunks.get(&t).is_some_and(|c| c.contains_key(&chunk_hash(b"rm -rf /"))));
        // The agent comes back: the relay fetches the chunk and passes it on to the technician.
        net.connect(a, r);
        net.run_until_quiescent();
        assert_eq!(net.hubs[&t].missing_output(&sid), 0);
        let fleet = Fleet::read(&o.fleet).unwrap();
        assert_eq!(net.view(t, sid, &fleet).commands[0].output, vec![chunk]);
        assert!(net.hubs[&t].in_sync_with(&r));
    }

    #[test]
    fn output_asked_of_a_peer_that_dies_before_answering_is_asked_of_the_others() {
        let o = org(1);
        let (t, r, a) = (o.tech.node_id(), o.relay.node_id(), o.agents[0].node_id());
        let mut net = o.net();
        net.connect(t, r);
        net.connect(a, r);
        net.connect(t, a);
        let (sid, doc) = session_for(&o, a, 6);
        net.create(t, sid, DocKind::Session, doc);
        net.run_until_quiescent();
        // The agent's references reach the technician directly, and the agent dies before it
        // answers the technician's request for the bytes; the relay got them meanwhile.
        let chunk =
            OutputChunk { request: Id128([106; 16]), seq: 0, stream: Stream::Stdout, data: b"mem ok\n".to_vec() };
        net.output(a, sid, &o.agents[0], vec![chunk.clone()]);
        net.disconnect(t, a);
        net.run_until_quiescent();
        assert_eq!(net.hubs[&r].missing_output(&sid), 0, "the relay has the bytes");
        assert_eq!(net.hubs[&t].missing_output(&sid), 0, "the technician asked the relay instead");
        let fleet = Fleet::read(&o.fleet).unwrap();
        assert_eq!(net.view(t, sid, &fleet).commands[0].output, vec![chunk]);
        assert!(net.hubs[&t].in_sync_with(&r));
    }
}
