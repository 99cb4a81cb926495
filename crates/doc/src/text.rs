//! Making hostile text visible instead of letting it act (terminal, consent window, HTML): a command or description from a
//! technician's node is shown with control characters, escape sequences and bidi overrides
//! spelled out, so it cannot move the cursor, recolour the terminal or reorder what is read.
//!
//! Text that peers write into documents (names, labels, descriptions, notes, a machine's card)
//! is held as [`PeerText`]: its only `Display` is the escaped one, so printing it raw takes a
//! deliberate call to [`PeerText::as_unescaped_str`], which a reviewer can grep for.

use std::fmt::{self, Write};

use serde::{Deserialize, Serialize};

/// Whether `c` is shown spelled out: a control character (but tab and newline) or a bidi control.
pub fn needs_escape(c: char) -> bool {
    let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{061c}');
    (c.is_control() && c != '\n' && c != '\t') || bidi
}

/// `text` with every control or bidi-control character shown as `\u{..}` (tabs and newlines
/// kept).
pub fn visible(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    write_visible(&mut out, text, false).unwrap_or_default();
    out
}

/// Like [`visible`], for one line (names, labels, paths): newlines spelled out too.
pub fn visible_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    write_visible(&mut out, text, true).unwrap_or_default();
    out
}

fn write_visible(out: &mut impl Write, text: &str, one_line: bool) -> fmt::Result {
    for c in text.chars() {
        if c == '\n' && one_line {
            out.write_str("\\n")?;
        } else if needs_escape(c) {
            write!(out, "\\u{{{:x}}}", c as u32)?;
        } else {
            out.write_char(c)?;
        }
    }
    Ok(())
}

/// Text that came from a peer: a member's or machine's name, a session's name or labels, a
/// command's description, a note, what a machine's card says about it.
///
/// Stored and sent exactly as a plain string (`serde(transparent)`). Shown, it is escaped:
/// `{}` keeps it on one line (like [`visible_line`]), `{:#}` keeps its newlines and tabs (like
/// [`visible`]), for text of several lines such as a description or a note. Width, fill and
/// alignment apply to the escaped form, so it lines up in listings.
///
/// There is no `Deref<Target = str>` and no `AsRef<str>`: comparing, searching, measuring or
/// signing it goes through [`PeerText::as_unescaped_str`], named so that a raw print stands out.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerText(String);

impl PeerText {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The text exactly as the peer wrote it, control characters and all: for comparing,
    /// searching, hashing, measuring and signing — not for showing.
    pub fn as_unescaped_str(&self) -> &str {
        &self.0
    }

    /// The text exactly as the peer wrote it (see [`PeerText::as_unescaped_str`]).
    pub fn into_unescaped_string(self) -> String {
        self.0
    }

    /// The escaped form of several lines (newlines and tabs kept), as `{:#}` shows it.
    pub fn visible(&self) -> String {
        visible(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is `other`, ignoring ASCII case (how names are looked up).
    pub fn eq_ignore_ascii_case(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }

    /// Whether its lower-cased text contains `needle_lowercase` (searches).
    pub fn contains_lowercase(&self, needle_lowercase: &str) -> bool {
        self.0.to_lowercase().contains(needle_lowercase)
    }

    /// The same text without leading and trailing whitespace.
    pub fn trimmed(&self) -> PeerText {
        PeerText(self.0.trim().to_string())
    }
}

impl fmt::Display for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one_line = !f.alternate();
        if f.width().is_none() && f.precision().is_none() {
            return write_visible(f, &self.0, one_line);
        }
        let mut shown = String::with_capacity(self.0.len());
        write_visible(&mut shown, &self.0, one_line)?;
        f.pad(&shown)
    }
}

/// Quoted, with Rust's string escapes (every control, bidi and invisible character spelled out).
impl fmt::Debug for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl From<String> for PeerText {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl From<&str> for PeerText {
    fn from(text: &str) -> Self {
        Self(text.to_string())
    }
}

impl From<&String> for PeerText {
    fn from(text: &String) -> Self {
        Self(text.clone())
    }
}

impl PartialEq<str> for PeerText {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for PeerText {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for PeerText {
    fn eq(&self, other: &String) -> bool {
        self.0 == *other
    }
}

/// Joins peer texts for one line of a listing ("ws-01, ws-02"), each escaped.
pub fn join(texts: &[PeerText], separator: &str) -> String {
    let mut out = String::new();
    for (i, t) in texts.iter().enumerate() {
        if i > 0 {
            out.push_str(separator);
        }
        let _ = write!(out, "{t}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::PeerText;

    #[test]
    fn escapes_and_bidi_overrides_are_spelled_out() {
        assert_eq!(super::visible("rm\u{1b}[2J -rf\u{202e}x\n"), "rm\\u{1b}[2J -rf\\u{202e}x\n");
        assert_eq!(super::visible_line("a\nb\u{7}"), "a\\nb\\u{7}");
    }

    #[test]
    fn peer_text_shows_escaped_and_travels_as_a_plain_string() {
        let hostile = "ws\u{1b}[2J\u{1b}]0;pwned\u{7}\u{202e}10-sw\ncaisey: approved\tok";
        let t = PeerText::from(hostile);
        let line = t.to_string();
        assert_eq!(line, "ws\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\u{202e}10-sw\\ncaisey: approved\tok");
        assert!(!line.contains(['\u{1b}', '\u{7}', '\u{202e}', '\n']));
        let lines = format!("{t:#}");
        assert_eq!(lines, "ws\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\u{202e}10-sw\ncaisey: approved\tok");
        assert_eq!(format!("[{:<6}]", PeerText::from("a\u{1b}")), "[a\\u{1b}]");
        assert_eq!(format!("[{:<8}]", PeerText::from("a\nb")), "[a\\nb    ]");
        let debug = format!("{t:?}");
        assert!(!debug.contains(['\u{1b}', '\u{7}', '\u{202e}', '\n']), "{debug}");
        assert_eq!(super::join(&["a\n".into(), "b\u{202e}".into()], ", "), "a\\n, b\\u{202e}");

        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, serde_json::to_string(hostile).unwrap());
        assert_eq!(serde_json::from_str::<PeerText>(&json).unwrap(), t);
        assert_eq!(t.as_unescaped_str(), hostile);
        assert!(PeerText::from("WS-01").eq_ignore_ascii_case("ws-01"));
    }
}
