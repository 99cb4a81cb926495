//! Agents in the simulated world: every agent node runs the real decision core
//! (`caisey_agent::gate::Gate`) and the real start check (`gate::check_start`, against the
//! session and the agent's own ledger), and "runs" a command as a process that ends a while
//! after it started, with one chunk of output. A crash kills the agent's processes with it, as
//! the kernel does to a real agent's.
//!
//! [`AgentWorld::starts`] counts every process start, across crashes: the guarantees are checked
//! against it and against what the sessions say in the end.

use std::collections::BTreeMap;

use caisey_agent::gate::{self, Action, Gate};
use caisey_agent::recurring::{self, Due};
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::record::Signer;
use caisey_doc::schedule::{Missed, Schedule, ScheduleRevoked, ScheduleWriter};
use caisey_doc::session::{
    CommandRequest, CommandSpec, Decision, End, EndStatus, OutputChunk, SessionView, SessionWriter, Shell, Stream,
    Verdict, chunk_hash,
};

use caisey_peer::store::{LedgerKey, LedgerRecord, Outcome};

use crate::{LedgerEntries, Sim};

/// How long a simulated command runs.
const RUNS_FOR_MS: u64 = 400;

struct Agent {
    signer: Signer,
    gate: Gate,
    up: bool,
    /// Commands running now: request -> (session, when it ends).
    processes: BTreeMap<Id128, (DocId, u64)>,
    /// Starts written to memory but not yet durable: the process starts once they are, with
    /// these ledger records written then (as the daemon waits on a full disk).
    waiting: Vec<WaitingStart>,
}

/// A start kept in memory but not durable yet: the request, its session, and its ledger entries.
type WaitingStart = (Id128, DocId, LedgerEntries);

/// The simulated world with agents at work in it.
pub struct AgentWorld {
    pub sim: Sim,
    agents: BTreeMap<NodeId, Agent>,
    /// How many times each request's process was started, crashes included.
    pub starts: BTreeMap<Id128, u32>,
}

impl AgentWorld {
    /// Puts the real decision core on each of these agents' nodes.
    pub fn new(sim: Sim, agents: &[Signer]) -> AgentWorld {
        let agents = agents
            .iter()
            .map(|s| {
                let id = s.node_id();
                let agent = Agent {
                    signer: s.clone(),
                    gate: Gate::new(id),
                    up: true,
                    processes: BTreeMap::new(),
                    waiting: vec![],
                };
                (id, agent)
            })
            .collect();
        AgentWorld { sim, agents, starts: BTreeMap::new() }
    }

    /// The world the agent properties run in: `o`'s technician, relay and two agents, all
    /// linked, with reordering, duplicates (and, for even seeds, batching); one session per
    /// agent, made by the technician. Returns the world, its nodes (technician, relay, the
    /// agents) and the sessions (by agent).
    pub fn for_org(o: &crate::org::Org, seed: u64) -> (AgentWorld, Vec<NodeId>, Vec<DocId>) {
        let nodes: Vec<NodeId> = [&o.tech, &o.relay].into_iter().chain(&o.agents).map(|s| s.node_id()).collect();
        let mut sim = o.sim(seed);
        sim.faults = crate::Faults { reorder: true, duplicate: 0.1, batch: seed.is_multiple_of(2) };
        sim.connect_all();
        let mut sessions = Vec::new();
        for (i, agent) in o.agents.iter().enumerate() {
            let (sid, doc) = o.session_for(agent.node_id(), 30 + i as u8);
            assert!(sim.create(nodes[0], sid, caisey_peer::wire::DocKind::Session, doc));
            sessions.push(sid);
        }
        let mut world = AgentWorld::new(sim, &o.agents);
        world.run_for(500);
        (world, nodes, sessions)
    }

