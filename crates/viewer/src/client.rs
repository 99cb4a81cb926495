//! A client of the home's technician node: what every `caisey` command and the viewer hold.
//!
//! Over the home's socket when the node is another process (started in the background on
//! first use, see [`crate::background`]); or in the same process (the demo, tests), calling the
//! [`TechService`] directly. Either way the same [`Request`]s and [`Reply`]s.
//!
//! When the node goes away mid-use (killed, or stopped), a read is asked again of a fresh node,
//! started as on first use; a change is not (it may already have been made), and the caller
//! gets the error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::CommandRequest;
use caisey_peer::local::{Answer, ConnectError, Connection, Service};
use caisey_peer::node::NodeOptions;
use tokio::sync::{Mutex, mpsc};

use crate::api::{Event, NodeStatus, OrgInfo, OutputRead, Reply, Request, SessionRead, TechApi};
use crate::background::Starter;
use crate::service::TechService;
use crate::tech::{Asked, Awaiting, Machine, PastRun, RunRequest, SessionSummary, SyncStatus};
use crate::transcript::SessionJson;

/// Takes the one reply variant a request is answered with.
macro_rules! expect {
    ($reply:expr, $pattern:pat => $value:expr) => {
        match $reply {
            $pattern => Ok($value),
            other => Err(anyhow!("the node answered out of turn ({})", crate::client::reply_name(&other))),
        }
    };
}

/// A handle on the home's node. Cheap to clone; calls from clones take turns on one connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

enum Inner {
    InProcess(TechService),
    Socket {
        opts: NodeOptions,
        /// The `caisey` binary to start a node with, when none runs (`None`: never start one).
        starter: Option<Starter>,
        conn: Mutex<Option<Connection<TechApi>>>,
    },
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.inner {
            Inner::InProcess(s) => write!(f, "Client(in process, {s:?})"),
            Inner::Socket { opts, .. } => write!(f, "Client({})", opts.home.socket_path().display()),
        }
    }
}

/// Events from the node, for as long as it runs.
pub struct Watch {
    rx: mpsc::Receiver<Reply>,
}

impl Watch {
    /// The next event; `None` once the node has gone away.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.rx.recv().await? {
                Reply::Event(e) => return Some(e),
                _ => continue,
            }
        }
    }
}

impl Client {
    /// A client calling `service` in this process.
    pub fn in_process(service: TechService) -> Client {
        Client { inner: Arc::new(Inner::InProcess(service)) }
    }

    /// A client of the node of `opts.home`, starting one with `starter` when none runs.
    pub async fn connect(opts: &NodeOptions, starter: Option<Starter>) -> Result<Client> {
        let conn = open(opts, starter.as_ref()).await?;
        Ok(Client { inner: Arc::new(Inner::Socket { opts: opts.clone(), starter, conn: Mutex::new(Some(conn)) }) })
    }

