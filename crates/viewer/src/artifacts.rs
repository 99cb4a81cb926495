//! Files runs brought back (`caisey_doc::artifact`), as a technician lists and saves them:
//! `caisey artifact list SESSION`, `caisey artifact get SESSION NAME [--out PATH]`.
//!
//! The bytes arrive as chunks, each checked against the hash its machine signed, over the same
//! path as output; a transfer cut off anywhere goes on where it stopped. Saving waits until
//! every chunk is here, checks the whole file's SHA-256 against the signed one, writes a
//! temporary file beside the target and renames it into place: a saved file is whole and
//! genuine, or there is none.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::artifact::{ArtifactView, Outcome, Piece};
use caisey_doc::id::{DocId, Id128};
use caisey_doc::session::{SessionView, chunk_hash};
use caisey_doc::text::PeerText;
use caisey_peer::node::Node;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One file as listed: where it stands on this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactState {
    pub name: String,
    pub path: String,
    pub machine: PeerText,
    /// The run's code, as `caisey history` shows it.
    pub run: Id128,
    pub request: Id128,
    pub index: u32,
    /// `None` when refused.
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// Bytes of it held here so far.
    pub here: u64,
    /// Why it was not brought back.
    pub refused: Option<String>,
}

impl ArtifactState {
    pub fn complete(&self) -> bool {
        self.size.is_some_and(|s| s == self.here)
    }
}

async fn session_view(node: &Node, session: DocId) -> Result<SessionView> {
    node.read_with_fleet(session, SessionView::read_without_output)
        .await?
        .ok_or_else(|| anyhow!("session {} is not here", session.short()))?
        .map_err(Into::into)
}

async fn state_of(
    node: &Node,
    fleet: &caisey_doc::fleet::Fleet,
    session: DocId,
    view: &SessionView,
    a: &ArtifactView,
) -> Result<ArtifactState> {
    let run = view.command(&a.artifact.request).map(|c| c.request.approval_code()).unwrap_or(a.artifact.request);
    let (size, sha256, refused, here) = match &a.artifact.outcome {
        Outcome::Collected { size, sha256, pieces } => {
            let held = node.holds(session, pieces.iter().map(|p| p.hash).collect()).await?;
            let here = pieces.iter().zip(held).filter(|(_, h)| *h).map(|(p, _)| p.len).sum();
            (Some(*size), Some(hex::encode(sha256)), None, here)
        }
        Outcome::Refused { why } => (None, None, Some(why.clone()), 0),
    };
    Ok(ArtifactState {
        name: a.artifact.name.clone(),
        path: a.artifact.path.clone(),
        machine: fleet.members.get(&a.machine).map(|m| m.name.clone()).unwrap_or_default(),
        run,
        request: a.artifact.request,
        index: a.artifact.index,
        size,
        sha256,
        here,
        refused,
    })
}

/// Every file the session's runs brought back (or refused), oldest run first.
pub async fn list(node: &Node, session: DocId) -> Result<Vec<ArtifactState>> {
    let view = session_view(node, session).await?;
    let fleet = node.fleet().await?;
    let mut out = Vec::new();
    for a in &view.artifacts {
        out.push(state_of(node, &fleet, session, &view, a).await?);
    }
    Ok(out)
}

/// The newest run's file called `name` (refused ones too, to say why).
fn find<'a>(view: &'a SessionView, name: &str) -> Result<&'a ArtifactView> {
    let order = |a: &ArtifactView| view.command(&a.artifact.request).map(|c| c.request.requested_at).unwrap_or(0);
    view.artifacts.iter().filter(|a| a.artifact.name == name).max_by_key(|a| (order(a), a.artifact.index)).ok_or_else(
        || {
            let names: Vec<&str> = view.artifacts.iter().map(|a| a.artifact.name.as_str()).collect();
            anyhow!(
                "no file {name:?} in this session (it has: {})",
                if names.is_empty() { "none".into() } else { names.join(", ") }
            )
        },
    )
}

/// Where file `name` of `session` stands here.
pub async fn state(node: &Node, session: DocId, name: &str) -> Result<ArtifactState> {
    let view = session_view(node, session).await?;
    state_of(node, &node.fleet().await?, session, &view, find(&view, name)?).await
}

/// Saves file `name` to `out` once all of it is here, checked piece by piece and whole.
pub async fn save(node: &Node, session: DocId, name: &str, out: PathBuf) -> Result<ArtifactState> {
    let view = session_view(node, session).await?;
    let a = find(&view, name)?;
    let st = state_of(node, &node.fleet().await?, session, &view, a).await?;
    let (size, sha256, pieces) = match &a.artifact.outcome {
        Outcome::Collected { size, sha256, pieces } => (*size, *sha256, pieces.clone()),
        Outcome::Refused { why } => bail!("{name:?} was not brought back: {why}"),
    };
    if !st.complete() {
        bail!("{} of {} bytes of {name:?} are here so far", st.here, size);
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).map(PathBuf::from).unwrap_or_else(|| ".".into());
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).with_context(|| format!("writing in {}", dir.display()))?;
    let mut whole = Sha256::new();
    for Piece { hash, len } in pieces {
        let data = node
            .read_with_output(session, move |_, stored| stored.chunk(&hash))
            .await?
            .flatten()
            .ok_or_else(|| anyhow!("a piece of {name:?} is no longer here; try again"))?;
        if data.len() as u64 != len || chunk_hash(&data) != hash {
            bail!("a piece of {name:?} does not match its signed hash; it will be fetched again");
        }
        whole.update(&data);
        tmp.write_all(&data)?;
    }
    if <[u8; 32]>::from(whole.finalize()) != sha256 {
        bail!("{name:?} does not match its signed SHA-256; not saved");
    }
    tmp.as_file().sync_all()?;
    tmp.persist(&out).map_err(|e| anyhow!("saving {}: {}", out.display(), e.error))?;
    Ok(st)
}
