//! The technician node's local API: what the `caisey` CLI and the viewer ask of their home's
//! running node, and what it answers.
//!
//! One node runs per home ([`crate::service`]); every `caisey` command and every viewer window
//! on that home is its client ([`crate::client`]). The requests and replies are the same typed
//! values whether the client lives in the node's own process (the demo, tests) or in another
//! one, over the home's socket (`caisey_peer::local`). Text in replies that comes from peers is
//! [`PeerText`], escaped wherever it is shown.

use std::collections::BTreeMap;

use caisey_doc::fleet::Role;
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{CommandRequest, SessionView, Stream};
use caisey_doc::text::PeerText;
use caisey_peer::local::{Api, Hello};
use caisey_peer::node::PeerPath;
use serde::{Deserialize, Serialize};

use crate::tech::{Asked, Awaiting, Machine, PastRun, RunRequest, SessionSummary, SyncStatus};
use crate::transcript::SessionJson;

/// The API name and version a client and its node must agree on.
pub const HELLO: Hello = Hello { api: "caisey-node", version: 1 };

/// The technician node's API, for `caisey_peer::local`.
#[derive(Debug)]
pub struct TechApi;

impl Api for TechApi {
    type Request = Request;
    type Reply = Reply;
    const HELLO: Hello = HELLO;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// What the node is doing (`caisey status`).
    Status,
    /// Stop the node (`caisey down`).
    Stop,
    /// Wait (briefly) until the node has caught up with the org after starting; answers
    /// [`Reply::Online`] with a warning when no relay could be reached.
    Online,
    Init {
        org: String,
        name: String,
    },
    Invite(crate::tech::InviteSpec),
    Join {
        token: String,
        name: String,
    },
    AddRelay {
        ticket: String,
    },
    /// The org as this node knows it: names of members, groups.
    Org,
    Machines {
        group: Option<String>,
        search: Option<String>,
    },
    Sessions {
        search: Option<String>,
        label: Option<String>,
    },
    /// A session by id, unique id prefix, or exact name.
    FindSession {
        key: String,
    },
    /// A session's records (without output), and the names of who appears in it.
    Session {
        id: DocId,
    },
    /// Output of one command (as its session view gave it) from list position `from` on, as
    /// far as it is here, in a page of about [`OUTPUT_PAGE`] bytes.
    Output {
        session: DocId,
        request: Box<CommandRequest>,
        from: usize,
    },
    /// Each command's output size as referenced (what a whole read of it will bring).
    OutputSizes {
        session: DocId,
    },
    /// All output bytes of one command, stdout and stderr interleaved as written.
    OutputBytes {
        session: DocId,
        request: Id128,
    },
    SessionJson {
        id: DocId,
    },
    Ask(RunRequest),
    /// Waits up to `timeout_ms` until a relay (or, with none, each of `machines`) holds
    /// everything this node holds for it.
    WaitDelivered {
        machines: Vec<NodeId>,
        timeout_ms: u64,
    },
    /// Requests waiting for this node as a designated approver.
    Awaiting,
    Decide {
        code: String,
        approve: bool,
    },
    /// A signed, redacted transcript of a session as it stands now, as JSON.
    Transcript {
        session: DocId,
        #[serde(flatten)]
        share: crate::tech::ShareRequest,
    },
    /// A group run's transcript: each machine's session, gathered and signed as one.
    GroupTranscript {
        key: String,
        #[serde(flatten)]
        share: crate::tech::ShareRequest,
    },
    /// Publishes a transcript (as built by [`Request::Transcript`]) on the org's relay.
    Publish {
        transcript: String,
    },
    Unpublish {
        link: String,
    },
    Rename {
        session: DocId,
        name: String,
        labels: Vec<String>,
    },
    Relabel {
        session: DocId,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// Hands a session to a technician (by name), or to nobody.
    Assign {
        session: DocId,
        technician: Option<String>,
    },
    Note {
        session: DocId,
        text: String,
    },
    History {
        machine: Option<NodeId>,
        script: String,
    },
    /// The runs of every command of a session, on its machines, in any session.
    SessionHistory {
        session: DocId,
    },
    /// Every group run here.
    GroupRuns,
    /// One group run, by name or id prefix, with identical outputs gathered.
    GroupRun {
        key: String,
    },
    /// The run whose code starts with `code`.
    FindRun {
        code: String,
    },
    CommandsOn {
        machine: NodeId,
    },
    SyncStatus,
    /// The files a session's runs brought back.
    Artifacts {
        session: DocId,
    },
    ArtifactState {
        session: DocId,
        name: String,
    },
    /// Saves a file brought back, whole and checked, at `out` (an absolute path).
    SaveArtifact {
        session: DocId,
        name: String,
        out: std::path::PathBuf,
    },
    /// Writes a schedule for each target machine.
    Schedule(Box<crate::schedules::ScheduleRequest>),
    /// Every schedule here.
    Schedules,
    CancelSchedule {
        key: String,
    },
    EditSchedule(crate::schedules::ScheduleEdit),
    /// The values of one probe across a session's runs (and its group run's).
    ProbeSeries {
        session: DocId,
        name: String,
    },
    /// Answered with a stream of [`Reply::Event`] until the client goes away.
    Watch,
}

impl Request {
    /// Whether asking again after a lost connection can do no harm (nothing is written).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Status
                | Request::Online
                | Request::Org
                | Request::Machines { .. }
                | Request::Sessions { .. }
                | Request::FindSession { .. }
                | Request::Session { .. }
                | Request::Output { .. }
                | Request::OutputSizes { .. }
                | Request::OutputBytes { .. }
                | Request::SessionJson { .. }
                | Request::WaitDelivered { .. }
                | Request::Awaiting
                | Request::Transcript { .. }
                | Request::GroupTranscript { .. }
                | Request::History { .. }
                | Request::SessionHistory { .. }
                | Request::FindRun { .. }
                | Request::GroupRuns
                | Request::GroupRun { .. }
                | Request::CommandsOn { .. }
                | Request::SyncStatus
                | Request::Schedules
                | Request::ProbeSeries { .. }
                | Request::Artifacts { .. }
                | Request::ArtifactState { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", content = "value", rename_all = "snake_case")]
pub enum Reply {
    /// The request failed: one line saying what went wrong and what to do.
    Error(String),
    Done,
    Status(Box<NodeStatus>),
    Online {
        warning: Option<String>,
    },
    Org(OrgInfo),
    Token {
        token: String,
        only_this_node: bool,
    },
    Machines(Vec<Machine>),
    Sessions(Vec<SessionSummary>),
    Found(DocId),
    Session(Box<SessionRead>),
    Output(OutputRead),
    OutputSizes(Vec<(Id128, u64)>),
    GroupRuns(Vec<crate::tech::GroupRunView>),
    Bytes(#[serde(with = "base64")] Vec<u8>),
    SessionJson(Box<SessionJson>),
    Asked(Vec<Asked>),
    Delivered(bool),
    Awaiting(Vec<Awaiting>),
    Decided {
        awaiting: Box<Awaiting>,
        delivered: bool,
    },
    Transcript(String),
    Published(String),
    Runs(Vec<PastRun>),
    Commands(Vec<(String, usize)>),
    Sync(SyncStatus),
    Schedules(Vec<crate::schedules::ScheduleSummary>),
    Probes(Vec<crate::schedules::ProbePoint>),
    Artifacts(Vec<crate::artifacts::ArtifactState>),
    Event(Event),
}

/// What changed in the node, as a watch tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    DocChanged(DocId),
    PeerUp(NodeId),
    PeerDown(NodeId),
    /// Events were missed (the client read too slowly): treat everything as changed.
    Lagged,
}

/// The org as this node knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrgInfo {
    pub org_name: String,
    pub me: NodeId,
    pub my_name: PeerText,
    pub my_role: Option<Role>,
    pub groups: Vec<String>,
    /// Whether the org has any relay.
    pub has_relay: bool,
}

/// A session's records, whether output is still on its way, and the names of the members it
/// mentions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRead {
    pub view: SessionView,
    /// Output chunks the session references that are not here yet.
    pub missing_chunks: usize,
    pub names: BTreeMap<NodeId, PeerText>,
}

/// How much output one read brings at most (a chunk more, at the edge): a reply line stays
/// small whatever the command printed, and a reader of a huge output holds a page at a time.
pub const OUTPUT_PAGE: usize = 4 * 1024 * 1024;

/// Output chunks read from a list position on, and the position to read from next.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutputRead {
    pub chunks: Vec<Chunk>,
    pub next: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunk {
    pub stream: Stream,
    #[serde(with = "base64")]
    pub data: Vec<u8>,
}

/// What `caisey status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: NodeId,
    pub name: PeerText,
    pub org: String,
    pub pid: u32,
    pub home: String,
    pub addrs: Vec<String>,
    pub up_ms: u64,
    /// Local clients connected now (this one included).
    pub clients: usize,
    /// Exits after this long without clients; `None`: runs until stopped.
    pub idle_exit_ms: Option<u64>,
    pub peers: Vec<PeerStatus>,
    pub relays: Vec<RelayStatus>,
    /// Documents holding changes the (first) relay has not confirmed yet; 0 with no relay.
    pub unconfirmed_docs: usize,
    pub sessions: usize,
    /// Why this node cannot write its store (a full disk), while it cannot; since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwritable: Option<Unwritable>,
    /// Why a write failed within the last minute, though writes fit again now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_trouble: Option<String>,
}

/// Why a node cannot write its store, and since when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unwritable {
    pub error: String,
    pub since: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: NodeId,
    pub name: PeerText,
    pub role: Option<Role>,
    pub path: PeerPath,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStatus {
    pub node: NodeId,
    pub addrs: Vec<String>,
    pub connected: bool,
    /// Documents holding changes this relay has not confirmed yet.
    pub unconfirmed_docs: usize,
}

/// Bytes as base64 text in JSON (a byte array would cost four characters a byte).
mod base64 {
    use data_encoding::BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BASE64.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}