    /// A client of the node of `opts.home` if one runs; `None` if not (nothing is started).
    pub async fn running(opts: &NodeOptions) -> Result<Option<Client>> {
        match Connection::open(&opts.home.socket_path()).await {
            Ok(conn) => Ok(Some(Client {
                inner: Arc::new(Inner::Socket { opts: opts.clone(), starter: None, conn: Mutex::new(Some(conn)) }),
            })),
            Err(ConnectError::NotRunning(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Asks the node; a [`Reply::Error`] comes back as an error.
    pub async fn call(&self, request: Request) -> Result<Reply> {
        let reply = match &*self.inner {
            Inner::InProcess(service) => match service.handle(request).await {
                Answer::One(reply) => reply,
                Answer::Stream(_) => bail!("that request is answered with a stream; use watch"),
            },
            Inner::Socket { opts, starter, conn } => {
                let mut conn = conn.lock().await;
                // Not connected (the last connection broke): connect before anything is sent.
                let c = match conn.take() {
                    Some(c) => conn.insert(c),
                    None => conn.insert(open(opts, starter.as_ref()).await?),
                };
                let retry = request.is_read_only();
                match c.call(&request).await {
                    Ok(reply) => reply,
                    Err(e) => {
                        *conn = None;
                        if !retry {
                            return Err(e.context("the node went away; this change may or may not have been made"));
                        }
                        let fresh = conn.insert(open(opts, starter.as_ref()).await?);
                        fresh.call(&request).await?
                    }
                }
            }
        };
        match reply {
            Reply::Error(e) => Err(anyhow!(e)),
            reply => Ok(reply),
        }
    }

    /// Events from the node, on a connection of their own.
    pub async fn watch(&self) -> Result<Watch> {
        let rx = match &*self.inner {
            Inner::InProcess(service) => match service.handle(Request::Watch).await {
                Answer::Stream(rx) => rx,
                Answer::One(_) => bail!("the node did not answer a watch with a stream"),
            },
            Inner::Socket { opts, starter, .. } => open(opts, starter.as_ref()).await?.stream(&Request::Watch).await?,
        };
        let mut watch = Watch { rx };
        // The node says when it has subscribed: from then on no change is missed.
        match watch.rx.recv().await {
            Some(Reply::Done) => Ok(watch),
            Some(other) => Err(anyhow!("the node answered a watch out of turn ({})", reply_name(&other))),
            None => Err(anyhow!("the node went away before it could be watched")),
        }
    }

    pub async fn status(&self) -> Result<NodeStatus> {
        expect!(self.call(Request::Status).await?, Reply::Status(s) => *s)
    }

    pub async fn stop(&self) -> Result<()> {
        expect!(self.call(Request::Stop).await?, Reply::Done => ())
    }

    /// Waits for the node's first catch-up with the org; a warning when it could reach nobody.
    pub async fn online(&self) -> Result<Option<String>> {
        expect!(self.call(Request::Online).await?, Reply::Online { warning } => warning)
    }

    pub async fn init(&self, org: &str, name: &str) -> Result<OrgInfo> {
        expect!(self.call(Request::Init { org: org.into(), name: name.into() }).await?, Reply::Org(o) => o)
    }

    /// A one-time token, and whether it names only this node to enroll with (no relay).
    pub async fn invite(&self, spec: crate::tech::InviteSpec) -> Result<(String, bool)> {
        expect!(
            self.call(Request::Invite(spec)).await?,
            Reply::Token { token, only_this_node } => (token, only_this_node)
        )
    }

    pub async fn join(&self, token: &str, name: &str) -> Result<OrgInfo> {
        expect!(self.call(Request::Join { token: token.into(), name: name.into() }).await?, Reply::Org(o) => o)
    }

    pub async fn add_relay(&self, ticket: &str) -> Result<()> {
        expect!(self.call(Request::AddRelay { ticket: ticket.into() }).await?, Reply::Done => ())
    }

    pub async fn org(&self) -> Result<OrgInfo> {
        expect!(self.call(Request::Org).await?, Reply::Org(o) => o)
    }

    pub async fn machines(&self, group: Option<&str>, search: Option<&str>) -> Result<Vec<Machine>> {
        let request = Request::Machines { group: group.map(str::to_string), search: search.map(str::to_string) };
        expect!(self.call(request).await?, Reply::Machines(m) => m)
    }

    pub async fn sessions(&self, search: Option<&str>, label: Option<&str>) -> Result<Vec<SessionSummary>> {
        let request = Request::Sessions { search: search.map(str::to_string), label: label.map(str::to_string) };
        expect!(self.call(request).await?, Reply::Sessions(s) => s)
    }

    pub async fn find_session(&self, key: &str) -> Result<DocId> {
        expect!(self.call(Request::FindSession { key: key.into() }).await?, Reply::Found(id) => id)
    }

    pub async fn session(&self, id: DocId) -> Result<SessionRead> {
        expect!(self.call(Request::Session { id }).await?, Reply::Session(s) => *s)
    }

    pub async fn output(&self, session: DocId, request: &CommandRequest, from: usize) -> Result<OutputRead> {
        let request = Request::Output { session, request: Box::new(request.clone()), from };
        expect!(self.call(request).await?, Reply::Output(o) => o)
    }

    /// Each command's output size, as referenced in the session.
    pub async fn output_sizes(&self, session: DocId) -> Result<std::collections::BTreeMap<Id128, u64>> {
        expect!(self.call(Request::OutputSizes { session }).await?, Reply::OutputSizes(s) => s.into_iter().collect())
    }

    pub async fn output_bytes(&self, session: DocId, request: Id128) -> Result<Vec<u8>> {
        expect!(self.call(Request::OutputBytes { session, request }).await?, Reply::Bytes(b) => b)
    }

    pub async fn session_json(&self, id: DocId) -> Result<SessionJson> {
        expect!(self.call(Request::SessionJson { id }).await?, Reply::SessionJson(s) => *s)
    }

    pub async fn ask(&self, run: RunRequest) -> Result<Vec<Asked>> {
        expect!(self.call(Request::Ask(run)).await?, Reply::Asked(a) => a)
    }

    pub async fn wait_delivered(&self, machines: Vec<NodeId>, timeout: Duration) -> Result<bool> {
        let request = Request::WaitDelivered { machines, timeout_ms: timeout.as_millis() as u64 };
        expect!(self.call(request).await?, Reply::Delivered(d) => d)
    }

    pub async fn awaiting(&self) -> Result<Vec<Awaiting>> {
        expect!(self.call(Request::Awaiting).await?, Reply::Awaiting(a) => a)
    }

    /// A designated approver's decision, and whether a relay (or the machine) confirmed it.
    pub async fn decide(&self, code: &str, approve: bool) -> Result<(Awaiting, bool)> {
        expect!(
            self.call(Request::Decide { code: code.into(), approve }).await?,
            Reply::Decided { awaiting, delivered } => (*awaiting, delivered)
        )
    }

    /// A signed, redacted transcript, as its JSON file.
    pub async fn transcript(&self, session: DocId, share: crate::tech::ShareRequest) -> Result<String> {
        let request = Request::Transcript { session, share };
        expect!(self.call(request).await?, Reply::Transcript(t) => t)
    }

    /// A group run's transcript, as its JSON file.
    pub async fn group_transcript(&self, key: &str, share: crate::tech::ShareRequest) -> Result<String> {
        expect!(self.call(Request::GroupTranscript { key: key.into(), share }).await?, Reply::Transcript(t) => t)
    }

    /// Publishes a transcript on the org's relay; its link.
    pub async fn publish(&self, transcript: String) -> Result<String> {
        expect!(self.call(Request::Publish { transcript }).await?, Reply::Published(url) => url)
    }

    pub async fn unpublish(&self, link: &str) -> Result<()> {
        expect!(self.call(Request::Unpublish { link: link.into() }).await?, Reply::Done => ())
    }

    pub async fn rename(&self, session: DocId, name: &str, labels: Vec<String>) -> Result<()> {
        expect!(self.call(Request::Rename { session, name: name.into(), labels }).await?, Reply::Done => ())
    }

    pub async fn relabel(&self, session: DocId, add: Vec<String>, remove: Vec<String>) -> Result<()> {
        expect!(self.call(Request::Relabel { session, add, remove }).await?, Reply::Done => ())
    }

    /// Hands the session to the technician of that name, or (`None`) to nobody.
    pub async fn assign(&self, session: DocId, technician: Option<String>) -> Result<()> {
        expect!(self.call(Request::Assign { session, technician }).await?, Reply::Done => ())
    }

    pub async fn note(&self, session: DocId, text: &str) -> Result<()> {
        expect!(self.call(Request::Note { session, text: text.into() }).await?, Reply::Done => ())
    }

    pub async fn history(&self, machine: Option<NodeId>, script: &str) -> Result<Vec<PastRun>> {
        expect!(self.call(Request::History { machine, script: script.into() }).await?, Reply::Runs(r) => r)
    }

    pub async fn artifacts(&self, session: DocId) -> Result<Vec<crate::artifacts::ArtifactState>> {
        expect!(self.call(Request::Artifacts { session }).await?, Reply::Artifacts(a) => a)
    }

    pub async fn artifact_state(&self, session: DocId, name: &str) -> Result<crate::artifacts::ArtifactState> {
        let one =
            expect!(self.call(Request::ArtifactState { session, name: name.into() }).await?, Reply::Artifacts(a) => a)?;
        one.into_iter().next().ok_or_else(|| anyhow::anyhow!("no answer about {name:?}"))
    }

    pub async fn save_artifact(
        &self,
        session: DocId,
        name: &str,
        out: std::path::PathBuf,
    ) -> Result<crate::artifacts::ArtifactState> {
        let one = expect!(self.call(Request::SaveArtifact { session, name: name.into(), out }).await?, Reply::Artifacts(a) => a)?;
        one.into_iter().next().ok_or_else(|| anyhow::anyhow!("no answer about {name:?}"))
    }

    pub async fn schedule(&self, req: crate::schedules::ScheduleRequest) -> Result<Vec<Asked>> {
        expect!(self.call(Request::Schedule(Box::new(req))).await?, Reply::Asked(a) => a)
    }

    pub async fn schedules(&self) -> Result<Vec<crate::schedules::ScheduleSummary>> {
        expect!(self.call(Request::Schedules).await?, Reply::Schedules(s) => s)
    }

    pub async fn cancel_schedule(&self, key: &str) -> Result<Vec<crate::schedules::ScheduleSummary>> {
        expect!(self.call(Request::CancelSchedule { key: key.into() }).await?, Reply::Schedules(s) => s)
    }

    pub async fn edit_schedule(&self, edit: crate::schedules::ScheduleEdit) -> Result<Vec<Asked>> {
        expect!(self.call(Request::EditSchedule(edit)).await?, Reply::Asked(a) => a)
    }

    pub async fn probe_series(&self, session: DocId, name: &str) -> Result<Vec<crate::schedules::ProbePoint>> {
        expect!(self.call(Request::ProbeSeries { session, name: name.into() }).await?, Reply::Probes(p) => p)
    }

    pub async fn session_history(&self, session: DocId) -> Result<Vec<PastRun>> {
        expect!(self.call(Request::SessionHistory { session }).await?, Reply::Runs(r) => r)
    }

    pub async fn group_runs(&self) -> Result<Vec<crate::tech::GroupRunView>> {
        expect!(self.call(Request::GroupRuns).await?, Reply::GroupRuns(r) => r)
    }

    /// One group run, by name or id prefix, with identical outputs gathered.
    pub async fn group_run(&self, key: &str) -> Result<crate::tech::GroupRunView> {
        let runs = expect!(self.call(Request::GroupRun { key: key.into() }).await?, Reply::GroupRuns(r) => r)?;
        runs.into_iter().next().ok_or_else(|| anyhow!("no group run {key:?}"))
    }

    /// The run named by (a prefix of) its code.
    pub async fn find_run(&self, code: &str) -> Result<PastRun> {
        let runs = expect!(self.call(Request::FindRun { code: code.into() }).await?, Reply::Runs(r) => r)?;
        runs.into_iter().next().ok_or_else(|| anyhow!("no run with code {code:?}"))
    }

    pub async fn commands_run_on(&self, machine: NodeId) -> Result<Vec<(String, usize)>> {
        expect!(self.call(Request::CommandsOn { machine }).await?, Reply::Commands(c) => c)
    }

    pub async fn sync_status(&self) -> Result<SyncStatus> {
        expect!(self.call(Request::SyncStatus).await?, Reply::Sync(s) => s)
    }
}

/// A reply's kind, for an error that says what came back instead.
pub(crate) fn reply_name(reply: &Reply) -> String {
    serde_json::to_value(reply)
        .ok()
        .and_then(|v| v.get("reply").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// Connects to the home's node; starts one with `starter` when none runs.
async fn open(opts: &NodeOptions, starter: Option<&Starter>) -> Result<Connection<TechApi>> {
    let path = opts.home.socket_path();
    match Connection::open(&path).await {
        Ok(c) => return Ok(c),
        // Not running, or stopping as we came (its socket went mid-hello): start one.
        Err(ConnectError::NotRunning(_) | ConnectError::Io(_)) if starter.is_some() => {}
        Err(ConnectError::NotRunning(_)) => {
            bail!("no node is running for {}; start it with `caisey up`", opts.home.dir().display())
        }
        Err(e) => return Err(e.into()),
    }
    let Some(starter) = starter else { unreachable!("checked above") };
    let mut child = crate::background::start_node(starter, opts)?;
    // Another client may be starting one at the same moment, or an old node may still be
    // closing the store: whichever node holds the store serves, and every client connects to it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        match Connection::open(&path).await {
            Ok(c) => return Ok(c),
            Err(ConnectError::NotRunning(_) | ConnectError::Io(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(status) = child.try_wait()
            && !status.success()
        {
            let why = child.last_error().unwrap_or_else(|| format!("it exited with {status}"));
            if !why.contains("in use by another caisey process") {
                bail!("could not start this home's node: {why}");
            }
            // The store is held by a node that is starting or stopping: ask again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(c) = Connection::open(&path).await {
                return Ok(c);
            }
            child = crate::background::start_node(starter, opts)?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("this home's node did not start within 30 s; see {}", opts.home.log_path().display());
        }
    }
}
