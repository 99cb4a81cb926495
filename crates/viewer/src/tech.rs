//! What a technician does, as functions over a running node: the CLI, the demo and (later) the
//! viewer call these and only differ in how they show the result.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::fleet::{Contact, Fleet, InviteCert, MachineCard, Member, Role, Vitals};
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::record::Signer;
use caisey_doc::session::{
    CommandRequest, CommandSpec, CommandView, MAX_NOTE, SessionInfo, SessionMeta, SessionNote, SessionView,
    SessionWriter,
};
use caisey_doc::text::PeerText;
use caisey_doc::token::InviteToken;
use caisey_peer::node::{Node, PeerPath};
use caisey_peer::now_ms;
use caisey_peer::wire::DocKind;
use serde::{Deserialize, Serialize};
use tracing::debug;

/// An agent counts as online if it was heard from within this many heartbeats.
const ONLINE_HEARTBEATS: u32 = 3;

fn random_id() -> Id128 {
    Id128(rand::random())
}

/// Creates an org with this node as its first technician.
pub async fn init(node: &Node, org_name: &str, my_name: &str) -> Result<Fleet> {
    if node.fleet_doc().await?.is_some() {
        bail!("this home already belongs to an org; use another --home for a new one");
    }
    let org_key = node.home().create_org_key()?;
    let fleet_doc = random_id();
    let doc = Fleet::create(org_name, &org_key, node.signer(), my_name, fleet_doc, now_ms())?;
    node.create(fleet_doc, DocKind::Fleet, doc).await?;
    node.fleet().await
}

/// What an invite token is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteSpec {
    pub role: Role,
    /// The name the enrolling node gets (only for a token of one use).
    pub name: Option<String>,
    pub groups: Vec<String>,
    /// For an approver: the machines and groups it may approve for.
    pub approves: Vec<String>,
    pub ttl_ms: u64,
    /// How many nodes may enroll with it.
    #[serde(default = "one")]
    pub uses: u32,
}

fn one() -> u32 {
    1
}

impl InviteSpec {
    pub fn new(role: Role, name: Option<String>, ttl: Duration) -> Self {
        Self { role, name, groups: vec![], approves: vec![], ttl_ms: ttl.as_millis() as u64, uses: 1 }
    }
}

/// Issues an invite token.
pub async fn invite(node: &Node, spec: InviteSpec) -> Result<InviteToken> {
    let InviteSpec { role, name, groups, approves, ttl_ms, uses } = spec;
    if uses == 0 {
        bail!("an invite needs at least one use");
    }
    if uses > 1 && name.is_some() {
        bail!("a token for several machines cannot name them: each enrolls with its hostname (or its own --name)");
    }
    let fleet = node.fleet().await?;
    let (Some(org_key), Some(fleet_doc)) = (fleet.org_key, fleet.fleet_doc) else {
        bail!("this home has no org yet; run `caisey init --org NAME` or `caisey join TOKEN` first");
    };
    if fleet.role_of(&node.id()) != Some(Role::Technician) {
        bail!("only technicians can invite");
    }
    // The org key if we hold it; otherwise our technician key, which chains back to it.
    let authority = node.home().org_key()?.unwrap_or_else(|| node.signer().clone());
    let mut contacts = node.relay_contacts().await?;
    contacts.push(node.contact());
    let secret = Signer::from_secret(rand::random());
    let cert = InviteCert {
        invite_id: random_id(),
        invite_key: secret.node_id(),
        org_key,
        fleet_doc,
        role,
        name: name.map(PeerText::from),
        groups,
        approves,
        expires_at: now_ms() + ttl_ms,
        uses,
        contacts,
    };
    Ok(InviteToken::issue(&authority, cert, secret))
}

/// Connects to the org's relays and technicians (and any `extra` peers), then waits briefly
/// until in sync with the first relay reached (or, with none, the first technician), and keeps
/// those connections up. Returns a warning when none of them could be reached: what this
/// machine shows may then be behind.
pub async fn go_online(node: &Node, extra: &[Contact]) -> Result<Option<String>> {
    node.keep_connected();
    let hubs = node.hub_contacts().await?;
    let relays: Vec<NodeId> = node.relay_contacts().await?.iter().map(|c| c.node).collect();
    let connected: Vec<NodeId> = node.peers().await?.into_iter().map(|p| p.peer).collect();
    // Dial whoever is not connected yet, all at once; a member that is gone for good costs the
    // dial's timeout in the background, not a wait here.
    let (reached_tx, mut reached) = tokio::sync::mpsc::unbounded_channel();
    let mut dialling = 0;
    for c in hubs.iter().chain(extra.iter()).filter(|c| !connected.contains(&c.node)).cloned() {
        let (node, reached_tx) = (node.clone(), reached_tx.clone());
        dialling += 1;
        tokio::spawn(async move {
            let ok = match tokio::time::timeout(Duration::from_secs(3), node.dial(&c)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    debug!("{e:#}");
                    false
                }
                Err(_) => false,
            };
            let _ = reached_tx.send((c.node, ok));
        });
    }
    drop(reached_tx);
    // Catch up with the first relay reached (a relay holds everything); with no relay, with the
    // first technician.
    let is_hub = |n: &NodeId| hubs.iter().any(|h| h.node == *n);
    let mut first = connected.iter().copied().find(|n| relays.contains(n));
    let mut fallback = connected.iter().copied().find(|n| is_hub(n));
    while first.is_none() && dialling > 0 {
        let Some((peer, ok)) = reached.recv().await else { break };
        dialling -= 1;
        if ok && relays.contains(&peer) {
            first = Some(peer);
        } else if ok && fallback.is_none() && is_hub(&peer) {
            fallback = Some(peer);
        }
    }
    if let Some(hub) = first.or(fallback) {
        node.wait_in_sync(hub, Duration::from_secs(5)).await?;
        return Ok(None);
    }
    Ok(match (relays.is_empty(), hubs.is_empty()) {
        (false, _) => Some("the org's relay is unreachable; showing what this machine already has".into()),
        (true, false) => Some("no other technician is reachable; showing what this machine already has".into()),
        (true, true) => None,
    })
}

