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
    Every, MAX_RUN_WAIT_MS, Missed, ProbePattern, ScheduleConsent, ScheduleState, ScheduleView, ScheduledRun,
};
use caisey_doc::session::{CommandRequest, SessionView, Start, Verdict};
use caisey_peer::store::{LedgerKey, LedgerRecord, Outcome};

use crate::gate::{Action, Pending};

/// The time zone cron expressions are read in: this machine's.
pub type Zone = chrono::Local;

/// A run that is due now, if any, for a schedule with standing or each-run consent: the latest
/// time it names, and whether that run is late (it stands in for runs missed before it, or
/// its own time is past). Under "skip", missed runs are dropped and only a run on time goes.
fn due(s: &ScheduleView, now: u64, tz: &Zone) -> Option<(u64, bool)> {
    let consent = s.valid_consent()?;
    let every = Every::parse(&s.schedule.every).ok()?;
    let anchor = consent.decided_at;
    let after = s.runs.iter().map(|r| r.slot_at).max().unwrap_or(anchor);
    let slot = every.latest_in(anchor, after, now.min(s.schedule.until), tz)?;
    let overdue = now > slot + every.grace(anchor, slot, tz);
    let missed_before = every.latest_in(anchor, after, slot - 1, tz).is_some();
    match s.schedule.missed {
        Missed::RunLate => Some((slot, overdue || missed_before)),
        Missed::Skip => (!overdue).then_some((slot, false)),
    }
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
                answer: Answer {
                    schedule: id,
                    verdict: Verdict::Expired,
                    each_run: false,
                    decided_by: "nobody (the schedule was not answered in time)".into(),
                },
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

/// The endpoint user's answer to a schedule, or that nobody answered in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub schedule: Id128,
    pub verdict: Verdict,
    /// Approved to be asked again at each run.
    pub each_run: bool,
    /// Who answered, in words ("local user on ws-01").
    pub decided_by: String,
}

/// The consent record for `answer`, to write as the session stands at the moment of writing:
/// bound to the schedule exactly as it reads then. Refused if it was answered already, or — to
/// approve — if it waited past its deadline.
pub fn consent_record(
    view: &SessionView,
    answer: Answer,
    me: NodeId,
    now: u64,
    nonce: Id128,
) -> Result<ScheduleConsent, String> {
    let id = answer.schedule;
    let s = view
        .schedules
        .iter()
        .find(|s| s.schedule.id == id && s.schedule.target == me)
        .ok_or_else(|| format!("schedule {} is no longer valid", id.short()))?;
    if s.consent.is_some() {
        return Err(format!("schedule {} was already answered", id.short()));
    }
    if answer.verdict == Verdict::Approved && now > s.schedule.expires_at {
        return Err(format!("schedule {} waited too long for an answer; ask for it again", id.short()));
    }
    Ok(ScheduleConsent {
        schedule: id,
        session: view.info.id,
        target: me,
        schedule_hash: s.schedule.hash(),
        verdict: answer.verdict,
        each_run: answer.each_run,
        decided_by: answer.decided_by,
        decided_at: now,
        nonce,
    })
}

/// A run of `schedule` due at `slot` (late: after its time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub schedule: Id128,
    pub slot: u64,
    pub late: bool,
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
    Due { schedule, slot, late }: Due,
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

#[cfg(test)]
mod tests {
    use super::*;
    use caisey_doc::fleet::{Fleet, Membership, Role};
    use caisey_doc::record::{RecordKind, Signer};
    use caisey_doc::schedule::{Schedule, ScheduleCancel, ScheduleConsent, ScheduleWriter};
    use caisey_doc::session::{CommandSpec, SessionInfo, SessionWriter, Shell};

    const S: u64 = 1000;

    struct World {
        tech: Signer,
        agent: Signer,
        fleet: Fleet,
        doc: caisey_doc::automerge::Automerge,
        schedule: Schedule,
    }

    /// A session with one schedule every 5 s from t=0 to t=60 s, consented at t=10 s.
    fn world(missed: Missed, each_run: bool) -> World {
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
        let info =
            SessionInfo { id: Id128([1; 16]), name: "s".into(), labels: vec![], created_at: 0, org_key: org.node_id() };
        let mut doc = SessionWriter::create(&tech, &info).unwrap();
        let schedule = Schedule {
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
            description: "memory".into(),
            every: "5s".into(),
            until: 60 * S,
            missed,
            probes: vec![],
            requested_at: 0,
            expires_at: 30 * S,
            replaces: None,
        };
        ScheduleWriter::schedule(&mut doc, &tech, &schedule).unwrap();
        let consent = ScheduleConsent {
            schedule: schedule.id,
            session: info.id,
            target: agent.node_id(),
            schedule_hash: schedule.hash(),
            verdict: Verdict::Approved,
            each_run,
            decided_by: "local user".into(),
            decided_at: 10 * S,
            nonce: Id128([7; 16]),
        };
        ScheduleWriter::consent(&mut doc, &agent, &consent).unwrap();
        World { fleet: Fleet::read(&fleet_doc).unwrap(), tech, agent, doc, schedule }
    }

    impl World {
        fn view(&self) -> SessionView {
            SessionView::read_without_output(&self.doc, &self.fleet).unwrap()
        }
        fn review(&self, revoked: &BTreeSet<Id128>, now: u64) -> Vec<Action> {
            review(self.agent.node_id(), Id128([1; 16]), &self.view(), &BTreeSet::new(), revoked, now, &chrono::Local).1
        }
        fn write_run(&mut self, slot: u64, now: u64) -> RunPlan {
            let plan = check_run(
                &self.view(),
                Due { schedule: self.schedule.id, slot, late: false },
                self.agent.node_id(),
                now,
                &chrono::Local,
                |_| None,
            )
            .unwrap();
            ScheduleWriter::run(&mut self.doc, &self.agent, &plan.run, plan.start.as_ref().map(|(s, _, _)| s)).unwrap();
            plan
        }
    }