    /// Kills node `at` (an agent with its processes), or starts it again if it is in `down`.
    pub fn crash_or_restart(&mut self, at: NodeId, down: &mut Vec<NodeId>) {
        let is_agent = self.agents.contains_key(&at);
        if let Some(i) = down.iter().position(|d| *d == at) {
            down.remove(i);
            if is_agent { self.restart(at) } else { self.sim.restart(at) }
        } else {
            if is_agent {
                self.crash(at)
            } else {
                self.sim.crash(at)
            }
            down.push(at);
        }
    }

    /// Everyone back, every disk with room, every link up.
    pub fn heal(&mut self, down: &mut Vec<NodeId>) {
        for at in std::mem::take(down) {
            if self.agents.contains_key(&at) { self.restart(at) } else { self.sim.restart(at) }
        }
        self.sim.heal();
    }

    pub fn is_up(&self, agent: NodeId) -> bool {
        self.agents.get(&agent).is_some_and(|a| a.up)
    }

    /// A technician at `tech` asks `target` to run a command (request `id`) in session `sid`,
    /// expiring after `ttl` ms.
    pub fn request(&mut self, tech: &Signer, sid: DocId, target: NodeId, id: Id128, ttl: u64) {
        let now = self.sim.now;
        let command = CommandSpec {
            shell: Shell::Sh,
            script: format!("job {}", id.short()),
            cwd: None,
            env: Default::default(),
            timeout_ms: 60_000,
            collect: None,
        };
        let req = CommandRequest {
            id,
            session: sid,
            target,
            command,
            description: Default::default(),
            requested_at: now,
            expires_at: now + ttl,
        };
        let tech = tech.clone();
        self.sim.change(tech.node_id(), sid, move |d| SessionWriter::request(d, &tech, &req).expect("request"));
        self.settle();
    }

    /// A technician at `tech` asks `target` to run a check every `every_ms` for `for_ms` from
    /// now (schedule `id`, in session `sid`); runs missed while the agent is down run late.
    pub fn schedule(&mut self, tech: &Signer, sid: DocId, target: NodeId, id: Id128, every_ms: u64, for_ms: u64) {
        let now = self.sim.now;
        let s = Schedule {
            id,
            session: sid,
            target,
            command: CommandSpec {
                shell: Shell::Sh,
                script: format!("check {}", id.short()),
                cwd: None,
                env: Default::default(),
                timeout_ms: 60_000,
                collect: None,
            },
            description: Default::default(),
            every: format!("{every_ms}ms"),
            until: now + for_ms,
            missed: Missed::RunLate,
            probes: vec![],
            requested_at: now,
            expires_at: now + for_ms,
            replaces: None,
        };
        let tech = tech.clone();
        self.sim.change(tech.node_id(), sid, move |d| ScheduleWriter::schedule(d, &tech, &s).expect("schedule"));
        self.settle();
    }

    /// The endpoint user of `agent` takes back consent to `schedule`: the ledger first, then
    /// the session, in one durable write. The time it took effect, if it did.
    pub fn revoke(&mut self, agent: NodeId, schedule: Id128) -> Option<u64> {
        let now = self.sim.now;
        let (session, signer) = {
            let a = self.agents.get(&agent).filter(|a| a.up)?;
            let (doc, ..) = a.gate.schedules().into_iter().find(|(_, _, s, _)| s.schedule.id == schedule)?;
            (doc, a.signer.clone())
        };
        let record = ScheduleRevoked { schedule, session, at: now, by: "local user".into() };
        let written = self.sim.change_guarded(agent, session, |doc, _, _| {
            ScheduleWriter::revoked(doc, &signer, &record).map_err(|e| e.to_string())?;
            Ok::<_, String>((
                (),
                vec![(LedgerKey::Schedule(schedule), LedgerRecord { outcome: Outcome::Revoked, at: now })],
            ))
        });
        // Only a revocation on disk counts (the daemon waits for room before it says so).
        if !matches!(written, Some((Ok(()), true))) {
            return None;
        }
        let actions = self.agents.get_mut(&agent).map(|a| a.gate.revoke(schedule, now)).unwrap_or_default();
        for action in actions {
            self.act(agent, action);
        }
        self.settle();
        Some(now)
    }

