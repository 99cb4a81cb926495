//! The technician's node as a long-running process: `caisey up`, or started in the background
//! by the first `caisey` command on a home that has none running.
//!
//! It owns the home's store and iroh endpoint, stays connected to the org's relays and
//! technicians, and serves the org like any peer: sync, catch-up, and enrollment of new agents
//! and colleagues (so a shop with no relay works on its LAN). Its local clients — the CLI, the
//! viewer, cron jobs — reach it over the home's socket and ask in [`crate::api`] terms; each
//! request becomes one of the [`crate::tech`] operations. A node started on demand exits after
//! it has had no client for a while; `caisey up` runs until stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::fleet::Role;
use caisey_doc::id::NodeId;
use caisey_doc::session::SessionView;
use caisey_doc::token::{InviteToken, RelayTicket};
use caisey_peer::local::{self, Answer, Clients, Service};
use caisey_peer::node::{Node, NodeEvent, NodeOptions};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tracing::{info, warn};

use crate::api::{
    Chunk, Event, NodeStatus, OrgInfo, OutputRead, PeerStatus, RelayStatus, Reply, Request, SessionRead, TechApi,
};
use crate::search::OutputIndex;
use crate::tech;

/// The node's side of the local API. Cheap to clone.
#[derive(Clone)]
pub struct TechService {
    inner: Arc<Inner>,
}

struct Inner {
    node: Node,
    started: Instant,
    clients: Clients,
    idle_exit: Option<Duration>,
    stop: Notify,
    /// `None` until the first catch-up with the org is over; then a warning, if any.
    online: watch::Receiver<Option<Option<String>>>,
    /// The full-text index of outputs (none if it could not be opened: search then covers
    /// everything but output).
    index: Option<Arc<OutputIndex>>,
}

impl std::fmt::Debug for TechService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TechService({:?})", self.inner.node)
    }
}

