//! `caisey-agent run`: the endpoint daemon.
//!
//! It keeps the agent's node connected to the org's relays, publishes the machine card and a
//! heartbeat, watches the sessions that target this machine, and runs a command only after the
//! local user approved that exact request over the local socket. The approval and the start are
//! one durable change, written before the process is spawned; so a crash can leave a command
//! *interrupted*, never run twice.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::id::NodeId;
use caisey_doc::id::{DocId, Id128};
use caisey_doc::machine::{MachineDoc, machine_doc_id};
use caisey_doc::session::{CommandRequest, Decision, End, EndStatus, SessionView, SessionWriter, Start, Verdict};
use caisey_peer::node::{LocalRecord, Node, NodeEvent, NodeOptions};
use caisey_peer::now_ms;
use caisey_peer::wire::DocKind;
use tracing::{debug, info, warn};

use crate::gate::{self, Action, Pending};
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
    state: Arc<Mutex<State>>,
    /// One refresh at a time: a refresh reads a session, then stores its view; interleaved, an
    /// older read could be stored over a newer one.
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct State {
    /// Sessions targeting this agent, read without output.
    views: BTreeMap<DocId, SessionView>,
    pending: Vec<Pending>,
    running: BTreeSet<Id128>,
    /// Requests a (remote) approval could not start, e.g. because this machine's user had denied
    /// them first: not retried.
    refused: BTreeSet<Id128>,
}

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
    let agent = Agent { node: node.clone(), state: Arc::default(), refreshing: Arc::default() };
    let mut events = node.subscribe();
    node.keep_connected();
    agent.publish_card().await?;
    for doc in node.sessions().await? {
        agent.refresh(doc).await;
    }
    // Anything started by an earlier run and never ended is recorded as interrupted now.
    agent.review().await;
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
    let mut tick = tokio::time::interval(Duration::from_secs(1));
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
                Ok(NodeEvent::DocChanged(doc)) => {
                    agent.refresh(doc).await;
                    agent.review().await;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for doc in node.sessions().await? {
                        agent.refresh(doc).await;
                    }
                    agent.review().await;
                }
                Err(_) => break,
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
            _ = tick.tick() => agent.review().await,
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

    /// Re-reads one session (if it targets us) after it changed.
    async fn refresh(&self, doc: DocId) {
        let _one_at_a_time = self.refreshing.lock().await;
        let me = self.node.id();
        // Read where the fleet is, rather than copying it for every change of every session.
        let view = self
            .node
            .read_with_fleet(doc, |d, fleet| SessionView::read_without_output(d, fleet).ok())
            .await
            .ok()
            .flatten()
            .flatten()
            .filter(|v| v.targets.contains(&me));
        debug!(doc = %doc.short(), targets_me = view.is_some(), "session refreshed");
        if let Ok(mut st) = self.state.lock() {
            match view {
                Some(v) => {
                    st.views.insert(doc, v);
                }
                None => {
                    st.views.remove(&doc);
                }
            }
        }
    }

    /// Recomputes what waits for the user and writes expiries and interruptions.
    async fn review(&self) {
        let actions = {
            let Ok(mut st) = self.state.lock() else { return };
            let views: Vec<(DocId, SessionView)> = st.views.iter().map(|(k, v)| (*k, v.clone())).collect();
            let (pending, actions) = gate::review(self.node.id(), &views, &st.running, now_ms());
            st.pending = pending;
            actions
        };
        for action in actions {
            if let Err(e) = self.act(action).await {
                warn!("{e:#}");
            }
        }
    }

    async fn act(&self, action: Action) -> Result<()> {
        let signer = self.node.signer().clone();
        let me = self.node.id();
        match action {
            Action::Expire { session, request } => {
                let Some((req, requester)) = self.request(session, request) else { return Ok(()) };
                info!(request = %request.short(), "request expired without a decision");
                let now = now_ms();
                let d = Decision {
                    request,
                    session,
                    target: me,
                    requester,
                    command_hash: req.command.hash(),
                    verdict: Verdict::Expired,
                    decided_by: "nobody (the request expired)".into(),
                    decided_at: now,
                    expires_at: now,
                    nonce: Id128(rand::random()),
                };
                self.record_decision(session, request, b"expired", move |view, doc| {
                    // Decided meanwhile? Then it did not expire.
                    if view.command(&request).is_some_and(|c| c.decision.is_none()) {
                        SessionWriter::decide(doc, &signer, &d)?;
                    }
                    Ok(())
                })
                .await?;
            }
            Action::Interrupted { session, request } => {
                if self.state.lock().map_err(|_| anyhow!("agent state poisoned"))?.running.contains(&request) {
                    return Ok(());
                }
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
                self.node.forget_setting(&key).await?;
            }
            Action::RunApproved { session, request } => {
                if self.state.lock().map_err(|_| anyhow!("agent state poisoned"))?.refused.contains(&request) {
                    return Ok(());
                }
                if let Err(e) = self.consume_and_run(session, request, None).await {
                    if e.downcast_ref::<AlreadyStarting>().is_some() {
                        return Ok(());
                    }
                    self.state.lock().map_err(|_| anyhow!("agent state poisoned"))?.refused.insert(request);
                    // Refused for good (denied here, used, expired): every view must say so, not
                    // show an approved command as running forever.
                    let why = format!("the approval was not used: {e:#}");
                    self.write_not_run(session, request, why).await?;
                    warn!(request = %request.short(), "an approval could not be used: {e:#}");
                }
            }
            Action::NotRun { session, request, why } => self.write_not_run(session, request, why.to_string()).await?,
        }
        Ok(())
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

    fn request(&self, session: DocId, id: Id128) -> Option<(CommandRequest, NodeId)> {
        let st = self.state.lock().ok()?;
        let c = st.views.get(&session)?.command(&id)?;
        Some((c.request.clone(), c.requester))
    }

    fn find_pending(&self, prefix: &str) -> Result<Pending> {
        let prefix =
            caisey_doc::session::typed_approval_code(prefix, "caisey-agent pending").map_err(|e| anyhow!(e))?;
        let st = self.state.lock().map_err(|_| anyhow!("agent state poisoned"))?;
        let matches: Vec<&Pending> = st.pending.iter().filter(|p| p.code.to_hex().starts_with(&prefix)).collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                bail!("no pending request {prefix}; it may have changed or been decided (see `caisey-agent pending`)")
            }
            _ => bail!("{prefix} matches {} pending requests; give more of the code", matches.len()),
        }
    }

    /// The local user's decision on the request with approval code `prefix`.
    async fn decide(&self, prefix: &str, approve: bool) -> Result<String> {
        let p = self.find_pending(prefix)?;
        let me = self.node.id();
        // Only our own name: not a copy of the whole fleet (a thousand members) per decision.
        let machine = self.node.member_name(me).await?.unwrap_or_default();
        let now = now_ms();
        let decision = Decision {
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
        };
        if approve {
            self.consume_and_run(p.session, p.id, Some((decision, p.code))).await?;
            return Ok(format!("approved {}; running", p.code.short()));
        }
        let (session, id, code, signer) = (p.session, p.id, p.code, self.node.signer().clone());
        self.record_decision(session, id, b"denied", move |view, doc| {
            check_still_pending(view, id, code, me, now)?;
            Ok(SessionWriter::decide(doc, &signer, &decision)?)
        })
        .await?;
        // The event loop will also see this change, but the reply must already hold: a `pending`
        // (or the consent window's next poll) right after a deny must not list the request.
        self.refresh(session).await;
        self.review().await;
        info!(request = %id.short(), "denied by the local user");
        Ok(format!("denied {}", code.short()))
    }

    /// Writes a denial or expiry into the session (via `write`, which checks the session as it is
    /// now) and remembers it in this agent's store in the same transaction, so that no approval
    /// merged in later can start the request.
    async fn record_decision(
        &self,
        session: DocId,
        id: Id128,
        what: &'static [u8],
        write: impl FnOnce(&SessionView, &mut caisey_doc::automerge::Automerge) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let record = LocalRecord { key: request_key(&id), value: what.to_vec() };
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
    /// it is one), durably, and only then spawns the process.
    async fn consume_and_run(&self, session: DocId, id: Id128, local: Option<(Decision, Id128)>) -> Result<()> {
        let me = self.node.id();
        let signer = self.node.signer().clone();
        // Marked running first, so the change below is never mistaken for an interrupted run;
        // and only one caller at a time may try to start a request.
        if !self.state.lock().map_err(|_| anyhow!("agent state poisoned"))?.running.insert(id) {
            return Err(AlreadyStarting(id).into());
        }
        let consumed = self
            .node
            .change_guarded(session, move |doc, guard| -> Result<(CommandRequest, Vec<LocalRecord>)> {
                let now = now_ms();
                let view = SessionView::read_without_output(&*doc, guard.fleet())?;
                let (approved_by, nonce) = match &local {
                    Some((d, code)) => {
                        check_still_pending(&view, id, *code, me, now)?;
                        (me, d.nonce)
                    }
                    None => {
                        let cmd = view.command(&id).ok_or_else(|| anyhow!("request {} is not valid", id.short()))?;
                        let (Some(d), Some(by)) = (&cmd.decision, cmd.decided_by_node) else {
                            bail!("request {} has no valid approval", id.short());
                        };
                        if d.verdict != Verdict::Approved || cmd.start.is_some() {
                            bail!("request {} is not approved or already started", id.short());
                        }
                        if now > d.expires_at || now > cmd.request.expires_at {
                            bail!("the approval of {} expired before it could be used", id.short());
                        }
                        (by, d.nonce)
                    }
                };
                let key = format!("consumed/{nonce}");
                if guard.local_record(&key)?.is_some() {
                    bail!("approval {} was already used; it is never used twice", nonce.short());
                }
                // What this agent decided or started is remembered here, whatever a merge of the
                // session later shows: a request is started at most once, never after a denial.
                if let Some(done) = guard.local_record(&request_key(&id))? {
                    bail!("request {} was already {} on this machine", id.short(), String::from_utf8_lossy(&done));
                }
                let request =
                    view.command(&id).map(|c| c.request.clone()).ok_or_else(|| anyhow!("request vanished"))?;
                let start = Start { request: id, session, started_at: now, approved_by, nonce };
                let decision = local.as_ref().map(|(d, _)| d.clone());
                SessionWriter::start(doc, &signer, decision.as_ref(), &start)?;
                // The nonce, the local record and the start: one transaction.
                let consumed = vec![
                    LocalRecord { key, value: now.to_be_bytes().to_vec() },
                    LocalRecord { key: request_key(&id), value: b"started".to_vec() },
                ];
                Ok((request, consumed))
            })
            .await;
        let request = match consumed {
            Ok(request) => request,
            Err(e) => {
                self.state.lock().map_err(|_| anyhow!("agent state poisoned"))?.running.remove(&id);
                return Err(e);
            }
        };
        info!(request = %id.short(), script = %request.command.script, "approved; running");
        let agent = self.clone();
        tokio::spawn(async move {
            if let Err(e) = runner::run(agent.node.clone(), session, request).await {
                warn!(request = %id.short(), "run failed: {e:#}");
            }
            // The view must show the end before the command leaves `running`; otherwise a
            // review in between would take it for a run interrupted by a crash.
            agent.refresh(session).await;
            if let Ok(mut st) = agent.state.lock() {
                st.running.remove(&id);
            }
        });
        Ok(())
    }

    /// The codes of the requests running now, as their users approved them.
    fn running_codes(&self) -> Vec<Id128> {
        let Ok(st) = self.state.lock() else { return vec![] };
        st.running
            .iter()
            .filter_map(|id| st.views.values().find_map(|v| v.command(id)).map(|c| c.request.approval_code()))
            .collect()
    }

    async fn pending_items(&self) -> Vec<PendingItem> {
        let pending = self.state.lock().map(|st| st.pending.clone()).unwrap_or_default();
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

/// Another caller is starting (or running) this request right now: not a refusal.
#[derive(Debug, thiserror::Error)]
#[error("request {} is already being started or running", .0.short())]
struct AlreadyStarting(Id128);

/// The store key under which this agent remembers what it did with a request.
fn request_key(id: &Id128) -> String {
    format!("request/{id}")
}

/// Refuses a local decision unless the request is still undecided, unexpired, for this
/// machine, and carries exactly the command whose approval code the user was shown.
fn check_still_pending(view: &SessionView, id: Id128, code: Id128, me: NodeId, now: u64) -> Result<()> {
    let cmd = view.command(&id).ok_or_else(|| anyhow!("request {} is no longer valid", id.short()))?;
    if cmd.request.target != me {
        bail!("request {} is for another machine", id.short());
    }
    if cmd.request.approval_code() != code {
        bail!("the command changed since it was shown; review it again with `caisey-agent pending`");
    }
    if cmd.decision.is_some() {
        bail!("request {} was already decided", id.short());
    }
    if now > cmd.request.expires_at {
        bail!("request {} has expired; ask the technician to send it again", id.short());
    }
    Ok(())
}

impl caisey_peer::local::Service for Agent {
    type Api = AgentApi;

    async fn handle(&self, req: LocalRequest) -> Answer<LocalReply> {
        let result = match req {
            LocalRequest::Pending => {
                let running = self.running_codes();
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
