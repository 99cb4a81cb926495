//! The consent window (`caisey-agent prompt`): what the person at the endpoint sees when a
//! technician asks to run something, and where they approve or deny that exact command.
//!
//! It talks only to the local daemon, over the same socket as `caisey-agent approve`. Everything
//! in it that a technician wrote (their name, the session name, the command, the description)
//! is hostile text: shown escaped (control and bidi characters spelled out), inside framed
//! boxes of its own colour and font, scrolled within fixed bounds. The window's own words and
//! buttons are outside those boxes, so no text can pose as them. Approve only becomes active a
//! moment after a request is shown, so a click meant for something else can't approve a
//! request that just appeared under the pointer, and it approves by the approval code, which
//! names the exact command shown: if the command changed, the daemon refuses.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use caisey_doc::id::Id128;
use caisey_doc::text::{needs_escape, visible, visible_line};
use egui::{Color32, RichText, ScrollArea, Ui};

use caisey_doc::schedule::ScheduleState;

use crate::local::{self, ConsentItem, LocalReply, LocalRequest, PendingItem};

/// How long Approve stays inactive after a request is first shown.
pub const ARM_DELAY: Duration = Duration::from_millis(1200);
/// How often the daemon is asked what is pending.
const POLL: Duration = Duration::from_millis(500);

/// What the window asks of the daemon.
enum Ask {
    /// `schedule`: a consent to a schedule (nothing starts running at once).
    Decide {
        code: Id128,
        approve: bool,
        each_run: bool,
        schedule: bool,
    },
    Revoke {
        schedule: Id128,
    },
}

/// What comes back from the daemon.
enum Heard {
    Pending { pending: Vec<PendingItem>, running: Vec<Id128>, consents: Vec<ConsentItem> },
    Unreachable(String),
    Decided { code: Id128, approved: bool, message: String },
    Refused { error: String },
}

/// The window's state. Build it with [`PromptApp::connect`]; draw it with [`PromptApp::show`].
pub struct PromptApp {
    asks: mpsc::Sender<Ask>,
    heard: mpsc::Receiver<Heard>,
    repaint: Arc<OnceLock<egui::Context>>,
    pending: Vec<PendingItem>,
    /// The schedules this machine's user was asked about (standing consents among them).
    consents: Vec<ConsentItem>,
    /// Which request is shown, and since when (for [`ARM_DELAY`]).
    shown: Option<(Id128, Instant)>,
    /// The daemon's last answer or error, shown under the buttons.
    status: Option<(bool, String)>,
    /// The request last approved here, while the daemon reports it running.
    approved_running: Option<Id128>,
    unreachable: Option<String>,
    /// A decision is on its way: the buttons wait for its answer.
    deciding: bool,
}

impl std::fmt::Debug for PromptApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptApp").field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}

