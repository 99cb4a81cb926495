//! A whole org in one process, for measuring: a real relay, a real technician node and N real
//! agents, each with its own home, redb file and iroh endpoint on 127.0.0.1, running the real
//! agent daemon. Only the *setup* takes a shortcut: agent memberships are signed by the org key
//! in one batch and agent homes are seeded with the fleet directly, instead of N enrollments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use caisey_agent::local::{self, LocalReply, LocalRequest};
use caisey_doc::automerge::Automerge;
use caisey_doc::fleet::{Contact, Fleet, Membership, Role};
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::record::RecordKind;
use caisey_doc::token::RelayTicket;
use caisey_peer::home::Home;
use caisey_peer::node::{Node, NodeOptions, SETTING_RELAYS};
use caisey_peer::store::{Store, Write};
use caisey_peer::wire::DocKind;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub fn options(dir: &Path) -> Result<NodeOptions> {
    Ok(NodeOptions { home: Home::new(Some(dir.to_path_buf()), "bench")?, listen: "127.0.0.1:0".parse()? })
}

/// An agent's home, seeded and possibly running.
pub struct Agent {
    pub name: String,
    pub node_id: NodeId,
    pub home: PathBuf,
    pub node: Option<Node>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Agent {
    pub fn socket(&self) -> PathBuf {
        self.home.join(caisey_peer::home::SOCKET)
    }
}

pub struct Org {
    pub root: tempfile::TempDir,
    pub relay: Option<Node>,
    pub relay_contact: Contact,
    pub tech: Node,
    pub fleet_doc: DocId,
    pub agents: Vec<Agent>,
    stop: watch::Sender<bool>,
}

impl Org {
    /// A relay (in this process, or an external one given by its ticket), a technician, and
    /// `n` agent homes in group `group`, seeded but not started.
    pub async fn new(n: usize, group: &str, external_relay: Option<(&Path, &str)>) -> Result<Org> {
        let root = tempfile::tempdir()?;
        let (relay, relay_ticket) = match external_relay {
            Some((_, ticket)) => (None, ticket.to_string()),
            None => {
                let relay = caisey_relay::start(options(&root.path().join("relay"))?, None).await?;
                let ticket = caisey_relay::ticket_of(&relay);
                (Some(relay), ticket)
            }
        };
        let tech = Node::start(options(&root.path().join("tech"))?).await?;
        caisey_viewer::tech::init(&tech, "Bench", "bench").await?;
        let ticket = RelayTicket::decode(&relay_ticket)?;
        caisey_peer::enroll::adopt_relay(&tech, &ticket).await?;
        caisey_viewer::tech::go_online(&tech, &[]).await?;
        let fleet_doc = tech.fleet_doc().await?.ok_or_else(|| anyhow!("no fleet"))?;
        let org_key = tech.home().org_key()?.ok_or_else(|| anyhow!("no org key"))?;

        let mut agents = Vec::new();
        let mut records = Vec::new();
        for i in 0..n {
            let home = root.path().join(format!("agent-{i}"));
            let node_id = Home::new(Some(home.clone()), "bench")?.node_key()?.node_id();
            let name = format!("ag-{i:04}");
            let m = Membership {
                node: node_id,
                role: Role::Agent,
                name: name.as_str().into(),
                groups: vec![group.to_string()],
                approves: vec![],
                at: caisey_peer::now_ms(),
                invite: None,
            };
            records.push((org_key.sign(RecordKind::Membership, &m), node_id));
            agents.push(Agent { name, node_id, home, node: None, task: None });
        }
        tech.change(fleet_doc, move |d| -> Result<()> {
            for (record, node) in &records {
                Fleet::put_member(d, record, node)?;
            }
            Ok(())
        })
        .await??;
        if !tech.wait_in_sync(ticket.node(), Duration::from_secs(60)).await? {
            bail!("the relay did not take the fleet");
        }
        let fleet_bytes = tech.read(fleet_doc, Automerge::save).await?.ok_or_else(|| anyhow!("no fleet"))?;
        let relays = serde_json::to_vec(&vec![ticket.0.clone()])?;
        for a in &agents {
            let mut store = Store::open(&a.home.join("store.redb"))?;
            store.apply(&[
                Write::Doc { doc: fleet_doc, kind: DocKind::Fleet, bytes: fleet_bytes.clone(), compact: true },
                Write::Setting { key: SETTING_RELAYS.into(), value: relays.clone() },
            ])?;
        }
        let (stop, _) = watch::channel(false);
        Ok(Org { root, relay, relay_contact: ticket.0, tech, fleet_doc, agents, stop })
    }

    /// Starts every agent's daemon in this process and waits until the technician sees each
    /// one's heartbeat (through the relay).
    pub async fn start_agents(&mut self) -> Result<()> {
        for a in &mut self.agents {
            let node = Node::start(options(&a.home)?).await?;
            let mut stopped = self.stop.subscribe();
            a.task = Some(tokio::spawn(caisey_agent::daemon::run_node(node.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            })));
            a.node = Some(node);
        }
        let want = self.agents.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + want as u64 / 10);
        loop {
            let seen = self.tech.fleet().await?.presence.len().saturating_sub(1);
            if seen >= want {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("only {seen} of {want} agents came online");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Approves (as the endpoint user, over the local socket) the pending request `request` on
    /// `agent`, asking the socket again each time the agent's documents change — as a consent
    /// window would be woken — rather than polling it.
    pub async fn approve(agent: &Agent, request: Id128) -> Result<()> {
        let mut events = agent.node.as_ref().map(Node::subscribe);
        let socket = agent.socket();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(LocalReply::Pending { pending, .. }) = local::call(&socket, &LocalRequest::Pending).await
                && let Some(p) = pending.iter().find(|p| p.request == request)
            {
                return match local::call(&socket, &LocalRequest::Approve { id: p.id.to_hex(), each_run: false }).await?
                {
                    LocalReply::Done { .. } => Ok(()),
                    other => Err(anyhow!("approve failed: {other:?}")),
                };
            }
            if tokio::time::Instant::now() > deadline {
                bail!("request {} never became pending at {}", request.short(), socket.display());
            }
            match &mut events {
                // A change to the agent's documents is when a request can have arrived; the
                // agent reviews it right after, so give the review a moment.
                Some(ev) => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), ev.recv()).await;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The org with its technician node dropped (its store closed), to start it again later.
    pub fn without_tech(self) -> Headless {
        let Org { root, relay, relay_contact, tech, fleet_doc, agents, stop } = self;
        drop(tech);
        Headless { root, relay, relay_contact, fleet_doc, agents, stop }
    }

    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        for a in self.agents {
            if let Some(t) = a.task {
                t.await.context("agent task")??;
            }
        }
        self.tech.shutdown().await;
        if let Some(r) = self.relay {
            r.shutdown().await;
        }
        Ok(())
    }
}

/// An [`Org`] whose technician is offline.
pub struct Headless {
    pub root: tempfile::TempDir,
    pub relay: Option<Node>,
    pub relay_contact: Contact,
    pub fleet_doc: DocId,
    pub agents: Vec<Agent>,
    stop: watch::Sender<bool>,
}

impl Headless {
    pub fn with_tech(self, tech: Node) -> Org {
        let Headless { root, relay, relay_contact, fleet_doc, agents, stop } = self;
        Org { root, relay, relay_contact, tech, fleet_doc, agents, stop }
    }
}
