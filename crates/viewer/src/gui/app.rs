//! The viewer's state and frame: the tabs, the status bar, and applying the backend's updates.
//! Each tab draws itself in its own module (`fleet`, `sessions`, `compose`, `history`,
//! `schedules`); the session's plot of probe values is in `probes`.
//!
//! Nothing here blocks: every operation is an [`Action`] sent to the backend, and its result
//! comes back as an [`Update`] applied at the start of a frame.

use std::collections::VecDeque;
use std::time::Instant;

use caisey_doc::id::{DocId, NodeId};
use caisey_doc::session::Shell;
use egui::{RichText, Ui};

use super::backend::{Action, BackendHandle};
use super::model::{GroupRow, OpenSession, SharePreview, Snapshot, Update};
use super::probes::ProbePlot;
use crate::tech::{DiffLine, PastRun};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    /// A designated approver's requests.
    Approvals,
    Fleet,
    Sessions,
    Session,
    Run,
    /// Past group runs, one opened side by side.
    GroupRuns,
    History,
    /// Recurring checks: where each stands, and cancelling one.
    Schedules,
}

/// The compose form.
#[derive(Debug, Clone)]
pub struct Compose {
    /// A machine name (or several, comma-separated), or a group when `to_group`.
    pub target: String,
    pub to_group: bool,
    /// A follow-up in a group run: its machines' sessions go on, however many there are.
    pub in_group_run: bool,
    pub shell: Shell,
    pub timeout_secs: u64,
    pub session: String,
    pub labels: String,
    pub description: String,
    pub script: String,
    /// Files to bring back after it ends: absolute paths, one per line.
    pub collect: String,
    /// The most MiB brought back in all.
    pub collect_limit_mib: u64,
}

impl Default for Compose {
    fn default() -> Self {
        Self {
            target: String::new(),
            to_group: false,
            in_group_run: false,
            shell: Shell::Sh,
            timeout_secs: 60,
            session: String::new(),
            labels: String::new(),
            description: String::new(),
            script: String::new(),
            collect: String::new(),
            collect_limit_mib: 1024,
        }
    }
}

/// The group run last sent: one row per machine.
#[derive(Debug, Clone, Default)]
pub struct GroupRun {
    pub group: Option<String>,
    pub rows: Vec<GroupRow>,
}

/// Runs of one command over time, and a diff of two of them.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub machine: Option<NodeId>,
    pub commands: Vec<(String, usize)>,
    pub script: String,
    pub runs: Vec<PastRun>,
    /// Indices into `runs`: the older and the newer run to compare.
    pub old: Option<usize>,
    pub new: Option<usize>,
    pub diff: Option<Vec<DiffLine>>,
}

/// Review-then-publish of a public transcript.
#[derive(Debug, Clone, Default)]
pub struct Share {
    pub redact: String,
    /// The publisher's words for the reader.
    pub summary: String,
    pub without_notes: bool,
    /// Commands left out entirely.
    pub omit: std::collections::BTreeSet<caisey_doc::id::Id128>,
    pub preview: Option<SharePreview>,
    pub url: Option<String>,
}

impl Share {
    /// What to publish, as reviewed so far.
    pub fn request(&self) -> crate::tech::ShareRequest {
        crate::tech::ShareRequest {
            redact: self.redact.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
            omit: self.omit.iter().map(|id| id.to_hex()).collect(),
            summary: Some(self.summary.trim().to_string()).filter(|s| !s.is_empty()),
            without_notes: self.without_notes,
        }
    }
}

pub struct ViewerApp {
    pub(super) backend: BackendHandle,
    pub snapshot: Snapshot,
    pub tab: Tab,
    pub fleet_search: String,
    pub group_filter: Option<String>,
    pub selected_machine: Option<NodeId>,
    pub session_search: String,
    /// The last search of output sent to the node, and what it found.
    pub output_search: (String, Vec<crate::tech::SessionSummary>),
    pub open: Option<OpenSession>,
    /// Editing the open session's name and labels.
    pub renaming: Option<(String, String)>,
    /// The note being written for the open session, and the colleague to hand it to.
    pub note_draft: String,
    pub assign_to: String,
    pub follow: bool,
    pub export_dir: String,
    pub compose: Compose,
    pub group_run: Option<GroupRun>,
    /// The group run opened in the Group runs tab, with identical outputs gathered.
    pub group_run_open: Option<crate::tech::GroupRunView>,
    pub history: History,
    /// The open session's probe values, as plotted.
    pub probes: ProbePlot,
    pub share: Option<Share>,
    /// A single run asked from here and not ended yet: (session, request, machine), so the status
    /// bar can say when it ends.
    pub awaiting: Option<(DocId, caisey_doc::id::Id128, caisey_doc::text::PeerText)>,
    /// Messages for the status bar: (is error, text, when).
    pub messages: VecDeque<(bool, String, Instant)>,
    /// How long the last frame took to build, for the responsiveness bench.
    pub last_frame: std::time::Duration,
}

