//! The session document: one per investigation, holding every command asked, every decision,
//! and every byte of output, as signed records.
//!
//! Layout: `ROOT.info` (bytes), `ROOT["meta:<technician>"]` (each technician's latest rename or
//! relabel; the newest across technicians wins), and maps keyed by node or request id:
//! `targets[node]`, `requests[req]`, `decisions[req]`, `starts[req]`, `ends[req]`, and
//! `outputs[req]` — a list of signed output *references* (sequence, stream, length and SHA-256
//! of a chunk). Only the session's creator makes the top-level maps (concurrently created maps
//! would hide each other's contents); only the target agent creates and appends to a request's
//! output list.
//!
//! The output bytes themselves are not in the document. Automerge would re-encode, re-hash and
//! re-save them at every hop and every compaction; instead each node keeps them once, by content
//! hash, in its store, and peers fetch the chunks a reference names (see `caisey_peer::hub`). So
//! a session with 100 MiB of output is a document of a few hundred KiB, opened in milliseconds,
//! and its output is read only when someone looks at it ([`ChunkSource`]). A reference makes the
//! bytes as trustworthy as the record: its signature covers the hash.
//!
//! `SessionView::read` verifies every record and who wrote it. Anything that fails is kept in
//! `quarantined` with the reason, never shown as genuine and never acted upon.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::am;
use crate::fleet::{Fleet, Role};
use crate::id::{Id128, NodeId};
use crate::record::{RecordError, RecordKind, Signer, verify, verify_kind};
use crate::text::PeerText;

/// Largest output chunk a runner writes; bigger writes are split.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// A session's name and labels, signed by the technician who opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: Id128,
    pub name: PeerText,
    pub labels: Vec<PeerText>,
    pub created_at: u64,
    pub org_key: NodeId,
}

/// A technician's rename, relabel or assignment of a session. Each technician has one slot (so
/// two renaming at once never hide each other's record); readers take the newest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub session: Id128,
    pub name: PeerText,
    pub labels: Vec<PeerText>,
    pub at: u64,
    /// The technician who has the session now (a hand-off names the colleague).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<NodeId>,
}

const META_PREFIX: &str = "meta:";

/// A technician's note on a session, for whoever picks it up next ("disk cleanup did not fix
/// it; chkdsk pending"). Signed and timestamped by its author; never edited, only added, each
/// under a key of its own so that notes written at once all stay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionNote {
    pub session: Id128,
    pub id: Id128,
    pub text: PeerText,
    pub at: u64,
}

/// Marks a session as one machine's part of a group run: one command asked of several machines
/// at once, which technicians hold as one investigation. Every session of the run carries the
/// same run id; written once, by the technician who asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRun {
    pub session: Id128,
    pub run: Id128,
    /// The run's name, as the technician gave it (or as generated: "group accounting …").
    pub name: PeerText,
}

const GROUP_RUN_KEY: &str = "group_run";

/// The longest note, in bytes.
pub const MAX_NOTE: usize = 16 * 1024;

const NOTE_PREFIX: &str = "note:";

/// A note as read: its verified author and the note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteView {
    pub author: NodeId,
    pub note: SessionNote,
}

/// Adds an agent to a session, so the session syncs to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub session: Id128,
    pub node: NodeId,
    pub at: u64,
}

/// Which shell interprets the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shell {
    Sh,
    Bash,
    Pwsh,
    Cmd,
}

impl std::fmt::Display for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shell::Sh => "sh",
            Shell::Bash => "bash",
            Shell::Pwsh => "pwsh",
            Shell::Cmd => "cmd",
        })
    }
}

impl std::str::FromStr for Shell {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sh" => Ok(Shell::Sh),
            "bash" => Ok(Shell::Bash),
            "pwsh" | "powershell" => Ok(Shell::Pwsh),
            "cmd" => Ok(Shell::Cmd),
            other => Err(format!("unknown shell {other:?}: use sh, bash, pwsh or cmd")),
        }
    }
}

/// Exactly what is to run. The approval names its hash, so changing any byte means asking again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub shell: Shell,
    pub script: String,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: u64,
    /// Files to bring back after it ends (`crate::artifact`), approved with the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect: Option<crate::artifact::Collect>,
}

impl CommandSpec {
    /// SHA-256 over a length-prefixed encoding of every field (unambiguous, no JSON involved).
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(b"caisey/command/v1");
        field(self.shell.to_string().as_bytes());
        field(self.script.as_bytes());
        field(self.cwd.as_deref().unwrap_or("").as_bytes());
        field(&[u8::from(self.cwd.is_some())]);
        field(&(self.env.len() as u64).to_be_bytes());
        for (k, v) in &self.env {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        field(&self.timeout_ms.to_be_bytes());
        // (Absent from commands that collect nothing, so their hash is as it always was.)
        if let Some(c) = &self.collect {
            field(b"collect");
            field(&(c.paths.len() as u64).to_be_bytes());
            for p in &c.paths {
                field(p.as_bytes());
            }
            field(&c.limit.to_be_bytes());
        }
        h.finalize().into()
    }
}

/// A technician asks one agent to run one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRequest {
    pub id: Id128,
    pub session: Id128,
    pub target: NodeId,
    pub command: CommandSpec,
    pub description: PeerText,
    pub requested_at: u64,
    /// After this, the agent stops waiting for a decision and records the request as expired.
    pub expires_at: u64,
}

/// The largest script a request may carry. Every request is a signed record (at most
/// `record::MAX_RECORD_LEN`) that the endpoint user reads whole before approving it; a bigger
/// tool belongs on the machine, run by a short command.
pub const MAX_SCRIPT: usize = 256 * 1024;
/// The largest description (the "why" the endpoint user reads).
pub const MAX_DESCRIPTION: usize = 16 * 1024;

/// How many characters of an approval code listings show — and so the fewest a user must type.
/// A shorter prefix could match a request that arrived after the listing, which the user never
/// saw: "approve 5" must not approve whatever happens to start with a 5.
pub const APPROVAL_CODE_SHOWN: usize = 8;

/// A typed approval code, normalized: at least [`APPROVAL_CODE_SHOWN`] hex characters.
pub fn typed_approval_code(typed: &str, listing: &str) -> Result<String, String> {
    let code = typed.trim().to_ascii_lowercase();
    if code.len() < APPROVAL_CODE_SHOWN || !code.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "give the whole {APPROVAL_CODE_SHOWN}-character code that `{listing}` shows; \
             a shorter one could match a request you have not seen"
        ));
    }
    Ok(code)
}

