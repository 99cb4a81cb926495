//! The agent's rules for recurring checks (`caisey_doc::schedule`), as pure functions the
//! [`crate::gate::Gate`] calls: when a run is due, when to look again, and — at the moment of
//! writing — whether a run may start.
//!
//! Everything is decided by this machine's clock and ledger:
//! - A schedule runs only under its endpoint user's consent to it exactly as it reads now.
//! - A run falls due at each time the schedule names after the consent, up to its end date.
//!   One run at a time: the next waits for the last to end.
//! - A run missed (the machine was off) runs once at the next chance, marked late — or, if the
//!   schedule says so, is skipped.
//! - A revocation (in the ledger) or a cancellation stops it at once; runs still waiting for
//!   the user are recorded as not run.

use std::collections::BTreeSet;

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::schedule::{
    Every, MAX_RUN_WAIT_MS, Missed, ProbePattern, ScheduleState, ScheduleView, ScheduledRun,
};
use caisey_doc::session::{CommandRequest, SessionView, Start, Verdict};
use caisey_peer::store::{LedgerKey, LedgerRecord, Outcome};

use crate::gate::{Action, Pending};

/// The time zone cron expressions are read in: this machine's.
pub type Zone = chrono::Local;

/// A run that is due now, if any, for a schedule with standing or each-run consent.
fn due(s: &ScheduleView, now: u64, tz: &Zone) -> Option<(u64, bool)> {
    let consent = s.valid_consent()?;
    let every = Every::parse(&s.schedule.every).ok()?;
    let anchor = consent.decided_at;
    let after = s.runs.iter().map(|r| r.slot_at).max().unwrap_or(anchor);
    let slot = every.latest_in(anchor, after, now.min(s.schedule.until), tz)?;
    let late = now > slot + every.grace(anchor, slot, tz);
    (!late || s.schedule.missed == Missed::RunLate).then_some((slot, late))
}

/// When to look at schedule `s` again after `reviewed_at`: its next run, or its answer's
/// deadline.
pub(crate) fn wake_at(s: &ScheduleView, reviewed_at: u64, tz: &Zone) -> Option<u64> {
    match s.state(reviewed_at) {
        ScheduleState::AwaitingConsent if s.consent.is_none() => Some(s.schedule.expires_at.saturating_add(1)),
        ScheduleState::Standing | ScheduleState::EachRun => {
            let consent = s.valid_consent()?;
            let every = Every::parse(&s.schedule.every).ok()?;
            let last = s.runs.iter().map(|r| r.slot_at).max().unwrap_or(consent.decided_at);
            every.next_after(consent.decided_at, last.max(reviewed_at), tz).filter(|t| *t <= s.schedule.until)
        }
        _ => None,
    }
}

/// What session `doc`'s schedules for machine `me` ask for now: consents waiting for the
/// user, consents unanswered past their deadline, runs due.
pub(crate) fn review(
    me: NodeId,
    doc: DocId,
    view: &SessionView,
    running: &BTreeSet<Id128>,
    revoked: &BTreeSet<Id128>,
    now: u64,
    tz: &Zone,
) -> (Vec<Pending>, Vec<Action>) {
    let mut pending = Vec::new();
    let mut actions = Vec::new();
    for s in view.schedules.iter().filter(|s| s.schedule.target == me && !revoked.contains(&s.schedule.id)) {
        let id = s.schedule.id;
        match s.state(now) {
            ScheduleState::AwaitingConsent => pending.push(Pending {
                code: s.schedule.consent_code(),
                id,
                session: doc,
                session_name: view.info.name.clone(),
                requester: s.author,
                request: consent_request(s),
                schedule: Some(s.schedule.clone()),
            }),
            ScheduleState::Unanswered if s.consent.is_none() => actions.push(Action::Consent {
                session: doc,
                schedule: id,
                verdict: Verdict::Expired,
                each_run: false,
                decided_by: "nobody (the schedule was not answered in time)".into(),
            }),
            ScheduleState::Standing | ScheduleState::EachRun => {
                // One run at a time.
                if s.runs.iter().any(|r| running.contains(&r.id)) {
                    continue;
                }
                if let Some((slot, late)) = due(s, now, tz) {
                    actions.push(Action::Run { session: doc, schedule: id, slot, late });
                }
            }
            _ => {}
        }
    }
    (pending, actions)
}

