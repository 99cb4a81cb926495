//! The strings people paste: one-time invite tokens and relay tickets.
//!
//! An invite token carries a signed `InviteCert` and the invite's secret key. Every byte is
//! covered: the certificate by its signature, the secret by having to match the certificate's
//! public key. So a flipped character yields "corrupted", not a silently different token.

use data_encoding::BASE32_NOPAD;

use crate::fleet::{Contact, InviteCert};
use crate::id::NodeId;
use crate::record::{RecordKind, Signer, verify_kind};

const INVITE_PREFIX: &str = "caisey-invite-";
const RELAY_PREFIX: &str = "caisey-relay-";

/// Why a token or ticket was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    #[error("this is not a caisey {0} (it should start with {1:?})")]
    WrongPrefix(&'static str, &'static str),
    #[error("the {0} is damaged or incomplete; copy it again from where it was issued")]
    Corrupted(&'static str),
    #[error("this invite expired {ago_secs} seconds ago; ask for a new one")]
    Expired { ago_secs: u64 },
}

/// A one-time enrollment token.
#[derive(Debug, Clone)]
pub struct InviteToken {
    pub cert_record: Vec<u8>,
    pub cert: InviteCert,
    pub secret: Signer,
}

impl InviteToken {
    /// Issues a token: `authority` is the org key or a technician's key.
    pub fn issue(authority: &Signer, cert: InviteCert, secret: Signer) -> Self {
        let cert_record = authority.sign(RecordKind::InviteCert, &cert);
        Self { cert_record, cert, secret }
    }

    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(4 + self.cert_record.len() + 32);
        raw.extend_from_slice(&(self.cert_record.len() as u32).to_be_bytes());
        raw.extend_from_slice(&self.cert_record);
        raw.extend_from_slice(&self.secret.secret());
        format!("{INVITE_PREFIX}{}", BASE32_NOPAD.encode(&raw).to_ascii_lowercase())
    }

    /// Decodes and checks a token's integrity and expiry (`now` in ms since the epoch). Whether it
    /// was already used is only known to the org, at enrollment.
    pub fn decode(s: &str, now: u64) -> Result<Self, TokenError> {
        const WHAT: &str = "invite token";
        let body = s.trim().strip_prefix(INVITE_PREFIX).ok_or(TokenError::WrongPrefix(WHAT, INVITE_PREFIX))?;
        let raw = BASE32_NOPAD.decode(body.to_ascii_uppercase().as_bytes()).map_err(|_| TokenError::Corrupted(WHAT))?;
        let len = raw
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or(TokenError::Corrupted(WHAT))?;
        if raw.len() != 4 + len + 32 {
            return Err(TokenError::Corrupted(WHAT));
        }
        let cert_record = raw[4..4 + len].to_vec();
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&raw[4 + len..]);
        let v = verify_kind(&cert_record, RecordKind::InviteCert).map_err(|_| TokenError::Corrupted(WHAT))?;
        let cert: InviteCert = v.json().map_err(|_| TokenError::Corrupted(WHAT))?;
        let secret = Signer::from_secret(secret);
        if secret.node_id() != cert.invite_key {
            return Err(TokenError::Corrupted(WHAT));
        }
        if now > cert.expires_at {
            return Err(TokenError::Expired { ago_secs: (now - cert.expires_at) / 1000 });
        }
        Ok(Self { cert_record, cert, secret })
    }
}

/// How to reach a relay: its node id and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTicket(pub Contact);

impl RelayTicket {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(&self.0).unwrap_or_default();
        format!("{RELAY_PREFIX}{}", BASE32_NOPAD.encode(&json).to_ascii_lowercase())
    }

    pub fn decode(s: &str) -> Result<Self, TokenError> {
        const WHAT: &str = "relay ticket";
        let body = s.trim().strip_prefix(RELAY_PREFIX).ok_or(TokenError::WrongPrefix(WHAT, RELAY_PREFIX))?;
        let raw = BASE32_NOPAD.decode(body.to_ascii_uppercase().as_bytes()).map_err(|_| TokenError::Corrupted(WHAT))?;
        let contact: Contact = serde_json::from_slice(&raw).map_err(|_| TokenError::Corrupted(WHAT))?;
        Ok(Self(contact))
    }

    pub fn node(&self) -> NodeId {
        self.0.node
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Role;
    use crate::id::Id128;

    fn token(expires_at: u64) -> InviteToken {
        let org = Signer::from_secret([1; 32]);
        let secret = Signer::from_secret([2; 32]);
        let cert = InviteCert {
            invite_id: Id128([3; 16]),
            invite_key: secret.node_id(),
            org_key: org.node_id(),
            fleet_doc: Id128([4; 16]),
            role: Role::Agent,
            name: None,
            groups: vec![],
            approves: vec![],
            expires_at,
            uses: 1,
            contacts: vec![Contact { node: NodeId([5; 32]), addrs: vec!["127.0.0.1:4000".into()] }],
        };
        InviteToken::issue(&org, cert, secret)
    }

    #[test]
    fn a_token_round_trips_until_it_expires() {
        let t = token(1_000_000);
        let s = t.encode();
        assert_eq!(InviteToken::decode(&s, 10).unwrap().cert, t.cert);
        assert_eq!(InviteToken::decode(&s, 1_060_000).unwrap_err(), TokenError::Expired { ago_secs: 60 });
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let s = token(1_000_000).encode();
        for i in INVITE_PREFIX.len()..s.len() {
            let mut chars: Vec<char> = s.chars().collect();
            chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
            let bad: String = chars.into_iter().collect();
            assert!(InviteToken::decode(&bad, 10).is_err(), "change at {i} accepted");
        }
        assert!(matches!(InviteToken::decode("hello", 10), Err(TokenError::WrongPrefix(..))));
    }

    #[test]
    fn relay_tickets_round_trip() {
        let t = RelayTicket(Contact { node: NodeId([5; 32]), addrs: vec!["127.0.0.1:4000".into()] });
        assert_eq!(RelayTicket::decode(&t.encode()).unwrap(), t);
        assert!(RelayTicket::decode("caisey-relay-zzzz1").is_err());
    }
}
