//! The endpoint user's line to the daemon: `caisey-agent pending | approve | deny`.
//!
//! A Unix socket inside the agent's home (mode 0600, in a 0700 directory), so only the local
//! user who owns the agent can reach it — never the network. One JSON request line, one JSON
//! reply line.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::id::{Id128, NodeId};
use caisey_doc::session::Shell;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LocalRequest {
    Pending,
    Approve { id: String },
    Deny { id: String },
}

/// A request as the endpoint user sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingItem {
    /// The approval code to type: names the request and its exact command.
    pub id: Id128,
    /// The request id.
    pub request: Id128,
    pub session: String,
    pub technician: String,
    pub technician_key: NodeId,
    pub shell: Shell,
    pub script: String,
    pub cwd: Option<String>,
    pub timeout_ms: u64,
    pub description: String,
    pub requested_at: u64,
    pub expires_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum LocalReply {
    Pending { pending: Vec<PendingItem> },
    Done { message: String },
    Error { error: String },
}

/// What answers the socket's requests (the daemon).
pub trait LocalHandler: Clone + Send + Sync + 'static {
    fn handle(&self, req: LocalRequest) -> impl std::future::Future<Output = LocalReply> + Send;
}

/// Serves the socket until the task is dropped.
pub async fn serve(path: &Path, handler: impl LocalHandler) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    restrict(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let reply = match BufReader::new(read.take(MAX_LINE)).read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<LocalRequest>(&line) {
                    Ok(req) => handler.handle(req).await,
                    Err(e) => LocalReply::Error { error: format!("malformed request: {e}") },
                },
                Err(e) => LocalReply::Error { error: e.to_string() },
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}

#[cfg(unix)]
fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Sends one request to the daemon whose home holds `path`.
pub async fn call(path: &Path, req: &LocalRequest) -> Result<LocalReply> {
    let stream = UnixStream::connect(path).await.map_err(|_| {
        anyhow!("the agent is not running (no socket at {}); start it with `caisey-agent run`", path.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut reply = String::new();
    BufReader::new(read.take(16 * 1024 * 1024)).read_line(&mut reply).await?;
    if reply.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    Ok(serde_json::from_str(&reply)?)
}
