//! Recurring checks: a technician's signed standing request that the agent runs on its own
//! clock, for as long as its endpoint user's consent stands.
//!
//! A [`Schedule`] names one machine, one exact command, when it runs (`every`: an interval such
//! as `5s` or `7days`, or a cron expression), an end date and the why. The endpoint user reads
//! it once and answers with a [`ScheduleConsent`], written by the agent: *standing* (every run
//! goes ahead without asking) or *each run* (every run waits for a click). The consent binds the
//! schedule's [`Schedule::hash`], so a schedule changed in any way — command, timing, end date,
//! probes, the why — is a request nobody has agreed to. Each time a run is due the agent writes a
//! [`ScheduledRun`]; it reads, everywhere, as one more command of the session (its request made
//! from the schedule), with the usual start, output and end.
//!
//! The agent decides with its own clock and its own ledger. A peer can stop a schedule (a
//! technician's [`ScheduleCancel`]), never extend it: the end date is checked against the
//! agent's time, and a revocation ([`ScheduleRevoked`], recorded first in the agent's ledger)
//! holds whatever a later merge of the document shows.
//!
//! Everything here lives at the document's root under keys of its own (`schedule:<id>`,
//! `consent:<id>`, …), so records written at once by different peers never hide each other.

use std::collections::BTreeMap;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT, ReadDoc};
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::am;
use crate::fleet::{Fleet, Role};
use crate::id::{Id128, NodeId};
use crate::record::{RecordKind, Signer, verify_kind};
use crate::session::{CommandRequest, CommandSpec, Quarantined, SessionInfo, Verdict};
use crate::text::PeerText;

/// The shortest interval between runs: a schedule is for checks, not for load.
pub const MIN_INTERVAL_MS: u64 = 1000;
/// The most probe patterns one schedule carries.
pub const MAX_PROBES: usize = 16;
/// The longest probe pattern, in bytes.
pub const MAX_PROBE_PATTERN: usize = 1024;
/// How long a run in "each run" mode waits for the endpoint user, at most.
pub const MAX_RUN_WAIT_MS: u64 = 24 * 3600 * 1000;

const SCHEDULE_PREFIX: &str = "schedule:";
const CONSENT_PREFIX: &str = "consent:";
const CANCEL_PREFIX: &str = "cancel:";
const REVOKED_PREFIX: &str = "revoked:";
const RUN_PREFIX: &str = "run:";

/// When a schedule's runs fall due.
#[derive(Debug, Clone)]
pub enum Every {
    /// Every `ms` milliseconds from the moment of consent.
    Interval(u64),
    /// At the times a cron expression names, on the agent's own wall clock (5 fields, or 6
    /// with seconds first: `0 9 * * MON`, `*/5 * * * * *`).
    Cron(Box<croner::Cron>),
}

impl Every {
    /// Reads a schedule as typed: an interval (`5s`, `1h`, `7days`) or a cron expression.
    pub fn parse(spec: &str) -> Result<Every, String> {
        let spec = spec.trim();
        if let Ok(d) = humantime::parse_duration(spec) {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if ms < MIN_INTERVAL_MS {
                return Err(format!("runs at most once a second; {spec:?} is shorter"));
            }
            return Ok(Every::Interval(ms));
        }
        match spec.parse::<croner::Cron>() {
            Ok(cron) => Ok(Every::Cron(Box::new(cron))),
            Err(e) => Err(format!(
                "{spec:?} is neither an interval (\"5s\", \"1h\", \"7days\") nor a cron expression \
                 (\"0 9 * * MON\"): {e}"
            )),
        }
    }

