//! The approval gate's decisions, as a pure function of what the agent's sessions say.
//!
//! Given the sessions that target this agent, the commands it is running right now, and the
//! time, `review` says which requests wait for the endpoint user, which have expired, and which
//! were started by an earlier run of this agent and never ended: those were interrupted (the
//! agent crashed or was stopped) and are recorded as such — never run again.

use std::collections::BTreeSet;

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{CommandRequest, SessionView, Verdict};
use serde::Serialize;

/// A request waiting for the endpoint user's decision.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    /// The approval code (see `CommandRequest::approval_code`): names the request and its exact
    /// command. `approve`/`deny` accept any unique prefix of it.
    pub code: Id128,
    pub id: Id128,
    pub session: DocId,
    pub session_name: caisey_doc::text::PeerText,
    pub requester: NodeId,
    pub request: CommandRequest,
}

/// Something the agent must write.
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
    /// A designated approver approved it: consume the approval and run.
    RunApproved {
        session: DocId,
        request: Id128,
    },
    /// Approved, but too late: the request had expired. Say so in the session, for good.
    NotRun {
        session: DocId,
        request: Id128,
        why: &'static str,
    },
}

pub fn review(
    me: NodeId,
    sessions: &[(DocId, SessionView)],
    running: &BTreeSet<Id128>,
    now: u64,
) -> (Vec<Pending>, Vec<Action>) {
    let mut pending = Vec::new();
    let mut actions = Vec::new();
    for (doc, view) in sessions {
        // Ended is ended: nothing more to decide or write.
        for cmd in view.commands.iter().filter(|c| c.request.target == me && c.end.is_none()) {
            let id = cmd.request.id;
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
                    why: "it was approved only after the request had expired",
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
                }),
                (Some(d), Some(_), None) if d.verdict == Verdict::Approved && !running.contains(&id) => {
                    actions.push(Action::Interrupted { session: *doc, request: id })
                }
                (Some(d), None, None)
                    if d.verdict == Verdict::Approved && cmd.decided_by_node != Some(me) && !running.contains(&id) =>
                {
                    actions.push(Action::RunApproved { session: *doc, request: id })
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
        let info =
            SessionInfo { id: Id128([1; 16]), name: "s".into(), labels: vec![], created_at: 0, org_key: org.node_id() };
        (tech, agent, Fleet::read(&fleet_doc).unwrap(), info)
    }

    fn request(info: &SessionInfo, target: NodeId, n: u8) -> CommandRequest {
        let command = CommandSpec {
            shell: Shell::Sh,
            script: "true".into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 1000,
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
        let sessions = vec![(info.id, view)];

        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), 50);
        assert_eq!(pending.iter().map(|p| p.id).collect::<Vec<_>>(), vec![Id128([1; 16]), Id128([2; 16])]);
        assert_eq!(actions, vec![Action::Interrupted { session: info.id, request: req3.id }]);

        // While it runs in this process it is not interrupted; after expiry nothing is pending.
        let running = BTreeSet::from([req3.id]);
        let (pending, actions) = review(me, &sessions, &running, 101);
        assert!(pending.is_empty());
        assert_eq!(actions.len(), 2);
        assert!(actions.iter().all(|a| matches!(a, Action::Expire { .. })));
        // Another agent's requests are none of this agent's business.
        let (pending, _) = review(tech.node_id(), &sessions, &running, 50);
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
        let sessions = vec![(info.id, SessionView::read_without_output(&doc, &fleet).unwrap())];
        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), 50);
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
        let sessions = vec![(info.id, SessionView::read_without_output(&doc, &fleet).unwrap())];
        // Before the request itself expires, its user may still decide.
        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), 50);
        assert_eq!(pending.len(), 1);
        assert!(actions.is_empty(), "{actions:?}");
        let (pending, actions) = review(me, &sessions, &BTreeSet::new(), 101);
        assert!(pending.is_empty());
        assert!(matches!(actions.as_slice(), [Action::NotRun { request, .. }] if *request == req.id), "{actions:?}");
        // Once the session says so, nothing more is written (no expiry every second).
        let end = End {
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
        let (pending, actions) = review(me, &[(info.id, view)], &BTreeSet::new(), 200);
        assert!(pending.is_empty() && actions.is_empty(), "{actions:?}");
    }
}
