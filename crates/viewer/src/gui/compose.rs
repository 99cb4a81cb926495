//! The Run tab: compose a command for a machine or a group, send it, and for a group watch one
//! row per machine fill in as each one answers.

use std::time::Duration;

use caisey_doc::session::{CommandSpec, Shell};
use caisey_doc::text::visible_line;
use egui::{RichText, Ui};

use super::app::ViewerApp;
use super::backend::Action;
use super::widgets::{labelled_input, output_view};
use crate::tech::{RunRequest, Targets};

/// How long the endpoint user has to decide.
const APPROVAL_WINDOW: Duration = Duration::from_secs(10 * 60);

impl ViewerApp {
    pub(super) fn run_tab(&mut self, ui: &mut Ui) {
        egui::Panel::top("compose").show(ui, |ui| self.compose_form(ui));
        egui::CentralPanel::default().show(ui, |ui| self.group_rows(ui));
    }

    fn compose_form(&mut self, ui: &mut Ui) {
        let c = &mut self.compose;
        ui.horizontal(|ui| {
            // Switching between machines and a group starts the choice afresh.
            if ui.radio_value(&mut c.to_group, false, "Machines").changed()
                | ui.radio_value(&mut c.to_group, true, "Group").changed()
            {
                c.target.clear();
            }
            let label = ui.label("Target");
            let options: Vec<String> = if c.to_group {
                self.snapshot.groups.clone()
            } else {
                // The name the machine is looked up by, exactly; shown escaped below.
                self.snapshot.machines.iter().map(|m| m.name.as_unescaped_str().to_owned()).collect()
            };
            let shown = if c.target.is_empty() { "choose…".to_string() } else { visible_line(&c.target) };
            let to_group = c.to_group;
            egui::ComboBox::from_id_salt("target")
                .selected_text(shown)
                // Machines are picked several at a time: the list stays open while they are ticked.
                .close_behavior(egui::PopupCloseBehavior::CloseOnClickOutside)
                .show_ui(ui, |ui| {
                    for o in options {
                        let text = visible_line(&o);
                        if to_group {
                            if ui.selectable_value(&mut c.target, o, text).clicked() {
                                c.in_group_run = false;
                            }
                            continue;
                        }
                        let mut picked: Vec<String> =
                            c.target.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect();
                        let mut on = picked.contains(&o);
                        if ui.checkbox(&mut on, text).changed() {
                            if on {
                                picked.push(o);
                            } else {
                                picked.retain(|p| *p != o);
                            }
                            c.target = picked.join(", ");
                            c.in_group_run = false;
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            let label = ui.label("Shell");
            egui::ComboBox::from_id_salt("shell")
                .selected_text(c.shell.to_string())
                .show_ui(ui, |ui| {
                    for s in [Shell::Sh, Shell::Bash, Shell::Pwsh, Shell::Cmd] {
                        ui.selectable_value(&mut c.shell, s, s.to_string());
                    }
                })
                .response
                .labelled_by(label.id);
            let label = ui.label("Timeout");
            ui.add(egui::DragValue::new(&mut c.timeout_secs).range(1..=86_400).suffix(" s")).labelled_by(label.id);
        });
        labelled_input(ui, "Session", &mut c.session, "name (optional; a named session is continued)");
        labelled_input(ui, "Labels", &mut c.labels, "comma-separated (optional)");
        labelled_input(ui, "Description", &mut c.description, "shown to the endpoint user: why you ask");
        let label = ui.label("Command");
        ui.add(
            egui::TextEdit::multiline(&mut c.script)
                .code_editor()
                .desired_rows(4)
                .desired_width(f32::INFINITY)
                .hint_text("e.g. df -h; uptime"),
        )
        .labelled_by(label.id);
        ui.horizontal(|ui| {
            let label = ui.label("Bring back files");
            ui.add(
                egui::TextEdit::multiline(&mut c.collect)
                    .desired_rows(1)
                    .desired_width(420.0)
                    .hint_text("absolute paths, one per line (optional): a dump, an exported log"),
            )
            .labelled_by(label.id);
            let label = ui.label("at most");
            ui.add(egui::DragValue::new(&mut c.collect_limit_mib).range(1..=65_536).suffix(" MiB"))
                .labelled_by(label.id);
        });
        ui.horizontal(|ui| {
            let ready = !c.target.is_empty() && !c.script.trim().is_empty();
            if ui.add_enabled(ready, egui::Button::new("Send")).clicked() {
                let req = RunRequest {
                    targets: {
                        let names: Vec<String> =
                            c.target.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect();
                        match (c.to_group, names.len(), c.in_group_run) {
                            (true, _, _) => Targets::Group(c.target.clone()),
                            (false, 1, false) => Targets::Machine(names[0].clone()),
                            _ => Targets::Machines(names),
                        }
                    },
                    session: Some(c.session.trim().to_string()).filter(|s| !s.is_empty()),
                    labels: c.labels.split(',').map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
                    command: CommandSpec {
                        shell: c.shell,
                        script: c.script.clone(),
                        cwd: None,
                        env: Default::default(),
                        timeout_ms: c.timeout_secs * 1000,
                        collect: {
                            let paths: Vec<String> = c
                                .collect
                                .lines()
                                .map(str::trim)
                                .filter(|p| !p.is_empty())
                                .map(str::to_string)
                                .collect();
                            (!paths.is_empty())
                                .then_some(caisey_doc::artifact::Collect { paths, limit: c.collect_limit_mib << 20 })
                        },
                    },
                    description: c.description.clone(),
                    approval_window: APPROVAL_WINDOW,
                };
                self.backend.send(Action::Ask(req));
            }
            if !ready {
                ui.label(RichText::new("choose a target and write a command").weak());
            }
        });
    }

    fn group_rows(&mut self, ui: &mut Ui) {
        let Some(run) = self.group_run.clone() else {
            ui.label("A run on a group shows one row per machine here, filling in as each answers.");
            return;
        };
        let done = run.rows.iter().filter(|r| r.is_done()).count();
        ui.heading(format!(
            "Group {}: {done} of {} machines done",
            visible_line(run.group.as_deref().unwrap_or("")),
            run.rows.len()
        ));
        egui::ScrollArea::vertical().id_salt("group-rows").auto_shrink([false, false]).show(ui, |ui| {
            egui::Grid::new("group-grid").num_columns(4).striped(true).spacing([16.0, 8.0]).show(ui, |ui| {
                for h in ["Machine", "Status", "Exit code", "Output"] {
                    ui.label(RichText::new(h).strong());
                }
                ui.end_row();
                for row in &run.rows {
                    if ui.link(row.machine.to_string()).on_hover_text("open this machine's session").clicked() {
                        self.open_session(row.session);
                    }
                    ui.label(&row.status);
                    let code = row.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "–".into());
                    let color = match row.exit_code {
                        Some(0) => ui.visuals().text_color(),
                        Some(_) => ui.visuals().error_fg_color,
                        None => ui.visuals().weak_text_color(),
                    };
                    ui.colored_label(color, code);
                    ui.vertical(|ui| {
                        ui.set_width(ui.available_width().max(360.0));
                        output_view(ui, ("group-output", row.request), &row.output, 90.0, true);
                    });
                    ui.end_row();
                }
            });
        });
    }
}