impl CommandRequest {
    /// The code the endpoint user approves by: it names this request *and* this exact command,
    /// so if the command changed after it was shown, the code the user typed no longer matches.
    pub fn approval_code(&self) -> Id128 {
        let mut h = Sha256::new();
        h.update(b"caisey/approval-code/v1");
        h.update(self.id.0);
        h.update(self.command.hash());
        let digest: [u8; 32] = h.finalize().into();
        let mut code = [0u8; 16];
        code.copy_from_slice(&digest[..16]);
        Id128(code)
    }
}

/// What became of a request before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approved,
    Denied,
    Expired,
}

/// The endpoint user's (or an approver's) decision on one exact command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub request: Id128,
    pub session: Id128,
    pub target: NodeId,
    pub requester: NodeId,
    #[serde(with = "hex32")]
    pub command_hash: [u8; 32],
    pub verdict: Verdict,
    /// Who decided, in words ("local user on ws-01").
    pub decided_by: String,
    pub decided_at: u64,
    /// An approval is void after this (a remote approval not used in time must be asked again).
    pub expires_at: u64,
    /// Makes every approval unique; the agent records the nonces it consumed.
    pub nonce: Id128,
}

/// The agent began running an approved command. Written in the same change as the approval is
/// consumed; a start without an end after an agent restart means "interrupted".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    pub request: Id128,
    pub session: Id128,
    pub started_at: u64,
    /// The approval consumed: its author and nonce.
    pub approved_by: NodeId,
    pub nonce: Id128,
}

/// Which pipe a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of output, with its bytes (as the runner produced them or as read back from a
/// [`ChunkSource`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    pub request: Id128,
    pub seq: u64,
    pub stream: Stream,
    pub data: Vec<u8>,
}

impl OutputChunk {
    /// What the session document records about this chunk.
    pub fn reference(&self) -> OutputRef {
        OutputRef {
            request: self.request,
            seq: self.seq,
            stream: self.stream,
            len: self.data.len() as u64,
            hash: chunk_hash(&self.data),
        }
    }
}

/// The SHA-256 of a chunk's bytes: its name in every store and on the wire.
pub type ChunkHash = [u8; 32];

pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    Sha256::digest(data).into()
}

/// Where a node keeps output bytes, by hash. `None` means "not here (yet)": a peer has the
/// reference but the bytes are still on their way.
pub trait ChunkSource {
    fn chunk(&self, hash: &ChunkHash) -> Option<Vec<u8>>;
}

impl ChunkSource for BTreeMap<ChunkHash, Vec<u8>> {
    fn chunk(&self, hash: &ChunkHash) -> Option<Vec<u8>> {
        self.get(hash).cloned()
    }
}

/// The signed record of one output chunk, as stored in `outputs[req]`.
/// Binary body: `request [16] | seq u64 BE | stream u8 | len u64 BE | sha256 [32]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRef {
    pub request: Id128,
    pub seq: u64,
    pub stream: Stream,
    pub len: u64,
    pub hash: ChunkHash,
}