/// Waits up to `timeout` until a relay holds everything this node holds for it; with no relay,
/// until each of `machines` does. Whether that happened.
pub async fn wait_delivered(node: &Node, machines: &[NodeId], timeout: Duration) -> Result<bool> {
    let relays: Vec<NodeId> = node.relay_contacts().await?.into_iter().map(|c| c.node).collect();
    // All at once: a relay that is gone costs nobody the whole timeout.
    let mut waits = tokio::task::JoinSet::new();
    for peer in if relays.is_empty() { machines.to_vec() } else { relays.clone() } {
        let node = node.clone();
        waits.spawn(async move { node.wait_in_sync(peer, timeout).await.unwrap_or(false) });
    }
    let (mut any, mut all) = (false, !waits.is_empty());
    while let Some(done) = waits.join_next().await {
        let synced = done.unwrap_or(false);
        any |= synced;
        all &= synced;
        // One relay holds it: delivered (it forwards to everyone else).
        if synced && !relays.is_empty() {
            return Ok(true);
        }
    }
    Ok(if relays.is_empty() { all } else { any })
}

/// A machine as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub name: PeerText,
    pub node: NodeId,
    pub groups: Vec<String>,
    pub online: bool,
    /// On a direct path from this node (the same as `path == direct`; kept for scripts).
    pub direct: bool,
    /// How this node reaches it now.
    pub path: MachinePath,
    pub last_seen: Option<u64>,
    pub card: Option<MachineCard>,
    /// Its live state as of `last_seen` (uptime, memory, disk, logged-in users, addresses).
    #[serde(default)]
    pub vitals: Option<Vitals>,
    /// Why writes to the agent's store fail (now, or within the last minute), as it said in its
    /// last heartbeat: while they do, nothing new from it is saved or sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwritable: Option<caisey_doc::text::PeerText>,
}

/// How the technician's node reaches a machine right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachinePath {
    /// A QUIC path straight to it: on the LAN, or hole-punched through NAT.
    Direct,
    /// Connected through an iroh relay server: no direct path could be made (yet).
    Relayed,
    /// Not connected here, but online: its sessions travel through the org's relay.
    ThroughRelay,
    Offline,
}

impl Machine {
    /// Whether a search (lower-case) finds this machine: by name, group, hostname, OS or an
    /// installed application's name.
    pub fn matches(&self, search: &str) -> bool {
        let card = self
            .card
            .as_ref()
            .map(|c| {
                let (host, os, version) =
                    (c.hostname.as_unescaped_str(), c.os_name.as_unescaped_str(), c.os_version.as_unescaped_str());
                format!("{host} {os} {version}")
            })
            .unwrap_or_default();
        format!("{} {} {}", self.name.as_unescaped_str(), self.groups.join(" "), card).to_lowercase().contains(search)
            || self.card.as_ref().is_some_and(|c| c.software.iter().any(|s| s.name.contains_lowercase(search)))
    }
}

pub async fn machines(node: &Node, group: Option<&str>, search: Option<&str>) -> Result<Vec<Machine>> {
    let fleet = node.fleet().await?;
    let paths: BTreeMap<NodeId, PeerPath> = node.peer_paths().await?.into_iter().collect();
    let now = now_ms();
    let fresh = caisey_agent::daemon::HEARTBEAT.as_millis() as u64 * u64::from(ONLINE_HEARTBEATS);
    let search = search.map(str::to_lowercase);
    // A designated approver sees the machines it approves for, not the whole org.
    let me = node.id();
    let approver = fleet.role_of(&me) == Some(Role::Approver);
    let mut out: Vec<Machine> = fleet
        .members_with_role(Role::Agent)
        .filter(|m| !approver || fleet.may_approve(&me, &m.node))
        .filter(|m| group.is_none_or(|g| m.groups.iter().any(|x| x.eq_ignore_ascii_case(g))))
        .map(|m| {
            let last_seen = fleet.presence.get(&m.node).map(|p| p.at);
            let heard = last_seen.is_some_and(|t| now.saturating_sub(t) <= fresh);
            let path = match (paths.get(&m.node), heard) {
                (Some(PeerPath::Direct), _) => MachinePath::Direct,
                (Some(PeerPath::Relayed), _) => MachinePath::Relayed,
                (None, true) => MachinePath::ThroughRelay,
                (None, false) => MachinePath::Offline,
            };
            Machine {
                name: m.name.clone(),
                node: m.node,
                groups: m.groups.clone(),
                online: path != MachinePath::Offline,
                direct: path == MachinePath::Direct,
                path,
                last_seen,
                card: fleet.cards.get(&m.node).cloned(),
                vitals: fleet.presence.get(&m.node).and_then(|p| p.vitals.clone()),
                unwritable: fleet.presence.get(&m.node).filter(|_| heard).and_then(|p| p.unwritable.clone()),
            }
        })
        .filter(|m| search.as_deref().is_none_or(|s| m.matches(s)))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Who a run targets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Targets {
    Machine(String),
    /// Several machines by name, run like a group.
    Machines(Vec<String>),
    Group(String),
}

pub fn resolve_targets(fleet: &Fleet, targets: &Targets) -> Result<Vec<Member>> {
    let found: Vec<Member> = match targets {
        Targets::Machine(name) => fleet.agent_by_name(name).into_iter().cloned().collect(),
        Targets::Machines(names) => {
            let mut found: Vec<Member> = Vec::new();
            for name in names {
                let one = resolve_targets(fleet, &Targets::Machine(name.clone()))?;
                found.extend(one.into_iter().filter(|m| !found.iter().any(|f| f.node == m.node)).collect::<Vec<_>>());
            }
            found
        }
        Targets::Group(g) => fleet.agents_in_group(g).into_iter().cloned().collect(),
    };
    match (targets, found.len()) {
        (Targets::Machine(name), 0) => bail!("no machine named {name:?}; see `caisey machines`"),
        (Targets::Machine(name), n) if n > 1 => bail!("{n} machines are named {name:?}; rename one"),
        (Targets::Group(g), 0) => bail!("no machines in group {g:?}; see `caisey machines`"),
        _ => Ok(found),
    }
}

/// A session as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: DocId,
    pub name: PeerText,
    pub labels: Vec<PeerText>,
    pub machines: Vec<PeerText>,
    /// The commands asked in it, in order.
    pub scripts: Vec<String>,
    /// Why each was asked (the technician's descriptions), in order.
    #[serde(default)]
    pub descriptions: Vec<PeerText>,
    pub commands: usize,
    pub last_activity: u64,
    pub status: String,
    /// The technician who has it, if one was named.
    #[serde(default)]
    pub assignee: Option<PeerText>,
    /// Its notes' texts, oldest first (searched with the rest).
    #[serde(default)]
    pub notes: Vec<PeerText>,
    /// The output line a search found, when it was found in output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
}

