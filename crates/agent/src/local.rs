//! The endpoint user's line to the daemon: `caisey-agent pending | approve | deny`.
//!
//! The daemon serves it on its home's local socket (`caisey_peer::local`: mode 0600, in a 0700
//! directory), so only the local user who owns the agent can reach it — never the network.

use std::path::Path;

use anyhow::{Result, bail};
use caisey_doc::id::{Id128, NodeId};
use caisey_doc::schedule::{Missed, ScheduleState};
use caisey_doc::session::Shell;
use caisey_doc::text::PeerText;
use caisey_peer::local::{ConnectError, Connection};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LocalRequest {
    Pending,
    Approve {
        id: String,
        /// For a schedule: ask again at each run instead of consenting to all of them.
        #[serde(default)]
        each_run: bool,
    },
    Deny {
        id: String,
    },
    /// The schedules this machine's user was asked about, and where each stands.
    Consents,
    /// Take back consent to a schedule (by the start of its id).
    Revoke {
        id: String,
    },
}

/// When a schedule waiting for consent would run: shown with its command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleTerms {
    pub every: String,
    pub until: u64,
    pub missed: Missed,
    /// The names of the values picked out of each run.
    pub probes: Vec<String>,
}

/// A schedule as `caisey-agent consents` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsentItem {
    pub schedule: Id128,
    pub session: PeerText,
    pub technician: PeerText,
    pub state: ScheduleState,
    pub every: String,
    pub until: u64,
    pub script: String,
    pub description: PeerText,
    pub runs: usize,
    pub next_run: Option<u64>,
}

/// A request as the endpoint user sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingItem {
    /// The approval code to type: names the request and its exact command.
    pub id: Id128,
    /// The request id.
    pub request: Id128,
    pub session: PeerText,
    pub technician: PeerText,
    pub technician_key: NodeId,
    pub shell: Shell,
    pub script: String,
    pub cwd: Option<String>,
    pub timeout_ms: u64,
    pub description: PeerText,
    pub requested_at: u64,
    pub expires_at: u64,
    /// Files the command will bring back, at most `limit` bytes in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect: Option<caisey_doc::artifact::Collect>,
    /// `Some`: this is a schedule, asking consent to all its runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleTerms>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum LocalReply {
    Pending {
        pending: Vec<PendingItem>,
        /// The codes of approved requests running now.
        #[serde(default)]
        running: Vec<Id128>,
    },
    Consents {
        consents: Vec<ConsentItem>,
    },
    Done {
        message: String,
    },
    Error {
        error: String,
    },
}

/// The agent's local API, as `caisey_peer::local` speaks it.
#[derive(Debug)]
pub struct AgentApi;

impl caisey_peer::local::Api for AgentApi {
    type Request = LocalRequest;
    type Reply = LocalReply;
    const HELLO: caisey_peer::local::Hello = caisey_peer::local::Hello { api: "caisey-agent", version: 1 };
}

/// Sends one request to the daemon whose home holds `path`.
pub async fn call(path: &Path, req: &LocalRequest) -> Result<LocalReply> {
    let mut conn = match Connection::<AgentApi>::open(path).await {
        Ok(c) => c,
        Err(ConnectError::NotRunning(_)) => {
            bail!("the agent is not running (no socket at {}); start it with `caisey-agent run`", path.display())
        }
        Err(e) => return Err(e.into()),
    };
    conn.call(req).await
}
