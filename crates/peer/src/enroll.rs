//! Joining an org: one-time invite tokens, and making a relay the org's relay.
//!
//! Enrollment is the one thing a non-member may do, over its own protocol id
//! (`caisey/enroll/1`), one request and one reply on one stream:
//! - `Claim`: the newcomer signs a membership record with the token's invite key, naming its own
//!   node id (which the QUIC handshake has just authenticated). The serving node — the org's
//!   relay or any running technician — checks the invite is genuine, unexpired and unused, writes
//!   the claim into the fleet document and replies with the fleet. The claim is
//!   self-authenticating, so the relay adds no authority of its own.
//! - `Adopt`: a technician hands a fresh relay the fleet document, in which the technician has
//!   already signed the relay's membership. A relay serves one org only.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use automerge::Automerge;
use caisey_doc::fleet::{Contact, Fleet, Membership, Role, claim_membership};
use caisey_doc::id::DocId;
use caisey_doc::record::{RecordKind, verify_kind};
use caisey_doc::token::{InviteToken, RelayTicket};
use data_encoding::BASE64;
use iroh::endpoint::Connection;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::node::{Node, ProtocolHandler, SETTING_RELAYS};
use crate::rpc::{read_msg, write_msg};

/// The largest enrollment request read from a peer not yet known.
const ENROLL_MAX: usize = 16 * 1024 * 1024;
use crate::wire::{DocKind, ENROLL_ALPN};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request {
    Claim { claim: String },
    Adopt { fleet_doc: DocId, fleet: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply {
    Welcome { fleet_doc: DocId, fleet: String },
    Refused { reason: String },
}

/// The enrollment service. Technicians and relays serve claims; only relays accept adoption.
pub fn handler(accept_adoption: bool) -> ProtocolHandler {
    std::sync::Arc::new(move |node, conn| Box::pin(serve(node, conn, accept_adoption)))
}

async fn serve(node: Node, conn: Connection, accept_adoption: bool) {
    let peer = caisey_doc::id::NodeId(*conn.remote_id().as_bytes());
    let result = async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        // Anyone may knock here: a claim is small, an adoption carries the fleet document.
        let reply = match read_msg::<Request>(&mut recv, ENROLL_MAX).await {
            Ok(Request::Claim { claim }) => match BASE64.decode(claim.as_bytes()) {
                Ok(claim) => serve_claim(&node, peer, claim).await,
                Err(_) => refused("claim is not valid base64"),
            },
            Ok(Request::Adopt { fleet_doc, fleet }) if accept_adoption => match BASE64.decode(fleet.as_bytes()) {
                Ok(bytes) => serve_adopt(&node, peer, fleet_doc, bytes).await,
                Err(_) => refused("fleet is not valid base64"),
            },
            Ok(Request::Adopt { .. }) => refused("only a relay can be adopted"),
            Err(e) => refused(&format!("malformed request: {e:#}")),
        };
        let reply = reply.unwrap_or_else(|e| Reply::Refused { reason: format!("{e:#}") });
        if let Reply::Refused { reason } = &reply {
            warn!(peer = %peer.short(), %reason, "enrollment refused");
        }
        write_msg(&mut send, &reply).await?;
        send.finish()?;
        // Let the reply arrive before the connection goes.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(peer = %peer.short(), "enrollment connection failed: {e:#}");
    }
}

fn refused(reason: &str) -> Result<Reply> {
    Ok(Reply::Refused { reason: reason.to_string() })
}

async fn serve_claim(node: &Node, peer: caisey_doc::id::NodeId, claim: Vec<u8>) -> Result<Reply> {
    let v = verify_kind(&claim, RecordKind::Membership).map_err(|e| anyhow!("claim is invalid: {e}"))?;
    let m: Membership = v.json()?;
    if m.node != peer {
        return refused("the claim names another node than the one connecting");
    }
    let now = crate::now_ms();
    node.with_core(move |core| {
        let Some(fleet_id) = core.hub.fleet_doc() else { return refused("this node has not joined an org yet") };
        let fleet = core.hub.fleet();
        if fleet.members.contains_key(&peer) {
            // Already enrolled (a retried claim): hand the fleet back.
        } else {
            let Some(cert) = m
                .invite
                .as_deref()
                .and_then(|c| verify_kind(c, RecordKind::InviteCert).ok())
                .and_then(|c| c.json::<caisey_doc::fleet::InviteCert>().ok())
            else {
                return refused("the claim carries no valid invite");
            };
            if fleet.invite_used(&cert) {
                if cert.uses > 1 {
                    return refused(&format!(
                        "this invite was already used by all the {} machines it was for; ask for a new one",
                        cert.uses
                    ));
                }
                return refused("this invite was already used; ask for a new one");
            }
            if now > cert.expires_at {
                return refused("this invite has expired; ask for a new one");
            }
            // Check on a copy that the claim chains back to the org before writing it.
            let mut trial = core.hub.doc(&fleet_id).map(Automerge::fork).ok_or_else(|| anyhow!("fleet missing"))?;
            Fleet::put_member(&mut trial, &claim, &peer)?;
            if !Fleet::read(&trial)?.members.contains_key(&peer) {
                return refused("the invite was not issued by this org");
            }
            let (r, out) = core
                .hub
                .change(fleet_id, now, |doc| Fleet::put_member(doc, &claim, &peer))
                .ok_or_else(|| anyhow!("fleet missing"))?;
            r?;
            core.apply(out)?;
            info!(peer = %peer.short(), role = %m.role, name = %m.name, "enrolled");
        }
        let bytes = core.hub.doc(&fleet_id).map(Automerge::save).unwrap_or_default();
        Ok(Reply::Welcome { fleet_doc: fleet_id, fleet: BASE64.encode(&bytes) })
    })
    .await?
}

async fn serve_adopt(node: &Node, peer: caisey_doc::id::NodeId, fleet_doc: DocId, bytes: Vec<u8>) -> Result<Reply> {
    let doc = Automerge::load(&bytes).context("fleet document does not load")?;
    let fleet = Fleet::read(&doc)?;
    if fleet.fleet_doc != Some(fleet_doc) {
        return refused("fleet document id does not match its genesis");
    }
    if fleet.role_of(&peer) != Some(Role::Technician) {
        return refused("only a technician of the org can adopt a relay");
    }
    if fleet.role_of(&node.id()) != Some(Role::Relay) {
        return refused("the fleet does not name this node as a relay");
    }
    match node.fleet_doc().await? {
        Some(existing) if existing != fleet_doc => return refused("this relay already serves another org"),
        Some(_) => {}
        None => {
            node.create(fleet_doc, DocKind::Fleet, doc).await?;
            info!(org = %fleet.org_name, by = %peer.short(), "relay adopted by org");
        }
    }
    node.announce_in_fleet().await?;
    let bytes = node.read(fleet_doc, Automerge::save).await?.unwrap_or_default();
    Ok(Reply::Welcome { fleet_doc, fleet: BASE64.encode(&bytes) })
}

/// Joins the org of `token` as this node. Tries each contact in the token in turn.
pub async fn join(node: &Node, token: &InviteToken, name: &str, groups: &[String]) -> Result<Fleet> {
    if node.fleet_doc().await?.is_some() {
        bail!("this home already belongs to an org; use another --home to enroll again");
    }
    let claim =
        claim_membership(&token.secret, &token.cert_record, &token.cert, node.id(), name, groups, crate::now_ms());
    let request = std::sync::Arc::new(Request::Claim { claim: BASE64.encode(&claim) });
    // Every contact at once, the first welcome wins: a claim is idempotent (a member claiming
    // again gets the fleet back), and a contact that is gone for good costs nobody a timeout.
    let mut asks = tokio::task::JoinSet::new();
    for contact in token.cert.contacts.iter().cloned() {
        let (node, request) = (node.clone(), request.clone());
        asks.spawn(async move {
            let reply = match tokio::time::timeout(Duration::from_secs(10), exchange(&node, &contact, &request)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!("timed out")),
            };
            (contact.node, reply)
        });
    }
    let mut tried = Vec::new();
    let mut refused = None;
    while let Some(done) = asks.join_next().await {
        let Ok((contact, reply)) = done else { continue };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                tried.push(format!("{} ({e:#})", contact.short()));
                continue;
            }
        };
        let (fleet_doc, doc, fleet) = match welcome(reply) {
            Ok(w) => w,
            // One contact's refusal (e.g. a node of another org) is not the org's answer while
            // others may still welcome us.
            Err(e) => {
                refused.get_or_insert(e);
                continue;
            }
        };
        if fleet.role_of(&node.id()) != Some(token.cert.role) {
            refused.get_or_insert(anyhow!("the org did not record this node's membership"));
            continue;
        }
        // The fleet we were given is how this node learns the org.
        node.create(fleet_doc, DocKind::Fleet, doc).await?;
        let relays: Vec<Contact> =
            token.cert.contacts.iter().filter(|c| fleet.role_of(&c.node) == Some(Role::Relay)).cloned().collect();
        node.set_setting(SETTING_RELAYS, serde_json::to_vec(&relays)?).await?;
        return Ok(fleet);
    }
    if let Some(e) = refused {
        return Err(e);
    }
    if tried.is_empty() {
        bail!(
            "the token names nobody to enroll with; ask the technician to add a relay (caisey relay add) and invite again"
        );
    }
    bail!(
        "could not reach the org to enroll (tried {}); is the relay or the inviting technician running?",
        tried.join("; ")
    )
}