    /// A malicious member at `at` deletes every revocation record from session `sid` (Automerge
    /// lets any holder delete a value): the agents must still hold to their own ledgers.
    pub fn delete_revocations(&mut self, at: NodeId, sid: DocId) {
        use caisey_doc::automerge::{ROOT, ReadDoc, transaction::Transactable};
        self.sim.change(at, sid, |d| {
            let keys: Vec<String> = d.keys(ROOT).filter(|k| k.starts_with("revoked:")).collect();
            let _ = d.transact::<_, _, caisey_doc::automerge::AutomergeError>(|tx| {
                for k in &keys {
                    tx.delete(ROOT, k.as_str())?;
                }
                Ok(())
            });
        });
        self.settle();
    }

    /// The schedules `agent`'s gate holds.
    pub fn schedules_at(&self, agent: NodeId) -> Vec<Id128> {
        self.agents
            .get(&agent)
            .map(|a| a.gate.schedules().iter().map(|(_, _, s, _)| s.schedule.id).collect())
            .unwrap_or_default()
    }

    /// A designated approver's approval of `request`, written at node `at` (any node holding the
    /// session), valid for `ttl` ms.
    pub fn approve_remote(&mut self, at: NodeId, approver: &Signer, sid: DocId, request: Id128, ttl: u64) {
        let now = self.sim.now;
        let Some(doc) = self.sim.hub(at).doc(&sid) else { return };
        let Ok(view) = SessionView::read_without_output(doc, self.sim.hub(at).fleet()) else { return };
        let Some(cmd) = view.command(&request).filter(|c| c.decision.is_none()) else { return };
        let d = Decision {
            request,
            session: sid,
            target: cmd.request.target,
            requester: cmd.requester,
            command_hash: cmd.request.command.hash(),
            verdict: Verdict::Approved,
            decided_by: "carol".into(),
            decided_at: now,
            expires_at: now + ttl,
            nonce: Id128(rand_nonce(now, request)),
        };
        let approver = approver.clone();
        self.sim.change(at, sid, move |doc| SessionWriter::decide(doc, &approver, &d).expect("decision"));
        self.settle();
    }

    /// The endpoint user of `agent` approves (or denies) the oldest request pending there.
    pub fn decide_local(&mut self, agent: NodeId, approve: bool) {
        let now = self.sim.now;
        let Some(a) = self.agents.get_mut(&agent).filter(|a| a.up) else { return };
        let Some(code) = a.gate.pending().first().map(|p| p.code.short()) else { return };
        let action = a.gate.decide(&code, false, |p: &gate::Pending| Decision {
            request: p.id,
            session: p.session,
            target: agent,
            requester: p.requester,
            command_hash: p.request.command.hash(),
            verdict: if approve { Verdict::Approved } else { Verdict::Denied },
            decided_by: "local user".into(),
            decided_at: now,
            expires_at: now,
            nonce: Id128(rand_nonce(now, p.id)),
        });
        if let Ok(action) = action {
            self.act(agent, action);
        }
        self.settle();
    }

    /// Kills an agent: its memory and processes are gone.
    pub fn crash(&mut self, agent: NodeId) {
        if let Some(a) = self.agents.get_mut(&agent) {
            a.up = false;
            a.processes.clear();
            a.waiting.clear();
            a.gate = Gate::new(agent);
        }
        self.sim.crash(agent);
    }

    /// Starts an agent again from its disk; it reads every session it holds.
    pub fn restart(&mut self, agent: NodeId) {
        self.sim.restart(agent);
        if let Some(a) = self.agents.get_mut(&agent) {
            a.up = true;
        }
        let docs: Vec<DocId> = self.sim.hub(agent).docs().map(|(id, _)| id).collect();
        for doc in docs {
            self.refresh(agent, doc);
        }
        self.settle();
    }

