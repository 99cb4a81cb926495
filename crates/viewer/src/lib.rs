//! # caisey-viewer: the technician's `caisey` binary
//!
//! Technicians ask enrolled machines to run diagnostics and read what happened. This crate is
//! their side: a node (see `caisey-peer`) holding every session of the org, and the commands
//! that act on it.
//!
//! - [`tech`]: what a technician does (init, invite, run, list), as functions over a node.
//! - [`transcript`]: showing a session, live or at once, with hostile output made inert.
//! - [`cli`]: `caisey`'s subcommands.
//! - [`demo`]: `caisey demo`, a whole org in temporary homes on loopback.
//! - [`gui`]: the desktop viewer, `caisey` with no subcommand.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod demo;
pub mod gui;
pub mod tech;
pub mod transcript;
