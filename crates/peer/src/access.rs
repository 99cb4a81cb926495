//! Who may hold which document. One rule, used both when offering a document and when accepting
//! changes to it, so a peer can never write into a document it could not read.
//!
//! - The fleet document: every member.
//! - A session: technicians and relays (they hand sessions off and store them), the agents the
//!   session targets, and the approvers designated for one of those agents. Other agents and
//!   approvers never learn it exists.

use caisey_doc::fleet::{Fleet, Role};
use caisey_doc::id::NodeId;

use crate::wire::DocKind;

/// Whether `peer` may sync a document of `kind` whose targets are `targets`.
pub fn may_share(fleet: &Fleet, peer: &NodeId, kind: DocKind, targets: &[NodeId]) -> bool {
    match (kind, fleet.role_of(peer)) {
        (_, None) => false,
        (DocKind::Fleet, Some(_)) => true,
        (DocKind::Session, Some(Role::Technician | Role::Relay)) => true,
        (DocKind::Session, Some(Role::Agent)) => targets.contains(peer),
        (DocKind::Session, Some(Role::Approver)) => targets.iter().any(|t| fleet.may_approve(peer, t)),
    }
}

/// Whether `peer` may introduce a session we have never seen.
pub fn may_introduce_session(fleet: &Fleet, peer: &NodeId) -> bool {
    matches!(fleet.role_of(peer), Some(Role::Technician | Role::Relay))
}
