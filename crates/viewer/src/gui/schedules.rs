//! The Schedules tab: every recurring check in this node's sessions — on which machine, how
//! often, until when, where its consent stands, how many runs it made and when the next falls
//! due — and cancelling one that may still run. Asking for a schedule stays on the command line
//! (`caisey schedule`), where its probes and end date are typed out in full.

use caisey_doc::schedule::describe;
use caisey_doc::text::visible_line;
use caisey_peer::now_ms;
use egui::{RichText, Ui};

use super::app::ViewerApp;
use super::backend::Action;
use super::widgets::time;
use crate::schedules::ScheduleSummary;

/// The longest command shown in a row; the whole of it is in the session.
const SCRIPT_CHARS: usize = 60;

/// When the next run falls due, from `now`: "in 4 s", "in 3 min", or the time itself.
pub fn next_run_text(next: Option<u64>, now: u64) -> String {
    match next {
        None => "—".into(),
        Some(t) if t <= now => "due now".into(),
        Some(t) => match (t - now).div_ceil(1000) {
            s @ 0..120 => format!("in {s} s"),
            s @ 120..7200 => format!("in {} min", s / 60),
            _ => time(t),
        },
    }
}

/// Runs made, and how many of them late.
pub fn runs_text(s: &ScheduleSummary) -> String {
    match s.late_runs {
        0 => s.runs.to_string(),
        late => format!("{} ({late} late)", s.runs),
    }
}

/// The command's first line, escaped and cut short.
fn script_text(script: &str) -> String {
    let first = script.lines().next().unwrap_or_default();
    let shown: String = first.chars().take(SCRIPT_CHARS).collect();
    let more = first.chars().count() > SCRIPT_CHARS || script.lines().nth(1).is_some();
    format!("{}{}", visible_line(&shown), if more { " …" } else { "" })
}

impl ViewerApp {
    pub(super) fn schedules_tab(&mut self, ui: &mut Ui) {
        let schedules = self.snapshot.schedules.clone();
        if schedules.is_empty() {
            ui.label("No recurring checks yet.");
            ui.label(
                RichText::new(
                    "Ask for one with `caisey schedule --machine NAME --every 1h --until 7days -- COMMAND`; \
                     each machine's user consents once.",
                )
                .weak(),
            );
            return;
        }
        let live = schedules.iter().filter(|s| s.state.is_live()).count();
        ui.heading(format!("{} recurring check(s), {live} of them may still run", schedules.len()));
        let now = now_ms();
        let mut open = None;
        let mut cancel = None;
        egui::ScrollArea::both().id_salt("schedules").auto_shrink([false, false]).show(ui, |ui| {
            egui::Grid::new("schedule-list").num_columns(10).striped(true).spacing([16.0, 6.0]).show(ui, |ui| {
                for h in
                    ["Schedule", "Session", "Machine", "Command", "State", "How often", "Until", "Runs", "Next run", ""]
                {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for s in &schedules {
                    ui.label(RichText::new(s.id.short()).monospace());
                    if ui.link(s.session_name.to_string()).clicked() {
                        open = Some(s.session);
                    }
                    ui.label(s.machine.to_string());
                    ui.label(RichText::new(script_text(&s.script)).monospace());
                    let state = RichText::new(s.state.as_str());
                    ui.label(if s.state.is_live() { state } else { state.weak() });
                    ui.label(visible_line(&describe(&s.every)));
                    ui.label(time(s.until));
                    ui.label(runs_text(s));
                    ui.label(next_run_text(s.next_run, now));
                    if s.state.is_live() {
                        let button = ui.button(format!("Cancel {}", s.id.short()));
                        if button.on_hover_text("no run of it starts once its machine hears of this").clicked() {
                            cancel = Some(s.id.to_hex());
                        }
                    } else {
                        ui.label("");
                    }
                    ui.end_row();
                }
            });
        });
        if let Some(session) = open {
            self.open_session(session);
        }
        if let Some(id) = cancel {
            self.send(Action::CancelSchedule(id));
        }
        // "in 4 s" counts down.
        ui.ctx().request_repaint_after(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_run_is_counted_down_then_named() {
        let now = 1_764_540_000_000;
        assert_eq!(next_run_text(None, now), "—");
        assert_eq!(next_run_text(Some(now - 1), now), "due now");
        assert_eq!(next_run_text(Some(now + 4_200), now), "in 5 s");
        assert_eq!(next_run_text(Some(now + 600_000), now), "in 10 min");
        assert_eq!(next_run_text(Some(now + 86_400_000), now), "2025-12-01 22:00:00Z");
    }

    #[test]
    fn a_long_or_hostile_command_is_cut_short_and_escaped() {
        assert_eq!(script_text("df -h"), "df -h");
        assert_eq!(script_text("echo a\u{1b}[2J\nrm x"), "echo a\\u{1b}[2J …");
        assert_eq!(script_text(&"x".repeat(80)), format!("{} …", "x".repeat(SCRIPT_CHARS)));
    }
}
