//! The driver: runs a [`Hub`] on tokio and iroh.
//!
//! One thread (the *core*) owns the hub and the store and carries out the hub's outputs in order:
//! first one redb transaction for everything to persist, then the sends. Connection tasks only
//! move frames between QUIC streams and the core. So when [`Node::change`] returns, the change
//! is on disk, and a peer only ever hears of what a crash could not lose.
//!
//! Memory stays bounded: frames are length-checked before they are read, the core's inbox is a
//! bounded channel (readers wait), and a peer that can't keep up with its outbox is disconnected
//! (sync resumes from where it was when it reconnects).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use automerge::Automerge;
use caisey_doc::fleet::{Contact, Fleet, Role};
use caisey_doc::id::{DocId, NodeId};
use caisey_doc::record::Signer;
use caisey_doc::session::{ChunkHash, ChunkSource};
use iroh::endpoint::{Connection, RecvStream, SendStream, presets};
use iroh::{Endpoint, EndpointAddr, PublicKey, RelayMode, SecretKey, TransportAddr, Watcher};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::home::Home;
use crate::hub::{ConnId, Hub, Input, Output, PeerInfo, Persists, Unwritable};
use crate::lan::Lan;
use crate::store::{LedgerKey, LedgerRecord, Store, Write};
use crate::traversal::RelayServers;
use crate::wire::{DocKind, EXTRA_ALPNS, Frame, SYNC_ALPN};

/// Bytes queued for one peer before it counts as too slow (a frame past this is refused).
const OUTBOX_BYTES: usize = crate::wire::MAX_FRAME;
const SETTING_PORT: &str = "listen_port";
/// Written to learn whether the store can be written again after a failed write.
const SETTING_WRITE_CHECK: &str = "write_check";
/// Settings key for the iroh relay server this node runs (relays only).
const SETTING_RELAY_SERVER: &str = "relay_server";
/// Settings key for relay contacts learnt from a token or `relay add`.
pub const SETTING_RELAYS: &str = "relays";

/// What the node tells the application about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    DocChanged(DocId),
    PeerUp(NodeId),
    PeerDown(NodeId),
}

/// How a connection to a peer travels right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerPath {
    /// Straight to the peer's address (on a LAN, or hole-punched through NAT).
    Direct,
    /// Through an iroh relay server, because no direct path could be made (yet).
    Relayed,
}

impl PeerPath {
    fn of(conn: &Connection) -> PeerPath {
        let paths = conn.paths();
        let selected = paths.iter().find(|p| p.is_selected());
        match selected {
            Some(p) if p.is_relay() => PeerPath::Relayed,
            _ => PeerPath::Direct,
        }
    }
}

/// An entry of this node's ledger (never synced), written atomically with a change.
pub type LedgerEntry = (LedgerKey, LedgerRecord);

/// What a [`Node::change_guarded`] closure may consult besides its document.
pub struct Guard<'a> {
    fleet: &'a Fleet,
    store: &'a Store,
}

impl Guard<'_> {
    pub fn fleet(&self) -> &Fleet {
        self.fleet
    }

    /// What this node's ledger holds for `key` (written by [`Node::change_guarded`]).
    pub fn ledger(&self, key: &LedgerKey) -> Result<Option<LedgerRecord>> {
        Ok(self.store.ledger(key)?)
    }
}

/// Serves one of the small protocols (enrollment, publishing) on an accepted connection. Kept
/// as a callback so this module does not depend on their policies.
pub type ProtocolHandler =
    Arc<dyn Fn(Node, Connection) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

type Job = Box<dyn FnOnce(&mut Core) + Send>;

enum Cmd {
    Connected {
        peer: NodeId,
        outbox: Outbox,
    },
    Input(Input),
    Run(Job),
    /// The hub's timer is due ([`Hub::poll_timeout`]).
    Tick,
    /// Close the store and end the core; says so once the store is closed.
    Stop(oneshot::Sender<()>),
}

/// Frames on their way to one peer's connection, bounded by bytes rather than count: a
/// thousand small offers at connect are fine, a peer that stops reading is not.
struct Outbox {
    conn: ConnId,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    handle: Connection,
}

impl Outbox {
    /// Queues a frame; false if the peer is too far behind.
    fn push(&self, frame: Vec<u8>) -> bool {
        let len = frame.len();
        if self.queued.load(Ordering::Relaxed) + len > OUTBOX_BYTES {
            return false;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        self.tx.send(frame).is_ok()
    }
}

/// The core task's state: the hub, the store, and a way to reach each connected peer. Private to
/// this crate: everything else reads and changes documents through [`Node`]'s typed methods.
pub(crate) struct Core {
    pub(crate) hub: Hub,
    pub(crate) store: Store,
    outboxes: std::collections::BTreeMap<NodeId, Outbox>,
    events: broadcast::Sender<NodeEvent>,
    /// Whether the store can be written, for everyone outside the core.
    storage: tokio::sync::watch::Sender<StorageState>,
    /// A warning that the store cannot be written is in the log (its end is then logged too).
    storage_warned: bool,
    /// Wakes the core when the hub's timer is due; weak, so the core still ends when the node
    /// is dropped.
    ticks: mpsc::WeakSender<Cmd>,
    /// The time a wake-up is already set for.
    tick_at: Option<u64>,
}

/// Whether this node's store can be written, as its core tells everyone else.
#[derive(Debug, Clone, Default)]
pub struct StorageState {
    /// Why it cannot be written right now.
    pub unwritable: Option<Unwritable>,
    /// The last write that failed: when, and why.
    pub last_failure: Option<(u64, String)>,
}

/// How long a failed write is still reported after writes succeed again.
const STICKY_MS: u64 = 60_000;

/// A change was made but could not be written yet (the store cannot be written: a full disk,
/// an I/O error). It is kept in memory, written as soon as the store can be written, and sent
/// to peers only then.
#[derive(Debug, thiserror::Error)]
#[error("not saved yet, the store cannot be written ({0}); it is kept and written as soon as it can be")]
pub struct NotDurable(pub String);

impl Core {
    /// Carries out the hub's outputs: persist all, then send, then tell the application.
    pub fn apply(&mut self, outputs: Vec<Output>) -> Result<()> {
        self.apply_with(Vec::new(), outputs)
    }