impl TechService {
    /// Starts serving the org on `node`: enrollment, presence, connections to relays and
    /// technicians, a first catch-up in the background.
    pub fn start(node: Node, idle_exit: Option<Duration>) -> TechService {
        node.serve_protocol(caisey_peer::wire::ENROLL_ALPN, caisey_peer::enroll::handler(false));
        let (online_tx, online) = watch::channel(None);
        tokio::spawn({
            let node = node.clone();
            async move {
                if let Err(e) = node.announce_in_fleet().await {
                    warn!("could not tell the org this node's addresses: {e:#}");
                }
                let warning = tech::go_online(&node, &[]).await.unwrap_or_else(|e| Some(format!("{e:#}")));
                let _ = online_tx.send(Some(warning));
            }
        });
        let index = match OutputIndex::open(&node.home().dir().join("search.redb")) {
            Ok(index) => Some(Arc::new(index)),
            Err(e) => {
                warn!("searching output is off: {e:#}");
                None
            }
        };
        if let Some(index) = &index {
            tokio::spawn(keep_indexed(node.clone(), index.clone()));
        }
        TechService {
            inner: Arc::new(Inner {
                node,
                started: Instant::now(),
                clients: Clients::default(),
                idle_exit,
                stop: Notify::new(),
                online,
                index,
            }),
        }
    }

    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Resolves when a client asked the node to stop, or it has been idle long enough.
    async fn finished(&self) {
        let idle = async {
            let Some(limit) = self.inner.idle_exit else { return std::future::pending().await };
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if self.inner.clients.idle_for().is_some_and(|t| t >= limit) {
                    info!("no client for {}; stopping", humantime::format_duration(limit));
                    return;
                }
            }
        };
        tokio::select! {
            _ = self.inner.stop.notified() => {}
            _ = idle => {}
        }
    }

    async fn answer(&self, request: Request) -> Result<Reply> {
        let node = &self.inner.node;
        Ok(match request {
            Request::Status => Reply::Status(Box::new(self.status().await?)),
            Request::Stop => {
                self.inner.stop.notify_one();
                Reply::Done
            }
            Request::Online => {
                let mut online = self.inner.online.clone();
                let waited = tokio::time::timeout(Duration::from_secs(15), online.wait_for(Option::is_some)).await;
                let warning = match waited {
                    Ok(Ok(state)) => state.clone().flatten(),
                    _ => Some("still catching up with the org; what is shown may be behind".into()),
                };
                Reply::Online { warning }
            }
            Request::Init { org, name } => {
                tech::init(node, &org, &name).await?;
                node.announce_in_fleet().await?;
                Reply::Org(self.org().await?)
            }
            Request::Invite(spec) => {
                let token = tech::invite(node, spec).await?;
                Reply::Token { only_this_node: token.cert.contacts.len() == 1, token: token.encode() }
            }
            Request::Join { token, name } => {
                let token = InviteToken::decode(&token, caisey_peer::now_ms())?;
                caisey_peer::enroll::join(node, &token, &name, &[]).await?;
                node.announce_in_fleet().await?;
                tech::go_online(node, &[]).await?;
                Reply::Org(self.org().await?)
            }
            Request::AddRelay { ticket } => {
                let ticket = RelayTicket::decode(&ticket)?;
                caisey_peer::enroll::adopt_relay(node, &ticket).await?;
                tech::go_online(node, &[]).await?;
                Reply::Done
            }
            Request::Org => Reply::Org(self.org().await?),
            Request::Machines { group, search } => {
                Reply::Machines(tech::machines(node, group.as_deref(), search.as_deref()).await?)
            }
            Request::Sessions { search, label } => Reply::Sessions(
                tech::sessions(node, search.as_deref(), label.as_deref(), self.inner.index.as_deref()).await?,
            ),
            Request::FindSession { key } => Reply::Found(tech::find_session(node, &key).await?),
            Request::Session { id } => {
                let view = node
                    .read_with_fleet(id, move |d, fleet| {
                        SessionView::read_without_output(d, fleet).map(|view| {
                            let names = names_in(&view, fleet);
                            (view, names)
                        })
                    })
                    .await?
                    .ok_or_else(|| anyhow!("session {} is not here", id.short()))??;
                let missing_chunks = node.missing_output(id).await?;
                Reply::Session(Box::new(SessionRead { view: view.0, names: view.1, missing_chunks }))
            }
            Request::Output { session, request, from } => {
                let read = node
                    .read_with_output(session, move |d, stored| {
                        let (chunks, next) =
                            SessionView::read_output_from(d, &request, from, crate::api::OUTPUT_PAGE, stored);
                        let chunks = chunks.into_iter().map(|c| Chunk { stream: c.stream, data: c.data }).collect();
                        OutputRead { chunks, next }
                    })
                    .await?
                    .ok_or_else(|| anyhow!("session {} is not here", session.short()))?;
                Reply::Output(read)
            }
            Request::OutputSizes { session } => {
                let sizes = node
                    .read_with_fleet(session, |d, _| SessionView::output_sizes(d))
                    .await?
                    .ok_or_else(|| anyhow!("session {} is not here", session.short()))?;
                Reply::OutputSizes(sizes.into_iter().collect())
            }
            Request::OutputBytes { session, request } => {
                Reply::Bytes(tech::output_bytes(node, session, request).await?)
            }
            Request::SessionJson { id } => {
                Reply::SessionJson(Box::new(crate::transcript::session_json(node, id).await?))
            }
            Request::Ask(run) => {
                let asked = tech::ask(node, run).await?;
                // Reach the machines directly too, when they are on this network: a connection
                // made now syncs the new request at once (nobody waits for it).
                let fleet = node.fleet().await?;
                let members: Vec<_> = asked.iter().map(|a| a.machine.clone()).collect();
                for contact in tech::agent_contacts(&fleet, &members) {
                    let node = node.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), node.dial(&contact)).await;
                    });
                }
                Reply::Asked(asked)
            }
            Request::WaitDelivered { machines, timeout_ms } => {
                Reply::Delivered(tech::wait_delivered(node, &machines, Duration::from_millis(timeout_ms)).await?)
            }
            Request::Awaiting => Reply::Awaiting(tech::awaiting_approval(node).await?),
            Request::Decide { code, approve } => {
                let awaiting = tech::decide_remote(node, &code, approve).await?;
                // With no relay, delivered means the machine itself has the decision.
                let machines: Vec<NodeId> = node
                    .fleet()
                    .await?
                    .agent_by_name(awaiting.machine.as_unescaped_str())
                    .iter()
                    .map(|m| m.node)
                    .collect();
                let delivered = tech::wait_delivered(node, &machines, Duration::from_secs(5)).await?;
                Reply::Decided { awaiting: Box::new(awaiting), delivered }
            }
            Request::Transcript { session, share } => {
                let file = tech::build_transcript(node, session, share).await?;
                Reply::Transcript(String::from_utf8(file.to_json()).context("transcript is not UTF-8")?)
            }
            Request::Publish { transcript } => {
                caisey_doc::transcript::group::Published::verify(transcript.as_bytes())?;
                let relays = node.relay_contacts().await?;
                let relay = relays
                    .first()
                    .ok_or_else(|| anyhow!("the org has no relay to publish to; write the page with --out FILE"))?;
                Reply::Published(caisey_peer::publish::publish(node, relay, transcript).await?)
            }
            Request::GroupTranscript { key, share } => {
                let file = tech::build_group_transcript(node, &key, share).await?;
                Reply::Transcript(String::from_utf8(file.to_json()).context("transcript is not UTF-8")?)
            }
            Request::Unpublish { link } => {
                let relays = node.relay_contacts().await?;
                let relay = relays.first().ok_or_else(|| anyhow!("the org has no relay; nothing is published"))?;
                caisey_peer::publish::unpublish(node, relay, &link).await?;
                Reply::Done
            }
            Request::Rename { session, name, labels } => {
                tech::rename(node, session, &name, labels).await?;
                Reply::Done
            }
            Request::Relabel { session, add, remove } => {
                tech::relabel(node, session, &add, &remove).await?;
                Reply::Done
            }
            Request::Assign { session, technician } => {
                tech::assign(node, session, technician.as_deref()).await?;
                Reply::Done
            }
            Request::Note { session, text } => {
                tech::add_note(node, session, &text).await?;
                Reply::Done
            }
            Request::Artifacts { session } => Reply::Artifacts(crate::artifacts::list(node, session).await?),
            Request::ArtifactState { session, name } => {
                Reply::Artifacts(vec![crate::artifacts::state(node, session, &name).await?])
            }
            Request::SaveArtifact { session, name, out } => {
                if !out.is_absolute() {
                    bail!("give the file to save to as an absolute path");
                }
                Reply::Artifacts(vec![crate::artifacts::save(node, session, &name, out).await?])
            }
            Request::Schedule(req) => Reply::Asked(crate::schedules::schedule(node, *req).await?),
            Request::Schedules => Reply::Schedules(crate::schedules::schedules(node).await?),
            Request::CancelSchedule { key } => Reply::Schedules(vec![crate::schedules::cancel(node, &key).await?]),
            Request::EditSchedule(edit) => Reply::Asked(crate::schedules::edit(node, edit).await?),
            Request::ProbeSeries { session, name } => {
                Reply::Probes(crate::schedules::probe_series(node, session, &name).await?)
            }
            Request::History { machine, script } => Reply::Runs(tech::history(node, machine, &script).await?),
            Request::SessionHistory { session } => Reply::Runs(tech::session_history(node, session).await?),
            Request::FindRun { code } => Reply::Runs(vec![tech::find_run(node, &code).await?]),
            Request::GroupRuns => Reply::GroupRuns(tech::group_runs(node).await?),
            Request::GroupRun { key } => Reply::GroupRuns(vec![tech::group_run(node, &key).await?]),
            Request::CommandsOn { machine } => Reply::Commands(tech::commands_run_on(node, machine).await?),
            Request::SyncStatus => Reply::Sync(tech::sync_status(node).await?),
            Request::Watch => bail!("a watch is answered with a stream"),
        })
    }

    /// Forwards the node's events to a client until it goes away.
    fn watch(&self) -> mpsc::Receiver<Reply> {
        let mut events = self.inner.node.subscribe();
        let (tx, rx) = mpsc::channel(1024);
        // Subscribed: the client may ask now without missing a change its request makes.
        let _ = tx.try_send(Reply::Done);
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(NodeEvent::DocChanged(d)) => Event::DocChanged(d),
                    Ok(NodeEvent::PeerUp(p)) => Event::PeerUp(p),
                    Ok(NodeEvent::PeerDown(p)) => Event::PeerDown(p),
                    Err(broadcast::error::RecvError::Lagged(_)) => Event::Lagged,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // A client too slow to take events gets one `Lagged` once it catches up.
                match tx.try_send(Reply::Event(event)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if tx.send(Reply::Event(Event::Lagged)).await.is_err() {
                            return;
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
        rx
    }

    async fn org(&self) -> Result<OrgInfo> {
        let node = &self.inner.node;
        let fleet = node.fleet().await?;
        let me = node.id();
        let mut groups: Vec<String> = fleet.members.values().flat_map(|m| m.groups.iter().cloned()).collect();
        groups.sort();
        groups.dedup();
        Ok(OrgInfo {
            org_name: fleet.org_name.clone(),
            me,
            my_name: fleet.members.get(&me).map(|m| m.name.clone()).unwrap_or_default(),
            my_role: fleet.role_of(&me),
            groups,
            has_relay: fleet.members_with_role(Role::Relay).next().is_some(),
        })
    }

    async fn status(&self) -> Result<NodeStatus> {
        let node = &self.inner.node;
        let fleet = node.fleet().await?;
        let paths = node.peer_paths().await?;
        let connected: Vec<NodeId> = paths.iter().map(|(p, _)| *p).collect();
        let mut relays = Vec::new();
        for c in node.relay_contacts().await? {
            let unconfirmed_docs = node.unconfirmed_docs(c.node).await?;
            relays.push(RelayStatus {
                connected: connected.contains(&c.node),
                node: c.node,
                addrs: c.addrs,
                unconfirmed_docs,
            });
        }
        let peers = paths
            .into_iter()
            .map(|(peer, path)| PeerStatus {
                node: peer,
                name: fleet.members.get(&peer).map(|m| m.name.clone()).unwrap_or_else(|| peer.short().into()),
                role: fleet.role_of(&peer),
                path,
            })
            .collect();
        Ok(NodeStatus {
            node: node.id(),
            name: fleet.members.get(&node.id()).map(|m| m.name.clone()).unwrap_or_default(),
            org: fleet.org_name.clone(),
            pid: std::process::id(),
            home: node.home().dir().display().to_string(),
            addrs: node.addrs(),
            up_ms: self.inner.started.elapsed().as_millis() as u64,
            clients: self.inner.clients.connected(),
            idle_exit_ms: self.inner.idle_exit.map(|d| d.as_millis() as u64),
            peers,
            unconfirmed_docs: relays.first().map(|r| r.unconfirmed_docs).unwrap_or(0),
            relays,
            unwritable: node.unwritable().map(|u| crate::api::Unwritable { error: u.error, since: u.since }),
            write_trouble: node.write_trouble(),
            sessions: node.sessions().await?.len(),
        })
    }
}

/// The names of the members a session mentions (requesters, targets, deciders).
fn names_in(view: &SessionView, fleet: &caisey_doc::fleet::Fleet) -> BTreeMap<NodeId, caisey_doc::text::PeerText> {
    let mut nodes: Vec<NodeId> = view.targets.clone();
    nodes.push(view.creator);
    nodes.extend(view.renamed_by);
    nodes.extend(view.assignee);
    nodes.extend(view.notes.iter().map(|n| n.author));
    for c in &view.commands {
        nodes.push(c.requester);
        nodes.push(c.request.target);
        nodes.extend(c.decided_by_node);
    }
    nodes.into_iter().filter_map(|n| fleet.members.get(&n).map(|m| (n, m.name.clone()))).collect()
}

/// Indexes every session's output, then each session again as it changes, until the node stops.
async fn keep_indexed(node: Node, index: Arc<OutputIndex>) {
    let mut events = node.subscribe();
    let mut all = true;
    loop {
        if all {
            all = false;
            for session in node.sessions().await.unwrap_or_default() {
                if let Err(e) = index.update(&node, session).await {
                    warn!("indexing session {}: {e:#}", session.short());
                }
            }
        }
        match events.recv().await {
            Ok(NodeEvent::DocChanged(doc)) => {
                if let Err(e) = index.update(&node, doc).await {
                    warn!("indexing session {}: {e:#}", doc.short());
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => all = true,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Service for TechService {
    type Api = TechApi;

    async fn handle(&self, request: Request) -> Answer<Reply> {
        if let Request::Watch = request {
            return Answer::Stream(self.watch());
        }
        Answer::One(self.answer(request).await.unwrap_or_else(|e| Reply::Error(format!("{e:#}"))))
    }
}

/// `caisey up`: runs the home's node until `shutdown`, a `caisey down`, or (with `idle_exit`)
/// that long without a client. `on_ready` is told once clients can connect.
pub async fn run(
    opts: NodeOptions,
    idle_exit: Option<Duration>,
    on_ready: impl FnOnce(&Node),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let node = Node::start(opts).await?;
    // The store is ours now (it is locked), so a socket file left here is stale.
    let listener = local::socket::bind(&node.home().socket_path())?;
    let socket = listener.claim();
    let service = TechService::start(node.clone(), idle_exit);
    let mut server = tokio::spawn(local::serve(listener, service.clone(), service.inner.clients.clone()));
    let pid_file = node.home().dir().join("node.pid");
    let pid = std::process::id().to_string();
    let _ = std::fs::write(&pid_file, format!("{pid}\n"));
    info!(node = %node.id().short(), "technician node up");
    on_ready(&node);
    tokio::select! {
        _ = shutdown => {}
        _ = service.finished() => {}
        ended = &mut server => warn!("the local socket stopped serving ({ended:?}); stopping"),
    }
    server.abort();
    // Gone before the store is released: once it is, the next node may start and bind its own,
    // which this one must not remove. `caisey down` waits for the pid file to go.
    socket.remove();
    node.shutdown().await;
    if std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid) {
        let _ = std::fs::remove_file(&pid_file);
    }
    Ok(())
}
