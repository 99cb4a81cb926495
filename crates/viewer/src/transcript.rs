//! Showing a session: as it happens (`caisey run`, `caisey show --follow`) or at once
//! (`caisey show`, `--json`).
//!
//! A [`Follower`] remembers what it already printed of each command — its events and how far
//! into the output list it read — so each update prints only what is new and reads only new
//! output chunks. Output from endpoints is hostile: on a terminal, control characters and escape
//! sequences are shown, never obeyed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use caisey_agent::escape::{join, visible, visible_line};
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{CommandView, EndStatus, SessionView, Stream, Verdict};
use caisey_doc::text::PeerText;
use caisey_peer::node::Node;

use crate::api::SessionRead;
use crate::client::Client;
use serde::{Deserialize, Serialize};

pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A member's name as a peer chose it, made safe to print on one line.
fn name_of(names: &BTreeMap<NodeId, PeerText>, node: &NodeId) -> String {
    names.get(node).map(PeerText::to_string).unwrap_or_else(|| node.short())
}

/// How output bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStyle {
    /// One machine's run: stdout to stdout, stderr to stderr, as the command wrote them.
    Passthrough,
    /// Each line prefixed with the machine and stream.
    Labelled,
    /// Nothing printed (the caller prints a summary, e.g. JSON).
    Silent,
}

#[derive(Default)]
struct Seen {
    request: bool,
    decision: bool,
    end: bool,
    output_pos: usize,
    partial: BTreeMap<u8, Vec<u8>>,
}

pub struct Follower {
    session: DocId,
    /// Only these commands (a run follows its own requests); all when `None`.
    only: Option<BTreeSet<Id128>>,
    style: OutputStyle,
    seen: BTreeMap<Id128, Seen>,
    header: bool,
    /// Notes printed so far, and the assignee last printed.
    notes_seen: BTreeSet<(NodeId, Id128)>,
    assignee_shown: Option<Option<NodeId>>,
}

impl Follower {
    pub fn new(session: DocId, only: Option<BTreeSet<Id128>>, style: OutputStyle) -> Self {
        Self {
            session,
            only,
            style,
            seen: BTreeMap::new(),
            header: false,
            notes_seen: BTreeSet::new(),
            assignee_shown: None,
        }
    }

    /// Prints whatever is new. Returns the commands it follows as shown so far: while output
    /// of the session is still on its way here, no command counts as ended yet (an end record
    /// can overtake the last output chunks).
    pub async fn update(&mut self, client: &Client) -> Result<Vec<CommandView>> {
        let SessionRead { mut view, missing_chunks, names } = client.session(self.session).await?;
        if missing_chunks > 0 {
            view.commands.iter_mut().for_each(|c| c.end = None);
        }
        // A whole session shown (not just the requests a run follows) opens with its header.
        if !self.header && self.style == OutputStyle::Labelled && self.only.is_none() {
            let labels = if view.info.labels.is_empty() {
                String::new()
            } else {
                format!("  labels: {}", join(&view.info.labels, ", "))
            };
            println!("session {:?} ({}){labels}", view.info.name, view.info.id);
            for q in &view.quarantined {
                println!("!! quarantined {}: {} (not shown as genuine)", q.place, q.why);
            }
        }
        self.header = true;
        let whole = self.style == OutputStyle::Labelled && self.only.is_none();
        if whole && self.assignee_shown != Some(view.assignee) {
            self.assignee_shown = Some(view.assignee);
            match view.assignee {
                Some(a) => crate::progress::println(&format!("assigned to {}", name_of(&names, &a))),
                None if self.notes_seen.is_empty() && self.seen.is_empty() => {}
                None => crate::progress::println("assigned to nobody"),
            }
        }
        let mut followed = Vec::new();
        for cmd in view.commands {
            if self.only.as_ref().is_some_and(|o| !o.contains(&cmd.request.id)) {
                continue;
            }
            self.print_new(client, &names, &cmd, &view.artifacts).await?;
            followed.push(cmd);
        }
        // The session's notes, after what they are about; new ones as they come.
        for n in view.notes.iter().filter(|_| whole) {
            if self.notes_seen.insert((n.author, n.note.id)) {
                crate::progress::println(&format!("── {}  note by {}:", time(n.note.at), name_of(&names, &n.author)));
                for line in n.note.text.visible().lines() {
                    crate::progress::println(&format!("     {line}"));
                }
            }
        }
        std::io::stdout().flush()?;
        std::io::stderr().flush()?;
        Ok(followed)
    }