    /// The first run time strictly after `after` (ms since the epoch). Intervals count from
    /// `anchor`; cron expressions are read in the time zone `tz`.
    pub fn next_after<Tz: TimeZone>(&self, anchor: u64, after: u64, tz: &Tz) -> Option<u64> {
        match self {
            Every::Interval(ms) => {
                if after < anchor {
                    return Some(anchor);
                }
                let k = (after - anchor) / ms + 1;
                anchor.checked_add(k.checked_mul(*ms)?)
            }
            Every::Cron(cron) => {
                let t = at(after)?.with_timezone(tz);
                let next = cron.find_next_occurrence(&t, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// The latest run time in `(after, upto]`, if any.
    pub fn latest_in<Tz: TimeZone>(&self, anchor: u64, after: u64, upto: u64, tz: &Tz) -> Option<u64> {
        let latest = match self {
            Every::Interval(ms) => {
                if upto < anchor {
                    return None;
                }
                anchor + (upto - anchor) / ms * ms
            }
            Every::Cron(cron) => {
                let t = at(upto)?.with_timezone(tz);
                let prev = cron.find_previous_occurrence(&t, true).ok()?;
                u64::try_from(prev.timestamp_millis()).ok()?
            }
        };
        (latest > after).then_some(latest)
    }

    /// How long after its time a run counts as late: half the gap to the next run, at most a
    /// minute.
    pub fn grace<Tz: TimeZone>(&self, anchor: u64, slot: u64, tz: &Tz) -> u64 {
        let gap = self.next_after(anchor, slot, tz).map_or(60_000, |next| next.saturating_sub(slot));
        (gap / 2).min(60_000)
    }
}

fn at(ms: u64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(ms).ok()?)
}

/// A run missed while the machine was off (or the agent stopped): run it once, late, at the
/// next chance — or skip it and wait for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    RunLate,
    Skip,
}

impl std::str::FromStr for Missed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "run-late" | "run" | "late" => Ok(Missed::RunLate),
            "skip" => Ok(Missed::Skip),
            other => Err(format!("unknown choice {other:?} for missed runs: use run-late or skip")),
        }
    }
}

/// A named number to pick out of a run's output with a pattern: the value is the pattern's
/// first capture group (`private_mb=private_mb=([0-9.]+)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbePattern {
    pub name: String,
    pub pattern: String,
}

impl ProbePattern {
    /// Reads `NAME=REGEX` as typed on a command line.
    pub fn parse(spec: &str) -> Result<ProbePattern, String> {
        let (name, pattern) = spec.split_once('=').ok_or_else(|| format!("probe {spec:?}: expected NAME=PATTERN"))?;
        let p = ProbePattern { name: name.trim().to_string(), pattern: pattern.to_string() };
        p.compile()?;
        Ok(p)
    }

    /// The pattern, compiled with a bounded size, checked to capture a value.
    pub fn compile(&self) -> Result<regex::Regex, String> {
        crate::probe::check_name(&self.name)?;
        if self.pattern.len() > MAX_PROBE_PATTERN {
            return Err(format!("probe {}: pattern longer than {MAX_PROBE_PATTERN} bytes", self.name));
        }
        let re = regex::RegexBuilder::new(&self.pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("probe {}: {e}", self.name))?;
        if re.captures_len() < 2 {
            return Err(format!("probe {}: the pattern needs a group, ( ), around the value", self.name));
        }
        Ok(re)
    }
}

/// A technician's standing request: run this command on this machine at these times until
/// this date. Never edited: a change is a new schedule that replaces this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub id: Id128,
    pub session: Id128,
    pub target: NodeId,
    pub command: CommandSpec,
    pub description: PeerText,
    /// As typed: an interval or a cron expression ([`Every::parse`]).
    pub every: String,
    /// No run starts after this (ms since the epoch, by the agent's clock).
    pub until: u64,
    pub missed: Missed,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbePattern>,
    pub requested_at: u64,
    /// The endpoint user's answer must come by then.
    pub expires_at: u64,
    /// The schedule this one takes the place of (cancelled with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<Id128>,
}

impl Schedule {
    /// Checks what a technician typed before it is signed: [`Schedule::check_shape`], and
    /// every probe pattern compiles.
    pub fn check(&self) -> Result<Every, String> {
        let every = self.check_shape()?;
        for p in &self.probes {
            p.compile()?;
        }
        Ok(every)
    }

