//! Durable state: one redb file for documents (an incremental stream of Automerge chunks),
//! per-peer sync states and small settings, and beside it an append-only log of output bytes.
//!
//! A document is stored as `(doc, seq) -> bytes`; loading concatenates the chunks (Automerge
//! loads concatenated saves and change chunks). The hub decides when a full save replaces the
//! chunks (compaction). Every `apply` is one redb transaction, so a batch of outputs from the
//! hub is all-or-nothing.
//!
//! Output bytes go to `<store>.chunks`, written once at the end and never rewritten; redb keeps
//! each chunk's place (hash -> offset, length) and how long the log is. So a byte of output costs
//! about one byte on disk: a copy-on-write B-tree holding 64 KiB values, and a file that grows
//! by doubling, cost two to three. The log is written and synced *before* the transaction that
//! records it commits; bytes past the recorded length (a crash in between) are cut off at open.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{ChunkHash, ChunkSource};
use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};

use crate::wire::DocKind;

const DOC_CHUNKS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("doc_chunks");
const DOC_KINDS: TableDefinition<&[u8], u8> = TableDefinition::new("doc_kinds");
/// Stored chunks of documents that did not load, kept as they were (`(doc, seq) -> bytes`)
/// when a good copy from a peer replaces them: nothing is thrown away unseen.
const DAMAGED_DOCS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("damaged_doc_chunks");
/// Where each output chunk is in the log, by SHA-256: `(offset, length)`.
const OUTPUT_INDEX: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("output_index");
/// Each agent's newest heartbeat (a signed `Presence` record), by agent key: overwritten in
/// place, so last-seen times survive a restart without any history.
const PRESENCE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("presence");
/// Settings key: how many bytes of the output log are committed.
const LOG_LEN: &str = "output_log_len";
/// `(peer, doc) -> state`: peer first, so a connecting peer's states are one range read.
const SYNC_STATES: TableDefinition<(&[u8], &[u8]), &[u8]> = TableDefinition::new("peer_sync_states");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
/// The ledger: what this node did that must never be done twice, by `(kind, id)` ->
/// `(outcome, at)` (see [`LedgerKey`]).
const LEDGER: TableDefinition<(u8, &[u8]), (u8, u64)> = TableDefinition::new("ledger");
/// Published transcripts (relays): link id -> publisher key (32 bytes) followed by the JSON.
const PUBLISHED: TableDefinition<&str, &[u8]> = TableDefinition::new("published");

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{0} is in use by another caisey process; stop it or use another --home")]
    InUse(String),
    #[error("store: {0}")]
    Redb(String),
    #[error("output log {path}: {what}")]
    Log { path: String, what: String },
    /// The store cannot be read as it is. Nothing was changed: a damaged store is never silently
    /// replaced by an empty one (the node would forget its org, and its output log with it).
    #[error(
        "{path} is damaged ({why}); nothing was changed. Restore it from a backup, or move this home \
         aside to start afresh (what only this home holds is then lost)"
    )]
    Damaged { path: String, why: String },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.to_string())
            }
        }
    )*};
}
from_redb!(redb::Error, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// What an agent's ledger is kept by: an approval (by its nonce) or a request (by its id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LedgerKey {
    Approval(Id128),
    Request(Id128),
    /// A schedule (by its id), whose consent the endpoint user revoked.
    Schedule(Id128),
}

/// What was done, once and for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An approval was used to start its request.
    Used,
    Started,
    Denied,
    Expired,
    /// A schedule's standing consent was taken back.
    Revoked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Used => "used",
            Outcome::Started => "started",
            Outcome::Denied => "denied",
            Outcome::Expired => "expired",
            Outcome::Revoked => "revoked",
        }
    }

    fn code(self) -> u8 {
        match self {
            Outcome::Used => 1,
            Outcome::Started => 2,
            Outcome::Denied => 3,
            Outcome::Expired => 4,
            Outcome::Revoked => 5,
        }
    }

    fn from_code(code: u8) -> Option<Outcome> {
        Some(match code {
            1 => Outcome::Used,
            2 => Outcome::Started,
            3 => Outcome::Denied,
            4 => Outcome::Expired,
            5 => Outcome::Revoked,
            _ => return None,
        })
    }
}

