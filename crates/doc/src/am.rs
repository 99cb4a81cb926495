//! Small helpers over Automerge's read and write API, so the schemas read as what they store
//! rather than as object-id plumbing.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ROOT, ReadDoc, ScalarValueRef, ValueRef};

/// The map object at `ROOT[key]`, if present.
pub(crate) fn root_map(doc: &impl ReadDoc, key: &str) -> Option<ObjId> {
    match doc.get(ROOT, key).ok()?? {
        (automerge::Value::Object(ObjType::Map), id) => Some(id),
        _ => None,
    }
}

/// The object id at `obj[key]`, if it is an object of type `ty`.
pub(crate) fn child(doc: &impl ReadDoc, obj: &ObjId, key: &str, ty: ObjType) -> Option<ObjId> {
    match doc.get(obj, key).ok()?? {
        (automerge::Value::Object(t), id) if t == ty => Some(id),
        _ => None,
    }
}

/// The bytes at `obj[key]`, if it holds bytes.
pub(crate) fn bytes_at(doc: &impl ReadDoc, obj: &ObjId, key: &str) -> Option<Vec<u8>> {
    let (value, _) = doc.get(obj, key).ok()??;
    value.as_bytes().map(<[u8]>::to_vec)
}

/// Every `(key, bytes)` entry of a map, skipping non-byte values (a peer may write anything; the
/// caller verifies what it finds).
pub(crate) fn byte_entries(doc: &impl ReadDoc, obj: &ObjId) -> Vec<(String, Vec<u8>)> {
    doc.map_range(obj, ..)
        .filter_map(|item| match item.value {
            ValueRef::Scalar(ScalarValueRef::Bytes(b)) => Some((item.key.into_owned(), b.into_owned())),
            _ => None,
        })
        .collect()
}

/// Like [`byte_entries`], only the keys that start with `prefix` (a range read: the map's
/// other keys are not visited).
pub(crate) fn prefixed_byte_entries(doc: &impl ReadDoc, obj: &ObjId, prefix: &str) -> Vec<(String, Vec<u8>)> {
    // Every key starting with `prefix` sorts at or after it and before `prefix` + U+10FFFF.
    let end = format!("{prefix}\u{10FFFF}");
    doc.map_range(obj, prefix.to_string()..end)
        .filter_map(|item| match item.value {
            ValueRef::Scalar(ScalarValueRef::Bytes(b)) => Some((item.key.into_owned(), b.into_owned())),
            _ => None,
        })
        .collect()
}

/// The values of a list from `start`, in order, one per item so positions stay exact: a
/// non-byte value (a peer may write anything) reads as empty bytes, which no record verifies as.
pub(crate) fn list_bytes(doc: &impl ReadDoc, list: &ObjId, start: usize) -> Vec<Vec<u8>> {
    doc.list_range(list, start..)
        .map(|item| match item.value {
            ValueRef::Scalar(ScalarValueRef::Bytes(b)) => b.into_owned(),
            _ => Vec::new(),
        })
        .collect()
}

/// Every `(key, list)` entry of a map whose value is a list.
pub(crate) fn child_lists(doc: &impl ReadDoc, obj: &ObjId) -> Vec<(String, ObjId)> {
    doc.map_range(obj, ..)
        .filter(|item| matches!(item.value, ValueRef::Object(ObjType::List)))
        .map(|item| (item.key.to_string(), item.id()))
        .collect()
}

/// Gets or creates the map at `ROOT[key]` inside a transaction.
pub(crate) fn ensure_root_map(tx: &mut impl Transactable, key: &str) -> Result<ObjId, automerge::AutomergeError> {
    if let Some(id) = root_map(tx, key) {
        return Ok(id);
    }
    tx.put_object(ROOT, key, ObjType::Map)
}
