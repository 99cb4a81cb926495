//! One function per row of the table. Each builds what it measures from real parts and tears
//! it down; timings are wall-clock from the moment the user would act to the moment the
//! technician's node holds the result.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::automerge::Automerge;
use caisey_doc::fleet::Contact;
use caisey_doc::id::{DocId, Id128};
use caisey_doc::session::{
    ChunkSource, CommandRequest, CommandSpec, Decision, End, EndStatus, OutputChunk, SessionInfo, SessionView,
    SessionWriter, Shell, Start, Stream, Verdict, chunk_hash,
};
use caisey_peer::node::{Node, NodeEvent};
use caisey_peer::wire::DocKind;
use caisey_viewer::tech::{self, RunRequest, Targets};
use iroh::endpoint::presets;
use iroh::{Endpoint, Watcher as _};

use crate::org::{Org, options};

const MIB: f64 = 1024.0 * 1024.0;

fn spec(script: String) -> CommandSpec {
    CommandSpec { shell: Shell::Sh, script, cwd: None, env: Default::default(), timeout_ms: 3_600_000, collect: None }
}

fn run_request(targets: Targets, session: &str, script: String) -> RunRequest {
    RunRequest {
        targets,
        session: Some(session.into()),
        labels: vec![],
        command: spec(script),
        description: "benchmark".into(),
        approval_window: Duration::from_secs(3600),
    }
}

/// Waits until the technician holds the end of every `(session, request)` and all output,
/// re-reading only the
/// sessions that changed (re-reading all of them on every change would cost more than what is
/// measured, at a thousand sessions).
async fn wait_ends(tech: &Node, wanted: &[(DocId, Id128)], timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut events = tech.subscribe();
    let mut left: std::collections::BTreeMap<DocId, Vec<Id128>> = std::collections::BTreeMap::new();
    for (s, r) in wanted {
        left.entry(*s).or_default().push(*r);
    }
    let mut changed: std::collections::BTreeSet<DocId> = left.keys().copied().collect();
    loop {
        let check: Vec<(DocId, Vec<Id128>)> =
            changed.iter().filter_map(|s| left.get(s).map(|r| (*s, r.clone()))).collect();
        let mut done = Vec::new();
        for (s, reqs) in check {
            let ended = tech
                .read_with_fleet(s, move |d, fleet| {
                    SessionView::read_without_output(d, fleet)
                        .is_ok_and(|v| reqs.iter().all(|r| v.command(r).is_some_and(|c| c.end.is_some())))
                })
                .await?
                .unwrap_or(false);
            if ended && tech.missing_output(s).await? == 0 {
                done.push(s);
            }
        }
        for s in done {
            left.remove(&s);
        }
        changed.clear();
        if left.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => bail!(
                "{} of {} commands had not ended after {timeout:?}",
                left.values().map(Vec::len).sum::<usize>(),
                wanted.len()
            ),
            Ok(Ok(NodeEvent::DocChanged(d))) => {
                changed.insert(d);
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => changed.extend(left.keys().copied()),
            Ok(_) => {}
        }
        while let Ok(ev) = events.try_recv() {
            if let NodeEvent::DocChanged(d) = ev {
                changed.insert(d);
            }
        }
    }
}

/// How output reaches the technician in a row that runs one command on one agent.
#[derive(Clone, Copy, PartialEq)]
pub enum Route {
    /// Technician and agent reach each other directly (as on a LAN), and no relay is running.
    Direct,
    /// Through the relay only: agent → relay → technician (as for a remote technician).
    Relay,
}

/// An org with one running agent, asked to run `script` in session `name`; not yet approved.
/// Direct: the technician dials the agent, and the relay is stopped once the request is out.
async fn one_agent_asked(name: &str, script: String, route: Route) -> Result<(Org, DocId, Id128)> {
    one_agent_asked_to(name, spec(script), route).await
}

