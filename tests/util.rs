//! Test harness: runs the real `caisey`, `caisey-agent` and `caisey-relay` binaries, each node
//! in its own temporary home, on loopback only, and kills whatever is still running when a test
//! ends (even by panic).
//!
//! The binaries come from the same target directory as the test; build them first with
//! `cargo build --workspace --bins` (the README's test command does).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` before the tests", path.display());
    path
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Panics with everything printed unless the command succeeded.
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "command failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A process killed when dropped; its output is collected in the background.
pub struct Running {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Starts `cmd` (as [`World::command`] made it, changed as a test needs).
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().expect("spawn");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().expect("stdout"), stdout.clone());
        collect(child.stderr.take().expect("stderr"), stderr.clone());
        Running { child, stdout, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for the process to exit.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return Output { status, stdout: self.stdout(), stderr: self.stderr() };
            }
            if Instant::now() > deadline {
                panic!("process did not exit within {timeout:?}\nstdout: {}\nstderr: {}", self.stdout(), self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, like a crash or a pulled plug.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT, like Ctrl-C or a service stop; waits for the process to exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends what `pipe` says to `into` as text; a character cut by a read's edge is kept for
/// the next read rather than shown as U+FFFD.
fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = pipe.read(&mut buf).unwrap_or(0);
            pending.extend_from_slice(&buf[..n]);
            let cut = match std::str::from_utf8(&pending) {
                Err(e) if n > 0 && e.error_len().is_none() => e.valid_up_to(),
                _ => pending.len(),
            };
            if let Ok(mut s) = into.lock() {
                s.push_str(&String::from_utf8_lossy(&pending[..cut]));
            }
            pending.drain(..cut);
            if n == 0 {
                break;
            }
        }
    });
}

pub mod netns;

