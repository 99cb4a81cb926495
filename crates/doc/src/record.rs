//! Signed records: the unit of everything written into a document.
//!
//! Automerge gives us merge and history but not authorship, so each value a node writes is a
//! self-contained *envelope*: a kind, the author's node id, an ed25519 signature and a body. A
//! reader verifies the envelope before believing anything in it, whichever peer delivered it.
//!
//! Layout (all of it is the stored bytes; nothing is re-encoded when verifying):
//! `"CR" | version u8 | kind u8 | author [32] | signature [64] | body ...`
//! The signature covers `DOMAIN | version | kind | author | body`, so a signature made for one
//! kind of record can never be replayed as another, nor outside Caisey.

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Serialize, de::DeserializeOwned};

use crate::id::NodeId;

const MAGIC: &[u8; 2] = b"CR";
const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"caisey/record/v1\0";
const HEADER_LEN: usize = 2 + 1 + 1 + 32 + 64;
/// No single record may be larger than this; output is split into chunks well below it.
pub const MAX_RECORD_LEN: usize = 1024 * 1024;

/// What a record says; part of what is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum RecordKind {
    OrgGenesis = 1,
    Membership = 2,
    Presence = 3,
    MachineCard = 4,
    InviteCert = 5,
    SessionInfo = 10,
    Target = 11,
    Request = 12,
    Decision = 13,
    Start = 14,
    Output = 15,
    End = 16,
    SessionMeta = 17,
    SessionNote = 18,
    GroupRun = 19,
    Schedule = 20,
    ScheduleConsent = 21,
    ScheduleCancel = 22,
    ScheduleRevoked = 23,
    ScheduledRun = 24,
    Artifact = 25,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<Self> {
        use RecordKind::*;
        Some(match b {
            1 => OrgGenesis,
            2 => Membership,
            3 => Presence,
            4 => MachineCard,
            5 => InviteCert,
            10 => SessionInfo,
            11 => Target,
            12 => Request,
            13 => Decision,
            14 => Start,
            15 => Output,
            16 => End,
            17 => SessionMeta,
            18 => SessionNote,
            19 => GroupRun,
            20 => Schedule,
            21 => ScheduleConsent,
            22 => ScheduleCancel,
            23 => ScheduleRevoked,
            24 => ScheduledRun,
            25 => Artifact,
            _ => return None,
        })
    }
}

/// Why bytes are not a genuine record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record is {0} bytes, more than the {MAX_RECORD_LEN} allowed")]
    TooLarge(usize),
    #[error("record is truncated")]
    Truncated,
    #[error("not a caisey record (bad magic or version)")]
    NotARecord,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} record, found {found:?}")]
    WrongKind { expected: RecordKind, found: RecordKind },
    #[error("author is not a valid ed25519 key")]
    BadAuthorKey,
    #[error("signature does not match the record")]
    BadSignature,
    #[error("record body is malformed: {0}")]
    Body(String),
}

/// A node's signing key. The same 32 secret bytes are the node's iroh identity.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.node_id().short())
    }
}

impl Signer {
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(&secret) }
    }
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }
    pub fn node_id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    /// Signs `body` as a record of `kind`, returning the stored bytes.
    pub fn sign_raw(&self, kind: RecordKind, body: &[u8]) -> Vec<u8> {
        let author = self.node_id();
        let sig = self.key.sign(&signed_message(kind as u8, &author, body));
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(kind as u8);
        out.extend_from_slice(&author.0);
        out.extend_from_slice(&sig.to_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Signs a JSON body.
    pub fn sign<T: Serialize>(&self, kind: RecordKind, body: &T) -> Vec<u8> {
        // Serializing plain structs of strings and numbers cannot fail.
        let json = serde_json::to_vec(body).unwrap_or_default();
        self.sign_raw(kind, &json)
    }
}

impl Signer {
    /// A signature over `domain | message`, for artifacts that are not records (transcripts).
    pub fn sign_detached(&self, domain: &[u8], message: &[u8]) -> [u8; 64] {
        let mut m = Vec::with_capacity(domain.len() + message.len());
        m.extend_from_slice(domain);
        m.extend_from_slice(message);
        self.key.sign(&m).to_bytes()
    }
}

/// Checks a signature made by [`Signer::sign_detached`].
pub fn verify_detached(author: &NodeId, domain: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(&author.0) else { return false };
    let mut m = Vec::with_capacity(domain.len() + message.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(message);
    key.verify(&m, &Signature::from_bytes(signature)).is_ok()
}

fn signed_message(kind: u8, author: &NodeId, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(DOMAIN.len() + 2 + 32 + body.len());
    msg.extend_from_slice(DOMAIN);
    msg.push(VERSION);
    msg.push(kind);
    msg.extend_from_slice(&author.0);
    msg.extend_from_slice(body);
    msg
}

/// A record whose signature has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<'a> {
    pub kind: RecordKind,
    pub author: NodeId,
    pub body: &'a [u8],
}

impl Verified<'_> {
    /// Parses the body as JSON of the expected type.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, RecordError> {
        serde_json::from_slice(self.body).map_err(|e| RecordError::Body(e.to_string()))
    }
}