    fn due_slots(actions: &[Action]) -> Vec<(u64, bool)> {
        actions
            .iter()
            .filter_map(|a| if let Action::Run { slot, late, .. } = a { Some((*slot, *late)) } else { None })
            .collect()
    }

    #[test]
    fn runs_fall_due_after_consent_and_each_is_written_once() {
        let mut w = world(Missed::RunLate, false);
        let none = BTreeSet::new();
        assert!(due_slots(&w.review(&none, 14 * S)).is_empty(), "nothing before the first slot");
        assert_eq!(due_slots(&w.review(&none, 15 * S + 10)), [(15 * S, false)]);
        let plan = w.write_run(15 * S, 15 * S + 10);
        assert!(plan.start.is_some(), "standing consent starts it in the same change");
        let view = w.view();
        let run = view.command(&plan.run.id).expect("the run reads as a command");
        assert_eq!(run.status(), "running");
        assert_eq!(run.schedule, Some(w.schedule.id));
        // Written once: the same slot again is refused.
        let again = check_run(
            &view,
            Due { schedule: w.schedule.id, slot: 15 * S, late: false },
            w.agent.node_id(),
            16 * S,
            &chrono::Local,
            |_| None,
        );
        assert!(again.is_err());
        // Woken at the next slot, never before.
        let s = &view.schedules[0];
        assert_eq!(wake_at(s, 15 * S + 10, &chrono::Local), Some(20 * S));
    }

    #[test]
    fn a_missed_run_runs_once_late_or_is_skipped() {
        let none = BTreeSet::new();
        let w = world(Missed::RunLate, false);
        // Off from 12 s to 33 s: slots 15, 20, 25, 30 missed; one run, for the latest, late.
        assert_eq!(due_slots(&w.review(&none, 33 * S)), [(30 * S, true)]);
        // Back just after a slot: that run is on time, but stands in for those missed.
        assert_eq!(due_slots(&w.review(&none, 31 * S)), [(30 * S, true)]);
        let w = world(Missed::Skip, false);
        assert!(due_slots(&w.review(&none, 33 * S)).is_empty());
        assert_eq!(due_slots(&w.review(&none, 31 * S)), [(30 * S, false)], "a run on time goes");
        assert_eq!(wake_at(&w.view().schedules[0], 33 * S, &chrono::Local), Some(35 * S));
    }

    #[test]
    fn revoked_cancelled_ended_or_changed_schedules_never_run() {
        let mut w = world(Missed::RunLate, false);
        let id = w.schedule.id;
        assert!(due_slots(&w.review(&BTreeSet::from([id]), 15 * S)).is_empty(), "revoked");
        let ledger_says_revoked = |k: &LedgerKey| {
            (*k == LedgerKey::Schedule(id)).then_some(LedgerRecord { outcome: Outcome::Revoked, at: 0 })
        };
        let refused = check_run(
            &w.view(),
            Due { schedule: id, slot: 15 * S, late: false },
            w.agent.node_id(),
            15 * S,
            &chrono::Local,
            ledger_says_revoked,
        );
        assert!(refused.unwrap_err().contains("revoked"));
        assert!(due_slots(&w.review(&BTreeSet::new(), 61 * S)).is_empty(), "past its end date");
        // The schedule rewritten in place (another command): the consent no longer covers it.
        let mut changed = w.schedule.clone();
        changed.command.script = "rm -rf /".into();
        ScheduleWriter::schedule(&mut w.doc, &w.tech, &changed).unwrap();
        assert_eq!(w.view().schedules[0].state(15 * S), caisey_doc::schedule::ScheduleState::Changed);
        assert!(due_slots(&w.review(&BTreeSet::new(), 15 * S)).is_empty());
        let mut w = world(Missed::RunLate, false);
        let cancel = ScheduleCancel { schedule: id, session: w.schedule.session, at: 12 * S };
        ScheduleWriter::cancel(&mut w.doc, &w.tech, &cancel).unwrap();
        assert!(due_slots(&w.review(&BTreeSet::new(), 15 * S)).is_empty(), "cancelled");
    }

    #[test]
    fn in_each_run_mode_a_run_waits_for_the_user_and_is_not_run_once_revoked() {
        let mut w = world(Missed::RunLate, true);
        let plan = w.write_run(15 * S, 15 * S);
        assert!(plan.start.is_none());
        assert_eq!(plan.run.expires_at, 20 * S, "it waits until the next run at most");
        let mut gate = crate::gate::Gate::new(w.agent.node_id());
        gate.session(Id128([1; 16]), Some(w.view()), 16 * S);
        assert!(gate.pending().iter().any(|p| p.id == plan.run.id && p.schedule.is_none()), "asked like any request");
        // Revoked: the waiting run is recorded as not run.
        let actions = gate.revoke(w.schedule.id, 16 * S);
        assert!(actions.iter().any(|a| matches!(a, Action::NotRun { request, .. } if *request == plan.run.id)));
        assert!(gate.pending().is_empty());
        assert_eq!(
            stopped(&w.view(), w.schedule.id, &BTreeSet::from([w.schedule.id]), 16 * S).as_deref(),
            Some("its schedule's consent was revoked")
        );
    }
}
