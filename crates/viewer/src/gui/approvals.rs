//! What a designated approver does in the viewer: the requests waiting for them, each with its
//! exact command and the technician's why, approved or denied with one click. Their viewer
//! offers nothing they may not do (no Run tab, no run buttons).

use egui::{RichText, Ui};

use super::app::ViewerApp;
use super::backend::Action;
use super::widgets::{hostile_block, time};

impl ViewerApp {
    /// Whether this node is a designated approver rather than a technician.
    pub fn is_approver(&self) -> bool {
        self.snapshot.role == Some(caisey_doc::fleet::Role::Approver)
    }

    pub(super) fn approvals_tab(&mut self, ui: &mut Ui) {
        let waiting = self.snapshot.awaiting.clone();
        if waiting.is_empty() {
            ui.label("Nothing is waiting for your approval.");
            ui.label(RichText::new("Your past decisions are in the sessions they belong to (Sessions tab).").weak());
            return;
        }
        ui.heading(format!("{} request(s) waiting for you", waiting.len()));
        let now = caisey_peer::now_ms();
        egui::ScrollArea::vertical().id_salt("approvals").auto_shrink([false, false]).show(ui, |ui| {
            for a in waiting {
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.label(
                        RichText::new(format!("{} asks to run a command on {}", a.technician, a.machine)).strong(),
                    );
                    let left = a.expires_at.saturating_sub(now) / 1000;
                    ui.label(format!(
                        "session {} · asked {} · expires in {left} s · code {}",
                        a.session_name,
                        time(a.requested_at),
                        a.id.short()
                    ));
                    if !a.description.trimmed().is_empty() {
                        ui.label("Why:");
                        hostile_block(ui, ("why", a.id), &a.description.visible(), 100.0);
                    }
                    ui.label(format!("The command ({}), exactly as it will run:", a.shell));
                    hostile_block(ui, ("script", a.id), &a.script, 200.0);
                    ui.horizontal(|ui| {
                        let code = a.id.to_hex();
                        if ui.button(format!("Approve {}", a.id.short())).clicked() {
                            self.send(Action::Decide { code: code.clone(), approve: true });
                        }
                        if ui.button(format!("Deny {}", a.id.short())).clicked() {
                            self.send(Action::Decide { code, approve: false });
                        }
                    });
                });
                ui.add_space(8.0);
            }
        });
        // The countdowns move.
        ui.ctx().request_repaint_after(std::time::Duration::from_secs(1));
    }
}
