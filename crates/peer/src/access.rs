//! Who may hold which document. One rule, used both when offering a document and when accepting
//! changes to it, so a peer can never write into a document it could not read.
//!
//! - The fleet document: every member.
//! - A session: technicians and relays (they hand sessions off and store them), the agents the
//!   session targets, and the approvers designated for one of those agents. Other agents and
//!   approvers never learn it exists.
//! - A machine document: technicians, relays, the agent it describes and that agent's approvers.
//!
//! For a session, `targets` are its target agents; for a machine document, its one agent.

use caisey_doc::fleet::{Fleet, Role};
use caisey_doc::id::NodeId;

use crate::wire::DocKind;

/// Whether `peer` may sync a document of `kind` whose targets are `targets`.
pub fn may_share(fleet: &Fleet, peer: &NodeId, kind: DocKind, targets: &[NodeId]) -> bool {
    match (kind, fleet.role_of(peer)) {
        (_, None) => false,
        (DocKind::Fleet, Some(_)) => true,
        (DocKind::Session | DocKind::Machine, Some(Role::Technician | Role::Relay)) => true,
        (DocKind::Session | DocKind::Machine, Some(Role::Agent)) => targets.contains(peer),
        (DocKind::Session | DocKind::Machine, Some(Role::Approver)) => {
            targets.iter().any(|t| fleet.may_approve(peer, t))
        }
    }
}

/// Whether `peer` may introduce a document we have never seen: technicians and relays any
/// session or machine document (a machine document may arrive before the fleet change naming its
/// agent; it is shared onwards only once its owner is known); an agent only its own machine
/// document (`owner`).
pub fn may_introduce(fleet: &Fleet, peer: &NodeId, kind: DocKind, owner: Option<NodeId>) -> bool {
    match kind {
        DocKind::Fleet => false,
        DocKind::Session | DocKind::Machine if matches!(fleet.role_of(peer), Some(Role::Technician | Role::Relay)) => {
            true
        }
        DocKind::Session => false,
        DocKind::Machine => owner == Some(*peer),
    }
}