/// One entry of the ledger: what was done, and when (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerRecord {
    pub outcome: Outcome,
    pub at: u64,
}

impl LedgerKey {
    fn parts(&self) -> (u8, &[u8]) {
        match self {
            LedgerKey::Approval(id) => (1, id.0.as_slice()),
            LedgerKey::Request(id) => (2, id.0.as_slice()),
            LedgerKey::Schedule(id) => (3, id.0.as_slice()),
        }
    }
}

/// One durable write, as asked for by the hub.
#[derive(Debug)]
pub enum Write {
    Doc {
        doc: DocId,
        kind: DocKind,
        bytes: Vec<u8>,
        compact: bool,
    },
    SyncState {
        doc: DocId,
        peer: NodeId,
        state: Vec<u8>,
    },
    Chunk {
        hash: ChunkHash,
        data: Vec<u8>,
    },
    Presence {
        node: NodeId,
        record: Vec<u8>,
    },
    Setting {
        key: String,
        value: Vec<u8>,
    },
    /// Removes a setting (no error if there is none).
    ForgetSetting {
        key: String,
    },
    /// Forgets where a chunk is (found damaged): a good copy from a peer is then stored anew.
    ForgetChunk {
        hash: ChunkHash,
    },
    /// Records in the ledger what was done (never overwritten once there).
    Ledger {
        key: LedgerKey,
        record: LedgerRecord,
    },
}

#[derive(Debug)]
pub struct Store {
    /// `None` after a failed commit: redb then refuses everything until the database is opened
    /// again (and repaired, which itself needs space), which the next write tries first.
    db: Option<Database>,
    path: PathBuf,
    log: File,
    log_path: PathBuf,
    /// Committed length of the log: where the next chunk goes.
    log_len: AtomicU64,
}

