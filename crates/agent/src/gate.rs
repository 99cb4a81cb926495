//! The agent's decisions, as a sans-IO state machine: [`Gate`].
//!
//! It holds the sessions that target this agent (read without output), the commands this
//! process started and runs, and what it asked its driver to write; it takes events — a
//! session changed, the local user decided, a start was written or refused, a command ended —
//! each with the time, and returns [`Action`]s for the driver (`daemon.rs`) to carry out and
//! report back. It owns no clock, socket or file, so every rule below is a deterministic unit
//! test, and the simulation crate runs many agents in one thread.
//!
//! The rules:
//! - A request waits for the endpoint user until it expires; then it is recorded as expired.
//! - An approval by a designated approver starts the request, once, while both it and the
//!   request are in force; one that arrives too late is recorded as "not run", with why.
//! - A request started by an earlier run of this agent that never ended was interrupted (the
//!   agent crashed or was stopped); it is recorded as such, never run again.
//! - Nothing is asked twice: an action stays outstanding until the driver reports it done.
//! - Time matters only at expiries, so [`Gate::poll_timeout`] says when to look again; there is
//!   no polling.

use std::collections::{BTreeMap, BTreeSet};

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::schedule::{ProbePattern, Schedule, ScheduleView};
use caisey_doc::session::{CommandRequest, Decision, SessionView, Start, Verdict, typed_approval_code};
use caisey_doc::text::PeerText;
use caisey_peer::store::{LedgerKey, LedgerRecord, Outcome};
use serde::Serialize;

use crate::recurring::{self, Zone};

/// A request waiting for the endpoint user's decision.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    /// The approval code (see `CommandRequest::approval_code`): names the request and its exact
    /// command. `approve`/`deny` take the whole code, as listings show it.
    pub code: Id128,
    pub id: Id128,
    pub session: DocId,
    pub session_name: caisey_doc::text::PeerText,
    pub requester: NodeId,
    /// For a schedule, the command as its runs would run it (id: the schedule's).
    pub request: CommandRequest,
    /// `Some`: a schedule waiting for consent to all its runs (or to be asked at each).
    pub schedule: Option<Schedule>,
}

/// Something the driver must do, then report with [`Gate::done`] (or, for a start,
/// [`Gate::started`] / [`Gate::refused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Expire {
        session: DocId,
        request: Id128,
    },
    Interrupted {
        session: DocId,
        request: Id128,
    },
    /// Consume the approval and record the start in one durable change, then run the command.
    /// `local`: the endpoint user's own approval, written with the start.
    Start {
        session: DocId,
        request: Id128,
        local: Option<Decision>,
    },
    /// Record the endpoint user's denial (with a local record, so no approval merged in later
    /// can start it).
    Deny {
        session: DocId,
        request: Id128,
        decision: Decision,
    },
    /// It will never run here; say so in the session, for good.
    NotRun {
        session: DocId,
        request: Id128,
        why: String,
    },
    /// Record the endpoint user's answer to a schedule (or that nobody answered in time).
    Consent {
        session: DocId,
        answer: recurring::Answer,
    },
    /// A run of a schedule is due: write it (and, under standing consent, start it) in one
    /// durable change, checked with [`crate::recurring::check_run`].
    Run {
        session: DocId,
        schedule: Id128,
        slot: u64,
        late: bool,
    },
}

impl Action {
    pub fn request(&self) -> Id128 {
        match self {
            Action::Expire { request, .. }
            | Action::Interrupted { request, .. }
            | Action::Start { request, .. }
            | Action::Deny { request, .. }
            | Action::NotRun { request, .. } => *request,
            Action::Consent { answer, .. } => answer.schedule,
            Action::Run { schedule, .. } => *schedule,
        }
    }

    pub fn session(&self) -> DocId {
        match self {
            Action::Expire { session, .. }
            | Action::Interrupted { session, .. }
            | Action::Start { session, .. }
            | Action::Deny { session, .. }
            | Action::NotRun { session, .. }
            | Action::Consent { session, .. }
            | Action::Run { session, .. } => *session,
        }
    }
}