    /// Runs the world for `ms`: network, hub timers, agents' timers and processes.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.sim.now + ms;
        loop {
            self.settle();
            let hub = self.sim.next_timer().map(|(at, _)| at);
            let gates = self.agents.values().filter(|a| a.up).filter_map(|a| a.gate.poll_timeout()).min();
            let ends = self.agents.values().flat_map(|a| a.processes.values().map(|(_, end)| *end)).min();
            let Some(next) = [hub, gates, ends].into_iter().flatten().min().filter(|t| *t <= until) else { break };
            self.sim.now = self.sim.now.max(next);
            if let Some((at, id)) = self.sim.next_timer().filter(|(at, _)| *at <= next) {
                self.sim.fire_timer(at, id);
            }
            let now = self.sim.now;
            let ids: Vec<NodeId> = self.agents.keys().copied().collect();
            for id in ids {
                let Some(a) = self.agents.get_mut(&id).filter(|a| a.up) else { continue };
                let due: Vec<Id128> = a.processes.iter().filter(|(_, (_, end))| *end <= now).map(|(r, _)| *r).collect();
                let actions =
                    if a.gate.poll_timeout().is_some_and(|t| t <= now) { a.gate.handle_timeout(now) } else { vec![] };
                for action in actions {
                    self.act(id, action);
                }
                for request in due {
                    self.finish(id, request);
                }
            }
        }
        self.sim.now = self.sim.now.max(until);
        self.settle();
    }

    /// Delivers everything waiting and lets the agents react to what changed, until quiet.
    pub fn settle(&mut self) {
        loop {
            self.sim.run_until_quiet();
            let changed = self.sim.take_changed();
            let waiting = self
                .agents
                .iter()
                .any(|(id, a)| a.up && !a.waiting.is_empty() && self.sim.hub(*id).unwritable().is_none());
            if changed.is_empty() && !waiting {
                return;
            }
            for (at, doc) in changed {
                if self.is_up(at) {
                    self.refresh(at, doc);
                }
            }
            self.start_waiting();
        }
    }

    /// Hands an agent's gate the session as it reads now.
    fn refresh(&mut self, agent: NodeId, doc: DocId) {
        let now = self.sim.now;
        let hub = self.sim.hub(agent);
        let view = hub.doc(&doc).and_then(|d| SessionView::read_without_output(d, hub.fleet()).ok());
        // Revocations are the agent's own word, from its ledger (as the daemon reads them).
        let records = self.sim.records(agent);
        let revoked: Vec<Id128> = view
            .iter()
            .flat_map(|v| v.schedules.iter())
            .map(|s| s.schedule.id)
            .filter(|id| records.contains_key(&LedgerKey::Schedule(*id)))
            .collect();
        let Some(a) = self.agents.get_mut(&agent) else { return };
        for id in revoked {
            a.gate.revoked_earlier(id);
        }
        let actions = a.gate.session(doc, view, now);
        for action in actions {
            self.act(agent, action);
        }
    }

    /// Carries out one of an agent's actions as its daemon does, and reports back.
    fn act(&mut self, agent: NodeId, action: Action) {
        let now = self.sim.now;
        let signer = self.agents[&agent].signer.clone();
        let request = action.request();
        let session = action.session();
        match action {
            Action::Start { session, request, local } => return self.start(agent, &signer, session, request, local),
            Action::Expire { session, request } => {
                let Some((req, requester)) = self.agents[&agent].gate.request(session, request) else { return };
                let d = gate::expiry(&req, requester, agent, now, Id128(rand_nonce(now, request)));
                self.sim.change_guarded(agent, session, |doc, fleet, _| {
                    let view = SessionView::read_without_output(&*doc, fleet).map_err(|e| e.to_string())?;
                    if view.command(&request).is_some_and(|c| c.decision.is_none()) {
                        SessionWriter::decide(doc, &signer, &d).map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>((
                        (),
                        vec![(LedgerKey::Request(request), LedgerRecord { outcome: Outcome::Expired, at: now })],
                    ))
                });
            }
            Action::Interrupted { session, request } => {
                self.write_end(agent, &signer, session, request, EndStatus::Interrupted, true);
            }
            Action::NotRun { session, request, .. } => {
                self.write_end(agent, &signer, session, request, EndStatus::NotRun, false);
            }
            Action::Deny { session, request, decision } => {
                self.sim.change_guarded(agent, session, |doc, fleet, _| {
                    let view = SessionView::read_without_output(&*doc, fleet).map_err(|e| e.to_string())?;
                    if view.command(&request).is_some_and(|c| c.decision.is_none()) {
                        SessionWriter::decide(doc, &signer, &decision).map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>((
                        (),
                        vec![(LedgerKey::Request(request), LedgerRecord { outcome: Outcome::Denied, at: now })],
                    ))
                });
            }
            Action::Consent { session, answer } => {
                let nonce = Id128(rand_nonce(now, answer.schedule));
                self.sim.change_guarded(agent, session, |doc, fleet, _| {
                    let view = SessionView::read_without_output(&*doc, fleet).map_err(|e| e.to_string())?;
                    let consent = recurring::consent_record(&view, answer, agent, now, nonce)?;
                    ScheduleWriter::consent(doc, &signer, &consent).map_err(|e| e.to_string())?;
                    Ok::<_, String>(((), vec![]))
                });
            }
            Action::Run { session, schedule, slot, late } => {
                let due = Due { schedule, slot, late };
                let result = self.sim.change_guarded(agent, session, |doc, fleet, ledger| {
                    let view = SessionView::read_without_output(&*doc, fleet).map_err(|e| e.to_string())?;
                    let plan =
                        recurring::check_run(&view, due, agent, now, &chrono::Local, |k| ledger.get(k).copied())?;
                    ScheduleWriter::run(doc, &signer, &plan.run, plan.start.as_ref().map(|(s, _, _)| s))
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((plan.run.id, plan.ledger))
                });
                match result {
                    Some((Ok(run), true)) => self.spawn(agent, run, session),
                    Some((Ok(run), false)) => {
                        // Kept in memory, not durable yet: the run starts once it is.
                        let records =
                            vec![(LedgerKey::Request(run), LedgerRecord { outcome: Outcome::Started, at: now })];
                        if let Some(a) = self.agents.get_mut(&agent) {
                            a.gate.started(run);
                            a.waiting.push((run, session, records));
                        }
                    }
                    // Refused as the session stands: the daemon says why and waits; so does this.
                    _ => return,
                }
            }
        }
        // As the daemon does: the gate sees the session as written before it hears "done".
        self.refresh(agent, session);
        let actions = self.agents.get_mut(&agent).map(|a| a.gate.done(request, now)).unwrap_or_default();
        for action in actions {
            self.act(agent, action);
        }
    }

    /// The one way a command starts: the real start check against the session and the ledger,
    /// the start and the ledger in one transaction, then the process.
    fn start(&mut self, agent: NodeId, signer: &Signer, session: DocId, request: Id128, local: Option<Decision>) {
        let now = self.sim.now;
        let code = self.agents[&agent].gate.request(session, request).map(|(r, _)| r.approval_code());
        let remote = local.is_none();
        let mut ledger_written = Vec::new();
        let result = self.sim.change_guarded(agent, session, |doc, fleet, ledger| {
            let view = SessionView::read_without_output(&*doc, fleet).map_err(|e| e.to_string())?;
            let local = match (&local, code) {
                (Some(d), Some(code)) => Some((d, code)),
                (Some(_), None) => return Err("the request is no longer valid".to_string()),
                (None, _) => None,
            };
            let plan = gate::check_start(&view, request, local, agent, now, |k| ledger.get(k).copied())?;
            SessionWriter::start(doc, signer, local.map(|(d, _)| d), &plan.start).map_err(|e| e.to_string())?;
            ledger_written.clone_from(&plan.ledger);
            Ok(((), plan.ledger))
        });
        match result {
            Some((Ok(()), true)) => self.spawn(agent, request, session),
            Some((Ok(()), false)) => {
                // Kept in memory, not durable yet: the process waits until it is.
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.waiting.push((request, session, ledger_written));
                }
            }
            Some((Err(why), _)) => {
                let actions = self
                    .agents
                    .get_mut(&agent)
                    .map(|a| a.gate.refused(request, session, remote, why, now))
                    .unwrap_or_default();
                for action in actions {
                    self.act(agent, action);
                }
            }
            None => {}
        }
    }

    /// Starts the process of a request whose start is durable.
    fn spawn(&mut self, agent: NodeId, request: Id128, session: DocId) {
        let now = self.sim.now;
        *self.starts.entry(request).or_default() += 1;
        if let Some(a) = self.agents.get_mut(&agent) {
            a.gate.started(request);
            a.processes.insert(request, (session, now + RUNS_FOR_MS));
        }
    }

    /// Starts whose writes waited for room, once the agent can write again.
    fn start_waiting(&mut self) {
        let ready: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|(id, a)| a.up && !a.waiting.is_empty() && self.sim.hub(**id).unwritable().is_none())
            .map(|(id, _)| *id)
            .collect();
        for agent in ready {
            let waiting = self.agents.get_mut(&agent).map(|a| std::mem::take(&mut a.waiting)).unwrap_or_default();
            for (request, session, records) in waiting {
                if self.sim.write_records(agent, &records) {
                    self.spawn(agent, request, session);
                } else if let Some(a) = self.agents.get_mut(&agent) {
                    a.waiting.push((request, session, records));
                }
            }
        }
    }

    /// The process of `request` ends: its output and its end, in one change.
    fn finish(&mut self, agent: NodeId, request: Id128) {
        let Some((session, _)) = self.agents.get_mut(&agent).and_then(|a| a.processes.remove(&request)) else {
            return;
        };
        let signer = self.agents[&agent].signer.clone();
        let chunk =
            OutputChunk { request, seq: 0, stream: Stream::Stdout, data: format!("ran {request}\n").into_bytes() };
        let end = End {
            request,
            session,
            status: EndStatus::Exited,
            exit_code: Some(0),
            ended_at: self.sim.now,
            chunks: 1,
            message: None,
            probes: Vec::new(),
        };
        let now = self.sim.now;
        let node = self.sim.nodes.get_mut(&agent).expect("agent node");
        let mut out = node.hub.hold_chunks(session, vec![(chunk_hash(&chunk.data), chunk.data.clone())]);
        let refs = [chunk.reference()];
        if let Some((r, more)) =
            node.hub.change(session, now, |d| SessionWriter::end_with_output(d, &signer, &refs, &end))
        {
            r.expect("end written");
            out.extend(more);
        }
        // Not durable on a full disk: kept by the hub and written when it can be (the runner
        // waits for that before it lets go of the command).
        self.sim.apply(agent, out);
        self.refresh(agent, session);
        let now = self.sim.now;
        let actions = self.agents.get_mut(&agent).map(|a| a.gate.ended(request, now)).unwrap_or_default();
        for action in actions {
            self.act(agent, action);
        }
    }

    /// Ends a request that started and never ended (`started`), or never started, with
    /// `status` — unless the session shows otherwise by now.
    fn write_end(
        &mut self,
        agent: NodeId,
        signer: &Signer,
        session: DocId,
        request: Id128,
        status: EndStatus,
        started: bool,
    ) {
        let end = End {
            request,
            session,
            status,
            exit_code: None,
            ended_at: self.sim.now,
            chunks: 0,
            message: None,
            probes: Vec::new(),
        };
        self.sim.change_guarded(agent, session, |doc, fleet, _| {
            let view = SessionView::read_without_output(&*doc, fleet).map_err(|e| e.to_string())?;
            if view.command(&request).is_some_and(|c| c.start.is_some() == started && c.end.is_none()) {
                SessionWriter::end(doc, signer, &end).map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(((), vec![]))
        });
    }
}

fn rand_nonce(now: u64, request: Id128) -> [u8; 16] {
    let mut n = request.0;
    for (i, b) in now.to_be_bytes().iter().enumerate() {
        n[i] ^= b;
    }
    n
}