/// A run whose schedule no longer runs (revoked, cancelled, ended) and that nobody approved
/// yet: it will never run, and is recorded so.
pub(crate) fn stopped(view: &SessionView, schedule: Id128, revoked: &BTreeSet<Id128>, now: u64) -> Option<String> {
    if revoked.contains(&schedule) {
        return Some("its schedule's consent was revoked".into());
    }
    let s = view.schedules.iter().find(|s| s.schedule.id == schedule)?;
    let state = s.state(now);
    (!state.is_live() && state != ScheduleState::Ended).then(|| format!("its schedule is {}", state.as_str()))
}

/// The schedule as a request, for showing it to the endpoint user (id: the schedule's).
pub(crate) fn consent_request(s: &ScheduleView) -> CommandRequest {
    CommandRequest {
        id: s.schedule.id,
        session: s.schedule.session,
        target: s.schedule.target,
        command: s.schedule.command.clone(),
        description: s.schedule.description.clone(),
        requested_at: s.schedule.requested_at,
        expires_at: s.schedule.expires_at,
    }
}

/// What writing a due run puts down, in one durable change: the run, and under standing
/// consent its start, with the run recorded as started in the ledger.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub run: ScheduledRun,
    /// `Some`: it starts now (standing consent). `None`: it waits for the user.
    pub start: Option<(Start, CommandRequest, Vec<ProbePattern>)>,
    pub ledger: Vec<(LedgerKey, LedgerRecord)>,
}

/// Whether the run of `schedule` due at `slot` may be written now, checked against the session
/// as it stands at the moment of writing and this agent's ledger: the one place a scheduled run
/// is allowed.
pub fn check_run(
    view: &SessionView,
    schedule: Id128,
    slot: u64,
    late: bool,
    me: NodeId,
    now: u64,
    tz: &Zone,
    ledger: impl Fn(&LedgerKey) -> Option<LedgerRecord>,
) -> Result<RunPlan, String> {
    let s = view
        .schedules
        .iter()
        .find(|s| s.schedule.id == schedule && s.schedule.target == me)
        .ok_or_else(|| format!("schedule {} is not valid for this machine", schedule.short()))?;
    if ledger(&LedgerKey::Schedule(schedule)).is_some() {
        return Err(format!("schedule {} was revoked on this machine", schedule.short()));
    }
    let state = s.state(now);
    if !matches!(state, ScheduleState::Standing | ScheduleState::EachRun) {
        return Err(format!("schedule {} is {}", schedule.short(), state.as_str()));
    }
    let consent = s.valid_consent().ok_or_else(|| "no consent to this schedule".to_string())?;
    if slot > s.schedule.until || now > s.schedule.until {
        return Err(format!("schedule {} ended", schedule.short()));
    }
    let id = s.schedule.run_id(slot);
    if s.runs.iter().any(|r| r.slot_at >= slot) || ledger(&LedgerKey::Request(id)).is_some() {
        return Err(format!("the run due at {slot} was already written"));
    }
    let every = Every::parse(&s.schedule.every)?;
    let next = every.next_after(consent.decided_at, slot, tz).unwrap_or(u64::MAX);
    let expires_at = if consent.each_run { next.min(slot.saturating_add(MAX_RUN_WAIT_MS)) } else { s.schedule.until };
    let run = ScheduledRun { id, schedule, session: view.info.id, slot_at: slot, late, expires_at };
    if consent.each_run {
        return Ok(RunPlan { run, start: None, ledger: vec![] });
    }
    let start = Start { request: id, session: view.info.id, started_at: now, approved_by: me, nonce: consent.nonce };
    let request = s.schedule.run_request(&run);
    let ledger = vec![(LedgerKey::Request(id), LedgerRecord { outcome: Outcome::Started, at: now })];
    Ok(RunPlan { run, start: Some((start, request, s.schedule.probes.clone())), ledger })
}