    /// Like [`Core::apply`], with `extra` writes committed in the same transaction (an agent
    /// records an approval as consumed atomically with the start it writes).
    ///
    /// What became of the writes goes back to the hub, whose answer is carried out in turn.
    /// When they fail no sync message of this batch is sent, and the error is [`NotDurable`].
    pub fn apply_with(&mut self, extra: Vec<Write>, outputs: Vec<Output>) -> Result<()> {
        let mut writes = extra;
        let mut persists = Persists::default();
        let mut chunk_docs = Vec::new();
        // What to persist is taken out (not copied: output chunks are large); the rest follows.
        let outputs: Vec<Output> = outputs
            .into_iter()
            .filter_map(|o| {
                match o {
                    Output::PersistDoc { doc, kind, bytes, compact, heads } => {
                        persists.docs.push((doc, heads));
                        writes.push(Write::Doc { doc, kind, bytes, compact })
                    }
                    Output::PersistSyncState { doc, peer, state } => writes.push(Write::SyncState { doc, peer, state }),
                    Output::PersistChunk { doc, hash, data } => {
                        chunk_docs.push(doc);
                        writes.push(Write::Chunk { hash, data })
                    }
                    Output::PersistPresence { node, record } => writes.push(Write::Presence { node, record }),
                    Output::CheckWritable => writes.push(Write::Setting {
                        key: SETTING_WRITE_CHECK.into(),
                        value: crate::now_ms().to_be_bytes().to_vec(),
                    }),
                    other => return Some(other),
                }
                None
            })
            .collect();
        if writes.is_empty() {
            self.carry_out(outputs);
            return Ok(());
        }
        let result = self.store.apply(&writes);
        // The chunks' bytes go back to the hub: passed on now they are durable, or kept.
        let chunks = writes.into_iter().filter_map(|w| match w {
            Write::Chunk { hash, data } => Some((hash, data)),
            _ => None,
        });
        persists.chunks = chunk_docs.into_iter().zip(chunks).map(|(doc, (hash, data))| (doc, hash, data)).collect();
        match result {
            Ok(()) => {
                self.carry_out(outputs);
                let more = self.hub.handle(crate::now_ms(), Input::Persisted(persists));
                // What waited is written by this, before anyone waiting is told.
                let result = self.apply(more);
                self.publish_storage();
                result
            }
            Err(e) => {
                let error = e.to_string();
                // Nothing that depended on these writes goes out: no sync message, which may
                // carry or acknowledge what is not durable. The rest still happens — asks and
                // answers about output (from the store, or "lacking": a peer must never wait for
                // an answer that was dropped) and heartbeats (a machine whose disk is full must
                // not look switched off).
                let unsent =
                    outputs.into_iter().filter(|o| !matches!(o, Output::Send { frame: Frame::Sync { .. }, .. }));
                self.carry_out(unsent.collect());
                let more = self.hub.handle(crate::now_ms(), Input::PersistFailed { error: error.clone(), persists });
                self.publish_storage();
                self.apply(more)?;
                Err(NotDurable(error).into())
            }
        }
    }

    /// Tells everyone outside the core whether the store can be written, when that changed, and
    /// says so in the log: at most once a minute, since a disk at its limit fits some writes and
    /// not others, and would otherwise fill the log with the news.
    fn publish_storage(&mut self) {
        let unwritable = self.hub.unwritable().cloned();
        let now = crate::now_ms();
        let recent =
            |s: &StorageState| s.last_failure.as_ref().is_some_and(|(at, _)| now.saturating_sub(*at) < STICKY_MS);
        self.storage.send_if_modified(|s| {
            let changed = s.unwritable.is_some() != unwritable.is_some();
            match (&unwritable, changed) {
                (Some(u), true) if !recent(s) => {
                    warn!(
                        "cannot write the store ({}): nothing new is taken in or sent until it can; what is \
                         waiting is kept and written then",
                        u.error
                    );
                    self.storage_warned = true;
                }
                (None, true) if std::mem::take(&mut self.storage_warned) => {
                    info!("the store can be written again; catching up with peers");
                }
                _ => {}
            }
            if let Some(u) = &unwritable {
                s.last_failure = Some((now, u.error.clone()));
            }
            s.unwritable = unwritable;
            changed
        });
    }

    /// Carries out outputs that need no write: sends, disconnects, events.
    fn carry_out(&mut self, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Send { peer, conn, frame } => self.send(peer, conn, &frame),
                Output::SendChunks { peer, conn, doc, hashes } => {
                    // A store that cannot be read right now answers "lacking": the peer asks
                    // another, or again later, instead of waiting for an answer that never comes.
                    let stored = match self.store.chunks() {
                        Ok(stored) => stored,
                        Err(e) => {
                            warn!("reading output chunks: {e}");
                            self.send(peer, conn, &Frame::Lacking { doc, hashes });
                            continue;
                        }
                    };
                    let (mut frames, mut lacking) = (Vec::new(), Vec::new());
                    for hash in hashes {
                        match stored.chunk(&hash) {
                            Some(data) => frames.push(Frame::Chunk { doc, data }),
                            None => lacking.push(hash),
                        }
                    }
                    let damaged = stored.take_damaged();
                    drop(stored);
                    self.refetch(doc, damaged);
                    if !lacking.is_empty() {
                        frames.push(Frame::Lacking { doc, hashes: lacking });
                    }
                    for frame in frames {
                        self.send(peer, conn, &frame);
                    }
                }
                Output::Disconnect { peer, conn, reason } => {
                    if reason == crate::hub::REPLACED {
                        debug!(peer = %peer.short(), %reason, "dropping connection");
                    } else {
                        warn!(peer = %peer.short(), %reason, "dropping connection");
                    }
                    if let Some(outbox) = self.outboxes.get(&peer).filter(|o| o.conn == conn) {
                        outbox.handle.close(2u32.into(), reason.as_bytes());
                        self.outboxes.remove(&peer);
                    }
                }
                Output::Ignored { peer, reason } => warn!(peer = %peer.short(), %reason, "ignored"),
                Output::DocChanged { doc } => {
                    let _ = self.events.send(NodeEvent::DocChanged(doc));
                }
                Output::PeerUp { peer } => {
                    let _ = self.events.send(NodeEvent::PeerUp(peer));
                }
                Output::PeerDown { peer } => {
                    let _ = self.events.send(NodeEvent::PeerDown(peer));
                }
                Output::PersistDoc { .. }
                | Output::PersistSyncState { .. }
                | Output::PersistChunk { .. }
                | Output::PersistPresence { .. }
                | Output::CheckWritable => {}
            }
        }
    }

    /// Output of `doc` found damaged on disk while reading: forgotten in the store and asked of
    /// the peers again, so a good copy takes its place.
    fn refetch(&mut self, doc: DocId, damaged: Vec<ChunkHash>) {
        if damaged.is_empty() {
            return;
        }
        warn!(doc = %doc.short(), chunks = damaged.len(), "output damaged on disk; fetching it again from peers");
        let forget = damaged.iter().map(|hash| Write::ForgetChunk { hash: *hash }).collect();
        let out = self.hub.lost_chunks(doc, damaged);
        if let Err(e) = self.apply_with(forget, out) {
            warn!("{e:#}");
        }
    }

    /// Queues a frame for `peer` on connection `conn`; a peer too far behind is disconnected.
    fn send(&mut self, peer: NodeId, conn: ConnId, frame: &Frame) {
        let Some(outbox) = self.outboxes.get(&peer).filter(|o| o.conn == conn) else { return };
        if !outbox.push(frame.encode()) {
            warn!(peer = %peer.short(), "peer is not keeping up; disconnecting");
            outbox.handle.close(1u32.into(), b"too slow");
            self.outboxes.remove(&peer);
        }
    }

    /// Carries out the outputs gathered so far (see [`run_core`]), then sets a wake-up for the
    /// hub's timer if it has one.
    fn flush(&mut self, pending: &mut Vec<Output>) {
        if let Err(e) = self.apply(std::mem::take(pending))
            && !e.is::<NotDurable>()
        {
            warn!("{e:#}");
        }
        let due = self.hub.poll_timeout();
        if due.is_some() && due != self.tick_at {
            self.tick_at = due;
            let (ticks, wait) = (self.ticks.clone(), due.unwrap_or(0).saturating_sub(crate::now_ms()));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if let Some(tx) = ticks.upgrade() {
                    let _ = tx.send(Cmd::Tick).await;
                }
            });
        }
    }
}

