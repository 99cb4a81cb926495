//! Small pieces every view uses: labelled inputs (so screen readers and UI tests find them by
//! name), timestamps, hostile text shown inert, and the virtualised output view.

use caisey_doc::session::Stream;
use caisey_doc::text::visible;
use egui::{Color32, RichText, ScrollArea, TextEdit, Ui};

use super::model::OutputBuf;

/// A one-line text input named by a visible label.
pub fn labelled_input(ui: &mut Ui, label: &str, value: &mut String, hint: &str) -> egui::Response {
    ui.horizontal(|ui| {
        let l = ui.label(label);
        ui.add(TextEdit::singleline(value).hint_text(hint).desired_width(f32::INFINITY)).labelled_by(l.id)
    })
    .inner
}

/// A timestamp as UTC, to the second.
pub fn time(ms: u64) -> String {
    caisey_peer::cli::format_time(ms)
}

/// "12 s ago", "3 min ago", "2 h ago", "4 days ago".
pub fn ago(ms: u64, now: u64) -> String {
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

pub fn duration(ms: u64) -> String {
    if ms < 10_000 { format!("{:.2} s", ms as f64 / 1000.0) } else { format!("{} s", ms / 1000) }
}

pub fn bytes(n: u64) -> String {
    caisey_peer::cli::format_size(n)
}

/// Text from another machine (a command, a description, a name), shown as data: control
/// characters and bidi overrides spelled out, in a frame of its own, never as UI.
pub fn hostile_block(ui: &mut Ui, id: impl std::hash::Hash + std::fmt::Debug, text: &str, max_height: f32) {
    let shown = visible(text);
    egui::Frame::group(ui.style()).fill(ui.visuals().extreme_bg_color).show(ui, |ui| {
        ScrollArea::both().id_salt(id).max_height(max_height).auto_shrink([false, true]).show(ui, |ui| {
            ui.add(egui::Label::new(RichText::new(shown).monospace()).wrap_mode(egui::TextWrapMode::Extend));
        });
    });
}

pub fn stream_color(ui: &Ui, stream: Stream) -> Color32 {
    match stream {
        Stream::Stdout => ui.visuals().text_color(),
        Stream::Stderr => ui.visuals().warn_fg_color,
    }
}

/// A command's output: only the rows in view are laid out, so a session with megabytes of
/// output costs the same per frame as one with ten lines. Sticks to the bottom while following.
pub fn output_view(
    ui: &mut Ui,
    id: impl std::hash::Hash + std::fmt::Debug,
    out: &OutputBuf,
    height: f32,
    follow: bool,
) {
    let row_height = ui.text_style_height(&egui::TextStyle::Monospace);
    egui::Frame::group(ui.style()).fill(ui.visuals().extreme_bg_color).show(ui, |ui| {
        ScrollArea::both().id_salt(id).max_height(height).auto_shrink([false, true]).stick_to_bottom(follow).show_rows(
            ui,
            row_height,
            out.rows(),
            |ui, rows| {
                for i in rows {
                    if let Some(line) = out.row(i) {
                        let text = RichText::new(&line.text).monospace().color(stream_color(ui, line.stream));
                        ui.add(egui::Label::new(text).wrap_mode(egui::TextWrapMode::Extend));
                    }
                }
            },
        );
    });
}
