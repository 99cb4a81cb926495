//! Frames on a sync stream: `len u32 BE | tag u8 | payload`.
//!
//! The stream starts with the dialer's `Hello`; after that both sides send `Sync` frames
//! carrying one Automerge sync message for one document, and `Want`/`Chunk`/`Lacking` frames
//! that move the output bytes a session references (they are not in the document). Lengths are
//! checked before anything is allocated, so a hostile peer can't make us buffer more than
//! `MAX_FRAME`.

use caisey_doc::id::Id128;
use caisey_doc::session::ChunkHash;

/// The versioned protocol id for document sync.
pub const SYNC_ALPN: &[u8] = b"caisey/sync/1";
/// The protocol id for enrollment and relay adoption (the only one non-members may speak).
pub const ENROLL_ALPN: &[u8] = b"caisey/enroll/1";
/// The protocol id for publishing transcripts to a relay.
pub const PUBLISH_ALPN: &[u8] = b"caisey/publish/1";
/// Protocols besides sync that an endpoint accepts (served when a handler is set).
pub const EXTRA_ALPNS: &[&[u8]] = &[ENROLL_ALPN, PUBLISH_ALPN];
/// Largest frame we accept or send. A sync message can carry a whole document when a peer is far
/// behind, so this also bounds the largest document that can be synced in one step.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Most chunk hashes one `Want` or `Lacking` frame may name (a sender splits longer lists).
pub const MAX_HASHES: usize = 4096;
const PROTOCOL_VERSION: u16 = 2;

/// Which schema a document follows; travels with every sync message so a receiver knows what it
/// is being offered before it holds any of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DocKind {
    Fleet,
    Session,
    /// One agent's card and heartbeat (`caisey_doc::machine`).
    Machine,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
    },
    Sync {
        doc: Id128,
        kind: DocKind,
        message: Vec<u8>,
    },
    /// Sent once on connect, before any offer: every document the sender will offer. Lets the
    /// receiver tell "in sync" from "has not heard of everything yet".
    Index {
        docs: Vec<(Id128, DocKind)>,
    },
    /// "Send me these output chunks of session `doc`." Always answered, chunk by chunk or with
    /// `Lacking`.
    Want {
        doc: Id128,
        hashes: Vec<ChunkHash>,
    },
    /// The bytes of one output chunk; the receiver checks them against the hash it referenced.
    Chunk {
        doc: Id128,
        data: Vec<u8>,
    },
    /// "I do not hold these yet": they follow as `Chunk`s when they reach the sender.
    Lacking {
        doc: Id128,
        hashes: Vec<ChunkHash>,
    },
    /// An agent's signed heartbeat (a `Presence` record). Not part of any document: only the
    /// newest per agent is kept, so a heartbeat every few seconds never grows history.
    Presence {
        record: Vec<u8>,
    },
}

fn kind_byte(kind: DocKind) -> u8 {
    match kind {
        DocKind::Fleet => 1,
        DocKind::Session => 2,
        DocKind::Machine => 3,
    }
}

fn kind_of(b: u8) -> Result<DocKind, FrameError> {
    match b {
        1 => Ok(DocKind::Fleet),
        2 => Ok(DocKind::Session),
        3 => Ok(DocKind::Machine),
        _ => Err(FrameError::Malformed("unknown document kind")),
    }
}

/// Why bytes from a peer are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("peer speaks protocol version {0}, we speak {PROTOCOL_VERSION}")]
    Version(u16),
}

impl Frame {
    pub fn hello() -> Self {
        Frame::Hello { version: PROTOCOL_VERSION }
    }