impl PromptApp {
    /// Starts talking to the daemon whose socket is `socket` (on a thread of its own).
    pub fn connect(socket: PathBuf) -> std::io::Result<Self> {
        let (asks, asks_rx) = mpsc::channel::<Ask>();
        let (heard_tx, heard) = mpsc::channel::<Heard>();
        let repaint: Arc<OnceLock<egui::Context>> = Arc::new(OnceLock::new());
        let wake = repaint.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("caisey-prompt".into()).spawn(move || {
            let send = |h: Heard| {
                let ok = heard_tx.send(h).is_ok();
                if let Some(ctx) = wake.get() {
                    ctx.request_repaint();
                }
                ok
            };
            loop {
                let consents = match rt.block_on(local::call(&socket, &LocalRequest::Consents)) {
                    Ok(LocalReply::Consents { consents }) => consents,
                    _ => vec![],
                };
                let h = match rt.block_on(local::call(&socket, &LocalRequest::Pending)) {
                    Ok(LocalReply::Pending { pending, running }) => Heard::Pending { pending, running, consents },
                    Ok(LocalReply::Error { error }) => Heard::Unreachable(error),
                    Ok(_) => Heard::Unreachable("unexpected reply".into()),
                    Err(e) => Heard::Unreachable(format!("{e:#}")),
                };
                if !send(h) {
                    return;
                }
                // Wait for the next poll, answering a decision at once (then polling again).
                match asks_rx.recv_timeout(POLL) {
                    Ok(Ask::Decide { code, approve, each_run, schedule }) => {
                        let req = if approve {
                            LocalRequest::Approve { id: code.to_hex(), each_run }
                        } else {
                            LocalRequest::Deny { id: code.to_hex() }
                        };
                        if !send(ask_now(&rt, &socket, code, approve && !schedule, req)) {
                            return;
                        }
                    }
                    Ok(Ask::Revoke { schedule }) => {
                        let req = LocalRequest::Revoke { id: schedule.to_hex() };
                        if !send(ask_now(&rt, &socket, schedule, false, req)) {
                            return;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
        Ok(Self {
            asks,
            heard,
            repaint,
            pending: vec![],
            consents: vec![],
            shown: None,
            status: None,
            approved_running: None,
            unreachable: None,
            deciding: false,
        })
    }

    /// The requests waiting, as last heard from the daemon.
    pub fn pending(&self) -> &[PendingItem] {
        &self.pending
    }

    fn apply(&mut self, h: Heard) {
        match h {
            Heard::Pending { pending, running, consents } => {
                self.pending = pending;
                self.consents = consents;
                self.unreachable = None;
                // A command approved here that is no longer running has ended: say so, rather
                // than "running" for good.
                if let Some(code) = self.approved_running
                    && !running.contains(&code)
                {
                    self.approved_running = None;
                    self.status = Some((
                        false,
                        format!("approved {}; it is no longer running (its session says how it ended)", code.short()),
                    ));
                }
            }
            Heard::Unreachable(e) => {
                self.pending.clear();
                self.unreachable = Some(e);
            }
            Heard::Decided { code, approved, message } => {
                self.deciding = false;
                self.approved_running = approved.then_some(code);
                self.status = Some((false, message));
            }
            Heard::Refused { error } => {
                self.deciding = false;
                self.status = Some((true, error));
            }
        }
    }

    /// One frame of the window.
    pub fn show(&mut self, ui: &mut Ui) {
        let _ = self.repaint.set(ui.ctx().clone());
        while let Ok(h) = self.heard.try_recv() {
            self.apply(h);
        }
        let current = self.pending.first().cloned();
        // A different request (or a changed command: its code differs) starts the delay again.
        if current.as_ref().map(|p| p.id) != self.shown.map(|s| s.0) {
            self.shown = current.as_ref().map(|p| (p.id, Instant::now()));
        }
        egui::Panel::top("prompt-title").show(ui, |ui| {
            ui.add_space(4.0);
            ui.heading("Caisey: a technician asks to run a command on this computer");
            ui.add_space(4.0);
        });
        egui::Panel::bottom("prompt-buttons").show(ui, |ui| {
            self.buttons(ui, current.as_ref());
            self.standing(ui);
        });
        egui::CentralPanel::default().show(ui, |ui| match (&current, &self.unreachable) {
            (_, Some(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, format!("The Caisey agent is not answering: {e}"));
            }
            (None, None) => {
                ui.label("Nothing is waiting for your approval.");
            }
            (Some(p), None) => request_details(ui, p, self.pending.len()),
        });
        // Keep the countdown and the Approve delay moving while something is shown.
        if current.is_some() {
            ui.ctx().request_repaint_after(Duration::from_millis(250));
        }
    }

    fn buttons(&mut self, ui: &mut Ui, current: Option<&PendingItem>) {
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            let Some(p) = current else { return };
            let armed = self.shown.is_some_and(|(_, since)| since.elapsed() >= ARM_DELAY);
            let enabled = armed && !self.deciding;
            let deny = ui.add_enabled(!self.deciding, egui::Button::new(RichText::new("Deny").size(16.0)));
            let label = if p.schedule.is_some() { "Approve all its runs" } else { "Approve and run" };
            let approve = ui.add_enabled(enabled, egui::Button::new(RichText::new(label).size(16.0)));
            let each_run = p
                .schedule
                .is_some()
                .then(|| ui.add_enabled(enabled, egui::Button::new(RichText::new("Ask me at each run").size(16.0))));
            let schedule = p.schedule.is_some();
            if deny.clicked() {
                self.ask(Ask::Decide { code: p.id, approve: false, each_run: false, schedule });
            } else if approve.clicked() {
                self.ask(Ask::Decide { code: p.id, approve: true, each_run: false, schedule });
            } else if each_run.is_some_and(|b| b.clicked()) {
                self.ask(Ask::Decide { code: p.id, approve: true, each_run: true, schedule });
            }
            if !armed {
                ui.label(RichText::new("Approve is available in a moment: read the command first.").weak());
            }
        });
        if let Some((error, text)) = &self.status {
            let color = if *error { ui.visuals().error_fg_color } else { ui.visuals().text_color() };
            ui.colored_label(color, visible(text));
        }
        ui.add_space(6.0);
    }

    /// The schedules with standing consent (or asking at each run), each with Revoke.
    fn standing(&mut self, ui: &mut Ui) {
        // Consents given (not schedules still waiting for an answer: those are shown above).
        let live: Vec<ConsentItem> = self
            .consents
            .iter()
            .filter(|c| matches!(c.state, ScheduleState::Standing | ScheduleState::EachRun))
            .cloned()
            .collect();
        if live.is_empty() {
            return;
        }
        egui::CollapsingHeader::new(format!("Recurring checks you allowed ({})", live.len()))
            .id_salt("standing-consents")
            .show(ui, |ui| {
                for c in live {
                    ui.horizontal(|ui| {
                        if ui.add_enabled(!self.deciding, egui::Button::new("Revoke")).clicked() {
                            self.ask(Ask::Revoke { schedule: c.schedule });
                        }
                        ui.label(format!(
                            "{} from {}: {}, until {}; {} run(s) so far",
                            c.schedule.short(),
                            c.technician,
                            caisey_doc::schedule::describe(&c.every),
                            caisey_peer::cli::format_time(c.until),
                            c.runs
                        ));
                    });
                    foreign_box(ui, &format!("standing-{}", c.schedule), &visible(&c.script), 60.0, false);
                }
            });
    }

    fn ask(&mut self, ask: Ask) {
        self.deciding = true;
        self.status = None;
        if self.asks.send(ask).is_err() {
            self.deciding = false;
            self.status = Some((true, "the connection to the agent is gone".into()));
        }
    }
}

/// Asks the daemon; `runs`: an approval that starts a command now (the window then follows
/// whether it still runs).
fn ask_now(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    code: Id128,
    runs: bool,
    req: LocalRequest,
) -> Heard {
    match rt.block_on(local::call(socket, &req)) {
        Ok(LocalReply::Done { message }) => Heard::Decided { code, approved: runs, message },
        Ok(LocalReply::Error { error }) => Heard::Refused { error },
        Ok(_) => Heard::Refused { error: "unexpected reply".into() },
        Err(e) => Heard::Refused { error: format!("{e:#}") },
    }
}

/// The key fingerprint in groups of four, as people compare them aloud.
fn fingerprint(hex: &str) -> String {
    hex.as_bytes().chunks(4).take(8).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

/// A framed box for technician-written text: its own background and monospace font.
/// A framed box for text a technician wrote. A command keeps its lines exactly as they will
/// run (scrolling sideways); prose (`wrap`) is wrapped so all of it is read.
fn foreign_box(ui: &mut Ui, id: &str, text: &str, max_height: f32, wrap: bool) {
    let mode = if wrap { egui::TextWrapMode::Wrap } else { egui::TextWrapMode::Extend };
    egui::Frame::group(ui.style()).fill(ui.visuals().extreme_bg_color).show(ui, |ui| {
        ScrollArea::both().id_salt(id).max_height(max_height).auto_shrink([false, true]).show(ui, |ui| {
            ui.add(egui::Label::new(RichText::new(text).monospace()).wrap_mode(mode));
        });
    });
}

fn request_details(ui: &mut Ui, p: &PendingItem, waiting: usize) {
    let now = caisey_peer::now_ms();
    if waiting > 1 {
        ui.label(format!("{waiting} requests are waiting; this is the oldest."));
    }
    egui::Grid::new("who").num_columns(2).spacing([16.0, 4.0]).show(ui, |ui| {
        ui.label(RichText::new("Technician").strong());
        ui.label(p.technician.to_string());
        ui.end_row();
        ui.label(RichText::new("Their key").strong());
        ui.label(RichText::new(fingerprint(&p.technician_key.to_hex())).monospace());
        ui.end_row();
        ui.label(RichText::new("Session").strong());
        ui.label(p.session.to_string());
        ui.end_row();
        ui.label(RichText::new("Runs with").strong());
        let cwd = p.cwd.as_ref().map(|c| format!(", in {}", visible_line(c))).unwrap_or_default();
        ui.label(format!("{} (stopped after {} s{cwd})", p.shell, p.timeout_ms / 1000));
        ui.end_row();
        if let Some(s) = &p.schedule {
            ui.label(RichText::new("Runs").strong());
            ui.label(format!(
                "RECURRING: {}, until {}; a run missed while this computer is off is {}",
                caisey_doc::schedule::describe(&s.every),
                caisey_peer::cli::format_time(s.until),
                match s.missed {
                    caisey_doc::schedule::Missed::RunLate => "run late, once",
                    caisey_doc::schedule::Missed::Skip => "skipped",
                }
            ));
            ui.end_row();
            if !s.probes.is_empty() {
                ui.label(RichText::new("Records").strong());
                ui.label(s.probes.join(", "));
                ui.end_row();
            }
        }
    });
    ui.add_space(6.0);
    let lines = p.script.lines().count().max(1);
    ui.label(
        RichText::new(format!(
            "The command, exactly as it will run ({lines} line{}, {} characters):",
            if lines == 1 { "" } else { "s" },
            p.script.chars().count()
        ))
        .strong(),
    );
    let hidden = p.script.chars().filter(|c| needs_escape(*c)).count();
    if hidden > 0 {
        ui.colored_label(
            Color32::from_rgb(230, 120, 30),
            format!("Warning: it contains {hidden} invisible or control character(s), shown as \\u{{…}}. Be careful."),
        );
    }
    foreign_box(ui, "command", &visible(&p.script), 220.0, false);
    if let Some(c) = &p.collect {
        ui.add_space(6.0);
        ui.label(
            RichText::new(format!(
                "Then it brings back these files, at most {} MiB in all (nothing outside them):",
                c.limit.div_ceil(1 << 20)
            ))
            .strong(),
        );
        foreign_box(ui, "collect", &visible(&c.paths.join("\n")), 100.0, false);
    }
    ui.add_space(6.0);
    ui.label(RichText::new("Why, in the technician's words:").strong());
    let why =
        if p.description.trimmed().is_empty() { "(no reason given)".to_string() } else { p.description.visible() };
    foreign_box(ui, "description", &why, 160.0, true);
    ui.add_space(6.0);
    let left = p.expires_at.saturating_sub(now) / 1000;
    ui.label(format!("If nobody answers, the request expires in {} min {} s and nothing runs.", left / 60, left % 60));
    if p.schedule.is_some() {
        ui.label(
            "Approving all its runs lets it run on that schedule without asking again, until its end date; \
             you can revoke that at any time below.",
        );
    }
}
