//! The fleet document: one per org, synced to every member.
//!
//! It answers "who is in this org, in which role, and where can they be reached?". Every entry
//! is a signed record, and membership is only believed when it chains back to the org key:
//! signed by the org key itself, by a technician whose own membership chains back, or by a
//! one-time invite key whose certificate was signed by one of those. A relay stores the fleet
//! document but holds no authority in it, so it cannot add members on its own.
//!
//! Layout: `ROOT.genesis` (bytes), `ROOT.members[node]`, `ROOT.presence[node]` (maps of signed
//! records). Relays and technicians keep their presence here (they change address rarely and
//! everyone needs them; a relay's also names the iroh relay server it runs); agents' cards and heartbeats live in their machine documents (`crate::machine`), which
//! the hub merges into `Fleet::presence` and `Fleet::cards` for those who hold them.

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use crate::am;
use crate::id::{Id128, NodeId};
use crate::record::{RecordError, RecordKind, Signer, verify_kind};
use crate::text::PeerText;

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Asks for commands, sees every session, may invite.
    Technician,
    /// Runs commands it is asked for (after local approval); sees only its own sessions.
    Agent,
    /// Stores and forwards every document; no authority.
    Relay,
    /// A designated remote approver (e.g. a client's operations manager): approves or denies
    /// requests for the machines and groups named in its membership, never its own.
    Approver,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Technician => "technician",
            Role::Agent => "agent",
            Role::Relay => "relay",
            Role::Approver => "approver",
        })
    }
}

/// The first record of an org: its name and key, signed by that key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgGenesis {
    pub name: String,
    pub org_key: NodeId,
    pub fleet_doc: Id128,
    pub created_at: u64,
}

/// A one-time invitation, signed by the org key or a technician. The matching secret travels in
/// the token; whoever holds it can claim membership exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCert {
    pub invite_id: Id128,
    pub invite_key: NodeId,
    pub org_key: NodeId,
    pub fleet_doc: Id128,
    pub role: Role,
    /// The name the enrolling node gets, chosen by the inviter.
    pub name: Option<PeerText>,
    pub groups: Vec<String>,
    /// For approver invites: the machine names and group names it may approve for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approves: Vec<String>,
    pub expires_at: u64,
    /// How many nodes may enroll with it (one, unless a technician asked for more: a token
    /// an MDM pushes to a whole group of laptops).
    #[serde(default = "one_use", skip_serializing_if = "is_one_use")]
    pub uses: u32,
    /// Nodes the enrolling node may contact to enroll (the org relay, the inviter):
    /// `(node id, socket addresses)`.
    pub contacts: Vec<Contact>,
}

fn one_use() -> u32 {
    1
}

fn is_one_use(uses: &u32) -> bool {
    *uses == 1
}

/// Where a node can be dialled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub node: NodeId,
    pub addrs: Vec<String>,
}

/// A member's entry in the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub node: NodeId,
    pub role: Role,
    pub name: PeerText,
    pub groups: Vec<String>,
    /// Approvers only: machine and group names it may approve for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approves: Vec<String>,
    pub at: u64,
    /// When the author is an invite key: the certificate (a signed `InviteCert` record).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex")]
    pub invite: Option<Vec<u8>>,
}

/// A node's own note of where it is reachable, refreshed as a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub node: NodeId,
    pub addrs: Vec<String>,
    pub at: u64,
    /// A relay's iroh relay server, through which members behind NAT meet and hole-punch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_server: Option<RelayServer>,
    /// An agent's live state, refreshed with every heartbeat. It rides on the heartbeat (whose
    /// newest record replaces the last) rather than in a document, so it keeps no history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vitals: Option<Vitals>,
    /// Why writes to the node's store fail (a full disk), now or within the last minute, as it
    /// says itself: while they do, nothing new from it is saved or sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwritable: Option<PeerText>,
}

/// What changes on a machine from minute to minute.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Vitals {
    pub uptime_secs: u64,
    pub memory_used: u64,
    pub memory_total: u64,
    /// Of the filesystem holding `/` (the system drive elsewhere).
    pub disk_used: u64,
    pub disk_total: u64,
    /// Users logged in now, each once.
    pub users: Vec<String>,
    /// The machine's own IP addresses, loopback aside.
    pub ips: Vec<String>,
}