    async fn print_new(
        &mut self,
        client: &Client,
        names: &BTreeMap<NodeId, PeerText>,
        cmd: &CommandView,
        artifacts: &[caisey_doc::artifact::ArtifactView],
    ) -> Result<()> {
        let machine = name_of(names, &cmd.request.target);
        let style = self.style;
        let seen = self.seen.entry(cmd.request.id).or_default();
        let status = |line: String| match style {
            OutputStyle::Passthrough => eprintln!("{line}"),
            OutputStyle::Labelled => crate::progress::println(&line),
            OutputStyle::Silent => {}
        };
        if !seen.request {
            seen.request = true;
            let c = &cmd.request.command;
            let scheduled = match (cmd.schedule, cmd.late) {
                (Some(_), false) => " (a scheduled run)",
                (Some(_), true) => " (a scheduled run, LATE: the machine was off at its time)",
                (None, _) => "",
            };
            status(format!(
                "── {}  {} asked {} to run{scheduled} ({}, timeout {}s){}, code {}:",
                time(cmd.request.requested_at),
                name_of(names, &cmd.requester),
                machine,
                c.shell,
                c.timeout_ms / 1000,
                c.cwd.as_ref().map(|d| format!(" in {}", visible(d))).unwrap_or_default(),
                cmd.request.approval_code().short()
            ));
            for line in visible(&c.script).lines() {
                status(format!("     {line}"));
            }
            if !cmd.request.description.trimmed().is_empty() {
                status(format!("   why: {}", cmd.request.description));
            }
            if cmd.decision.is_none() {
                status(format!("   waiting for approval on {machine}…"));
            }
        }
        if let (false, Some(d)) = (seen.decision, &cmd.decision) {
            seen.decision = true;
            let what = match d.verdict {
                Verdict::Approved => format!("approved by {}", visible_line(&d.decided_by)),
                Verdict::Denied => format!("denied by {}", visible_line(&d.decided_by)),
                Verdict::Expired => "expired: nobody approved it in time".to_string(),
            };
            status(format!("── {}  {machine}: {what}", time(d.decided_at)));
        }
        // Output: only the chunks appended since last time, a page at a time.
        loop {
            let read = client.output(self.session, &cmd.request, seen.output_pos).await?;
            let full = read.chunks.iter().map(|c| c.data.len()).sum::<usize>() >= crate::api::OUTPUT_PAGE;
            let moved = read.next != seen.output_pos;
            seen.output_pos = read.next;
            for chunk in read.chunks {
                write_output(style, &machine, seen, chunk.stream, &chunk.data)?;
            }
            if !(full && moved) {
                break;
            }
        }
        if let (false, Some(e)) = (seen.end, &cmd.end) {
            seen.end = true;
            flush_partial(style, &machine, seen)?;
            let took = cmd
                .start
                .as_ref()
                .map(|s| format!(" after {:.2}s", e.ended_at.saturating_sub(s.started_at) as f64 / 1000.0))
                .unwrap_or_default();
            let what = match (e.status, e.exit_code) {
                (EndStatus::Exited, Some(code)) => format!("exited with code {code}{took}"),
                (EndStatus::Exited, None) => format!("ended by a signal{took}"),
                (EndStatus::TimedOut, _) => format!("timed out{took}"),
                (EndStatus::Interrupted, _) => "interrupted".to_string(),
                (EndStatus::FailedToStart, _) => "failed to start".to_string(),
                (EndStatus::NotRun, _) => "not run".to_string(),
                (EndStatus::Stopped, _) => "stopped by the machine's user".to_string(),
            };
            let msg = e.message.as_ref().map(|m| format!(" ({})", visible(m))).unwrap_or_default();
            status(format!("── {}  {machine}: {what}{msg}", time(e.ended_at)));
            if !e.probes.is_empty() {
                let values: Vec<String> = e
                    .probes
                    .iter()
                    .map(|p| {
                        format!(
                            "{}={}{}",
                            p.name,
                            p.value,
                            p.unit.as_ref().map(|u| format!(" {}", visible_line(u))).unwrap_or_default()
                        )
                    })
                    .collect();
                status(format!("   values: {}", values.join(", ")));
            }
            for a in artifacts.iter().filter(|a| a.artifact.request == cmd.request.id) {
                let name = visible_line(&a.artifact.name);
                match &a.artifact.outcome {
                    caisey_doc::artifact::Outcome::Collected { size, sha256, .. } => status(format!(
                        "   brought back {name}: {size} bytes, sha256 {} (`caisey artifact get`)",
                        hex::encode(sha256)
                    )),
                    caisey_doc::artifact::Outcome::Refused { why } => {
                        status(format!("   NOT brought back {name}: {}", visible_line(why)))
                    }
                }
            }
        }
        Ok(())
    }
}

