//! `caisey-agent run`: the endpoint daemon, the IO around the agent's decisions ([`Gate`]).
//!
//! It keeps the agent's node connected to the org's relays, publishes the machine card and a
//! heartbeat, feeds the gate every session that targets this machine and the local user's
//! decisions (over the local socket), wakes it at its next expiry, and carries out what it
//! decides: writes into sessions, and starting commands. The approval and the start are one
//! durable change, written before the process is spawned; so a crash can leave a command
//! *interrupted*, never run twice.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::id::{DocId, Id128};
use caisey_doc::machine::{MachineDoc, machine_doc_id};
use caisey_doc::session::{CommandRequest, Decision, End, EndStatus, SessionView, SessionWriter, Verdict};
use caisey_peer::node::{Node, NodeEvent, NodeOptions};
use caisey_peer::now_ms;
use caisey_peer::store::{LedgerKey, LedgerRecord, Outcome};
use caisey_peer::wire::DocKind;
use tracing::{debug, info, warn};

use crate::gate::{self, Action, Gate, check_still_pending};
use crate::local::{AgentApi, ConsentItem, LocalReply, LocalRequest, PendingItem, ScheduleTerms};
use crate::recurring;
use crate::{card, runner};
use caisey_doc::schedule::{ProbePattern, ScheduleRevoked, ScheduleState, ScheduleWriter};
use caisey_peer::local::{self, Answer, Clients};

/// How often the agent says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// How soon a change in whether the store can be written is told, in a heartbeat.
const STORAGE_BEAT_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Agent {
    node: Node,
    gate: Arc<Mutex<Gate>>,
    /// One refresh at a time: a refresh reads a session, then hands its view to the gate;
    /// interleaved, an older read could be handed over after a newer one.
    refreshing: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the event loop when the gate's next expiry may have changed.
    rearm: Arc<tokio::sync::Notify>,
    /// Scheduled runs running now, by run: their schedule, and how to stop them (a revocation
    /// stops them at once).
    stops: Arc<Mutex<RunStops>>,
    /// Schedules whose entry in this agent's ledger has been read since it started.
    ledger_read: Arc<Mutex<std::collections::BTreeSet<Id128>>>,
}

/// Scheduled runs under way: run id -> (its schedule, what stops it).
type RunStops = std::collections::BTreeMap<Id128, (Id128, Arc<tokio::sync::Notify>)>;

/// How long an action whose write failed waits before it is tried again.
const RETRY_FAILED: Duration = Duration::from_secs(5);

