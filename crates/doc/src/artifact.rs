//! Artifacts: files a command leaves on the machine (a minidump, an exported event log, a zip)
//! brought back to the technician.
//!
//! What may be collected is part of the command ([`Collect`]: the paths and a size limit, in
//! [`crate::session::CommandSpec`]), so it is in the hash the endpoint user approves. After the
//! command ends, its agent reads each file, stores its bytes as chunks of at most
//! [`crate::session::MAX_CHUNK`] by SHA-256 — the same store and the same fetch path as output,
//! so a transfer resumes wherever it stopped and every chunk is checked against its hash — and
//! writes one signed [`Artifact`] record per file: its name, size, SHA-256 and chunk list, or
//! why it was refused. A refused file has no chunks: never a partial file that looks whole.
//!
//! Records live at the document's root, `artifact:<request>:<n>`, written only by the agent
//! the request targets.

use automerge::{Automerge, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};

use crate::am;
use crate::id::{Id128, NodeId};
use crate::record::{RecordKind, Signer, verify_kind};
use crate::session::{ChunkHash, Quarantined};

/// The most paths one command may collect.
pub const MAX_PATHS: usize = 32;
/// The most files one command brings back (a directory counts each file in it).
pub const MAX_FILES: usize = 256;
const PREFIX: &str = "artifact:";

/// What a command may bring back: these paths (files, or directories whose files are taken),
/// at most `limit` bytes in all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collect {
    pub paths: Vec<String>,
    pub limit: u64,
}

impl Collect {
    /// Checks what a technician typed: absolute paths, no `..`, not too many.
    pub fn check(&self) -> Result<(), String> {
        if self.paths.is_empty() {
            return Err("no path to collect".into());
        }
        if self.paths.len() > MAX_PATHS {
            return Err(format!("at most {MAX_PATHS} paths to collect"));
        }
        for p in &self.paths {
            check_path(p)?;
        }
        Ok(())
    }
}

/// A path that may be collected: absolute, with no `.` or `..` component and no control
/// characters. (Symlinks and devices are refused where the file is read.)
pub fn check_path(path: &str) -> Result<(), String> {
    let absolute = path.starts_with('/') || path.get(1..3) == Some(":\\");
    if !absolute {
        return Err(format!("{path:?}: give an absolute path"));
    }
    if path.split(['/', '\\']).any(|c| c == ".." || c == ".") {
        return Err(format!("{path:?}: a path with . or .. is not collected"));
    }
    if path.chars().any(char::is_control) {
        return Err(format!("{path:?}: a path with control characters is not collected"));
    }
    Ok(())
}

/// One chunk of an artifact: its hash and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    #[serde(with = "crate::session::hex32")]
    pub hash: ChunkHash,
    pub len: u64,
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Collected {
        size: u64,
        #[serde(with = "crate::session::hex32")]
        sha256: [u8; 32],
        pieces: Vec<Piece>,
    },
    /// Not brought back, and why (a symlink out of the path, a device, too big, changed while
    /// read, not there).
    Refused { why: String },
}

/// A file brought back by a run (or refused), signed by the agent that read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub request: Id128,
    pub session: Id128,
    /// Its place among the run's artifacts.
    pub index: u32,
    /// Where it was on the machine.
    pub path: String,
    /// What it is called: the file's name (within a collected directory, its path below it).
    pub name: String,
    pub outcome: Outcome,
}

impl Artifact {
    pub fn key(&self) -> String {
        format!("{PREFIX}{}:{}", self.request.to_hex(), self.index)
    }

    pub fn size(&self) -> Option<u64> {
        match &self.outcome {
            Outcome::Collected { size, .. } => Some(*size),
            Outcome::Refused { .. } => None,
        }
    }
}

/// An artifact as read, with the machine that wrote it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactView {
    pub artifact: Artifact,
    pub machine: NodeId,
}

/// Writes an artifact record (one Automerge change).
pub fn put(doc: &mut Automerge, signer: &Signer, a: &Artifact) -> Result<(), automerge::AutomergeError> {
    let rec = signer.sign(RecordKind::Artifact, a);
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        automerge::transaction::Transactable::put(tx, ROOT, a.key(), rec)?;
        Ok(())
    })
    .map_err(|f| f.error)?;
    Ok(())
}

/// Every artifact record of the session, verified: written by the agent that `target_of` its
/// request names, for this session. The rest is quarantined.
pub(crate) fn read(
    doc: &impl ReadDoc,
    session: Id128,
    target_of: impl Fn(&Id128) -> Option<NodeId>,
    q: &mut Vec<Quarantined>,
) -> Vec<ArtifactView> {
    let mut out = Vec::new();
    for (key, bytes) in am::prefixed_byte_entries(doc, &ROOT, PREFIX) {
        let checked = verify_kind(&bytes, RecordKind::Artifact).map_err(|e| e.to_string()).and_then(|v| {
            let a: Artifact = v.json().map_err(|e| e.to_string())?;
            if a.key() != key || a.session != session {
                return Err("artifact stored under another key or for another session".to_string());
            }
            if target_of(&a.request) != Some(v.author) {
                return Err("artifact not written by the machine that ran its command".to_string());
            }
            Ok(ArtifactView { artifact: a, machine: v.author })
        });
        match checked {
            Ok(a) => out.push(a),
            Err(why) => q.push(Quarantined { place: key, author: None, why }),
        }
    }
    out.sort_by_key(|a| (a.artifact.request, a.artifact.index));
    out
}

/// The stored bytes of an artifact record.
pub fn raw_record(doc: &impl ReadDoc, a: &Artifact) -> Option<Vec<u8>> {
    am::bytes_at(doc, &ROOT, &a.key())
}

/// The chunk hashes of artifact records not scanned yet (`seen` remembers the scanned keys).
/// Signatures are not checked: this only says which bytes to fetch; readers verify.
pub(crate) fn scan_pieces(doc: &impl ReadDoc, seen: &mut std::collections::BTreeMap<String, usize>) -> Vec<ChunkHash> {
    let mut hashes = Vec::new();
    for (key, bytes) in am::prefixed_byte_entries(doc, &ROOT, PREFIX) {
        if seen.contains_key(&key) {
            continue;
        }
        seen.insert(key, 1);
        let Some(body) = crate::record::unverified_body(&bytes, RecordKind::Artifact) else { continue };
        if let Ok(Artifact { outcome: Outcome::Collected { pieces, .. }, .. }) = serde_json::from_slice(body) {
            hashes.extend(pieces.iter().map(|p| p.hash));
        }
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_plain() {
        assert!(check_path("/var/crash/app.dmp").is_ok());
        assert!(check_path("C:\\dumps\\app.dmp").is_ok());
        for bad in ["relative/x", "/var/../etc/shadow", "/var/./x", "/tmp/a\nb", ""] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}
