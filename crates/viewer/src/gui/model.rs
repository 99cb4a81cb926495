//! What the viewer shows, as plain data: the backend builds it from the node's documents, the UI
//! only draws it. Kept free of egui and tokio so it can be built and checked without either.
//!
//! Output is the one part that can be huge (megabytes streaming in). It travels as *new lines
//! only*: the backend splits bytes into display lines (escaped, long lines broken) off the UI
//! thread, and the UI appends them to an [`OutputBuf`], which draws only the rows in view.

use std::collections::BTreeMap;

use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{SessionView, Stream};
use caisey_doc::text::{PeerText, visible};

use crate::schedules::{ProbePoint, ScheduleSummary};
use crate::tech::{DiffLine, Machine, PastRun, SessionSummary, SyncStatus};

/// A display line longer than this is broken into several, so one enormous line (a minified
/// file, a progress bar without newlines) never costs more than a screenful to lay out.
pub const MAX_LINE_CHARS: usize = 1000;

/// One line of output as shown: escaped, so it can never act on the UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutLine {
    pub stream: Stream,
    pub text: String,
}

/// Everything but sessions' contents: refreshed whenever the fleet or the session list changes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub org: String,
    pub me: PeerText,
    /// This node's role: a designated approver gets approvals, not technician controls.
    pub role: Option<caisey_doc::fleet::Role>,
    /// Requests waiting for this node as a designated approver.
    pub awaiting: Vec<crate::tech::Awaiting>,
    /// Every group run here (without their outputs).
    pub group_runs: Vec<crate::tech::GroupRunView>,
    pub machines: Vec<Machine>,
    pub groups: Vec<String>,
    pub sessions: Vec<SessionSummary>,
    /// Every recurring check in this node's sessions (none for an approver).
    pub schedules: Vec<ScheduleSummary>,
    pub sync: SyncStatus,
}

/// Splits a command's output bytes into display lines, per stream, remembering unfinished lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: [Vec<u8>; 2],
}

fn slot(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn stream_of(slot: usize) -> Stream {
    if slot == 0 { Stream::Stdout } else { Stream::Stderr }
}

/// Lossily decodes and escapes `bytes`, broken into pieces of at most [`MAX_LINE_CHARS`].
fn display_lines(stream: Stream, bytes: &[u8], out: &mut Vec<OutLine>) {
    let text = visible(String::from_utf8_lossy(bytes).trim_end_matches('\r'));
    if text.chars().count() <= MAX_LINE_CHARS {
        out.push(OutLine { stream, text });
        return;
    }
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(MAX_LINE_CHARS) {
        out.push(OutLine { stream, text: piece.iter().collect() });
    }
}

impl LineSplitter {
    /// The complete lines `data` finishes.
    pub fn push(&mut self, stream: Stream, data: &[u8]) -> Vec<OutLine> {
        let buf = &mut self.partial[slot(stream)];
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|b| *b == b'\n') {
            display_lines(stream, &buf[start..start + pos], &mut out);
            start += pos + 1;
        }
        buf.drain(..start);
        // An unfinished line that is already long is shown in pieces rather than held back.
        while buf.len() >= MAX_LINE_CHARS * 4 {
            let piece: Vec<u8> = buf.drain(..MAX_LINE_CHARS).collect();
            display_lines(stream, &piece, &mut out);
        }
        out
    }

    /// The unfinished lines, as they stand.
    pub fn partial(&self) -> Vec<OutLine> {
        let mut out = Vec::new();
        for (i, buf) in self.partial.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            display_lines(stream_of(i), buf, &mut out);
        }
        out
    }
}

/// A command's output in the UI: the lines so far, the unfinished tail, and the byte count.
#[derive(Debug, Clone, Default)]
pub struct OutputBuf {
    pub lines: Vec<OutLine>,
    pub partial: Vec<OutLine>,
    pub bytes: u64,
}

impl OutputBuf {
    pub fn rows(&self) -> usize {
        self.lines.len() + self.partial.len()
    }

    pub fn row(&self, i: usize) -> Option<&OutLine> {
        self.lines.get(i).or_else(|| self.partial.get(i - self.lines.len()))
    }

