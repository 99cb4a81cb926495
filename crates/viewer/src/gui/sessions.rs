//! The Sessions tab (search, list) and the Session tab: the transcript as a timeline of
//! requests, decisions and runs with their output, plus rename, export and share.

use caisey_doc::session::{CommandView, EndStatus, Verdict};
use caisey_doc::text::{PeerText, join, visible_line};
use caisey_peer::now_ms;
use egui::{RichText, Ui};

use super::app::{Share, ViewerApp};
use super::backend::Action;
use super::model::OpenSession;
use super::widgets::{ago, bytes, duration, hostile_block, labelled_input, output_view, time};
use crate::transcript::ExportFormat;

impl ViewerApp {
    pub(super) fn sessions_tab(&mut self, ui: &mut Ui) {
        labelled_input(
            ui,
            "Search sessions",
            &mut self.session_search,
            "name, label, machine, command, note or output",
        );
        ui.separator();
        let q = self.session_search.trim().to_lowercase();
        let now = now_ms();
        // Output is searched by the node's index; what it found joins the sessions whose own
        // words match, with the line it found.
        if !q.is_empty() && self.output_search.0 != q {
            self.output_search = (q.clone(), vec![]);
            self.send(Action::SearchOutput(q.clone()));
        }
        let found: &[crate::tech::SessionSummary] = if q.is_empty() { &[] } else { &self.output_search.1 };
        let mut list: Vec<_> =
            self.snapshot.sessions.iter().filter(|s| q.is_empty() || s.matches(&q)).cloned().collect();
        for f in found {
            match list.iter_mut().find(|s| s.id == f.id) {
                Some(s) => s.matched = f.matched.clone(),
                None => list.push(f.clone()),
            }
        }
        if list.is_empty() {
            ui.label(if self.snapshot.sessions.is_empty() { "No sessions yet." } else { "No session matches." });
        }
        egui::ScrollArea::vertical().id_salt("session-list").show(ui, |ui| {
            egui::Grid::new("sessions").num_columns(5).striped(true).spacing([18.0, 6.0]).show(ui, |ui| {
                for h in ["Session", "Labels", "Machines", "Last activity", "Status"] {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for s in list {
                    ui.vertical(|ui| {
                        if ui.link(s.name.to_string()).clicked() {
                            self.open_session(s.id);
                        }
                        if let Some(line) = &s.matched {
                            ui.label(RichText::new(format!("found in output: {}", visible_line(line))).weak());
                        }
                    });
                    ui.label(join(&s.labels, ", "));
                    ui.label(join(&s.machines, ", "));
                    ui.label(ago(s.last_activity, now));
                    ui.label(format!(
                        "{} ({} command{})",
                        s.status,
                        s.commands,
                        if s.commands == 1 { "" } else { "s" }
                    ));
                    ui.end_row();
                }
            });
        });
    }

    pub(super) fn session_tab(&mut self, ui: &mut Ui) {
        let Some(open) = self.open.take() else {
            ui.label("Loading the session…");
            return;
        };
        self.session_header(ui, &open);
        self.values_over_time_ui(ui, &open);
        ui.separator();
        // Following, the timeline stays at its end while new steps and output arrive (until the
        // user scrolls up).
        egui::ScrollArea::vertical().id_salt("timeline").auto_shrink([false, false]).stick_to_bottom(self.follow).show(
            ui,
            |ui| {
                if !open.view.quarantined.is_empty() {
                    ui.colored_label(
                        ui.visuals().error_fg_color,
                        format!(
                            "{} record(s) failed verification and are not shown as genuine:",
                            open.view.quarantined.len()
                        ),
                    );
                    for q in &open.view.quarantined {
                        ui.label(visible_line(&format!("  {}: {}", q.place, q.why)));
                    }
                    ui.separator();
                }
                if open.missing_chunks > 0 {
                    ui.colored_label(
                        ui.visuals().warn_fg_color,
                        format!(
                            "Output still on its way: {} chunk(s) not on this machine yet. They follow as soon as \
                         the agent or relay that has them is reachable; output below stops where they are missing.",
                            open.missing_chunks
                        ),
                    );
                    ui.separator();
                }
                if open.view.commands.is_empty() {
                    ui.label("No commands in this session yet.");
                }
                for cmd in &open.view.commands {
                    self.command_entry(ui, &open, cmd);
                    ui.add_space(10.0);
                }
            },
        );
        self.open = Some(open);
    }

    fn session_header(&mut self, ui: &mut Ui, open: &OpenSession) {
        let info = &open.view.info;
        let mut rename = None;
        match &mut self.renaming {
            Some((name, labels)) => {
                labelled_input(ui, "Session name", name, "what this investigation is");
                labelled_input(ui, "Labels", labels, "comma-separated, e.g. weekly, disk");
                ui.horizontal(|ui| {
                    if ui.button("Save name").clicked() {
                        rename = Some(Some((name.clone(), labels.split(',').map(str::to_string).collect())));
                    } else if ui.button("Cancel").clicked() {
                        rename = Some(None);
                    }
                });
            }
            None => {
                ui.horizontal(|ui| {
                    ui.heading(info.name.to_string());
                    for l in &info.labels {
                        ui.label(RichText::new(l.to_string()).background_color(ui.visuals().faint_bg_color));
                    }
                    if ui.button("Rename / label").clicked() {
                        // Edited as written; the name and labels are shown escaped everywhere else.
                        let labels: Vec<&str> = info.labels.iter().map(|l| l.as_unescaped_str()).collect();
                        self.renaming = Some((info.name.as_unescaped_str().to_owned(), labels.join(", ")));
                    }
                });
            }
        }
        if let Some(done) = rename {
            self.renaming = None;
            if let Some((name, labels)) = done {
                self.send(Action::Rename { session: open.id, name, labels });
            }
        }
        let machines: Vec<PeerText> = open.view.targets.iter().map(|t| open.name_of(t)).collect();
        ui.label(format!(
            "opened by {} at {}  ·  machines: {}  ·  id {}",
            open.name_of(&open.view.creator),
            time(info.created_at),
            join(&machines, ", "),
            open.id.short()
        ));
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.follow, "Follow output");
            let label = ui.label("Export to folder");
            ui.add(egui::TextEdit::singleline(&mut self.export_dir).desired_width(220.0)).labelled_by(label.id);
            for format in [ExportFormat::Json, ExportFormat::Csv] {
                let ext = format.extension();
                if ui.button(format!("Export {}", ext.to_uppercase())).clicked() {
                    let path =
                        std::path::Path::new(&self.export_dir).join(file_name(info.name.as_unescaped_str(), ext));
                    self.send(Action::Export { session: open.id, format, path });
                }
            }
            if ui.button("Share…").clicked() {
                self.share = Some(Share::default());
                self.send(Action::SharePreview { session: open.id, share: Default::default() });
            }
        });
        self.share_panel(ui, open);
        self.hand_off(ui, open);
    }

    /// Who has the session, the notes left on it, and adding to both.
    fn hand_off(&mut self, ui: &mut Ui, open: &OpenSession) {
        let mut action = None;
        egui::CollapsingHeader::new(format!("Hand-off: {} note(s)", open.view.notes.len()))
            .id_salt("hand-off")
            .default_open(!open.view.notes.is_empty() || open.view.assignee.is_some())
            .show(ui, |ui| {
                let who = open.view.assignee.map(|a| open.name_of(&a).to_string());
                ui.label(format!("Assigned to: {}", who.as_deref().unwrap_or("nobody")));
                ui.horizontal(|ui| {
                    let label = ui.label("Hand to");
                    ui.add(egui::TextEdit::singleline(&mut self.assign_to).hint_text("a colleague's name"))
                        .labelled_by(label.id);
                    if ui.button("Assign").clicked() && !self.assign_to.trim().is_empty() {
                        action =
                            Some(Action::Assign { session: open.id, technician: Some(self.assign_to.trim().into()) });
                    }
                    if who.is_some() && ui.button("Unassign").clicked() {
                        action = Some(Action::Assign { session: open.id, technician: None });
                    }
                });
                for n in &open.view.notes {
                    ui.label(format!("{}  {}:", time(n.note.at), open.name_of(&n.author)));
                    hostile_block(ui, ("note", n.author, n.note.id), &n.note.text.visible(), 120.0);
                }
                let label = ui.label("New note");
                ui.add(
                    egui::TextEdit::multiline(&mut self.note_draft)
                        .hint_text("what you found, what you tried, what is next")
                        .desired_rows(2),
                )
                .labelled_by(label.id);
                if ui.button("Add note").clicked() && !self.note_draft.trim().is_empty() {
                    action = Some(Action::Note { session: open.id, text: std::mem::take(&mut self.note_draft) });
                }
            });
        if let Some(action) = action {
            self.send(action);
        }
    }

    fn share_panel(&mut self, ui: &mut Ui, open: &OpenSession) {
        let Some(share) = &mut self.share else { return };
        let mut action = None;
        let mut close = false;
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.label(RichText::new("Share a public, redacted, read-only transcript").strong());
            ui.label("Secrets the built-in rules know (passwords, tokens, keys) are always redacted; add your own patterns below.");
            labelled_input(ui, "Also redact", &mut share.redact, "regular expressions, comma-separated");
            let label = ui.label("Summary for the reader");
            ui.add(
                egui::TextEdit::multiline(&mut share.summary)
                    .hint_text("what we found, what we changed: it opens the page")
                    .desired_rows(3),
            )
            .labelled_by(label.id);
            ui.checkbox(&mut share.without_notes, "Leave out the technicians' notes");
            ui.label("Commands to publish:");
            for cmd in &open.view.commands {
                let id = cmd.request.id;
                let mut included = !share.omit.contains(&id);
                let first_line = cmd.request.command.script.lines().next().unwrap_or_default();
                let machine = open.name_of(&cmd.request.target);
                let text = format!("{} on {machine}: {}", id.short(), visible_line(first_line));
                if ui.checkbox(&mut included, text).changed() {
                    if included {
                        share.omit.remove(&id);
                    } else {
                        share.omit.insert(id);
                    }
                }
            }
            match &share.preview {
                None => {
                    ui.label("Preparing the preview…");
                }
                Some(p) => {
                    ui.label(format!("{} command(s) and {} note(s) will be published.", p.commands, p.notes));
                    if p.redactions.is_empty() {
                        ui.label("Nothing was redacted.");
                    }
                    for r in &p.redactions {
                        ui.label(format!("redacted {}", visible_line(r)));
                    }
                    if !p.redacted_lines.is_empty() {
                        hostile_block(ui, "redacted-lines", &p.redacted_lines.join("\n"), 160.0);
                    }
                }
            }
            ui.horizontal(|ui| {
                if ui.button("Preview again").clicked() {
                    action = Some(Action::SharePreview { session: open.id, share: share.request() });
                }
                if share.preview.is_some() && share.url.is_none() && ui.button("Publish").clicked() {
                    action = Some(Action::Publish { session: open.id, share: share.request() });
                }
                if let Some(url) = &share.url {
                    ui.label(url);
                    if ui.button("Copy link").clicked() {
                        ui.ctx().copy_text(url.clone());
                    }
                }
                if ui.button("Close").clicked() {
                    close = true;
                }
            });
        });
        if close {
            self.share = None;
        }
        if let Some(a) = action {
            if matches!(a, Action::SharePreview { .. })
                && let Some(s) = &mut self.share
            {
                s.preview = None;
            }
            self.send(a);
        }
    }

    fn command_entry(&mut self, ui: &mut Ui, open: &OpenSession, cmd: &CommandView) {
        let r = &cmd.request;
        let machine = open.name_of(&r.target);
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.horizontal(|ui| {
                ui.label(RichText::new(time(r.requested_at)).weak());
                ui.label(RichText::new(format!("{} asked {machine}", open.name_of(&cmd.requester))).strong());
                ui.label(format!(
                    "({}, timeout {} s{})",
                    r.command.shell,
                    r.command.timeout_ms / 1000,
                    r.command.cwd.as_ref().map(|c| format!(", in {}", visible_line(c))).unwrap_or_default()
                ));
            });
            hostile_block(ui, ("script", r.id), &r.command.script, 120.0);
            if !r.description.is_empty() {
                ui.label(format!("why: {}", r.description));
            }
            // Decision.
            match &cmd.decision {
                None if now_ms() > r.expires_at => {
                    ui.label("nobody approved it in time");
                }
                None => {
                    ui.colored_label(ui.visuals().warn_fg_color, format!("waiting for approval on {machine}…"));
                }
                Some(d) => {
                    let who = visible_line(&d.decided_by);
                    let text = match d.verdict {
                        Verdict::Approved => format!("approved by {who} at {}", time(d.decided_at)),
                        Verdict::Denied => format!("denied by {who} at {}", time(d.decided_at)),
                        Verdict::Expired => format!("expired at {}: nobody approved it in time", time(d.decided_at)),
                    };
                    let color = if d.verdict == Verdict::Approved {
                        ui.visuals().text_color()
                    } else {
                        ui.visuals().warn_fg_color
                    };
                    ui.colored_label(color, text);
                }
            }
            // Execution.
            if let Some(s) = &cmd.start {
                let status = match &cmd.end {
                    None => format!("running since {} on {machine}", time(s.started_at)),
                    Some(e) => {
                        let took = duration(e.ended_at.saturating_sub(s.started_at));
                        let what = match (e.status, e.exit_code) {
                            (EndStatus::Exited, Some(c)) => format!("exit code {c}"),
                            (EndStatus::Exited, None) => "ended by a signal".into(),
                            (EndStatus::TimedOut, _) => "timed out".into(),
                            (EndStatus::Interrupted, _) => "interrupted".into(),
                            (EndStatus::FailedToStart, _) => "failed to start".into(),
                            (EndStatus::NotRun, _) => "not run".into(),
                            (EndStatus::Stopped, _) => "stopped by the machine's user".into(),
                        };
                        let msg = e.message.as_ref().map(|m| format!(" ({})", visible_line(m))).unwrap_or_default();
                        format!("ran {took} on {machine}: {what}{msg}")
                    }
                };
                let failed = cmd.end.as_ref().is_some_and(|e| e.exit_code != Some(0));
                let color = if failed { ui.visuals().error_fg_color } else { ui.visuals().text_color() };
                ui.colored_label(color, RichText::new(status).strong());
            } else if let Some(e) = &cmd.end {
                ui.label(format!("{} at {}", cmd.status(), time(e.ended_at)));
            }
            if let Some(out) = open.outputs.get(&r.id).filter(|o| o.rows() > 0) {
                ui.horizontal(|ui| {
                    ui.label(RichText::new(format!("output: {} lines, {}", out.rows(), bytes(out.bytes))).weak());
                    if ui.button("Copy output").clicked() {
                        ui.ctx().copy_text(out.text());
                    }
                    if ui.button("Save output").clicked() {
                        let path = std::path::Path::new(&self.export_dir)
                            .join(file_name(&format!("{} {} output", open.view.info.name, machine), "txt"));
                        self.send(Action::SaveOutput { session: open.id, request: r.id, path });
                    }
                    if ui.button("Runs over time").clicked() {
                        self.show_history(Some(r.target), r.command.script.clone());
                    }
                });
                output_view(ui, ("output", r.id), out, 320.0, self.follow);
            }
            // Files it brought back (or refused to): name, size, SHA-256, and Save.
            for a in open.view.artifacts.iter().filter(|a| a.artifact.request == r.id) {
                let name = visible_line(&a.artifact.name);
                ui.horizontal(|ui| match &a.artifact.outcome {
                    caisey_doc::artifact::Outcome::Collected { size, sha256, .. } => {
                        ui.label(format!("file {name}: {}, sha256 {}", bytes(*size), hex::encode(&sha256[..8])));
                        if ui.button(format!("Save {name}")).clicked() {
                            let path = std::path::Path::new(&self.export_dir).join(saved_name(&a.artifact.name));
                            self.send(Action::SaveArtifact { session: open.id, name: a.artifact.name.clone(), path });
                        }
                    }
                    caisey_doc::artifact::Outcome::Refused { why } => {
                        ui.colored_label(
                            ui.visuals().warn_fg_color,
                            format!("file {name} not brought back: {}", visible_line(why)),
                        );
                    }
                });
            }
        });
    }
}

/// A file name for a file brought back: its last component, with letters, digits, `-`, `_`
/// and inner dots kept, the rest `_` (a name from a machine never picks the folder).
fn saved_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let safe: String =
        last.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect();
    let safe = safe.trim_start_matches('.');
    if safe.is_empty() { "artifact.bin".into() } else { safe.to_string() }
}

/// A file name for `name`: letters, digits, `-` and `_` kept, the rest `_`.
pub fn file_name(name: &str, ext: &str) -> String {
    let stem: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let stem = stem.trim_matches('_');
    format!("{}.{ext}", if stem.is_empty() { "session" } else { stem })
}