/// An iroh relay server a Caisey relay runs: where members reach it, and the exact certificate
/// they accept from it. A self-hosted relay has no domain name and no CA-signed certificate;
/// members pin this one, which they learn from the signed fleet document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayServer {
    /// `https://IP:PORT`.
    pub url: String,
    /// UDP port of its QUIC address discovery (how members learn their public address).
    pub quic_port: Option<u16>,
    /// The server's certificate, DER, base64.
    pub cert: String,
}

/// What an agent tells technicians about its machine.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MachineCard {
    pub hostname: PeerText,
    pub os_name: PeerText,
    pub os_version: PeerText,
    pub kernel: PeerText,
    pub uptime_secs: u64,
    pub cpu: PeerText,
    pub cpu_count: u32,
    pub memory_total: u64,
    pub memory_used: u64,
    pub at: u64,
    /// Installed applications (not libraries, headers, docs or data), where the agent knows how
    /// to list them (dpkg today), sorted by name.
    #[serde(default)]
    pub software: Vec<Software>,
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Software {
    pub name: PeerText,
    pub version: PeerText,
}

mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| hex::decode(s).map_err(serde::de::Error::custom)).transpose()
    }
}

/// Why the fleet document can't be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    #[error("fleet document has no genesis record")]
    NoGenesis,
    #[error("fleet genesis record is invalid")]
    BadGenesis(#[source] RecordError),
    #[error("fleet genesis is not signed by the org key it names")]
    GenesisNotSelfSigned,
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

/// A verified member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub role: Role,
    pub name: PeerText,
    pub groups: Vec<String>,
    pub approves: Vec<String>,
    pub joined_at: u64,
    pub invite_id: Option<Id128>,
}

/// An entry that failed verification, kept so it can be shown as such.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub key: String,
    pub why: String,
}

/// The verified view of a fleet document.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub org_name: String,
    pub org_key: Option<NodeId>,
    pub fleet_doc: Option<Id128>,
    pub members: BTreeMap<NodeId, Member>,
    pub presence: BTreeMap<NodeId, Presence>,
    pub cards: BTreeMap<NodeId, MachineCard>,
    pub rejected: Vec<Rejected>,
}

impl Fleet {
    /// Creates a new org's fleet document, with the founder as its first technician.
    pub fn create(
        org_name: &str,
        org: &Signer,
        founder: &Signer,
        founder_name: &str,
        fleet_doc: Id128,
        now: u64,
    ) -> Result<Automerge, FleetError> {
        let genesis = OrgGenesis { name: org_name.to_string(), org_key: org.node_id(), fleet_doc, created_at: now };
        let member = Membership {
            approves: vec![],
            node: founder.node_id(),
            role: Role::Technician,
            name: founder_name.into(),
            groups: vec![],
            at: now,
            invite: None,
        };
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "genesis", org.sign(RecordKind::OrgGenesis, &genesis))?;
            for key in ["members", "presence"] {
                tx.put_object(ROOT, key, automerge::ObjType::Map)?;
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        Self::put_member(&mut doc, &org.sign(RecordKind::Membership, &member), &member.node)?;
        Ok(doc)
    }

    /// Writes a signed membership record for `node`.
    pub fn put_member(doc: &mut Automerge, record: &[u8], node: &NodeId) -> Result<(), FleetError> {
        put_in(doc, "members", &node.to_hex(), record)
    }

    /// Writes this node's signed presence (addresses and heartbeat; a relay's iroh relay server).
    pub fn put_presence(
        doc: &mut Automerge,
        signer: &Signer,
        addrs: Vec<String>,
        relay_server: Option<RelayServer>,
        now: u64,
    ) -> Result<(), FleetError> {
        let p = Presence { node: signer.node_id(), addrs, at: now, relay_server, vitals: None, unwritable: None };
        put_in(doc, "presence", &p.node.to_hex(), &signer.sign(RecordKind::Presence, &p))
    }