/// Like [`one_agent_asked`], for a command given whole (one that brings files back).
async fn one_agent_asked_to(name: &str, command: CommandSpec, route: Route) -> Result<(Org, DocId, Id128)> {
    let mut org = Org::new(1, "bench", None).await?;
    org.start_agents().await?;
    let agent = &org.agents[0];
    let agent_node = agent.node.clone().ok_or_else(|| anyhow!("agent not started"))?;
    if route == Route::Direct {
        org.tech.dial(&Contact { node: agent.node_id, addrs: agent_node.addrs() }).await?;
    }
    let mut request = run_request(Targets::Machine(agent.name.clone()), name, String::new());
    request.command = command;
    let asked = tech::ask(&org.tech, request).await?;
    let (session, request) = (asked[0].session, asked[0].request);
    if route == Route::Direct {
        if !org.tech.wait_in_sync(agent.node_id, Duration::from_secs(60)).await? {
            bail!("the agent did not take the request");
        }
        if let Some(relay) = org.relay.take() {
            relay.shutdown().await;
        }
    }
    Ok((org, session, request))
}

fn output_bytes(doc: &Automerge, req: &CommandRequest, stored: &dyn ChunkSource) -> usize {
    SessionView::read_output_from(doc, req, 0, usize::MAX, stored).0.iter().map(|c| c.data.len()).sum()
}

/// What the streaming rows measured.
pub struct Streaming {
    /// MiB/s of output, agent → technician directly.
    pub direct: f64,
    /// MiB/s of output, agent → relay → technician.
    pub through_relay: f64,
    /// MiB/s of the same bytes over one raw iroh stream.
    pub raw: f64,
    /// MiB/s of the same bytes written and made durable in 1 MiB pieces on this disk.
    pub durable_disk: f64,
    /// Bytes the agent's and the relay's stores take after the relay run.
    pub agent_disk: u64,
    pub relay_disk: u64,
}

/// Output streamed agent → session document → technician, directly and through the relay, and
/// the two ceilings it is held against: the same bytes over a raw iroh stream, and written
/// durably to this disk (every node makes output durable before passing it on).
pub async fn streaming(size: usize) -> Result<Streaming> {
    let (direct, _) = stream_once(size, Route::Direct).await?;
    let (through_relay, (agent_disk, relay_disk)) = stream_once(size, Route::Relay).await?;
    let raw = raw_iroh(size).await?;
    let durable_disk = durable_writes(size)?;
    Ok(Streaming { direct, through_relay, raw, durable_disk, agent_disk, relay_disk })
}

/// MiB/s of `size` bytes of a command's output reaching the technician by `route`, and the
/// bytes the agent's and relay's stores take afterwards (relay: 0 when direct).
async fn stream_once(size: usize, route: Route) -> Result<(f64, (u64, u64))> {
    // Lines of text that cost the command little to make, so that the row measures the
    // pipeline (the raw row sends from memory), and that never repeat: a store keeps identical
    // chunks once, and repeating output (`yes`) made disk use look smaller than the output.
    let script = format!("seq 1000000000000 9999999999999 | head -c {size}");
    let (org, session, request) = one_agent_asked("stream", script, route).await?;
    let agent = &org.agents[0];
    let started = Instant::now();
    Org::approve(agent, request).await?;
    wait_ends(&org.tech, &[(session, request)], Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    let fleet = org.tech.fleet().await?;
    let got = org
        .tech
        .read_with_output(session, move |d, stored| {
            let view = SessionView::read_without_output(d, &fleet).ok()?;
            Some(output_bytes(d, &view.command(&request)?.request, stored))
        })
        .await?
        .flatten()
        .unwrap_or(0);
    if got != size {
        bail!("the technician holds {got} of {size} output bytes");
    }
    let relay_disk = match &org.relay {
        Some(relay) => {
            relay.wait_in_sync(agent.node_id, Duration::from_secs(120)).await?;
            store_bytes(&org.root.path().join("relay"))?
        }
        None => 0,
    };
    let agent_disk = store_bytes(&agent.home)?;
    org.stop().await?;
    Ok((size as f64 / MIB / elapsed.as_secs_f64(), (agent_disk, relay_disk)))
}

/// What the artifact rows measured: MiB/s of a file brought back, agent → technician.
pub struct ArtifactTransfer {
    pub direct: f64,
    pub through_relay: f64,
    /// MiB/s of the same bytes over one raw iroh stream, in the same run.
    pub raw: f64,
}

/// A file of `size` bytes left by a command and brought back (`--collect`), directly and
/// through the relay: timed from the approval until the technician holds every byte of it
/// (the agent reads, hashes and stores it, then it is fetched chunk by chunk, each checked).
pub async fn artifact_transfer(size: usize) -> Result<ArtifactTransfer> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dump.bin");
    // Bytes that never repeat (a store keeps identical chunks once).
    let mut data = Vec::with_capacity(size);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(&file, &data)?;
    drop(data);
    let mut rates = Vec::new();
    for route in [Route::Direct, Route::Relay] {
        let command = CommandSpec {
            collect: Some(caisey_doc::artifact::Collect {
                paths: vec![file.display().to_string()],
                limit: size as u64,
            }),
            ..spec("true".into())
        };
        let (org, session, request) = one_agent_asked_to("artifact", command, route).await?;
        let started = Instant::now();
        Org::approve(&org.agents[0], request).await?;
        wait_ends(&org.tech, &[(session, request)], Duration::from_secs(600)).await?;
        let elapsed = started.elapsed();
        let held = caisey_viewer::artifacts::list(&org.tech, session).await?;
        if !held.first().is_some_and(|a| a.complete() && a.size == Some(size as u64)) {
            bail!("the technician does not hold the whole file");
        }
        org.stop().await?;
        rates.push(size as f64 / MIB / elapsed.as_secs_f64());
    }
    Ok(ArtifactTransfer { direct: rates[0], through_relay: rates[1], raw: raw_iroh(size).await? })
}