impl SessionSummary {
    /// Whether a search (lower-case) finds this session: by name, label, machine, command text or
    /// the why of a command.
    pub fn matches(&self, search: &str) -> bool {
        let peer_texts = [&self.labels, &self.machines, &self.descriptions, &self.notes];
        std::iter::once(&self.name)
            .chain(peer_texts.into_iter().flatten())
            .chain(self.assignee.as_ref())
            .any(|t| t.contains_lowercase(search))
            || self.scripts.iter().any(|s| s.to_lowercase().contains(search))
    }
}

/// Reads every valid session (without output).
pub async fn session_views(node: &Node) -> Result<Vec<(DocId, SessionView)>> {
    node.read_all(DocKind::Session, |id, doc, fleet| Some((id, SessionView::read_without_output(doc, fleet).ok()?)))
        .await
}

/// The sessions with `label`, matching `search` in their words (name, labels, machines,
/// commands, whys, notes, assignee) or, through `index`, in their output; a match in output
/// carries its line.
pub async fn sessions(
    node: &Node,
    search: Option<&str>,
    label: Option<&str>,
    index: Option<&crate::search::OutputIndex>,
) -> Result<Vec<SessionSummary>> {
    let fleet = node.fleet().await?;
    let names: BTreeMap<NodeId, PeerText> = fleet.members.values().map(|m| (m.node, m.name.clone())).collect();
    let search = search.map(str::to_lowercase);
    let mut out: Vec<SessionSummary> = session_views(node)
        .await?
        .into_iter()
        .filter(|(_, v)| label.is_none_or(|l| v.info.labels.iter().any(|x| x.eq_ignore_ascii_case(l))))
        .map(|(id, v)| SessionSummary {
            id,
            name: v.info.name.clone(),
            labels: v.info.labels.clone(),
            machines: v.targets.iter().map(|t| names.get(t).cloned().unwrap_or_else(|| t.short().into())).collect(),
            scripts: v.commands.iter().map(|c| c.request.command.script.clone()).collect(),
            descriptions: v.commands.iter().map(|c| c.request.description.clone()).collect(),
            commands: v.commands.len(),
            last_activity: v.last_activity(),
            status: v.commands.last().map(|c| c.status().to_string()).unwrap_or_else(|| "empty".into()),
            assignee: v.assignee.map(|a| names.get(&a).cloned().unwrap_or_else(|| a.short().into())),
            notes: v.notes.iter().map(|n| n.note.text.clone()).collect(),
            matched: None,
        })
        .collect();
    if let Some(q) = search.as_deref() {
        // Output matches, by session: the first command whose output has the words.
        let mut in_output: BTreeMap<DocId, Id128> = BTreeMap::new();
        if let Some(index) = index {
            for hit in index.search(q)? {
                in_output.entry(hit.session).or_insert(hit.request);
            }
        }
        let mut kept = Vec::new();
        for mut s in out {
            if let Some(request) = in_output.get(&s.id) {
                s.matched = first_matching_line(node, s.id, *request, q).await?;
            }
            if s.matches(q) || s.matched.is_some() {
                kept.push(s);
            }
        }
        out = kept;
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.last_activity));
    Ok(out)
}

/// Finds a session by id, unique id prefix, or exact name (the newest of that name).
pub async fn find_session(node: &Node, key: &str) -> Result<DocId> {
    let all = session_views(node).await?;
    let key_l = key.to_lowercase();
    if let Some((id, _)) = all.iter().filter(|(_, v)| v.info.name == *key).max_by_key(|(_, v)| v.info.created_at) {
        return Ok(*id);
    }
    let by_prefix: Vec<DocId> = all.iter().map(|(id, _)| *id).filter(|id| id.to_hex().starts_with(&key_l)).collect();
    match by_prefix.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no session {key:?}; see `caisey sessions`"),
        many => bail!("{key:?} matches {} sessions; give more of the id", many.len()),
    }
}

/// What to ask for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    pub targets: Targets,
    pub session: Option<String>,
    pub labels: Vec<String>,
    pub command: CommandSpec,
    pub description: String,
    /// How long the endpoint user has to decide.
    pub approval_window: Duration,
}

/// One request on its way: which session holds it, its id, and the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Asked {
    pub session: DocId,
    pub request: Id128,
    /// The request's code, as the endpoint user and approvers see and type it: the one
    /// identifier of a request that people use (it also names the exact command).
    pub code: Id128,
    pub machine: Member,
}