/// Where a node listens.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub home: Home,
    pub listen: SocketAddr,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

struct Shared {
    signer: Signer,
    endpoint: Endpoint,
    cmd: mpsc::Sender<Cmd>,
    events: broadcast::Sender<NodeEvent>,
    next_conn: AtomicU64,
    /// Whether the keepalive runs (it is started once, however often it is asked for).
    keeping_connected: std::sync::atomic::AtomicBool,
    home: Home,
    handlers: std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, ProtocolHandler>>,
    relay_servers: RelayServers,
    lan: Lan,
    /// Peers being dialled right now.
    dialling: Arc<std::sync::Mutex<std::collections::BTreeSet<NodeId>>>,
    /// Whether the store can be written.
    storage: tokio::sync::watch::Receiver<StorageState>,
}

/// A dial in progress; the peer leaves the set when it is dropped.
struct Dialling {
    set: Arc<std::sync::Mutex<std::collections::BTreeSet<NodeId>>>,
    peer: NodeId,
}

impl Dialling {
    /// `None` when `peer` is being dialled already.
    fn start(set: &Arc<std::sync::Mutex<std::collections::BTreeSet<NodeId>>>, peer: NodeId) -> Option<Dialling> {
        let fresh = set.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(peer);
        fresh.then(|| Dialling { set: set.clone(), peer })
    }
}

impl Drop for Dialling {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.peer);
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.id().short())
    }
}

impl Node {
    /// Opens the home's store, loads every document and starts listening.
    pub async fn start(opts: NodeOptions) -> Result<Node> {
        let signer = opts.home.node_key()?;
        let mut store = Store::open(&opts.home.store_path())?;
        let relay_servers = RelayServers::default();
        let lan = Lan::start(SecretKey::from_bytes(&signer.secret()).public(), opts.listen);
        let endpoint = bind(&signer, opts.listen, &mut store, &relay_servers, &lan).await?;
        let (cmd, inbox) = mpsc::channel(256);
        let (storage, storage_rx) = tokio::sync::watch::channel(StorageState::default());
        let ticks = cmd.downgrade();
        let (events, _) = broadcast::channel(1024);
        // Its own thread: every commit waits for fsync, which must not stall the tasks that move
        // packets (on a 2-core machine, two cores syncing at once would stop all networking).
        // Documents are loaded there too, so the signatures checked while loading are the ones
        // that thread remembers (see `caisey_doc::record`).
        let (loaded_tx, loaded) = oneshot::channel();
        let runtime = tokio::runtime::Handle::current();
        let (me, core_events) = (signer.node_id(), events.clone());
        // Named after the node, so a profile of many nodes in one process tells them apart.
        std::thread::Builder::new().name(format!("core-{}", me.short())).spawn(move || {
            let _in_runtime = runtime.enter();
            let hub = match load_hub(me, &mut store) {
                Ok(hub) => hub,
                Err(e) => return drop(loaded_tx.send(Err(e))),
            };
            let _ = loaded_tx.send(Ok(()));
            let core = Core {
                hub,
                store,
                outboxes: Default::default(),
                events: core_events,
                storage,
                storage_warned: false,
                ticks,
                tick_at: None,
            };
            run_core(core, inbox)
        })?;
        loaded.await.map_err(|_| anyhow!("the node's core stopped while loading"))??;
        let node = Node {
            shared: Arc::new(Shared {
                signer,
                endpoint,
                cmd,
                events,
                next_conn: AtomicU64::new(1),
                keeping_connected: Default::default(),
                home: opts.home,
                handlers: Default::default(),
                relay_servers,
                lan,
                dialling: Default::default(),
                storage: storage_rx,
            }),
        };
        tokio::spawn(accept_loop(node.clone()));
        node.track_relay_servers().await?;
        node.watch_own_addrs();
        info!(node = %node.id().short(), addrs = ?node.addrs(), "node started");
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.shared.signer.node_id()
    }

    pub fn signer(&self) -> &Signer {
        &self.shared.signer
    }

    pub fn home(&self) -> &Home {
        &self.shared.home
    }

    /// The socket addresses this node can be dialled at.
    pub fn addrs(&self) -> Vec<String> {
        self.shared.endpoint.addr().ip_addrs().map(|a| a.to_string()).collect()
    }

    pub fn contact(&self) -> Contact {
        Contact { node: self.id(), addrs: self.addrs() }
    }

    /// Why this node cannot write its store, while it cannot (a full disk): nothing new is taken
    /// in or sent meanwhile, and what waits is written as soon as it can be.
    pub fn unwritable(&self) -> Option<Unwritable> {
        self.shared.storage.borrow().unwritable.clone()
    }

    /// What to tell people about writing the store: why it cannot be written now, or why a
    /// write failed within the last minute (a disk at its limit fits some writes and not
    /// others, and is not fine just because the last one fitted).
    pub fn write_trouble(&self) -> Option<String> {
        let state = self.shared.storage.borrow();
        if let Some(u) = &state.unwritable {
            return Some(u.error.clone());
        }
        let (at, error) = state.last_failure.as_ref()?;
        (crate::now_ms().saturating_sub(*at) < STICKY_MS).then(|| error.clone())
    }

    /// Changes whenever the store stops or starts being writable.
    pub fn storage_changes(&self) -> tokio::sync::watch::Receiver<StorageState> {
        self.shared.storage.clone()
    }

