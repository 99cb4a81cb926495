//! `caisey demo`: a whole org on this machine, in temporary homes — a relay, a technician and
//! three agents, all real nodes on loopback — and the first story a user tries: ask a machine
//! to run a command, approve it as the endpoint user would, read the transcript. With
//! `--headless` the story is told in the terminal; otherwise the viewer then opens on the
//! technician, with that session in it, and the demo's endpoint users approve what is asked.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use caisey_agent::local::{self, LocalReply, LocalRequest};
use caisey_doc::fleet::Role;
use caisey_doc::session::{CommandSpec, Shell};
use caisey_doc::token::RelayTicket;
use caisey_peer::home::Home;
use caisey_peer::node::{Node, NodeOptions};
use tokio::sync::watch;

use crate::client::Client;
use crate::service::TechService;
use crate::tech::{self, RunRequest, Targets};
use crate::transcript::{Follower, OutputStyle};

const AGENTS: [&str; 3] = ["ws-01", "ws-02", "ws-03"];

fn options(root: &std::path::Path, name: &str) -> Result<NodeOptions> {
    Ok(NodeOptions { home: Home::new(Some(root.join(name)), name)?, listen: "127.0.0.1:0".parse()? })
}

/// The demo org, running.
pub struct DemoFleet {
    root: tempfile::TempDir,
    relay: Node,
    pub technician: Node,
    /// The technician's node as its viewer and CLI see it (in this process).
    pub client: Client,
    /// The session the story leaves behind.
    pub session: caisey_doc::id::DocId,
    stop: watch::Sender<bool>,
    daemons: Vec<tokio::task::JoinHandle<Result<()>>>,
}

/// `caisey demo --headless`: the story in the terminal.
pub async fn headless() -> Result<()> {
    let fleet = DemoFleet::start().await?;
    println!("== done; stopping the demo fleet");
    fleet.stop().await;
    Ok(())
}

impl DemoFleet {
    /// Starts the org and runs the first story, leaving one session in the technician's node.
    pub async fn start() -> Result<DemoFleet> {
        let root = tempfile::tempdir().context("creating a temporary directory")?;
        println!("== starting a relay, a technician and {} agents in {}", AGENTS.len(), root.path().display());
        let relay = caisey_relay::start(options(root.path(), "relay")?, None).await?;
        let technician = Node::start(options(root.path(), "technician")?).await?;
        tech::init(&technician, "Demo Org", "you").await?;
        let client = Client::in_process(TechService::start(technician.clone(), None));
        let ticket = RelayTicket::decode(&caisey_relay::ticket_of(&relay))?;
        caisey_peer::enroll::adopt_relay(&technician, &ticket).await?;
        tech::go_online(&technician, &[]).await?;

        let (stop, stopped) = watch::channel(false);
        let mut daemons = Vec::new();
        for name in AGENTS {
            let spec = tech::InviteSpec {
                groups: vec!["demo".into()],
                ..tech::InviteSpec::new(Role::Agent, Some(name.into()), Duration::from_secs(3600))
            };
            let token = tech::invite(&technician, spec).await?;
            let agent = Node::start(options(root.path(), name)?).await?;
            caisey_peer::enroll::join(&agent, &token, name, &[]).await?;
            let mut stopped = stopped.clone();
            daemons.push(tokio::spawn(caisey_agent::daemon::run_node(agent, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })));
        }
        // Wait for every agent's card to reach the technician through the relay.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let machines = tech::machines(&technician, None, None).await?;
            if machines.iter().filter(|m| m.online && m.card.is_some()).count() == AGENTS.len() {
                for m in machines {
                    let os = m.card.map(|c| format!("{} {}", c.os_name, c.os_version)).unwrap_or_default();
                    println!("   online  {}  {os}", m.name);
                }
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let seen: Vec<String> = machines
                    .iter()
                    .map(|m| format!("{} online={} card={}", m.name, m.online, m.card.is_some()))
                    .collect();
                bail!("the agents did not come online within 20 s (seen: {})", seen.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        println!("== the technician asks ws-01 for a quick health check");
        let script = "echo \"host: $(uname -n)\"; uptime; df -h / | tail -n 1; echo 'a warning on stderr' >&2";
        let command = CommandSpec {
            shell: Shell::Sh,
            script: script.into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 30_000,
            collect: None,
        };
        let request = RunRequest {
            targets: Targets::Machine(AGENTS[0].into()),
            session: Some("demo: health check".into()),
            labels: vec!["demo".into()],
            command,
            description: "Quick health check for the demo".into(),
            approval_window: Duration::from_secs(600),
        };
        let asked = tech::ask(&technician, request).await?;
        let (session, id) = (asked[0].session, asked[0].request);

        println!("== the endpoint user on ws-01 sees the request and approves it");
        let socket = root.path().join(AGENTS[0]).join(caisey_peer::home::SOCKET);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let code = loop {
            if let Ok(LocalReply::Pending { pending, .. }) = local::call(&socket, &LocalRequest::Pending).await
                && let Some(p) = pending.iter().find(|p| p.request == id)
            {
                println!("   pending: {} asks to run: {}", p.technician, p.script);
                break p.id;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the request did not reach ws-01 within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match local::call(&socket, &LocalRequest::Approve { id: code.to_hex(), each_run: false }).await? {
            LocalReply::Done { message } => println!("   {message}"),
            LocalReply::Error { error } => bail!("approving failed: {error}"),
            _ => bail!("unexpected reply"),
        }

        println!("== the transcript, as the technician sees it");
        let mut follower = Follower::new(session, Some(BTreeSet::from([id])), OutputStyle::Labelled);
        let mut events = technician.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        loop {
            let cmds = follower.update(&client).await?;
            if cmds.iter().all(|c| c.is_final()) {
                break;
            }
            if tokio::time::timeout_at(deadline, events.recv()).await.is_err() {
                bail!("the command did not finish within 40 s");
            }
        }
        Ok(DemoFleet { root, relay, technician, client, session, stop, daemons })
    }

    /// The local socket of the demo agent `name` (what its consent window talks to).
    pub fn socket(&self, name: &str) -> std::path::PathBuf {
        self.root.path().join(name).join(caisey_peer::home::SOCKET)
    }

    /// Stands in for the demo machines' users: approves every request as it arrives, saying so.
    /// (On a real machine each user decides in `caisey-agent prompt`.)
    pub fn approve_everything(&self) -> tokio::task::JoinHandle<()> {
        let sockets: Vec<_> = AGENTS.iter().map(|a| (*a, self.socket(a))).collect();
        tokio::spawn(async move {
            loop {
                for (name, socket) in &sockets {
                    let Ok(LocalReply::Pending { pending, .. }) = local::call(socket, &LocalRequest::Pending).await
                    else {
                        continue;
                    };
                    for p in pending {
                        println!(
                            "demo: the user of {name} approves {:?} from {}",
                            caisey_doc::text::visible(&p.script),
                            p.technician
                        );
                        let _ =
                            local::call(socket, &LocalRequest::Approve { id: p.id.to_hex(), each_run: false }).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for d in self.daemons {
            let _ = d.await;
        }
        self.technician.shutdown().await;
        self.relay.shutdown().await;
    }
}
