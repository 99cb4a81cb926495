//! # caisey-doc: what Caisey's documents contain, and how to believe them
//!
//! Caisey keeps every investigation in an Automerge document that many peers sync. This crate
//! is the schema of those documents and nothing else: no IO, no clock (callers pass `now` in
//! milliseconds since the Unix epoch), no randomness (callers pass ids in).
//!
//! - [`record`]: every value written is a signed, self-describing record, verified on read.
//! - [`fleet`]: one document per org: members (each chaining back to the org key) and where the
//!   relays are.
//! - [`machine`]: one small document per agent: its machine card and heartbeat.
//! - [`session`]: one document per session: targets, command requests, decisions, starts, signed
//!   references to output chunks (the bytes live beside the document, by hash) and ends.
//!   [`session::SessionView::read`] verifies who wrote what and quarantines the rest.
//! - [`schedule`]: recurring checks the agent runs on its own clock, under the endpoint user's
//!   standing consent; [`probe`]: the named numbers a run yields.
//! - [`artifact`]: files a run leaves on the machine, brought back as checked chunks.
//! - [`token`]: invite tokens and relay tickets, the strings people paste.
//! - [`redact`], [`transcript`]: public, redacted, signed transcripts built from a snapshot, their
//!   offline verification and their HTML page.
//! - [`text`]: showing hostile text without letting it act.
//!
//! A request travels like this: a technician writes a `CommandRequest` into a session; the
//! target agent's user approves, and the agent writes the `Decision` and `Start` in one change;
//! it stores each `OutputChunk` and appends a signed reference to it as the command writes; it
//! writes an `End` with the exit code.
//!
//! ```
//! use caisey_doc::{fleet::Fleet, id::{Id128, NodeId}, record::Signer, session::*};
//! let org = Signer::from_secret([1; 32]);
//! let tech = Signer::from_secret([2; 32]);
//! let fleet_doc = Fleet::create("Acme", &org, &tech, "alice", Id128([9; 16]), 0).unwrap();
//! let fleet = Fleet::read(&fleet_doc).unwrap();
//!
//! let info = SessionInfo { id: Id128([1; 16]), name: "disk".into(), labels: vec![], created_at: 0, org_key: org.node_id() };
//! let mut doc = SessionWriter::create(&tech, &info).unwrap();
//! let command = CommandSpec { shell: Shell::Sh, script: "df -h".into(), cwd: None, env: Default::default(), timeout_ms: 60_000, collect: None, };
//! let req = CommandRequest { id: Id128([2; 16]), session: info.id, target: NodeId([7; 32]), command, description: Default::default(), requested_at: 1, expires_at: 100 };
//! SessionWriter::request(&mut doc, &tech, &req).unwrap();
//!
//! let no_output_yet = std::collections::BTreeMap::new();
//! let view = SessionView::read(&doc, &fleet, &no_output_yet).unwrap();
//! assert_eq!(view.commands[0].status(), "waiting for approval");
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod am;
pub mod artifact;
pub mod fleet;
pub mod id;
pub mod machine;
pub mod probe;
pub mod record;
pub mod redact;
pub mod schedule;
pub mod session;
pub mod text;
pub mod token;
pub mod transcript;

pub use automerge;