    /// Waits until the store can be written (at once if it can). A change that failed with
    /// [`NotDurable`] is durable when this returns.
    pub async fn wait_writable(&self) -> Result<()> {
        let mut rx = self.shared.storage.clone();
        rx.wait_for(|s| s.unwritable.is_none()).await.map(|_| ()).map_err(|_| anyhow!("node has stopped"))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// Serves `alpn` (one of [`crate::wire::EXTRA_ALPNS`]) with `handler`.
    pub fn serve_protocol(&self, alpn: &[u8], handler: ProtocolHandler) {
        if let Ok(mut h) = self.shared.handlers.lock() {
            h.insert(alpn.to_vec(), handler);
        }
    }

    /// Runs `f` on the core task, with exclusive access to the hub and store.
    pub(crate) async fn with_core<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |core| {
            let _ = tx.send(f(core));
        });
        self.shared.cmd.send(Cmd::Run(job)).await.map_err(|_| anyhow!("node has stopped"))?;
        rx.await.map_err(|_| anyhow!("node has stopped"))
    }

    /// Changes a document; when this returns the change is durable and on its way to peers.
    pub async fn change<R: Send + 'static>(
        &self,
        doc: DocId,
        f: impl FnOnce(&mut Automerge) -> R + Send + 'static,
    ) -> Result<R> {
        self.with_core(move |core| {
            let (r, out) =
                core.hub.change(doc, crate::now_ms(), f).ok_or_else(|| anyhow!("no document {}", doc.short()))?;
            core.apply(out)?;
            Ok(r)
        })
        .await?
    }

    /// Adds a new document; durable when this returns.
    pub async fn create(&self, doc: DocId, kind: DocKind, content: Automerge) -> Result<()> {
        self.with_core(move |core| {
            let out = core.hub.create(doc, kind, content, crate::now_ms());
            core.apply(out)
        })
        .await?
    }

    /// Adds many new documents in one durable transaction (a group run creates one per machine).
    pub async fn create_many(&self, docs: Vec<(DocId, DocKind, Automerge)>) -> Result<()> {
        self.with_core(move |core| {
            let now = crate::now_ms();
            let mut out = Vec::new();
            for (id, kind, content) in docs {
                out.extend(core.hub.create(id, kind, content, now));
            }
            core.apply(out)
        })
        .await?
    }

    /// Sends this agent's heartbeat (its signed presence: addresses, time) to every peer that
    /// may see this machine, and keeps it. Not a document change: heartbeats leave no history.
    pub async fn announce_presence(&self) -> Result<()> {
        self.announce_presence_with(None).await
    }

    /// [`Node::announce_presence`], carrying the machine's live state.
    pub async fn announce_presence_with(&self, vitals: Option<caisey_doc::fleet::Vitals>) -> Result<()> {
        let presence = caisey_doc::fleet::Presence {
            node: self.id(),
            addrs: self.addrs(),
            at: crate::now_ms(),
            relay_server: None,
            vitals,
            unwritable: self.write_trouble().map(Into::into),
        };
        let record = self.signer().sign(caisey_doc::record::RecordKind::Presence, &presence);
        self.with_core(move |core| {
            let out = core.hub.announce(record);
            // Sent even when it cannot be kept here: its copy only keeps last-seen times.
            match core.apply(out) {
                Err(e) if e.is::<NotDurable>() => Ok(()),
                other => other,
            }
        })
        .await?
    }

    /// Appends output to session `doc`: the bytes (with their hashes) go to the store and `f`
    /// writes their references, in one durable transaction. While the store cannot be written
    /// this waits until it can (the output is kept meanwhile, and its command waits on its
    /// pipes), so output is never lost to a full disk.
    pub async fn append_output<R: Send + 'static>(
        &self,
        doc: DocId,
        chunks: Vec<(ChunkHash, Vec<u8>)>,
        f: impl FnOnce(&mut Automerge) -> R + Send + 'static,
    ) -> Result<R> {
        let (r, written) = self
            .with_core(move |core| {
                let mut out = core.hub.hold_chunks(doc, chunks);
                // (chunks: each with the hash its reference signs, computed once by the caller)
                let (r, more) =
                    core.hub.change(doc, crate::now_ms(), f).ok_or_else(|| anyhow!("no document {}", doc.short()))?;
                out.extend(more);
                anyhow::Ok((r, core.apply(out)))
            })
            .await??;
        self.durable(written, Vec::new()).await?;
        Ok(r)
    }

    /// Turns a change's [`NotDurable`] into a wait until it is durable, with `records` (which
    /// the failed transaction held) written again then.
    async fn durable(&self, written: Result<()>, records: Vec<LedgerEntry>) -> Result<()> {
        match written {
            Err(e) if e.is::<NotDurable>() => {
                self.wait_writable().await?;
                let writes: Vec<Write> =
                    records.into_iter().map(|(key, record)| Write::Ledger { key, record }).collect();
                self.with_core(move |core| core.store.apply(&writes)).await??;
                Ok(())
            }
            other => other,
        }
    }

    /// Reads a session document together with the output bytes held here.
    pub async fn read_with_output<R: Send + 'static>(
        &self,
        doc: DocId,
        f: impl FnOnce(&Automerge, &dyn ChunkSource) -> R + Send + 'static,
    ) -> Result<Option<R>> {
        self.with_core(move |core| {
            let chunks = core.store.chunks()?;
            let read = core.hub.doc(&doc).map(|d| f(d, &chunks));
            let damaged = chunks.take_damaged();
            drop(chunks);
            core.refetch(doc, damaged);
            Ok(read)
        })
        .await?
    }

    /// Reads a document, if we hold it.
    pub async fn read<R: Send + 'static>(
        &self,
        doc: DocId,
        f: impl FnOnce(&Automerge) -> R + Send + 'static,
    ) -> Result<Option<R>> {
        self.with_core(move |core| core.hub.doc(&doc).map(f)).await
    }

    /// Reads a document together with the verified fleet, without copying the fleet.
    pub async fn read_with_fleet<R: Send + 'static>(
        &self,
        doc: DocId,
        f: impl FnOnce(&Automerge, &Fleet) -> R + Send + 'static,
    ) -> Result<Option<R>> {
        self.with_core(move |core| core.hub.doc(&doc).map(|d| f(d, core.hub.fleet()))).await
    }

    /// Reads every document of `kind`, keeping what `f` returns.
    pub async fn read_all<R: Send + 'static>(
        &self,
        kind: DocKind,
        f: impl Fn(DocId, &Automerge, &Fleet) -> Option<R> + Send + 'static,
    ) -> Result<Vec<R>> {
        self.with_core(move |core| {
            let hub = &core.hub;
            hub.docs().filter(|(_, k)| *k == kind).filter_map(|(id, _)| f(id, hub.doc(&id)?, hub.fleet())).collect()
        })
        .await
    }

    /// Reads session `doc` with the output bytes held here and the fleet document it belongs to
    /// (what a transcript is built from).
    pub async fn read_with_fleet_doc<R: Send + 'static>(
        &self,
        doc: DocId,
        f: impl FnOnce(&Automerge, &Automerge, &dyn ChunkSource) -> R + Send + 'static,
    ) -> Result<R> {
        self.with_core(move |core| {
            let session = core.hub.doc(&doc).ok_or_else(|| anyhow!("no session {}", doc.short()))?;
            let fleet_doc = core.hub.fleet_doc().and_then(|id| core.hub.doc(&id)).ok_or_else(|| anyhow!("no org"))?;
            let chunks = core.store.chunks()?;
            let read = f(session, fleet_doc, &chunks);
            let damaged = chunks.take_damaged();
            drop(chunks);
            core.refetch(doc, damaged);
            Ok(read)
        })
        .await?
    }

    /// How many output chunks session `doc` references that are not here yet.
    /// Which of `hashes` (chunks session `doc` references) are held here, in order.
    pub async fn holds(&self, doc: DocId, hashes: Vec<ChunkHash>) -> Result<Vec<bool>> {
        self.with_core(move |core| core.hub.holds(&doc, &hashes)).await
    }

    pub async fn missing_output(&self, doc: DocId) -> Result<usize> {
        self.with_core(move |core| core.hub.missing_output(&doc)).await
    }

    /// Changes `doc` only if `f` succeeds. Besides the document, `f` sees the verified fleet and
    /// this node's ledger ([`Guard`]), and returns ledger entries to write in the same
    /// durable transaction as the change: an agent consumes an approval atomically with the
    /// start it writes. When `f` fails, nothing is written.
    pub async fn change_guarded<R: Send + 'static>(
        &self,
        doc: DocId,
        f: impl FnOnce(&mut Automerge, &Guard<'_>) -> Result<(R, Vec<LedgerEntry>)> + Send + 'static,
    ) -> Result<R> {
        let (r, records, written) = self
            .with_core(move |core| {
                let Core { hub, store, .. } = &mut *core;
                let (result, out) = hub
                    .change_with_fleet(doc, crate::now_ms(), |d, fleet| f(d, &Guard { fleet, store }))
                    .ok_or_else(|| anyhow!("no document {}", doc.short()))?;
                let (r, records) = result?;
                let writes = records.iter().map(|(key, record)| Write::Ledger { key: *key, record: *record }).collect();
                let written = core.apply_with(writes, out);
                anyhow::Ok((r, records, written))
            })
            .await??;
        // The change is kept and written when it can be; the records are written after it.
        self.durable(written, records).await?;
        Ok(r)
    }

    /// How many documents hold changes `peer` has not confirmed: as of now when it is connected,
    /// else as of what it acknowledged when we last spoke (written here while offline).
    pub async fn unconfirmed_docs(&self, peer: NodeId) -> Result<usize> {
        self.with_core(move |core| -> Result<usize> {
            if core.hub.peers().iter().any(|p| p.peer == peer) {
                return Ok(core.hub.sync_lag(&peer).len());
            }
            let saved: std::collections::BTreeMap<DocId, Vec<u8>> =
                core.store.sync_states(&peer)?.into_iter().collect();
            let mut n = 0;
            for (id, _) in core.hub.docs() {
                let Some(doc) = core.hub.doc(&id) else { continue };
                let acked = saved
                    .get(&id)
                    .and_then(|b| automerge::sync::State::decode(b).ok())
                    .map(|s| s.shared_heads)
                    .unwrap_or_default();
                if doc.get_heads().iter().any(|h| !acked.contains(h)) {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await?
    }

    /// The verified fleet (empty before this node has joined an org).
    pub async fn fleet(&self) -> Result<Fleet> {
        self.with_core(|core| core.hub.fleet().clone()).await
    }

    pub async fn fleet_doc(&self) -> Result<Option<DocId>> {
        self.with_core(|core| core.hub.fleet_doc()).await
    }

    /// Ids of every session document held here.
    pub async fn sessions(&self) -> Result<Vec<DocId>> {
        self.with_core(|core| core.hub.docs().filter(|(_, k)| *k == DocKind::Session).map(|(id, _)| id).collect()).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.with_core(|core| core.hub.peers()).await
    }

    /// Every connected peer and the path its connection uses now.
    pub async fn peer_paths(&self) -> Result<Vec<(NodeId, PeerPath)>> {
        self.with_core(|core| core.outboxes.iter().map(|(peer, o)| (*peer, PeerPath::of(&o.handle))).collect()).await
    }

    /// What this node's ledger holds for `key` (written by [`Node::change_guarded`]).
    pub async fn ledger(&self, key: LedgerKey) -> Result<Option<LedgerRecord>> {
        self.with_core(move |core| core.store.ledger(&key)).await?.map_err(Into::into)
    }

    pub async fn setting(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.with_core(move |core| core.store.setting(&key)).await?.map_err(Into::into)
    }

    pub async fn set_setting(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let key = key.to_string();
        self.with_core(move |core| core.store.apply(&[Write::Setting { key, value }])).await?.map_err(Into::into)
    }

    /// Removes a setting (written with [`Node::set_setting`]).
    pub async fn forget_setting(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.with_core(move |core| core.store.apply(&[Write::ForgetSetting { key }])).await?.map_err(Into::into)
    }

    /// Relays to keep in touch with: members with the relay role (addresses from their presence),
    /// plus any remembered from a token or `relay add`.
    pub async fn relay_contacts(&self) -> Result<Vec<Contact>> {
        self.contacts_of(&[Role::Relay]).await
    }

    /// The members this node keeps connected to: the org's relays and its technicians (a
    /// technician's node serves sync like a relay, so a shop without a relay works on its LAN).
    pub async fn hub_contacts(&self) -> Result<Vec<Contact>> {
        self.contacts_of(&[Role::Relay, Role::Technician]).await
    }

    /// Members with one of `roles`, at the addresses of their presence, where they last
    /// announced themselves on the LAN, and (for relays) the addresses remembered from a token
    /// or `relay add`; never this node itself.
    async fn contacts_of(&self, roles: &'static [Role]) -> Result<Vec<Contact>> {
        let me = self.id();
        let lan = self.shared.lan.clone();
        // Read in place: this runs every half second on every node, and cloning the fleet of a
        // large org each time would cost more than everything else an idle node does.
        self.with_core(move |core| {
            let mut out: Vec<Contact> = core
                .store
                .setting(SETTING_RELAYS)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<Vec<Contact>>(&b).ok())
                .unwrap_or_default();
            let fleet = core.hub.fleet();
            for member in fleet.members.values().filter(|m| roles.contains(&m.role)) {
                let recorded = fleet.presence.get(&member.node).map(|p| p.addrs.clone()).unwrap_or_default();
                let on_lan: Vec<String> = lan.addrs_of(&member.node).iter().map(|a| a.to_string()).collect();
                if recorded.is_empty() && on_lan.is_empty() {
                    continue;
                }
                let i = match out.iter().position(|c| c.node == member.node) {
                    Some(i) => i,
                    None => {
                        out.push(Contact { node: member.node, addrs: vec![] });
                        out.len() - 1
                    }
                };
                for a in recorded.into_iter().chain(on_lan) {
                    if !out[i].addrs.contains(&a) {
                        out[i].addrs.push(a);
                    }
                }
            }
            out.retain(|c| c.node != me);
            out
        })
        .await
    }

    /// A member's name, without copying the fleet.
    pub async fn member_name(&self, node: NodeId) -> Result<Option<caisey_doc::text::PeerText>> {
        self.with_core(move |core| core.hub.fleet().members.get(&node).map(|m| m.name.clone())).await
    }

    /// Whether `peer` is connected and holds everything we hold that it may hold.
    pub async fn in_sync_with(&self, peer: NodeId) -> Result<bool> {
        self.with_core(move |core| core.hub.in_sync_with(&peer)).await
    }

    /// Waits until in sync with `peer`, or `timeout`. Returns whether it got there. "In sync" is
    /// as of the peer's last message: a peer still producing changes may already be ahead again.
    /// Right for catching up with a relay; to wait for a specific result, wait on the content.
    pub async fn wait_in_sync(&self, peer: NodeId, timeout: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.subscribe();
        loop {
            if self.in_sync_with(peer).await? {
                return Ok(true);
            }
            // The message that completes a sync may change no document (it only tells us the
            // peer's heads), so no event announces it: re-check on a short tick as well.
            let tick = tokio::time::sleep(Duration::from_millis(25));
            if tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = events.recv() => {}
                    _ = tick => {}
                }
            })
            .await
            .is_err()
            {
                let lag = self.with_core(move |core| core.hub.sync_lag(&peer)).await?;
                debug!(peer = %peer.short(), ?lag, "not in sync before the deadline");
                return Ok(false);
            }
        }
    }

    /// Connects to `contact` for sync. Returns once the connection is registered with the core,
    /// or at once when a connection to it exists or is being made: one connection per peer (a
    /// second would replace the first, and both ends would resend what they had sent).
    pub async fn dial(&self, contact: &Contact) -> Result<()> {
        let peer = contact.node;
        if self.peers().await?.iter().any(|p| p.peer == peer) {
            return Ok(());
        }
        self.reconnect(contact).await
    }

    /// Dials `contact` even when connected already: the new connection replaces the old one (after
    /// this node's addresses changed, an old connection may be dead without knowing it yet).
    async fn reconnect(&self, contact: &Contact) -> Result<()> {
        let Some(_dialling) = Dialling::start(&self.shared.dialling, contact.node) else { return Ok(()) };
        let addr = self.endpoint_addr(contact)?;
        let conn = self
            .shared
            .endpoint
            .connect(addr, SYNC_ALPN)
            .await
            .with_context(|| format!("connecting to {} at {}", contact.node.short(), contact.addrs.join(", ")))?;
        let (mut send, recv) = conn.open_bi().await.context("opening sync stream")?;
        send.write_all(&Frame::hello().encode()).await.context("sending hello")?;
        self.register(conn, send, recv).await
    }

    /// Opens a connection for one of the small protocols (enrollment, publishing).
    pub async fn connect(&self, contact: &Contact, alpn: &[u8]) -> Result<Connection> {
        let addr = self.endpoint_addr(contact)?;
        self.shared
            .endpoint
            .connect(addr, alpn)
            .await
            .with_context(|| format!("could not reach {} at {}", contact.node.short(), contact.addrs.join(", ")))
    }

    /// Resolves once the node's endpoint is closed (the node is shutting down).
    pub async fn closed(&self) {
        self.shared.endpoint.closed().await;
    }

    /// Where to dial `contact`: its addresses, and the org's relay servers (through which iroh
    /// reaches a peer behind NAT and hole-punches a direct path to it).
    fn endpoint_addr(&self, contact: &Contact) -> Result<EndpointAddr> {
        let key = PublicKey::from_bytes(&contact.node.0).context("invalid node id")?;
        let mut ips: Vec<SocketAddr> = contact.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        // Where it last announced itself on the LAN, when it did (its recorded address may be old).
        for a in self.shared.lan.addrs_of(&contact.node) {
            if !ips.contains(&a) {
                ips.push(a);
            }
        }
        let addrs: Vec<TransportAddr> = ips
            .into_iter()
            .map(TransportAddr::Ip)
            .chain(self.shared.relay_servers.urls().into_iter().map(TransportAddr::Relay))
            .collect();
        if addrs.is_empty() {
            return Err(anyhow!("no usable address known for {}", contact.node.short()));
        }
        Ok(EndpointAddr::from_parts(key, addrs))
    }

    /// When this node's own addresses change (a new DHCP lease, another network): tells the
    /// org where it is now and reconnects to its peers from there, instead of waiting for the
    /// old connections to time out.
    fn watch_own_addrs(&self) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut watcher = node.shared.endpoint.watch_addr();
            let mut last: Vec<SocketAddr> = watcher.get().ip_addrs().copied().collect();
            loop {
                tokio::select! {
                    _ = node.shared.endpoint.closed() => return,
                    changed = watcher.updated() => if changed.is_err() { return },
                }
                let now: Vec<SocketAddr> = watcher.get().ip_addrs().copied().collect();
                if now == last {
                    continue;
                }
                // Connections can only have broken if an address went away; a new one (say, the
                // public address a relay server reports) only needs telling.
                let lost = last.iter().any(|a| !now.contains(a));
                last = now;
                info!(addrs = ?last, "this node's addresses changed; telling the org");
                let me = node.id();
                let role = node.with_core(move |core| core.hub.fleet().role_of(&me)).await.ok().flatten();
                let told = match role {
                    Some(Role::Agent) => node.announce_presence().await,
                    Some(_) => node.announce_in_fleet().await,
                    None => Ok(()),
                };
                if let Err(e) = told {
                    warn!("could not tell the org this node's new addresses: {e:#}");
                }
                if !lost {
                    continue;
                }
                for contact in node.connected_contacts().await.unwrap_or_default() {
                    let node = node.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(5), node.reconnect(&contact)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => debug!(peer = %contact.node.short(), "reconnecting: {e:#}"),
                            Err(_) => debug!(peer = %contact.node.short(), "reconnecting timed out"),
                        }
                    });
                }
            }
        });
    }

    /// Connected peers, at the addresses this node knows for them (recorded or heard on the LAN;
    /// iroh also remembers where it last reached them).
    async fn connected_contacts(&self) -> Result<Vec<Contact>> {
        let lan = self.shared.lan.clone();
        self.with_core(move |core| {
            let fleet = core.hub.fleet();
            core.outboxes
                .keys()
                .map(|peer| {
                    let mut addrs = fleet.presence.get(peer).map(|p| p.addrs.clone()).unwrap_or_default();
                    addrs.extend(lan.addrs_of(peer).iter().map(|a| a.to_string()));
                    Contact { node: *peer, addrs }
                })
                .collect()
        })
        .await
    }

    /// Uses the org's relay servers as the fleet names them, now and whenever it changes.
    async fn track_relay_servers(&self) -> Result<()> {
        let mut events = self.subscribe();
        let servers = self.fleet().await?.relay_servers();
        self.shared.relay_servers.update(&self.shared.endpoint, servers).await;
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                let changed = match events.recv().await {
                    Ok(NodeEvent::DocChanged(doc)) => node.fleet_doc().await.ok().flatten() == Some(doc),
                    Ok(_) => false,
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if changed && let Ok(fleet) = node.fleet().await {
                    node.shared.relay_servers.update(&node.shared.endpoint, fleet.relay_servers()).await;
                }
            }
        });
        Ok(())
    }

    /// Writes this node's addresses (and, for a relay, its relay server) into the fleet
    /// document when they changed, so members can reach it. Relays and technicians do this:
    /// others keep connected to them.
    pub async fn announce_in_fleet(&self) -> Result<()> {
        let Some(fleet_doc) = self.fleet_doc().await? else { return Ok(()) };
        let me = self.id();
        let addrs = self.addrs();
        let relay_server = self.own_relay_server().await?;
        let known = self.fleet().await?.presence.get(&me).cloned();
        if known.is_some_and(|p| p.addrs == addrs && p.relay_server == relay_server) {
            return Ok(());
        }
        let signer = self.signer().clone();
        self.change(fleet_doc, move |d| Fleet::put_presence(d, &signer, addrs, relay_server, crate::now_ms()))
            .await??;
        Ok(())
    }

    /// The iroh relay server this node runs, if it is a relay that runs one.
    pub async fn own_relay_server(&self) -> Result<Option<caisey_doc::fleet::RelayServer>> {
        Ok(self.setting(SETTING_RELAY_SERVER).await?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Records the iroh relay server this node runs (announced with [`Node::announce_in_fleet`]).
    pub async fn set_own_relay_server(&self, server: &caisey_doc::fleet::RelayServer) -> Result<()> {
        self.set_setting(SETTING_RELAY_SERVER, serde_json::to_vec(server)?).await
    }

    /// Keeps a connection to every relay and technician ([`Node::hub_contacts`]), redialling
    /// every second, until the node stops.
    pub fn keep_connected(&self) {
        if self.shared.keeping_connected.swap(true, Ordering::SeqCst) {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            // Since when each peer this node should reach has been apart from it.
            let mut apart: std::collections::BTreeMap<NodeId, tokio::time::Instant> = Default::default();
            loop {
                if node.shared.endpoint.is_closed() {
                    return;
                }
                let connected: Vec<NodeId> =
                    node.peers().await.map(|p| p.iter().map(|i| i.peer).collect()).unwrap_or_default();
                let me = node.id();
                let my_role = node.with_core(move |core| core.hub.fleet().role_of(&me)).await.ok().flatten();
                let hubs = node.hub_contacts().await.unwrap_or_default();
                apart.retain(|peer, _| hubs.iter().any(|h| h.node == *peer) && !connected.contains(peer));
                for peer in hubs.into_iter().filter(|p| !connected.contains(&p.node)) {
                    let since = *apart.entry(peer.node).or_insert_with(tokio::time::Instant::now);
                    if !node.dials(my_role, &peer.node, since.elapsed()).await {
                        continue;
                    }
                    // Each dial on its own: one member that is gone must not hold up the rest
                    // (and a dial already under way is not started twice).
                    let node = node.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(5), node.dial(&peer)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => debug!("{} unreachable: {e:#}", peer.node.short()),
                            Err(_) => debug!("{} timed out", peer.node.short()),
                        }
                    });
                }
                // Stop at once when the node shuts down, so its store is released promptly.
                tokio::select! {
                    _ = node.shared.endpoint.closed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }

    /// Whether this node (of role `mine`) is the one to dial `peer`, a relay or technician
    /// it has been apart from for `apart`. Agents and approvers dial the org's hubs; technicians
    /// dial relays; a relay never dials a technician (it may sit behind a NAT). Between two
    /// relays or two technicians the smaller id dials, so a pair does not race to replace each
    /// other's connection — and the larger one too once they have been apart for
    /// [`PAIR_PATIENCE`]: the smaller one may be unable to reach it (behind a NAT).
    async fn dials(&self, mine: Option<Role>, peer: &NodeId, apart: Duration) -> bool {
        let peer = *peer;
        let theirs = self.with_core(move |core| core.hub.fleet().role_of(&peer)).await.ok().flatten();
        match (mine, theirs) {
            (Some(Role::Relay), Some(Role::Relay)) | (Some(Role::Technician), Some(Role::Technician)) => {
                self.id() < peer || apart >= PAIR_PATIENCE
            }
            (Some(Role::Relay), _) => false,
            _ => true,
        }
    }

    async fn register(&self, handle: Connection, send: SendStream, recv: RecvStream) -> Result<()> {
        let peer = NodeId(*handle.remote_id().as_bytes());
        let conn = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let outbox = Outbox { conn, tx, queued: queued.clone(), handle: handle.clone() };
        self.shared.cmd.send(Cmd::Connected { peer, outbox }).await.map_err(|_| anyhow!("node has stopped"))?;
        tokio::spawn(write_loop(send, rx, queued));
        tokio::spawn(read_loop(self.shared.cmd.clone(), peer, conn, handle, recv));
        Ok(())
    }

    /// Closes every connection and the endpoint, saving sync states, then the store: the node
    /// answers nothing after this.
    pub async fn shutdown(&self) {
        let _ = self
            .with_core(|core| {
                let peers: Vec<(NodeId, ConnId)> = core.outboxes.iter().map(|(p, o)| (*p, o.conn)).collect();
                let mut out = Vec::new();
                for (peer, conn) in peers {
                    out.extend(core.hub.handle(crate::now_ms(), Input::Disconnected { peer, conn }));
                }
                core.flush(&mut out);
            })
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.endpoint.close()).await;
        // The store is closed when this returns, so the same home can be opened again at once.
        let (tx, rx) = oneshot::channel();
        if self.shared.cmd.send(Cmd::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Binds the endpoint offline-safe (no public relays, no DNS discovery). With port 0, reuses the
/// port from the last run when it is free, so peers holding our old address still find us.
async fn bind(
    signer: &Signer,
    listen: SocketAddr,
    store: &mut Store,
    relay_servers: &RelayServers,
    lan: &Lan,
) -> Result<Endpoint> {
    let mut candidates = Vec::new();
    if listen.port() == 0
        && let Some(port) = store.setting(SETTING_PORT)?.and_then(|b| b.try_into().ok()).map(u16::from_be_bytes)
    {
        candidates.push(SocketAddr::new(listen.ip(), port));
    }
    candidates.push(listen);
    let mut last_err = None;
    for addr in candidates {
        let mut builder = Endpoint::builder(presets::Minimal)
            .secret_key(SecretKey::from_bytes(&signer.secret()))
            .alpns(std::iter::once(SYNC_ALPN).chain(EXTRA_ALPNS.iter().copied()).map(<[u8]>::to_vec).collect())
            .transport_config(transport_config()?)
            .relay_mode(RelayMode::Custom(iroh::RelayMap::empty()))
            .ca_tls_config(relay_servers.tls_config())
            .clear_ip_transports()
            .bind_addr(addr)
            .map_err(|e| anyhow!("invalid --listen address {addr}: {e}"))?;
        if let Some(lookup) = lan.lookup() {
            builder = builder.address_lookup(lookup);
        }
        match builder.bind().await {
            Ok(ep) => {
                if let Some(bound) = ep.bound_sockets().first() {
                    store.apply(&[Write::Setting {
                        key: SETTING_PORT.into(),
                        value: bound.port().to_be_bytes().to_vec(),
                    }])?;
                }
                return Ok(ep);
            }
            Err(e) => last_err = Some(anyhow!("could not listen on {addr}: {e}")),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow!("could not bind")))
}

/// How long the larger id of a pair of relays or technicians leaves the dialling to the smaller.
const PAIR_PATIENCE: Duration = Duration::from_secs(20);

/// A connection silent this long is dead (default QUIC: 30 s). A peer killed with kill -9, a
/// laptop that moved: its sync connection is dropped in seconds and redialled, instead of
/// holding what is sent to it for half a minute.
const IDLE_TIMEOUT: Duration = Duration::from_secs(8);

fn transport_config() -> Result<iroh::endpoint::QuicTransportConfig> {
    let idle = IDLE_TIMEOUT.try_into().map_err(|e| anyhow!("idle timeout: {e}"))?;
    Ok(iroh::endpoint::QuicTransportConfig::builder().max_idle_timeout(Some(idle)).build())
}

/// Inputs handled before their outputs are carried out together, at most.
const BATCH: usize = 64;

/// The core task. Whatever is already queued is handled before one durable write: a burst of
/// frames (output chunks streaming in) costs one redb commit, not one each. Outputs keep their
/// order, and nothing is sent before the whole batch is on disk.
/// A hub holding every stored document and heartbeat.
fn load_hub(me: NodeId, store: &mut Store) -> Result<Hub> {
    let mut hub = Hub::new(me);
    let mut docs = store.load_docs()?;
    // The fleet first, so sessions can be checked against it as they load.
    docs.sort_by_key(|(_, kind, _)| *kind != DocKind::Fleet);
    let mut damaged = Vec::new();
    {
        let stored = store.chunks()?;
        for (id, kind, bytes) in docs {
            if let Err(e) = hub.load(id, kind, &bytes, &|h| stored.contains(h)) {
                // Without the fleet nothing can be checked, nor fetched from anyone.
                if kind == DocKind::Fleet {
                    bail!(
                        "the org's fleet document in {} does not load ({e}); nothing was changed. Restore the \
                         store from a backup, or move this home aside and enroll (or join) again",
                        store.path().display()
                    );
                }
                damaged.push((id, kind, e));
            }
        }
    }
    // Any other document that does not load is fetched again from the peers that have it; what
    // was stored is kept aside, not thrown away.
    for (id, kind, e) in damaged {
        let kept = store.set_aside(&id)?;
        warn!(
            doc = %id.short(),
            "a stored {kind:?} document does not load ({e}); fetching it again from peers (its {kept} stored bytes are kept aside)"
        );
        hub.load_damaged(id, kind);
    }
    for record in store.presences()? {
        hub.load_presence(record);
    }
    Ok(hub)
}

fn run_core(mut core: Core, mut inbox: mpsc::Receiver<Cmd>) {
    let mut pending = Vec::new();
    while let Some(first) = inbox.blocking_recv() {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Connected { peer, outbox } => {
                    let stored = core.store.sync_states(&peer).unwrap_or_default();
                    let conn = outbox.conn;
                    // A newer connection from the same peer replaces the old one.
                    if let Some(old) = core.outboxes.insert(peer, outbox) {
                        old.handle.close(4u32.into(), crate::hub::REPLACED.as_bytes());
                    }
                    pending.extend(core.hub.handle(crate::now_ms(), Input::Connected { peer, conn, stored }));
                }
                Cmd::Input(input) => {
                    if let Input::Disconnected { peer, conn } = &input
                        && core.outboxes.get(peer).is_some_and(|o| o.conn == *conn)
                    {
                        core.outboxes.remove(peer);
                    }
                    pending.extend(core.hub.handle(crate::now_ms(), input));
                }
                Cmd::Tick => {
                    core.tick_at = None;
                    pending.extend(core.hub.handle_timeout(crate::now_ms()));
                }
                // A job sees everything before it carried out.
                Cmd::Run(job) => {
                    core.flush(&mut pending);
                    job(&mut core);
                }
                Cmd::Stop(done) => {
                    core.flush(&mut pending);
                    drop(core);
                    let _ = done.send(());
                    return;
                }
            }
            handled += 1;
            if handled < BATCH {
                next = inbox.try_recv().ok();
            }
        }
        core.flush(&mut pending);
    }
}

async fn accept_loop(node: Node) {
    while let Some(incoming) = node.shared.endpoint.accept().await {
        let node = node.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => return debug!("incoming connection failed: {e}"),
            };
            if conn.alpn() != SYNC_ALPN {
                let handler = node.shared.handlers.lock().ok().and_then(|h| h.get(conn.alpn()).cloned());
                match handler {
                    Some(h) => h(node.clone(), conn).await,
                    None => conn.close(3u32.into(), b"this node does not serve that protocol"),
                }
                return;
            }
            let result = async {
                let (send, mut recv) = conn.accept_bi().await?;
                // Membership is checked after the hello: until then, read no more than a hello.
                match read_frame_within(&mut recv, 16).await? {
                    Frame::Hello { .. } => {}
                    _ => return Err(anyhow!("expected hello")),
                }
                node.register(conn.clone(), send, recv).await
            }
            .await;
            if let Err(e) = result {
                debug!(peer = %conn.remote_id().fmt_short(), "sync connection failed: {e:#}");
                conn.close(2u32.into(), b"protocol error");
            }
        });
    }
}