    /// All of it as text (for the clipboard).
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(self.bytes as usize);
        for l in self.lines.iter().chain(&self.partial) {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// The last `n` rows (a group run's preview).
    pub fn tail(&self, n: usize) -> impl Iterator<Item = &OutLine> {
        let rows = self.rows();
        (rows.saturating_sub(n)..rows).filter_map(|i| self.row(i))
    }
}

/// New output of one command, as the backend sends it.
#[derive(Debug, Clone)]
pub struct OutputAppend {
    pub request: Id128,
    pub lines: Vec<OutLine>,
    pub partial: Vec<OutLine>,
    pub bytes: u64,
}

impl OutputBuf {
    pub fn apply(&mut self, a: OutputAppend) {
        self.lines.extend(a.lines);
        self.partial = a.partial;
        self.bytes = a.bytes;
    }
}

/// The open session: its verified records (without output), names for its node ids, and the
/// output received so far per command.
#[derive(Debug, Clone)]
pub struct OpenSession {
    pub id: DocId,
    pub view: SessionView,
    pub names: BTreeMap<NodeId, PeerText>,
    pub outputs: BTreeMap<Id128, OutputBuf>,
    /// Output chunks the session references that have not reached this machine yet.
    pub missing_chunks: usize,
}

impl OpenSession {
    pub fn name_of(&self, node: &NodeId) -> PeerText {
        self.names.get(node).cloned().unwrap_or_else(|| node.short().into())
    }
}

/// One machine's row in a group run.
#[derive(Debug, Clone)]
pub struct GroupRow {
    pub machine: PeerText,
    pub session: DocId,
    pub request: Id128,
    pub status: String,
    pub exit_code: Option<i32>,
    pub output: OutputBuf,
}

impl GroupRow {
    /// Whether the machine has given its last word on the request.
    pub fn is_done(&self) -> bool {
        !matches!(self.status.as_str(), "waiting for approval" | "running")
    }
}

/// What a share would publish, to review before publishing.
#[derive(Debug, Clone)]
pub struct SharePreview {
    pub session: DocId,
    pub commands: usize,
    pub notes: usize,
    /// "2× password in the output of 3f2a… on ws-01", per rule and place.
    pub redactions: Vec<String>,
    /// Lines of the redacted transcript that contain a redaction, to see what it hides.
    pub redacted_lines: Vec<String>,
}

/// What the backend tells the UI.
#[derive(Debug, Clone)]
pub enum Update {
    Snapshot(Box<Snapshot>),
    /// A group run opened, with identical outputs gathered.
    GroupRunView(Box<crate::tech::GroupRunView>),
    /// Sessions whose output (or own words) has what was searched for.
    OutputMatches {
        query: String,
        sessions: Vec<crate::tech::SessionSummary>,
    },
    /// Machines and sync state re-read while nothing changed (online ages out).
    Machines {
        machines: Vec<Machine>,
        sync: SyncStatus,
    },
    /// The open session's records changed (sent with any new output).
    SessionView {
        id: DocId,
        view: Box<SessionView>,
        names: BTreeMap<NodeId, PeerText>,
        missing_chunks: usize,
    },
    Output {
        session: DocId,
        append: OutputAppend,
    },
    /// Requests were written: one per machine.
    Asked {
        group: Option<String>,
        rows: Vec<GroupRow>,
    },
    GroupRow(GroupRow),
    History {
        runs: Vec<PastRun>,
    },
    CommandsOn {
        machine: NodeId,
        commands: Vec<(String, usize)>,
    },
    Diff(Vec<DiffLine>),
    /// The values of probe `name` in `session` (and the rest of its group run), oldest first.
    ProbeSeries {
        session: DocId,
        name: String,
        points: Vec<ProbePoint>,
    },
    /// The recurring checks, re-read (after a cancel, or as their next runs come due).
    Schedules(Vec<ScheduleSummary>),
    SharePreview(SharePreview),
    Shared {
        url: String,
    },
    Notice(String),
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_keeps_unfinished_lines_and_escapes() {
        let mut s = LineSplitter::default();
        assert!(s.push(Stream::Stdout, b"hel").is_empty());
        let lines = s.push(Stream::Stdout, b"lo\n\x1b[2Jwor");
        assert_eq!(lines, vec![OutLine { stream: Stream::Stdout, text: "hello".into() }]);
        assert_eq!(s.partial()[0].text, "\\u{1b}[2Jwor");
        let err = s.push(Stream::Stderr, b"oops\r\n");
        assert_eq!(err, vec![OutLine { stream: Stream::Stderr, text: "oops".into() }]);
    }

    #[test]
    fn a_huge_line_is_shown_in_bounded_pieces() {
        let mut s = LineSplitter::default();
        let lines = s.push(Stream::Stdout, &vec![b'x'; MAX_LINE_CHARS * 5 + 3]);
        assert!(lines.iter().all(|l| l.text.len() <= MAX_LINE_CHARS));
        let partial = s.partial();
        assert!(lines.iter().chain(&partial).all(|l| l.text.len() <= MAX_LINE_CHARS));
        let shown: usize = lines.iter().chain(&partial).map(|l| l.text.len()).sum();
        assert_eq!(shown, MAX_LINE_CHARS * 5 + 3);
    }
}