/// Writes one request per target machine. Each machine gets its own session, so machines never
/// see each other's commands or output: for one machine the session is `--session NAME` (or a
/// dated default); in a group run each machine's session is `NAME (machine)`. An existing session
/// of that name is continued (a weekly check stays one thread). Durable locally when this returns.
pub async fn ask(node: &Node, req: RunRequest) -> Result<Vec<Asked>> {
    check_command(&req.command, &req.description)?;
    let window = req.approval_window.as_millis() as u64;
    let where_ = Where { targets: req.targets, session: req.session, labels: req.labels };
    ask_machines(node, &where_, |session, machine, now| {
        AskItem::Once(CommandRequest {
            id: random_id(),
            session,
            target: machine,
            command: req.command.clone(),
            description: req.description.as_str().into(),
            requested_at: now,
            expires_at: now + window,
        })
    })
    .await
}

/// Refuses a command too big for the endpoint user to read, or for a record.
pub(crate) fn check_command(command: &CommandSpec, description: &str) -> Result<()> {
    use caisey_doc::session::{MAX_DESCRIPTION, MAX_SCRIPT};
    if command.script.len() > MAX_SCRIPT {
        bail!(
            "the command is {} KiB; at most {} KiB can be asked (put a bigger script on the machine and ask for a short command that runs it)",
            command.script.len() / 1024,
            MAX_SCRIPT / 1024
        );
    }
    if description.len() > MAX_DESCRIPTION {
        bail!("the description is {} KiB; at most {} KiB", description.len() / 1024, MAX_DESCRIPTION / 1024);
    }
    if let Some(c) = &command.collect {
        c.check().map_err(|e| anyhow!("--collect {e}"))?;
    }
    Ok(())
}

/// Which machines, and which session (by name) each one's record goes in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Where {
    pub targets: Targets,
    pub session: Option<String>,
    pub labels: Vec<String>,
}

/// What one machine is asked: one run now, or a schedule of runs.
pub(crate) enum AskItem {
    Once(CommandRequest),
    Recurring(caisey_doc::schedule::Schedule),
}

/// Writes what `make(session, machine, now)` builds for each target machine, each in its own
/// session (see [`ask`]).
pub(crate) async fn ask_machines(
    node: &Node,
    where_: &Where,
    make: impl Fn(DocId, NodeId, u64) -> AskItem,
) -> Result<Vec<Asked>> {
    let fleet = node.fleet().await?;
    // (A home in no org yet finds no machine, below.)
    if fleet.role_of(&node.id()).is_some_and(|r| r != Role::Technician) {
        bail!(
            "only technicians ask machines to run commands; a designated approver approves them (`caisey pending`, `caisey approve CODE`)"
        );
    }
    let targets = resolve_targets(&fleet, &where_.targets)?;
    let org_key = fleet.org_key.ok_or_else(|| anyhow!("no org"))?;
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let base = match (&where_.session, &where_.targets) {
        (Some(name), _) => name.clone(),
        (None, Targets::Machine(m)) => format!("{m} {stamp}"),
        (None, Targets::Group(g)) => format!("group {g} {stamp}"),
        (None, Targets::Machines(names)) => format!("{} machines {stamp}", names.len()),
    };
    let group = matches!(where_.targets, Targets::Group(_) | Targets::Machines(_));
    let mut existing: BTreeMap<PeerText, DocId> = BTreeMap::new();
    let mut existing_run: BTreeMap<PeerText, Option<caisey_doc::session::GroupRun>> = BTreeMap::new();
    let mut newest: BTreeMap<PeerText, u64> = BTreeMap::new();
    // Only a session the technician named is continued; a generated name always starts afresh.
    let views = if where_.session.is_some() { session_views(node).await? } else { vec![] };
    for (id, v) in views {
        if newest.get(&v.info.name).is_none_or(|t| v.info.created_at >= *t) {
            newest.insert(v.info.name.clone(), v.info.created_at);
            existing.insert(v.info.name.clone(), id);
            existing_run.insert(v.info.name.clone(), v.group_run.clone());
        }
    }
    // A group run is one investigation: its sessions share one run id. A weekly group check
    // that goes on keeps the id its sessions already have.
    let run_id = existing_run.values().flatten().map(|r| r.run).next().unwrap_or_else(random_id);
    let group_run = |session: DocId| caisey_doc::session::GroupRun { session, run: run_id, name: base.clone().into() };
    let now = now_ms();
    let mut asked = Vec::new();
    let mut new_sessions = Vec::new();
    for machine in targets {
        // The machine's name goes into the session's name as it is: escaped wherever that is shown.
        let name =
            PeerText::from(if group { format!("{base} ({})", machine.name.as_unescaped_str()) } else { base.clone() });
        let session = existing.get(&name).copied().unwrap_or_else(random_id);
        let item = make(session, machine.node, now);
        let (request, code) = match &item {
            AskItem::Once(r) => (r.id, r.approval_code()),
            AskItem::Recurring(s) => (s.id, s.consent_code()),
        };
        let write = move |doc: &mut caisey_doc::automerge::Automerge, signer: &Signer| match &item {
            AskItem::Once(r) => SessionWriter::request(doc, signer, r),
            AskItem::Recurring(s) => caisey_doc::schedule::ScheduleWriter::schedule(doc, signer, s),
        };
        let signer = node.signer().clone();
        if existing.contains_key(&name) {
            node.change(session, move |doc| write(doc, &signer)).await?.context("writing the request")?;
            // `--label` on a session that goes on: its labels grow.
            if !where_.labels.is_empty() {
                relabel(node, session, &where_.labels, &[]).await?;
            }
            if group && existing_run.get(&name).is_some_and(Option::is_none) {
                let (signer, run) = (node.signer().clone(), group_run(session));
                node.change(session, move |doc| SessionWriter::group_run(doc, &signer, &run))
                    .await?
                    .context("marking the session as part of the group run")?;
            }
        } else {
            // A new session and its request, built here and stored with the others in one go.
            let labels = where_.labels.iter().map(PeerText::from).collect();
            let info = SessionInfo { id: session, name, labels, created_at: now, org_key };
            let mut doc = SessionWriter::create(&signer, &info)?;
            if group {
                SessionWriter::group_run(&mut doc, &signer, &group_run(session))?;
            }
            write(&mut doc, &signer)?;
            new_sessions.push((session, DocKind::Session, doc));
        }
        asked.push(Asked { session, request, code, machine });
    }
    node.create_many(new_sessions).await?;
    Ok(asked)
}