impl Store {
    /// Opens (or creates) the store at `path` and its output log beside it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let log_path = path.with_extension("chunks");
        let db = open_db(path, &log_path)?;
        let log_err = |what: String| StoreError::Log { path: log_path.display().to_string(), what };
        let log = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(|e| log_err(e.to_string()))?;
        // Sessions and output are the owner's alone, whatever the umask it was made under (a
        // home shared with a consent group lets its members reach the socket, not these).
        for file in [path, log_path.as_path()] {
            owner_only(file).map_err(|e| StoreError::Redb(format!("restricting {}: {e}", file.display())))?;
        }
        let tx = db.begin_write()?;
        let committed = tx
            .open_table(SETTINGS)?
            .get(LOG_LEN)?
            .and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        let on_disk = log.metadata().map_err(|e| log_err(e.to_string()))?.len();
        if on_disk < committed {
            return Err(log_err(format!(
                "{on_disk} bytes, but the store records {committed}: it was truncated or replaced"
            )));
        }
        // Bytes past the committed length were never recorded (a crash mid-write): drop them.
        log.set_len(committed).map_err(|e| log_err(e.to_string()))?;
        tx.open_table(DOC_CHUNKS)?;
        tx.open_table(DOC_KINDS)?;
        tx.open_table(OUTPUT_INDEX)?;
        tx.open_table(PRESENCE)?;
        tx.open_table(SYNC_STATES)?;
        tx.open_table(SETTINGS)?;
        tx.open_table(PUBLISHED)?;
        migrate_ledger(&tx)?;
        tx.commit()?;
        Ok(Self { db: Some(db), path: path.to_path_buf(), log, log_path, log_len: AtomicU64::new(committed) })
    }

    /// Where the store is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<&Database, StoreError> {
        self.db.as_ref().ok_or_else(|| {
            StoreError::Redb(format!("{} cannot be read until it can be written again", self.path.display()))
        })
    }

    /// Keeps a copy of `doc`'s stored chunks aside (it did not load), before a good copy from a
    /// peer replaces them; returns how many bytes were kept.
    pub fn set_aside(&mut self, doc: &DocId) -> Result<usize, StoreError> {
        self.write(|_, tx| {
            let chunks = tx.open_table(DOC_CHUNKS)?;
            let mut aside = tx.open_table(DAMAGED_DOCS)?;
            let id = doc.0.as_slice();
            let mut kept = 0;
            for c in chunks.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = c?;
                kept += v.value().len();
                aside.insert((id, k.value().1), v.value())?;
            }
            Ok(kept)
        })
    }

    /// Every document, as the concatenation of its stored chunks.
    pub fn load_docs(&self) -> Result<Vec<(DocId, DocKind, Vec<u8>)>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let kinds = tx.open_table(DOC_KINDS)?;
        let chunks = tx.open_table(DOC_CHUNKS)?;
        let mut out = Vec::new();
        for entry in kinds.iter()? {
            let (id, kind) = entry?;
            let Ok(id) = <[u8; 16]>::try_from(id.value()) else { continue };
            let kind = match kind.value() {
                1 => DocKind::Fleet,
                3 => DocKind::Machine,
                _ => DocKind::Session,
            };
            let mut bytes = Vec::new();
            for c in chunks.range((id.as_slice(), 0)..=(id.as_slice(), u64::MAX))? {
                bytes.extend_from_slice(c?.1.value());
            }
            out.push((Id128(id), kind, bytes));
        }
        Ok(out)
    }

    /// A consistent view of the stored output chunks, to read a session's output from.
    pub fn chunks(&self) -> Result<StoredChunks<'_>, StoreError> {
        Ok(StoredChunks {
            index: self.db()?.begin_read()?.open_table(OUTPUT_INDEX)?,
            log: &self.log,
            damaged: Default::default(),
        })
    }

    /// Appends the chunks not stored yet to the log and syncs it; returns their index entries
    /// and the log's new length, for the transaction that commits them.
    fn append_chunks(
        &self,
        index: &redb::Table<&[u8], (u64, u64)>,
        chunks: &[(&ChunkHash, &Vec<u8>)],
    ) -> Result<(Vec<Placed>, u64), StoreError> {
        let start = self.log_len.load(Ordering::Acquire);
        let mut buf = Vec::new();
        let mut placed: Vec<Placed> = Vec::new();
        for (hash, data) in chunks {
            if index.get(hash.as_slice())?.is_some() || placed.iter().any(|(h, _, _)| h == *hash) {
                continue;
            }
            placed.push((**hash, start + buf.len() as u64, data.len() as u64));
            buf.extend_from_slice(data);
        }
        if !buf.is_empty() {
            let log_err =
                |e: std::io::Error| StoreError::Log { path: self.log_path.display().to_string(), what: e.to_string() };
            write_at(&self.log, &buf, start).map_err(log_err)?;
            self.log.sync_data().map_err(log_err)?;
        }
        Ok((placed, start + buf.len() as u64))
    }

    /// Every stored heartbeat record.
    pub fn presences(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(PRESENCE)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            out.push(entry?.1.value().to_vec());
        }
        Ok(out)
    }

    /// Sync states saved for `peer`.
    pub fn sync_states(&self, peer: &NodeId) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(SYNC_STATES)?;
        let mut out = Vec::new();
        let (lo, hi): (&[u8], &[u8]) = (&[], &[0xff; 17]);
        for entry in t.range((peer.0.as_slice(), lo)..=(peer.0.as_slice(), hi))? {
            let (k, v) = entry?;
            if let Ok(doc) = <[u8; 16]>::try_from(k.value().1) {
                out.push((Id128(doc), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// A published transcript: its publisher and JSON.
    pub fn published(&self, id: &str) -> Result<Option<(NodeId, Vec<u8>)>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(PUBLISHED)?;
        Ok(t.get(id)?.and_then(|v| {
            let v = v.value();
            let key: [u8; 32] = v.get(..32)?.try_into().ok()?;
            Some((NodeId(key), v[32..].to_vec()))
        }))
    }

    pub fn publish(&mut self, id: &str, publisher: &NodeId, json: &[u8]) -> Result<(), StoreError> {
        self.write(|_, tx| {
            let mut t = tx.open_table(PUBLISHED)?;
            let mut value = Vec::with_capacity(32 + json.len());
            value.extend_from_slice(&publisher.0);
            value.extend_from_slice(json);
            t.insert(id, value.as_slice())?;
            Ok(())
        })
    }

    /// Withdraws a transcript; false if there was none.
    pub fn unpublish(&mut self, id: &str) -> Result<bool, StoreError> {
        self.write(|_, tx| Ok(tx.open_table(PUBLISHED)?.remove(id)?.is_some()))
    }

    /// Runs `f` in one write transaction and commits it. Nothing of it is durable when this
    /// fails (a full disk, an I/O error), and the store stays usable: redb refuses everything
    /// after a failed commit, so it is closed then and opened again (repaired, which needs
    /// space itself) by the next write.
    fn write<R>(
        &mut self,
        f: impl FnOnce(&Self, &redb::WriteTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if self.db.is_none() {
            self.db = Some(open_db(&self.path, &self.log_path)?);
        }
        let tx = self.db()?.begin_write()?;
        let result = f(self, &tx).and_then(|r| {
            tx.commit()?;
            Ok(r)
        });
        if matches!(result, Err(StoreError::Redb(_))) {
            // Opened again at once, so reads go on; if even that fails (repairing needs space
            // too), the next write tries again.
            self.db = None;
            self.db = open_db(&self.path, &self.log_path).ok();
        }
        result
    }

    /// What the ledger holds for `key`.
    pub fn ledger(&self, key: &LedgerKey) -> Result<Option<LedgerRecord>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(LEDGER)?;
        Ok(t.get(key.parts())?.and_then(|v| {
            let (code, at) = v.value();
            Some(LedgerRecord { outcome: Outcome::from_code(code)?, at })
        }))
    }

    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(SETTINGS)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Applies writes in one transaction: durable when this returns (see [`Store::write`] for
    /// when it fails).
    pub fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let new_log_len = self.write(|store, tx| store.apply_in(tx, writes))?;
        if let Some(len) = new_log_len {
            self.log_len.store(len, Ordering::Release);
        }
        Ok(())
    }

    /// Carries out `writes` in `tx`; returns the output log's new length, if it grew.
    fn apply_in(&self, tx: &redb::WriteTransaction, writes: &[Write]) -> Result<Option<u64>, StoreError> {
        let mut new_log_len = None;
        {
            let mut chunks = tx.open_table(DOC_CHUNKS)?;
            let mut kinds = tx.open_table(DOC_KINDS)?;
            let mut states = tx.open_table(SYNC_STATES)?;
            let mut settings = tx.open_table(SETTINGS)?;
            let mut index = tx.open_table(OUTPUT_INDEX)?;
            let mut presence = tx.open_table(PRESENCE)?;
            let mut ledger = tx.open_table(LEDGER)?;
            let output: Vec<(&ChunkHash, &Vec<u8>)> = writes
                .iter()
                .filter_map(|w| match w {
                    Write::Chunk { hash, data } => Some((hash, data)),
                    _ => None,
                })
                .collect();
            if !output.is_empty() {
                let (placed, len) = self.append_chunks(&index, &output)?;
                for (hash, offset, n) in placed {
                    index.insert(hash.as_slice(), (offset, n))?;
                }
                settings.insert(LOG_LEN, len.to_be_bytes().as_slice())?;
                new_log_len = Some(len);
            }
            for w in writes {
                match w {
                    Write::Doc { doc, kind, bytes, compact } => {
                        let id = doc.0.as_slice();
                        kinds.insert(
                            id,
                            match kind {
                                DocKind::Fleet => 1,
                                DocKind::Session => 2,
                                DocKind::Machine => 3,
                            },
                        )?;
                        let next = match chunks.range((id, 0)..=(id, u64::MAX))?.next_back() {
                            Some(last) => last?.0.value().1 + 1,
                            None => 0,
                        };
                        if *compact {
                            chunks.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
                        }
                        chunks.insert((id, next), bytes.as_slice())?;
                    }
                    Write::SyncState { doc, peer, state } => {
                        states.insert((peer.0.as_slice(), doc.0.as_slice()), state.as_slice())?;
                    }
                    Write::Setting { key, value } => {
                        settings.insert(key.as_str(), value.as_slice())?;
                    }
                    Write::ForgetSetting { key } => {
                        settings.remove(key.as_str())?;
                    }
                    Write::ForgetChunk { hash } => {
                        index.remove(hash.as_slice())?;
                    }
                    Write::Chunk { .. } => {} // appended above
                    Write::Presence { node, record } => {
                        presence.insert(node.0.as_slice(), record.as_slice())?;
                    }
                    Write::Ledger { key, record } => {
                        // The first record stands: what was done is not undone by a later write.
                        if ledger.get(key.parts())?.is_none() {
                            ledger.insert(key.parts(), (record.outcome.code(), record.at))?;
                        }
                    }
                }
            }
        }
        Ok(new_log_len)
    }
}

/// Stores from before the ledger had its own table kept it among the settings, as
/// `consumed/<nonce>` and `request/<id>` -> `started|denied|expired`: moved into the ledger.
fn migrate_ledger(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut settings = tx.open_table(SETTINGS)?;
    let mut ledger = tx.open_table(LEDGER)?;
    let mut moved = Vec::new();
    for entry in settings.iter()? {
        let (k, v) = entry?;
        let key = k.value();
        let parsed = |hex: &str| <[u8; 16]>::try_from(::hex::decode(hex).ok()?).ok().map(Id128);
        let (ledger_key, outcome) = match key.split_once('/') {
            Some(("consumed", id)) => match parsed(id) {
                Some(id) => (LedgerKey::Approval(id), Outcome::Used),
                None => continue,
            },
            Some(("request", id)) => match (parsed(id), v.value()) {
                (Some(id), b"started") => (LedgerKey::Request(id), Outcome::Started),
                (Some(id), b"denied") => (LedgerKey::Request(id), Outcome::Denied),
                (Some(id), b"expired") => (LedgerKey::Request(id), Outcome::Expired),
                _ => continue,
            },
            _ => continue,
        };
        moved.push((key.to_string(), ledger_key, outcome));
    }
    for (key, ledger_key, outcome) in moved {
        ledger.insert(ledger_key.parts(), (outcome.code(), 0))?;
        settings.remove(key.as_str())?;
    }
    Ok(())
}

#[cfg(unix)]
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn owner_only(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Opens the store's database: creates it only where there is none (and no output log that a
/// lost database would orphan); refuses, changing nothing, one that exists but cannot be read.
fn open_db(path: &Path, log_path: &Path) -> Result<Database, StoreError> {
    let damaged = |why: String| StoreError::Damaged { path: path.display().to_string(), why };
    let in_use = |e: &redb::DatabaseError| matches!(e, redb::DatabaseError::DatabaseAlreadyOpen);
    match std::fs::metadata(path) {
        Err(_) => {
            let log_len = std::fs::metadata(log_path).map(|m| m.len()).unwrap_or(0);
            if log_len > 0 {
                return Err(damaged(format!(
                    "it is missing, but {} holds {log_len} bytes of output",
                    log_path.display()
                )));
            }
            Database::create(path).map_err(|e| match e {
                e if in_use(&e) => StoreError::InUse(path.display().to_string()),
                other => StoreError::Redb(format!("creating {}: {other}", path.display())),
            })
        }
        Ok(meta) if meta.len() == 0 => Err(damaged("it is empty".into())),
        Ok(_) => {
            // redb can panic on some malformed files rather than return an error.
            match std::panic::catch_unwind(|| Database::open(path)) {
                Ok(Ok(db)) => Ok(db),
                Ok(Err(e)) if in_use(&e) => Err(StoreError::InUse(path.display().to_string())),
                Ok(Err(e)) => Err(damaged(e.to_string())),
                Err(_) => Err(damaged("its structure does not read".into())),
            }
        }
    }
}

/// Where a chunk went in the log: hash, offset, length.
type Placed = (ChunkHash, u64, u64);

/// Output chunks as of one read transaction.
pub struct StoredChunks<'a> {
    index: ReadOnlyTable<&'static [u8], (u64, u64)>,
    log: &'a File,
    /// Chunks found damaged on disk while reading (their bytes no longer match their hash).
    damaged: std::cell::RefCell<Vec<ChunkHash>>,
}

impl StoredChunks<'_> {
    /// Whether the output chunk `hash` is stored (a failed read counts as "no": it is fetched
    /// again).
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.index.get(hash.as_slice()).is_ok_and(|v| v.is_some())
    }
}