fn stream_tag(s: Stream) -> u8 {
    match s {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    }
}

fn write_output(style: OutputStyle, machine: &str, seen: &mut Seen, stream: Stream, data: &[u8]) -> Result<()> {
    match style {
        OutputStyle::Silent => {}
        OutputStyle::Passthrough => {
            let raw_ok = match stream {
                Stream::Stdout => !std::io::stdout().is_terminal(),
                Stream::Stderr => !std::io::stderr().is_terminal(),
            };
            let bytes = if raw_ok { data.to_vec() } else { visible(&String::from_utf8_lossy(data)).into_bytes() };
            match stream {
                Stream::Stdout => std::io::stdout().write_all(&bytes)?,
                Stream::Stderr => std::io::stderr().write_all(&bytes)?,
            }
        }
        OutputStyle::Labelled => {
            let buf = seen.partial.entry(stream_tag(stream)).or_default();
            buf.extend_from_slice(data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                print_line(machine, stream, &line[..line.len() - 1]);
            }
        }
    }
    Ok(())
}

fn flush_partial(style: OutputStyle, machine: &str, seen: &mut Seen) -> Result<()> {
    if style == OutputStyle::Labelled {
        for (tag, buf) in std::mem::take(&mut seen.partial) {
            if !buf.is_empty() {
                print_line(machine, if tag == 1 { Stream::Stdout } else { Stream::Stderr }, &buf);
            }
        }
    }
    Ok(())
}

fn print_line(machine: &str, stream: Stream, line: &[u8]) {
    let tag = match stream {
        Stream::Stdout => "out",
        Stream::Stderr => "err",
    };
    crate::progress::println(&format!("   [{machine} {tag}] {}", visible(&String::from_utf8_lossy(line))));
}

/// The JSON form of a whole session (`caisey show --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionJson {
    pub id: DocId,
    pub name: PeerText,
    pub labels: Vec<PeerText>,
    /// Escaped, as `caisey show` prints them.
    pub machines: Vec<String>,
    pub commands: Vec<CommandJson>,
    pub quarantined: Vec<caisey_doc::session::Quarantined>,
    /// The technician who has the session, if one was named.
    #[serde(default)]
    pub assignee: Option<String>,
    /// Technicians' notes, oldest first.
    #[serde(default)]
    pub notes: Vec<NoteJson>,
}

/// A note as exported: who wrote it, when, what.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoteJson {
    /// Escaped, as `caisey show` prints it.
    pub author: String,
    pub at: u64,
    pub text: PeerText,
}

