//! # caisey-agent: the endpoint side of Caisey
//!
//! The agent is a node (see `caisey-peer`) that holds only the fleet document and the sessions
//! that target its machine. It never runs anything because a peer said so: every command waits
//! for the endpoint's user, who approves or denies that exact request over a local socket
//! (`caisey-agent approve ID`).
//!
//! - [`daemon`]: `caisey-agent run` — heartbeat, machine card, watching sessions, approvals.
//! - [`gate`]: the pure decision of what waits, what expired, what was interrupted.
//! - [`recurring`]: the gate's rules for schedules: when a run is due, and whether it may start.
//! - [`runner`]: runs an approved command, streaming batched output into the session.
//! - [`collect`]: brings back the files a run was approved to collect, refusing path tricks.
//! - [`process`]: how a command's processes start and stop (never outliving the agent unseen).
//! - [`local`]: the local socket protocol for `pending`, `approve`, `deny`.
//! - [`prompt`]: the consent window, `caisey-agent prompt`.
//! - [`card`]: the machine card, from `sysinfo`, and the live vitals sent with each heartbeat.
//! - [`sessions`]: who is logged in (the platform piece of the vitals).
//! - [`install`]: `install`/`uninstall` as this machine's service, with the consent window.
//! - [`cli`]: the command line.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod batching;
pub mod card;
pub mod cli;
pub mod collect;
pub mod daemon;
pub mod gate;
pub mod install;
pub mod local;
pub mod process;
pub mod prompt;
pub mod recurring;
pub mod runner;
pub mod sessions;

/// Hostile text made visible; lives in `caisey-doc` so every surface shares it.
pub use caisey_doc::text as escape;