    /// The checks every reader makes (cheap: no pattern is compiled): the timing reads, the end
    /// date is after the asking, probes are few, named and short. A schedule failing them is
    /// quarantined, never offered for consent.
    pub fn check_shape(&self) -> Result<Every, String> {
        let every = Every::parse(&self.every)?;
        if self.until <= self.requested_at {
            return Err("the end date is already past".into());
        }
        if self.probes.len() > MAX_PROBES {
            return Err(format!("at most {MAX_PROBES} probes"));
        }
        for p in &self.probes {
            crate::probe::check_name(&p.name)?;
            if p.pattern.len() > MAX_PROBE_PATTERN {
                return Err(format!("probe {}: pattern longer than {MAX_PROBE_PATTERN} bytes", p.name));
            }
        }
        Ok(every)
    }

    /// SHA-256 over everything the endpoint user agrees to: a length-prefixed encoding of
    /// every field, so a change anywhere is a different schedule.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(b"caisey/schedule/v1");
        field(&self.id.0);
        field(&self.session.0);
        field(&self.target.0);
        field(&self.command.hash());
        field(self.description.as_unescaped_str().as_bytes());
        field(self.every.as_bytes());
        field(&self.until.to_be_bytes());
        field(match self.missed {
            Missed::RunLate => b"run-late",
            Missed::Skip => b"skip",
        });
        field(&(self.probes.len() as u64).to_be_bytes());
        for p in &self.probes {
            field(p.name.as_bytes());
            field(p.pattern.as_bytes());
        }
        field(&self.requested_at.to_be_bytes());
        field(&self.expires_at.to_be_bytes());
        field(&self.replaces.map(|r| r.0).unwrap_or_default());
        h.finalize().into()
    }

    /// The code the endpoint user consents by: it names this schedule exactly as shown.
    pub fn consent_code(&self) -> Id128 {
        let mut h = Sha256::new();
        h.update(b"caisey/consent-code/v1");
        h.update(self.hash());
        Id128(first16(&h.finalize()))
    }

    /// The id of the run due at `slot`: the same on every node, so a run is never written twice.
    pub fn run_id(&self, slot: u64) -> Id128 {
        let mut h = Sha256::new();
        h.update(b"caisey/scheduled-run/v1");
        h.update(self.id.0);
        h.update(slot.to_be_bytes());
        Id128(first16(&h.finalize()))
    }

    /// The command request a run reads as: this schedule's command, asked at `run.slot_at`.
    pub fn run_request(&self, run: &ScheduledRun) -> CommandRequest {
        CommandRequest {
            id: run.id,
            session: self.session,
            target: self.target,
            command: self.command.clone(),
            description: self.description.clone(),
            requested_at: run.slot_at,
            expires_at: run.expires_at,
        }
    }
}

fn first16(digest: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The endpoint user's answer to a schedule, written by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleConsent {
    pub schedule: Id128,
    pub session: Id128,
    pub target: NodeId,
    #[serde(with = "crate::session::hex32")]
    pub schedule_hash: [u8; 32],
    /// Approved (standing, or each run), denied, or expired unanswered.
    pub verdict: Verdict,
    /// Approved to be asked again at every run, rather than once for all.
    pub each_run: bool,
    pub decided_by: String,
    pub decided_at: u64,
    /// Names this consent in the start of each run it allows.
    pub nonce: Id128,
}

/// A technician stops a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleCancel {
    pub schedule: Id128,
    pub session: Id128,
    pub at: u64,
}

/// The endpoint user took their consent back; written by the agent after its own ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRevoked {
    pub schedule: Id128,
    pub session: Id128,
    pub at: u64,
    pub by: String,
}

/// A run of a schedule, written by the agent when it fell due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledRun {
    /// [`Schedule::run_id`] of `slot_at`.
    pub id: Id128,
    pub schedule: Id128,
    pub session: Id128,
    /// When it was due.
    pub slot_at: u64,
    /// Run after its time (the machine was off, or the agent stopped).
    pub late: bool,
    /// In "each run" mode, the endpoint user's answer must come by then.
    pub expires_at: u64,
}