/// The agent's decisions.
#[derive(Debug)]
pub struct Gate {
    me: NodeId,
    views: BTreeMap<DocId, SessionView>,
    pending: Vec<Pending>,
    /// Started by this process and not ended yet (its runner is at work).
    running: BTreeSet<Id128>,
    /// Asked of the driver and not reported done yet: not asked again meanwhile.
    outstanding: BTreeSet<Id128>,
    /// Approvals this agent refused to use (denied here first, used, expired): not tried again.
    refused: BTreeSet<Id128>,
    /// Schedules whose consent the endpoint user revoked (as this agent's ledger holds them).
    revoked: BTreeSet<Id128>,
    /// The time of the last review: every expiry up to it has been acted on.
    reviewed_at: u64,
    tz: Zone,
}

impl Gate {
    pub fn new(me: NodeId) -> Self {
        Gate {
            me,
            views: BTreeMap::new(),
            pending: Vec::new(),
            running: BTreeSet::new(),
            outstanding: BTreeSet::new(),
            refused: BTreeSet::new(),
            revoked: BTreeSet::new(),
            reviewed_at: 0,
            tz: chrono::Local,
        }
    }

    /// The endpoint user revoked their consent to `schedule` (the ledger holds it): no run of
    /// it starts from now on.
    pub fn revoke(&mut self, schedule: Id128, now: u64) -> Vec<Action> {
        self.revoked.insert(schedule);
        self.review(now)
    }

    pub fn is_revoked(&self, schedule: &Id128) -> bool {
        self.revoked.contains(schedule)
    }

    /// The ledger says `schedule` was revoked (read when its session is handed over next, which
    /// reviews): like [`Gate::revoke`], without a review of its own.
    pub fn revoked_earlier(&mut self, schedule: Id128) {
        self.revoked.insert(schedule);
    }

    /// The schedules for this machine, with their sessions: what `caisey-agent consents` lists.
    pub fn schedules(&self) -> Vec<(DocId, PeerText, ScheduleView, bool)> {
        let mut out: Vec<_> = self
            .views
            .iter()
            .flat_map(|(doc, v)| {
                v.schedules
                    .iter()
                    .filter(|s| s.schedule.target == self.me)
                    .map(|s| (*doc, v.info.name.clone(), s.clone(), self.revoked.contains(&s.schedule.id)))
            })
            .collect();
        out.sort_by_key(|(_, _, s, _)| s.schedule.requested_at);
        out
    }

    /// The next time a run of a schedule for this machine falls due after `now`.
    pub fn next_run(&self, s: &ScheduleView, now: u64) -> Option<u64> {
        (!self.revoked.contains(&s.schedule.id)).then(|| s.next_run(now, &self.tz)).flatten()
    }

    /// Session `doc` as it reads now; `None` when it no longer targets this agent (or does not
    /// read).
    pub fn session(&mut self, doc: DocId, view: Option<SessionView>, now: u64) -> Vec<Action> {
        match view.filter(|v| v.targets.contains(&self.me)) {
            Some(v) => self.views.insert(doc, v),
            None => self.views.remove(&doc),
        };
        self.review(now)
    }

    /// What waits for the endpoint user now, oldest first.
    pub fn pending(&self) -> &[Pending] {
        &self.pending
    }

    /// The approval codes of the commands running now.
    pub fn running_codes(&self) -> Vec<Id128> {
        self.running
            .iter()
            .filter_map(|id| self.views.values().find_map(|v| v.command(id)).map(|c| c.request.approval_code()))
            .collect()
    }

    /// A request as the sessions show it, with who asked.
    pub fn request(&self, session: DocId, id: Id128) -> Option<(CommandRequest, NodeId)> {
        let c = self.views.get(&session)?.command(&id)?;
        Some((c.request.clone(), c.requester))
    }

