//! A small org to simulate: its owner, a technician, a relay and some agents, with the signed
//! fleet document every node starts from, and sessions asking an agent for a command.

use automerge::Automerge;
use caisey_doc::fleet::{Fleet, Membership, Role};
use caisey_doc::id::{DocId, Id128};
use caisey_doc::record::{RecordKind, Signer};
use caisey_doc::session::{CommandRequest, CommandSpec, SessionInfo, SessionWriter, Shell};
use caisey_peer::hub::Hub;
use caisey_peer::wire::DocKind;

use crate::Sim;

pub struct Org {
    pub owner: Signer,
    pub tech: Signer,
    pub relay: Signer,
    /// Carol, designated approver for group "g": her approvals start commands on its agents.
    pub approver: Signer,
    pub agents: Vec<Signer>,
    pub fleet_id: DocId,
    pub fleet: Automerge,
}

impl Org {
    /// An org with a technician ("alice", who founded it), a relay, a designated approver and
    /// `agents` agents in group "g". Keys are fixed, so runs repeat exactly.
    pub fn new(agents: u8) -> Org {
        let owner = Signer::from_secret([1; 32]);
        let tech = Signer::from_secret([2; 32]);
        let relay = Signer::from_secret([3; 32]);
        let fleet_id = Id128([9; 16]);
        let mut fleet = Fleet::create("Acme", &owner, &tech, "alice", fleet_id, 0).expect("fleet");
        let approver = Signer::from_secret([5; 32]);
        let mut add = |s: &Signer, role, name: &str| {
            let m = Membership {
                approves: if role == Role::Approver { vec!["g".into()] } else { vec![] },
                node: s.node_id(),
                role,
                name: name.into(),
                groups: vec!["g".into()],
                at: 0,
                invite: None,
            };
            Fleet::put_member(&mut fleet, &owner.sign(RecordKind::Membership, &m), &s.node_id()).expect("member");
        };
        add(&relay, Role::Relay, "relay");
        add(&approver, Role::Approver, "carol");
        let agents: Vec<Signer> = (0..agents).map(|i| Signer::from_secret([10 + i; 32])).collect();
        for (i, a) in agents.iter().enumerate() {
            add(a, Role::Agent, &format!("ws-{i}"));
        }
        Org { owner, tech, relay, approver, agents, fleet_id, fleet }
    }

    /// The fleet as every member reads it.
    pub fn read_fleet(&self) -> Fleet {
        Fleet::read(&self.fleet).expect("fleet reads")
    }

    /// A hub of `s` that holds the fleet document (as after enrollment).
    pub fn hub(&self, s: &Signer) -> Hub {
        let mut h = Hub::new(s.node_id());
        h.load(self.fleet_id, DocKind::Fleet, &self.fleet.save(), &|_| false).expect("fleet loads");
        h
    }

    /// A world of every node of the org (technician, relay, agents), none connected yet; each
    /// disk starts with the fleet, as after enrollment.
    pub fn sim(&self, seed: u64) -> Sim {
        let nodes = [&self.tech, &self.relay].into_iter().chain(&self.agents);
        let mut sim = Sim::new(nodes.map(|s| self.hub(s)).collect(), seed);
        for node in sim.nodes.values_mut() {
            node.disk.docs.insert(self.fleet_id, (DocKind::Fleet, vec![self.fleet.save()]));
        }
        sim
    }

    /// Session `sid` (its id is `sid` repeated) by the technician, asking `target` to run
    /// `uptime`; the request's id is `sid + 100` repeated.
    pub fn session_for(&self, target: caisey_doc::id::NodeId, sid: u8) -> (DocId, Automerge) {
        let id = Id128([sid; 16]);
        let info = SessionInfo {
            id,
            name: format!("s{sid}").into(),
            labels: vec![],
            created_at: 0,
            org_key: self.owner.node_id(),
        };
        let mut doc = SessionWriter::create(&self.tech, &info).expect("session");
        let command = CommandSpec {
            shell: Shell::Sh,
            script: "uptime".into(),
            cwd: None,
            env: Default::default(),
            timeout_ms: 1000,
            collect: None,
        };
        let req = CommandRequest {
            id: Id128([sid.wrapping_add(100); 16]),
            session: id,
            target,
            command,
            description: Default::default(),
            requested_at: 1,
            expires_at: 10,
        };
        SessionWriter::request(&mut doc, &self.tech, &req).expect("request");
        (id, doc)
    }
}
