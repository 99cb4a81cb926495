//! A group run shared as one transcript: the transcript of each machine's session, as
//! [`super::build`] makes it (each checkable on its own), gathered under the run's name and the
//! publisher's summary and signed once more as a whole. A stakeholder gets one link.

use serde::{Deserialize, Serialize};

use super::{Checked, TranscriptFile, VerifyError, canonical, html, verify_json};
use crate::id::{Id128, NodeId};
use crate::record::{Signer, verify_detached};
use crate::text::PeerText;

pub const GROUP_FORMAT: &str = "caisey-group-transcript/1";
const GROUP_DOMAIN: &[u8] = b"caisey/group-transcript/v1\0";

/// The published file of a group run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFile {
    pub group: GroupTranscript,
    pub publisher: NodeId,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupTranscript {
    pub format: String,
    pub run: Id128,
    pub name: PeerText,
    pub published_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// One machine's session each, in the order shown.
    pub parts: Vec<TranscriptFile>,
}

/// A verified group transcript.
#[derive(Debug, Clone, Serialize)]
pub struct CheckedGroup {
    pub run: Id128,
    pub name: PeerText,
    pub published_at: u64,
    pub summary: Option<String>,
    pub publisher: PeerText,
    pub publisher_key: NodeId,
    pub org_name: String,
    pub org_key: NodeId,
    pub parts: Vec<Checked>,
}

impl GroupFile {
    /// Gathers `parts` (each signed by `publisher`) into one signed file.
    pub fn sign(
        run: Id128,
        name: PeerText,
        summary: Option<String>,
        parts: Vec<TranscriptFile>,
        publisher: &Signer,
        now: u64,
    ) -> Self {
        let group = GroupTranscript { format: GROUP_FORMAT.into(), run, name, published_at: now, summary, parts };
        let signature = hex::encode(publisher.sign_detached(GROUP_DOMAIN, &canonical(&group)));
        Self { group, publisher: publisher.node_id(), signature }
    }

    /// The bytes of the `.json` file.
    pub fn to_json(&self) -> Vec<u8> {
        canonical(self)
    }
}

/// Verifies a group file's JSON: canonical, signed by its publisher, and every part genuine,
/// published by the same technician of the same org.
pub fn verify_group_json(bytes: &[u8]) -> Result<(GroupFile, CheckedGroup), VerifyError> {
    let file: GroupFile = serde_json::from_slice(bytes).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if canonical(&file) != bytes.strip_suffix(b"\n").unwrap_or(bytes) {
        return Err(VerifyError::NotCanonical);
    }
    let g = &file.group;
    if g.format != GROUP_FORMAT {
        return Err(VerifyError::Malformed(format!("unknown format {:?}", g.format)));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&file.signature, &mut sig).map_err(|_| VerifyError::BadSignature)?;
    if !verify_detached(&file.publisher, GROUP_DOMAIN, &canonical(g), &sig) {
        return Err(VerifyError::BadSignature);
    }
    let first = g.parts.first().ok_or_else(|| VerifyError::Malformed("a group transcript of no machine".into()))?;
    let mut parts = Vec::with_capacity(g.parts.len());
    for part in &g.parts {
        let (_, checked) = verify_json(&part.to_json())?;
        if part.publisher != file.publisher || part.transcript.genesis != first.transcript.genesis {
            return Err(VerifyError::Chain("a part was published by someone else, or for another org".into()));
        }
        parts.push(checked);
    }
    let lead = &parts[0];
    let checked = CheckedGroup {
        run: g.run,
        name: g.name.clone(),
        published_at: g.published_at,
        summary: g.summary.clone(),
        publisher: lead.publisher.clone(),
        publisher_key: file.publisher,
        org_name: lead.org_name.clone(),
        org_key: lead.org_key,
        parts,
    };
    Ok((file, checked))
}

/// A published file of either kind, verified.
#[derive(Debug, Clone)]
pub enum Published {
    One(Box<(TranscriptFile, Checked)>),
    Group(Box<(GroupFile, CheckedGroup)>),
}

impl Published {
    /// Verifies a published file, JSON or HTML, of one session or of a group run.
    pub fn verify(bytes: &[u8]) -> Result<Self, VerifyError> {
        let page = bytes.starts_with(html::DOCTYPE.as_bytes());
        let json = if page {
            html::extract(bytes).ok_or_else(|| VerifyError::Malformed("no transcript data in the page".into()))?
        } else {
            String::from_utf8(bytes.to_vec()).map_err(|_| VerifyError::Malformed("not UTF-8".into()))?
        };
        let published = if json.starts_with("{\"group\":") {
            let (file, checked) = verify_group_json(json.as_bytes())?;
            Published::Group(Box::new((file, checked)))
        } else {
            let (file, checked) = verify_json(json.as_bytes())?;
            Published::One(Box::new((file, checked)))
        };
        if page && published.html().as_bytes() != bytes {
            return Err(VerifyError::PageModified);
        }
        Ok(published)
    }

    /// The page a reader opens.
    pub fn html(&self) -> String {
        match self {
            Published::One(p) => html::render(&p.0, &p.1),
            Published::Group(p) => html::render_group(&p.0, &p.1),
        }
    }

    pub fn org_key(&self) -> NodeId {
        match self {
            Published::One(p) => p.1.org_key,
            Published::Group(p) => p.1.org_key,
        }
    }

    pub fn publisher(&self) -> NodeId {
        match self {
            Published::One(p) => p.0.publisher,
            Published::Group(p) => p.0.publisher,
        }
    }
}
