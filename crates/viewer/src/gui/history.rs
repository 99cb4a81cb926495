//! The History tab: the runs of one command over weeks (on one machine or all), their times and
//! exit codes, and a line diff between the outputs of two of them.

use caisey_doc::text::visible_line;
use egui::{RichText, Ui};

use super::app::ViewerApp;
use super::backend::Action;
use super::widgets::{hostile_block, time};
use crate::tech::DiffLine;

impl ViewerApp {
    pub(super) fn history_tab(&mut self, ui: &mut Ui) {
        let machine_name = self
            .history
            .machine
            .and_then(|n| self.snapshot.machines.iter().find(|m| m.node == n))
            .map(|m| m.name.to_string());
        ui.heading(match &machine_name {
            Some(m) => format!("Command history on {m}"),
            None => "Command history".to_string(),
        });
        if let Some(machine) = self.history.machine
            && !self.history.commands.is_empty()
        {
            let label = ui.label("Command");
            let shown =
                if self.history.script.is_empty() { "choose…".into() } else { visible_line(&self.history.script) };
            let mut chosen = None;
            egui::ComboBox::from_id_salt("history-command")
                .selected_text(shown)
                .width(480.0)
                .show_ui(ui, |ui| {
                    for (script, n) in &self.history.commands {
                        if ui
                            .selectable_label(
                                *script == self.history.script,
                                format!("{} ({n}×)", visible_line(script)),
                            )
                            .clicked()
                        {
                            chosen = Some(script.clone());
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            if let Some(script) = chosen {
                self.show_history(Some(machine), script);
            }
        }
        if self.history.script.is_empty() {
            ui.label("Choose a command (or open a session and press \"Runs over time\").");
            return;
        }
        hostile_block(ui, "history-script", &self.history.script, 80.0);
        if self.history.runs.is_empty() {
            ui.label("No runs found.");
            return;
        }
        ui.label("Pick an older and a newer run to compare their output.");
        let mut open = None;
        egui::Grid::new("runs").num_columns(6).striped(true).spacing([16.0, 6.0]).show(ui, |ui| {
            for h in ["Older", "Newer", "When", "Machine", "Exit code", "Session"] {
                ui.label(RichText::new(h).strong());
            }
            ui.end_row();
            for (i, run) in self.history.runs.iter().enumerate() {
                ui.radio_value(&mut self.history.old, Some(i), "");
                ui.radio_value(&mut self.history.new, Some(i), "");
                ui.label(time(run.requested_at));
                ui.label(run.machine.to_string());
                ui.label(run.exit_code.map(|c| c.to_string()).unwrap_or_else(|| run.status.clone()));
                if ui.link(run.session_name.to_string()).clicked() {
                    open = Some(run.session);
                }
                ui.end_row();
            }
        });
        if let Some(s) = open {
            self.open_session(s);
        }
        let (old, new) = (self.history.old, self.history.new);
        if let (Some(a), Some(b)) = (old, new)
            && a != b
            && ui.button("Compare output").clicked()
        {
            let (a, b) = (&self.history.runs[a], &self.history.runs[b]);
            self.send(Action::Diff { old: (a.session, a.request), new: (b.session, b.request) });
        }
        if let Some(diff) = &self.history.diff {
            let changed = diff.iter().filter(|d| !matches!(d, DiffLine::Same(_))).count();
            ui.label(format!("{changed} line(s) differ"));
            let row_h = ui.text_style_height(&egui::TextStyle::Monospace);
            egui::Frame::group(ui.style()).fill(ui.visuals().extreme_bg_color).show(ui, |ui| {
                egui::ScrollArea::both().id_salt("diff").auto_shrink([false, true]).show_rows(
                    ui,
                    row_h,
                    diff.len(),
                    |ui, range| {
                        for d in &diff[range] {
                            let (mark, t, color) = match d {
                                DiffLine::Same(t) => (' ', t, ui.visuals().weak_text_color()),
                                DiffLine::Removed(t) => ('-', t, ui.visuals().error_fg_color),
                                DiffLine::Added(t) => ('+', t, egui::Color32::from_rgb(60, 170, 90)),
                            };
                            let line = format!("{mark} {}", caisey_doc::text::visible(t));
                            ui.add(
                                egui::Label::new(RichText::new(line).monospace().color(color))
                                    .wrap_mode(egui::TextWrapMode::Extend),
                            );
                        }
                    },
                );
            });
        }
    }
}