    /// The endpoint user approves or denies the request whose code they typed (the whole code
    /// as listings show it, or more of it).
    /// `decision` is theirs, made by the driver (it signs and names the machine); checked
    /// here against what is pending.
    /// For a schedule, `each_run` approves it to ask again at every run instead of once for all.
    pub fn decide(
        &mut self,
        typed: &str,
        each_run: bool,
        decision: impl FnOnce(&Pending) -> Decision,
    ) -> Result<Action, String> {
        let code = typed_approval_code(typed, "caisey-agent pending")?;
        let matches: Vec<&Pending> = self.pending.iter().filter(|p| p.code.to_hex().starts_with(&code)).collect();
        let p = match matches.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(format!(
                    "no pending request {code}; it may have changed or been decided (see `caisey-agent pending`)"
                ));
            }
            _ => return Err(format!("{code} matches {} pending requests; give more of the code", matches.len())),
        };
        if !self.outstanding.insert(p.id) {
            return Err(format!("request {} is being decided already", p.code.short()));
        }
        let d = decision(&p);
        let action = if p.schedule.is_some() {
            let verdict = d.verdict;
            let answer = recurring::Answer { schedule: p.id, verdict, each_run, decided_by: d.decided_by };
            Action::Consent { session: p.session, answer }
        } else if d.verdict == Verdict::Approved {
            self.running.insert(p.id);
            Action::Start { session: p.session, request: p.id, local: Some(d) }
        } else {
            Action::Deny { session: p.session, request: p.id, decision: d }
        };
        self.pending.retain(|q| q.id != p.id);
        Ok(action)
    }

    /// The driver wrote the start of `request`: its command runs until [`Gate::ended`].
    pub fn started(&mut self, request: Id128) {
        self.outstanding.remove(&request);
        self.running.insert(request);
    }

    /// The driver could not start `request` (checked again as the session stands at write time:
    /// denied here first, approval used or expired, request changed). A remote approval is then
    /// refused for good, and the session told why; a local one is the user's to try again.
    pub fn refused(&mut self, request: Id128, session: DocId, remote: bool, why: String, now: u64) -> Vec<Action> {
        self.outstanding.remove(&request);
        self.running.remove(&request);
        let mut actions = Vec::new();
        if remote && self.refused.insert(request) {
            self.outstanding.insert(request);
            actions.push(Action::NotRun { session, request, why: format!("the approval was not used: {why}") });
        }
        actions.extend(self.review(now));
        actions
    }

    /// The command of `request` ended (its end is written).
    pub fn ended(&mut self, request: Id128, now: u64) -> Vec<Action> {
        self.running.remove(&request);
        self.review(now)
    }

    /// The driver carried out the action for `request` (or gave up on it, having said why).
    pub fn done(&mut self, request: Id128, now: u64) -> Vec<Action> {
        self.outstanding.remove(&request);
        self.review(now)
    }

    /// When the next request or approval expires (ms), after the last look: look again then,
    /// with [`Gate::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<u64> {
        let me = self.me;
        let expiries = self
            .views
            .values()
            .flat_map(|v| v.commands.iter())
            .filter(|c| c.request.target == me && c.end.is_none() && c.start.is_none())
            .flat_map(|c| [Some(c.request.expires_at), c.decision.as_ref().map(|d| d.expires_at)])
            .flatten()
            .map(|t| t.saturating_add(1));
        let runs = self
            .views
            .values()
            .flat_map(|v| v.schedules.iter())
            .filter(|s| s.schedule.target == me && !self.revoked.contains(&s.schedule.id))
            .filter_map(|s| recurring::wake_at(s, self.reviewed_at, &self.tz));
        expiries.chain(runs).filter(|t| *t > self.reviewed_at).min()
    }

    pub fn handle_timeout(&mut self, now: u64) -> Vec<Action> {
        self.review(now)
    }

    /// Recomputes what waits for the user, and what must be written.
    fn review(&mut self, now: u64) -> Vec<Action> {
        self.reviewed_at = self.reviewed_at.max(now);
        let (pending, actions) = review(self.me, &self.views, &self.running, &self.revoked, now, &self.tz);
        self.pending = pending.into_iter().filter(|p| !self.outstanding.contains(&p.id)).collect();
        let mut out = Vec::new();
        for action in actions {
            let id = action.request();
            if self.outstanding.contains(&id) || (matches!(action, Action::Start { .. }) && self.refused.contains(&id))
            {
                continue;
            }
            self.outstanding.insert(id);
            if matches!(action, Action::Start { .. }) {
                self.running.insert(id);
            }
            out.push(action);
        }
        out
    }
}

/// What starting a request writes, in one durable change: its start record into the session,
/// and into this agent's own ledger the approval's nonce as used and the request as started.
#[derive(Debug, Clone)]
pub struct StartPlan {
    pub request: CommandRequest,
    pub start: Start,
    pub ledger: Vec<(LedgerKey, LedgerRecord)>,
    /// The patterns its values are picked out with (a scheduled run's).
    pub probes: Vec<ProbePattern>,
    /// The schedule it is a run of, if any.
    pub schedule: Option<Id128>,
}