/// MiB/s of writing `size` bytes to a fresh file on this disk in 1 MiB pieces, each made
/// durable (`fdatasync`) before the next: what one node's store can do at most.
fn durable_writes(size: usize) -> Result<f64> {
    use std::io::Write as _;
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("durable"))?;
    let block: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let started = Instant::now();
    let mut written = 0;
    while written < size {
        let n = block.len().min(size - written);
        file.write_all(&block[..n])?;
        file.sync_data()?;
        written += n;
    }
    Ok(size as f64 / MIB / started.elapsed().as_secs_f64())
}

/// Bytes a node's store takes on disk: the redb file and the output log beside it.
fn store_bytes(home: &Path) -> Result<u64> {
    let redb = std::fs::metadata(home.join("store.redb"))?.len();
    let log = std::fs::metadata(home.join("store.chunks")).map(|m| m.len()).unwrap_or(0);
    Ok(redb + log)
}

/// MiB/s of `size` bytes over one bi-stream between two iroh endpoints on loopback.
pub async fn raw_iroh(size: usize) -> Result<f64> {
    const ALPN: &[u8] = b"caisey/bench-raw/1";
    let bind = |alpns: Vec<Vec<u8>>| async move {
        Endpoint::builder(presets::Minimal)
            .alpns(alpns)
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0")?
            .bind()
            .await
            .map_err(anyhow::Error::from)
    };
    let server = bind(vec![ALPN.to_vec()]).await?;
    let client = bind(vec![]).await?;
    let addr = server.watch_addr().get();
    let receiver = tokio::spawn({
        let server = server.clone();
        async move {
            let incoming = server.accept().await.ok_or_else(|| anyhow!("no connection"))?;
            let conn = incoming.await?;
            let (_send, mut recv) = conn.accept_bi().await?;
            let mut total = 0usize;
            let mut buf = vec![0u8; 256 * 1024];
            while let Some(n) = recv.read(&mut buf).await? {
                total += n;
            }
            conn.close(0u32.into(), b"done");
            anyhow::Ok(total)
        }
    });
    let conn = client.connect(addr, ALPN).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    let block: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let started = Instant::now();
    let mut sent = 0;
    while sent < size {
        let n = block.len().min(size - sent);
        send.write_all(&block[..n]).await?;
        sent += n;
    }
    send.finish()?;
    let received = receiver.await??;
    let elapsed = started.elapsed();
    if received != size {
        bail!("raw stream delivered {received} of {size} bytes");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server.close()).await;
    Ok(size as f64 / MIB / elapsed.as_secs_f64())
}