/// Who besides the agent's own user may use its local socket: list, approve and deny requests
/// (`caisey-agent pending`, the consent window). An agent running as root for the whole machine
/// shares it with a group holding the machine's users.
#[derive(Debug, Clone, Default)]
pub struct LocalAccess {
    pub consent_group: Option<String>,
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(opts: NodeOptions, access: LocalAccess, shutdown: impl Future<Output = ()>) -> Result<()> {
    // Checked before the node starts: a wrong group is one line, not a half-started agent.
    let gid = match &access.consent_group {
        Some(name) => Some(local::socket::group_id(name).context("the consent group")?),
        None => None,
    };
    run_node_with(Node::start(opts).await?, gid, shutdown).await
}

/// Runs the daemon on an already started node (the demo enrolls and runs on one node).
pub async fn run_node(node: Node, shutdown: impl Future<Output = ()>) -> Result<()> {
    run_node_with(node, None, shutdown).await
}

async fn run_node_with(node: Node, consent_gid: Option<u32>, shutdown: impl Future<Output = ()>) -> Result<()> {
    if node.fleet_doc().await?.is_none() {
        node.shutdown().await;
        bail!("this agent is not enrolled; run `caisey-agent enroll TOKEN` first");
    }
    let agent = Agent {
        node: node.clone(),
        gate: Arc::new(Mutex::new(Gate::new(node.id()))),
        refreshing: Arc::default(),
        rearm: Arc::default(),
        stops: Arc::default(),
        ledger_read: Arc::default(),
    };
    let mut events = node.subscribe();
    node.keep_connected();
    agent.publish_card().await?;
    // Anything started by an earlier run and never ended is recorded as interrupted as its
    // session is read.
    for doc in node.sessions().await? {
        agent.refresh(doc).await;
    }
    let listener = local::socket::bind(&node.home().socket_path())?;
    if let Some(gid) = consent_gid {
        listener.share_with_group(gid)?;
    }
    let server = tokio::spawn({
        let agent = agent.clone();
        async move {
            if let Err(e) = local::serve(listener, agent, Clients::default()).await {
                warn!("local approval socket failed: {e:#}");
            }
        }
    });
    info!(node = %node.id().short(), "agent running");
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    // A store that stops (or starts again) being writable is told at once, in a heartbeat
    // (at most one every few seconds: a disk at its limit flips often).
    let mut storage = node.storage_changes();
    let mut storage_open = true;
    let mut storage_beat: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ev = events.recv() => match ev {
                Ok(NodeEvent::DocChanged(doc)) => agent.refresh(doc).await,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for doc in node.sessions().await? {
                        agent.refresh(doc).await;
                    }
                }
                Err(_) => break,
            },
            // The gate's next expiry (its timer lives in it; this only sleeps until then).
            _ = agent.next_expiry() => {
                let actions = agent.with_gate_quiet(|g| g.handle_timeout(now_ms()));
                agent.act_all(actions);
            },
            _ = heartbeat.tick() => agent.heartbeat().await,
            changed = storage.changed(), if storage_open => match changed {
                Ok(()) => {
                    storage_beat.get_or_insert_with(|| tokio::time::Instant::now() + STORAGE_BEAT_DELAY);
                }
                Err(_) => storage_open = false,
            },
            _ = tokio::time::sleep_until(storage_beat.unwrap_or_else(tokio::time::Instant::now)), if storage_beat.is_some() => {
                storage_beat = None;
                agent.heartbeat().await;
            },
        }
    }
    server.abort();
    let _ = std::fs::remove_file(node.home().socket_path());
    node.shutdown().await;
    Ok(())
}

impl Agent {
    /// Writes the machine card and presence into this agent's machine document (created on the
    /// first run), which syncs to technicians, relays and this machine's approvers only.
    async fn publish_card(&self) -> Result<()> {
        let id = machine_doc_id(&self.node.id());
        let signer = self.node.signer().clone();
        let addrs = self.node.addrs();
        let card = card::read(now_ms());
        if self.node.read(id, |_| ()).await?.is_none() {
            let doc = MachineDoc::create(&signer, &card, addrs, now_ms())?;
            return self.node.create(id, DocKind::Machine, doc).await;
        }
        self.node.change(id, move |d| MachineDoc::put(d, &signer, &card, addrs, now_ms())).await??;
        Ok(())
    }

    /// Tells the org this machine is here, with its live vitals (read off the async threads:
    /// disks and network interfaces are system calls).
    async fn heartbeat(&self) {
        let vitals = tokio::task::spawn_blocking(card::vitals).await.ok();
        if let Err(e) = self.node.announce_presence_with(vitals).await {
            warn!("heartbeat failed: {e:#}");
        }
    }