/// Where a schedule stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleState {
    /// Waiting for the endpoint user's answer.
    AwaitingConsent,
    /// Runs on its own.
    Standing,
    /// Each run waits for the endpoint user.
    EachRun,
    Denied,
    /// Nobody answered in time.
    Unanswered,
    /// The schedule was changed after consent (a record rewritten): nobody agreed to it.
    Changed,
    Revoked,
    Cancelled,
    /// Past its end date.
    Ended,
}

impl ScheduleState {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleState::AwaitingConsent => "awaiting consent",
            ScheduleState::Standing => "standing consent",
            ScheduleState::EachRun => "asks at each run",
            ScheduleState::Denied => "denied",
            ScheduleState::Unanswered => "unanswered",
            ScheduleState::Changed => "changed since consent",
            ScheduleState::Revoked => "revoked",
            ScheduleState::Cancelled => "cancelled",
            ScheduleState::Ended => "ended",
        }
    }

    /// Runs may still happen.
    pub fn is_live(self) -> bool {
        matches!(self, ScheduleState::AwaitingConsent | ScheduleState::Standing | ScheduleState::EachRun)
    }
}

/// A schedule as read, with everything said about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleView {
    pub schedule: Schedule,
    pub author: NodeId,
    pub consent: Option<ScheduleConsent>,
    pub cancelled: Option<ScheduleCancel>,
    pub revoked: Option<ScheduleRevoked>,
    /// Its runs, by due time.
    pub runs: Vec<ScheduledRun>,
}

impl ScheduleView {
    /// The consent, if it agrees to this schedule exactly as it reads now.
    pub fn valid_consent(&self) -> Option<&ScheduleConsent> {
        self.consent.as_ref().filter(|c| c.verdict == Verdict::Approved && c.schedule_hash == self.schedule.hash())
    }

    /// Where it stands at `now`.
    pub fn state(&self, now: u64) -> ScheduleState {
        if self.revoked.is_some() {
            return ScheduleState::Revoked;
        }
        if self.cancelled.is_some() {
            return ScheduleState::Cancelled;
        }
        match &self.consent {
            None if now > self.schedule.expires_at => ScheduleState::Unanswered,
            None if now > self.schedule.until => ScheduleState::Ended,
            None => ScheduleState::AwaitingConsent,
            Some(c) if c.schedule_hash != self.schedule.hash() => ScheduleState::Changed,
            Some(c) => match c.verdict {
                Verdict::Denied => ScheduleState::Denied,
                Verdict::Expired => ScheduleState::Unanswered,
                Verdict::Approved if now > self.schedule.until => ScheduleState::Ended,
                Verdict::Approved if c.each_run => ScheduleState::EachRun,
                Verdict::Approved => ScheduleState::Standing,
            },
        }
    }

    /// When the next run falls due after `after`, if one will (in the time zone `tz`).
    pub fn next_run<Tz: TimeZone>(&self, after: u64, tz: &Tz) -> Option<u64> {
        let consent = self.valid_consent()?;
        let every = Every::parse(&self.schedule.every).ok()?;
        let last = self.runs.iter().map(|r| r.slot_at).max().unwrap_or(consent.decided_at);
        every.next_after(consent.decided_at, last.max(after), tz).filter(|t| *t <= self.schedule.until)
    }
}

/// Writes schedule records into a session document. Each call is one Automerge change.
#[derive(Debug)]
pub struct ScheduleWriter;