impl std::fmt::Debug for ViewerApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewerApp").field("tab", &self.tab).finish_non_exhaustive()
    }
}

impl ViewerApp {
    pub fn new(backend: BackendHandle) -> Self {
        let export_dir = std::env::var_os("HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_default())
            .display()
            .to_string();
        Self {
            backend,
            snapshot: Snapshot::default(),
            tab: Tab::Fleet,
            fleet_search: String::new(),
            group_filter: None,
            selected_machine: None,
            session_search: String::new(),
            output_search: (String::new(), vec![]),
            open: None,
            renaming: None,
            note_draft: String::new(),
            assign_to: String::new(),
            follow: true,
            export_dir,
            compose: Compose::default(),
            group_run: None,
            group_run_open: None,
            history: History::default(),
            probes: ProbePlot::default(),
            share: None,
            awaiting: None,
            messages: VecDeque::new(),
            last_frame: std::time::Duration::ZERO,
        }
    }

    pub(super) fn send(&self, action: Action) {
        self.backend.send(action);
    }

    pub(super) fn notice(&mut self, error: bool, text: String) {
        self.messages.push_back((error, text, Instant::now()));
        while self.messages.len() > 20 {
            self.messages.pop_front();
        }
    }

    pub fn open_session(&mut self, id: DocId) {
        if self.open.as_ref().is_none_or(|o| o.id != id) {
            self.open = None;
            self.renaming = None;
            self.note_draft.clear();
            self.assign_to.clear();
            self.share = None;
            self.probes = ProbePlot::default();
            self.send(Action::OpenSession(id));
        }
        self.tab = Tab::Session;
    }

    /// Applies what the backend sent since the last frame.
    pub fn apply_updates(&mut self) {
        for update in self.backend.drain() {
            self.apply(update);
        }
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Snapshot(s) => {
                let first = self.snapshot.role.is_none();
                self.snapshot = *s;
                // An approver's viewer opens on what waits for them.
                if first && self.is_approver() && self.tab == Tab::Fleet {
                    self.tab = Tab::Approvals;
                }
            }
            Update::Machines { machines, sync } => {
                self.snapshot.machines = machines;
                self.snapshot.sync = sync;
            }
            Update::SessionView { id, view, names, missing_chunks } => {
                // A run asked from here that has now ended says so, in place of "waiting".
                if let Some((session, request, machine)) = self.awaiting.clone()
                    && session == id
                    && let Some(c) = view.command(&request).filter(|c| c.is_final())
                {
                    self.awaiting = None;
                    self.notice(false, format!("{machine}: {}", c.status()));
                }
                match &mut self.open {
                    Some(o) if o.id == id => {
                        o.view = *view;
                        o.names = names;
                        o.missing_chunks = missing_chunks;
                    }
                    _ => {
                        self.open =
                            Some(OpenSession { id, view: *view, names, outputs: Default::default(), missing_chunks })
                    }
                }
            }
            Update::Output { session, append } => {
                if let Some(o) = self.open.as_mut().filter(|o| o.id == session) {
                    o.outputs.entry(append.request).or_default().apply(append);
                }
            }
            Update::Asked { group, rows } => {
                if group.is_none()
                    && let Some(row) = rows.first()
                {
                    let session = row.session;
                    self.notice(false, format!("asked {}; waiting for approval", row.machine));
                    self.awaiting = Some((session, row.request, row.machine.clone()));
                    self.open_session(session);
                } else {
                    self.notice(false, format!("asked {} machines; waiting for approval", rows.len()));
                    let mut rows = rows;
                    rows.sort_by(|a, b| a.machine.cmp(&b.machine));
                    self.group_run = Some(GroupRun { group, rows });
                    self.tab = Tab::Run;
                }
            }
            Update::GroupRunView(view) => self.group_run_open = Some(*view),
            Update::OutputMatches { query, sessions } => {
                if self.output_search.0 == query {
                    self.output_search.1 = sessions;
                }
            }
            Update::GroupRow(row) => {
                let mut finished = None;
                if let Some(g) = &mut self.group_run
                    && let Some(r) = g.rows.iter_mut().find(|r| r.request == row.request)
                {
                    let was_done = r.is_done();
                    *r = row;
                    if !was_done && g.rows.iter().all(GroupRow::is_done) {
                        let failed = g.rows.iter().filter(|r| r.exit_code != Some(0)).count();
                        finished =
                            Some(format!("group run finished: {} machines answered, {failed} not ok", g.rows.len()));
                    }
                }
                if let Some(text) = finished {
                    self.notice(false, text);
                }
            }
            Update::History { runs } => {
                self.history.runs = runs;
                self.history.old = None;
                self.history.new = None;
                self.history.diff = None;
            }
            Update::CommandsOn { machine, commands } => {
                if self.history.machine == Some(machine) {
                    self.history.commands = commands;
                }
            }
            Update::Diff(d) => self.history.diff = Some(d),
            Update::ProbeSeries { session, name, points } => self.probes.take(session, &name, points),
            Update::Schedules(schedules) => self.snapshot.schedules = schedules,
            Update::SharePreview(p) => {
                if let Some(s) = &mut self.share {
                    s.preview = Some(p);
                }
            }
            Update::Shared { url } => {
                self.notice(false, format!("published: {url}"));
                if let Some(s) = &mut self.share {
                    s.url = Some(url);
                }
            }
            Update::Notice(n) => self.notice(false, n),
            Update::Error(e) => self.notice(true, e),
        }
    }

