//! Public transcripts: a *new* artifact built from a reviewed snapshot of a session, never the
//! session document with parts deleted (Automerge keeps all history).
//!
//! What it carries: the org's genesis record and just the membership records needed to chain
//! every author back to the org key; for each command the original signed records (request,
//! decision, start, output references with their bytes, end) wherever nothing in them was
//! redacted, so a reader checks
//! them exactly as an agent would; and where something was redacted, the redacted content
//! instead, marked as such, with the original signature *withheld* (a signature or hash over a
//! redacted secret would let anyone test guesses of it). Every secret becomes the same fixed
//! marker, so its length is not revealed. The whole is signed by the publishing technician and
//! names the session heads it was built from.
//!
//! The file is canonical JSON (`serde_json` of these types, compact): [`verify`] re-serializes
//! what it parsed and refuses any byte that differs. The HTML page (see [`html`]) embeds that JSON
//! and is itself a pure function of it, so a page is verified by re-rendering it.

use std::collections::BTreeSet;

use automerge::ReadDoc;
use data_encoding::BASE64;
use serde::{Deserialize, Serialize};

use crate::fleet::{Fleet, FleetError, Role};
use crate::id::{Id128, NodeId};
use crate::record::{RecordKind, Signer, verify_detached, verify_kind};
use crate::redact::Redactor;
use crate::schedule::{self, Schedule, ScheduleConsent, ScheduledRun};
use crate::session::{
    ChunkSource, CommandRequest, CommandSpec, Decision, End, EndStatus, OutputChunk, OutputRef, SessionError,
    SessionInfo, SessionNote, SessionView, Start, Stream, Verdict, check_decision,
};
use crate::text::PeerText;

pub mod group;
pub mod html;

pub const FORMAT: &str = "caisey-transcript/3";
/// Files of the format before summaries and notes: the same, without them.
const FORMAT_2: &str = "caisey-transcript/2";
const DOMAIN: &[u8] = b"caisey/transcript/v1\0";

/// The published file: the transcript and the publisher's signature over its canonical bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptFile {
    pub transcript: Transcript,
    pub publisher: NodeId,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transcript {
    pub format: String,
    pub org_name: String,
    /// The org's genesis record (base64), signed by the org key.
    pub genesis: String,
    /// Membership records (base64) chaining every author here back to the org key.
    pub members: Vec<String>,
    pub session: Id128,
    pub name: PeerText,
    pub labels: Vec<PeerText>,
    /// The session's Automerge heads this was built from.
    pub heads: Vec<String>,
    pub published_at: u64,
    pub commands: Vec<TCommand>,
    /// Commands the publisher chose to leave out (their ids only).
    pub omitted: Vec<Id128>,
    /// The publisher's own words for the reader: what was found, what was changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Technicians' notes on the session, each as its author signed it or as redacted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TCommand {
    pub id: Id128,
    /// For a scheduled run, the schedule record (the request is made from it and `run`).
    pub request: Part,
    /// A scheduled run: the agent's signed run record (base64). Its decision is then the
    /// agent's signed consent to the schedule, unless the run was approved on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub decision: Option<Part>,
    pub start: Option<Part>,
    pub end: Option<Part>,
    pub stdout: Output,
    pub stderr: Output,
    pub redactions: Vec<Redaction>,
    /// The files the run brought back, as its machine signed them: names, sizes and hashes,
    /// never their bytes (base64 records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
}

/// A record, as signed by its author or as redacted by the publisher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    Signed {
        record: String,
    },
    /// The record with secrets replaced; its signature withheld. `body` is the record's JSON.
    Redacted {
        author: NodeId,
        body: serde_json::Value,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case", deny_unknown_fields)]
pub enum Output {
    /// The original signed chunk references with the bytes they name, in order.
    Signed { chunks: Vec<SignedChunk> },
    /// The stream's text with secrets replaced.
    Redacted { text: String },
}

/// One output reference record and the bytes whose hash and length it signs (both base64).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedChunk {
    pub record: String,
    pub data: String,
}

/// Where something was hidden: which field, by which rule, how many times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redaction {
    pub field: String,
    pub rule: String,
    pub count: u32,
}

/// Why a transcript could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("the fleet document is unusable: {0}")]
    Fleet(#[from] FleetError),
    #[error("the session is unusable: {0}")]
    Session(#[from] SessionError),
    #[error("only a technician of the org can publish a transcript")]
    NotATechnician,
    #[error("{0} byte(s) of output have not arrived here yet; share once the session has synced")]
    OutputPending(u64),
}

/// Why a transcript is not genuine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("not a caisey transcript: {0}")]
    Malformed(String),
    #[error("the file was modified: it is not byte for byte what was signed")]
    NotCanonical,
    #[error("the page was modified: it does not match the transcript it carries")]
    PageModified,
    #[error("the publisher's signature does not match the transcript")]
    BadSignature,
    #[error("the org chain does not hold: {0}")]
    Chain(String),
    #[error("command {command}: {what}")]
    Record { command: String, what: String },
}

/// What to leave out.
#[derive(Debug, Clone)]
pub struct ShareOptions {
    pub redactor: Redactor,
    /// Commands to leave out entirely.
    pub omit: BTreeSet<Id128>,
    /// The publisher's summary for the reader, if any.
    pub summary: Option<String>,
    /// Leave the technicians' notes out.
    pub without_notes: bool,
}

fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// Builds and signs a transcript of `session_doc` as it is now.
pub fn build(
    session_doc: &automerge::Automerge,
    chunks: &dyn ChunkSource,
    fleet_doc: &impl ReadDoc,
    options: &ShareOptions,
    publisher: &Signer,
    now: u64,
) -> Result<TranscriptFile, BuildError> {
    let fleet = Fleet::read(fleet_doc)?;
    if fleet.role_of(&publisher.node_id()) != Some(Role::Technician) {
        return Err(BuildError::NotATechnician);
    }
    let view = SessionView::read(session_doc, &fleet, chunks)?;
    let pending: u64 =
        view.commands.iter().filter(|c| !options.omit.contains(&c.request.id)).map(|c| c.output_pending).sum();
    if pending > 0 {
        return Err(BuildError::OutputPending(pending));
    }
    let redactor = &options.redactor;
    let mut authors = BTreeSet::from([publisher.node_id()]);
    let mut commands = Vec::new();
    let mut omitted = Vec::new();
    for cmd in &view.commands {
        let id = cmd.request.id;
        if options.omit.contains(&id) {
            omitted.push(id);
            continue;
        }
        authors.extend([cmd.requester, cmd.request.target]);
        authors.extend(cmd.decided_by_node);
        let raw = |map| SessionView::raw_record(session_doc, map, &id).map(|b| b64(&b)).unwrap_or_default();
        let mut redactions = Vec::new();
        let mut hide = |field: &str, text: &str| {
            let (out, found) = redactor.redact(text);
            for (rule, count) in found {
                redactions.push(Redaction { field: field.to_string(), rule, count });
            }
            out
        };

        let mut req = cmd.request.clone();
        req.command.script = hide("script", &req.command.script);
        req.description = hide("description", req.description.as_unescaped_str()).into();
        req.command.cwd = req.command.cwd.as_deref().map(|c| hide("cwd", c));
        for (k, v) in req.command.env.iter_mut() {
            *v = hide(&format!("env {k}"), v);
        }
        let request_redacted = req != cmd.request;
        let schedule = cmd.schedule.and_then(|s| view.schedules.iter().find(|v| v.schedule.id == s));
        let request = match (schedule, request_redacted) {
            (Some(s), true) => {
                let hidden = Schedule {
                    command: req.command.clone(),
                    description: req.description.clone(),
                    ..s.schedule.clone()
                };
                Part::Redacted { author: cmd.requester, body: serde_json::to_value(&hidden).unwrap_or_default() }
            }
            (Some(s), false) => Part::Signed {
                record: schedule::raw_record(session_doc, "schedule", &s.schedule.id)
                    .map(|b| b64(&b))
                    .unwrap_or_default(),
            },
            (None, true) => {
                Part::Redacted { author: cmd.requester, body: serde_json::to_value(&req).unwrap_or_default() }
            }
            (None, false) => Part::Signed { record: raw("requests") },
        };
        let run = schedule.and_then(|_| schedule::raw_record(session_doc, "run", &id)).map(|b| b64(&b));
        // A run under standing consent is approved by the consent record itself.
        let consent = schedule
            .filter(|_| SessionView::raw_record(session_doc, "decisions", &id).is_none())
            .and_then(|s| schedule::raw_record(session_doc, "consent", &s.schedule.id));
        // A decision signs the hash of the exact command: with the command redacted, that hash
        // would let anyone test guesses of the secret, so it is withheld with the signature.
        let decision = cmd.decision.as_ref().map(|d| {
            if request_redacted {
                let mut body = serde_json::to_value(d).unwrap_or_default();
                if let Some(o) = body.as_object_mut() {
                    o.remove("command_hash");
                }
                Part::Redacted { author: cmd.decided_by_node.unwrap_or(cmd.request.target), body }
            } else {
                Part::Signed { record: consent.as_ref().map(|b| b64(b)).unwrap_or_else(|| raw("decisions")) }
            }
        });
        let start = cmd.start.as_ref().map(|_| Part::Signed { record: raw("starts") });
        let end = cmd.end.as_ref().map(|e| {
            let message = e.message.as_deref().map(|m| hide("exit message", m));
            if message.as_deref() == e.message.as_deref() {
                Part::Signed { record: raw("ends") }
            } else {
                let body = serde_json::to_value(End { message, ..e.clone() }).unwrap_or_default();
                Part::Redacted { author: cmd.request.target, body }
            }
        });
        let references = SessionView::raw_output(session_doc, &id);
        let mut output = |stream: Stream, field: &str| {
            let mine: Vec<&OutputChunk> = cmd.output.iter().filter(|c| c.stream == stream).collect();
            let text = String::from_utf8_lossy(&mine.iter().flat_map(|c| c.data.iter().copied()).collect::<Vec<u8>>())
                .into_owned();
            let hidden = hide(field, &text);
            if hidden != text {
                return Output::Redacted { text: hidden };
            }
            let records = references
                .iter()
                .filter_map(|b| {
                    let v = verify_kind(b, RecordKind::Output).ok().filter(|v| v.author == cmd.request.target)?;
                    let r = OutputRef::decode(v.body).ok().filter(|r| r.request == id && r.stream == stream)?;
                    let chunk = mine.iter().find(|c| c.seq == r.seq)?;
                    Some(SignedChunk { record: b64(b), data: b64(&chunk.data) })
                })
                .collect();
            Output::Signed { chunks: records }
        };
        let stdout = output(Stream::Stdout, "stdout");
        let stderr = output(Stream::Stderr, "stderr");
        let artifacts = view
            .artifacts
            .iter()
            .filter(|a| a.artifact.request == id)
            .filter_map(|a| crate::artifact::raw_record(session_doc, &a.artifact))
            .map(|b| b64(&b))
            .collect();
        commands.push(TCommand { id, request, run, decision, start, end, stdout, stderr, redactions, artifacts });
    }
    let mut notes = Vec::new();
    for n in view.notes.iter().filter(|_| !options.without_notes) {
        authors.insert(n.author);
        let (text, found) = redactor.redact(n.note.text.as_unescaped_str());
        if found.is_empty() {
            let raw = SessionView::raw_note(session_doc, &n.author, &n.note.id).map(|b| b64(&b)).unwrap_or_default();
            notes.push(Part::Signed { record: raw });
        } else {
            let body = serde_json::to_value(SessionNote { text: text.into(), ..n.note.clone() }).unwrap_or_default();
            notes.push(Part::Redacted { author: n.author, body });
        }
    }
    let summary = options.summary.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(|s| redactor.redact(s).0);
    let members = Fleet::membership_chain(fleet_doc, &authors).iter().map(|b| b64(b)).collect();
    let transcript = Transcript {
        format: FORMAT.into(),
        org_name: fleet.org_name.clone(),
        genesis: Fleet::genesis_record(fleet_doc).map(|b| b64(&b)).unwrap_or_default(),
        members,
        session: view.info.id,
        name: redactor.redact(view.info.name.as_unescaped_str()).0.into(),
        labels: view.info.labels.iter().map(|l| redactor.redact(l.as_unescaped_str()).0.into()).collect(),
        heads: session_doc.get_heads().iter().map(|h| h.to_string()).collect(),
        published_at: now,
        commands,
        omitted,
        summary,
        notes,
    };
    let signature = publisher.sign_detached(DOMAIN, &canonical(&transcript));
    Ok(TranscriptFile { transcript, publisher: publisher.node_id(), signature: hex::encode(signature) })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], command: &Id128) -> Result<T, VerifyError> {
    serde_json::from_slice(body).map_err(|e| VerifyError::Record { command: command.short(), what: e.to_string() })
}