impl ScheduleWriter {
    /// A technician's schedule, and its machine as a target of the session.
    pub fn schedule(doc: &mut Automerge, signer: &Signer, s: &Schedule) -> Result<(), automerge::AutomergeError> {
        let target = crate::session::Target { session: s.session, node: s.target, at: s.requested_at };
        let target_rec = signer.sign(RecordKind::Target, &target);
        let rec = signer.sign(RecordKind::Schedule, s);
        let cancel = s.replaces.map(|old| {
            signer.sign(
                RecordKind::ScheduleCancel,
                &ScheduleCancel { schedule: old, session: s.session, at: s.requested_at },
            )
        });
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            let targets = am::ensure_root_map(tx, "targets")?;
            if am::bytes_at(tx, &targets, &s.target.to_hex()).is_none() {
                tx.put(&targets, s.target.to_hex(), target_rec)?;
            }
            tx.put(ROOT, format!("{SCHEDULE_PREFIX}{}", s.id.to_hex()), rec)?;
            if let (Some(old), Some(cancel)) = (s.replaces, cancel) {
                tx.put(ROOT, format!("{CANCEL_PREFIX}{}", old.to_hex()), cancel)?;
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    pub fn cancel(doc: &mut Automerge, signer: &Signer, c: &ScheduleCancel) -> Result<(), automerge::AutomergeError> {
        put_root(doc, format!("{CANCEL_PREFIX}{}", c.schedule.to_hex()), signer.sign(RecordKind::ScheduleCancel, c))
    }

    pub fn consent(doc: &mut Automerge, signer: &Signer, c: &ScheduleConsent) -> Result<(), automerge::AutomergeError> {
        put_root(doc, format!("{CONSENT_PREFIX}{}", c.schedule.to_hex()), signer.sign(RecordKind::ScheduleConsent, c))
    }

    pub fn revoked(doc: &mut Automerge, signer: &Signer, r: &ScheduleRevoked) -> Result<(), automerge::AutomergeError> {
        put_root(doc, format!("{REVOKED_PREFIX}{}", r.schedule.to_hex()), signer.sign(RecordKind::ScheduleRevoked, r))
    }

    /// A run fell due; with `start`, it starts in the same change (standing consent).
    pub fn run(
        doc: &mut Automerge,
        signer: &Signer,
        run: &ScheduledRun,
        start: Option<&crate::session::Start>,
    ) -> Result<(), automerge::AutomergeError> {
        let rec = signer.sign(RecordKind::ScheduledRun, run);
        let start_rec = start.map(|s| signer.sign(RecordKind::Start, s));
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, format!("{RUN_PREFIX}{}", run.id.to_hex()), rec)?;
            if let Some(start_rec) = start_rec {
                crate::session::SessionWriter::put_start(tx, run.id, start_rec)?;
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }
}

/// The stored bytes of a schedule record: `what` is `schedule`, `consent`, `cancel`, `revoked`
/// or `run`, keyed by the schedule's (or the run's) id.
pub fn raw_record(doc: &impl ReadDoc, what: &str, id: &Id128) -> Option<Vec<u8>> {
    let prefix = match what {
        "schedule" => SCHEDULE_PREFIX,
        "consent" => CONSENT_PREFIX,
        "cancel" => CANCEL_PREFIX,
        "revoked" => REVOKED_PREFIX,
        "run" => RUN_PREFIX,
        _ => return None,
    };
    am::bytes_at(doc, &ROOT, &format!("{prefix}{}", id.to_hex()))
}

fn put_root(doc: &mut Automerge, key: String, rec: Vec<u8>) -> Result<(), automerge::AutomergeError> {
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(ROOT, key, rec)?;
        Ok(())
    })
    .map_err(|f| f.error)?;
    Ok(())
}

/// Every record under `prefix` at the root that verifies as `kind`, by the id in its key;
/// the rest quarantined.
fn read_prefixed<T: serde::de::DeserializeOwned>(
    doc: &impl ReadDoc,
    prefix: &str,
    kind: RecordKind,
    q: &mut Vec<Quarantined>,
) -> BTreeMap<Id128, (NodeId, T)> {
    let mut out = BTreeMap::new();
    for (key, bytes) in am::prefixed_byte_entries(doc, &ROOT, prefix) {
        let Some(id) = key.strip_prefix(prefix) else { continue };
        let parsed = id.parse::<Id128>().map_err(|e| e.to_string()).and_then(|id| {
            let v = verify_kind(&bytes, kind).map_err(|e| e.to_string())?;
            Ok((id, v.author, v.json::<T>().map_err(|e| e.to_string())?))
        });
        match parsed {
            Ok((id, author, body)) => {
                out.insert(id, (author, body));
            }
            Err(why) => q.push(Quarantined { place: key, author: None, why }),
        }
    }
    out
}