fn notes_json(view: &SessionView, names: &BTreeMap<NodeId, PeerText>) -> Vec<NoteJson> {
    view.notes
        .iter()
        .map(|n| NoteJson { author: name_of(names, &n.author), at: n.note.at, text: n.note.text.clone() })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandJson {
    pub id: Id128,
    /// The code the endpoint user and approvers see and type for this request.
    pub code: Id128,
    /// Escaped, as `caisey show` prints it (so is `requester`).
    pub machine: String,
    pub requester: String,
    pub shell: String,
    pub script: String,
    /// Why the technician asked, as the endpoint user read it.
    pub description: PeerText,
    pub status: String,
    pub exit_code: Option<i32>,
    pub requested_at: u64,
    pub decided_by: Option<String>,
    pub started_at: Option<u64>,
    pub ended_at: Option<u64>,
    pub stdout: String,
    pub stderr: String,
    /// Bytes of output referenced but not on this machine yet (still syncing); the text above
    /// is what is here.
    pub output_pending: u64,
    /// The values the run yielded (`caisey-probe` lines, a schedule's patterns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<caisey_doc::probe::ProbeValue>,
    /// The schedule this is a run of, and whether it ran after its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Id128>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

pub async fn session_json(node: &Node, session: DocId) -> Result<SessionJson> {
    let fleet = node.fleet().await?;
    let names: BTreeMap<NodeId, PeerText> = fleet.members.values().map(|m| (m.node, m.name.clone())).collect();
    let f2 = fleet.clone();
    let view = node
        .read_with_output(session, move |d, stored| SessionView::read(d, &f2, stored))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no such session"))??;
    let commands = view
        .commands
        .iter()
        .map(|c| {
            let text = |s: Stream| {
                String::from_utf8_lossy(
                    &c.output
                        .iter()
                        .filter(|o| o.stream == s)
                        .flat_map(|o| o.data.iter().copied())
                        .collect::<Vec<u8>>(),
                )
                .into_owned()
            };
            CommandJson { stdout: text(Stream::Stdout), stderr: text(Stream::Stderr), ..command_json(c, &names) }
        })
        .collect();
    Ok(SessionJson {
        id: session,
        name: view.info.name.clone(),
        labels: view.info.labels.clone(),
        machines: view.targets.iter().map(|t| name_of(&names, t)).collect(),
        commands,
        assignee: view.assignee.map(|a| name_of(&names, &a)),
        notes: notes_json(&view, &names),
        quarantined: view.quarantined,
    })
}

/// One command as `show --json` and the exports give it, without its output.
fn command_json(c: &CommandView, names: &BTreeMap<NodeId, PeerText>) -> CommandJson {
    CommandJson {
        id: c.request.id,
        code: c.request.approval_code(),
        machine: name_of(names, &c.request.target),
        requester: name_of(names, &c.requester),
        shell: c.request.command.shell.to_string(),
        script: c.request.command.script.clone(),
        description: c.request.description.clone(),
        status: c.status().to_string(),
        exit_code: c.end.as_ref().and_then(|e| e.exit_code),
        requested_at: c.request.requested_at,
        decided_by: c.decision.as_ref().map(|d| d.decided_by.clone()),
        started_at: c.start.as_ref().map(|s| s.started_at),
        ended_at: c.end.as_ref().map(|e| e.ended_at),
        stdout: String::new(),
        stderr: String::new(),
        output_pending: c.output_pending,
        probes: c.end.as_ref().map(|e| e.probes.clone()).unwrap_or_default(),
        schedule: c.schedule,
        late: c.late,
    }
}

/// A session as CSV, one row per command, for spreadsheets. Cells are quoted as RFC 4180 says,
/// and a cell that a spreadsheet would take for a formula (`=`, `+`, `-`, `@`, tab, CR at its
/// start) is prefixed with `'`: output and commands come from other machines and must stay text.
pub fn session_csv(s: &SessionJson) -> String {
    let mut out = String::from(CSV_HEADER);
    for c in &s.commands {
        let mut row = csv_fixed_cells(s, c);
        row.push(csv_cell(&c.stdout));
        row.push(csv_cell(&c.stderr));
        out.push_str(&row.join(","));
        out.push_str("\r\n");
    }
    out
}

const CSV_HEADER: &str = "session,session_name,command_id,machine,requested_by,shell,script,description,status,exit_code,\
    requested_at,decided_by,started_at,ended_at,duration_ms,assignee,notes,probes,stdout,stderr\r\n";

/// A cell as RFC 4180 quotes it, defused if a spreadsheet would take it for a formula.
pub(crate) fn csv_cell(v: &str) -> String {
    let mut cell = CsvCell::default();
    let mut out = cell.piece(v);
    out.push_str(&cell.end());
    out
}

/// A CSV cell written a piece at a time: quoted, its quotes doubled, and `'` put before a
/// formula character (`=`, `+`, `-`, `@`, tab, CR) at its very start.
#[derive(Debug, Default)]
struct CsvCell {
    started: bool,
}

impl CsvCell {
    fn piece(&mut self, text: &str) -> String {
        let mut out = String::new();
        if text.is_empty() {
            return out;
        }
        if !self.started {
            self.started = true;
            out.push('"');
            if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                out.push('\'');
            }
        }
        out.push_str(&text.replace('"', "\"\""));
        out
    }

    fn end(&mut self) -> String {
        if self.started { "\"".into() } else { "\"\"".into() }
    }
}

/// Every cell of a command's row before its output (the session's assignee and notes repeat on
/// each row, as its name does).
fn csv_fixed_cells(s: &SessionJson, c: &CommandJson) -> Vec<String> {
    let opt = |v: Option<u64>| v.map(time).unwrap_or_default();
    let duration = c.started_at.zip(c.ended_at).map(|(a, b)| b.saturating_sub(a).to_string()).unwrap_or_default();
    // A spreadsheet's cells hold the text as written (quoted by `csv_cell`), as `--json` does.
    let notes: Vec<String> =
        s.notes.iter().map(|n| format!("{} {}: {}", time(n.at), n.author, n.text.as_unescaped_str())).collect();
    [
        s.id.to_hex(),
        s.name.as_unescaped_str().to_owned(),
        c.id.to_hex(),
        c.machine.clone(),
        c.requester.clone(),
        c.shell.clone(),
        c.script.clone(),
        c.description.as_unescaped_str().to_owned(),
        c.status.clone(),
        c.exit_code.map(|e| e.to_string()).unwrap_or_default(),
        time(c.requested_at),
        c.decided_by.clone().unwrap_or_default(),
        opt(c.started_at),
        opt(c.ended_at),
        duration,
        s.assignee.clone().unwrap_or_default(),
        notes.join("\n"),
        c.probes
            .iter()
            .map(|p| {
                format!("{}={}{}", p.name, p.value, p.unit.as_deref().map(|u| format!(" {u}")).unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join("; "),
    ]
    .iter()
    .map(|v| csv_cell(v))
    .collect()
}

/// The export formats of `caisey export` and the viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Json,
    Csv,
}

impl ExportFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Json => "json",
            ExportFormat::Csv => "csv",
        }
    }
}