impl StoredChunks<'_> {
    /// The chunks found damaged by reads so far (each once).
    pub fn take_damaged(&self) -> Vec<ChunkHash> {
        let mut damaged = self.damaged.take();
        damaged.sort();
        damaged.dedup();
        damaged
    }
}

impl ChunkSource for StoredChunks<'_> {
    /// `None` also when the log can't be read, or the bytes there no longer match their hash (a
    /// damaged disk): the bytes are then not shown, and the damage is noted ([`Self::take_damaged`]).
    fn chunk(&self, hash: &ChunkHash) -> Option<Vec<u8>> {
        let (offset, len) = self.index.get(hash.as_slice()).ok()??.value();
        let mut buf = vec![0; usize::try_from(len).ok()?];
        read_at(self.log, &mut buf, offset).ok()?;
        if caisey_doc::session::chunk_hash(&buf) != *hash {
            self.damaged.borrow_mut().push(*hash);
            return None;
        }
        Some(buf)
    }
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, buf, offset)?;
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn chunks_append_compact_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let id = Id128([1; 16]);
        {
            let mut s = Store::open(&path).unwrap();
            let w = |b: &[u8], compact| Write::Doc { doc: id, kind: DocKind::Session, bytes: b.to_vec(), compact };
            s.apply(&[w(b"ab", true), w(b"cd", false)]).unwrap();
            assert_eq!(s.load_docs().unwrap()[0].2, b"abcd");
            s.apply(&[w(b"XY", true), w(b"z", false)]).unwrap();
            assert!(matches!(Store::open(&path), Err(StoreError::InUse(_))));
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_docs().unwrap(), vec![(id, DocKind::Session, b"XYz".to_vec())]);
    }

    #[test]
    fn output_chunks_are_read_back_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.redb")).unwrap();
        let data = b"Filesystem Size Used\n".to_vec();
        let hash = caisey_doc::session::chunk_hash(&data);
        assert!(!s.chunks().unwrap().contains(&hash));
        s.apply(&[Write::Chunk { hash, data: data.clone() }]).unwrap();
        assert!(s.chunks().unwrap().contains(&hash));
        assert_eq!(s.chunks().unwrap().chunk(&hash), Some(data));
        assert_eq!(s.chunks().unwrap().chunk(&[0; 32]), None);
    }

    #[test]
    fn output_log_cuts_unrecorded_bytes_and_refuses_a_truncated_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let data = vec![7u8; 70_000];
        let hash = caisey_doc::session::chunk_hash(&data);
        {
            let mut s = Store::open(&path).unwrap();
            // The same chunk twice (two sessions printing the same thing) is stored once.
            s.apply(&[Write::Chunk { hash, data: data.clone() }, Write::Chunk { hash, data: data.clone() }]).unwrap();
            s.apply(&[Write::Chunk { hash, data: data.clone() }]).unwrap();
        }
        let log = path.with_extension("chunks");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 70_000);
        // A crash after the log write, before the commit: the tail is dropped at open.
        std::fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(b"half a chunk").unwrap();
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(std::fs::metadata(&log).unwrap().len(), 70_000);
            assert_eq!(s.chunks().unwrap().chunk(&hash), Some(data));
        }
        std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(10).unwrap();
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("truncated or replaced"), "{err}");
    }

    #[test]
    fn sync_states_are_read_per_peer() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.redb")).unwrap();
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let w = |peer, doc: u8, state: &[u8]| Write::SyncState { doc: Id128([doc; 16]), peer, state: state.to_vec() };
        s.apply(&[w(a, 1, b"a1"), w(b, 1, b"b1"), w(a, 2, b"a2"), w(b, 3, b"b3")]).unwrap();
        assert_eq!(
            s.sync_states(&a).unwrap(),
            vec![(Id128([1; 16]), b"a1".to_vec()), (Id128([2; 16]), b"a2".to_vec())]
        );
        assert_eq!(s.sync_states(&b).unwrap().len(), 2);
        assert!(s.sync_states(&NodeId([3; 32])).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_store_is_refused_and_nothing_is_replaced_or_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let log = dir.path().join("store.chunks");
        {
            let mut s = Store::open(&path).unwrap();
            let data = b"output bytes".to_vec();
            s.apply(&[Write::Chunk { hash: caisey_doc::session::chunk_hash(&data), data }]).unwrap();
        }
        let log_len = std::fs::metadata(&log).unwrap().len();
        assert!(log_len > 0);
        // Emptied.
        std::fs::write(&path, b"").unwrap();
        let e = Store::open(&path).expect_err("refused");
        assert!(e.to_string().contains("is empty") && !e.to_string().contains('\n'), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "not replaced");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), log_len, "the output log is untouched");
        // Garbage.
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::Damaged { .. })));
        // Gone, while the output log remains.
        std::fs::remove_file(&path).unwrap();
        let e = Store::open(&path).expect_err("refused");
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!path.exists(), "no empty store was made in its place");
    }

    #[test]
    fn a_chunk_damaged_on_disk_reads_as_absent_and_is_stored_anew_once_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let mut s = Store::open(&path).unwrap();
        let data = b"Filesystem Size Used Avail\n".to_vec();
        let hash = caisey_doc::session::chunk_hash(&data);
        s.apply(&[Write::Chunk { hash, data: data.clone() }]).unwrap();
        // One flipped byte in the log.
        let log = path.with_extension("chunks");
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[3] ^= 0x20;
        std::fs::write(&log, &bytes).unwrap();
        let stored = s.chunks().unwrap();
        assert_eq!(stored.chunk(&hash), None, "damaged bytes are never handed out");
        assert_eq!(stored.take_damaged(), vec![hash]);
        drop(stored);
        s.apply(&[Write::ForgetChunk { hash }]).unwrap();
        assert!(!s.chunks().unwrap().contains(&hash));
        s.apply(&[Write::Chunk { hash, data: data.clone() }]).unwrap();
        assert_eq!(s.chunks().unwrap().chunk(&hash), Some(data));
    }

    #[test]
    fn the_ledger_keeps_the_first_record_and_takes_over_the_one_kept_among_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (nonce, request) = (Id128([7; 16]), Id128([8; 16]));
        {
            // A store written before the ledger had its own table.
            let mut s = Store::open(&path).unwrap();
            let setting = |key: String, value: &[u8]| Write::Setting { key, value: value.to_vec() };
            s.apply(&[
                setting(format!("consumed/{nonce}"), &5u64.to_be_bytes()),
                setting(format!("request/{request}"), b"denied"),
            ])
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.ledger(&LedgerKey::Approval(nonce)).unwrap().map(|r| r.outcome), Some(Outcome::Used));
        assert_eq!(s.ledger(&LedgerKey::Request(request)).unwrap().map(|r| r.outcome), Some(Outcome::Denied));
        assert_eq!(s.setting(&format!("request/{request}")).unwrap(), None, "moved, not copied");
        // What was done is not undone by a later write.
        let started = LedgerRecord { outcome: Outcome::Started, at: 9 };
        s.apply(&[Write::Ledger { key: LedgerKey::Request(request), record: started }]).unwrap();
        assert_eq!(s.ledger(&LedgerKey::Request(request)).unwrap().map(|r| r.outcome), Some(Outcome::Denied));
        assert_eq!(s.ledger(&LedgerKey::Request(Id128([9; 16]))).unwrap(), None);
    }
}
