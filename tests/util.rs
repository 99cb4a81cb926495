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

fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = into.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
}

/// A temporary world of homes.
pub struct World {
    pub root: tempfile::TempDir,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        Self { root: tempfile::tempdir().expect("tempdir") }
    }

    pub fn home(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// A command for `binary` in `home`, bound to loopback.
    pub fn command(&self, binary: &str, home: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.arg("--home").arg(self.home(home)).arg("--listen").arg("127.0.0.1:0").args(args);
        cmd.env("RUST_LOG", "error").env_remove("CAISEY_HOME").env_remove("CAISEY_LISTEN");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    pub fn spawn(&self, binary: &str, home: &str, args: &[&str]) -> Running {
        let mut child = self.command(binary, home, args).spawn().expect("spawn");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().expect("stdout"), stdout.clone());
        collect(child.stderr.take().expect("stderr"), stderr.clone());
        Running { child, stdout, stderr }
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
        let mut child = self.command("caisey-relay", home, &["run"]).spawn().expect("spawn relay");
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
        let world = World::new();
        let (relay, ticket) = world.start_relay("relay");
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