    /// The whole frame including its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Frame::Hello { version } => {
                body.push(1);
                body.extend_from_slice(&version.to_be_bytes());
            }
            Frame::Sync { doc, kind, message } => {
                body.push(2);
                body.extend_from_slice(&doc.0);
                body.push(kind_byte(*kind));
                body.extend_from_slice(message);
            }
            Frame::Index { docs } => {
                body.push(3);
                for (doc, kind) in docs {
                    body.extend_from_slice(&doc.0);
                    body.push(kind_byte(*kind));
                }
            }
            Frame::Want { doc, hashes } | Frame::Lacking { doc, hashes } => {
                body.push(if matches!(self, Frame::Want { .. }) { 4 } else { 6 });
                body.extend_from_slice(&doc.0);
                hashes.iter().for_each(|h| body.extend_from_slice(h));
            }
            Frame::Chunk { doc, data } => {
                body.push(5);
                body.extend_from_slice(&doc.0);
                body.extend_from_slice(data);
            }
            Frame::Presence { record } => {
                body.push(7);
                body.extend_from_slice(record);
            }
        }
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Validates a length prefix before the body is read.
    pub fn check_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Malformed("empty frame"));
        }
        Ok(len)
    }

    /// Decodes a frame body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        match body.first() {
            Some(1) => {
                let v = body.get(1..3).ok_or(FrameError::Malformed("short hello"))?;
                let version = u16::from_be_bytes([v[0], v[1]]);
                if version != PROTOCOL_VERSION {
                    return Err(FrameError::Version(version));
                }
                Ok(Frame::Hello { version })
            }
            Some(2) => {
                if body.len() < 18 {
                    return Err(FrameError::Malformed("short sync frame"));
                }
                let mut doc = [0u8; 16];
                doc.copy_from_slice(&body[1..17]);
                let kind = kind_of(body[17])?;
                Ok(Frame::Sync { doc: Id128(doc), kind, message: body[18..].to_vec() })
            }
            Some(3) => {
                let entries = &body[1..];
                if !entries.len().is_multiple_of(17) {
                    return Err(FrameError::Malformed("index entries must be 17 bytes each"));
                }
                let docs = entries
                    .chunks_exact(17)
                    .map(|e| {
                        let mut doc = [0u8; 16];
                        doc.copy_from_slice(&e[..16]);
                        Ok((Id128(doc), kind_of(e[16])?))
                    })
                    .collect::<Result<_, FrameError>>()?;
                Ok(Frame::Index { docs })
            }
            Some(tag @ (4 | 6)) => {
                let doc = doc_at(body)?;
                let entries = &body[17..];
                if !entries.len().is_multiple_of(32) || entries.len() / 32 > MAX_HASHES {
                    return Err(FrameError::Malformed("chunk hash list of the wrong length"));
                }
                let hashes = entries.chunks_exact(32).map(|h| h.try_into().unwrap_or([0; 32])).collect();
                Ok(if *tag == 4 { Frame::Want { doc, hashes } } else { Frame::Lacking { doc, hashes } })
            }
            Some(5) => Ok(Frame::Chunk { doc: doc_at(body)?, data: body[17..].to_vec() }),
            Some(7) => Ok(Frame::Presence { record: body[1..].to_vec() }),
            _ => Err(FrameError::Malformed("unknown frame tag")),
        }
    }
}

/// The document id after a frame's tag.
fn doc_at(body: &[u8]) -> Result<Id128, FrameError> {
    let id = body.get(1..17).ok_or(FrameError::Malformed("frame too short for a document id"))?;
    let mut doc = [0u8; 16];
    doc.copy_from_slice(id);
    Ok(Id128(doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::hello(),
            Frame::Sync { doc: Id128([3; 16]), kind: DocKind::Session, message: vec![1, 2, 3] },
            Frame::Index { docs: vec![(Id128([1; 16]), DocKind::Fleet), (Id128([2; 16]), DocKind::Session)] },
            Frame::Index { docs: vec![] },
            Frame::Want { doc: Id128([4; 16]), hashes: vec![[1; 32], [2; 32]] },
            Frame::Lacking { doc: Id128([4; 16]), hashes: vec![[3; 32]] },
            Frame::Chunk { doc: Id128([5; 16]), data: b"df output".to_vec() },
            Frame::Chunk { doc: Id128([5; 16]), data: vec![] },
            Frame::Presence { record: b"CR..".to_vec() },
        ] {
            let bytes = f.encode();
            let len = Frame::check_len([bytes[0], bytes[1], bytes[2], bytes[3]]).unwrap();
            assert_eq!(Frame::decode(&bytes[4..4 + len]).unwrap(), f);
        }
    }

    #[test]
    fn hostile_frames_are_refused_before_allocation() {
        assert_eq!(Frame::check_len(u32::MAX.to_be_bytes()), Err(FrameError::TooLarge(u32::MAX as usize)));
        assert!(Frame::decode(&[9]).is_err());
        assert!(Frame::decode(&[2, 0]).is_err());
        assert!(Frame::decode(&[3, 0, 0]).is_err());
        assert!(Frame::decode(&[4, 0, 0]).is_err());
        assert!(Frame::decode(&[[4u8].as_slice(), &[0; 16], &[0; 31]].concat()).is_err());
        let too_many = [[4u8].as_slice(), &[0; 16], &vec![0; 32 * (MAX_HASHES + 1)]].concat();
        assert!(Frame::decode(&too_many).is_err());
        assert_eq!(Frame::decode(&[1, 0, 9]), Err(FrameError::Version(9)));
    }
}
