//! One small document per agent: its machine card and its presence as of the card.
//!
//! Only technicians, relays and the machine's approvers need them. Kept in the fleet document,
//! every agent would receive and re-verify every other agent's card: work growing with the
//! square of the fleet. Here each agent's document syncs only to those who need it. Its id is
//! derived from the agent's node id, so anyone can find it, and only records the agent signed
//! are believed. It changes when the agent starts or its card changes. The heartbeat every few
//! seconds is *not* written here (a document keeps every value ever written, so it would grow
//! without end): it travels as its own signed frame, and only the newest is kept
//! (`caisey_peer::hub`).

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT, ReadDoc};
use sha2::{Digest, Sha256};

use crate::am;
use crate::fleet::{MachineCard, Presence};
use crate::id::{Id128, NodeId};
use crate::record::{RecordKind, Signer, verify_kind};

/// The id of `agent`'s machine document.
pub fn machine_doc_id(agent: &NodeId) -> Id128 {
    let digest: [u8; 32] = Sha256::new().chain_update(b"caisey/machine-doc/v1").chain_update(agent.0).finalize().into();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    Id128(id)
}

/// Writes and reads a machine document.
#[derive(Debug)]
pub struct MachineDoc;

impl MachineDoc {
    /// A new machine document holding the agent's card and presence.
    pub fn create(
        signer: &Signer,
        card: &MachineCard,
        addrs: Vec<String>,
        now: u64,
    ) -> Result<Automerge, automerge::AutomergeError> {
        let mut doc = Automerge::new();
        Self::put(&mut doc, signer, card, addrs, now)?;
        Ok(doc)
    }

    /// Writes the card and the presence as of now (at start and when the card changes; the
    /// heartbeat itself is not written here).
    pub fn put(
        doc: &mut Automerge,
        signer: &Signer,
        card: &MachineCard,
        addrs: Vec<String>,
        now: u64,
    ) -> Result<(), automerge::AutomergeError> {
        let presence = signer.sign(
            RecordKind::Presence,
            &Presence { node: signer.node_id(), addrs, at: now, relay_server: None, vitals: None, unwritable: None },
        );
        let card = signer.sign(RecordKind::MachineCard, card);
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.put(ROOT, "presence", presence)?;
            tx.put(ROOT, "card", card)?;
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(())
    }

    /// The presence and (when `with_card`) the card `owner` signed; anything else in the document
    /// is ignored. Only technicians look at the card, so a relay skips verifying and parsing it.
    pub fn read(doc: &impl ReadDoc, owner: &NodeId, with_card: bool) -> (Option<Presence>, Option<MachineCard>) {
        let presence = am::bytes_at(doc, &ROOT, "presence")
            .and_then(|b| {
                verify_kind(&b, RecordKind::Presence)
                    .ok()
                    .filter(|v| v.author == *owner)
                    .and_then(|v| v.json::<Presence>().ok())
            })
            .filter(|p| p.node == *owner);
        let card = am::bytes_at(doc, &ROOT, "card").filter(|_| with_card).and_then(|b| {
            verify_kind(&b, RecordKind::MachineCard).ok().filter(|v| v.author == *owner).and_then(|v| v.json().ok())
        });
        (presence, card)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_s_records_are_believed() {
        let agent = Signer::from_secret([3; 32]);
        let other = Signer::from_secret([4; 32]);
        let card = MachineCard { hostname: "ws-01".into(), ..Default::default() };
        let mut doc = MachineDoc::create(&agent, &card, vec!["127.0.0.1:1".into()], 5).unwrap();
        let (p, c) = MachineDoc::read(&doc, &agent.node_id(), true);
        assert_eq!((p.map(|p| p.at), c.map(|c| c.hostname)), (Some(5), Some("ws-01".into())));
        let (p, c) = MachineDoc::read(&doc, &agent.node_id(), false);
        assert_eq!((p.map(|p| p.at), c), (Some(5), None), "presence alone when the card is not wanted");
        MachineDoc::put(&mut doc, &other, &card, vec![], 9).unwrap();
        assert_eq!(MachineDoc::read(&doc, &agent.node_id(), true).0, None, "another node's presence was believed");
        assert_ne!(machine_doc_id(&agent.node_id()), machine_doc_id(&other.node_id()));
    }
}
