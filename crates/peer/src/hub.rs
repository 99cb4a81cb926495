//! The sync core: a sans-IO state machine that decides, for every connected peer and every
//! document, what to send next — and what must be made durable first.
//!
//! It holds the documents and one `automerge::sync::State` per (peer, document), takes events
//! (`Input`) with the current time, and returns `Output`s for a driver to carry out in order:
//! persist before send, so nothing is acknowledged that a crash could lose. It owns no socket,
//! clock or file, which is what lets the `caisey-sim` crate run many peers, partitions, crashes
//! and full disks deterministically in one thread.
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
//! - Durability is acknowledged: the driver reports what became of every persist
//!   (`Input::Persisted` / `Input::PersistFailed`), and only then do a document's durable heads
//!   advance. While this node cannot write (a full disk), every peer's sync state is read-only:
//!   nothing new is taken in or acknowledged, nothing not yet durable is offered, and what failed
//!   is kept in memory and written again on a timer ([`Hub::poll_timeout`]). The first write
//!   that succeeds ends it: the sync states are reset, so peers send again what was ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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
    /// The persists the driver carried out (one transaction) are durable.
    Persisted(Persists),
    /// The persists the driver carried out could not be written: none of them is durable.
    PersistFailed {
        error: String,
        persists: Persists,
    },
}

/// What one transaction of the driver held, reported back to the hub: each document with the
/// heads its `PersistDoc` named, and each output chunk with its bytes (moved back, not copied:
/// they are passed on once durable, or kept to write again).
#[derive(Debug, Default)]
pub struct Persists {
    pub docs: Vec<(DocId, Vec<ChangeHash>)>,
    pub chunks: Vec<(DocId, ChunkHash, Vec<u8>)>,
}

impl Persists {
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty() && self.chunks.is_empty()
    }
}

/// Why an older connection of a peer is dropped when a newer one arrives: routine (a peer
/// reconnecting from a new address, two dialling at once), not a fault.
pub const REPLACED: &str = "replaced by a newer connection";

#[derive(Debug, PartialEq)]
pub enum Output {
    /// Make these bytes durable for `doc`, which then holds everything up to `heads`.
    /// `compact`: they replace everything stored before.
    PersistDoc {
        doc: DocId,
        kind: DocKind,
        bytes: Vec<u8>,
        compact: bool,
        heads: Vec<ChangeHash>,
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
    /// Make an output chunk of `doc` durable, under its hash.
    PersistChunk {
        doc: DocId,
        hash: ChunkHash,
        data: Vec<u8>,
    },
    /// Write something small, to learn whether the store can be written again (sent with the
    /// retried writes while it could not).
    CheckWritable,
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
    /// The heads the last persist asked for covers.
    saved_heads: Vec<ChangeHash>,
    /// The heads the store is known to hold: what may be offered while writes fail.
    durable_heads: Vec<ChangeHash>,
    /// What the store holds for it did not load: the first write replaces it whole.
    replace_stored: bool,
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
            durable_heads: doc.get_heads(),
            replace_stored: false,
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
    /// The chunks of `held` that are not here (false there), kept apart so that asking for the
    /// next few costs no walk over everything the session references.
    lacking: BTreeSet<ChunkHash>,
    /// Peers that asked for chunks we do not hold yet; they get them when they arrive.
    wanted_by: HashMap<ChunkHash, BTreeSet<NodeId>>,
    /// Bytes made here whose write failed: kept until they are durable, and not sent before.
    unwritten: BTreeMap<ChunkHash, Vec<u8>>,
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
                    self.lacking.insert(hash);
                    missing.push(hash);
                }
            }
        }
        missing
    }

    fn missing(&self) -> Vec<ChunkHash> {
        self.lacking.iter().copied().collect()
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
    /// Set while the store cannot be written.
    unwritable: Option<Unwritable>,
    /// When output that every peer said it lacks is asked for again.
    ask_again: AskAgain,
}

/// Output bytes no peer had when asked are asked for again, first after `ASK_AGAIN_MS` and then
/// less often, up to `ASK_AGAIN_MAX_MS`; back to the start once any arrive.
#[derive(Debug)]
struct AskAgain {
    at: Option<u64>,
    every: u64,
}

