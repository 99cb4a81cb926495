//! The Fleet tab: machines with search and group filter, and the card of the one selected.

use caisey_doc::text::visible_line;
use caisey_peer::now_ms;
use egui::{RichText, Ui};

use super::app::{Tab, ViewerApp};
use super::widgets::{ago, bytes, labelled_input, time};
use crate::tech::{Machine, MachinePath};

/// How a machine is reached right now.
pub fn connectivity(m: &Machine) -> &'static str {
    match m.path {
        MachinePath::Direct => "direct",
        MachinePath::Relayed => "relayed",
        MachinePath::ThroughRelay => "via relay",
        MachinePath::Offline => "offline",
    }
}

/// A green dot for online, a hollow grey one for offline.
fn status_dot(ui: &mut Ui, online: bool) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    let painter = ui.painter();
    if online {
        painter.circle_filled(rect.center(), 5.0, egui::Color32::from_rgb(60, 170, 90));
    } else {
        painter.circle_stroke(rect.center(), 4.5, egui::Stroke::new(1.0, ui.visuals().weak_text_color()));
    }
}

impl ViewerApp {
    pub(super) fn fleet_tab(&mut self, ui: &mut Ui) {
        egui::Panel::left("machines").resizable(true).default_size(340.0).show(ui, |ui| {
            self.machine_list(ui);
        });
        egui::CentralPanel::default().show(ui, |ui| {
            let selected = self.selected_machine.and_then(|n| self.snapshot.machines.iter().find(|m| m.node == n));
            match selected.cloned() {
                Some(m) => self.machine_card(ui, &m),
                None => {
                    ui.label("Select a machine to see its card.");
                }
            }
        });
    }

    /// The machines the search and group filter leave.
    pub fn visible_machines(&self) -> Vec<&Machine> {
        let q = self.fleet_search.trim().to_lowercase();
        self.snapshot
            .machines
            .iter()
            .filter(|m| self.group_filter.as_ref().is_none_or(|g| m.groups.contains(g)))
            .filter(|m| q.is_empty() || m.matches(&q))
            .collect()
    }

    fn machine_list(&mut self, ui: &mut Ui) {
        labelled_input(ui, "Search machines", &mut self.fleet_search, "name, group, hostname or OS");
        ui.horizontal(|ui| {
            let label = ui.label("Group");
            let shown = self.group_filter.clone().unwrap_or_else(|| "all groups".into());
            egui::ComboBox::from_id_salt("group-filter")
                .selected_text(visible_line(&shown))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.group_filter, None, "all groups");
                    for g in self.snapshot.groups.clone() {
                        let text = visible_line(&g);
                        ui.selectable_value(&mut self.group_filter, Some(g), text);
                    }
                })
                .response
                .labelled_by(label.id);
        });
        ui.separator();
        let now = now_ms();
        let rows: Vec<(caisey_doc::id::NodeId, String, bool)> = self
            .visible_machines()
            .iter()
            .map(|m| {
                let seen = m.last_seen.map(|t| ago(t, now)).unwrap_or_else(|| "never seen".into());
                let state = if m.online { format!("online ({})", connectivity(m)) } else { format!("offline, {seen}") };
                (m.node, format!("{}   {state}", m.name), m.online)
            })
            .collect();
        if rows.is_empty() {
            ui.label(if self.snapshot.machines.is_empty() {
                "No machines enrolled yet."
            } else {
                "No machine matches."
            });
        }
        egui::ScrollArea::vertical().id_salt("machine-list").show(ui, |ui| {
            for (node, text, online) in rows {
                ui.horizontal(|ui| {
                    status_dot(ui, online);
                    if ui.selectable_label(self.selected_machine == Some(node), text).clicked() {
                        self.selected_machine = Some(node);
                    }
                });
            }
        });
    }

    fn machine_card(&mut self, ui: &mut Ui, m: &Machine) {
        let now = now_ms();
        ui.heading(m.name.to_string());
        egui::Grid::new("machine-card").num_columns(2).striped(true).spacing([24.0, 6.0]).show(ui, |ui| {
            let mut row = |k: &str, v: String| {
                ui.label(RichText::new(k).strong());
                ui.label(v);
                ui.end_row();
            };
            row("Status", if m.online { "online".into() } else { "offline".into() });
            row("Connectivity", connectivity(m).into());
            row("Last seen", m.last_seen.map(|t| format!("{} ({})", ago(t, now), time(t))).unwrap_or("never".into()));
            row("Groups", if m.groups.is_empty() { "none".into() } else { visible_line(&m.groups.join(", ")) });
            row("Key", m.node.short());
            if let Some(c) = &m.card {
                row("Hostname", c.hostname.to_string());
                row("OS", format!("{} {}", c.os_name, c.os_version));
                row("Kernel", c.kernel.to_string());
                // Live values ride on the heartbeat; the card's are from when it was taken.
                let seen = m.last_seen.unwrap_or(c.at);
                let (up, used, total) = match &m.vitals {
                    Some(v) => (v.uptime_secs, v.memory_used, v.memory_total),
                    None => (c.uptime_secs, c.memory_used, c.memory_total),
                };
                let as_of = if m.vitals.is_some() { seen } else { c.at };
                row(
                    "Uptime",
                    format!(
                        "{} days {} h {} min ({})",
                        up / 86_400,
                        up % 86_400 / 3600,
                        up % 3600 / 60,
                        ago(as_of, now)
                    ),
                );
                row("CPU", format!("{} × {}", c.cpu_count, c.cpu));
                row("Memory", format!("{} used of {}", bytes(used), bytes(total)));
                if let Some(v) = &m.vitals {
                    row("Disk", format!("{} used of {} (/)", bytes(v.disk_used), bytes(v.disk_total)));
                    let users =
                        if v.users.is_empty() { "nobody".to_string() } else { visible_line(&v.users.join(", ")) };
                    row("Logged in", users);
                    row("Addresses", visible_line(&v.ips.join(", ")));
                }
                row(
                    "Software",
                    if c.software.is_empty() {
                        "not known".into()
                    } else {
                        format!("{} applications", c.software.len())
                    },
                );
            } else {
                row("Card", "not received yet".into());
            }
        });
        ui.add_space(8.0);
        // Only a technician runs commands; an approver approves them.
        ui.horizontal(|ui| {
            if self.is_approver() {
                return;
            }
            if ui.button(format!("Run a command on {}", m.name)).clicked() {
                self.compose.target = m.name.as_unescaped_str().to_owned();
                self.compose.in_group_run = false;
                self.compose.to_group = false;
                self.tab = Tab::Run;
            }
            if ui.button("Command history").clicked() {
                self.show_history(Some(m.node), String::new());
            }
        });
        if let Some(c) = m.card.as_ref().filter(|c| !c.software.is_empty()) {
            ui.add_space(8.0);
            egui::CollapsingHeader::new(format!("Installed applications ({})", c.software.len())).show(ui, |ui| {
                let row_h = ui.text_style_height(&egui::TextStyle::Body);
                egui::ScrollArea::vertical().id_salt("software").max_height(300.0).show_rows(
                    ui,
                    row_h,
                    c.software.len(),
                    |ui, range| {
                        for s in &c.software[range] {
                            ui.label(visible_line(&format!("{}  {}", s.name, s.version)));
                        }
                    },
                );
            });
        }
    }
}