/// Direct contacts of agents, from their presence in the fleet.
pub fn agent_contacts(fleet: &Fleet, members: &[Member]) -> Vec<Contact> {
    members
        .iter()
        .filter_map(|m| fleet.presence.get(&m.node).map(|p| Contact { node: m.node, addrs: p.addrs.clone() }))
        .collect()
}

/// A request a designated approver may decide.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Awaiting {
    /// The approval code (names the request and its exact command).
    pub id: Id128,
    pub request: Id128,
    pub session: DocId,
    pub session_name: PeerText,
    pub machine: PeerText,
    pub technician: PeerText,
    pub shell: String,
    pub script: String,
    pub description: PeerText,
    pub requested_at: u64,
    pub expires_at: u64,
}

/// Requests this node (a designated approver) may approve or deny now.
pub async fn awaiting_approval(node: &Node) -> Result<Vec<Awaiting>> {
    let fleet = node.fleet().await?;
    let me = node.id();
    let now = now_ms();
    let name = |n: &NodeId| fleet.members.get(n).map(|m| m.name.clone()).unwrap_or_else(|| n.short().into());
    let mut out = Vec::new();
    for (session, view) in session_views(node).await? {
        for c in &view.commands {
            let open = c.decision.is_none() && c.start.is_none() && now <= c.request.expires_at;
            if open && c.requester != me && fleet.may_approve(&me, &c.request.target) {
                out.push(Awaiting {
                    id: c.request.approval_code(),
                    request: c.request.id,
                    session,
                    session_name: view.info.name.clone(),
                    machine: name(&c.request.target),
                    technician: name(&c.requester),
                    shell: c.request.command.shell.to_string(),
                    script: c.request.command.script.clone(),
                    description: c.request.description.clone(),
                    requested_at: c.request.requested_at,
                    expires_at: c.request.expires_at,
                });
            }
        }
    }
    out.sort_by_key(|a| a.requested_at);
    Ok(out)
}

/// A designated approver's decision on the request with approval code `code` (a unique prefix).
/// The approval stays usable until the request itself expires.
pub async fn decide_remote(node: &Node, code: &str, approve: bool) -> Result<Awaiting> {
    let code = caisey_doc::session::typed_approval_code(code, "caisey pending").map_err(|e| anyhow!(e))?;
    let all = awaiting_approval(node).await?;
    let found: Vec<&Awaiting> = all.iter().filter(|a| a.id.to_hex().starts_with(&code)).collect();
    let a = match found.as_slice() {
        [one] => (*one).clone(),
        [] => bail!(
            "nothing awaits your approval under {code:?}; it may have changed or been decided (see `caisey pending`)"
        ),
        many => bail!("{code:?} matches {} requests; give more of the code", many.len()),
    };
    let fleet = node.fleet().await?;
    let signer = node.signer().clone();
    let me_name = fleet.members.get(&node.id()).map(|m| m.name.clone()).unwrap_or_default();
    let (session, id, expected) = (a.session, a.request, a.id);
    node.change(session, move |doc| -> Result<()> {
        let view = SessionView::read_without_output(&*doc, &fleet)?;
        let cmd = view.command(&id).ok_or_else(|| anyhow!("request {} is no longer valid", id.short()))?;
        if cmd.request.approval_code() != expected {
            bail!("the command changed since it was listed; review it again with `caisey pending`");
        }
        if cmd.decision.is_some() {
            bail!("request {} was already decided", id.short());
        }
        let now = now_ms();
        let d = caisey_doc::session::Decision {
            request: id,
            session,
            target: cmd.request.target,
            requester: cmd.requester,
            command_hash: cmd.request.command.hash(),
            verdict: if approve {
                caisey_doc::session::Verdict::Approved
            } else {
                caisey_doc::session::Verdict::Denied
            },
            decided_by: format!("approver {me_name}"),
            decided_at: now,
            expires_at: cmd.request.expires_at,
            nonce: random_id(),
        };
        Ok(SessionWriter::decide(doc, &signer, &d)?)
    })
    .await??;
    Ok(a)
}

/// What to publish of a session, as the technician reviewed it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShareRequest {
    /// Patterns to hide beyond the built-in secrets.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Commands to leave out: ids or unique prefixes of them.
    #[serde(default)]
    pub omit: Vec<String>,
    /// The publisher's words for the reader, at the top of the page.
    #[serde(default)]
    pub summary: Option<String>,
    #[serde(default)]
    pub without_notes: bool,
}

/// The longest summary, in bytes.
pub const MAX_SUMMARY: usize = 16 * 1024;

