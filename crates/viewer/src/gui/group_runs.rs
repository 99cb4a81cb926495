//! Group runs as investigations in the viewer: every group run this node holds (after any
//! restart, wherever it was started), one of them side by side, with the machines whose output
//! is identical gathered together.

use caisey_doc::text::visible_line;
use egui::{RichText, Ui};

use super::app::ViewerApp;
use super::backend::Action;
use super::widgets::{ago, hostile_block};

impl ViewerApp {
    pub(super) fn group_runs_tab(&mut self, ui: &mut Ui) {
        let now = caisey_peer::now_ms();
        let runs = self.snapshot.group_runs.clone();
        if runs.is_empty() {
            ui.label("No group runs yet: run a command on a group (or several machines) from the Run tab.");
            return;
        }
        egui::Panel::left("group-run-list").resizable(true).default_size(320.0).show(ui, |ui| {
            for r in &runs {
                let text = format!("{}  ({} machines, {})", r.name, r.machines.len(), ago(r.last_activity, now));
                let open = self.group_run_open.as_ref().is_some_and(|o| o.run == r.run);
                if ui.selectable_label(open, text).clicked() {
                    self.send(Action::OpenGroupRun(r.run.to_hex()));
                }
            }
        });
        egui::CentralPanel::default().show(ui, |ui| {
            let Some(run) = self.group_run_open.clone() else {
                ui.label("Choose a group run.");
                return;
            };
            ui.heading(run.name.to_string());
            // The names the machines and the session are looked up by, exactly as they are.
            let failed: Vec<String> = run
                .machines
                .iter()
                .filter(|m| m.exit_code != Some(0))
                .map(|m| m.machine.as_unescaped_str().to_owned())
                .collect();
            if !failed.is_empty()
                && ui.button(format!("Run a command on the {} that did not exit 0", failed.len())).clicked()
            {
                self.compose.target = failed.join(", ");
                self.compose.to_group = false;
                self.compose.in_group_run = true;
                self.compose.session = run.name.as_unescaped_str().to_owned();
                self.tab = super::app::Tab::Run;
            }
            egui::ScrollArea::vertical().id_salt("group-run").auto_shrink([false, false]).show(ui, |ui| {
                egui::Grid::new("group-run-grid").num_columns(4).striped(true).spacing([16.0, 6.0]).show(ui, |ui| {
                    for h in ["Machine", "Status", "Exit code", "Answered by"] {
                        ui.label(RichText::new(h).strong());
                    }
                    ui.end_row();
                    for m in &run.machines {
                        if ui.link(m.machine.to_string()).on_hover_text("open this machine's session").clicked() {
                            self.open_session(m.session);
                        }
                        ui.label(&m.status);
                        ui.label(m.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "–".into()));
                        ui.label(visible_line(m.decided_by.as_deref().unwrap_or("–")));
                        ui.end_row();
                    }
                });
                ui.add_space(8.0);
                for (i, same) in run.outputs.iter().enumerate() {
                    let n = same.machines.len();
                    ui.label(
                        RichText::new(format!(
                            "{n} machine{} with this output: {}",
                            if n == 1 { "" } else { "s" },
                            caisey_doc::text::join(&same.machines, ", ")
                        ))
                        .strong(),
                    );
                    hostile_block(ui, ("same-output", i), &same.output, 200.0);
                }
            });
        });
    }
}