/// A temporary world of homes.
pub struct World {
    pub root: tempfile::TempDir,
    /// Homes placed in a network namespace: (namespace, listen address).
    places: Mutex<std::collections::BTreeMap<String, (String, String)>>,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        Self { root: tempfile::tempdir().expect("tempdir"), places: Default::default() }
    }

    /// The pid of the node running in the background for `home`, if one is.
    pub fn node_pid(&self, home: &str) -> Option<u32> {
        node_pid(&self.home(home))
    }

    /// Stops the node of `home` (`caisey down`), as a user would before opening its store.
    pub fn down(&self, home: &str) {
        self.caisey(home, &["down"]).ok();
    }

    pub fn home(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Runs every process of `home` from now on inside namespace `ns`, listening on `listen`.
    pub fn place(&self, home: &str, ns: &str, listen: &str) {
        if let Ok(mut p) = self.places.lock() {
            p.insert(home.to_string(), (ns.to_string(), listen.to_string()));
        }
    }

    /// A command for `binary` in `home`: bound to loopback, or where [`World::place`] put it.
    pub fn command(&self, binary: &str, home: &str, args: &[&str]) -> Command {
        let place = self.places.lock().ok().and_then(|p| p.get(home).cloned());
        let (mut cmd, listen) = match place {
            Some((ns, listen)) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &ns]).arg(bin(binary));
                (cmd, listen)
            }
            None => (Command::new(bin(binary)), "127.0.0.1:0".to_string()),
        };
        cmd.arg("--home").arg(self.home(home)).arg("--listen").arg(listen).args(args);
        // Errors only, and quiet where the binaries' own default is quiet.
        cmd.env(
            "RUST_LOG",
            std::env::var("CAISEY_TEST_LOG").unwrap_or_else(|_| "error,iroh::socket::transports::relay=off".into()),
        );
        cmd.env_remove("CAISEY_HOME").env_remove("CAISEY_LISTEN");
        // Settings of this machine's own (an installed agent's /etc/caisey) stay out of tests.
        let settings = self.root.path().join("no-settings.toml");
        if !settings.exists() {
            let _ = std::fs::write(&settings, "# tests run on flags alone\n");
        }
        cmd.env("CAISEY_CONFIG", settings);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    pub fn spawn(&self, binary: &str, home: &str, args: &[&str]) -> Running {
        Running::spawn(self.command(binary, home, args))
    }

    /// Runs to completion (60 s at most).
    pub fn run(&self, binary: &str, home: &str, args: &[&str]) -> Output {
        self.spawn(binary, home, args).wait(Duration::from_secs(60))
    }

    pub fn caisey(&self, home: &str, args: &[&str]) -> Output {
        self.run("caisey", home, args)
    }

    pub fn agent_cmd(&self, home: &str, args: &[&str]) -> Output {
        self.run("caisey-agent", home, args)
    }

    /// Starts a relay and returns it with its ticket (the first line it prints).
    pub fn start_relay(&self, home: &str) -> (Running, String) {
        self.start_relay_with(home, &[])
    }

    pub fn start_relay_with(&self, home: &str, extra: &[&str]) -> (Running, String) {
        let args: Vec<&str> = std::iter::once("run").chain(extra.iter().copied()).collect();
        let mut child = self.command("caisey-relay", home, &args).spawn().expect("spawn relay");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut ticket = String::new();
        stdout.read_line(&mut ticket).expect("relay ticket");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        collect(stdout, out.clone());
        collect(child.stderr.take().expect("stderr"), err.clone());
        assert!(ticket.starts_with("caisey-relay-"), "relay printed {ticket:?}");
        (Running { child, stdout: out, stderr: err }, ticket.trim().to_string())
    }

    /// Starts an enrolled agent's daemon and waits until its local socket answers.
    pub fn start_agent(&self, home: &str) -> Running {
        let agent = self.spawn("caisey-agent", home, &["run"]);
        wait_for(Duration::from_secs(20), || {
            self.command("caisey-agent", home, &["pending"]).output().is_ok_and(|o| o.status.success()).then_some(())
        })
        .unwrap_or_else(|| panic!("agent {home} did not start: {}", agent.stderr()));
        agent
    }

    /// `caisey run RUN_ARGS…` by `technician`, approved on `machine` as its user would: what the
    /// run printed once it ended (two minutes at most).
    pub fn run_approved(&self, technician: &str, machine: &str, run_args: &[&str]) -> Output {
        let args: Vec<&str> = std::iter::once("run").chain(run_args.iter().copied()).collect();
        let run = self.spawn("caisey", technician, &args);
        let id = self.wait_pending(machine);
        self.agent_cmd(machine, &["approve", &id]).ok();
        run.wait(Duration::from_secs(120))
    }

    /// Waits for a request to be pending on `agent` and returns its id.
    pub fn wait_pending(&self, agent: &str) -> String {
        wait_for(Duration::from_secs(30), || {
            let out = self.command("caisey-agent", agent, &["pending", "--json"]).output().ok()?;
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            list.as_array()?.first()?.get("id")?.as_str().map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no request became pending on {agent}"))
    }
}

fn node_pid(home: &Path) -> Option<u32> {
    std::fs::read_to_string(home.join("node.pid")).ok()?.trim().parse().ok()
}

/// Nodes the `caisey` commands of a test started in the background are killed with its world.
impl Drop for World {
    fn drop(&mut self) {
        let Ok(homes) = std::fs::read_dir(self.root.path()) else { return };
        for home in homes.flatten() {
            if let Some(pid) = node_pid(&home.path()) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).stderr(Stdio::null()).status();
            }
        }
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An org: a relay, a first technician `alice`, and enrolled (not yet running) agents.
pub struct Org {
    pub world: World,
    pub relay: Option<Running>,
    pub ticket: String,
}

impl Org {
    /// `agents`: `(name, group)` pairs to enroll.
    pub fn new(agents: &[(&str, &str)]) -> Self {
        Self::with_relay_args(agents, &[])
    }

    /// Like [`Org::new`], the relay also serving transcripts over HTTP.
    pub fn with_http(agents: &[(&str, &str)]) -> Self {
        Self::with_relay_args(agents, &["--http", "127.0.0.1:0"])
    }

    fn with_relay_args(agents: &[(&str, &str)], relay_args: &[&str]) -> Self {
        let world = World::new();
        let (relay, ticket) = world.start_relay_with("relay", relay_args);
        world.caisey("alice", &["init", "--org", "Acme", "--name", "alice"]).ok();
        world.caisey("alice", &["relay", "add", &ticket]).ok();
        let org = Org { world, relay: Some(relay), ticket };
        for (name, group) in agents {
            org.enroll_agent(name, group);
        }
        org
    }

    pub fn invite_agent(&self, name: &str, group: &str, ttl: &str) -> String {
        self.world
            .caisey("alice", &["invite", "agent", "--name", name, "--group", group, "--ttl", ttl])
            .ok()
            .stdout
            .trim()
            .to_string()
    }

    pub fn enroll_agent(&self, name: &str, group: &str) {
        let token = self.invite_agent(name, group, "1h");
        self.world.agent_cmd(name, &["enroll", &token]).ok();
    }

    /// A colleague joins with a fresh home.
    pub fn join_technician(&self, name: &str) {
        let token =
            self.world.caisey("alice", &["invite", "technician", "--name", name]).ok().stdout.trim().to_string();
        self.world.caisey(name, &["join", &token]).ok();
    }

    /// A session as `technician` sees it, from `caisey show --json`.
    pub fn show_json(&self, technician: &str, session: &str) -> Option<serde_json::Value> {
        let out = self.world.command("caisey", technician, &["show", session, "--json"]).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }
}

/// Speaking the sync protocol directly, as a node outside the org would.
pub mod probe {
    use std::time::Duration;

    use caisey_doc::automerge::sync::{State, SyncDoc};
    use caisey_doc::id::Id128;
    use caisey_doc::token::RelayTicket;
    use caisey_peer::wire::{DocKind, Frame, SYNC_ALPN};
    use iroh::endpoint::presets;
    use iroh::{Endpoint, EndpointAddr, PublicKey, TransportAddr};

    /// Dials the relay as a stranger, asks for `session`, and returns the ids of every document
    /// the relay sent before dropping the connection.
    pub async fn fetch_as_stranger(ticket: &RelayTicket, session: Id128) -> Vec<Id128> {
        let ep = Endpoint::builder(presets::Minimal)
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0")
            .expect("bind addr")
            .bind()
            .await
            .expect("bind");
        let key = PublicKey::from_bytes(&ticket.0.node.0).expect("relay key");
        let addrs = ticket.0.addrs.iter().filter_map(|a| a.parse().ok()).map(TransportAddr::Ip);
        let conn = ep.connect(EndpointAddr::from_parts(key, addrs), SYNC_ALPN).await.expect("QUIC handshake");
        let mut received = Vec::new();
        if let Ok((mut send, mut recv)) = conn.open_bi().await {
            let empty = caisey_doc::automerge::Automerge::new();
            let msg = empty.generate_sync_message(&mut State::new()).expect("sync message").encode();
            let _ = send.write_all(&Frame::hello().encode()).await;
            let _ = send.write_all(&Frame::Sync { doc: session, kind: DocKind::Session, message: msg }.encode()).await;
            let read_all = async {
                loop {
                    let mut prefix = [0u8; 4];
                    if recv.read_exact(&mut prefix).await.is_err() {
                        break;
                    }
                    let Ok(len) = Frame::check_len(prefix) else { break };
                    let mut body = vec![0u8; len];
                    if recv.read_exact(&mut body).await.is_err() {
                        break;
                    }
                    if let Ok(Frame::Sync { doc, .. }) = Frame::decode(&body) {
                        received.push(doc);
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(3), read_all).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.close()).await;
        received
    }
}

/// A minimal HTTP/1.1 GET over loopback: status, raw headers (lowercased), body.
pub fn http_get(url: &str) -> (u16, String, Vec<u8>) {
    use std::io::Write;
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head, raw[split + 4..].to_vec())
}

/// Writing into sessions as a technician's node would, bypassing the CLI: how an attacker who
/// controls a member's node forges, replays or edits records.
pub mod forge {
    use std::path::Path;
    use std::time::Duration;

    use caisey_doc::automerge::ReadDoc;
    use caisey_doc::automerge::transaction::Transactable;
    use caisey_doc::id::Id128;
    use caisey_doc::record::RecordKind;
    use caisey_doc::session::{CommandRequest, Decision, SessionView, Verdict};
    use caisey_peer::home::Home;
    use caisey_peer::node::{Node, NodeOptions};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Runtime::new().expect("runtime").block_on(f)
    }

    /// Opens the store of `home` in this process, after stopping its node (which holds it).
    async fn open(home: &Path) -> Node {
        let _ = std::process::Command::new(crate::bin("caisey")).arg("--home").arg(home).arg("down").output();
        let opts = NodeOptions {
            home: Home::new(Some(home.to_path_buf()), "caisey").expect("home"),
            listen: "127.0.0.1:0".parse().expect("addr"),
        };
        let node = Node::start(opts).await.expect("node");
        caisey_viewer::tech::go_online(&node, &[]).await.expect("online");
        node
    }

    /// Runs `edit` on the raw session document named `session`, then hands the change to the relay.
    fn edit(
        home: &Path,
        session: &str,
        edit: impl FnOnce(&Node, &mut caisey_doc::automerge::Automerge) + Send + 'static,
    ) {
        block_on(async {
            let node = open(home).await;
            let id = caisey_viewer::tech::find_session(&node, session).await.expect("session");
            let n = node.clone();
            node.change(id, move |doc| edit(&n, doc)).await.expect("change");
            for r in node.relay_contacts().await.expect("relays") {
                assert!(
                    node.wait_in_sync(r.node, Duration::from_secs(10)).await.expect("sync"),
                    "relay did not take the forgery"
                );
            }
            node.shutdown().await;
        })
    }

    fn first_request(doc: &caisey_doc::automerge::Automerge) -> CommandRequest {
        let requests = match doc.get(caisey_doc::automerge::ROOT, "requests").expect("get") {
            Some((_, id)) => id,
            None => panic!("no requests"),
        };
        let key = doc.keys(&requests).next().expect("a request");
        let (value, _) = doc.get(&requests, key.as_str()).expect("get").expect("request");
        let bytes = value.as_bytes().expect("bytes").to_vec();
        caisey_doc::record::verify(&bytes).expect("genuine request").json().expect("request body")
    }

    /// The node at `home` writes an approval of the first request in `session`, signed with its
    /// own key, with every field right but the authority to approve.
    pub fn approve_as(home: &Path, session: &str) {
        edit(home, session, |node, doc| {
            let req = first_request(doc);
            let requester = {
                let requests = doc.get(caisey_doc::automerge::ROOT, "requests").expect("get").expect("map").1;
                let (v, _) = doc.get(&requests, req.id.to_hex()).expect("get").expect("req");
                caisey_doc::record::verify(v.as_bytes().expect("bytes")).expect("genuine").author
            };
            let d = Decision {
                request: req.id,
                session: req.session,
                target: req.target,
                requester,
                command_hash: req.command.hash(),
                verdict: Verdict::Approved,
                decided_by: "local user on the machine (forged)".into(),
                decided_at: caisey_peer::now_ms(),
                expires_at: req.expires_at,
                nonce: Id128(rand_bytes()),
            };
            caisey_doc::session::SessionWriter::decide(doc, node.signer(), &d).expect("write");
        });
    }

    /// Copies the decision record of the first request of `from` onto the first request of `to`.
    pub fn replay_decision(home: &Path, from: &str, to: &str) {
        let record = block_on(async {
            let node = open(home).await;
            let id = caisey_viewer::tech::find_session(&node, from).await.expect("session");
            let rec = node
                .read(id, |doc| {
                    let req = first_request(doc);
                    SessionView::raw_record(doc, "decisions", &req.id).expect("a decision to replay")
                })
                .await
                .expect("read")
                .expect("doc");
            node.shutdown().await;
            rec
        });
        assert_eq!(caisey_doc::record::verify(&record).expect("genuine").kind, RecordKind::Decision);
        edit(home, to, move |_, doc| {
            let req = first_request(doc);
            let decisions = doc.get(caisey_doc::automerge::ROOT, "decisions").expect("get").expect("map").1;
            doc.transact::<_, _, caisey_doc::automerge::AutomergeError>(|tx| {
                tx.put(&decisions, req.id.to_hex(), record.clone())?;
                Ok(())
            })
            .expect("replay");
        });
    }

    /// The requester rewrites its request with another script, keeping its id (and signing it).
    pub fn edit_script(home: &Path, session: &str, script: &str) {
        let script = script.to_string();
        edit(home, session, move |node, doc| {
            let mut req = first_request(doc);
            req.command.script = script;
            let requests = doc.get(caisey_doc::automerge::ROOT, "requests").expect("get").expect("map").1;
            let record = node.signer().sign(RecordKind::Request, &req);
            doc.transact::<_, _, caisey_doc::automerge::AutomergeError>(|tx| {
                tx.put(&requests, req.id.to_hex(), record)?;
                Ok(())
            })
            .expect("edit");
        });
    }

    fn rand_bytes() -> [u8; 16] {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        t.to_le_bytes()
    }
}