/// Builds a signed, redacted transcript of a session as it stands now.
pub async fn build_transcript(
    node: &Node,
    session: DocId,
    share: ShareRequest,
) -> Result<caisey_doc::transcript::TranscriptFile> {
    let ShareRequest { redact, omit, summary, without_notes } = share;
    if summary.as_ref().is_some_and(|s| s.len() > MAX_SUMMARY) {
        bail!("the summary holds at most {MAX_SUMMARY} bytes");
    }
    let redactor = caisey_doc::redact::Redactor::new(&redact)?;
    let fleet = node.fleet().await?;
    let ids: Vec<Id128> = node
        .read(session, move |d| {
            SessionView::read_without_output(d, &fleet).map(|v| v.commands.iter().map(|c| c.request.id).collect())
        })
        .await?
        .ok_or_else(|| anyhow!("no session {}", session.short()))??;
    let mut leave_out = std::collections::BTreeSet::new();
    for prefix in &omit {
        let p = prefix.to_ascii_lowercase();
        match ids.iter().filter(|id| id.to_hex().starts_with(&p)).collect::<Vec<_>>().as_slice() {
            [one] => {
                leave_out.insert(**one);
            }
            [] => bail!("no command {prefix:?} in this session (see `caisey show`)"),
            _ => bail!("{prefix:?} matches several commands; give more of the id"),
        }
    }
    let options = caisey_doc::transcript::ShareOptions { redactor, omit: leave_out, summary, without_notes };
    let signer = node.signer().clone();
    Ok(node
        .read_with_fleet_doc(session, move |s, f, chunks| {
            caisey_doc::transcript::build(s, chunks, f, &options, &signer, now_ms())
        })
        .await??)
}

/// Renames and relabels a session (as this technician; the newest rename wins everywhere).
pub async fn rename(node: &Node, session: DocId, name: &str, labels: Vec<String>) -> Result<()> {
    let name = name.trim().to_string();
    if name.is_empty() {
        bail!("a session needs a name");
    }
    update_meta(node, session, move |meta| {
        meta.name = name.into();
        meta.labels = labels.into_iter().map(PeerText::from).collect();
    })
    .await
}

/// Adds and removes labels (case-insensitively), keeping the rest.
pub async fn relabel(node: &Node, session: DocId, add: &[String], remove: &[String]) -> Result<()> {
    let (add, remove) = (add.to_vec(), remove.to_vec());
    update_meta(node, session, move |meta| {
        meta.labels.retain(|l| !remove.iter().any(|r| l.eq_ignore_ascii_case(r.trim())));
        for label in add {
            if !meta.labels.iter().any(|l| l.eq_ignore_ascii_case(label.trim())) {
                meta.labels.push(label.into());
            }
        }
    })
    .await
}

/// Hands the session to a technician (by name), or to nobody.
pub async fn assign(node: &Node, session: DocId, technician: Option<&str>) -> Result<Option<Member>> {
    let fleet = node.fleet().await?;
    let member = match technician {
        Some(name) => Some(
            fleet
                .members_with_role(Role::Technician)
                .find(|m| m.name.eq_ignore_ascii_case(name.trim()))
                .cloned()
                .ok_or_else(|| anyhow!("no technician named {name:?} in this org"))?,
        ),
        None => None,
    };
    let assignee = member.as_ref().map(|m| m.node);
    update_meta(node, session, move |meta| meta.assignee = assignee).await?;
    Ok(member)
}

/// Writes this technician's meta record for the session: the session's name, labels and
/// assignee as they read now, with `change` applied. What it does not change stays.
async fn update_meta(
    node: &Node,
    session: DocId,
    change: impl FnOnce(&mut SessionMeta) + Send + 'static,
) -> Result<()> {
    let view = node
        .read_with_fleet(session, SessionView::read_without_output)
        .await?
        .ok_or_else(|| anyhow!("no session {}", session.short()))??;
    let mut meta =
        SessionMeta { session, name: view.info.name, labels: view.info.labels, at: now_ms(), assignee: view.assignee };
    change(&mut meta);
    meta.labels = meta.labels.iter().map(PeerText::trimmed).filter(|l| !l.is_empty()).collect();
    let signer = node.signer().clone();
    node.change(session, move |doc| SessionWriter::rename(doc, &signer, &meta))
        .await?
        .context("writing the session's name, labels and assignee")?;
    Ok(())
}

/// Adds a note by this technician.
pub async fn add_note(node: &Node, session: DocId, text: &str) -> Result<()> {
    let text = text.trim().to_string();
    if text.is_empty() {
        bail!("the note is empty");
    }
    if text.len() > MAX_NOTE {
        bail!("the note is {} bytes; a note holds at most {MAX_NOTE}", text.len());
    }
    let note = SessionNote { session, id: random_id(), text: text.into(), at: now_ms() };
    let signer = node.signer().clone();
    node.change(session, move |doc| SessionWriter::note(doc, &signer, &note)).await?.context("writing the note")?;
    Ok(())
}

/// A group run's transcript: the transcript of each machine's session (redacted and reviewed
/// alike), gathered under the run's name and the summary, and signed as one.
pub async fn build_group_transcript(
    node: &Node,
    key: &str,
    share: ShareRequest,
) -> Result<caisey_doc::transcript::group::GroupFile> {
    let run = group_run(node, key).await?;
    let summary = share.summary.clone();
    let mut parts = Vec::new();
    for m in &run.machines {
        let each = ShareRequest { summary: None, omit: vec![], ..share.clone() };
        parts.push(build_transcript(node, m.session, each).await?);
    }
    let signer = node.signer().clone();
    Ok(caisey_doc::transcript::group::GroupFile::sign(run.run, run.name, summary, parts, &signer, now_ms()))
}

/// One run of a command, for history across weeks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PastRun {
    pub session: DocId,
    pub session_name: PeerText,
    pub request: Id128,
    /// The request's code: how a person names this run (`caisey diff CODE CODE`).
    pub code: Id128,
    pub machine: PeerText,
    pub script: String,
    pub requested_at: u64,
    pub status: String,
    pub exit_code: Option<i32>,
}

/// Every run of `script` (whitespace-trimmed) on `machine` (or on any machine), oldest first.
pub async fn history(node: &Node, machine: Option<NodeId>, script: &str) -> Result<Vec<PastRun>> {
    let wanted = script.trim();
    runs_where(node, |c| c.request.command.script.trim() == wanted && machine.is_none_or(|m| c.request.target == m))
        .await
}