    /// Rebuilds the verified fleet from a genesis record and membership records alone (as
    /// carried by a published transcript), with the same chain rules as [`Fleet::read`].
    pub fn from_records(genesis: &[u8], members: &[Vec<u8>]) -> Result<Fleet, FleetError> {
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "genesis", genesis.to_vec())?;
            let map = tx.put_object(ROOT, "members", automerge::ObjType::Map)?;
            for record in members {
                let node = crate::record::verify(record).ok().and_then(|v| v.json::<Membership>().ok()).map(|m| m.node);
                if let Some(node) = node {
                    tx.put(&map, node.to_hex(), record.clone())?;
                }
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        Self::read(&doc)
    }

    /// The raw membership records of `nodes` and of every member their membership chains
    /// through (who signed them, who signed their invites): what a third party needs to check
    /// those memberships back to the org key, and no more.
    pub fn membership_chain(doc: &impl ReadDoc, nodes: &BTreeSet<NodeId>) -> Vec<Vec<u8>> {
        let Some(map) = am::root_map(doc, "members") else { return vec![] };
        let mut wanted: Vec<NodeId> = nodes.iter().copied().collect();
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        while let Some(node) = wanted.pop() {
            if !seen.insert(node) {
                continue;
            }
            let Some(bytes) = am::bytes_at(doc, &map, &node.to_hex()) else { continue };
            if let Ok(v) = verify_kind(&bytes, RecordKind::Membership) {
                wanted.push(v.author);
                if let Ok(m) = v.json::<Membership>() {
                    let cert_author =
                        m.invite.as_deref().and_then(|c| verify_kind(c, RecordKind::InviteCert).ok()).map(|c| c.author);
                    wanted.extend(cert_author);
                }
            }
            out.push(bytes);
        }
        out
    }

    /// The raw genesis record.
    pub fn genesis_record(doc: &impl ReadDoc) -> Option<Vec<u8>> {
        am::bytes_at(doc, &ROOT, "genesis")
    }

    /// Reads and verifies a fleet document.
    pub fn read(doc: &impl ReadDoc) -> Result<Fleet, FleetError> {
        let genesis_bytes = am::bytes_at(doc, &ROOT, "genesis").ok_or(FleetError::NoGenesis)?;
        let g = verify_kind(&genesis_bytes, RecordKind::OrgGenesis).map_err(FleetError::BadGenesis)?;
        let genesis: OrgGenesis = g.json().map_err(FleetError::BadGenesis)?;
        if g.author != genesis.org_key {
            return Err(FleetError::GenesisNotSelfSigned);
        }
        let mut fleet = Fleet {
            org_name: genesis.name.clone(),
            org_key: Some(genesis.org_key),
            fleet_doc: Some(genesis.fleet_doc),
            ..Fleet::default()
        };
        let entries = am::root_map(doc, "members").map(|m| am::byte_entries(doc, &m)).unwrap_or_default();
        fleet.resolve_members(&genesis, entries);
        fleet.read_signed_by_self(doc, "presence", RecordKind::Presence, |f, node, p: Presence| {
            if p.node == node {
                f.presence.insert(node, p);
            }
        });
        Ok(fleet)
    }

    /// The iroh relay servers of the org's relays.
    pub fn relay_servers(&self) -> Vec<RelayServer> {
        self.members_with_role(Role::Relay)
            .filter_map(|m| self.presence.get(&m.node).and_then(|p| p.relay_server.clone()))
            .collect()
    }