    fn with_stops<R>(&self, f: impl FnOnce(&mut RunStops) -> R) -> R {
        f(&mut self.stops.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Runs `f` on the gate (never across an await).
    fn with_gate<R>(&self, f: impl FnOnce(&mut Gate) -> R) -> R {
        let mut gate = self.gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = f(&mut gate);
        drop(gate);
        self.rearm.notify_one();
        r
    }

    /// Resolves at the gate's next expiry, or as soon as that may have moved (the gate was
    /// used since): the caller then lets the gate look, and asks again.
    async fn next_expiry(&self) {
        let due = self.with_gate_quiet(|g| g.poll_timeout());
        let rearmed = self.rearm.notified();
        match due {
            Some(at) => {
                let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = rearmed => {}
                }
            }
            None => rearmed.await,
        }
    }

    /// [`Agent::with_gate`] without waking the event loop (for reading the timer itself).
    fn with_gate_quiet<R>(&self, f: impl FnOnce(&mut Gate) -> R) -> R {
        f(&mut self.gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Re-reads one session after it changed and hands it to the gate; carries out what that
    /// decides.
    async fn refresh(&self, doc: DocId) {
        let _one_at_a_time = self.refreshing.lock().await;
        // Read where the fleet is, rather than copying it for every change of every session.
        let view = self
            .node
            .read_with_fleet(doc, |d, fleet| SessionView::read_without_output(d, fleet).ok())
            .await
            .ok()
            .flatten()
            .flatten();
        debug!(doc = %doc.short(), "session refreshed");
        // Revocations are this machine's own word, kept in its ledger: whatever the document
        // now shows (a peer may have removed the record), a revoked schedule stays revoked. The
        // ledger is read once per schedule per start (later revocations go through `revoke`).
        let unread: Vec<Id128> = {
            let read = self.ledger_read.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            view.iter()
                .flat_map(|v| v.schedules.iter())
                .map(|s| s.schedule.id)
                .filter(|id| !read.contains(id))
                .collect()
        };
        let mut revoked = Vec::new();
        for id in unread {
            // A store that cannot be read now is asked again at the next refresh.
            if let Ok(found) = self.node.ledger(LedgerKey::Schedule(id)).await {
                self.ledger_read.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id);
                revoked.extend(found.map(|_| id));
            }
        }
        let actions = self.with_gate(|g| {
            revoked.into_iter().for_each(|id| g.revoked_earlier(id));
            g.session(doc, view, now_ms())
        });
        self.act_all(actions);
    }

    /// Carries out each action in its own task, reporting back to the gate.
    fn act_all(&self, actions: Vec<Action>) {
        for action in actions {
            let agent = self.clone();
            tokio::spawn(async move { agent.act(action).await });
        }
    }

    /// Carries out one action and reports to the gate. A write that fails is tried again after
    /// [`RETRY_FAILED`] (the gate asks again once it is reported done).
    async fn act(&self, action: Action) {
        let (request, session) = (action.request(), action.session());
        if let Action::Run { schedule, slot, late, .. } = action {
            if let Err(e) = self.run_scheduled(session, schedule, slot, late).await {
                warn!(schedule = %schedule.short(), "a scheduled run was not started: {e:#}");
                tokio::time::sleep(RETRY_FAILED).await;
            }
            let actions = self.with_gate(|g| g.done(schedule, now_ms()));
            self.act_all(actions);
            return;
        }
        if let Action::Start { local, .. } = action {
            let remote = local.is_none();
            if let Err(e) = self.start(session, request, local).await {
                if remote {
                    warn!(request = %request.short(), "an approval could not be used: {e:#}");
                }
                let actions = self.with_gate(|g| g.refused(request, session, remote, format!("{e:#}"), now_ms()));
                self.act_all(actions);
            }
            return;
        }
        let result = self.write(action).await;
        self.refresh(session).await;
        if let Err(e) = result {
            warn!(request = %request.short(), "{e:#}");
            tokio::time::sleep(RETRY_FAILED).await;
        }
        let actions = self.with_gate(|g| g.done(request, now_ms()));
        self.act_all(actions);
    }

    /// Writes what the gate decided into the session, each time checked against the session as
    /// it stands at the moment of writing.
    async fn write(&self, action: Action) -> Result<()> {
        let signer = self.node.signer().clone();
        let me = self.node.id();
        match action {
            Action::Expire { session, request } => {
                let Some((req, requester)) = self.with_gate_quiet(|g| g.request(session, request)) else {
                    return Ok(());
                };
                info!(request = %request.short(), "request expired without a decision");
                let d = gate::expiry(&req, requester, me, now_ms(), Id128(rand::random()));
                self.record_decision(session, request, Outcome::Expired, move |view, doc| {
                    // Decided meanwhile? Then it did not expire.
                    if view.command(&request).is_some_and(|c| c.decision.is_none()) {
                        SessionWriter::decide(doc, &signer, &d)?;
                    }
                    Ok(())
                })
                .await
            }
            Action::Deny { session, request, decision } => {
                let code = self.with_gate_quiet(|g| g.request(session, request)).map(|(r, _)| r.approval_code());
                let code = code.ok_or_else(|| anyhow!("request {} is no longer valid", request.short()))?;
                self.record_decision(session, request, Outcome::Denied, move |view, doc| {
                    check_still_pending(view, request, code, me, now_ms()).map_err(|e| anyhow!(e))?;
                    Ok(SessionWriter::decide(doc, &signer, &decision)?)
                })
                .await?;
                info!(request = %request.short(), "denied by the local user");
                Ok(())
            }
            Action::Interrupted { session, request } => {
                // What is left of it, if anything ignored the signal it got when the agent died.
                let key = runner::running_key(&request);
                let running: Option<crate::process::Running> =
                    self.node.setting(&key).await?.and_then(|b| serde_json::from_slice(&b).ok());
                let killed = running.is_some_and(|r| r.kill_survivors());
                let message = if killed {
                    "the agent stopped while the command ran; what was left of it was killed when the agent \
                     restarted, and it was not run again"
                } else {
                    "the agent stopped while the command ran, and the command was stopped with it; it was not run again"
                };
                let end = End {
                    probes: Vec::new(),
                    request,
                    session,
                    status: EndStatus::Interrupted,
                    exit_code: None,
                    ended_at: now_ms(),
                    chunks: 0,
                    message: Some(message.into()),
                };
                self.node
                    .change_guarded(session, move |doc, guard| {
                        // Only if it still has no end, as the document stands now.
                        let view = SessionView::read_without_output(&*doc, guard.fleet())?;
                        if view.command(&request).is_some_and(|c| c.start.is_some() && c.end.is_none()) {
                            warn!(request = %request.short(), killed, "command was running when the agent stopped; recording it as interrupted");
                            SessionWriter::end(doc, &signer, &end)?;
                        }
                        Ok(((), vec![]))
                    })
                    .await?;
                self.node.forget_setting(&key).await
            }
            Action::NotRun { session, request, why } => self.write_not_run(session, request, why).await,
            Action::Consent { session, answer } => {
                let (schedule, verdict, each_run) = (answer.schedule, answer.verdict, answer.each_run);
                let nonce = Id128(rand::random());
                self.node
                    .change_guarded(session, move |doc, guard| {
                        let view = SessionView::read_without_output(&*doc, guard.fleet())?;
                        let consent =
                            recurring::consent_record(&view, answer, me, now_ms(), nonce).map_err(|e| anyhow!(e))?;
                        ScheduleWriter::consent(doc, &signer, &consent)?;
                        Ok(((), vec![]))
                    })
                    .await?;
                info!(schedule = %schedule.short(), ?verdict, each_run, "schedule answered");
                Ok(())
            }
            Action::Start { .. } | Action::Run { .. } => Ok(()),
        }
    }

    /// Ends a request that will never run here, saying why, unless it started or ended meanwhile.
    async fn write_not_run(&self, session: DocId, request: Id128, why: String) -> Result<()> {
        let signer = self.node.signer().clone();
        let end = End {
            probes: Vec::new(),
            request,
            session,
            status: EndStatus::NotRun,
            exit_code: None,
            ended_at: now_ms(),
            chunks: 0,
            message: Some(why),
        };
        self.node
            .change_guarded(session, move |doc, guard| {
                let view = SessionView::read_without_output(&*doc, guard.fleet())?;
                if view.command(&request).is_some_and(|c| c.start.is_none() && c.end.is_none()) {
                    info!(request = %request.short(), why = ?end.message, "recording that it will not run");
                    SessionWriter::end(doc, &signer, &end)?;
                }
                Ok(((), vec![]))
            })
            .await
    }

    /// The local user's decision on the request with approval code `typed`; the reply says
    /// what became of it.
    async fn decide(&self, typed: &str, approve: bool, each_run: bool) -> Result<String> {
        let me = self.node.id();
        // Only our own name: not a copy of the whole fleet (a thousand members) per decision.
        let machine = self.node.member_name(me).await?.unwrap_or_default();
        let now = now_ms();
        let action = self
            .with_gate(|g| {
                g.decide(typed, each_run, |p: &gate::Pending| Decision {
                    request: p.id,
                    session: p.session,
                    target: me,
                    requester: p.requester,
                    command_hash: p.request.command.hash(),
                    verdict: if approve { Verdict::Approved } else { Verdict::Denied },
                    decided_by: format!("local user on {machine}"),
                    decided_at: now,
                    expires_at: now,
                    nonce: Id128(rand::random()),
                })
            })
            .map_err(|e| anyhow!(e))?;
        let (request, session) = (action.request(), action.session());
        if let Action::Consent { answer, .. } = &action {
            let verdict = answer.verdict;
            let result = self.write(action).await;
            self.refresh(session).await;
            let actions = self.with_gate(|g| g.done(request, now_ms()));
            self.act_all(actions);
            result?;
            return Ok(match (verdict, each_run) {
                (Verdict::Approved, false) => format!("approved schedule {} for all its runs", request.short()),
                (Verdict::Approved, true) => format!("approved schedule {}; each run will ask", request.short()),
                _ => format!("denied schedule {}", request.short()),
            });
        }
        let code = self.with_gate_quiet(|g| g.request(session, request)).map(|(r, _)| r.approval_code().short());
        let code = code.unwrap_or_else(|| request.short());
        match action {
            Action::Start { local, .. } => match self.start(session, request, local).await {
                Ok(()) => Ok(format!("approved {code}; running")),
                Err(e) => {
                    let actions = self.with_gate(|g| g.refused(request, session, false, format!("{e:#}"), now_ms()));
                    self.act_all(actions);
                    Err(e)
                }
            },
            deny => {
                let result = self.write(deny).await;
                // The reply must already hold: a `pending` (or the consent window's next poll)
                // right after a deny must not list the request.
                self.refresh(session).await;
                let actions = self.with_gate(|g| g.done(request, now_ms()));
                self.act_all(actions);
                result.map(|()| format!("denied {code}"))
            }
        }
    }

    /// Writes a denial or expiry into the session (via `write`, which checks the session as it is
    /// now) and remembers it in this agent's store in the same transaction, so that no approval
    /// merged in later can start the request.
    async fn record_decision(
        &self,
        session: DocId,
        id: Id128,
        what: Outcome,
        write: impl FnOnce(&SessionView, &mut caisey_doc::automerge::Automerge) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let record = (LedgerKey::Request(id), LedgerRecord { outcome: what, at: now_ms() });
        self.node
            .change_guarded(session, move |doc, guard| {
                let view = SessionView::read_without_output(&*doc, guard.fleet())?;
                write(&view, doc)?;
                Ok(((), vec![record]))
            })
            .await
    }

    /// The one way a command starts: re-checks the approval against the document as it is now,
    /// records its nonce as consumed and the start in the session (with the local decision, if
    /// it is one), durably, and only then spawns the process. Reports the start to the gate;
    /// a refusal is the caller's to report.
    async fn start(&self, session: DocId, id: Id128, local: Option<Decision>) -> Result<()> {
        let me = self.node.id();
        let signer = self.node.signer().clone();
        let code = self.with_gate_quiet(|g| g.request(session, id)).map(|(r, _)| r.approval_code());
        let request = self
            .node
            .change_guarded(session, move |doc, guard| -> Result<_> {
                let view = SessionView::read_without_output(&*doc, guard.fleet())?;
                let local = match (&local, code) {
                    (Some(d), Some(code)) => Some((d, code)),
                    (Some(_), None) => bail!("request {} is no longer valid", id.short()),
                    (None, _) => None,
                };
                let ledger = |key: &LedgerKey| guard.ledger(key).ok().flatten();
                let plan = gate::check_start(&view, id, local, me, now_ms(), ledger).map_err(|e| anyhow!(e))?;
                SessionWriter::start(doc, &signer, local.map(|(d, _)| d), &plan.start)?;
                // The nonce, the ledger and the start: one transaction.
                Ok(((plan.request, plan.probes, plan.schedule), plan.ledger))
            })
            .await?;
        let (request, probes, schedule) = request;
        self.with_gate(|g| g.started(id));
        info!(request = %id.short(), script = %request.command.script, "approved; running");
        self.spawn_runner(session, request, probes, schedule);
        Ok(())
    }

    /// Runs a started command to its end, then tells the gate.
    /// `schedule`: the schedule it is a run of (a revocation of it stops the run).
    fn spawn_runner(
        &self,
        session: DocId,
        request: CommandRequest,
        probes: Vec<ProbePattern>,
        schedule: Option<Id128>,
    ) {
        let id = request.id;
        let agent = self.clone();
        let stop = schedule.map(|s| {
            let stop = Arc::new(tokio::sync::Notify::new());
            self.with_stops(|stops| stops.insert(id, (s, stop.clone())));
            // Revoked between its start and now: it stops at once too.
            if self.with_gate_quiet(|g| g.is_revoked(&s)) {
                stop.notify_one();
            }
            stop
        });
        tokio::spawn(async move {
            if let Err(e) = runner::run(agent.node.clone(), session, request, &probes, stop).await {
                warn!(request = %id.short(), "run failed: {e:#}");
            }
            agent.with_stops(|stops| stops.remove(&id));
            // The gate sees the end before the command leaves `running`; otherwise a review in
            // between would take it for a run interrupted by a crash.
            agent.refresh(session).await;
            let actions = agent.with_gate(|g| g.ended(id, now_ms()));
            agent.act_all(actions);
        });
    }

    /// Writes the run of `schedule` due at `slot` — checked against the session and the ledger
    /// as they stand at the moment of writing — and, under standing consent, its start in the
    /// same durable change; then runs it.
    async fn run_scheduled(&self, session: DocId, schedule: Id128, slot: u64, late: bool) -> Result<()> {
        let me = self.node.id();
        let signer = self.node.signer().clone();
        let plan = self
            .node
            .change_guarded(session, move |doc, guard| {
                let view = SessionView::read_without_output(&*doc, guard.fleet())?;
                let ledger = |key: &LedgerKey| guard.ledger(key).ok().flatten();
                let plan = recurring::check_run(
                    &view,
                    recurring::Due { schedule, slot, late },
                    me,
                    now_ms(),
                    &chrono::Local,
                    ledger,
                )
                .map_err(|e| anyhow!(e))?;
                ScheduleWriter::run(doc, &signer, &plan.run, plan.start.as_ref().map(|(s, _, _)| s))?;
                let ledger = plan.ledger.clone();
                Ok((plan, ledger))
            })
            .await?;
        let run = plan.run.id;
        match plan.start {
            Some((_, request, probes)) => {
                // Running before the gate sees the start, or it would take it for interrupted.
                self.with_gate(|g| g.started(run));
                info!(schedule = %schedule.short(), run = %run.short(), late, "scheduled run due; running");
                self.refresh(session).await;
                self.spawn_runner(session, request, probes, Some(schedule));
            }
            None => {
                info!(schedule = %schedule.short(), run = %run.short(), late, "scheduled run due; asking the user");
                self.refresh(session).await;
            }
        }
        Ok(())
    }

    /// The endpoint user takes back their consent to a schedule: recorded in this agent's
    /// ledger (which alone it obeys from now on) and in the session, in one durable change.
    async fn revoke(&self, typed: &str) -> Result<String> {
        let typed = typed.trim().to_ascii_lowercase();
        if typed.len() < 8 {
            bail!("give at least the 8 characters of the schedule id that `caisey-agent consents` shows");
        }
        let found: Vec<_> = self
            .with_gate_quiet(|g| g.schedules())
            .into_iter()
            .filter(|(_, _, s, _)| s.schedule.id.to_hex().starts_with(&typed))
            .collect();
        let (session, schedule) = match found.as_slice() {
            [(doc, _, s, _)] => (*doc, s.schedule.id),
            [] => bail!("no schedule {typed} for this machine (see `caisey-agent consents`)"),
            _ => bail!("{typed} matches {} schedules; give more of the id", found.len()),
        };
        let machine = self.node.member_name(self.node.id()).await?.unwrap_or_default();
        let signer = self.node.signer().clone();
        let now = now_ms();
        let record = ScheduleRevoked { schedule, session, at: now, by: format!("local user on {machine}") };
        self.node
            .change_guarded(session, move |doc, _guard| {
                ScheduleWriter::revoked(doc, &signer, &record)?;
                Ok(((), vec![(LedgerKey::Schedule(schedule), LedgerRecord { outcome: Outcome::Revoked, at: now })]))
            })
            .await?;
        info!(schedule = %schedule.short(), "standing consent revoked by the local user");
        // The gate first, then whatever of it runs now stops at once (a run registering its stop
        // meanwhile finds the gate's word: see `spawn_runner`).
        let actions = self.with_gate(|g| g.revoke(schedule, now_ms()));
        self.with_stops(|stops| stops.values().filter(|(s, _)| *s == schedule).for_each(|(_, stop)| stop.notify_one()));
        self.act_all(actions);
        Ok(format!("revoked schedule {}; it will not run again on this machine", schedule.short()))
    }

    async fn consent_items(&self) -> Vec<ConsentItem> {
        let now = now_ms();
        let schedules = self.with_gate_quiet(|g| {
            g.schedules()
                .into_iter()
                .map(|(doc, name, s, revoked)| (doc, name, g.next_run(&s, now), s, revoked))
                .collect::<Vec<_>>()
        });
        let mut items = Vec::with_capacity(schedules.len());
        for (_, session, next_run, s, revoked) in schedules {
            let technician = self.node.member_name(s.author).await.ok().flatten().unwrap_or_else(|| "unknown".into());
            let state = if revoked { ScheduleState::Revoked } else { s.state(now) };
            items.push(ConsentItem {
                schedule: s.schedule.id,
                session,
                technician,
                state,
                every: s.schedule.every.clone(),
                until: s.schedule.until,
                script: s.schedule.command.script.clone(),
                description: s.schedule.description.clone(),
                runs: s.runs.len(),
                next_run,
            });
        }
        items
    }

    async fn pending_items(&self) -> Vec<PendingItem> {
        let pending = self.with_gate_quiet(|g| g.pending().to_vec());
        let mut items = Vec::with_capacity(pending.len());
        for p in pending {
            let technician =
                self.node.member_name(p.requester).await.ok().flatten().unwrap_or_else(|| "unknown".into());
            items.push(PendingItem {
                id: p.code,
                request: p.id,
                session: p.session_name,
                technician,
                technician_key: p.requester,
                shell: p.request.command.shell,
                script: p.request.command.script,
                cwd: p.request.command.cwd,
                timeout_ms: p.request.command.timeout_ms,
                collect: p.request.command.collect,
                description: p.request.description,
                requested_at: p.request.requested_at,
                expires_at: p.request.expires_at,
                schedule: p.schedule.map(|s| ScheduleTerms {
                    every: s.every,
                    until: s.until,
                    missed: s.missed,
                    probes: s.probes.into_iter().map(|p| p.name).collect(),
                }),
            });
        }
        items
    }
}

impl caisey_peer::local::Service for Agent {
    type Api = AgentApi;

    async fn handle(&self, req: LocalRequest) -> Answer<LocalReply> {
        let result = match req {
            LocalRequest::Pending => {
                let running = self.with_gate_quiet(|g| g.running_codes());
                return Answer::One(LocalReply::Pending { pending: self.pending_items().await, running });
            }
            LocalRequest::Approve { id, each_run } => self.decide(&id, true, each_run).await,
            LocalRequest::Deny { id } => self.decide(&id, false, false).await,
            LocalRequest::Consents => {
                return Answer::One(LocalReply::Consents { consents: self.consent_items().await });
            }
            LocalRequest::Revoke { id } => self.revoke(&id).await,
        };
        Answer::One(match result {
            Ok(message) => LocalReply::Done { message },
            Err(e) => LocalReply::Error { error: format!("{e:#}") },
        })
    }
}
