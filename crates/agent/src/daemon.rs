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
use crate::local::{AgentApi, LocalReply, LocalRequest, PendingItem};
use crate::{card, runner};
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
}

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
        let actions = self.with_gate(|g| g.session(doc, view, now_ms()));
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
        let (request, session) = match &action {
            Action::Expire { session, request }
            | Action::Interrupted { session, request }
            | Action::Start { session, request, .. }
            | Action::Deny { session, request, .. }
            | Action::NotRun { session, request, .. } => (*request, *session),
        };
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
            Action::Start { .. } => Ok(()),
        }
    }

    /// Ends a request that will never run here, saying why, unless it started or ended meanwhile.
    async fn write_not_run(&self, session: DocId, request: Id128, why: String) -> Result<()> {
        let signer = self.node.signer().clone();
        let end = End {
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
    async fn decide(&self, typed: &str, approve: bool) -> Result<String> {
        let me = self.node.id();
        // Only our own name: not a copy of the whole fleet (a thousand members) per decision.
        let machine = self.node.member_name(me).await?.unwrap_or_default();
        let now = now_ms();
        let action = self
            .with_gate(|g| {
                g.decide(typed, |p| Decision {
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
        let (request, session) = (
            action.request(),
            match &action {
                Action::Start { session, .. } | Action::Deny { session, .. } => *session,
                _ => bail!("unexpected decision"),
            },
        );
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
            .change_guarded(session, move |doc, guard| -> Result<(CommandRequest, Vec<(LedgerKey, LedgerRecord)>)> {
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
                Ok((plan.request, plan.ledger))
            })
            .await?;
        self.with_gate(|g| g.started(id));
        info!(request = %id.short(), script = %request.command.script, "approved; running");
        let agent = self.clone();
        tokio::spawn(async move {
            if let Err(e) = runner::run(agent.node.clone(), session, request).await {
                warn!(request = %id.short(), "run failed: {e:#}");
            }
            // The gate sees the end before the command leaves `running`; otherwise a review in
            // between would take it for a run interrupted by a crash.
            agent.refresh(session).await;
            let actions = agent.with_gate(|g| g.ended(id, now_ms()));
            agent.act_all(actions);
        });
        Ok(())
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
                description: p.request.description,
                requested_at: p.request.requested_at,
                expires_at: p.request.expires_at,
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
            LocalRequest::Approve { id } => self.decide(&id, true).await,
            LocalRequest::Deny { id } => self.decide(&id, false).await,
        };
        Answer::One(match result {
            Ok(message) => LocalReply::Done { message },
            Err(e) => LocalReply::Error { error: format!("{e:#}") },
        })
    }
}