    /// Membership is a chain: accept records signed by the org key, then repeatedly those signed
    /// by an accepted technician or by an invite whose certificate an accepted authority signed.
    fn resolve_members(&mut self, genesis: &OrgGenesis, entries: Vec<(String, Vec<u8>)>) {
        let mut pending: Vec<(String, Vec<u8>)> = Vec::new();
        for (key, bytes) in entries {
            pending.push((key, bytes));
        }
        // Each invite's claims so far, earliest first: (claimed at, node).
        let mut claimed_invites: BTreeMap<Id128, Vec<(u64, NodeId)>> = BTreeMap::new();
        loop {
            let mut progressed = false;
            let mut still = Vec::new();
            for (key, bytes) in pending {
                match self.check_member(genesis, &key, &bytes) {
                    Ok(Some((member, uses))) => {
                        if let Some(invite) = member.invite_id {
                            // More claims than the invite has uses (made on two hubs at once): the
                            // earliest win (then the smaller node id), so all peers agree whatever
                            // order they saw the claims in.
                            let claims = claimed_invites.entry(invite).or_default();
                            claims.push((member.joined_at, member.node));
                            claims.sort();
                            if claims.len() > uses.max(1) as usize
                                && let Some((_, last)) = claims.pop()
                            {
                                if last == member.node {
                                    self.rejected.push(Rejected { key, why: "invite already used".into() });
                                    continue;
                                }
                                self.members.remove(&last);
                                self.rejected.push(Rejected { key: last.to_hex(), why: "invite already used".into() });
                            }
                        }
                        self.members.insert(member.node, member);
                        progressed = true;
                    }
                    Ok(None) => still.push((key, bytes)),
                    Err(why) => self.rejected.push(Rejected { key, why }),
                }
            }
            pending = still;
            if !progressed || pending.is_empty() {
                break;
            }
        }
        for (key, _) in pending {
            self.rejected.push(Rejected { key, why: "signer is not an authority of this org".into() });
        }
    }

    fn is_authority(&self, genesis: &OrgGenesis, node: &NodeId) -> bool {
        *node == genesis.org_key || self.members.get(node).is_some_and(|m| m.role == Role::Technician)
    }

    /// `Ok(None)`: not (yet) provable; `Err`: never valid.
    /// A membership and, when it claims an invite, how many uses that invite has.
    fn check_member(&self, genesis: &OrgGenesis, key: &str, bytes: &[u8]) -> Result<Option<(Member, u32)>, String> {
        let v = verify_kind(bytes, RecordKind::Membership).map_err(|e| e.to_string())?;
        let m: Membership = v.json().map_err(|e| e.to_string())?;
        if m.node.to_hex() != key {
            return Err("membership stored under another node's key".into());
        }
        let member = |invite_id| Member {
            node: m.node,
            role: m.role,
            name: m.name.clone(),
            groups: m.groups.clone(),
            approves: m.approves.clone(),
            joined_at: m.at,
            invite_id,
        };
        if m.invite.is_none() {
            return Ok(self.is_authority(genesis, &v.author).then(|| (member(None), 1)));
        }
        let cert_bytes = m.invite.as_deref().unwrap_or_default();
        let cv = verify_kind(cert_bytes, RecordKind::InviteCert).map_err(|e| format!("invite: {e}"))?;
        let cert: InviteCert = cv.json().map_err(|e| format!("invite: {e}"))?;
        if cert.invite_key != v.author {
            return Err("claim not signed by the invite's key".into());
        }
        if cert.org_key != genesis.org_key
            || cert.role != m.role
            || m.at > cert.expires_at
            || m.approves != cert.approves
        {
            return Err("claim does not match its invite (org, role or expiry)".into());
        }
        Ok(self.is_authority(genesis, &cv.author).then(|| (member(Some(cert.invite_id)), cert.uses)))
    }

    fn read_signed_by_self<T: serde::de::DeserializeOwned>(
        &mut self,
        doc: &impl ReadDoc,
        map: &str,
        kind: RecordKind,
        mut accept: impl FnMut(&mut Fleet, NodeId, T),
    ) {
        let Some(obj) = am::root_map(doc, map) else { return };
        for (key, bytes) in am::byte_entries(doc, &obj) {
            let parsed = verify_kind(&bytes, kind).map_err(|e| e.to_string()).and_then(|v| {
                let body: T = v.json().map_err(|e| e.to_string())?;
                Ok((v.author, body))
            });
            match parsed {
                Ok((author, body)) if author.to_hex() == key && self.members.contains_key(&author) => {
                    accept(self, author, body)
                }
                Ok(_) => self
                    .rejected
                    .push(Rejected { key: format!("{map}/{key}"), why: "not written by that member".into() }),
                Err(why) => self.rejected.push(Rejected { key: format!("{map}/{key}"), why }),
            }
        }
    }

    pub fn role_of(&self, node: &NodeId) -> Option<Role> {
        self.members.get(node).map(|m| m.role)
    }

    pub fn members_with_role(&self, role: Role) -> impl Iterator<Item = &Member> {
        self.members.values().filter(move |m| m.role == role)
    }