/// Reads every schedule of session `info`, with what its agent and technicians said of it.
/// A schedule must be a technician's for a target of the session; consents, revocations and
/// runs must be its target agent's; cancellations a technician's. Anything else is quarantined.
pub(crate) fn read_schedules(
    doc: &impl ReadDoc,
    fleet: &Fleet,
    info: &SessionInfo,
    targets: &[NodeId],
    q: &mut Vec<Quarantined>,
) -> Vec<ScheduleView> {
    let schedules = read_prefixed::<Schedule>(doc, SCHEDULE_PREFIX, RecordKind::Schedule, q);
    if schedules.is_empty() {
        return vec![];
    }
    let mut consents = read_prefixed::<ScheduleConsent>(doc, CONSENT_PREFIX, RecordKind::ScheduleConsent, q);
    let mut cancels = read_prefixed::<ScheduleCancel>(doc, CANCEL_PREFIX, RecordKind::ScheduleCancel, q);
    let mut revoked = read_prefixed::<ScheduleRevoked>(doc, REVOKED_PREFIX, RecordKind::ScheduleRevoked, q);
    let runs = read_prefixed::<ScheduledRun>(doc, RUN_PREFIX, RecordKind::ScheduledRun, q);
    let mut out = Vec::new();
    for (id, (author, s)) in schedules {
        let place = format!("{SCHEDULE_PREFIX}{}", id.to_hex());
        let why = if fleet.role_of(&author) != Some(Role::Technician) {
            Some("schedule not written by a technician".to_string())
        } else if s.id != id || s.session != info.id {
            Some("schedule stored under another id or for another session".to_string())
        } else if !targets.contains(&s.target) {
            Some("schedule for a machine the session is not shared with".to_string())
        } else {
            s.check_shape().err()
        };
        if let Some(why) = why {
            q.push(Quarantined { place, author: Some(author), why });
            continue;
        }
        let mut by = |place: String, ok: bool, who: &str| {
            if !ok {
                q.push(Quarantined {
                    place,
                    author: None,
                    why: format!("not written by {who}, or for another schedule"),
                });
            }
            ok
        };
        let consent = consents.remove(&id).and_then(|(a, c)| {
            let ok = a == s.target && c.schedule == id && c.session == info.id && c.target == s.target;
            by(format!("{CONSENT_PREFIX}{id}"), ok, "the target agent").then_some(c)
        });
        let revoked = revoked.remove(&id).and_then(|(a, r)| {
            let ok = a == s.target && r.schedule == id && r.session == info.id;
            by(format!("{REVOKED_PREFIX}{id}"), ok, "the target agent").then_some(r)
        });
        let cancelled = cancels.remove(&id).and_then(|(a, c)| {
            let ok = fleet.role_of(&a) == Some(Role::Technician) && c.schedule == id && c.session == info.id;
            by(format!("{CANCEL_PREFIX}{id}"), ok, "a technician").then_some(c)
        });
        let mut mine: Vec<ScheduledRun> = runs
            .iter()
            .filter(|(_, (_, r))| r.schedule == id)
            .filter_map(|(run_id, (a, r))| {
                let ok = *a == s.target && r.id == *run_id && s.run_id(r.slot_at) == r.id && r.session == info.id;
                by(format!("{RUN_PREFIX}{run_id}"), ok, "the target agent").then(|| r.clone())
            })
            .collect();
        mine.sort_by_key(|r| r.slot_at);
        out.push(ScheduleView { schedule: s, author, consent, cancelled, revoked, runs: mine });
    }
    out.sort_by_key(|v| (v.schedule.requested_at, v.schedule.id));
    out
}