/// Whether request `id` may start now, checked against the session as it stands at the moment
/// of writing and this agent's ledger (`ledger(key)`, its own table in the store: what it used,
/// started, denied or let expire): the one place a start is allowed.
/// `local`: the endpoint user's own approval, with the code they were shown. A start needs a
/// valid approval in force for exactly this command, unused, for a request this agent never
/// started, denied or let expire — whatever a merge of the session shows.
pub fn check_start(
    view: &SessionView,
    id: Id128,
    local: Option<(&Decision, Id128)>,
    me: NodeId,
    now: u64,
    ledger: impl Fn(&LedgerKey) -> Option<LedgerRecord>,
) -> Result<StartPlan, String> {
    let (approved_by, nonce) = match local {
        Some((d, code)) => {
            check_still_pending(view, id, code, me, now)?;
            (me, d.nonce)
        }
        None => {
            let cmd = view.command(&id).ok_or_else(|| format!("request {} is not valid", id.short()))?;
            let (Some(d), Some(by)) = (&cmd.decision, cmd.decided_by_node) else {
                return Err(format!("request {} has no valid approval", id.short()));
            };
            if d.verdict != Verdict::Approved || cmd.start.is_some() {
                return Err(format!("request {} is not approved or already started", id.short()));
            }
            if now > d.expires_at || now > cmd.request.expires_at {
                return Err(format!("the approval of {} expired before it could be used", id.short()));
            }
            (by, d.nonce)
        }
    };
    if ledger(&LedgerKey::Approval(nonce)).is_some() {
        return Err(format!("approval {} was already used; it is never used twice", nonce.short()));
    }
    if let Some(done) = ledger(&LedgerKey::Request(id)) {
        return Err(format!("request {} was already {} on this machine", id.short(), done.outcome.as_str()));
    }
    let cmd = view.command(&id).ok_or_else(|| "request vanished".to_string())?;
    let request = cmd.request.clone();
    let probes = cmd
        .schedule
        .and_then(|s| view.schedules.iter().find(|v| v.schedule.id == s))
        .map(|s| s.schedule.probes.clone())
        .unwrap_or_default();
    let start = Start { request: id, session: view.info.id, started_at: now, approved_by, nonce };
    let ledger = vec![
        (LedgerKey::Approval(nonce), LedgerRecord { outcome: Outcome::Used, at: now }),
        (LedgerKey::Request(id), LedgerRecord { outcome: Outcome::Started, at: now }),
    ];
    Ok(StartPlan { request, start, ledger, probes, schedule: cmd.schedule })
}

/// The record of `req` (asked by `requester` of agent `me`) expiring unanswered at `now`.
pub fn expiry(req: &CommandRequest, requester: NodeId, me: NodeId, now: u64, nonce: Id128) -> Decision {
    Decision {
        request: req.id,
        session: req.session,
        target: me,
        requester,
        command_hash: req.command.hash(),
        verdict: Verdict::Expired,
        decided_by: "nobody (the request expired)".into(),
        decided_at: now,
        expires_at: now,
        nonce,
    }
}

/// Refuses a local decision unless the request is still undecided, unexpired, for this
/// machine, and carries exactly the command whose approval code the user was shown.
pub fn check_still_pending(view: &SessionView, id: Id128, code: Id128, me: NodeId, now: u64) -> Result<(), String> {
    let cmd = view.command(&id).ok_or_else(|| format!("request {} is no longer valid", id.short()))?;
    if cmd.request.target != me {
        return Err(format!("request {} is for another machine", id.short()));
    }
    if cmd.request.approval_code() != code {
        return Err("the command changed since it was shown; review it again with `caisey-agent pending`".into());
    }
    if cmd.decision.is_some() {
        return Err(format!("request {} was already decided", id.short()));
    }
    if now > cmd.request.expires_at {
        return Err(format!("request {} has expired; ask the technician to send it again", id.short()));
    }
    Ok(())
}