/// Checks a record's framing and signature. Says nothing yet about whether the author was
/// *allowed* to write it: that depends on the document it sits in.
pub fn verify(bytes: &[u8]) -> Result<Verified<'_>, RecordError> {
    let (verified, sig) = parse(bytes)?;
    if !checked::contains(bytes) {
        check_signature(&verified, &sig)?;
        checked::insert(bytes);
    }
    Ok(verified)
}

/// A record's framing: its parts and signature, not yet checked.
fn parse(bytes: &[u8]) -> Result<(Verified<'_>, [u8; 64]), RecordError> {
    if bytes.len() > MAX_RECORD_LEN {
        return Err(RecordError::TooLarge(bytes.len()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    if &bytes[..2] != MAGIC || bytes[2] != VERSION {
        return Err(RecordError::NotARecord);
    }
    let kind = RecordKind::from_u8(bytes[3]).ok_or(RecordError::UnknownKind(bytes[3]))?;
    let mut author = [0u8; 32];
    author.copy_from_slice(&bytes[4..36]);
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&bytes[36..100]);
    Ok((Verified { kind, author: NodeId(author), body: &bytes[HEADER_LEN..] }, sig))
}

fn check_signature(record: &Verified<'_>, sig: &[u8; 64]) -> Result<(), RecordError> {
    let key = checked::key(&record.author.0).ok_or(RecordError::BadAuthorKey)?;
    key.verify(&signed_message(record.kind as u8, &record.author, record.body), &Signature::from_bytes(sig))
        .map_err(|_| RecordError::BadSignature)
}

/// Whether `bytes` is a well-framed record with a good signature, without the cache (for
/// threads that check on another thread's behalf).
fn signature_holds(bytes: &[u8]) -> bool {
    parse(bytes).is_ok_and(|(record, sig)| check_signature(&record, &sig).is_ok())
}

/// Below this many unchecked records, starting threads costs more than it saves (callers
/// with fewer records need not gather them).
pub const PARALLEL_MIN: usize = 64;

/// Checks the signatures of many records at once on every core, and remembers the good ones on
/// this thread, so that the [`verify`] calls which follow find them already checked. Without it
/// a document arriving whole (a technician catching up on ten thousand commands, a node opening
/// a big session) is checked on one core. Bad records are left for `verify` to report.
pub fn check_many(records: &[&[u8]]) {
    if records.len() < PARALLEL_MIN {
        return;
    }
    let unchecked: Vec<&[u8]> =
        records.iter().copied().filter(|r| r.len() <= checked::LARGEST && !checked::contains(r)).collect();
    // Asked once: std reads cgroup files to answer, and reads happen on every change.
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
    if unchecked.len() < PARALLEL_MIN || threads < 2 {
        return;
    }
    let good: Vec<&[u8]> = std::thread::scope(|scope| {
        let parts: Vec<_> = unchecked
            .chunks(unchecked.len().div_ceil(threads))
            .map(|part| scope.spawn(move || part.iter().copied().filter(|r| signature_holds(r)).collect::<Vec<_>>()))
            .collect();
        // A part whose thread failed is simply not remembered: `verify` checks it later.
        parts.into_iter().flat_map(|p| p.join().unwrap_or_default()).collect()
    });
    for record in good {
        checked::insert(record);
    }
}

/// Records whose signature has already been checked, by their exact bytes. Documents are read
/// again on every change, and most of their records never change; a signature check costs
/// ~40 µs here (the open row: ~170 ms for ~4,000 records), a lookup well under one. The key is the whole record (compared byte for byte), so a
/// record differing anywhere is checked afresh.
///
/// Per thread: a node's documents are all read on its core thread, so this is in effect one
/// cache per node (nodes in one process, as in tests and benchmarks, never vouch for each
/// other). Bounded by two generations of `LIMIT` bytes: when the newer fills up, the older is
/// dropped, and a record found in the older moves to the newer, so what is read often stays.
mod checked {
    use std::cell::RefCell;
    use std::collections::{HashMap, HashSet};

    use ed25519_dalek::VerifyingKey;

    const LIMIT: usize = 16 * 1024 * 1024;
    /// Larger records (rare: machine cards) are not worth keeping.
    pub(super) const LARGEST: usize = 4096;
    /// Authors whose key is kept decompressed (an org has a handful to thousands).
    const KEYS: usize = 4096;

    #[derive(Default)]
    struct Generations {
        newer: HashSet<Box<[u8]>>,
        newer_bytes: usize,
        older: HashSet<Box<[u8]>>,
    }

    impl Generations {
        fn insert(&mut self, bytes: &[u8]) {
            if self.newer_bytes + bytes.len() > LIMIT {
                self.older = std::mem::take(&mut self.newer);
                self.newer_bytes = 0;
            }
            if self.newer.insert(bytes.into()) {
                self.newer_bytes += bytes.len();
            }
        }
    }

    thread_local! {
        static CHECKED: RefCell<Generations> = RefCell::new(Generations::default());
        static AUTHORS: RefCell<HashMap<[u8; 32], VerifyingKey>> = RefCell::new(HashMap::new());
    }

    pub(super) fn contains(bytes: &[u8]) -> bool {
        CHECKED.with_borrow_mut(|g| {
            if g.newer.contains(bytes) {
                return true;
            }
            let found = g.older.contains(bytes);
            if found {
                g.insert(bytes);
            }
            found
        })
    }

    pub(super) fn insert(bytes: &[u8]) {
        if bytes.len() <= LARGEST {
            CHECKED.with_borrow_mut(|g| g.insert(bytes));
        }
    }

    /// The author's key, decompressed once (keeping keys took the open row's load from 196 to
    /// about 170 ms: decompressing is a sixth or so of a check).
    pub(super) fn key(author: &[u8; 32]) -> Option<VerifyingKey> {
        AUTHORS.with_borrow_mut(|keys| {
            if let Some(k) = keys.get(author) {
                return Some(*k);
            }
            let k = VerifyingKey::from_bytes(author).ok()?;
            if keys.len() >= KEYS {
                keys.clear();
            }
            keys.insert(*author, k);
            Some(k)
        })
    }
}

/// The body of a record of `kind`, *without* checking its signature: for routing only (a peer
/// deciding which output bytes to fetch), never for believing or showing anything.
pub fn unverified_body(bytes: &[u8], kind: RecordKind) -> Option<&[u8]> {
    (bytes.len() >= HEADER_LEN && &bytes[..2] == MAGIC && bytes[2] == VERSION && bytes[3] == kind as u8)
        .then(|| &bytes[HEADER_LEN..])
}

/// Verifies a record and checks it is of the expected kind.
pub fn verify_kind(bytes: &[u8], expected: RecordKind) -> Result<Verified<'_>, RecordError> {
    let v = verify(bytes)?;
    if v.kind != expected {
        return Err(RecordError::WrongKind { expected, found: v.kind });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer(seed: u8) -> Signer {
        Signer::from_secret([seed; 32])
    }

    #[test]
    fn a_signed_record_verifies_and_names_its_author() {
        let s = signer(1);
        let rec = s.sign_raw(RecordKind::Output, b"hello");
        let v = verify(&rec).unwrap();
        assert_eq!(v.author, s.node_id());
        assert_eq!(v.body, b"hello");
        assert_eq!(v.kind, RecordKind::Output);
    }

    #[test]
    fn checking_many_at_once_remembers_the_good_records_and_leaves_the_bad_to_verify() {
        let s = signer(2);
        let mut records: Vec<Vec<u8>> =
            (0..200u32).map(|i| s.sign_raw(RecordKind::Request, format!("request {i}").as_bytes())).collect();
        let last = records[77].len() - 1;
        records[77][last] ^= 1;
        records.push(b"not a record".to_vec());
        check_many(&records.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for (i, r) in records.iter().enumerate() {
            match i {
                77 => {
                    assert!(!checked::contains(r), "a forged record was remembered as checked");
                    assert_eq!(verify(r).map(|_| ()), Err(RecordError::BadSignature));
                }
                200 => assert_eq!(verify(r).map(|_| ()), Err(RecordError::Truncated)),
                _ => {
                    assert!(checked::contains(r), "record {i} was checked but not remembered on this thread");
                    assert!(verify(r).is_ok());
                }
            }
        }
    }

    #[test]
    fn a_record_checked_before_is_still_refused_when_any_byte_differs() {
        let rec = signer(1).sign_raw(RecordKind::Decision, b"{\"verdict\":\"denied\"}");
        assert!(verify(&rec).is_ok());
        assert!(verify(&rec).is_ok(), "second read (from the cache) differs");
        let mut forged = rec.clone();
        let last = forged.len() - 3;
        forged[last] = b'X';
        assert_eq!(verify(&forged), Err(RecordError::BadSignature));
    }

    #[test]
    fn a_record_cannot_be_replayed_as_another_kind() {
        let rec = signer(1).sign_raw(RecordKind::Decision, b"{}");
        let mut relabelled = rec.clone();
        relabelled[3] = RecordKind::Request as u8;
        assert_eq!(verify(&relabelled), Err(RecordError::BadSignature));
        assert!(matches!(verify_kind(&rec, RecordKind::Request), Err(RecordError::WrongKind { .. })));
    }

    proptest! {
        #[test]
        fn flipping_any_bit_of_a_record_is_detected(
            body in proptest::collection::vec(any::<u8>(), 0..200),
            pos in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let rec = signer(3).sign_raw(RecordKind::Output, &body);
            let mut tampered = rec.clone();
            let i = pos.index(tampered.len());
            tampered[i] ^= 1 << bit;
            prop_assert!(verify(&tampered).is_err());
        }
    }
}