/// The runs of every command that `session` holds, on its machine, in any session: a weekly
/// check's whole history, oldest first.
pub async fn session_history(node: &Node, session: DocId) -> Result<Vec<PastRun>> {
    let asked: BTreeSet<(NodeId, String)> = node
        .read_with_fleet(session, SessionView::read_without_output)
        .await?
        .ok_or_else(|| anyhow!("no session {}", session.short()))??
        .commands
        .iter()
        .map(|c| (c.request.target, c.request.command.script.trim().to_string()))
        .collect();
    runs_where(node, |c| asked.contains(&(c.request.target, c.request.command.script.trim().to_string()))).await
}

/// The run whose code starts with `code` (as `history` lists them).
pub async fn find_run(node: &Node, code: &str) -> Result<PastRun> {
    let wanted = code.trim().to_lowercase();
    if wanted.len() < 4 || !wanted.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{code:?} is not a run's code (the hex code `caisey history` lists, at least 4 characters)");
    }
    let found = runs_where(node, |c| c.request.approval_code().to_hex().starts_with(&wanted)).await?;
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no run with code {code:?}; see `caisey history`"),
        many => bail!("{code:?} names {} runs; give more of the code", many.len()),
    }
}

async fn runs_where(node: &Node, wanted: impl Fn(&CommandView) -> bool) -> Result<Vec<PastRun>> {
    let fleet = node.fleet().await?;
    let mut out = Vec::new();
    for (session, view) in session_views(node).await? {
        for c in view.commands.iter().filter(|c| wanted(c)) {
            out.push(PastRun {
                session,
                session_name: view.info.name.clone(),
                request: c.request.id,
                code: c.request.approval_code(),
                machine: fleet.members.get(&c.request.target).map(|m| m.name.clone()).unwrap_or_default(),
                script: c.request.command.script.clone(),
                requested_at: c.request.requested_at,
                status: c.status().to_string(),
                exit_code: c.end.as_ref().and_then(|e| e.exit_code),
            });
        }
    }
    out.sort_by_key(|r| (r.requested_at, r.request));
    Ok(out)
}

/// The distinct commands ever run on `machine`, most recent first, with how often.
pub async fn commands_run_on(node: &Node, machine: NodeId) -> Result<Vec<(String, usize)>> {
    let mut seen: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for (_, view) in session_views(node).await? {
        for c in view.commands.iter().filter(|c| c.request.target == machine) {
            let e = seen.entry(c.request.command.script.trim().to_string()).or_default();
            e.0 = e.0.max(c.request.requested_at);
            e.1 += 1;
        }
    }
    let mut out: Vec<(String, u64, usize)> = seen.into_iter().map(|(s, (t, n))| (s, t, n)).collect();
    out.sort_by_key(|(_, t, _)| std::cmp::Reverse(*t));
    Ok(out.into_iter().map(|(s, _, n)| (s, n)).collect())
}

/// The first line of a command's output that has `query`, read a page at a time (an output of
/// any size costs a page of memory, and reading stops at the first page with a match).
async fn first_matching_line(node: &Node, session: DocId, request: Id128, query: &str) -> Result<Option<String>> {
    const PAGE: usize = 4 * 1024 * 1024;
    let fleet = node.fleet().await?;
    let Some(Ok(view)) =
        node.read_with_output(session, move |d, _| SessionView::read_without_output(d, &fleet)).await?
    else {
        return Ok(None);
    };
    let Some(cmd) = view.command(&request).map(|c| c.request.clone()) else { return Ok(None) };
    let (mut from, mut carry) = (0, String::new());
    loop {
        let req = cmd.clone();
        let Some((chunks, next)) = node
            .read_with_output(session, move |d, stored| SessionView::read_output_from(d, &req, from, PAGE, stored))
            .await?
        else {
            return Ok(None);
        };
        let last = next == from || chunks.iter().map(|c| c.data.len()).sum::<usize>() < PAGE;
        for c in chunks {
            carry.push_str(&String::from_utf8_lossy(&c.data));
        }
        // Whole lines only, but for the last page (or a line past a MiB); the unfinished line
        // waits for the next page.
        let cut = if last || carry.len() > 1 << 20 { carry.len() } else { carry.rfind('\n').map_or(0, |i| i + 1) };
        if let Some(line) = crate::search::matching_line(&carry[..cut], query) {
            return Ok(Some(line));
        }
        carry.drain(..cut);
        if last {
            return Ok(None);
        }
        from = next;
    }
}

/// The raw output bytes of one command, stdout and stderr interleaved as written.
pub async fn output_bytes(node: &Node, session: DocId, request: Id128) -> Result<Vec<u8>> {
    let fleet = node.fleet().await?;
    node.read_with_output(session, move |d, stored| -> Result<Vec<u8>> {
        let view = SessionView::read_without_output(d, &fleet)?;
        let cmd = view.command(&request).ok_or_else(|| anyhow!("no command {} here", request.short()))?;
        let (chunks, _) = SessionView::read_output_from(d, &cmd.request, 0, usize::MAX, stored);
        Ok(chunks.into_iter().flat_map(|c| c.data).collect())
    })
    .await?
    .ok_or_else(|| anyhow!("no session {}", session.short()))?
}

/// The same, lossily decoded (for diffs).
pub async fn output_text(node: &Node, session: DocId, request: Id128) -> Result<String> {
    Ok(String::from_utf8_lossy(&output_bytes(node, session, request).await?).into_owned())
}

/// A line of a diff between two runs' outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiffLine {
    Same(String),
    Removed(String),
    Added(String),
}