/// Milliseconds from a line being written by the command to it being in the technician's
/// document, for `lines` lines written every 50 ms. Returns the sorted latencies.
pub async fn line_latency(lines: usize) -> Result<Vec<f64>> {
    let script = format!("for i in $(seq 1 {lines}); do date +%s%N; sleep 0.05; done");
    let (org, session, request) = one_agent_asked("latency", script, Route::Relay).await?;
    let agent = &org.agents[0];
    let fleet = org.tech.fleet().await?;
    let req = org
        .tech
        .read(session, move |d| {
            SessionView::read_without_output(d, &fleet)
                .ok()
                .and_then(|v| v.command(&request).map(|c| c.request.clone()))
        })
        .await?
        .flatten()
        .ok_or_else(|| anyhow!("request not found"))?;
    let mut events = org.tech.subscribe();
    Org::approve(agent, request).await?;
    let mut latencies = Vec::new();
    let (mut pos, mut partial) = (0usize, String::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + lines as u64);
    while latencies.len() < lines {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => bail!("only {} of {lines} lines arrived", latencies.len()),
            Ok(Ok(NodeEvent::DocChanged(d))) if d == session => {}
            Ok(_) => continue,
        }
        let r = req.clone();
        let (chunks, next) = org
            .tech
            .read_with_output(session, move |d, stored| SessionView::read_output_from(d, &r, pos, usize::MAX, stored))
            .await?
            .unwrap_or_default();
        let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as f64;
        pos = next;
        for c in chunks.iter().filter(|c| c.stream == Stream::Stdout) {
            partial.push_str(&String::from_utf8_lossy(&c.data));
        }
        while let Some(i) = partial.find('\n') {
            let line: String = partial.drain(..=i).collect();
            if let Ok(t) = line.trim().parse::<f64>() {
                latencies.push((now_ns - t) / 1e6);
            }
        }
    }
    org.stop().await?;
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A group run's time until every exit code is back at the technician, and the CPU time the
/// relay (its own process) spent meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct GroupRun {
    pub seconds: f64,
    pub relay_cpu: f64,
}