/// The session as `format`, in memory (the viewer's save), and how many bytes of its output
/// are not here yet (the export holds what is).
pub async fn export(client: &Client, session: DocId, format: ExportFormat) -> Result<(Vec<u8>, u64)> {
    let mut bytes = Vec::new();
    let pending = export_to(client, session, format, &mut bytes, &mut |_| {}).await?;
    Ok((bytes, pending))
}

/// Writes the session as `format` to `out` with its output read a page at a time, so memory
/// stays flat whatever the session holds (the same JSON as `show --json`, byte for byte).
/// `progress` hears how many output bytes are written so far, of [`export_size`]. Returns
/// how many bytes of output are not here yet: the export holds what is.
pub async fn export_to(
    client: &Client,
    session: DocId,
    format: ExportFormat,
    out: &mut (dyn Write + Send),
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<u64> {
    let SessionRead { view, names, .. } = client.session(session).await?;
    let sizes = client.output_sizes(session).await?;
    let mut outline = SessionJson {
        id: session,
        name: view.info.name.clone(),
        labels: view.info.labels.clone(),
        machines: view.targets.iter().map(|t| name_of(&names, t)).collect(),
        commands: view.commands.iter().map(|c| command_json(c, &names)).collect(),
        quarantined: view.quarantined.clone(),
        assignee: view.assignee.map(|a| name_of(&names, &a)),
        notes: notes_json(&view, &names),
    };
    let mut streamer = OutputStreamer { client, session, written: 0, progress };
    let mut pending = 0;
    match format {
        ExportFormat::Csv => {
            out.write_all(CSV_HEADER.as_bytes())?;
            for (c, json) in view.commands.iter().zip(&outline.commands) {
                out.write_all(csv_fixed_cells(&outline, json).join(",").as_bytes())?;
                let mut here = 0;
                for stream in [Stream::Stdout, Stream::Stderr] {
                    out.write_all(b",")?;
                    let mut cell = CsvCell::default();
                    here = streamer.stream(c, stream, &mut |text| out.write_all(cell.piece(text).as_bytes())).await?;
                    out.write_all(cell.end().as_bytes())?;
                }
                pending += sizes.get(&c.request.id).copied().unwrap_or(0).saturating_sub(here);
                out.write_all(b"\r\n")?;
            }
        }
        ExportFormat::Json => {
            // The outline, serialized as `show --json` is, with markers where the output goes;
            // written up to each marker, then the output streamed in its place.
            let tag: u64 = rand::random();
            let marker = |what: char, i: usize| format!("\u{0}{tag:016x}{what}{i}");
            let pending_base = (1u64 << 62) | (tag >> 2);
            for (i, c) in outline.commands.iter_mut().enumerate() {
                c.stdout = marker('o', i);
                c.stderr = marker('e', i);
                c.output_pending = pending_base + i as u64;
            }
            let text = serde_json::to_string_pretty(&outline)?;
            let mut rest = text.as_str();
            for (i, c) in view.commands.iter().enumerate() {
                let mut here = 0;
                for (what, stream) in [('o', Stream::Stdout), ('e', Stream::Stderr)] {
                    let at = serde_json::to_string(&marker(what, i))?;
                    let (before, after) = rest.split_once(&at).context("export: output marker missing")?;
                    out.write_all(before.as_bytes())?;
                    out.write_all(b"\"")?;
                    here = streamer
                        .stream(c, stream, &mut |text| {
                            let quoted = serde_json::to_string(text).map_err(std::io::Error::other)?;
                            out.write_all(&quoted.as_bytes()[1..quoted.len() - 1])
                        })
                        .await?;
                    out.write_all(b"\"")?;
                    rest = after;
                }
                let missing = sizes.get(&c.request.id).copied().unwrap_or(0).saturating_sub(here);
                pending += missing;
                let (before, after) =
                    rest.split_once(&(pending_base + i as u64).to_string()).context("export: marker missing")?;
                out.write_all(before.as_bytes())?;
                out.write_all(missing.to_string().as_bytes())?;
                rest = after;
            }
            out.write_all(rest.as_bytes())?;
        }
    }
    out.flush()?;
    Ok(pending)
}

/// The output bytes an export of the session writes (what its references add up to).
pub async fn export_size(client: &Client, session: DocId) -> Result<u64> {
    Ok(client.output_sizes(session).await?.values().sum())
}

/// Reads one command's output a page at a time and hands on one stream of it as text.
struct OutputStreamer<'a> {
    client: &'a Client,
    session: DocId,
    written: u64,
    progress: &'a mut (dyn FnMut(u64) + Send),
}