/// The rules, as a pure function of the sessions, what runs here and the time.
fn review(
    me: NodeId,
    sessions: &BTreeMap<DocId, SessionView>,
    running: &BTreeSet<Id128>,
    revoked: &BTreeSet<Id128>,
    now: u64,
    tz: &Zone,
) -> (Vec<Pending>, Vec<Action>) {
    let mut pending = Vec::new();
    let mut actions = Vec::new();
    for (doc, view) in sessions {
        let (schedules_pending, schedule_actions) = recurring::review(me, *doc, view, running, revoked, now, tz);
        pending.extend(schedules_pending);
        actions.extend(schedule_actions);
        // Ended is ended: nothing more to decide or write.
        for cmd in view.commands.iter().filter(|c| c.request.target == me && c.end.is_none()) {
            let id = cmd.request.id;
            // A run waiting for the user whose schedule stopped will never run.
            if let Some(why) = cmd
                .schedule
                .filter(|_| cmd.decision.is_none() && cmd.start.is_none())
                .and_then(|s| recurring::stopped(view, s, revoked, now))
            {
                actions.push(Action::NotRun { session: *doc, request: id, why });
                continue;
            }
            // An approval not used before it expired is as good as none; a denial is final.
            let decision = cmd
                .decision
                .as_ref()
                .filter(|d| d.verdict != Verdict::Approved || cmd.start.is_some() || now <= d.expires_at);
            let approved_too_late = decision.is_none() && cmd.decision.is_some();
            match (decision, &cmd.start, &cmd.end) {
                (None, _, _) if now > cmd.request.expires_at && approved_too_late => actions.push(Action::NotRun {
                    session: *doc,
                    request: id,
                    why: "it was approved only after the request had expired".into(),
                }),
                (None, _, _) if now > cmd.request.expires_at => {
                    actions.push(Action::Expire { session: *doc, request: id })
                }
                (None, _, _) => pending.push(Pending {
                    code: cmd.request.approval_code(),
                    id,
                    session: *doc,
                    session_name: view.info.name.clone(),
                    requester: cmd.requester,
                    request: cmd.request.clone(),
                    schedule: None,
                }),
                (Some(d), Some(_), None) if d.verdict == Verdict::Approved && !running.contains(&id) => {
                    actions.push(Action::Interrupted { session: *doc, request: id })
                }
                (Some(d), None, None)
                    if d.verdict == Verdict::Approved && cmd.decided_by_node != Some(me) && !running.contains(&id) =>
                {
                    actions.push(Action::Start { session: *doc, request: id, local: None })
                }
                _ => {}
            }
        }
    }
    pending.sort_by_key(|p| p.request.requested_at);
    (pending, actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisey_doc::fleet::Fleet;
    use caisey_doc::record::Signer;
    use caisey_doc::session::*;

    fn setup() -> (Signer, Signer, Fleet, SessionInfo) {
        let org = Signer::from_secret([1; 32]);
        let tech = Signer::from_secret([2; 32]);
        let agent = Signer::from_secret([3; 32]);
        let mut fleet_doc = Fleet::create("Acme", &org, &tech, "alice", Id128([0; 16]), 0).unwrap();
        let m = caisey_doc::fleet::Membership {
            approves: vec![],
            node: agent.node_id(),
            role: caisey_doc::fleet::Role::Agent,
            name: "ws".into(),
            groups: vec![],
            at: 0,
            invite: None,
        };
        Fleet::put_member(&mut fleet_doc, &org.sign(caisey_doc::record::RecordKind::Membership, &m), &agent.node_id())
            .unwrap();
        // A designated approver for this machine.
        let approver = approver();
        let a = caisey_doc::fleet::Membership {
            approves: vec!["ws".into()],
            node: approver.node_id(),
            role: caisey_doc::fleet::Role::Approver,
            name: "carol".into(),
            groups: vec![],
            at: 0,
            invite: None,
        };
        Fleet::put_member(
            &mut fleet_doc,
            &org.sign(caisey_doc::record::RecordKind::Membership, &a),
            &approver.node_id(),
        )
        .unwrap();
        let info =
            SessionInfo { id: Id128([1; 16]), name: "s".into(), labels: vec![], created_at: 0, org_key: org.node_id() };
        (tech, agent, Fleet::read(&fleet_doc).unwrap(), info)
    }

    fn approver() -> Signer {
        Signer::from_secret([4; 32])
    }

    fn request(info: &SessionInfo, target: NodeId, n: u8) -> CommandRequest {
        let command = CommandSpec {
            shell: Shell::Sh,
            script: "true".into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 1000,
            collect: None,
        };
        CommandRequest {
            id: Id128([n; 16]),
            session: info.id,
            target,
            command,
            description: Default::default(),
            requested_at: n as u64,
            expires_at: 100,
        }
    }

    /// The local user's decision on `req`, valid until `expires_at`.
    fn decision(req: &CommandRequest, tech: &Signer, verdict: Verdict, expires_at: u64) -> Decision {
        Decision {
            request: req.id,
            session: req.session,
            target: req.target,
            requester: tech.node_id(),
            command_hash: req.command.hash(),
            verdict,
            decided_by: "local user".into(),
            decided_at: 5,
            expires_at,
            nonce: Id128([9; 16]),
        }
    }

    #[test]
    fn waiting_expired_and_interrupted_requests_are_told_apart() {
        let (tech, agent, fleet, info) = setup();
        let me = agent.node_id();
        let mut doc = SessionWriter::create(&tech, &info).unwrap();
        for n in 1..=3 {
            SessionWriter::request(&mut doc, &tech, &request(&info, me, n)).unwrap();
        }
        // Request 3 was approved and started by an earlier run of the agent.
        let req3 = request(&info, me, 3);
        let d = decision(&req3, &tech, Verdict::Approved, 100);
        let start = Start { request: req3.id, session: info.id, started_at: 5, approved_by: me, nonce: d.nonce };
        SessionWriter::start(&mut doc, &agent, Some(&d), &start).unwrap();
        let view = SessionView::read_without_output(&doc, &fleet).unwrap();
        let sessions = BTreeMap::from([(info.id, view)]);

        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), &BTreeSet::new(), 50, &chrono::Local);
        assert_eq!(pending.iter().map(|p| p.id).collect::<Vec<_>>(), vec![Id128([1; 16]), Id128([2; 16])]);
        assert_eq!(actions, vec![Action::Interrupted { session: info.id, request: req3.id }]);

        // While it runs in this process it is not interrupted; after expiry nothing is pending.
        let running = BTreeSet::from([req3.id]);
        let (pending, actions) = review(me, &sessions, &running, &BTreeSet::new(), 101, &chrono::Local);
        assert!(pending.is_empty());
        assert_eq!(actions.len(), 2);
        assert!(actions.iter().all(|a| matches!(a, Action::Expire { .. })));
        // Another agent's requests are none of this agent's business.
        let (pending, _) = review(tech.node_id(), &sessions, &running, &BTreeSet::new(), 50, &chrono::Local);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_denied_request_stays_decided_after_the_denial_is_old() {
        let (tech, agent, fleet, info) = setup();
        let me = agent.node_id();
        let mut doc = SessionWriter::create(&tech, &info).unwrap();
        let req = request(&info, me, 1);
        SessionWriter::request(&mut doc, &tech, &req).unwrap();
        let d = decision(&req, &tech, Verdict::Denied, 5);
        SessionWriter::decide(&mut doc, &agent, &d).unwrap();
        let sessions = BTreeMap::from([(info.id, SessionView::read_without_output(&doc, &fleet).unwrap())]);
        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), &BTreeSet::new(), 50, &chrono::Local);
        assert!(pending.is_empty(), "a denied request is not pending again: {pending:?}");
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn an_approval_that_came_too_late_is_recorded_as_not_run_once_and_then_left_alone() {
        let (tech, agent, fleet, info) = setup();
        let me = agent.node_id();
        let mut doc = SessionWriter::create(&tech, &info).unwrap();
        let req = request(&info, me, 1);
        SessionWriter::request(&mut doc, &tech, &req).unwrap();
        // An approval whose own window passed unused (it reached this agent too late).
        let d = decision(&req, &tech, Verdict::Approved, 10);
        SessionWriter::decide(&mut doc, &agent, &d).unwrap();
        let sessions = BTreeMap::from([(info.id, SessionView::read_without_output(&doc, &fleet).unwrap())]);
        // Before the request itself expires, its user may still decide.
        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), &BTreeSet::new(), 50, &chrono::Local);
        assert_eq!(pending.len(), 1);
        assert!(actions.is_empty(), "{actions:?}");
        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), &BTreeSet::new(), 101, &chrono::Local);
        assert!(pending.is_empty());
        assert!(matches!(actions.as_slice(), [Action::NotRun { request, .. }] if *request == req.id), "{actions:?}");
        // Once the session says so, nothing more is written (no expiry every second).
        let end = End {
            probes: Vec::new(),
            request: req.id,
            session: info.id,
            status: EndStatus::NotRun,
            exit_code: None,
            ended_at: 101,
            chunks: 0,
            message: Some("too late".into()),
        };
        SessionWriter::end(&mut doc, &agent, &end).unwrap();
        let view = SessionView::read_without_output(&doc, &fleet).unwrap();
        assert_eq!(view.commands[0].status(), "not run");
        assert!(view.commands[0].is_final());
        let (pending, actions) =
            review(me, &BTreeMap::from([(info.id, view)]), &BTreeSet::new(), &BTreeSet::new(), 200, &chrono::Local);
        assert!(pending.is_empty() && actions.is_empty(), "{actions:?}");
    }

    /// A session with requests 1..=n for `me`, as the gate reads it.
    fn session_with(n: u8) -> (Signer, Signer, Fleet, SessionInfo, caisey_doc::automerge::Automerge) {
        let (tech, agent, fleet, info) = setup();
        let mut doc = SessionWriter::create(&tech, &info).unwrap();
        for i in 1..=n {
            SessionWriter::request(&mut doc, &tech, &request(&info, agent.node_id(), i)).unwrap();
        }
        (tech, agent, fleet, info, doc)
    }

    fn view(doc: &caisey_doc::automerge::Automerge, fleet: &Fleet) -> Option<SessionView> {
        Some(SessionView::read_without_output(doc, fleet).unwrap())
    }

    #[test]
    fn a_local_approval_starts_once_and_a_running_command_is_never_taken_for_interrupted() {
        let (_tech, agent, fleet, info, mut doc) = session_with(1);
        let me = agent.node_id();
        let mut gate = Gate::new(me);
        assert!(gate.session(info.id, view(&doc, &fleet), 10).is_empty());
        let code = gate.pending()[0].code.short();
        // Part of the code is not enough: it must name what the user was shown.
        assert!(gate.decide(&code[..1], false, |_| unreachable!()).is_err());
        let req = request(&info, me, 1);
        let mut made = None;
        let action = gate
            .decide(&code, false, |p| {
                let d = Decision { verdict: Verdict::Approved, ..decision(&p.request, &_tech, Verdict::Approved, 10) };
                made = Some(d.clone());
                d
            })
            .unwrap();
        assert!(matches!(&action, Action::Start { request, local: Some(_), .. } if *request == req.id));
        assert!(gate.pending().is_empty(), "an approved request is no longer pending");
        // Deciding twice is refused while the first is being carried out.
        assert!(gate.decide(&code, false, |_| unreachable!()).is_err());
        // The start is written; the session shows it; the command runs: nothing to do.
        let d = made.unwrap();
        let start = Start { request: req.id, session: info.id, started_at: 11, approved_by: me, nonce: d.nonce };
        SessionWriter::start(&mut doc, &agent, Some(&d), &start).unwrap();
        let actions = gate.session(info.id, view(&doc, &fleet), 11);
        assert!(actions.is_empty(), "{actions:?}");
        gate.started(req.id);
        assert_eq!(gate.running_codes(), vec![req.approval_code()]);
        assert!(gate.session(info.id, view(&doc, &fleet), 12).is_empty());
        // Ended: written and reported; nothing more, at any time.
        let end = End {
            probes: Vec::new(),
            request: req.id,
            session: info.id,
            status: EndStatus::Exited,
            exit_code: Some(0),
            ended_at: 13,
            chunks: 0,
            message: None,
        };
        SessionWriter::end(&mut doc, &agent, &end).unwrap();
        gate.session(info.id, view(&doc, &fleet), 13);
        assert!(gate.ended(req.id, 13).is_empty());
        assert!(gate.handle_timeout(1_000).is_empty());
        assert_eq!(gate.poll_timeout(), None);
    }

    #[test]
    fn after_a_restart_a_started_command_without_an_end_is_recorded_interrupted_once() {
        let (tech, agent, fleet, info, mut doc) = session_with(1);
        let me = agent.node_id();
        let req = request(&info, me, 1);
        let d = decision(&req, &tech, Verdict::Approved, 100);
        let start = Start { request: req.id, session: info.id, started_at: 5, approved_by: me, nonce: d.nonce };
        SessionWriter::start(&mut doc, &agent, Some(&d), &start).unwrap();
        // A fresh gate: this process runs nothing.
        let mut gate = Gate::new(me);
        let actions = gate.session(info.id, view(&doc, &fleet), 50);
        assert_eq!(actions, vec![Action::Interrupted { session: info.id, request: req.id }]);
        // Asked once, however often the session changes meanwhile.
        assert!(gate.session(info.id, view(&doc, &fleet), 51).is_empty());
        assert!(gate.handle_timeout(52).is_empty());
        // Done, and the session shows it: nothing more.
        let end = End {
            probes: Vec::new(),
            request: req.id,
            session: info.id,
            status: EndStatus::Interrupted,
            exit_code: None,
            ended_at: 53,
            chunks: 0,
            message: None,
        };
        SessionWriter::end(&mut doc, &agent, &end).unwrap();
        gate.session(info.id, view(&doc, &fleet), 53);
        assert!(gate.done(req.id, 53).is_empty());
    }

    #[test]
    fn a_remote_approval_starts_once_and_a_refused_one_is_said_not_run_once() {
        let (tech, agent, fleet, info, mut doc) = session_with(2);
        let me = agent.node_id();
        // This machine's designated approver approved request 1; the technician "approved" 2
        // itself, which is no approval at all.
        let req1 = request(&info, me, 1);
        let d1 = Decision { nonce: Id128([21; 16]), ..decision(&req1, &tech, Verdict::Approved, 100) };
        SessionWriter::decide(&mut doc, &approver(), &d1).unwrap();
        let req2 = request(&info, me, 2);
        let d2 = Decision { nonce: Id128([22; 16]), ..decision(&req2, &tech, Verdict::Approved, 100) };
        SessionWriter::decide(&mut doc, &tech, &d2).unwrap();
        let mut gate = Gate::new(me);
        let actions = gate.session(info.id, view(&doc, &fleet), 10);
        assert_eq!(actions, vec![Action::Start { session: info.id, request: req1.id, local: None }]);
        assert_eq!(gate.pending().iter().map(|p| p.id).collect::<Vec<_>>(), vec![req2.id]);
        // Not asked again while it is being started, however often the session changes.
        assert!(gate.session(info.id, view(&doc, &fleet), 11).is_empty());
        // Refused by the driver (say this machine's user had denied it first): said once, and
        // never tried again.
        let actions = gate.refused(req1.id, info.id, true, "denied on this machine".into(), 12);
        assert!(matches!(actions.as_slice(), [Action::NotRun { request, .. }] if *request == req1.id), "{actions:?}");
        assert!(gate.done(req1.id, 13).is_empty());
        assert!(gate.session(info.id, view(&doc, &fleet), 14).is_empty());
    }

    #[test]
    fn the_gate_wakes_at_the_next_expiry_and_records_it_once() {
        let (_tech, agent, fleet, info, doc) = session_with(2);
        let mut gate = Gate::new(agent.node_id());
        gate.session(info.id, view(&doc, &fleet), 10);
        // Both requests expire at 100: look again just after.
        assert_eq!(gate.poll_timeout(), Some(101));
        assert!(gate.handle_timeout(100).is_empty());
        let actions = gate.handle_timeout(101);
        assert_eq!(actions.len(), 2);
        assert!(actions.iter().all(|a| matches!(a, Action::Expire { .. })));
        assert!(gate.pending().is_empty());
        // What is due has been acted on: no wake-up in the past while the writes are under way
        // (that would spin the daemon).
        assert_eq!(gate.poll_timeout(), None);
        assert!(gate.handle_timeout(102).is_empty(), "asked again before it was done");
    }

    #[test]
    fn a_denial_by_the_user_is_asked_once_and_leaves_nothing_pending() {
        let (tech, agent, fleet, info, doc) = session_with(1);
        let mut gate = Gate::new(agent.node_id());
        gate.session(info.id, view(&doc, &fleet), 10);
        let code = gate.pending()[0].code.to_hex();
        let action = gate.decide(&code, false, |p| decision(&p.request, &tech, Verdict::Denied, 10)).unwrap();
        assert!(matches!(action, Action::Deny { .. }));
        assert!(gate.pending().is_empty());
        // Unknown or stale codes get one clear line.
        let err = gate.decide("0123456789abcdef0123456789abcdef", false, |_| unreachable!()).unwrap_err();
        assert!(err.contains("no pending request"), "{err}");
    }
}