/// Asks a group of `n` agents to run a command; each agent's user approves over its local
/// socket as soon as the request shows up. The relay runs as its own process, as deployed:
/// sharing this process's two runtime threads with a thousand agents, its socket overflowed
/// and QUIC's loss recovery, not our code, set the pace.
pub async fn group_run(n: usize) -> Result<GroupRun> {
    let relay = RelayProcess::start()?;
    let mut org = Org::new(n, "bench", Some((relay.dir.path(), &relay.ticket))).await?;
    org.start_agents().await?;
    let relay_cpu = cpu_seconds(relay.child.0.id())?;
    let started = Instant::now();
    let asked = tech::ask(&org.tech, run_request(Targets::Group("bench".into()), "group", "echo ok".into())).await?;
    let org = std::sync::Arc::new(org);
    let mut approvals = Vec::new();
    for a in &asked {
        let index = org.agents.iter().position(|x| x.node_id == a.machine.node).ok_or_else(|| anyhow!("agent"))?;
        let (org, request) = (org.clone(), a.request);
        approvals.push(tokio::spawn(async move { Org::approve(&org.agents[index], request).await }));
    }
    let wanted: Vec<(DocId, Id128)> = asked.iter().map(|a| (a.session, a.request)).collect();
    wait_ends(&org.tech, &wanted, Duration::from_secs(300)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let relay_cpu = cpu_seconds(relay.child.0.id())? - relay_cpu;
    for a in approvals {
        a.await??;
    }
    let org = std::sync::Arc::into_inner(org).ok_or_else(|| anyhow!("org still shared"))?;
    org.stop().await?;
    Ok(GroupRun { seconds: elapsed, relay_cpu })
}

/// The technician is offline while one agent runs `commands` commands; seconds from the
/// technician's node starting again to being in sync with the relay (holding every result).
pub async fn offline_catch_up(commands: usize) -> Result<f64> {
    let mut org = Org::new(1, "bench", None).await?;
    org.start_agents().await?;
    let (agent_id, agent_node) =
        (org.agents[0].node_id, org.agents[0].node.clone().ok_or_else(|| anyhow!("agent not started"))?);
    let fleet = org.tech.fleet().await?;
    let org_key = fleet.org_key.ok_or_else(|| anyhow!("no org"))?;
    // The technician queues the commands, hands them to the relay, and goes away.
    let session = Id128(rand_id());
    let info = SessionInfo { id: session, name: "offline".into(), labels: vec![], created_at: 0, org_key };
    let mut doc = SessionWriter::create(org.tech.signer(), &info)?;
    let mut reqs = Vec::new();
    for i in 0..commands {
        let r = CommandRequest {
            id: Id128(rand_id()),
            session,
            target: agent_id,
            command: spec(format!("check {i}")),
            description: Default::default(),
            requested_at: i as u64,
            expires_at: u64::MAX,
        };
        SessionWriter::request(&mut doc, org.tech.signer(), &r)?;
        reqs.push(r);
    }
    org.tech.create(session, DocKind::Session, doc).await?;
    let relay_id = org.relay_contact.node;
    org.tech.wait_in_sync(relay_id, Duration::from_secs(120)).await?;
    let tech_home = org.root.path().join("tech");
    org.tech.shutdown().await;
    let org = org.without_tech();
    // What the agent writes for each command it runs: decision, start, output, end (100 per change).
    let me = agent_id;
    let tech_id = fleet
        .members
        .values()
        .find(|m| m.role == caisey_doc::fleet::Role::Technician)
        .map(|m| m.node)
        .ok_or_else(|| anyhow!("no technician"))?;
    for batch in reqs.chunks(100) {
        let batch = batch.to_vec();
        let signer = agent_node.signer().clone();
        agent_node
            .append_output(session, vec![(chunk_hash(b"ok\n"), b"ok\n".to_vec())], move |doc| -> Result<()> {
                for r in &batch {
                    let (d, start) = approved_start(r, me, tech_id);
                    SessionWriter::start(doc, &signer, Some(&d), &start)?;
                    let out = OutputChunk { request: r.id, seq: 0, stream: Stream::Stdout, data: b"ok\n".to_vec() };
                    SessionWriter::append_output(doc, &signer, &[out.reference()])?;
                    let end = exited(r, 1);
                    SessionWriter::end(doc, &signer, &end)?;
                }
                Ok(())
            })
            .await??;
    }
    // Wait on content, not on "in sync": while the agent is still sending its batches, the relay
    // can match the agent's heads as of the last message it received and look caught up.
    if let Some(relay) = &org.relay {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            let ended = relay
                .read_with_fleet(session, |d, fleet| {
                    SessionView::read_without_output(d, fleet)
                        .map(|v| v.commands.iter().filter(|c| c.end.is_some()).count())
                        .unwrap_or(0)
                })
                .await?
                .unwrap_or(0);
            if ended == commands {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the relay holds {ended} of {commands} results");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Back online.
    let started = Instant::now();
    let tech = reopen(&tech_home).await?;
    tech.dial(&org.relay_contact).await?;
    if !tech.wait_in_sync(relay_id, Duration::from_secs(300)).await? {
        bail!("the technician did not catch up");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let fleet = tech.fleet().await?;
    let ended = tech
        .read(session, move |d| {
            SessionView::read_without_output(d, &fleet).map(|v| v.commands.iter().filter(|c| c.end.is_some()).count())
        })
        .await?
        .ok_or_else(|| anyhow!("session missing"))??;
    if ended != commands {
        bail!("after catching up the technician sees {ended} of {commands} results");
    }
    org.with_tech(tech).stop().await?;
    Ok(elapsed)
}

/// Starts a node again on a home whose previous node is shutting down (its store may still be
/// closing for a moment).
async fn reopen(home: &Path) -> Result<Node> {
    let mut last = None;
    for _ in 0..100 {
        match Node::start(options(home)?).await {
            Ok(node) => return Ok(node),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last.unwrap_or_else(|| anyhow!("could not reopen {}", home.display())))
}

/// The decision and start a machine's local approval of `r` produces (for synthesized history).
fn approved_start(
    r: &CommandRequest,
    agent: caisey_doc::id::NodeId,
    requester: caisey_doc::id::NodeId,
) -> (Decision, Start) {
    let d = Decision {
        request: r.id,
        session: r.session,
        target: agent,
        requester,
        command_hash: r.command.hash(),
        verdict: Verdict::Approved,
        decided_by: "local user".into(),
        decided_at: 1,
        expires_at: 1,
        nonce: Id128(rand_id()),
    };
    let start = Start { request: r.id, session: r.session, started_at: 1, approved_by: agent, nonce: d.nonce };
    (d, start)
}

/// The end a successful run of `r` records after `chunks` output chunks.
fn exited(r: &CommandRequest, chunks: u64) -> End {
    End {
        probes: Vec::new(),
        request: r.id,
        session: r.session,
        status: EndStatus::Exited,
        exit_code: Some(0),
        ended_at: 2,
        chunks,
        message: None,
    }
}

fn rand_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for half in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// A session of `commands` commands with `each` bytes of output each, stored on a technician's
/// node; milliseconds from starting that node to listing the session's commands (as
/// `(start and load ms, list ms)`).
pub async fn open_big_session(commands: usize, each: usize) -> Result<(f64, f64)> {
    let org = Org::new(1, "bench", None).await?;
    let agent = &org.agents[0];
    let agent_signer = caisey_peer::home::Home::new(Some(agent.home.clone()), "bench")?.node_key()?;
    let fleet = org.tech.fleet().await?;
    let org_key = fleet.org_key.ok_or_else(|| anyhow!("no org"))?;
    let session = Id128(rand_id());
    let info = SessionInfo { id: session, name: "big".into(), labels: vec![], created_at: 0, org_key };
    let signer = org.tech.signer().clone();
    let mut doc = SessionWriter::create(&signer, &info)?;
    let mut stored = Vec::new();
    for i in 0..commands {
        let r = CommandRequest {
            id: Id128(rand_id()),
            session,
            target: agent.node_id,
            command: spec(format!("collect logs {i}")),
            description: Default::default(),
            requested_at: i as u64,
            expires_at: u64::MAX,
        };
        SessionWriter::request(&mut doc, &signer, &r)?;
        let (d, start) = approved_start(&r, agent.node_id, signer.node_id());
        SessionWriter::start(&mut doc, &agent_signer, Some(&d), &start)?;
        let mut seq = 0u64;
        let mut left = each;
        while left > 0 {
            let n = left.min(32 * 1024);
            // Distinct bytes per chunk, as real output: nothing is shared between commands.
            let data: Vec<u8> = (0..n).map(|j| b'a' + ((i * 7 + seq as usize * 3 + j * 13) % 26) as u8).collect();
            let c = OutputChunk { request: r.id, seq, stream: Stream::Stdout, data };
            let r = c.reference();
            SessionWriter::append_output(&mut doc, &agent_signer, &[r])?;
            stored.push((r.hash, c.data));
            seq += 1;
            left -= n;
        }
        let end = exited(&r, seq);
        SessionWriter::end(&mut doc, &agent_signer, &end)?;
    }
    org.tech.create(session, DocKind::Session, doc).await?;
    // The bytes the references name, stored as an agent's runner would have sent them.
    org.tech.append_output(session, stored, |_| ()).await?;
    let tech_home = org.root.path().join("tech");
    org.tech.shutdown().await;
    drop(org.tech);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let tech = reopen(&tech_home).await?;
    let loaded = started.elapsed();
    let fleet = tech.fleet().await?;
    let listed = tech
        .read(session, move |d| SessionView::read_without_output(d, &fleet).map(|v| v.commands.len()))
        .await?
        .ok_or_else(|| anyhow!("session missing"))??;
    let total = started.elapsed();
    if listed != commands {
        bail!("listed {listed} of {commands} commands");
    }
    tech.shutdown().await;
    if let Some(r) = org.relay {
        r.shutdown().await;
    }
    Ok((loaded.as_secs_f64() * 1000.0, (total - loaded).as_secs_f64() * 1000.0))
}

/// RSS (MiB) and CPU seconds of process `pid` over `window`, after a settling period.
pub async fn watch_process(pid: u32, settle: Duration, window: Duration) -> Result<(f64, f64)> {
    tokio::time::sleep(settle).await;
    let cpu0 = cpu_seconds(pid)?;
    tokio::time::sleep(window).await;
    let cpu1 = cpu_seconds(pid)?;
    Ok((rss_mib(pid)?, cpu1 - cpu0))
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS"))?;
    Ok(kb / 1024.0)
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc stat")?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// A process running this binary in a daemon mode, killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An enrolled agent running as its own process, idle for `window`: (RSS MiB, CPU s).
pub async fn agent_idle(window: Duration) -> Result<(f64, f64)> {
    let org = Org::new(1, "bench", None).await?;
    let home = org.agents[0].home.clone();
    let child = Child(
        std::process::Command::new(std::env::current_exe()?)
            .arg("--agent-daemon")
            .arg(&home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let result = watch_process(child.0.id(), Duration::from_secs(3), window).await;
    drop(child);
    org.stop().await?;
    result
}

/// A relay running as its own process (this binary in relay mode), as relays are deployed:
/// it has its own runtime and sockets rather than sharing them with the agents measured.
pub struct RelayProcess {
    pub dir: tempfile::TempDir,
    pub ticket: String,
    pub child: Child,
}

impl RelayProcess {
    pub fn start() -> Result<RelayProcess> {
        use std::io::BufRead;
        let dir = tempfile::tempdir()?;
        let mut child = Child(
            std::process::Command::new(std::env::current_exe()?)
                .arg("--relay-daemon")
                .arg(dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        let stdout = child.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let ticket =
            std::io::BufReader::new(stdout).lines().next().ok_or_else(|| anyhow!("relay printed nothing"))??;
        Ok(RelayProcess { dir, ticket: ticket.trim().to_string(), child })
    }
}

/// A relay as its own process with `agents` idle agents connected (each a real daemon, here):
/// (RSS MiB, CPU s over `window`).
pub async fn relay_idle(agents: usize, window: Duration) -> Result<(f64, f64)> {
    let relay = RelayProcess::start()?;
    let mut org = Org::new(agents, "bench", Some((relay.dir.path(), &relay.ticket))).await?;
    org.start_agents().await?;
    let result = watch_process(relay.child.0.id(), Duration::from_secs(2), window).await;
    org.stop().await?;
    drop(relay);
    result
}

/// Frame times of the viewer (the real `ViewerApp` and backend, in a headless egui harness at
/// one frame per 16 ms) following a session while its command writes `size` bytes of output.
/// Returns (frames, p50 and max of the viewer's own frame code, max of a whole harness step
/// including egui's tessellation and AccessKit tree, all in ms).
pub async fn viewer_frames(size: usize) -> Result<(usize, f64, f64, f64)> {
    use caisey_viewer::gui::{ViewerApp, backend};
    // base64 lines of 76 characters: about 130,000 lines for 10 MB.
    let script = format!("head -c {size} /dev/urandom | base64 -w 76 | head -c {size}");
    let (org, session, request) = one_agent_asked("viewer", script, Route::Relay).await?;
    let client =
        caisey_viewer::client::Client::in_process(caisey_viewer::service::TechService::start(org.tech.clone(), None));
    let (handle, task) = backend::spawn(&tokio::runtime::Handle::current(), client, false);
    let frames = tokio::task::spawn_blocking(move || -> Result<Vec<(f64, f64)>> {
        let mut app = ViewerApp::new(handle);
        app.open_session(session);
        let mut h = egui_kittest::Harness::builder()
            .with_size([1280.0, 900.0])
            .build_ui_state(|ui, app: &mut ViewerApp| app.show(ui), app);
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut times = Vec::new();
        loop {
            let t = Instant::now();
            h.step();
            times.push((h.state().last_frame.as_secs_f64() * 1e3, t.elapsed().as_secs_f64() * 1e3));
            let open = h.state().open.as_ref();
            let received = open.and_then(|o| o.outputs.get(&request)).is_some_and(|b| b.bytes as usize >= size);
            let ended = open.and_then(|o| o.view.command(&request)).is_some_and(|c| c.end.is_some());
            if received && ended {
                return Ok(times);
            }
            if Instant::now() > deadline {
                bail!("the viewer did not receive all output within 600 s");
            }
            std::thread::sleep(Duration::from_millis(16));
        }
    });
    Org::approve(&org.agents[0], request).await?;
    let times = frames.await??;
    let _ = task.await;
    org.stop().await?;
    let mut own: Vec<f64> = times.iter().map(|t| t.0).collect();
    own.sort_by(f64::total_cmp);
    let step_max = times.iter().map(|t| t.1).fold(0.0, f64::max);
    Ok((times.len(), percentile(&own, 0.5), own.last().copied().unwrap_or(0.0), step_max))
}

/// What talking to the home's node costs a client.
#[derive(Debug)]
pub struct LocalApi {
    /// One `sessions` request answered by the service in this process, median µs.
    pub in_process_us: f64,
    /// The same request over the home's socket, median µs.
    pub socket_us: f64,
    /// A whole `caisey status` process with the node running, median ms (`None`: no `caisey`
    /// binary next to this one).
    pub status_ms: Option<f64>,
    /// A whole `caisey sessions` process with the node running / starting the node itself, ms.
    pub sessions_warm_ms: Option<f64>,
    pub sessions_cold_ms: Option<f64>,
}

/// The technician's node with `sessions` sessions, asked by a client in the same process, over
/// its socket, and by the real `caisey` binary (with the node running, and starting it).
pub async fn local_api(sessions: usize, rounds: usize) -> Result<LocalApi> {
    use caisey_viewer::client::Client;
    use caisey_viewer::service::TechService;
    let org = Org::new(1, "bench", None).await?;
    let org_key = org.tech.fleet().await?.org_key.ok_or_else(|| anyhow!("no org"))?;
    let signer = org.tech.signer().clone();
    let mut docs = Vec::new();
    for i in 0..sessions {
        let session = Id128(rand_id());
        let info =
            SessionInfo { id: session, name: format!("check {i}").into(), labels: vec![], created_at: 0, org_key };
        let mut doc = SessionWriter::create(&signer, &info)?;
        let r = CommandRequest {
            id: Id128(rand_id()),
            session,
            target: org.agents[0].node_id,
            command: spec(format!("df -h # {i}")),
            description: Default::default(),
            requested_at: i as u64,
            expires_at: u64::MAX,
        };
        SessionWriter::request(&mut doc, &signer, &r)?;
        docs.push((session, DocKind::Session, doc));
    }
    org.tech.create_many(docs).await?;
    let service = TechService::start(org.tech.clone(), None);
    let home = org.tech.home().clone();
    let listener = caisey_peer::local::socket::bind(&home.socket_path())?;
    let server = tokio::spawn(caisey_peer::local::serve(listener, service.clone(), Default::default()));
    let in_process = Client::in_process(service);
    let opts = options(home.dir())?;
    let socket = Client::connect(&opts, None).await?;
    let time_calls = async |client: &Client| -> Result<f64> {
        let mut t = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = Instant::now();
            client.sessions(None, None).await?;
            t.push(started.elapsed().as_secs_f64() * 1e6);
        }
        Ok(percentile(&t, 0.5))
    };
    let in_process_us = time_calls(&in_process).await?;
    let socket_us = time_calls(&socket).await?;
    let caisey = std::env::current_exe()?.with_file_name("caisey");
    let process_ms = |args: &[&str]| -> Result<f64> {
        let mut t = Vec::new();
        for _ in 0..rounds.min(20) {
            let started = Instant::now();
            run_caisey(&caisey, home.dir(), args)?;
            t.push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(percentile(&t, 0.5))
    };
    let (mut status_ms, mut sessions_warm_ms, mut sessions_cold_ms) = (None, None, None);
    if caisey.exists() {
        status_ms = Some(process_ms(&["status", "--json"])?);
        sessions_warm_ms = Some(process_ms(&["sessions", "--json"])?);
    }
    server.abort();
    drop((in_process, socket));
    org.tech.shutdown().await;
    if caisey.exists() {
        // Each command starts the node and stops it: what every command cost before the node
        // outlived it.
        let mut t = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            run_caisey(&caisey, home.dir(), &["sessions", "--json"])?;
            t.push(started.elapsed().as_secs_f64() * 1e3);
            run_caisey(&caisey, home.dir(), &["down"])?;
        }
        sessions_cold_ms = Some(percentile(&t, 0.5));
    }
    if let Some(relay) = &org.relay {
        relay.shutdown().await;
    }
    Ok(LocalApi { in_process_us, socket_us, status_ms, sessions_warm_ms, sessions_cold_ms })
}

/// Runs the real `caisey` binary on `home`, to completion.
fn run_caisey(caisey: &Path, home: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(caisey)
        .arg("--home")
        .arg(home)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("caisey {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
