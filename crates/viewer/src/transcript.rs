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

use anyhow::Result;
use caisey_agent::escape::{visible, visible_line};
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::session::{CommandView, EndStatus, SessionView, Stream, Verdict};
use caisey_peer::node::Node;

use crate::api::SessionRead;
use crate::client::Client;
use serde::{Deserialize, Serialize};

pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A member's name as a peer chose it, made safe to print on one line.
fn name_of(names: &BTreeMap<NodeId, String>, node: &NodeId) -> String {
    names.get(node).map(|n| visible_line(n)).unwrap_or_else(|| node.short())
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
}

impl Follower {
    pub fn new(session: DocId, only: Option<BTreeSet<Id128>>, style: OutputStyle) -> Self {
        Self { session, only, style, seen: BTreeMap::new(), header: false }
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
                format!("  labels: {}", visible_line(&view.info.labels.join(", ")))
            };
            println!("session {:?} ({}){labels}", view.info.name, view.info.id);
            for q in &view.quarantined {
                println!("!! quarantined {}: {} (not shown as genuine)", q.place, q.why);
            }
        }
        self.header = true;
        let mut followed = Vec::new();
        for cmd in view.commands {
            if self.only.as_ref().is_some_and(|o| !o.contains(&cmd.request.id)) {
                continue;
            }
            self.print_new(client, &names, &cmd).await?;
            followed.push(cmd);
        }
        std::io::stdout().flush()?;
        std::io::stderr().flush()?;
        Ok(followed)
    }

    async fn print_new(&mut self, client: &Client, names: &BTreeMap<NodeId, String>, cmd: &CommandView) -> Result<()> {
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
            status(format!(
                "── {}  {} asked {} to run ({}, timeout {}s){}, code {}:",
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
            if !cmd.request.description.trim().is_empty() {
                status(format!("   why: {}", visible_line(&cmd.request.description)));
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
        // Output: only the chunks appended since last time.
        let read = client.output(self.session, &cmd.request, seen.output_pos).await?;
        seen.output_pos = read.next;
        for chunk in read.chunks {
            write_output(style, &machine, seen, chunk.stream, &chunk.data)?;
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
            };
            let msg = e.message.as_ref().map(|m| format!(" ({})", visible(m))).unwrap_or_default();
            status(format!("── {}  {machine}: {what}{msg}", time(e.ended_at)));
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
    pub name: String,
    pub labels: Vec<String>,
    pub machines: Vec<String>,
    pub commands: Vec<CommandJson>,
    pub quarantined: Vec<caisey_doc::session::Quarantined>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandJson {
    pub id: Id128,
    /// The code the endpoint user and approvers see and type for this request.
    pub code: Id128,
    pub machine: String,
    pub requester: String,
    pub shell: String,
    pub script: String,
    /// Why the technician asked, as the endpoint user read it.
    pub description: String,
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
}

pub async fn session_json(node: &Node, session: DocId) -> Result<SessionJson> {
    let fleet = node.fleet().await?;
    let names: BTreeMap<NodeId, String> = fleet.members.values().map(|m| (m.node, m.name.clone())).collect();
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
            CommandJson {
                id: c.request.id,
                code: c.request.approval_code(),
                machine: name_of(&names, &c.request.target),
                requester: name_of(&names, &c.requester),
                shell: c.request.command.shell.to_string(),
                script: c.request.command.script.clone(),
                description: c.request.description.clone(),
                status: c.status().to_string(),
                exit_code: c.end.as_ref().and_then(|e| e.exit_code),
                requested_at: c.request.requested_at,
                decided_by: c.decision.as_ref().map(|d| d.decided_by.clone()),
                started_at: c.start.as_ref().map(|s| s.started_at),
                ended_at: c.end.as_ref().map(|e| e.ended_at),
                stdout: text(Stream::Stdout),
                stderr: text(Stream::Stderr),
                output_pending: c.output_pending,
            }
        })
        .collect();
    Ok(SessionJson {
        id: session,
        name: view.info.name.clone(),
        labels: view.info.labels.clone(),
        machines: view.targets.iter().map(|t| name_of(&names, t)).collect(),
        commands,
        quarantined: view.quarantined,
    })
}

/// A session as CSV, one row per command, for spreadsheets. Cells are quoted as RFC 4180 says,
/// and a cell that a spreadsheet would take for a formula (`=`, `+`, `-`, `@`, tab, CR at its
/// start) is prefixed with `'`: output and commands come from other machines and must stay text.
pub fn session_csv(s: &SessionJson) -> String {
    fn cell(v: &str) -> String {
        let v = if v.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{v}") } else { v.to_string() };
        format!("\"{}\"", v.replace('"', "\"\""))
    }
    let opt = |v: Option<u64>| v.map(time).unwrap_or_default();
    let mut out = String::from(
        "session,session_name,command_id,machine,requested_by,shell,script,description,status,exit_code,requested_at,decided_by,\
         started_at,ended_at,duration_ms,stdout,stderr\r\n",
    );
    for c in &s.commands {
        let duration = c.started_at.zip(c.ended_at).map(|(a, b)| b.saturating_sub(a).to_string()).unwrap_or_default();
        let row = [
            s.id.to_hex(),
            s.name.clone(),
            c.id.to_hex(),
            c.machine.clone(),
            c.requester.clone(),
            c.shell.clone(),
            c.script.clone(),
            c.description.clone(),
            c.status.clone(),
            c.exit_code.map(|e| e.to_string()).unwrap_or_default(),
            time(c.requested_at),
            c.decided_by.clone().unwrap_or_default(),
            opt(c.started_at),
            opt(c.ended_at),
            duration,
            c.stdout.clone(),
            c.stderr.clone(),
        ];
        out.push_str(&row.iter().map(|v| cell(v)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    out
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

/// A session exported in `format`, as bytes to write.
/// The session as `format`, and how many bytes of its output are not here yet (the export
/// holds what is).
pub async fn export(client: &Client, session: DocId, format: ExportFormat) -> Result<(Vec<u8>, u64)> {
    let json = client.session_json(session).await?;
    let pending = json.commands.iter().map(|c| c.output_pending).sum();
    let bytes = match format {
        ExportFormat::Json => serde_json::to_vec_pretty(&json)?,
        ExportFormat::Csv => session_csv(&json).into_bytes(),
    };
    Ok((bytes, pending))
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
            }],
            quarantined: vec![],
        };
        let csv = session_csv(&s);
        let row = csv.lines().nth(1).unwrap();
        assert!(row.contains("\"disk, \"\"weekly\"\"\""), "{row}");
        assert!(csv.contains("\"df -h\nuptime\""), "{csv}");
        assert!(csv.contains("\"'=HYPERLINK(\"\"http://x\"\")\""), "{csv}");
        assert!(csv.contains(",\"2500\","), "{csv}");
    }
}