    /// Whether `approver` is a designated approver for the machine `target` (by its name or one
    /// of its groups).
    pub fn may_approve(&self, approver: &NodeId, target: &NodeId) -> bool {
        let (Some(a), Some(t)) = (self.members.get(approver), self.members.get(target)) else { return false };
        a.role == Role::Approver
            && t.role == Role::Agent
            && a.approves
                .iter()
                .any(|s| t.name.eq_ignore_ascii_case(s) || t.groups.iter().any(|g| g.eq_ignore_ascii_case(s)))
    }

    /// How many members enrolled with an invite.
    pub fn invite_claims(&self, invite: &Id128) -> usize {
        self.members.values().filter(|m| m.invite_id.as_ref() == Some(invite)).count()
    }

    /// Whether an invite has no use left.
    pub fn invite_used(&self, cert: &InviteCert) -> bool {
        self.invite_claims(&cert.invite_id) >= cert.uses.max(1) as usize
    }

    /// Agents whose name matches exactly (case-insensitive).
    pub fn agent_by_name(&self, name: &str) -> Vec<&Member> {
        self.members_with_role(Role::Agent).filter(|m| m.name.eq_ignore_ascii_case(name)).collect()
    }

    pub fn agents_in_group(&self, group: &str) -> Vec<&Member> {
        self.members_with_role(Role::Agent).filter(|m| m.groups.iter().any(|g| g.eq_ignore_ascii_case(group))).collect()
    }

    /// The distinct groups in use.
    pub fn groups(&self) -> BTreeSet<String> {
        self.members.values().flat_map(|m| m.groups.iter().cloned()).collect()
    }
}

fn put_in(doc: &mut Automerge, map: &str, key: &str, record: &[u8]) -> Result<(), FleetError> {
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        let obj = am::ensure_root_map(tx, map)?;
        tx.put(&obj, key, record.to_vec())?;
        Ok(())
    })
    .map_err(|f| f.error)?;
    Ok(())
}