/// The duration a schedule's interval spec names, for showing ("every 5s").
pub fn describe(every: &str) -> String {
    match Every::parse(every) {
        Ok(Every::Interval(ms)) => format!("every {}", humantime::format_duration(Duration::from_millis(ms))),
        Ok(Every::Cron(c)) => format!("cron {:?} ({})", c.pattern.to_string(), c.describe()),
        Err(_) => format!("{every:?} (unreadable)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Membership, Role};
    use crate::session::{CommandSpec, SessionView, SessionWriter, Shell};

    #[test]
    fn schedules_read_only_as_their_authors_may_write_them() {
        let org = Signer::from_secret([1; 32]);
        let tech = Signer::from_secret([2; 32]);
        let agent = Signer::from_secret([3; 32]);
        let mut fleet_doc = Fleet::create("Acme", &org, &tech, "alice", Id128([0; 16]), 0).unwrap();
        let m = Membership {
            approves: vec![],
            node: agent.node_id(),
            role: Role::Agent,
            name: "ws".into(),
            groups: vec![],
            at: 0,
            invite: None,
        };
        Fleet::put_member(&mut fleet_doc, &org.sign(RecordKind::Membership, &m), &agent.node_id()).unwrap();
        let fleet = Fleet::read(&fleet_doc).unwrap();
        let info =
            SessionInfo { id: Id128([1; 16]), name: "s".into(), labels: vec![], created_at: 0, org_key: org.node_id() };
        let mut doc = SessionWriter::create(&tech, &info).unwrap();
        let good = Schedule {
            id: Id128([5; 16]),
            session: info.id,
            target: agent.node_id(),
            command: CommandSpec {
                shell: Shell::Sh,
                script: "true".into(),
                cwd: None,
                env: Default::default(),
                timeout_ms: 1000,
                collect: None,
            },
            description: "why".into(),
            every: "7days".into(),
            until: 1_000_000,
            missed: Missed::RunLate,
            probes: vec![],
            requested_at: 0,
            expires_at: 1000,
            replaces: None,
        };
        ScheduleWriter::schedule(&mut doc, &tech, &good).unwrap();
        // Timing nobody can read, and an agent posing as a technician: quarantined.
        let unreadable = Schedule { id: Id128([6; 16]), every: "whenever".into(), ..good.clone() };
        ScheduleWriter::schedule(&mut doc, &tech, &unreadable).unwrap();
        let by_agent = Schedule { id: Id128([7; 16]), ..good.clone() };
        ScheduleWriter::schedule(&mut doc, &agent, &by_agent).unwrap();
        // A consent written by the technician for the agent: quarantined.
        let consent = ScheduleConsent {
            schedule: good.id,
            session: info.id,
            target: agent.node_id(),
            schedule_hash: good.hash(),
            verdict: Verdict::Approved,
            each_run: false,
            decided_by: "someone".into(),
            decided_at: 10,
            nonce: Id128([9; 16]),
        };
        ScheduleWriter::consent(&mut doc, &tech, &consent).unwrap();
        let view = SessionView::read_without_output(&doc, &fleet).unwrap();
        assert_eq!(view.schedules.len(), 1);
        assert_eq!(view.schedules[0].state(100), ScheduleState::AwaitingConsent, "the forged consent is not believed");
        assert_eq!(view.quarantined.len(), 3, "{:?}", view.quarantined);
        // The agent's own consent is; a cron expression reads too.
        ScheduleWriter::consent(&mut doc, &agent, &consent).unwrap();
        let view = SessionView::read_without_output(&doc, &fleet).unwrap();
        assert_eq!(view.schedules[0].state(100), ScheduleState::Standing);
        assert!(matches!(Every::parse("0 9 * * MON"), Ok(Every::Cron(_))));
        assert!(Every::parse("500ms").unwrap_err().contains("at most once a second"));
    }
}