type TextSink<'a> = &'a mut (dyn FnMut(&str) -> std::io::Result<()> + Send);

impl OutputStreamer<'_> {
    /// Hands `write` the text of `stream` (invalid UTF-8 shown as U+FFFD, as
    /// `String::from_utf8_lossy` shows the whole), as far as the output is here. Returns how
    /// many bytes of output, of both streams, are here.
    async fn stream(&mut self, cmd: &CommandView, stream: Stream, write: TextSink<'_>) -> Result<u64> {
        let mut from = 0;
        let mut here = 0;
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let read = self.client.output(self.session, &cmd.request, from).await?;
            let page: usize = read.chunks.iter().map(|c| c.data.len()).sum();
            here += page as u64;
            for chunk in read.chunks.into_iter().filter(|c| c.stream == stream) {
                carry.extend_from_slice(&chunk.data);
                let kept = utf8_write(&carry, false, write)?;
                carry.drain(..carry.len() - kept);
                self.written += chunk.data.len() as u64;
                (self.progress)(self.written);
            }
            if read.next == from || page < crate::api::OUTPUT_PAGE {
                break;
            }
            from = read.next;
        }
        utf8_write(&carry, true, write)?;
        Ok(here)
    }
}

/// Writes the valid UTF-8 of `bytes` (U+FFFD for each invalid sequence) and returns how many
/// bytes at the end were held back: a character cut by a chunk's edge, unless `last`.
fn utf8_write(bytes: &[u8], last: bool, write: TextSink<'_>) -> std::io::Result<usize> {
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(text) => {
                write(text)?;
                return Ok(0);
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // Checked just above: these bytes are UTF-8.
                write(std::str::from_utf8(valid).unwrap_or_default())?;
                match e.error_len() {
                    Some(bad) => {
                        write("\u{FFFD}")?;
                        rest = &after[bad..];
                    }
                    None if last => {
                        write("\u{FFFD}")?;
                        return Ok(0);
                    }
                    None => return Ok(after.len()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_cells_and_defuses_formulas() {
        let s = SessionJson {
            id: Id128([0; 16]),
            name: "disk, \"weekly\"".into(),
            labels: vec![],
            machines: vec![],
            commands: vec![CommandJson {
                id: Id128([1; 16]),
                code: Id128([2; 16]),
                machine: "ws-01".into(),
                requester: "alice".into(),
                shell: "sh".into(),
                script: "df -h\nuptime".into(),
                description: "weekly check".into(),
                status: "exited".into(),
                exit_code: Some(0),
                requested_at: 0,
                decided_by: None,
                started_at: Some(1_000),
                ended_at: Some(3_500),
                stdout: "=HYPERLINK(\"http://x\")".into(),
                stderr: String::new(),
                output_pending: 0,
                probes: vec![],
                schedule: None,
                late: false,
            }],
            quarantined: vec![],
            assignee: None,
            notes: vec![],
        };
        let csv = session_csv(&s);
        let row = csv.lines().nth(1).unwrap();
        assert!(row.contains("\"disk, \"\"weekly\"\"\""), "{row}");
        assert!(csv.contains("\"df -h\nuptime\""), "{csv}");
        assert!(csv.contains("\"'=HYPERLINK(\"\"http://x\"\")\""), "{csv}");
        assert!(csv.contains(",\"2500\","), "{csv}");
    }

    /// Text streamed through [`utf8_write`] in pieces cut anywhere, as CSV cells or not, is
    /// what the whole would have given.
    mod streamed {
        use super::super::{CsvCell, csv_cell, utf8_write};
        use proptest::prelude::*;

        fn streamed(bytes: &[u8], cuts: &[usize]) -> String {
            let mut text = String::new();
            let mut carry = Vec::new();
            let mut start = 0;
            let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            ends.sort();
            ends.push(bytes.len());
            for end in ends {
                carry.extend_from_slice(&bytes[start..end.max(start)]);
                start = end.max(start);
                let kept = utf8_write(&carry, false, &mut |t| {
                    text.push_str(t);
                    Ok(())
                })
                .unwrap();
                carry.drain(..carry.len() - kept);
            }
            utf8_write(&carry, true, &mut |t| {
                text.push_str(t);
                Ok(())
            })
            .unwrap();
            text
        }

        proptest! {
            #[test]
            fn any_cuts_give_the_lossy_whole(
                bytes in proptest::collection::vec(prop_oneof![any::<u8>(), Just(0xc3), Just(0xa9), Just(0xe2), Just(0x82), Just(0xac)], 0..64),
                cuts in proptest::collection::vec(any::<usize>(), 0..6),
            ) {
                prop_assert_eq!(streamed(&bytes, &cuts), String::from_utf8_lossy(&bytes).into_owned());
            }

            #[test]
            fn a_cell_in_pieces_is_the_cell_of_the_whole(pieces in proptest::collection::vec("[=+@a-c\"\t-]{0,4}", 0..5)) {
                let mut cell = CsvCell::default();
                let mut out: String = pieces.iter().map(|p| cell.piece(p)).collect();
                out.push_str(&cell.end());
                prop_assert_eq!(out, csv_cell(&pieces.concat()));
            }
        }
    }
}