/// Makes the relay at `ticket` this org's relay (technician side).
pub async fn adopt_relay(node: &Node, ticket: &RelayTicket) -> Result<()> {
    let fleet_doc = node
        .fleet_doc()
        .await?
        .ok_or_else(|| anyhow!("this home has no org yet; run `caisey init` or `caisey join` first"))?;
    let relay = ticket.node();
    let member = Membership {
        approves: vec![],
        node: relay,
        role: Role::Relay,
        name: format!("relay-{}", relay.short()).into(),
        groups: vec![],
        at: crate::now_ms(),
        invite: None,
    };
    let record = node.signer().sign(RecordKind::Membership, &member);
    node.change(fleet_doc, move |d| Fleet::put_member(d, &record, &relay)).await??;
    let bytes = node.read(fleet_doc, Automerge::save).await?.unwrap_or_default();
    let request = Request::Adopt { fleet_doc, fleet: BASE64.encode(&bytes) };
    let reply =
        tokio::time::timeout(Duration::from_secs(10), exchange(node, &ticket.0, &request)).await.map_err(|_| {
            anyhow!(
                "the relay did not answer within 10 s; is `caisey-relay run` running at {}?",
                ticket.0.addrs.join(", ")
            )
        })??;
    welcome(reply)?;
    let mut relays: Vec<Contact> =
        node.setting(SETTING_RELAYS).await?.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    relays.retain(|c| c.node != relay);
    relays.push(ticket.0.clone());
    node.set_setting(SETTING_RELAYS, serde_json::to_vec(&relays)?).await?;
    Ok(())
}

/// The fleet a `Welcome` carries, decoded and verified; the refusal reason otherwise.
fn welcome(reply: Reply) -> Result<(DocId, Automerge, Fleet)> {
    match reply {
        Reply::Refused { reason } => bail!("refused: {reason}"),
        Reply::Welcome { fleet_doc, fleet } => {
            let bytes = BASE64.decode(fleet.as_bytes()).context("fleet in reply is not base64")?;
            let doc = Automerge::load(&bytes).context("fleet in reply does not load")?;
            let verified = Fleet::read(&doc)?;
            Ok((fleet_doc, doc, verified))
        }
    }
}

async fn exchange(node: &Node, contact: &Contact, request: &Request) -> Result<Reply> {
    let conn = node.connect(contact, ENROLL_ALPN).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, request).await?;
    send.finish()?;
    let reply: Reply = read_msg(&mut recv, crate::rpc::MAX_MESSAGE).await?;
    conn.close(0u32.into(), b"done");
    Ok(reply)
}
