//! # caisey-peer: a Caisey node on the network
//!
//! Every Caisey process — agent, technician CLI, relay — is a node: an ed25519 identity, a redb
//! store of documents, and an iroh endpoint syncing those documents with other members.
//!
//! - [`hub`]: the sync core, a sans-IO state machine (`Hub::handle(now, input) -> outputs`).
//! - [`access`]: which peer may hold which document.
//! - [`wire`]: frames on the sync stream and the protocol ids.
//! - [`store`]: redb persistence, incremental per document.
//! - [`node`]: the tokio/iroh driver around the hub: accepts and dials connections, applies the
//!   hub's outputs (persist, then send), and offers an async API to change and read documents.
//! - [`enroll`]: joining an org with a one-time token, and adopting a relay.
//! - [`home`]: where a node keeps its key and store.
//! - [`local`]: the local socket clients of a running node talk to (CLI, viewer, consent window).
//! - [`cli`], [`config`]: what every binary shares on its command line; settings from flags,
//!   the environment and a TOML file.
//! - [`service`], [`accounts`]: installing as a service, and the groups that may approve (the
//!   platform-specific pieces of `install`).
//!
//! A command's journey through this crate: the technician's node changes a session document
//! (`Node::change`); its hub persists the change and sends a sync message to the relay and the
//! target agent; each receiving hub persists it and forwards it to the peers allowed to hold it.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod access;
pub mod accounts;
pub mod cli;
pub mod config;
pub mod enroll;
pub mod home;
pub mod hub;
pub mod lan;
pub mod local;
pub mod node;
pub mod publish;
pub mod rpc;
pub mod service;
pub mod store;
pub mod traversal;
pub mod wire;

pub use caisey_doc as doc;

/// Milliseconds since the Unix epoch: the `now` every record and the hub take.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