async fn read_frame(recv: &mut RecvStream) -> Result<Frame> {
    read_frame_within(recv, crate::wire::MAX_FRAME).await
}

async fn read_frame_within(recv: &mut RecvStream, max: usize) -> Result<Frame> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let len = Frame::check_len(prefix)?;
    if len > max {
        return Err(crate::wire::FrameError::TooLarge(len).into());
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Frame::decode(&body)?)
}

async fn read_loop(cmd: mpsc::Sender<Cmd>, peer: NodeId, conn: ConnId, handle: Connection, mut recv: RecvStream) {
    loop {
        match read_frame(&mut recv).await {
            Ok(frame) => {
                if cmd.send(Cmd::Input(Input::Frame { peer, conn, frame })).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                debug!(peer = %peer.short(), "connection ended: {e:#}");
                if e.downcast_ref::<crate::wire::FrameError>().is_some() {
                    warn!(peer = %peer.short(), "bad frame, disconnecting: {e}");
                    handle.close(2u32.into(), b"bad frame");
                }
                break;
            }
        }
    }
    let _ = cmd.send(Cmd::Input(Input::Disconnected { peer, conn })).await;
}

async fn write_loop(mut send: SendStream, mut rx: mpsc::UnboundedReceiver<Vec<u8>>, queued: Arc<AtomicUsize>) {
    while let Some(bytes) = rx.recv().await {
        let written = send.write_all(&bytes).await;
        queued.fetch_sub(bytes.len(), Ordering::Relaxed);
        if written.is_err() {
            break;
        }
    }
    let _ = send.finish();
}