fn parse_value<T: serde::de::DeserializeOwned>(v: &serde_json::Value, command: &Id128) -> Result<T, VerifyError> {
    T::deserialize(v).map_err(|e| VerifyError::Record { command: command.short(), what: e.to_string() })
}

fn canonical<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

impl TranscriptFile {
    /// The bytes of the `.json` file.
    pub fn to_json(&self) -> Vec<u8> {
        canonical(self)
    }
}

/// A verified transcript, ready to show: who asked, who approved, what ran, how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub org_name: String,
    pub org_key: NodeId,
    pub publisher: PeerText,
    pub publisher_key: NodeId,
    pub session: Id128,
    pub name: PeerText,
    pub labels: Vec<PeerText>,
    pub heads: Vec<String>,
    pub published_at: u64,
    pub commands: Vec<CheckedCommand>,
    pub omitted: Vec<Id128>,
    pub summary: Option<String>,
    pub notes: Vec<CheckedNote>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckedNote {
    pub author: PeerText,
    pub author_key: NodeId,
    pub at: u64,
    pub text: PeerText,
    /// False where the publisher redacted it: then only the publisher vouches for it.
    pub signed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckedCommand {
    pub id: Id128,
    pub machine: PeerText,
    pub machine_key: NodeId,
    pub requester: PeerText,
    pub requester_key: NodeId,
    pub command: CommandSpec,
    pub description: PeerText,
    pub requested_at: u64,
    /// False where the publisher redacted it: then only the publisher vouches for it.
    pub request_signed: bool,
    pub decision: Option<CheckedDecision>,
    pub started_at: Option<u64>,
    pub end: Option<CheckedEnd>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_signed: bool,
    pub stderr_signed: bool,
    pub redactions: Vec<Redaction>,
    /// Files the run brought back (or refused), as its machine signed them.
    pub artifacts: Vec<crate::artifact::Artifact>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckedDecision {
    pub verdict: Verdict,
    pub decided_by: String,
    pub decided_by_key: NodeId,
    pub decided_at: u64,
    pub signed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckedEnd {
    pub status: EndStatus,
    pub exit_code: Option<i32>,
    pub ended_at: u64,
    pub message: Option<String>,
    /// The values the run yielded, signed with its end.
    pub probes: Vec<crate::probe::ProbeValue>,
    pub signed: bool,
}

/// Verifies a transcript file, JSON or HTML.
pub fn verify(bytes: &[u8]) -> Result<(TranscriptFile, Checked), VerifyError> {
    if bytes.starts_with(html::DOCTYPE.as_bytes()) {
        let json =
            html::extract(bytes).ok_or_else(|| VerifyError::Malformed("no transcript data in the page".into()))?;
        let (file, checked) = verify_json(json.as_bytes())?;
        if html::render(&file, &checked).as_bytes() != bytes {
            return Err(VerifyError::PageModified);
        }
        return Ok((file, checked));
    }
    verify_json(bytes)
}

fn verify_json(bytes: &[u8]) -> Result<(TranscriptFile, Checked), VerifyError> {
    let file: TranscriptFile = serde_json::from_slice(bytes).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if canonical(&file) != body {
        return Err(VerifyError::NotCanonical);
    }
    let t = &file.transcript;
    if t.format != FORMAT && !(t.format == FORMAT_2 && t.summary.is_none() && t.notes.is_empty()) {
        return Err(VerifyError::Malformed(format!("unknown format {:?}", t.format)));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&file.signature, &mut sig).map_err(|_| VerifyError::BadSignature)?;
    if !verify_detached(&file.publisher, DOMAIN, &canonical(t), &sig) {
        return Err(VerifyError::BadSignature);
    }
    let de = |s: &str| BASE64.decode(s.as_bytes()).map_err(|_| VerifyError::Malformed("bad base64".into()));
    let genesis = de(&t.genesis)?;
    let members = t.members.iter().map(|m| de(m)).collect::<Result<Vec<_>, _>>()?;
    let fleet = Fleet::from_records(&genesis, &members).map_err(|e| VerifyError::Chain(e.to_string()))?;
    let org_key = fleet.org_key.ok_or_else(|| VerifyError::Chain("no org key".into()))?;
    if fleet.org_name != t.org_name {
        return Err(VerifyError::Chain("org name differs from the genesis record".into()));
    }
    if fleet.role_of(&file.publisher) != Some(Role::Technician) {
        return Err(VerifyError::Chain("the publisher is not a technician of the org".into()));
    }
    let name_of = |n: &NodeId| fleet.members.get(n).map(|m| m.name.clone()).unwrap_or_else(|| n.short().into());
    let info = SessionInfo { id: t.session, name: t.name.clone(), labels: t.labels.clone(), created_at: 0, org_key };
    let mut commands = Vec::new();
    for c in &t.commands {
        let fail = |what: String| VerifyError::Record { command: c.id.short(), what };
        let signed = |part: &str, kind: RecordKind| -> Result<(NodeId, Vec<u8>), VerifyError> {
            let bytes = de(part)?;
            let v = verify_kind(&bytes, kind).map_err(|e| fail(format!("{kind:?}: {e}")))?;
            Ok((v.author, v.body.to_vec()))
        };
        // A scheduled run's request is made from its schedule and the agent's run record.
        let mut schedule_read = None;
        let (requester, req, request_signed): (NodeId, CommandRequest, bool) = match (&c.request, &c.run) {
            (Part::Signed { record }, None) => {
                let (a, body) = signed(record, RecordKind::Request)?;
                (a, parse_json(&body, &c.id)?, true)
            }
            (Part::Redacted { author, body }, None) => (*author, parse_value(body, &c.id)?, false),
            (part, Some(run)) => {
                let (author, s, is_signed): (NodeId, Schedule, bool) = match part {
                    Part::Signed { record } => {
                        let (a, body) = signed(record, RecordKind::Schedule)?;
                        (a, parse_json(&body, &c.id)?, true)
                    }
                    Part::Redacted { author, body } => (*author, parse_value(body, &c.id)?, false),
                };
                let (a, body) = signed(run, RecordKind::ScheduledRun)?;
                let r: ScheduledRun = parse_json(&body, &c.id)?;
                if a != s.target || r.schedule != s.id || r.id != c.id || s.run_id(r.slot_at) != r.id {
                    return Err(fail("the run is not of its schedule, or not written by its machine".into()));
                }
                let req = s.run_request(&r);
                schedule_read = Some((s, is_signed));
                (author, req, is_signed)
            }
        };
        if req.id != c.id || req.session != t.session {
            return Err(fail("request names another command or session".into()));
        }
        if fleet.role_of(&requester) != Some(Role::Technician) {
            return Err(fail("requested by someone who is not a technician of the org".into()));
        }
        let decision = match &c.decision {
            None => None,
            Some(Part::Signed { record }) if verify_kind(&de(record)?, RecordKind::ScheduleConsent).is_ok() => {
                let (a, body) = signed(record, RecordKind::ScheduleConsent)?;
                let consent: ScheduleConsent = parse_json(&body, &c.id)?;
                let Some((s, true)) = &schedule_read else {
                    return Err(fail("a consent without its signed schedule".into()));
                };
                let agrees = consent.schedule == s.id
                    && consent.schedule_hash == s.hash()
                    && consent.verdict == Verdict::Approved
                    && !consent.each_run
                    && a == s.target;
                if !agrees {
                    return Err(fail("the consent is not the machine's standing consent to this schedule".into()));
                }
                Some(CheckedDecision {
                    verdict: consent.verdict,
                    decided_by: consent.decided_by,
                    decided_by_key: a,
                    decided_at: consent.decided_at,
                    signed: true,
                })
            }
            Some(Part::Signed { record }) => {
                let (a, body) = signed(record, RecordKind::Decision)?;
                let d: Decision = parse_json(&body, &c.id)?;
                if !request_signed {
                    return Err(fail("a signed decision on a redacted request".into()));
                }
                check_decision(&fleet, &info, &req, requester, a, &d).map_err(fail)?;
                Some(CheckedDecision {
                    verdict: d.verdict,
                    decided_by: d.decided_by,
                    decided_by_key: a,
                    decided_at: d.decided_at,
                    signed: true,
                })
            }
            Some(Part::Redacted { author, body }) => {
                let get = |k: &str| body.get(k).cloned().unwrap_or_default();
                Some(CheckedDecision {
                    verdict: serde_json::from_value(get("verdict")).map_err(|e| fail(e.to_string()))?,
                    decided_by: get("decided_by").as_str().unwrap_or_default().to_string(),
                    decided_by_key: *author,
                    decided_at: get("decided_at").as_u64().unwrap_or_default(),
                    signed: false,
                })
            }
        };
        let by_machine = |a: NodeId, what: &str| {
            if a == req.target { Ok(()) } else { Err(fail(format!("{what} not written by the machine"))) }
        };
        let started_at = match &c.start {
            Some(Part::Signed { record }) => {
                let (a, body) = signed(record, RecordKind::Start)?;
                by_machine(a, "start")?;
                let s: Start = parse_json(&body, &c.id)?;
                Some(s.started_at)
            }
            Some(Part::Redacted { .. }) => return Err(fail("a start is never redacted".into())),
            None => None,
        };
        let end = match &c.end {
            Some(Part::Signed { record }) => {
                let (a, body) = signed(record, RecordKind::End)?;
                by_machine(a, "end")?;
                let e: End = parse_json(&body, &c.id)?;
                (e.request == c.id).then_some(()).ok_or_else(|| fail("end names another command".into()))?;
                Some(CheckedEnd {
                    status: e.status,
                    exit_code: e.exit_code,
                    ended_at: e.ended_at,
                    message: e.message,
                    probes: e.probes,
                    signed: true,
                })
            }
            Some(Part::Redacted { body, .. }) => {
                let e: End = parse_value(body, &c.id)?;
                Some(CheckedEnd {
                    status: e.status,
                    exit_code: e.exit_code,
                    ended_at: e.ended_at,
                    message: e.message,
                    probes: e.probes,
                    signed: false,
                })
            }
            None => None,
        };
        let output = |o: &Output, stream: Stream| -> Result<(String, bool), VerifyError> {
            match o {
                Output::Redacted { text } => Ok((text.clone(), false)),
                Output::Signed { chunks } => {
                    let mut data = Vec::new();
                    let mut last = None;
                    for ch in chunks {
                        let (a, body) = signed(&ch.record, RecordKind::Output)?;
                        by_machine(a, "output")?;
                        let r = OutputRef::decode(&body).map_err(|e| fail(e.to_string()))?;
                        if r.request != c.id || r.stream != stream || last.is_some_and(|l| r.seq <= l) {
                            return Err(fail("output chunks out of place or order".into()));
                        }
                        last = Some(r.seq);
                        let bytes =
                            BASE64.decode(ch.data.as_bytes()).map_err(|_| fail("output is not base64".into()))?;
                        let chunk = r
                            .resolve(bytes)
                            .ok_or_else(|| fail("output bytes do not match their signed hash".into()))?;
                        data.extend_from_slice(&chunk.data);
                    }
                    Ok((String::from_utf8_lossy(&data).into_owned(), true))
                }
            }
        };
        let mut artifacts = Vec::new();
        for record in &c.artifacts {
            let (a, body) = signed(record, RecordKind::Artifact)?;
            by_machine(a, "artifact")?;
            let artifact: crate::artifact::Artifact = parse_json(&body, &c.id)?;
            if artifact.request != c.id || artifact.session != t.session {
                return Err(fail("an artifact of another command".into()));
            }
            artifacts.push(artifact);
        }
        let (stdout, stdout_signed) = output(&c.stdout, Stream::Stdout)?;
        let (stderr, stderr_signed) = output(&c.stderr, Stream::Stderr)?;
        commands.push(CheckedCommand {
            id: c.id,
            machine: name_of(&req.target),
            machine_key: req.target,
            requester: name_of(&requester),
            requester_key: requester,
            command: req.command,
            description: req.description,
            requested_at: req.requested_at,
            request_signed,
            decision,
            started_at,
            end,
            stdout,
            stderr,
            stdout_signed,
            stderr_signed,
            redactions: c.redactions.clone(),
            artifacts,
        });
    }
    let mut notes = Vec::new();
    for part in &t.notes {
        let fail = |what: String| VerifyError::Malformed(format!("note: {what}"));
        let (author, note, signed) = match part {
            Part::Signed { record } => {
                let bytes = de(record)?;
                let v = verify_kind(&bytes, RecordKind::SessionNote).map_err(|e| fail(e.to_string()))?;
                let note: SessionNote = serde_json::from_slice(v.body).map_err(|e| fail(e.to_string()))?;
                (v.author, note, true)
            }
            Part::Redacted { author, body } => {
                (*author, SessionNote::deserialize(body).map_err(|e| fail(e.to_string()))?, false)
            }
        };
        if note.session != t.session {
            return Err(fail("written for another session".into()));
        }
        if fleet.role_of(&author) != Some(Role::Technician) {
            return Err(fail("written by someone who is not a technician of the org".into()));
        }
        notes.push(CheckedNote { author: name_of(&author), author_key: author, at: note.at, text: note.text, signed });
    }
    let checked = Checked {
        summary: t.summary.clone(),
        notes,
        org_name: t.org_name.clone(),
        org_key,
        publisher: name_of(&file.publisher),
        publisher_key: file.publisher,
        session: t.session,
        name: t.name.clone(),
        labels: t.labels.clone(),
        heads: t.heads.clone(),
        published_at: t.published_at,
        commands,
        omitted: t.omitted.clone(),
    };
    Ok((file, checked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Membership;
    use crate::session::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    struct World {
        tech: Signer,
        agent: Signer,
        fleet_doc: automerge::Automerge,
    }

    fn world() -> World {
        let org = Signer::from_secret([1; 32]);
        let tech = Signer::from_secret([2; 32]);
        let agent = Signer::from_secret([3; 32]);
        let mut fleet_doc = Fleet::create("Acme", &org, &tech, "alice", Id128([0; 16]), 0).unwrap();
        let m = Membership {
            approves: vec![],
            node: agent.node_id(),
            role: Role::Agent,
            name: "ws-01".into(),
            groups: vec![],
            at: 0,
            invite: None,
        };
        Fleet::put_member(&mut fleet_doc, &org.sign(RecordKind::Membership, &m), &agent.node_id()).unwrap();
        World { tech, agent, fleet_doc }
    }

    /// A session document and the output bytes it references.
    type Session = (automerge::Automerge, BTreeMap<ChunkHash, Vec<u8>>);

    /// A session with one command that ran and printed `stdout`.
    fn session(w: &World, script: &str, stdout: &[u8]) -> Session {
        let info = SessionInfo {
            id: Id128([7; 16]),
            name: "disk".into(),
            labels: vec![],
            created_at: 0,
            org_key: NodeId([0; 32]),
        };
        let mut doc = SessionWriter::create(&w.tech, &info).unwrap();
        let command = CommandSpec {
            shell: Shell::Sh,
            script: script.into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 60_000,
            collect: None,
        };
        let req = CommandRequest {
            id: Id128([8; 16]),
            session: info.id,
            target: w.agent.node_id(),
            command,
            description: "check".into(),
            requested_at: 1_000,
            expires_at: 100_000,
        };
        SessionWriter::request(&mut doc, &w.tech, &req).unwrap();
        let d = Decision {
            request: req.id,
            session: info.id,
            target: req.target,
            requester: w.tech.node_id(),
            command_hash: req.command.hash(),
            verdict: Verdict::Approved,
            decided_by: "local user on ws-01".into(),
            decided_at: 2_000,
            expires_at: 2_000,
            nonce: Id128([9; 16]),
        };
        let start =
            Start { request: req.id, session: info.id, started_at: 2_000, approved_by: req.target, nonce: d.nonce };
        SessionWriter::start(&mut doc, &w.agent, Some(&d), &start).unwrap();
        let chunks: Vec<OutputChunk> = stdout
            .chunks(7)
            .enumerate()
            .map(|(i, c)| OutputChunk { request: req.id, seq: i as u64, stream: Stream::Stdout, data: c.to_vec() })
            .collect();
        let refs: Vec<OutputRef> = chunks.iter().map(OutputChunk::reference).collect();
        SessionWriter::append_output(&mut doc, &w.agent, &refs).unwrap();
        let end = End {
            probes: Vec::new(),
            request: req.id,
            session: info.id,
            status: EndStatus::Exited,
            exit_code: Some(3),
            ended_at: 3_000,
            chunks: chunks.len() as u64,
            message: None,
        };
        SessionWriter::end(&mut doc, &w.agent, &end).unwrap();
        (doc, chunks.iter().map(|c| (chunk_hash(&c.data), c.data.clone())).collect())
    }

    fn share(w: &World, (doc, chunks): &Session) -> TranscriptFile {
        let options = ShareOptions {
            redactor: Redactor::new(&[]).unwrap(),
            omit: BTreeSet::new(),
            summary: None,
            without_notes: false,
        };
        build(doc, chunks, &w.fleet_doc, &options, &w.tech, 5_000).unwrap()
    }

    /// A session holding a schedule with standing consent and two of its runs, each yielding
    /// `private_mb`; `script` is the schedule's command.
    fn scheduled_session(w: &World, script: &str) -> Session {
        use crate::probe::ProbeValue;
        use crate::schedule::*;
        let info = SessionInfo {
            id: Id128([7; 16]),
            name: "memory".into(),
            labels: vec![],
            created_at: 0,
            org_key: NodeId([0; 32]),
        };
        let mut doc = SessionWriter::create(&w.tech, &info).unwrap();
        let command = CommandSpec {
            shell: Shell::Sh,
            script: script.into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 60_000,
            collect: None,
        };
        let s = Schedule {
            id: Id128([4; 16]),
            session: info.id,
            target: w.agent.node_id(),
            command,
            description: "weekly memory".into(),
            every: "5s".into(),
            until: 1_000_000,
            missed: Missed::RunLate,
            probes: vec![],
            requested_at: 0,
            expires_at: 100_000,
            replaces: None,
        };
        ScheduleWriter::schedule(&mut doc, &w.tech, &s).unwrap();
        let consent = ScheduleConsent {
            schedule: s.id,
            session: info.id,
            target: s.target,
            schedule_hash: s.hash(),
            verdict: Verdict::Approved,
            each_run: false,
            decided_by: "local user on ws-01".into(),
            decided_at: 1_000,
            nonce: Id128([6; 16]),
        };
        ScheduleWriter::consent(&mut doc, &w.agent, &consent).unwrap();
        for (slot, mb) in [(6_000, 200.0), (11_000, 450.0)] {
            let run = ScheduledRun {
                id: s.run_id(slot),
                schedule: s.id,
                session: info.id,
                slot_at: slot,
                late: false,
                expires_at: s.until,
            };
            let start = Start {
                request: run.id,
                session: info.id,
                started_at: slot,
                approved_by: s.target,
                nonce: consent.nonce,
            };
            ScheduleWriter::run(&mut doc, &w.agent, &run, Some(&start)).unwrap();
            let end = End {
                request: run.id,
                session: info.id,
                status: EndStatus::Exited,
                exit_code: Some(0),
                ended_at: slot + 100,
                chunks: 0,
                message: None,
                probes: vec![ProbeValue { name: "private_mb".into(), value: mb, unit: Some("MB".into()) }],
            };
            SessionWriter::end(&mut doc, &w.agent, &end).unwrap();
        }
        (doc, BTreeMap::new())
    }

    #[test]
    fn scheduled_runs_are_published_with_their_consent_and_values_signed() {
        let w = world();
        let file = share(&w, &scheduled_session(&w, "ps -o rss= -p 1"));
        let (_, checked) = verify(&file.to_json()).unwrap();
        assert_eq!(checked.commands.len(), 2);
        for c in &checked.commands {
            assert!(c.request_signed);
            let d = c.decision.as_ref().unwrap();
            assert!(d.signed && d.verdict == Verdict::Approved && d.decided_by_key == w.agent.node_id());
        }
        assert_eq!(checked.commands[1].end.as_ref().unwrap().probes[0].value, 450.0);
        let page = html::render(&file, &checked);
        assert!(page.contains("Values of private_mb over 2 run(s)") && page.contains("<svg"), "{page}");
        assert!(page.contains("change +250"));
        assert!(!page.contains("<script"));
        verify(page.as_bytes()).unwrap();
        // With a secret in the schedule's command: published redacted, and still checks.
        let options = ShareOptions {
            redactor: Redactor::new(&[]).unwrap(),
            omit: BTreeSet::new(),
            summary: None,
            without_notes: false,
        };
        let (doc, chunks) = scheduled_session(&w, "curl -H 'Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345' x");
        let file = build(&doc, &chunks, &w.fleet_doc, &options, &w.tech, 5_000).unwrap();
        let json = String::from_utf8(file.to_json()).unwrap();
        assert!(!json.contains("abcdefghijklmnopqrstuvwxyz012345"));
        let (_, checked) = verify(json.as_bytes()).unwrap();
        assert!(!checked.commands[0].request_signed);
        // Any change to a run record (here: another run's) fails the check.
        let mut forged = file.clone();
        forged.transcript.commands[0].run = file.transcript.commands[1].run.clone();
        assert!(verify(&forged.to_json()).is_err());
    }

    #[test]
    fn notes_travel_signed_or_redacted_and_the_summary_opens_the_page() {
        let w = world();
        let (mut doc, chunks) = session(&w, "df -h", b"/dev/sda1 50%\n");
        let note = |id: u8, text: &str| SessionNote {
            session: Id128([7; 16]),
            id: Id128([id; 16]),
            text: text.into(),
            at: 4_000 + u64::from(id),
        };
        SessionWriter::note(&mut doc, &w.tech, &note(1, "disk cleanup did not fix it; chkdsk pending")).unwrap();
        SessionWriter::note(&mut doc, &w.tech, &note(2, "admin password=hunter22 reset")).unwrap();
        let options = ShareOptions {
            redactor: Redactor::new(&[]).unwrap(),
            omit: BTreeSet::new(),
            summary: Some("We found a full disk and cleared the spooler.".into()),
            without_notes: false,
        };
        let file = build(&doc, &chunks, &w.fleet_doc, &options, &w.tech, 5_000).unwrap();
        let (_, checked) = verify(&file.to_json()).unwrap();
        assert_eq!(checked.summary.as_deref(), Some("We found a full disk and cleared the spooler."));
        assert_eq!(checked.notes.len(), 2);
        assert!(checked.notes[0].signed && checked.notes[0].author == "alice");
        assert!(
            !checked.notes[1].signed && !checked.notes[1].text.as_unescaped_str().contains("hunter22"),
            "{:?}",
            checked.notes[1]
        );
        let page = html::render(&file, &checked);
        let (summary_at, notes_at) = (page.find("cleared the spooler").unwrap(), page.find("chkdsk pending").unwrap());
        let first_command = page.find("to run a command").unwrap();
        assert!(summary_at < first_command && notes_at > first_command);
        assert!(verify(page.as_bytes()).is_ok());

        // A note changed after signing is refused; so is a note left out by --no-notes still there.
        let mut tampered = file.clone();
        if let Some(Part::Signed { record }) = tampered.transcript.notes.first_mut() {
            let mut bytes = BASE64.decode(record.as_bytes()).unwrap();
            let at = bytes.len() - 70;
            bytes[at] ^= 1;
            *record = BASE64.encode(&bytes);
        }
        tampered.signature = hex::encode(w.tech.sign_detached(DOMAIN, &canonical(&tampered.transcript)));
        assert!(verify(&tampered.to_json()).is_err());
        let without = ShareOptions { without_notes: true, summary: None, ..options };
        let file = build(&doc, &chunks, &w.fleet_doc, &without, &w.tech, 5_000).unwrap();
        assert!(verify(&file.to_json()).unwrap().1.notes.is_empty());
        // What the earlier format published still verifies.
        let mut old = file.clone();
        old.transcript.format = FORMAT_2.into();
        old.signature = hex::encode(w.tech.sign_detached(DOMAIN, &canonical(&old.transcript)));
        assert!(verify(&old.to_json()).is_ok());
    }

    #[test]
    fn an_unredacted_transcript_verifies_with_every_signature() {
        let w = world();
        let file = share(&w, &session(&w, "df -h", b"/dev/sda1 50%\n"));
        let (_, checked) = verify(&file.to_json()).unwrap();
        let c = &checked.commands[0];
        assert!(c.request_signed && c.stdout_signed && c.decision.as_ref().unwrap().signed);
        assert_eq!(c.end.as_ref().unwrap().exit_code, Some(3));
        assert_eq!(c.stdout, "/dev/sda1 50%\n");
        assert_eq!((c.requester.as_unescaped_str(), c.machine.as_unescaped_str()), ("alice", "ws-01"));
    }

    #[test]
    fn any_flipped_byte_fails_json_and_html() {
        let w = world();
        let file = share(&w, &session(&w, "df -h", b"ok\n"));
        let json = file.to_json();
        let (_, checked) = verify(&json).unwrap();
        let page = html::render(&file, &checked).into_bytes();
        assert!(verify(&page).is_ok());
        for bytes in [json, page] {
            // 400 positions spread over the whole file (every one would take minutes: each check
            // verifies every signature), plus the first and last bytes.
            let step = (bytes.len() / 400).max(1);
            for i in (0..bytes.len()).step_by(step).chain([bytes.len() - 1]) {
                let mut bad = bytes.clone();
                bad[i] ^= 0x01;
                assert!(verify(&bad).is_err(), "flip at {i} of {} accepted", bytes.len());
            }
        }
    }

    #[test]
    fn hostile_output_renders_inert() {
        let w = world();
        let evil = b"<script>alert(1)</script><img src=x onerror=alert(2)>\x1b[31mred\x1b[0m\x1b]0;title\x07\n";
        let file = share(&w, &session(&w, "cat evil", evil));
        let (_, checked) = verify(&file.to_json()).unwrap();
        let page = html::render(&file, &checked);
        assert!(!page.contains("<script"), "script tag survived");
        assert!(!page.contains("<img"), "markup survived");
        assert!(!page.contains('\u{1b}') && !page.contains('\u{7}'), "terminal escapes survived");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(verify(page.as_bytes()).is_ok());
    }

    fn encodings(secret: &str) -> Vec<String> {
        let b = secret.as_bytes();
        vec![
            secret.to_string(),
            BASE64.encode(b),
            data_encoding::BASE64URL_NOPAD.encode(b),
            hex::encode(b),
            data_encoding::BASE32_NOPAD.encode(b),
            secret.chars().map(|c| format!("%{:02X}", c as u32)).collect(),
        ]
    }

    /// Every string in the artifact that decodes as base64, decoded: a secret must not hide
    /// inside an embedded record either.
    fn decoded_blobs(json: &[u8]) -> Vec<Vec<u8>> {
        fn walk(v: &serde_json::Value, out: &mut Vec<Vec<u8>>) {
            match v {
                serde_json::Value::String(s) => out.extend(BASE64.decode(s.as_bytes()).ok()),
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
                serde_json::Value::Object(o) => o.values().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&serde_json::from_slice(json).unwrap(), &mut out);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn a_planted_secret_leaves_no_trace(secret in "[A-Za-z0-9]{6,24}", before in "[a-z ]{0,12}") {
            let w = world();
            let script = format!("{before}echo password={secret}");
            let output = format!("{before}password={secret}\nall good\n");
            let file = share(&w, &session(&w, &script, output.as_bytes()));
            let json = file.to_json();
            let (_, checked) = verify(&json).unwrap();
            let page = html::render(&file, &checked);
            for artifact in [&json[..], page.as_bytes()] {
                let text = String::from_utf8_lossy(artifact).to_lowercase();
                for enc in encodings(&secret) {
                    let at = text.find(&enc.to_lowercase());
                    prop_assert!(at.is_none(), "{enc} found: …{}…", at.map(|i| &text[i.saturating_sub(80)..(i + 40).min(text.len())]).unwrap_or(""));
                }
            }
            for blob in decoded_blobs(&json) {
                let text = String::from_utf8_lossy(&blob).to_lowercase();
                prop_assert!(!text.contains(&secret.to_lowercase()), "secret inside an embedded record");
            }
            prop_assert!(checked.commands[0].stdout.contains("password=[REDACTED:password]"));
            prop_assert!(!checked.commands[0].request_signed);
            prop_assert!(!checked.commands[0].decision.as_ref().unwrap().signed);
            // The exit code still comes with its machine's signature.
            prop_assert!(checked.commands[0].end.as_ref().unwrap().signed);
        }
    }

    #[test]
    fn forged_publisher_and_foreign_org_fail() {
        let w = world();
        let doc = session(&w, "df -h", b"ok\n");
        // A stranger (not a technician) cannot publish.
        let stranger = Signer::from_secret([66; 32]);
        let options = ShareOptions {
            redactor: Redactor::new(&[]).unwrap(),
            omit: BTreeSet::new(),
            summary: None,
            without_notes: false,
        };
        assert!(matches!(build(&doc.0, &doc.1, &w.fleet_doc, &options, &stranger, 1), Err(BuildError::NotATechnician)));
        // Re-signing a genuine transcript with another key is caught.
        let mut file = share(&w, &doc);
        file.publisher = stranger.node_id();
        file.signature = hex::encode(stranger.sign_detached(DOMAIN, &canonical(&file.transcript)));
        assert!(matches!(verify(&file.to_json()), Err(VerifyError::Chain(_))));
    }

    #[test]
    fn output_not_here_yet_is_not_shared_and_swapped_bytes_fail() {
        let w = world();
        let (doc, chunks) = session(&w, "df -h", b"/dev/sda1 50%\n");
        let options = ShareOptions {
            redactor: Redactor::new(&[]).unwrap(),
            omit: BTreeSet::new(),
            summary: None,
            without_notes: false,
        };
        let missing: BTreeMap<ChunkHash, Vec<u8>> = chunks.iter().skip(1).map(|(h, d)| (*h, d.clone())).collect();
        assert!(matches!(
            build(&doc, &missing, &w.fleet_doc, &options, &w.tech, 1),
            Err(BuildError::OutputPending(n)) if n > 0
        ));
        // Bytes swapped between two signed references (same length) are caught by the hash.
        let mut file = share(&w, &(doc, chunks));
        let Output::Signed { chunks } = &mut file.transcript.commands[0].stdout else { panic!("not signed") };
        let (a, b) = (chunks[0].data.clone(), chunks[1].data.clone());
        (chunks[0].data, chunks[1].data) = (b, a);
        file.signature = hex::encode(w.tech.sign_detached(DOMAIN, &canonical(&file.transcript)));
        assert!(matches!(verify(&file.to_json()), Err(VerifyError::Record { .. })));
    }
}
