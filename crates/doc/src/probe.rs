//! Probe values: named numbers a run yields, for plotting a check week over week.
//!
//! A value comes from a line the script prints, `caisey-probe NAME=VALUE [UNIT]`, or from a
//! pattern sent with the schedule ([`crate::schedule::ProbePattern`]). The agent scans the
//! run's standard output as it streams ([`ProbeScanner`]: bounded lines, bounded values, no
//! copy of the output kept) and writes what it found in the run's signed end record.

use serde::{Deserialize, Serialize};

use crate::schedule::ProbePattern;

/// The most distinct probe names one run yields.
pub const MAX_VALUES: usize = 64;
/// Lines longer than this are not scanned (their start is; the rest is skipped).
pub const MAX_LINE: usize = 4096;
/// The longest probe name.
pub const MAX_NAME: usize = 64;
/// The longest unit.
pub const MAX_UNIT: usize = 16;

const PROBE_LINE: &str = "caisey-probe ";

/// One value a run yielded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeValue {
    pub name: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// A probe name: letters, digits, `_`, `-` and `.`, at most [`MAX_NAME`] of them.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok { Ok(()) } else { Err(format!("probe name {name:?}: use 1 to {MAX_NAME} letters, digits, '_', '-' or '.'")) }
}

/// Picks probe values out of a run's standard output as it arrives.
#[derive(Debug)]
pub struct ProbeScanner {
    patterns: Vec<(String, regex::Regex)>,
    line: Vec<u8>,
    /// The current line is longer than [`MAX_LINE`]: skip to its end.
    skipping: bool,
    values: Vec<ProbeValue>,
}

impl ProbeScanner {
    /// A scanner for `caisey-probe` lines and `patterns` (any that do not compile are left out:
    /// they were checked when the schedule was read).
    pub fn new(patterns: &[ProbePattern]) -> Self {
        let patterns = patterns.iter().filter_map(|p| Some((p.name.clone(), p.compile().ok()?))).collect();
        ProbeScanner { patterns, line: Vec::new(), skipping: false, values: Vec::new() }
    }

    /// More standard output.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (part, rest, ends) = match data.iter().position(|b| *b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            if !self.skipping {
                if self.line.len() + part.len() > MAX_LINE {
                    self.skipping = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if ends {
                self.end_line();
            }
            data = rest;
        }
    }

    /// The values found, by name (a name given twice keeps its last value).
    pub fn finish(mut self) -> Vec<ProbeValue> {
        self.end_line();
        self.values.sort_by(|a, b| a.name.cmp(&b.name));
        self.values
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        self.skipping = false;
        let Ok(text) = std::str::from_utf8(&line) else { return };
        let text = text.trim_end_matches('\r');
        if let Some(v) = parse_probe_line(text) {
            self.put(v);
        }
        let found: Vec<ProbeValue> = self
            .patterns
            .iter()
            .filter_map(|(name, re)| {
                let value = re.captures(text)?.get(1)?.as_str().trim().parse::<f64>().ok()?;
                value.is_finite().then(|| ProbeValue { name: name.clone(), value, unit: None })
            })
            .collect();
        for v in found {
            self.put(v);
        }
    }

    fn put(&mut self, v: ProbeValue) {
        if let Some(old) = self.values.iter_mut().find(|old| old.name == v.name) {
            *old = v;
        } else if self.values.len() < MAX_VALUES {
            self.values.push(v);
        }
    }
}

/// Reads `caisey-probe NAME=VALUE [UNIT]`.
fn parse_probe_line(line: &str) -> Option<ProbeValue> {
    let rest = line.trim_start().strip_prefix(PROBE_LINE)?;
    let mut words = rest.split_whitespace();
    let (name, value) = words.next()?.split_once('=')?;
    check_name(name).ok()?;
    let value = value.parse::<f64>().ok().filter(|v| v.is_finite())?;
    let unit = match (words.next(), words.next()) {
        (None, _) => None,
        (Some(u), None) if u.len() <= MAX_UNIT && u.bytes().all(|b| b.is_ascii_graphic()) => Some(u.to_string()),
        _ => return None,
    };
    Some(ProbeValue { name: name.to_string(), value, unit })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(patterns: &[ProbePattern], pieces: &[&[u8]]) -> Vec<ProbeValue> {
        let mut s = ProbeScanner::new(patterns);
        for p in pieces {
            s.feed(p);
        }
        s.finish()
    }

    #[test]
    fn probe_lines_and_patterns_yield_values_across_pieces() {
        let pattern = ProbePattern::parse("private_mb=private_mb=([0-9.]+)").unwrap();
        let got = scan(
            &[pattern],
            &[b"noise\ncaisey-probe han", b"dles=1200 count\r\nprivate_mb=20", b"4.5\ncaisey-probe bad=NaN\n"],
        );
        assert_eq!(
            got,
            vec![
                ProbeValue { name: "handles".into(), value: 1200.0, unit: Some("count".into()) },
                ProbeValue { name: "private_mb".into(), value: 204.5, unit: None },
            ]
        );
    }

    #[test]
    fn hostile_output_is_bounded() {
        let long = vec![b'x'; MAX_LINE * 3];
        let mut many = String::new();
        for i in 0..(MAX_VALUES + 10) {
            many.push_str(&format!("caisey-probe p{i}=1\n"));
        }
        let got = scan(&[], &[&long, b"\ncaisey-probe a=1 b c\ncaisey-probe ../x=1\n", many.as_bytes()]);
        assert_eq!(got.len(), MAX_VALUES);
        assert!(got.iter().all(|v| v.name.starts_with('p')));
    }

    #[test]
    fn bad_patterns_are_refused_with_why() {
        assert!(ProbePattern::parse("x").unwrap_err().contains("NAME=PATTERN"));
        assert!(ProbePattern::parse("x=[0-9]+").unwrap_err().contains("group"));
        assert!(ProbePattern::parse("x=(").is_err());
        assert!(ProbePattern::parse("bad name=(1)").unwrap_err().contains("probe name"));
    }
}