    /// One frame of the whole viewer, inside `ui` (the window's, or a test harness's).
    pub fn show(&mut self, ui: &mut Ui) {
        let started = Instant::now();
        let _ = self.backend.repaint.set(ui.ctx().clone());
        self.apply_updates();
        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::CentralPanel::default().show(ui, |ui| match self.tab {
            Tab::Approvals => self.approvals_tab(ui),
            Tab::Fleet => self.fleet_tab(ui),
            Tab::Sessions => self.sessions_tab(ui),
            Tab::Session => self.session_tab(ui),
            Tab::Run => self.run_tab(ui),
            Tab::GroupRuns => self.group_runs_tab(ui),
            Tab::History => self.history_tab(ui),
            Tab::Schedules => self.schedules_tab(ui),
        });
        self.last_frame = started.elapsed();
    }

    fn top_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.heading("Caisey");
            let who = if self.snapshot.org.is_empty() {
                "loading…".to_string()
            } else {
                format!("{} — {}", caisey_doc::text::visible_line(&self.snapshot.org), self.snapshot.me)
            };
            ui.label(RichText::new(who).weak());
            ui.separator();
            let approver = self.is_approver();
            let waiting = format!("Waiting for you ({})", self.snapshot.awaiting.len());
            for (tab, name) in [
                (Tab::Approvals, waiting.as_str()),
                (Tab::Fleet, "Fleet"),
                (Tab::Sessions, "Sessions"),
                (Tab::Session, "Session"),
                (Tab::Run, "Run"),
                (Tab::GroupRuns, "Group runs"),
                (Tab::History, "History"),
                (Tab::Schedules, "Schedules"),
            ] {
                // Each role sees what it may do: approvals for an approver, running for a technician.
                let hidden = match tab {
                    Tab::Approvals => !approver,
                    Tab::Run | Tab::History | Tab::GroupRuns | Tab::Schedules => approver,
                    Tab::Session => self.open.is_none(),
                    Tab::Fleet | Tab::Sessions => false,
                };
                if hidden {
                    continue;
                }
                ui.selectable_value(&mut self.tab, tab, name);
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| self.network_state(ui));
        });
    }

    fn network_state(&self, ui: &mut Ui) {
        let s = &self.snapshot.sync;
        let waiting = if s.unconfirmed_docs > 0 {
            format!(", {} document(s) waiting to sync", s.unconfirmed_docs)
        } else {
            String::new()
        };
        if let Some(error) = &s.unwritable {
            let text = format!(
                "writes to this machine's store fail ({}): while they do, nothing new is saved or sent",
                caisey_doc::text::visible_line(error)
            );
            ui.colored_label(ui.visuals().error_fg_color, text);
        } else if s.relays == 0 {
            ui.label("no relay configured");
        } else if s.relays_connected == 0 {
            ui.colored_label(ui.visuals().warn_fg_color, format!("offline: showing what this machine has{waiting}"));
        } else {
            ui.label(format!("online via relay{waiting}"));
        }
    }

    fn status_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| match self.messages.back() {
            Some((error, text, _)) => {
                let color = if *error { ui.visuals().error_fg_color } else { ui.visuals().text_color() };
                ui.colored_label(color, caisey_doc::text::visible_line(text));
            }
            None => {
                ui.label(RichText::new("ready").weak());
            }
        });
    }

    /// Starts a history view of `script` (on `machine`, or everywhere).
    pub(super) fn show_history(&mut self, machine: Option<NodeId>, script: String) {
        self.history.machine = machine;
        self.history.script = script.clone();
        self.history.runs.clear();
        self.history.diff = None;
        if !script.trim().is_empty() {
            self.send(Action::History { machine, script });
        }
        if let Some(m) = machine {
            self.send(Action::CommandsOn(m));
        }
        self.tab = Tab::History;
    }
}
