//! Making hostile text visible instead of letting it act (terminal, consent window, HTML): a command or description from a
//! technician's node is shown with control characters, escape sequences and bidi overrides
//! spelled out, so it cannot move the cursor, recolour the terminal or reorder what is read.

/// Whether `c` is shown spelled out: a control character (but tab and newline) or a bidi control.
pub fn needs_escape(c: char) -> bool {
    let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{061c}');
    (c.is_control() && c != '\n' && c != '\t') || bidi
}

/// `text` with every control or bidi-control character shown as `\u{..}` (tabs and newlines
/// kept).
pub fn visible(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Like [`visible`], for one line (names, labels, paths): newlines spelled out too.
pub fn visible_line(text: &str) -> String {
    visible(text).replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_and_bidi_overrides_are_spelled_out() {
        assert_eq!(super::visible("rm\u{1b}[2J -rf\u{202e}x\n"), "rm\\u{1b}[2J -rf\\u{202e}x\n");
        assert_eq!(super::visible_line("a\nb\u{7}"), "a\\nb\\u{7}");
    }
}