impl OutputRef {
    const LEN: usize = 16 + 8 + 1 + 8 + 32;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        b.extend_from_slice(&self.request.0);
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.push(match self.stream {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        });
        b.extend_from_slice(&self.len.to_be_bytes());
        b.extend_from_slice(&self.hash);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, RecordError> {
        if b.len() != Self::LEN {
            return Err(RecordError::Body(format!("output reference of {} bytes, expected {}", b.len(), Self::LEN)));
        }
        let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default());
        let stream = match b[24] {
            1 => Stream::Stdout,
            2 => Stream::Stderr,
            n => return Err(RecordError::Body(format!("unknown stream {n}"))),
        };
        let mut request = [0u8; 16];
        request.copy_from_slice(&b[..16]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[33..]);
        Ok(Self { request: Id128(request), seq: u64_at(16), stream, len: u64_at(25), hash })
    }

    /// The chunk this reference names, if `data` is exactly it.
    pub fn resolve(&self, data: Vec<u8>) -> Option<OutputChunk> {
        (data.len() as u64 == self.len && chunk_hash(&data) == self.hash).then_some(OutputChunk {
            request: self.request,
            seq: self.seq,
            stream: self.stream,
            data,
        })
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndStatus {
    Exited,
    TimedOut,
    /// The agent stopped (crash, reboot) while the command ran; it is never re-run.
    Interrupted,
    FailedToStart,
    /// An approval is there but the agent will not use it — it came after the request expired,
    /// or this machine's user had denied the request — and says so (`message`) for good.
    NotRun,
    /// This machine's user stopped it while it ran (by revoking the consent to its schedule).
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct End {
    pub request: Id128,
    pub session: Id128,
    pub status: EndStatus,
    pub exit_code: Option<i32>,
    pub ended_at: u64,
    pub chunks: u64,
    pub message: Option<String>,
    /// The named values the run yielded (`caisey_doc::probe`), signed with its end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<crate::probe::ProbeValue>,
}

pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Writes into a session document. Each call is one Automerge change.
#[derive(Debug)]
pub struct SessionWriter;

impl SessionWriter {
    /// A new session document, with every top-level map made once, by its creator.
    pub fn create(signer: &Signer, info: &SessionInfo) -> Result<Automerge, automerge::AutomergeError> {
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "info", signer.sign(RecordKind::SessionInfo, info))?;
            for key in ["targets", "requests", "decisions", "starts", "outputs", "ends"] {
                tx.put_object(ROOT, key, ObjType::Map)?;
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(doc)
    }

    /// Adds a target agent (if not already there) and a request for it.
    pub fn request(
        doc: &mut Automerge,
        signer: &Signer,
        req: &CommandRequest,
    ) -> Result<(), automerge::AutomergeError> {
        let target = Target { session: req.session, node: req.target, at: req.requested_at };
        let target_rec = signer.sign(RecordKind::Target, &target);
        let req_rec = signer.sign(RecordKind::Request, req);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            let targets = am::ensure_root_map(tx, "targets")?;
            if am::bytes_at(tx, &targets, &req.target.to_hex()).is_none() {
                tx.put(&targets, req.target.to_hex(), target_rec)?;
            }
            let requests = am::ensure_root_map(tx, "requests")?;
            tx.put(&requests, req.id.to_hex(), req_rec)?;
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    /// Records a decision. The caller has checked (with [`SessionView`]) that no valid decision
    /// exists yet; an invalid one in the way (a forgery) is simply replaced.
    pub fn decide(doc: &mut Automerge, signer: &Signer, decision: &Decision) -> Result<(), automerge::AutomergeError> {
        let rec = signer.sign(RecordKind::Decision, decision);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            let decisions = am::ensure_root_map(tx, "decisions")?;
            tx.put(&decisions, decision.request.to_hex(), rec)?;
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    /// The agent consumes an approval: records the start and creates the output list, in one
    /// change. With `decision`, the local user's approval is written in that same change.
    pub fn start(
        doc: &mut Automerge,
        signer: &Signer,
        decision: Option<&Decision>,
        start: &Start,
    ) -> Result<(), automerge::AutomergeError> {
        let key = start.request.to_hex();
        let decision_rec = decision.map(|d| signer.sign(RecordKind::Decision, d));
        let start_rec = signer.sign(RecordKind::Start, start);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            if let Some(rec) = decision_rec {
                let decisions = am::ensure_root_map(tx, "decisions")?;
                tx.put(&decisions, &key, rec)?;
            }
            Self::put_start(tx, start.request, start_rec)
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    /// A signed start of `request`, and its empty output list.
    pub(crate) fn put_start(
        tx: &mut impl Transactable,
        request: Id128,
        start_rec: Vec<u8>,
    ) -> Result<(), automerge::AutomergeError> {
        let key = request.to_hex();
        let starts = am::ensure_root_map(tx, "starts")?;
        tx.put(&starts, &key, start_rec)?;
        let outputs = am::ensure_root_map(tx, "outputs")?;
        tx.put_object(&outputs, &key, ObjType::List)?;
        Ok(())
    }

    /// Appends references to output chunks (already cut to `MAX_CHUNK`) to a request's output
    /// list. The bytes go to the node's chunk store, in the same durable write.
    pub fn append_output(
        doc: &mut Automerge,
        signer: &Signer,
        refs: &[OutputRef],
    ) -> Result<(), automerge::AutomergeError> {
        if refs.is_empty() {
            return Ok(());
        }
        let records = Self::sign_refs(signer, refs);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| Self::put_refs(tx, refs, records)).map_err(|f| f.error)?;
        Ok(())
    }

    fn sign_refs(signer: &Signer, refs: &[OutputRef]) -> Vec<Vec<u8>> {
        refs.iter().map(|r| signer.sign_raw(RecordKind::Output, &r.encode())).collect()
    }

    /// Appends signed references, all of one request's output (`refs`), to its output list.
    fn put_refs(
        tx: &mut impl Transactable,
        refs: &[OutputRef],
        records: Vec<Vec<u8>>,
    ) -> Result<(), automerge::AutomergeError> {
        let Some(first) = refs.first() else { return Ok(()) };
        let key = first.request.to_hex();
        let outputs = am::ensure_root_map(tx, "outputs")?;
        let list = match am::child(tx, &outputs, &key, ObjType::List) {
            Some(list) => list,
            None => tx.put_object(&outputs, &key, ObjType::List)?,
        };
        let start = tx.length(&list);
        for (at, r) in (start..).zip(records) {
            tx.insert(&list, at, r)?;
        }
        Ok(())
    }

    /// Renames and relabels the session (the signer's slot; the newest across technicians wins).
    pub fn rename(doc: &mut Automerge, signer: &Signer, meta: &SessionMeta) -> Result<(), automerge::AutomergeError> {
        let rec = signer.sign(RecordKind::SessionMeta, meta);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, format!("{META_PREFIX}{}", signer.node_id().to_hex()), rec)?;
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    /// Marks the session as part of a group run.
    pub fn group_run(doc: &mut Automerge, signer: &Signer, run: &GroupRun) -> Result<(), automerge::AutomergeError> {
        let rec = signer.sign(RecordKind::GroupRun, run);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, GROUP_RUN_KEY, rec)?;
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    /// Adds a note by `signer` (a technician).
    pub fn note(doc: &mut Automerge, signer: &Signer, note: &SessionNote) -> Result<(), automerge::AutomergeError> {
        let rec = signer.sign(RecordKind::SessionNote, note);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, format!("{NOTE_PREFIX}{}:{}", signer.node_id().to_hex(), note.id.to_hex()), rec)?;
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    pub fn end(doc: &mut Automerge, signer: &Signer, end: &End) -> Result<(), automerge::AutomergeError> {
        Self::end_with_output(doc, signer, &[], end)
    }

    /// The last output references of a run (all of `end`'s request) and its end, as one change
    /// (a quick command's whole result then travels in one sync round).
    pub fn end_with_output(
        doc: &mut Automerge,
        signer: &Signer,
        refs: &[OutputRef],
        end: &End,
    ) -> Result<(), automerge::AutomergeError> {
        let records = Self::sign_refs(signer, refs);
        let rec = signer.sign(RecordKind::End, end);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            Self::put_refs(tx, refs, records)?;
            let ends = am::ensure_root_map(tx, "ends")?;
            tx.put(&ends, end.request.to_hex(), rec)?;
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }
}

/// A record that failed verification or was written by someone not allowed to write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub place: String,
    pub author: Option<NodeId>,
    pub why: String,
}

/// One command and everything that happened to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandView {
    pub request: CommandRequest,
    pub requester: NodeId,
    pub decision: Option<Decision>,
    pub decided_by_node: Option<NodeId>,
    pub start: Option<Start>,
    pub end: Option<End>,
    /// Verified chunks in sequence order, up to the first whose bytes are not here yet.
    pub output: Vec<OutputChunk>,
    /// Bytes of output referenced but not readable yet (still on their way from a peer).
    pub output_pending: u64,
    /// The schedule this is a run of (its request is made from the schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Id128>,
    /// A scheduled run that started after its time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

impl CommandView {
    /// A one-word state for listings.
    pub fn status(&self) -> &'static str {
        match (&self.decision, &self.end) {
            (_, Some(e)) => match e.status {
                EndStatus::Exited => "exited",
                EndStatus::TimedOut => "timed out",
                EndStatus::Interrupted => "interrupted",
                EndStatus::FailedToStart => "failed to start",
                EndStatus::NotRun => "not run",
                EndStatus::Stopped => "stopped by the user",
            },
            (Some(d), None) => match d.verdict {
                Verdict::Approved => "running",
                Verdict::Denied => "denied",
                Verdict::Expired => "expired",
            },
            (None, None) => "waiting for approval",
        }
    }

    /// Finished one way or another: nothing more will happen to it.
    pub fn is_final(&self) -> bool {
        self.end.is_some() || self.decision.as_ref().is_some_and(|d| d.verdict != Verdict::Approved)
    }
}

/// The verified view of a session document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    /// As opened, with the name and labels of the newest rename applied.
    pub info: SessionInfo,
    pub creator: NodeId,
    /// Who gave the session its current name, if it was renamed.
    pub renamed_by: Option<NodeId>,
    /// The technician who has it now, if one was named.
    #[serde(default)]
    pub assignee: Option<NodeId>,
    /// Technicians' notes, oldest first.
    #[serde(default)]
    pub notes: Vec<NoteView>,
    /// The group run this session is one machine's part of, if any.
    #[serde(default)]
    pub group_run: Option<GroupRun>,
    pub targets: Vec<NodeId>,
    /// Recurring checks asked in this session; their runs are among `commands`.
    #[serde(default)]
    pub schedules: Vec<crate::schedule::ScheduleView>,
    /// Files the runs brought back (or refused to), by run.
    #[serde(default)]
    pub artifacts: Vec<crate::artifact::ArtifactView>,
    pub commands: Vec<CommandView>,
    pub quarantined: Vec<Quarantined>,
}

/// Why a session document can't be read at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("session document has no info record")]
    NoInfo,
    #[error("session info record is invalid: {0}")]
    BadInfo(#[source] RecordError),
    #[error("session was not opened by a technician of this org")]
    NotByTechnician,
}

impl SessionView {
    /// Only the info record: cheap, for listings and access decisions.
    pub fn read_info(doc: &impl ReadDoc) -> Result<(SessionInfo, NodeId), SessionError> {
        let bytes = am::bytes_at(doc, &ROOT, "info").ok_or(SessionError::NoInfo)?;
        let v = verify_kind(&bytes, RecordKind::SessionInfo).map_err(SessionError::BadInfo)?;
        Ok((v.json().map_err(SessionError::BadInfo)?, v.author))
    }

    /// The agents this session is shared with, as its technicians recorded them.
    pub fn read_targets(doc: &impl ReadDoc, fleet: &Fleet) -> Vec<NodeId> {
        let mut out = Vec::new();
        // A Target record copied from another session names that session: not believed here.
        let Ok((info, _)) = Self::read_info(doc) else { return out };
        let Some(obj) = am::root_map(doc, "targets") else { return out };
        for (key, bytes) in am::byte_entries(doc, &obj) {
            let Ok(v) = verify_kind(&bytes, RecordKind::Target) else { continue };
            let Ok(t) = v.json::<Target>() else { continue };
            if t.node.to_hex() == key && t.session == info.id && fleet.role_of(&v.author) == Some(Role::Technician) {
                out.push(t.node);
            }
        }
        out
    }

    /// The newest valid rename, by any technician of this org, of this very session.
    fn read_meta(
        doc: &impl ReadDoc,
        fleet: &Fleet,
        info: &SessionInfo,
        q: &mut Vec<Quarantined>,
    ) -> Option<(NodeId, SessionMeta)> {
        let mut newest: Option<(NodeId, SessionMeta)> = None;
        for (key, bytes) in am::byte_entries(doc, &ROOT) {
            let Some(slot) = key.strip_prefix(META_PREFIX) else { continue };
            let checked = verify_kind(&bytes, RecordKind::SessionMeta).map_err(|e| e.to_string()).and_then(|v| {
                let meta: SessionMeta = v.json().map_err(|e| e.to_string())?;
                if fleet.role_of(&v.author) != Some(Role::Technician) {
                    Err("rename not written by a technician".to_string())
                } else if v.author.to_hex() != slot || meta.session != info.id {
                    Err("rename stored in another's slot or for another session".to_string())
                } else {
                    Ok((v.author, meta))
                }
            });
            match checked {
                Ok((author, meta)) => {
                    if newest.as_ref().is_none_or(|(a, m)| (meta.at, author) > (m.at, *a)) {
                        newest = Some((author, meta));
                    }
                }
                Err(why) => q.push(Quarantined { place: key, author: None, why }),
            }
        }
        newest
    }

    /// Every valid note, by a technician of this org, on this very session, oldest first.
    fn read_notes(doc: &impl ReadDoc, fleet: &Fleet, info: &SessionInfo, q: &mut Vec<Quarantined>) -> Vec<NoteView> {
        let mut notes = Vec::new();
        for (key, bytes) in am::byte_entries(doc, &ROOT) {
            let Some(slot) = key.strip_prefix(NOTE_PREFIX) else { continue };
            let checked = verify_kind(&bytes, RecordKind::SessionNote).map_err(|e| e.to_string()).and_then(|v| {
                let note: SessionNote = v.json().map_err(|e| e.to_string())?;
                if fleet.role_of(&v.author) != Some(Role::Technician) {
                    Err("note not written by a technician".to_string())
                } else if slot != format!("{}:{}", v.author.to_hex(), note.id.to_hex()) || note.session != info.id {
                    Err("note stored in another's slot or for another session".to_string())
                } else if note.text.len() > MAX_NOTE {
                    Err(format!("note longer than {MAX_NOTE} bytes"))
                } else {
                    Ok(NoteView { author: v.author, note })
                }
            });
            match checked {
                Ok(n) => notes.push(n),
                Err(why) => q.push(Quarantined { place: key, author: None, why }),
            }
        }
        notes.sort_by_key(|n| (n.note.at, n.author, n.note.id));
        notes
    }

    /// Reads and verifies everything, with the output bytes from `chunks`.
    pub fn read(doc: &impl ReadDoc, fleet: &Fleet, chunks: &dyn ChunkSource) -> Result<SessionView, SessionError> {
        Self::read_with(doc, fleet, Some(chunks))
    }

    /// Reads and verifies everything but the output: what an agent's gate or a listing needs,
    /// at a cost that does not grow with megabytes of output.
    pub fn read_without_output(doc: &impl ReadDoc, fleet: &Fleet) -> Result<SessionView, SessionError> {
        Self::read_with(doc, fleet, None)
    }

    fn read_with(
        doc: &impl ReadDoc,
        fleet: &Fleet,
        chunks: Option<&dyn ChunkSource>,
    ) -> Result<SessionView, SessionError> {
        let (info, creator) = Self::read_info(doc)?;
        if fleet.role_of(&creator) != Some(Role::Technician) {
            return Err(SessionError::NotByTechnician);
        }
        let mut q = Vec::new();
        let renamed = Self::read_meta(doc, fleet, &info, &mut q);
        let notes = Self::read_notes(doc, fleet, &info, &mut q);
        let group_run = am::bytes_at(doc, &ROOT, GROUP_RUN_KEY).and_then(|bytes| {
            let checked = verify_kind(&bytes, RecordKind::GroupRun).map_err(|e| e.to_string()).and_then(|v| {
                let run: GroupRun = v.json().map_err(|e| e.to_string())?;
                if fleet.role_of(&v.author) != Some(Role::Technician) || run.session != info.id {
                    Err("group run not marked by a technician, or for another session".to_string())
                } else {
                    Ok(run)
                }
            });
            checked.map_err(|why| q.push(Quarantined { place: GROUP_RUN_KEY.into(), author: None, why })).ok()
        });
        let mut view = SessionView {
            targets: Self::read_targets(doc, fleet),
            info,
            creator,
            renamed_by: None,
            assignee: None,
            notes,
            group_run,
            schedules: vec![],
            artifacts: vec![],
            commands: vec![],
            quarantined: vec![],
        };
        if let Some((author, meta)) = renamed {
            view.info.name = meta.name;
            view.info.labels = meta.labels;
            view.renamed_by = Some(author);
            // Only a technician of the org can have a session.
            view.assignee = meta.assignee.filter(|a| fleet.role_of(a) == Some(Role::Technician));
        }
        let mut requests: Vec<(String, (NodeId, CommandRequest), Option<RunOf>)> =
            read_map::<CommandRequest>(doc, "requests", RecordKind::Request, &mut q)
                .into_iter()
                .map(|(key, req)| (key, req, None))
                .collect();
        view.schedules = crate::schedule::read_schedules(doc, fleet, &view.info, &view.targets, &mut q);
        for s in &view.schedules {
            for run in &s.runs {
                let request = s.schedule.run_request(run);
                // A run under standing consent is approved by that consent; in "each run" mode
                // it waits for its own decision, like any request.
                let standing = s.valid_consent().filter(|c| !c.each_run).map(|c| Decision {
                    request: run.id,
                    session: view.info.id,
                    target: s.schedule.target,
                    requester: s.author,
                    command_hash: s.schedule.command.hash(),
                    verdict: Verdict::Approved,
                    decided_by: c.decided_by.clone(),
                    decided_at: c.decided_at,
                    expires_at: s.schedule.until,
                    nonce: c.nonce,
                });
                let run_of = RunOf { schedule: s.schedule.id, late: run.late, standing };
                requests.push((run.id.to_hex(), (s.author, request), Some(run_of)));
            }
        }
        let decisions = read_map::<Decision>(doc, "decisions", RecordKind::Decision, &mut q);
        let starts = read_map::<Start>(doc, "starts", RecordKind::Start, &mut q);
        let ends = read_map::<End>(doc, "ends", RecordKind::End, &mut q);
        let outputs = am::root_map(doc, "outputs");
        for (key, (author, req), run_of) in requests {
            let place = format!("requests/{key}");
            if fleet.role_of(&author) != Some(Role::Technician) {
                q.push(Quarantined { place, author: Some(author), why: "request not written by a technician".into() });
                continue;
            }
            if req.id.to_hex() != key || req.session != view.info.id {
                q.push(Quarantined {
                    place,
                    author: Some(author),
                    why: "request stored under the wrong id or session".into(),
                });
                continue;
            }
            // Everything after the request must be written by the agent it targets.
            let by_target = |what: &str, author: NodeId, q: &mut Vec<Quarantined>| {
                let ok = author == req.target;
                if !ok {
                    q.push(Quarantined {
                        place: format!("{what}/{key}"),
                        author: Some(author),
                        why: format!("{what} not written by the target agent"),
                    });
                }
                ok
            };
            let mut cmd = CommandView {
                requester: author,
                request: req.clone(),
                decision: None,
                decided_by_node: None,
                start: None,
                end: None,
                output: vec![],
                output_pending: 0,
                schedule: run_of.as_ref().map(|r| r.schedule),
                late: run_of.as_ref().is_some_and(|r| r.late),
            };
            if let Some(d) = run_of.and_then(|r| r.standing) {
                cmd.decision = Some(d);
                cmd.decided_by_node = Some(req.target);
            } else if let Some((a, d)) = decisions.get(&key) {
                match check_decision(fleet, &view.info, &req, author, *a, d) {
                    Ok(()) => {
                        cmd.decision = Some(d.clone());
                        cmd.decided_by_node = Some(*a);
                    }
                    Err(why) => q.push(Quarantined { place: format!("decisions/{key}"), author: Some(*a), why }),
                }
            }
            if let Some((a, s)) = starts.get(&key) {
                // A start must consume exactly the approval shown above.
                let consumed = cmd.decision.as_ref().is_some_and(|d| {
                    d.verdict == Verdict::Approved && Some(s.approved_by) == cmd.decided_by_node && s.nonce == d.nonce
                });
                if by_target("starts", *a, &mut q) {
                    if s.request == req.id && consumed {
                        cmd.start = Some(s.clone());
                    } else {
                        q.push(Quarantined {
                            place: format!("starts/{key}"),
                            author: Some(*a),
                            why: "start without a matching valid approval".into(),
                        });
                    }
                }
            }
            if let Some((a, e)) = ends.get(&key)
                && by_target("ends", *a, &mut q)
                && e.request == req.id
            {
                cmd.end = Some(e.clone());
            }
            if let (Some(list), Some(chunks)) =
                (outputs.as_ref().and_then(|o| am::child(doc, o, &key, ObjType::List)), chunks)
            {
                let mut refs = Vec::new();
                for (i, bytes) in am::list_bytes(doc, &list, 0).into_iter().enumerate() {
                    match verify_kind(&bytes, RecordKind::Output)
                        .and_then(|v| Ok((v.author, OutputRef::decode(v.body)?)))
                    {
                        Ok((a, r)) if a == req.target && r.request == req.id => refs.push(r),
                        Ok((a, _)) => q.push(Quarantined {
                            place: format!("outputs/{key}/{i}"),
                            author: Some(a),
                            why: "output not written by the target agent".into(),
                        }),
                        Err(e) => q.push(Quarantined {
                            place: format!("outputs/{key}/{i}"),
                            author: None,
                            why: e.to_string(),
                        }),
                    }
                }
                refs.sort_by_key(|r| r.seq);
                for r in refs {
                    match (cmd.output_pending, chunks.chunk(&r.hash).and_then(|d| r.resolve(d))) {
                        (0, Some(chunk)) => cmd.output.push(chunk),
                        // Output is shown in order: after a gap, everything counts as pending.
                        _ => cmd.output_pending += r.len,
                    }
                }
            }
            view.commands.push(cmd);
        }
        view.commands.sort_by_key(|c| (c.request.requested_at, c.request.id));
        let targets: BTreeMap<Id128, NodeId> = view.commands.iter().map(|c| (c.request.id, c.request.target)).collect();
        view.artifacts = crate::artifact::read(doc, view.info.id, |r| targets.get(r).copied(), &mut q);
        view.quarantined = q;
        Ok(view)
    }

    /// Verified output chunks of `request` from list position `from` on, and how far it read:
    /// lets a follower fetch only what is new. It stops before the first chunk whose bytes are
    /// not here yet, so a later call picks up from there, and once it holds `max_bytes` (a
    /// page: output of any size is read in bounded pieces). References failing verification
    /// are skipped here; `read` reports them.
    pub fn read_output_from(
        doc: &impl ReadDoc,
        request: &CommandRequest,
        from: usize,
        max_bytes: usize,
        chunks: &dyn ChunkSource,
    ) -> (Vec<OutputChunk>, usize) {
        let Some(list) =
            am::root_map(doc, "outputs").and_then(|o| am::child(doc, &o, &request.id.to_hex(), ObjType::List))
        else {
            return (vec![], from);
        };
        let mut out = Vec::new();
        let mut next = from;
        let mut held = 0;
        for item in am::list_bytes(doc, &list, from) {
            if held >= max_bytes {
                break;
            }
            let reference = verify_kind(&item, RecordKind::Output)
                .ok()
                .filter(|v| v.author == request.target)
                .and_then(|v| OutputRef::decode(v.body).ok())
                .filter(|r| r.request == request.id);
            if let Some(r) = reference {
                match chunks.chunk(&r.hash).and_then(|d| r.resolve(d)) {
                    Some(chunk) => {
                        held += chunk.data.len();
                        out.push(chunk);
                    }
                    None => break,
                }
            }
            next += 1;
        }
        (out, next)
    }

    /// Each request's output size as its references give it (signed references only; whose
    /// they are is checked when the bytes are read): what a reader of the whole output expects.
    pub fn output_sizes(doc: &impl ReadDoc) -> BTreeMap<Id128, u64> {
        let mut sizes = BTreeMap::new();
        let Some(outputs) = am::root_map(doc, "outputs") else { return sizes };
        for (key, list) in am::child_lists(doc, &outputs) {
            let Ok(request) = key.parse::<Id128>() else { continue };
            let total = am::list_bytes(doc, &list, 0)
                .iter()
                .filter_map(|item| verify_kind(item, RecordKind::Output).ok())
                .filter_map(|v| OutputRef::decode(v.body).ok())
                .filter(|r| r.request == request)
                .map(|r| r.len)
                .sum();
            sizes.insert(request, total);
        }
        sizes
    }

    /// The hashes of output chunks referenced from each request's list position in `cursors`
    /// on, advancing the cursors. Signatures are *not* checked: this only tells a peer which
    /// bytes to fetch (a bogus reference costs a request that nobody answers); readers verify.
    pub fn scan_output_refs(doc: &impl ReadDoc, cursors: &mut BTreeMap<String, usize>) -> Vec<ChunkHash> {
        // Files brought back travel as output does.
        let mut hashes = crate::artifact::scan_pieces(doc, cursors);
        let Some(outputs) = am::root_map(doc, "outputs") else { return hashes };
        for (key, list) in am::child_lists(doc, &outputs) {
            let cursor = cursors.entry(key).or_default();
            if doc.length(&list) <= *cursor {
                continue;
            }
            let items = am::list_bytes(doc, &list, *cursor);
            *cursor += items.len();
            hashes.extend(
                items
                    .iter()
                    .filter_map(|b| crate::record::unverified_body(b, RecordKind::Output))
                    .filter_map(|b| OutputRef::decode(b).ok())
                    .map(|r| r.hash),
            );
        }
        hashes
    }

    /// The stored bytes of the record at `map[key]` (`requests`, `decisions`, `starts`, `ends`).
    pub fn raw_record(doc: &impl ReadDoc, map: &str, key: &Id128) -> Option<Vec<u8>> {
        am::root_map(doc, map).and_then(|m| am::bytes_at(doc, &m, &key.to_hex()))
    }

    /// The stored bytes of a note by `author`.
    pub fn raw_note(doc: &impl ReadDoc, author: &NodeId, id: &Id128) -> Option<Vec<u8>> {
        am::bytes_at(doc, &ROOT, &format!("{NOTE_PREFIX}{}:{}", author.to_hex(), id.to_hex()))
    }

    /// The stored output reference records of a request, in list order.
    pub fn raw_output(doc: &impl ReadDoc, request: &Id128) -> Vec<Vec<u8>> {
        am::root_map(doc, "outputs")
            .and_then(|o| am::child(doc, &o, &request.to_hex(), ObjType::List))
            .map(|list| am::list_bytes(doc, &list, 0))
            .unwrap_or_default()
    }

    pub fn command(&self, id: &Id128) -> Option<&CommandView> {
        self.commands.iter().find(|c| c.request.id == *id)
    }

    /// When anything last happened, for listings.
    pub fn last_activity(&self) -> u64 {
        self.commands
            .iter()
            .flat_map(|c| {
                [
                    Some(c.request.requested_at),
                    c.decision.as_ref().map(|d| d.decided_at),
                    c.end.as_ref().map(|e| e.ended_at),
                ]
            })
            .flatten()
            .max()
            .unwrap_or(self.info.created_at)
    }
}

/// A command that is a run of a schedule.
struct RunOf {
    schedule: Id128,
    late: bool,
    /// The approval its schedule's standing consent gives it.
    standing: Option<Decision>,
}

/// Whether `author` may have written decision `d` on request `req` (written by `requester`).
///
/// A decision is believed only if it names this session, request, machine, requester and the
/// hash of the command as it stands now — so a decision copied to another session, machine or
/// request, or a command edited after it was approved, is refused — and if its author is the
/// target agent (its local user decided) or a designated approver of that machine other than
/// the requester.
pub fn check_decision(
    fleet: &Fleet,
    info: &SessionInfo,
    req: &CommandRequest,
    requester: NodeId,
    author: NodeId,
    d: &Decision,
) -> Result<(), String> {
    if d.request != req.id || d.session != info.id || d.target != req.target || d.requester != requester {
        return Err("decision names another request, session, machine or requester (replayed?)".into());
    }
    if d.command_hash != req.command.hash() {
        return Err("decision is for a different command than the one requested (edited after approval?)".into());
    }
    if author == requester {
        return Err("nobody may approve their own request".into());
    }
    if author != req.target && !fleet.may_approve(&author, &req.target) {
        return Err("decision by someone who may not approve for this machine".into());
    }
    Ok(())
}

/// Verifies every record in `ROOT[map]`, quarantining what fails.
fn read_map<T: serde::de::DeserializeOwned>(
    doc: &impl ReadDoc,
    map: &str,
    kind: RecordKind,
    q: &mut Vec<Quarantined>,
) -> BTreeMap<String, (NodeId, T)> {
    let mut out = BTreeMap::new();
    let Some(obj) = am::root_map(doc, map) else { return out };
    let entries = am::byte_entries(doc, &obj);
    if entries.len() >= crate::record::PARALLEL_MIN {
        crate::record::check_many(&entries.iter().map(|(_, bytes)| bytes.as_slice()).collect::<Vec<_>>());
    }
    for (key, bytes) in entries {
        let place = format!("{map}/{key}");
        match verify(&bytes).and_then(|v| {
            if v.kind != kind {
                return Err(RecordError::WrongKind { expected: kind, found: v.kind });
            }
            Ok((v.author, v.json::<T>()?))
        }) {
            Ok(parsed) => {
                out.insert(key, parsed);
            }
            Err(e) => q.push(Quarantined { place, author: None, why: e.to_string() }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Membership;
    use proptest::prelude::*;

    fn signer(seed: u8) -> Signer {
        Signer::from_secret([seed; 32])
    }

    /// A fleet with technician 2 and agents 3 and 4, and a session with one request per agent.
    fn base() -> (Fleet, Automerge, Vec<CommandRequest>) {
        let org = signer(1);
        let mut fleet_doc = Fleet::create("Acme", &org, &signer(2), "alice", Id128([0; 16]), 0).unwrap();
        for (seed, name) in [(3, "ws-01"), (4, "ws-02")] {
            let m = Membership {
                approves: vec![],
                node: signer(seed).node_id(),
                role: Role::Agent,
                name: name.into(),
                groups: vec![],
                at: 0,
                invite: None,
            };
            Fleet::put_member(&mut fleet_doc, &org.sign(RecordKind::Membership, &m), &m.node).unwrap();
        }
        let fleet = Fleet::read(&fleet_doc).unwrap();
        let info =
            SessionInfo { id: Id128([1; 16]), name: "s".into(), labels: vec![], created_at: 0, org_key: org.node_id() };
        let mut doc = SessionWriter::create(&signer(2), &info).unwrap();
        let mut reqs = Vec::new();
        for (i, seed) in [3u8, 4].into_iter().enumerate() {
            let command = CommandSpec {
                shell: Shell::Sh,
                script: format!("job {i}"),
                cwd: None,
                env: Default::default(),
                timeout_ms: 1000,
                collect: None,
            };
            let r = CommandRequest {
                id: Id128([10 + i as u8; 16]),
                session: info.id,
                target: signer(seed).node_id(),
                command,
                description: Default::default(),
                requested_at: i as u64,
                expires_at: 1_000,
            };
            SessionWriter::request(&mut doc, &signer(2), &r).unwrap();
            reqs.push(r);
        }
        (fleet, doc, reqs)
    }

    fn line(seq: u64) -> Vec<u8> {
        format!("line {seq}\n").into_bytes()
    }

    /// The bytes of every chunk `agent_changes` writes.
    fn all_chunks(runs: &[(&CommandRequest, u64)]) -> BTreeMap<ChunkHash, Vec<u8>> {
        runs.iter().flat_map(|(_, n)| (0..*n).map(|seq| (chunk_hash(&line(seq)), line(seq)))).collect()
    }

    /// Each agent decides, starts, streams `n` chunks and ends, on its own fork.
    fn agent_changes(base: &Automerge, req: &CommandRequest, seed: u8, n: u64) -> Vec<automerge::Change> {
        let agent = signer(seed);
        let mut doc = base.fork();
        let d = Decision {
            request: req.id,
            session: req.session,
            target: req.target,
            requester: signer(2).node_id(),
            command_hash: req.command.hash(),
            verdict: Verdict::Approved,
            decided_by: "local user".into(),
            decided_at: 1,
            expires_at: 1,
            nonce: Id128([seed; 16]),
        };
        let start =
            Start { request: req.id, session: req.session, started_at: 1, approved_by: req.target, nonce: d.nonce };
        SessionWriter::start(&mut doc, &agent, Some(&d), &start).unwrap();
        for seq in 0..n {
            let c = OutputChunk { request: req.id, seq, stream: Stream::Stdout, data: line(seq) };
            SessionWriter::append_output(&mut doc, &agent, &[c.reference()]).unwrap();
        }
        let end = End {
            probes: Vec::new(),
            request: req.id,
            session: req.session,
            status: EndStatus::Exited,
            exit_code: Some(0),
            ended_at: 2,
            chunks: n,
            message: None,
        };
        SessionWriter::end(&mut doc, &agent, &end).unwrap();
        doc.get_changes(&base.get_heads())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Two agents write concurrently; their changes arrive at a peer in any order (and any
        /// split into batches): every peer ends with the same document and the same verified view.
        #[test]
        fn merging_valid_documents_in_any_order_converges(
            n1 in 0u64..6,
            n2 in 0u64..6,
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..40),
        ) {
            let (fleet, doc, reqs) = base();
            let mut changes = agent_changes(&doc, &reqs[0], 3, n1);
            changes.extend(agent_changes(&doc, &reqs[1], 4, n2));
            let mut shuffled = changes.clone();
            for (i, idx) in order.iter().enumerate() {
                let j = idx.index(shuffled.len().max(1));
                let len = shuffled.len();
                if len > 0 {
                    shuffled.swap(i % len, j);
                }
            }
            let mut a = doc.fork();
            a.apply_changes(changes).unwrap();
            let mut b = doc.fork();
            for c in shuffled {
                b.apply_changes([c]).unwrap();
            }
            prop_assert_eq!(a.get_heads(), b.get_heads());
            let all = all_chunks(&[(&reqs[0], n1), (&reqs[1], n2)]);
            let (va, vb) = (SessionView::read(&a, &fleet, &all).unwrap(), SessionView::read(&b, &fleet, &all).unwrap());
            prop_assert!(va.quarantined.is_empty());
            prop_assert_eq!(serde_json::to_string(&va).unwrap(), serde_json::to_string(&vb).unwrap());
            prop_assert_eq!(va.commands[0].output.len() as u64, n1);
            prop_assert_eq!(va.commands[1].output.len() as u64, n2);
            prop_assert!(va.commands.iter().all(|c| c.status() == "exited"));
        }
    }

    #[test]
    fn the_newest_rename_by_a_technician_wins_and_an_agents_is_quarantined() {
        let (fleet, mut doc, _) = base();
        let meta = |name: &str, at| SessionMeta {
            session: Id128([1; 16]),
            name: name.into(),
            labels: vec!["wk".into()],
            at,
            assignee: None,
        };
        SessionWriter::rename(&mut doc, &signer(2), &meta("disk check", 5)).unwrap();
        let v = SessionView::read_without_output(&doc, &fleet).unwrap();
        assert_eq!((v.info.name.as_unescaped_str(), v.info.labels.clone()), ("disk check", vec![PeerText::from("wk")]));
        assert_eq!(v.renamed_by, Some(signer(2).node_id()));
        // An agent may not rename; its record is quarantined and the technician's name stays.
        SessionWriter::rename(&mut doc, &signer(3), &meta("pwned", 9)).unwrap();
        let v = SessionView::read_without_output(&doc, &fleet).unwrap();
        assert_eq!(v.info.name, "disk check");
        assert!(v.quarantined.iter().any(|q| q.place.starts_with("meta:") && q.why.contains("technician")));
        // A later rename by the same technician replaces the earlier one.
        SessionWriter::rename(&mut doc, &signer(2), &meta("weekly disk check", 10)).unwrap();
        assert_eq!(SessionView::read_without_output(&doc, &fleet).unwrap().info.name, "weekly disk check");
    }

    #[test]
    fn notes_written_at_once_all_stay_an_agents_is_quarantined_and_only_a_technician_is_assigned() {
        let (fleet, doc, _) = base();
        let note = |id: u8, text: &str, at| SessionNote {
            session: Id128([1; 16]),
            id: Id128([id; 16]),
            text: text.into(),
            at,
        };
        // Two copies of the session, a note added to each, then merged: both notes stay.
        let (mut a, mut b) = (doc.fork(), doc.fork());
        SessionWriter::note(&mut a, &signer(2), &note(1, "disk cleanup did not fix it", 20)).unwrap();
        SessionWriter::note(&mut b, &signer(2), &note(2, "chkdsk pending", 10)).unwrap();
        a.merge(&mut b).unwrap();
        SessionWriter::note(&mut a, &signer(3), &note(3, "an agent's words", 30)).unwrap();
        let v = SessionView::read_without_output(&a, &fleet).unwrap();
        let texts: Vec<&str> = v.notes.iter().map(|n| n.note.text.as_unescaped_str()).collect();
        assert_eq!(texts, ["chkdsk pending", "disk cleanup did not fix it"]);
        assert!(v.notes.iter().all(|n| n.author == signer(2).node_id()));
        assert!(v.quarantined.iter().any(|q| q.place.starts_with("note:") && q.why.contains("technician")));

        let meta = |assignee: NodeId| SessionMeta {
            session: Id128([1; 16]),
            name: "s".into(),
            labels: vec![],
            at: 40,
            assignee: Some(assignee),
        };
        SessionWriter::rename(&mut a, &signer(2), &meta(signer(2).node_id())).unwrap();
        assert_eq!(SessionView::read_without_output(&a, &fleet).unwrap().assignee, Some(signer(2).node_id()));
        // An agent named as assignee: nobody has it.
        SessionWriter::rename(&mut a, &signer(2), &meta(signer(3).node_id())).unwrap();
        assert_eq!(SessionView::read_without_output(&a, &fleet).unwrap().assignee, None);
    }

    #[test]
    fn a_target_record_copied_from_another_session_does_not_share_this_one() {
        let (fleet, _, _) = base();
        let tech = signer(2);
        let other = SessionInfo {
            id: Id128([2; 16]),
            name: "b".into(),
            labels: vec![],
            created_at: 0,
            org_key: signer(1).node_id(),
        };
        let mut b = SessionWriter::create(&tech, &other).unwrap();
        // A Target(agent 4) record signed for session [1;16], copied into session [2;16].
        let copied =
            tech.sign(RecordKind::Target, &Target { session: Id128([1; 16]), node: signer(4).node_id(), at: 0 });
        b.transact::<_, _, automerge::AutomergeError>(|tx| {
            let targets = am::ensure_root_map(tx, "targets")?;
            tx.put(&targets, signer(4).node_id().to_hex(), copied.clone())?;
            Ok(())
        })
        .unwrap();
        assert!(SessionView::read_targets(&b, &fleet).is_empty());
    }

    #[test]
    fn a_record_under_another_records_key_or_from_the_wrong_author_is_quarantined() {
        let (fleet, mut doc, reqs) = base();
        // Agent 4 writes output into agent 3's command.
        let c = OutputChunk { request: reqs[0].id, seq: 0, stream: Stream::Stdout, data: b"fake".to_vec() };
        let chunks = BTreeMap::from([(chunk_hash(&c.data), c.data.clone())]);
        SessionWriter::append_output(&mut doc, &signer(4), &[c.reference()]).unwrap();
        let view = SessionView::read(&doc, &fleet, &chunks).unwrap();
        assert!(view.commands[0].output.is_empty());
        assert!(
            view.quarantined.iter().any(|q| q.why.contains("not written by the target agent")),
            "{:?}",
            view.quarantined
        );
    }

    #[test]
    fn output_reads_in_order_up_to_the_first_chunk_not_here_yet() {
        let (fleet, doc, reqs) = base();
        let changes = agent_changes(&doc, &reqs[0], 3, 4);
        let mut doc = doc.fork();
        doc.apply_changes(changes).unwrap();
        let mut chunks = all_chunks(&[(&reqs[0], 4)]);
        chunks.remove(&chunk_hash(&line(2)));
        let view = SessionView::read(&doc, &fleet, &chunks).unwrap();
        let shown: Vec<u64> = view.commands[0].output.iter().map(|c| c.seq).collect();
        assert_eq!(shown, vec![0, 1]);
        assert_eq!(view.commands[0].output_pending, (line(2).len() + line(3).len()) as u64);
        // A follower stops before the gap and resumes there once the bytes arrive.
        let (first, next) = SessionView::read_output_from(&doc, &reqs[0], 0, usize::MAX, &chunks);
        assert_eq!((first.len(), next), (2, 2));
        chunks.insert(chunk_hash(&line(2)), line(2));
        let (rest, next) = SessionView::read_output_from(&doc, &reqs[0], next, usize::MAX, &chunks);
        assert_eq!((rest.iter().map(|c| c.seq).collect::<Vec<_>>(), next), (vec![2, 3], 4));
        // Bytes that do not match the signed hash are not shown.
        let mut wrong = all_chunks(&[(&reqs[0], 4)]);
        wrong.insert(chunk_hash(&line(0)), b"line X\n".to_vec());
        let view = SessionView::read(&doc, &fleet, &wrong).unwrap();
        assert!(view.commands[0].output.is_empty());
        // The sync scan names each referenced chunk once, from where it last stopped.
        let mut cursors = BTreeMap::new();
        assert_eq!(SessionView::scan_output_refs(&doc, &mut cursors).len(), 4);
        assert!(SessionView::scan_output_refs(&doc, &mut cursors).is_empty());
    }
}
