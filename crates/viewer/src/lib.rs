//! # caisey-viewer: the technician's `caisey` binary
//!
//! Technicians ask enrolled machines to run diagnostics and read what happened. This crate is
//! their side: a node (see `caisey-peer`) holding every session of the org, and the commands
//! that act on it.
//!
//! - [`service`]: the home's node as a long-running process (`caisey up`, or started on demand),
//!   serving the org like any peer and its local clients over the home's socket.
//! - [`api`]: the typed requests and replies between the node and its clients.
//! - [`client`]: what the CLI and the viewer hold: the node over its socket, or in process.
//! - [`tech`]: what a technician does (init, invite, run, list), as functions over a node.
//! - [`transcript`]: showing a session, live or at once, with hostile output made inert.
//! - [`search`]: the full-text index of every command's output, kept up to date as it arrives.
//! - [`progress`]: progress of long waits on a terminal.
//! - [`cli`]: `caisey`'s subcommands.
//! - [`demo`]: `caisey demo`, a whole org in temporary homes on loopback.
//! - [`gui`]: the desktop viewer, `caisey` with no subcommand.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod artifacts;
pub mod background;
pub mod cli;
pub mod client;
pub mod demo;
pub mod gui;
pub mod progress;
pub mod schedules;
pub mod search;
pub mod service;
pub mod tech;
pub mod transcript;
pub mod user_service;
