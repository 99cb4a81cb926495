//! Identifiers shared by every document: node ids (ed25519 public keys) and random 128-bit ids
//! for documents and records. Kept here so every crate prints and parses them the same way.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's identity: its ed25519 public key (the same key iroh authenticates connections with).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct NodeId(pub [u8; 32]);

/// A random 128-bit id: documents, command requests, invites.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Id128(pub [u8; 16]);

/// The id of a synced document.
pub type DocId = Id128;

/// Why a string is not an id.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseIdError {
    #[error("expected {expected} hex characters, got {got}")]
    Length { expected: usize, got: usize },
    #[error("not hexadecimal")]
    Hex(#[source] hex::FromHexError),
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ParseIdError> {
    if s.len() != N * 2 {
        return Err(ParseIdError::Length { expected: N * 2, got: s.len() });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(ParseIdError::Hex)?;
    Ok(out)
}

macro_rules! hex_id {
    ($ty:ident, $n:expr) => {
        impl $ty {
            /// The first eight hex characters: enough to tell ids apart in logs and listings.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($ty), self.short())
            }
        }
        impl FromStr for $ty {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex::<$n>(s).map($ty)
            }
        }
        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.to_hex()
            }
        }
        impl TryFrom<String> for $ty {
            type Error = ParseIdError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }
    };
}

hex_id!(NodeId, 32);
hex_id!(Id128, 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex_and_reject_bad_input() {
        let id = Id128([7; 16]);
        assert_eq!(id.to_string().parse::<Id128>().unwrap(), id);
        assert!("abc".parse::<Id128>().is_err());
        assert!("zz".repeat(16).parse::<Id128>().is_err());
        let node = NodeId([9; 32]);
        let json = serde_json::to_string(&node).unwrap();
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), node);
    }
}