/// Builds the membership claim an enrolling node signs with its invite's secret key. The name
/// and groups the inviter put in the invite win; the enrolling node's own choice fills gaps.
pub fn claim_membership(
    invite_secret: &Signer,
    cert_record: &[u8],
    cert: &InviteCert,
    node: NodeId,
    name: &str,
    groups: &[String],
    now: u64,
) -> Vec<u8> {
    let m = Membership {
        node,
        role: cert.role,
        name: cert.name.clone().unwrap_or_else(|| name.into()),
        groups: if cert.groups.is_empty() { groups.to_vec() } else { cert.groups.clone() },
        approves: cert.approves.clone(),
        at: now,
        invite: Some(cert_record.to_vec()),
    };
    invite_secret.sign(RecordKind::Membership, &m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(seed: u8) -> Signer {
        Signer::from_secret([seed; 32])
    }

    fn cert(org: &Signer, invite: &Signer, role: Role, expires_at: u64) -> (Vec<u8>, InviteCert) {
        let c = InviteCert {
            invite_id: Id128([5; 16]),
            invite_key: invite.node_id(),
            org_key: org.node_id(),
            fleet_doc: Id128([1; 16]),
            role,
            name: Some("ws-01".into()),
            groups: vec!["accounting".into()],
            approves: vec![],
            expires_at,
            uses: 1,
            contacts: vec![],
        };
        (org.sign(RecordKind::InviteCert, &c), c)
    }

    #[test]
    fn founder_is_a_technician_and_invites_chain_back_to_the_org() {
        let (org, tech, invite, agent) = (s(1), s(2), s(3), s(4));
        let mut doc = Fleet::create("Acme", &org, &tech, "alice", Id128([1; 16]), 10).unwrap();
        let (cert_rec, c) = cert(&org, &invite, Role::Agent, 100);
        let claim = claim_membership(&invite, &cert_rec, &c, agent.node_id(), "ignored", &[], 20);
        Fleet::put_member(&mut doc, &claim, &agent.node_id()).unwrap();
        let fleet = Fleet::read(&doc).unwrap();
        assert_eq!(fleet.role_of(&tech.node_id()), Some(Role::Technician));
        let m = &fleet.members[&agent.node_id()];
        assert_eq!((m.role, m.name.as_unescaped_str()), (Role::Agent, "ws-01"));
        assert_eq!(fleet.agents_in_group("Accounting").len(), 1);
        assert!(fleet.invite_used(&c));
    }

    #[test]
    fn an_invite_for_three_machines_admits_the_three_earliest_claims_everywhere() {
        let (org, tech, invite) = (s(1), s(2), s(3));
        let (_, mut c) = cert(&org, &invite, Role::Agent, 1_000);
        c.uses = 3;
        c.name = None;
        let cert_rec = org.sign(RecordKind::InviteCert, &c);
        // Four laptops claim it, on two hubs during a partition; each peer merges in another order.
        let claims: Vec<(NodeId, Vec<u8>)> = [(10u8, 50u64), (11, 20), (12, 40), (13, 30)]
            .iter()
            .map(|&(seed, at)| {
                let node = s(seed).node_id();
                (node, claim_membership(&invite, &cert_rec, &c, node, &format!("laptop-{seed}"), &[], at))
            })
            .collect();
        let mut seen = Vec::new();
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
            let mut doc = Fleet::create("Acme", &org, &tech, "alice", Id128([1; 16]), 10).unwrap();
            for i in order {
                Fleet::put_member(&mut doc, &claims[i].1, &claims[i].0).unwrap();
            }
            let fleet = Fleet::read(&doc).unwrap();
            assert_eq!(fleet.invite_claims(&c.invite_id), 3);
            assert!(fleet.invite_used(&c));
            // The claim made last (laptop-10, at 50) is the one left out.
            assert!(!fleet.members.contains_key(&s(10).node_id()));
            assert_eq!(fleet.rejected.len(), 1, "{:?}", fleet.rejected);
            seen.push(fleet.members.keys().copied().collect::<Vec<_>>());
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "peers disagree: {seen:?}");
    }

    #[test]
    fn a_relay_or_stranger_cannot_add_members() {
        let (org, tech, relay, stranger) = (s(1), s(2), s(3), s(4));
        let mut doc = Fleet::create("Acme", &org, &tech, "alice", Id128([1; 16]), 10).unwrap();
        let relay_m = Membership {
            approves: vec![],
            node: relay.node_id(),
            role: Role::Relay,
            name: "relay".into(),
            groups: vec![],
            at: 11,
            invite: None,
        };
        Fleet::put_member(&mut doc, &tech.sign(RecordKind::Membership, &relay_m), &relay.node_id()).unwrap();
        let m = Membership {
            approves: vec![],
            node: stranger.node_id(),
            role: Role::Technician,
            name: "eve".into(),
            groups: vec![],
            at: 12,
            invite: None,
        };
        Fleet::put_member(&mut doc, &relay.sign(RecordKind::Membership, &m), &stranger.node_id()).unwrap();
        let fleet = Fleet::read(&doc).unwrap();
        assert_eq!(fleet.role_of(&relay.node_id()), Some(Role::Relay));
        assert_eq!(fleet.role_of(&stranger.node_id()), None);
        assert_eq!(fleet.rejected.len(), 1);
    }

    #[test]
    fn an_expired_or_foreign_invite_is_rejected() {
        let (org, tech, invite, agent) = (s(1), s(2), s(3), s(4));
        let mut doc = Fleet::create("Acme", &org, &tech, "alice", Id128([1; 16]), 10).unwrap();
        let (cert_rec, c) = cert(&org, &invite, Role::Agent, 100);
        let late = claim_membership(&invite, &cert_rec, &c, agent.node_id(), "x", &[], 101);
        Fleet::put_member(&mut doc, &late, &agent.node_id()).unwrap();
        let (foreign_rec, fc) = cert(&s(9), &invite, Role::Agent, 100);
        let other = s(5);
        let foreign = claim_membership(&invite, &foreign_rec, &fc, other.node_id(), "x", &[], 50);
        Fleet::put_member(&mut doc, &foreign, &other.node_id()).unwrap();
        let fleet = Fleet::read(&doc).unwrap();
        assert_eq!(fleet.members.len(), 1);
        assert_eq!(fleet.rejected.len(), 2);
    }
}
