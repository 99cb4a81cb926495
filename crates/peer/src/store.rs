//! Durable state in one redb file: documents as an incremental stream of Automerge chunks,
//! output chunks by hash (written once, never rewritten), per-peer sync states, and small
//! settings.
//!
//! A document is stored as `(doc, seq) -> bytes`; loading concatenates the chunks (Automerge
//! loads concatenated saves and change chunks). Appending output costs one small chunk, not a
//! rewrite; the hub decides when a full save replaces the chunks (compaction). Every `apply`
//! is one redb transaction with one fsync, so a batch of outputs from the hub is all-or-nothing.

use std::path::Path;

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{ChunkHash, ChunkSource};
use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};

use crate::wire::DocKind;

const DOC_CHUNKS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("doc_chunks");
const DOC_KINDS: TableDefinition<&[u8], u8> = TableDefinition::new("doc_kinds");
/// Output bytes, by SHA-256: sessions reference them, they are not in the documents.
const OUTPUT_CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("output_chunks");
/// `(peer, doc) -> state`: peer first, so a connecting peer's states are one range read.
const SYNC_STATES: TableDefinition<(&[u8], &[u8]), &[u8]> = TableDefinition::new("peer_sync_states");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
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

/// One durable write, as asked for by the hub.
#[derive(Debug)]
pub enum Write {
    Doc { doc: DocId, kind: DocKind, bytes: Vec<u8>, compact: bool },
    SyncState { doc: DocId, peer: NodeId, state: Vec<u8> },
    Chunk { hash: ChunkHash, data: Vec<u8> },
    Setting { key: String, value: Vec<u8> },
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.display().to_string()),
            other => StoreError::Redb(format!("opening {}: {other}", path.display())),
        })?;
        let tx = db.begin_write()?;
        tx.open_table(DOC_CHUNKS)?;
        tx.open_table(DOC_KINDS)?;
        tx.open_table(OUTPUT_CHUNKS)?;
        tx.open_table(SYNC_STATES)?;
        tx.open_table(SETTINGS)?;
        tx.open_table(PUBLISHED)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Every document, as the concatenation of its stored chunks.
    pub fn load_docs(&self) -> Result<Vec<(DocId, DocKind, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
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

    /// Whether the output chunk `hash` is stored (a failed read counts as "no": it is fetched
    /// again).
    pub fn has_chunk(&self, hash: &ChunkHash) -> bool {
        self.chunks().is_ok_and(|c| c.table.get(hash.as_slice()).is_ok_and(|v| v.is_some()))
    }

    /// A consistent view of the stored output chunks, to read a session's output from.
    pub fn chunks(&self) -> Result<StoredChunks, StoreError> {
        Ok(StoredChunks { table: self.db.begin_read()?.open_table(OUTPUT_CHUNKS)? })
    }

    /// Sync states saved for `peer`.
    pub fn sync_states(&self, peer: &NodeId) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
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
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PUBLISHED)?;
        Ok(t.get(id)?.and_then(|v| {
            let v = v.value();
            let key: [u8; 32] = v.get(..32)?.try_into().ok()?;
            Some((NodeId(key), v[32..].to_vec()))
        }))
    }

    pub fn publish(&self, id: &str, publisher: &NodeId, json: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(PUBLISHED)?;
            let mut value = Vec::with_capacity(32 + json.len());
            value.extend_from_slice(&publisher.0);
            value.extend_from_slice(json);
            t.insert(id, value.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Withdraws a transcript; false if there was none.
    pub fn unpublish(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let existed = tx.open_table(PUBLISHED)?.remove(id)?.is_some();
        tx.commit()?;
        Ok(existed)
    }

    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SETTINGS)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Applies writes in one transaction: durable when this returns.
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut chunks = tx.open_table(DOC_CHUNKS)?;
            let mut kinds = tx.open_table(DOC_KINDS)?;
            let mut states = tx.open_table(SYNC_STATES)?;
            let mut settings = tx.open_table(SETTINGS)?;
            let mut output = tx.open_table(OUTPUT_CHUNKS)?;
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
                    Write::Chunk { hash, data } => {
                        output.insert(hash.as_slice(), data.as_slice())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Output chunks as of one read transaction.
pub struct StoredChunks {
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl ChunkSource for StoredChunks {
    fn chunk(&self, hash: &ChunkHash) -> Option<Vec<u8>> {
        self.table.get(hash.as_slice()).ok().flatten().map(|v| v.value().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_append_compact_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let id = Id128([1; 16]);
        {
            let s = Store::open(&path).unwrap();
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
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        let data = b"Filesystem Size Used\n".to_vec();
        let hash = caisey_doc::session::chunk_hash(&data);
        assert!(!s.has_chunk(&hash));
        s.apply(&[Write::Chunk { hash, data: data.clone() }]).unwrap();
        assert!(s.has_chunk(&hash));
        assert_eq!(s.chunks().unwrap().chunk(&hash), Some(data));
        assert_eq!(s.chunks().unwrap().chunk(&[0; 32]), None);
    }

    #[test]
    fn sync_states_are_read_per_peer() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
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
}
