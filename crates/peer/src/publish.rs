//! Publishing transcripts to the org's relay (`caisey/publish/1`), which serves them over HTTP.
//!
//! Only technicians of the relay's org may publish or withdraw, and the relay checks every
//! transcript before storing it: it must verify offline, be of this org, and be signed by the
//! technician on the other end of the connection. A published transcript gets an unguessable
//! link id (128 random bits).

use anyhow::{Context, Result, anyhow, bail};
use caisey_doc::fleet::{Contact, Role};
use caisey_doc::id::NodeId;
use caisey_doc::transcript::group::Published;
use data_encoding::BASE32_NOPAD;
use iroh::endpoint::Connection;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::node::{Node, ProtocolHandler};
use crate::rpc::{read_msg, write_msg};
use crate::wire::PUBLISH_ALPN;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request {
    Publish { transcript: String },
    Unpublish { id: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply {
    Published { id: String, url: String },
    Unpublished,
    Refused { reason: String },
}

/// A fresh link id: 128 random bits, lowercase base32.
pub fn new_link_id() -> String {
    BASE32_NOPAD.encode(&rand::random::<[u8; 16]>()).to_ascii_lowercase()
}

/// The relay side. `http_base` is where the relay serves transcripts (`http://host:port`).
pub fn handler(http_base: Option<String>) -> ProtocolHandler {
    std::sync::Arc::new(move |node, conn| Box::pin(serve(node, conn, http_base.clone())))
}

async fn serve(node: Node, conn: Connection, http_base: Option<String>) {
    let peer = NodeId(*conn.remote_id().as_bytes());
    let result = async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        // Only a technician's transcript is worth reading: check who asks before reading it.
        let is_technician = node.fleet().await.map(|f| f.role_of(&peer) == Some(Role::Technician)).unwrap_or(false);
        let limit = if is_technician { crate::rpc::MAX_MESSAGE } else { 1024 };
        let reply = match read_msg::<Request>(&mut recv, limit).await {
            Ok(req) => handle(&node, peer, req, http_base.as_deref())
                .await
                .unwrap_or_else(|e| Reply::Refused { reason: format!("{e:#}") }),
            Err(e) => Reply::Refused { reason: format!("malformed request: {e:#}") },
        };
        if let Reply::Refused { reason } = &reply {
            warn!(peer = %peer.short(), %reason, "publish refused");
        }
        write_msg(&mut send, &reply).await?;
        send.finish()?;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(peer = %peer.short(), "publish connection failed: {e:#}");
    }
}

async fn handle(node: &Node, peer: NodeId, req: Request, http_base: Option<&str>) -> Result<Reply> {
    let fleet = node.fleet().await?;
    if fleet.role_of(&peer) != Some(Role::Technician) {
        bail!("only technicians of this relay's org may publish or withdraw transcripts");
    }
    match req {
        Request::Publish { transcript } => {
            let base = http_base.ok_or_else(|| {
                anyhow!("this relay does not serve HTTP; start it with `caisey-relay run --http ADDR`")
            })?;
            let published = Published::verify(transcript.as_bytes()).context("the transcript does not verify")?;
            if Some(published.org_key()) != fleet.org_key {
                bail!("the transcript belongs to another org");
            }
            if published.publisher() != peer {
                bail!("the transcript is signed by another technician than the one publishing it");
            }
            let id = new_link_id();
            let json = transcript.into_bytes();
            node.with_core({
                let id = id.clone();
                move |core| core.store.publish(&id, &peer, &json)
            })
            .await??;
            info!(by = %peer.short(), "transcript published");
            Ok(Reply::Published { url: format!("{}/t/{id}", base.trim_end_matches('/')), id })
        }
        Request::Unpublish { id } => {
            let removed = node.with_core(move |core| core.store.unpublish(&id)).await??;
            if !removed {
                bail!("no transcript is published under that link");
            }
            Ok(Reply::Unpublished)
        }
    }
}

async fn call(node: &Node, relay: &Contact, req: &Request) -> Result<Reply> {
    let conn = node.connect(relay, PUBLISH_ALPN).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, req).await?;
    send.finish()?;
    let reply = read_msg(&mut recv, crate::rpc::MAX_MESSAGE).await?;
    conn.close(0u32.into(), b"done");
    Ok(reply)
}

/// A transcript published here, by link id (what the relay's HTTP pages serve).
pub async fn published(node: &Node, id: &str) -> Result<Option<Vec<u8>>> {
    let id = id.to_string();
    Ok(node.with_core(move |core| core.store.published(&id)).await??.map(|(_, bytes)| bytes))
}

/// Publishes a transcript (the JSON of one session's or of a group run's); returns its link.
pub async fn publish(node: &Node, relay: &Contact, transcript: String) -> Result<String> {
    match call(node, relay, &Request::Publish { transcript }).await? {
        Reply::Published { url, .. } => Ok(url),
        Reply::Refused { reason } => bail!("the relay refused: {reason}"),
        Reply::Unpublished => bail!("unexpected reply from the relay"),
    }
}

/// Withdraws the transcript at link id `id`.
pub async fn unpublish(node: &Node, relay: &Contact, id: &str) -> Result<()> {
    match call(node, relay, &Request::Unpublish { id: id.to_string() }).await? {
        Reply::Unpublished => Ok(()),
        Reply::Refused { reason } => bail!("the relay refused: {reason}"),
        Reply::Published { .. } => bail!("unexpected reply from the relay"),
    }
}