const ASK_AGAIN_MS: u64 = 2_000;
/// Output chunks asked of one peer at once, at most. Each is up to `MAX_CHUNK` (1 MiB), so
/// what a peer sends back in one go stays well under what a node queues for a peer before it
/// counts as too slow (64 MiB; 32 chunks measured as fast as no limit for streamed output): a 200 MiB file is fetched a window at a time, never all asked
/// at once and dropped with the connection.
const ASK_WINDOW: usize = 32;
const ASK_AGAIN_MAX_MS: u64 = 60_000;

/// Why and since when this node cannot make changes durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Unwritable {
    pub error: String,
    pub since: u64,
    /// When the writes are tried again.
    retry_at: u64,
}

/// How long after a failed write it is tried again.
pub const RETRY_WRITES_MS: u64 = 1000;

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
            unwritable: None,
            ask_again: AskAgain { at: None, every: ASK_AGAIN_MS },
        }
    }

    /// Why this node cannot make changes durable, if it cannot right now.
    pub fn unwritable(&self) -> Option<&Unwritable> {
        self.unwritable.as_ref()
    }

    /// When [`Hub::handle_timeout`] is next due, if anything waits for a time.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.unwritable.as_ref().map(|u| u.retry_at).into_iter().chain(self.ask_again.at).min()
    }

    /// Does what was due by `now`: while the store cannot be written, asks again for every write
    /// that failed (with a check, so that recovery is noticed even when nothing waits).
    pub fn handle_timeout(&mut self, now: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if self.ask_again.at.is_some_and(|at| at <= now) {
            self.ask_again.at = None;
            self.ask_again.every = (self.ask_again.every * 2).min(ASK_AGAIN_MAX_MS);
            let missing: Vec<(DocId, Vec<ChunkHash>)> =
                self.docs.iter().map(|(id, e)| (*id, e.output.missing())).filter(|(_, m)| !m.is_empty()).collect();
            for (id, hashes) in missing {
                self.ask_everyone(id, hashes, &mut out);
            }
        }
        let Some(u) = self.unwritable.as_mut().filter(|u| u.retry_at <= now) else { return out };
        u.retry_at = now + RETRY_WRITES_MS;
        self.pending_persists(&mut out);
        out.push(Output::CheckWritable);
        out
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

    /// Registers a document whose stored bytes did not load: held empty, so every peer that
    /// has it sends it all again; the first write of what arrives replaces what was stored.
    pub fn load_damaged(&mut self, id: DocId, kind: DocKind) {
        let mut entry = Entry::new(kind, Automerge::new());
        entry.replace_stored = true;
        self.docs.insert(id, entry);
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
            e.output.lacking.insert(*h);
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
        self.docs.get(id).map(|e| e.output.lacking.len()).unwrap_or(0)
    }

    /// Which of `hashes` (chunks session `id` references) are here, in order.
    pub fn holds(&self, id: &DocId, hashes: &[ChunkHash]) -> Vec<bool> {
        let held = self.docs.get(id).map(|e| &e.output.held);
        hashes.iter().map(|h| held.and_then(|m| m.get(h)).copied().unwrap_or(false)).collect()
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
            Input::Persisted(persists) => self.on_persisted(persists, &mut out),
            Input::PersistFailed { error, persists } => self.on_persist_failed(now, error, persists),
        }
        out
    }

    /// Writes are durable: documents advance their durable heads, and output bytes go to
    /// whoever asked for them while we lacked them (bytes are passed on once durable).
    fn on_persisted(&mut self, persists: Persists, out: &mut Vec<Output>) {
        for (id, heads) in persists.docs {
            if let Some(e) = self.docs.get_mut(&id) {
                e.durable_heads = heads;
                e.replace_stored = false;
            }
        }
        for (id, hash, data) in persists.chunks {
            let Some(e) = self.docs.get_mut(&id) else { continue };
            e.output.unwritten.remove(&hash);
            self.pass_on(id, hash, data, out);
        }
        if self.unwritable.is_none() {
            return;
        }
        // A small write may fit where a large one does not: writable again only once everything
        // that waited is written too (asked for here, in the same round).
        if self.pending_persists(out) {
            return;
        }
        self.unwritable = None;
        let ids: Vec<DocId> = self.docs.keys().copied().collect();
        // Leaving read-only resets each sync state and tells the peer to send again what was
        // ignored; a fresh exchange of every document follows.
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in &peers {
            if let Some(p) = self.peers.get_mut(peer) {
                p.states.values_mut().for_each(|s| s.set_read_only(false));
            }
        }
        for peer in peers {
            for id in &ids {
                self.offer(peer, *id, out);
                let missing = self.docs.get(id).map(|e| e.output.missing()).unwrap_or_default();
                self.ask(peer, *id, missing, out);
            }
        }
    }

    /// Nothing the driver was asked to write is durable: the documents fall back to their
    /// durable heads (the next write covers the rest), locally made bytes are kept to write
    /// again, and every peer is told this node takes nothing in for now.
    fn on_persist_failed(&mut self, now: u64, error: String, persists: Persists) {
        for (id, _) in persists.docs {
            if let Some(e) = self.docs.get_mut(&id) {
                e.saved_heads.clone_from(&e.durable_heads);
            }
        }
        for (id, hash, data) in persists.chunks {
            let Some(e) = self.docs.get_mut(&id) else { continue };
            // Kept in memory to write again; all of it was made here or taken in before the
            // failure (nothing is taken in while it lasts), so this is bounded.
            e.output.unwritten.insert(hash, data);
        }
        let since = self.unwritable.as_ref().map_or(now, |u| u.since);
        self.unwritable = Some(Unwritable { error, since, retry_at: now + RETRY_WRITES_MS });
        // Messages made with the failed writes were never sent: read-only also forgets what
        // they claimed was sent, and the next message carries the read-only flag. Nothing is
        // offered now: on a relay that would be a message per document and peer at every
        // failure; peers learn it with the next message that goes, and everything is offered
        // afresh once writes succeed.
        for p in self.peers.values_mut() {
            p.states.values_mut().for_each(|s| s.set_read_only(true));
        }
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
        let mut states: BTreeMap<DocId, SyncState> = states;
        if self.unwritable.is_some() {
            states.values_mut().for_each(|s| s.set_read_only(true));
        }
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
                // Nothing is taken in that could not be written; asked again once it can.
                if self.unwritable.is_some() {
                    return;
                }
                self.take_chunk(doc, Some(peer), hash, data, out);
                return self.ask_more(peer, doc, out);
            }
            Frame::Lacking { doc, hashes } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    hashes.iter().for_each(|h| {
                        p.asked.remove(&(doc, *h));
                    });
                }
                // Whoever lacks it now may hold it later (a peer that could not read its store,
                // a relay still fetching it): asked again after a while, less often each time.
                if self.ask_again.at.is_none() && self.missing_output(&doc) > 0 {
                    self.ask_again.at = Some(now + self.ask_again.every);
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
        let read_only = self.unwritable.is_some();
        let state = self.peers.get_mut(&peer).map(|p| p.states.entry(id).or_insert_with(|| new_state(read_only)));
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
                        Some(true) if e.output.unwritten.contains_key(&h) => {
                            e.output.wanted_by.entry(h).or_default().insert(peer);
                            lacking.push(h);
                        }
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
        e.output.lacking.remove(&hash);
        if from.is_some() {
            self.ask_again.every = ASK_AGAIN_MS;
        }
        // Passed on to whoever asked once it is durable (`Input::Persisted`).
        out.push(Output::PersistChunk { doc, hash, data });
        if from.is_some() {
            out.push(Output::DocChanged { doc });
        }
    }

    /// Sends durable output bytes of `doc` to the peers that asked for them while we lacked them.
    fn pass_on(&mut self, doc: DocId, hash: ChunkHash, data: Vec<u8>, out: &mut Vec<Output>) {
        let Some(e) = self.docs.get_mut(&doc) else { return };
        let waiting: Vec<(NodeId, ConnId)> = e
            .output
            .wanted_by
            .remove(&hash)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|peer| Some((peer, self.peers.get(&peer)?.conn)))
            .filter(|(peer, _)| may_share(&self.fleet, peer, DocKind::Session, &e.targets))
            .collect();
        let Some((last, rest)) = waiting.split_last() else { return };
        for (peer, conn) in rest {
            out.push(Output::Send { peer: *peer, conn: *conn, frame: Frame::Chunk { doc, data: data.clone() } });
        }
        out.push(Output::Send { peer: last.0, conn: last.1, frame: Frame::Chunk { doc, data } });
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

    /// Asks `peer` for output chunks of `doc` (if it may hold the session), at most
    /// [`ASK_WINDOW`] at a time: the rest are asked as these arrive ([`Hub::ask_more`]).
    fn ask(&mut self, peer: NodeId, doc: DocId, hashes: Vec<ChunkHash>, out: &mut Vec<Output>) {
        let (Some(e), Some(p)) = (self.docs.get(&doc), self.peers.get_mut(&peer)) else { return };
        if hashes.is_empty() || !may_share(&self.fleet, &peer, e.kind, &e.targets) {
            return;
        }
        let room = ASK_WINDOW.saturating_sub(p.asked.len());
        let hashes: Vec<ChunkHash> = hashes.into_iter().filter(|h| !p.asked.contains(&(doc, *h))).take(room).collect();
        for batch in hashes.chunks(MAX_HASHES) {
            p.asked.extend(batch.iter().map(|h| (doc, *h)));
            out.push(Output::Send { peer, conn: p.conn, frame: Frame::Want { doc, hashes: batch.to_vec() } });
        }
    }

    /// `peer` sent output of `doc`: ask it for more of what is missing there, once half of what
    /// was asked of it has come (so that a large file or a long backlog flows at the pace the
    /// peer sends it, never more than a window ahead).
    fn ask_more(&mut self, peer: NodeId, doc: DocId, out: &mut Vec<Output>) {
        if self.peers.get(&peer).is_none_or(|p| p.asked.len() > ASK_WINDOW / 2) {
            return;
        }
        let Some(e) = self.docs.get(&doc) else { return };
        let asked_anywhere: HashSet<ChunkHash> =
            self.peers.values().flat_map(|p| p.asked.iter().filter(|(d, _)| *d == doc).map(|(_, h)| *h)).collect();
        let next: Vec<ChunkHash> =
            e.output.lacking.iter().filter(|h| !asked_anywhere.contains(*h)).take(ASK_WINDOW).copied().collect();
        self.ask(peer, doc, next, out);
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

    /// Asks again for every write that failed: output bytes kept in memory, and each document
    /// from its durable heads on. False if nothing waits.
    fn pending_persists(&mut self, out: &mut Vec<Output>) -> bool {
        let ids: Vec<DocId> = self.docs.keys().copied().collect();
        let mut any = false;
        for id in ids {
            any |= self.persist(id, out);
        }
        any
    }

    /// Asks for whatever changed in `id` since the last persist to be made durable, with the
    /// output bytes made here that are still waiting to be written (never a reference without
    /// its bytes); false if nothing waits.
    fn persist(&mut self, id: DocId, out: &mut Vec<Output>) -> bool {
        let Some(entry) = self.docs.get_mut(&id) else { return false };
        // Kept until acknowledged: whoever asked for them meanwhile gets them then.
        for (hash, data) in &entry.output.unwritten {
            out.push(Output::PersistChunk { doc: id, hash: *hash, data: data.clone() });
        }
        let heads = entry.doc.get_heads();
        if heads == entry.saved_heads {
            return !entry.output.unwritten.is_empty();
        }
        let incremental = entry.doc.save_after(&entry.saved_heads);
        entry.saved_heads.clone_from(&heads);
        let replace = entry.replace_stored;
        let (bytes, compact) =
            if replace || entry.incremental_len + incremental.len() > entry.compacted_len.max(COMPACT_FLOOR) {
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
        out.push(Output::PersistDoc { doc: id, kind: entry.kind, bytes, compact, heads });
        true
    }

    /// Persists and announces whatever changed in `id` since it was last saved; returns the
    /// output chunks it newly references that we lack.
    fn after_change(&mut self, id: DocId, _now: u64, out: &mut Vec<Output>) -> Vec<ChunkHash> {
        let Some(entry) = self.docs.get_mut(&id) else { return vec![] };
        if entry.doc.get_heads() == entry.saved_heads {
            return vec![];
        }
        let missing = match entry.kind {
            DocKind::Session => entry.output.scan(&entry.doc, &|_| false),
            _ => vec![],
        };
        self.persist(id, out);
        out.push(Output::DocChanged { doc: id });
        let Some(entry) = self.docs.get(&id) else { return missing };
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
        // Nothing is offered that is not durable yet: a peer could take it as safe here.
        if self.unwritable.is_some() && entry.doc.get_heads() != entry.durable_heads {
            return;
        }
        let state = p.states.entry(id).or_insert_with(|| new_state(self.unwritable.is_some()));
        if let Some(msg) = entry.doc.generate_sync_message(state) {
            out.push(Output::Send {
                peer,
                conn: p.conn,
                frame: Frame::Sync { doc: id, kind: entry.kind, message: msg.encode() },
            });
        }
    }
}

/// A sync state for a document not exchanged yet with a peer; read-only while nothing can be
/// written.
fn new_state(read_only: bool) -> SyncState {
    if read_only { SyncState::new_read_only() } else { SyncState::new() }
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