/// A line diff of two outputs (older first).
pub fn diff(old: &str, new: &str) -> Vec<DiffLine> {
    similar::TextDiff::from_lines(old, new)
        .iter_all_changes()
        .map(|c| {
            let text = c.value().trim_end_matches('\n').to_string();
            match c.tag() {
                similar::ChangeTag::Equal => DiffLine::Same(text),
                similar::ChangeTag::Delete => DiffLine::Removed(text),
                similar::ChangeTag::Insert => DiffLine::Added(text),
            }
        })
        .collect()
}

/// How this node stands with its relays: reachable or not, and how many documents hold changes
/// the relay has not confirmed yet (written here while offline, waiting to sync).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub relays: usize,
    pub relays_connected: usize,
    pub unconfirmed_docs: usize,
    /// Why writes to this node's store fail (now, or within the last minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwritable: Option<String>,
}

pub async fn sync_status(node: &Node) -> Result<SyncStatus> {
    let relays = node.relay_contacts().await?;
    let unwritable = node.write_trouble();
    let Some(first) = relays.first().map(|c| c.node) else {
        return Ok(SyncStatus { unwritable, ..Default::default() });
    };
    let connected: Vec<NodeId> = node.peers().await?.into_iter().map(|p| p.peer).collect();
    let relays_connected = relays.iter().filter(|r| connected.contains(&r.node)).count();
    let unconfirmed_docs = node.unconfirmed_docs(first).await?;
    Ok(SyncStatus { relays: relays.len(), relays_connected, unconfirmed_docs, unwritable })
}

/// One machine's part of a group run: its latest command there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupMachine {
    pub machine: PeerText,
    pub session: DocId,
    pub request: Id128,
    pub code: Id128,
    pub status: String,
    pub exit_code: Option<i32>,
    pub decided_by: Option<String>,
    pub requested_at: u64,
}

/// Machines whose output was the same, byte for byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SameOutput {
    pub machines: Vec<PeerText>,
    pub output: String,
    /// Whether the output went on past what was compared ([`GROUPED_BYTES`]).
    pub cut: bool,
}

/// A group run held as one investigation: every machine side by side, and machines whose
/// output is identical gathered together (as `dshbak -c` does), the largest group first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRunView {
    pub run: Id128,
    pub name: PeerText,
    pub machines: Vec<GroupMachine>,
    pub outputs: Vec<SameOutput>,
    pub last_activity: u64,
}

/// How much of each machine's output is compared and shown when gathering identical ones.
pub const GROUPED_BYTES: usize = 1024 * 1024;

/// Every group run here, newest first (machines without output gathered).
pub async fn group_runs(node: &Node) -> Result<Vec<GroupRunView>> {
    let fleet = node.fleet().await?;
    let mut runs: BTreeMap<Id128, GroupRunView> = BTreeMap::new();
    for (session, v) in session_views(node).await? {
        let Some(gr) = &v.group_run else { continue };
        let run = runs.entry(gr.run).or_insert_with(|| GroupRunView {
            run: gr.run,
            name: gr.name.clone(),
            machines: vec![],
            outputs: vec![],
            last_activity: 0,
        });
        run.last_activity = run.last_activity.max(v.last_activity());
        if let Some(c) = v.commands.last() {
            run.machines.push(GroupMachine {
                machine: fleet.members.get(&c.request.target).map(|m| m.name.clone()).unwrap_or_default(),
                session,
                request: c.request.id,
                code: c.request.approval_code(),
                status: c.status().to_string(),
                exit_code: c.end.as_ref().and_then(|e| e.exit_code),
                decided_by: c.decision.as_ref().map(|d| d.decided_by.clone()),
                requested_at: c.request.requested_at,
            });
        }
    }
    let mut out: Vec<GroupRunView> = runs.into_values().collect();
    for r in &mut out {
        r.machines.sort_by(|a, b| a.machine.cmp(&b.machine));
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.last_activity));
    Ok(out)
}

/// The group run named `key` (its name, or a prefix of its id), with identical outputs gathered.
pub async fn group_run(node: &Node, key: &str) -> Result<GroupRunView> {
    let runs = group_runs(node).await?;
    let key_l = key.trim().to_lowercase();
    let mut found: Vec<GroupRunView> = runs.iter().filter(|r| r.name == key.trim()).cloned().collect();
    if found.is_empty() {
        found = runs.into_iter().filter(|r| key_l.len() >= 4 && r.run.to_hex().starts_with(&key_l)).collect();
    }
    let mut run = match found.len() {
        0 => bail!("no group run {key:?}; see `caisey group-runs`"),
        1 => found.remove(0),
        n => bail!("{key:?} names {n} group runs; give its id"),
    };
    let mut same: BTreeMap<(Vec<u8>, bool), Vec<PeerText>> = BTreeMap::new();
    let fleet = node.fleet().await?;
    for m in run.machines.iter().filter(|m| !matches!(m.status.as_str(), "waiting for approval" | "running")) {
        let (session, request, fleet) = (m.session, m.request, fleet.clone());
        let head = node
            .read_with_output(session, move |d, stored| -> Option<(Vec<u8>, bool)> {
                let view = SessionView::read_without_output(d, &fleet).ok()?;
                let cmd = view.command(&request)?;
                let (chunks, _) = SessionView::read_output_from(d, &cmd.request, 0, GROUPED_BYTES + 1, stored);
                let mut bytes: Vec<u8> = chunks.into_iter().flat_map(|c| c.data).collect();
                let cut = bytes.len() > GROUPED_BYTES;
                bytes.truncate(GROUPED_BYTES);
                Some((bytes, cut))
            })
            .await?
            .flatten()
            .unwrap_or_default();
        same.entry(head).or_default().push(m.machine.clone());
    }
    run.outputs = same
        .into_iter()
        .map(|((bytes, cut), machines)| SameOutput {
            machines,
            output: String::from_utf8_lossy(&bytes).into_owned(),
            cut,
        })
        .collect();
    run.outputs.sort_by_key(|o| std::cmp::Reverse(o.machines.len()));
    Ok(run)
}
