//! The "Values over time" section of the Session tab: the numbers a session's runs yielded
//! (`caisey-probe NAME=VALUE` lines, or a schedule's patterns), plotted run after run with one
//! line per machine (a group run's session brings every machine of the run), late and failed
//! runs marked apart, a threshold the technician sets, and a table of the change from each
//! machine's previous run — so a check that runs every week reads as a trend, not as a pile of
//! transcripts.
//!
//! The node reads the series and the backend sends it again whenever it may have changed; this
//! only draws what it holds. Machine names and units come from peers and are shown escaped.

use std::collections::BTreeSet;

use caisey_doc::id::DocId;
use caisey_doc::session::SessionView;
use caisey_doc::text::visible_line;
use egui::{Color32, RichText, Ui};
use egui_plot::{Corner, HLine, HoverPosition, Legend, Line, LineStyle, MarkerShape, Plot, Points};

use super::app::ViewerApp;
use super::backend::Action;
use super::model::OpenSession;
use super::widgets::time;
use crate::schedules::ProbePoint;

/// Machines' lines take these colours in turn: none of them red, amber or magenta, which mark
/// failed runs, late runs and the threshold.
const MACHINE_COLORS: [Color32; 6] = [
    Color32::from_rgb(70, 130, 220),
    Color32::from_rgb(60, 170, 90),
    Color32::from_rgb(40, 170, 170),
    Color32::from_rgb(160, 120, 80),
    Color32::from_rgb(140, 140, 140),
    Color32::from_rgb(120, 180, 240),
];
const LATE_COLOR: Color32 = Color32::from_rgb(240, 170, 30);
const FAILED_COLOR: Color32 = Color32::from_rgb(235, 50, 50);
const THRESHOLD_COLOR: Color32 = Color32::from_rgb(215, 80, 215);
/// The latest time a tick can name (the end of the year 9999).
const LAST_TICK_SECS: f64 = 253_402_300_799.0;

/// What the section shows: which probe of which session, its values as last read, and the
/// threshold as typed.
#[derive(Debug, Clone, Default)]
pub struct ProbePlot {
    pub session: Option<DocId>,
    pub name: Option<String>,
    /// The values of `name`, oldest first; `None` until the backend has sent them.
    pub points: Option<Vec<ProbePoint>>,
    /// Values above it are flagged; empty for none.
    pub threshold: String,
}

impl ProbePlot {
    /// Takes a series the backend read, if it is still the one shown.
    pub fn take(&mut self, session: DocId, name: &str, points: Vec<ProbePoint>) {
        if self.session == Some(session) && self.name.as_deref() == Some(name) {
            self.points = Some(points);
        }
    }

    /// Shows probe `name` of `session` from now on (its values are to be asked for).
    fn choose(&mut self, session: DocId, name: String) {
        if self.session != Some(session) {
            self.threshold.clear();
        }
        self.session = Some(session);
        self.name = Some(name);
        self.points = None;
    }
}

/// How a run's value is marked on the plot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    OnTime,
    /// Ran after its due time (the machine was off or asleep when it fell due).
    Late,
    /// Did not exit with code 0: its value may be partial.
    Failed,
}

pub fn mark(point: &ProbePoint) -> Mark {
    if point.exit_code != Some(0) {
        Mark::Failed
    } else if point.late {
        Mark::Late
    } else {
        Mark::OnTime
    }
}

/// The probe names the session's runs yielded, sorted.
pub fn probe_names(view: &SessionView) -> Vec<String> {
    let names: BTreeSet<&str> =
        view.commands.iter().filter_map(|c| c.end.as_ref()).flat_map(|e| &e.probes).map(|p| p.name.as_str()).collect();
    names.into_iter().map(str::to_string).collect()
}

/// The threshold as typed: `None` when nothing is typed, an error saying what to type when it
/// is not a number.
pub fn parse_threshold(text: &str) -> Result<Option<f64>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<f64>() {
        Ok(t) if t.is_finite() => Ok(Some(t)),
        _ => Err(format!("{:?} is not a number; type one, e.g. 500", visible_line(text))),
    }
}

/// A value as people read it: whole numbers without decimals, others to three places at most,
/// very small or very large ones in scientific notation.
pub fn format_value(v: f64) -> String {
    if v != 0.0 && (v.abs() < 0.001 || v.abs() >= 1e15) {
        return format!("{v:e}");
    }
    if v.fract() == 0.0 {
        return format!("{v:.0}");
    }
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The change from the machine's previous run, signed; "—" for its first.
pub fn format_change(change: Option<f64>) -> String {
    match change {
        None => "—".into(),
        Some(c) if c > 0.0 => format!("+{}", format_value(c)),
        Some(c) => format_value(c),
    }
}

/// A value with its unit (escaped: the unit is the machine's word).
pub fn value_text(point: &ProbePoint) -> String {
    match &point.unit {
        Some(unit) => format!("{} {}", format_value(point.value), visible_line(unit)),
        None => format_value(point.value),
    }
}

/// What the Flags column says of a run.
pub fn flags(point: &ProbePoint, threshold: Option<f64>) -> String {
    let mut said = Vec::new();
    if point.late {
        said.push("late run".to_string());
    }
    if mark(point) == Mark::Failed {
        said.push(match point.exit_code {
            Some(code) => format!("failed: exit code {code}"),
            None => format!("failed: {}", point.status),
        });
    }
    if threshold.is_some_and(|t| point.value > t) {
        said.push("above threshold".into());
    }
    said.join(", ")
}

/// Where a run sits on the x axis: seconds since the epoch.
fn x_of(point: &ProbePoint) -> f64 {
    point.at as f64 / 1000.0
}

/// An x-axis tick (UTC): the time of day when the plot spans less than a day, the date and
/// minute when it spans more.
pub fn time_tick(secs: f64, span_secs: f64) -> String {
    if !(0.0..=LAST_TICK_SECS).contains(&secs) {
        return String::new();
    }
    // "2026-11-30 21:49:05Z"
    let full = time((secs * 1000.0) as u64);
    let part = if span_secs < 86_400.0 { full.get(11..19) } else { full.get(5..16) };
    part.unwrap_or_default().to_string()
}

/// One line per run under the pointer: machine, time, value, change, how it ended.
fn hover_text(points: &[ProbePoint], pos: &HoverPosition<'_>) -> Option<String> {
    let HoverPosition::NearDataPoint { position, .. } = pos else { return None };
    let runs: Vec<String> = points
        .iter()
        .filter(|p| x_of(p) == position.x && p.value == position.y)
        .map(|p| {
            let ended = p.exit_code.map(|c| format!("exit code {c}")).unwrap_or_else(|| p.status.clone());
            let late = if p.late { ", late" } else { "" };
            format!("{} at {}\n{} ({}), {ended}{late}", p.machine, time(p.at), value_text(p), format_change(p.change))
        })
        .collect();
    (!runs.is_empty()).then(|| runs.join("\n"))
}

impl ViewerApp {
    /// The section, when the session's runs yielded values; nothing otherwise.
    pub(super) fn values_over_time_ui(&mut self, ui: &mut Ui, open: &OpenSession) {
        let names = probe_names(&open.view);
        let Some(first) = names.first() else { return };
        let shown = self.probes.name.as_ref().filter(|n| names.contains(n));
        if self.probes.session != Some(open.id) || shown.is_none() {
            self.watch_probe(open.id, first.clone());
        }
        egui::CollapsingHeader::new("Values over time").id_salt("values-over-time").default_open(true).show(ui, |ui| {
            self.probe_controls_ui(ui, open.id, &names);
            let threshold = parse_threshold(&self.probes.threshold).ok().flatten();
            match &self.probes.points {
                None => {
                    ui.label("Reading the values…");
                }
                Some(points) if points.is_empty() => {
                    ui.label("No values of this probe yet.");
                }
                Some(points) => {
                    probe_plot_ui(ui, points, threshold);
                    probe_table_ui(ui, points, threshold);
                }
            }
        });
    }

    fn watch_probe(&mut self, session: DocId, name: String) {
        self.probes.choose(session, name.clone());
        self.send(Action::WatchProbe { session, name });
    }

    /// The probe to show, the threshold, and what the threshold flags.
    fn probe_controls_ui(&mut self, ui: &mut Ui, session: DocId, names: &[String]) {
        let mut chosen = None;
        ui.horizontal(|ui| {
            let label = ui.label("Probe");
            let current = self.probes.name.as_deref().map(visible_line).unwrap_or_default();
            egui::ComboBox::from_id_salt("probe-name")
                .selected_text(current)
                .show_ui(ui, |ui| {
                    for name in names {
                        let selected = self.probes.name.as_ref() == Some(name);
                        if ui.selectable_label(selected, visible_line(name)).clicked() && !selected {
                            chosen = Some(name.clone());
                        }
                    }
                })
                .response
                .labelled_by(label.id);
            ui.separator();
            let label = ui.label("Threshold");
            ui.add(egui::TextEdit::singleline(&mut self.probes.threshold).hint_text("none").desired_width(90.0))
                .labelled_by(label.id);
            match (parse_threshold(&self.probes.threshold), &self.probes.points) {
                (Err(e), _) => {
                    ui.colored_label(ui.visuals().error_fg_color, e);
                }
                (Ok(Some(t)), Some(points)) => {
                    let above = points.iter().filter(|p| p.value > t).count();
                    let text = format!("{above} of {} values above {}", points.len(), format_value(t));
                    let color = if above > 0 { ui.visuals().error_fg_color } else { ui.visuals().text_color() };
                    ui.colored_label(color, text);
                }
                (Ok(None), Some(points)) => {
                    ui.label(
                        RichText::new(format!("{} values; set a threshold to flag high ones", points.len())).weak(),
                    );
                }
                (Ok(_), None) => {}
            }
        });
        if let Some(name) = chosen {
            self.watch_probe(session, name);
        }
    }
}

/// The plot: x is when each run was due (or asked), y its value; a line and round markers per
/// machine, amber diamonds for late runs, red crosses for failed ones, a dashed magenta
/// threshold line and a ring round every value above it. Hovering a marker names the run.
fn probe_plot_ui(ui: &mut Ui, points: &[ProbePoint], threshold: Option<f64>) {
    let mut machines: Vec<&str> = Vec::new();
    for p in points {
        if !machines.contains(&p.machine.as_unescaped_str()) {
            machines.push(p.machine.as_unescaped_str());
        }
    }
    let unit = points.iter().find_map(|p| p.unit.as_deref()).map(visible_line).unwrap_or_default();
    let xy = |keep: &dyn Fn(&ProbePoint) -> bool| -> Vec<[f64; 2]> {
        points.iter().filter(|p| keep(p)).map(|p| [x_of(p), p.value]).collect()
    };
    let late = xy(&|p| mark(p) == Mark::Late);
    let failed = xy(&|p| mark(p) == Mark::Failed);
    let above = threshold.map(|t| xy(&|p| p.value > t)).unwrap_or_default();
    let mut plot = Plot::new("probe-plot")
        .height(240.0)
        // Top left: a value that grows (the trend worth watching) ends top right.
        .legend(Legend::default().position(Corner::LeftTop).follow_insertion_order(true))
        .x_axis_label("run time (UTC)")
        .x_axis_formatter(|mark, range| time_tick(mark.value, range.end() - range.start()))
        .label_formatter(|pos| hover_text(points, pos))
        .allow_scroll(false);
    if !unit.is_empty() {
        plot = plot.y_axis_label(unit);
    }
    if let Some(t) = threshold {
        plot = plot.include_y(t);
    }
    plot.show(ui, |plot_ui| {
        for (i, machine) in machines.iter().enumerate() {
            let color = MACHINE_COLORS[i % MACHINE_COLORS.len()];
            let this = |p: &ProbePoint| p.machine.as_unescaped_str() == *machine;
            let shown_name = points.iter().find(|p| this(p)).map(|p| p.machine.to_string()).unwrap_or_default();
            plot_ui.line(Line::new(shown_name.clone(), xy(&this)).color(color).width(2.0));
            let on_time = xy(&|p| this(p) && mark(p) == Mark::OnTime);
            plot_ui.points(Points::new(shown_name, on_time).color(color).radius(4.0).shape(MarkerShape::Circle));
        }
        if !late.is_empty() {
            let late = Points::new("late run", late).color(LATE_COLOR).radius(6.0).shape(MarkerShape::Diamond);
            plot_ui.points(late);
        }
        if !failed.is_empty() {
            let failed = Points::new("failed run", failed).color(FAILED_COLOR).radius(6.0).shape(MarkerShape::Cross);
            plot_ui.points(failed);
        }
        if let Some(t) = threshold {
            let line = HLine::new(format!("threshold {}", format_value(t)), t)
                .color(THRESHOLD_COLOR)
                .width(1.5)
                .style(LineStyle::dashed_loose());
            plot_ui.hline(line);
            if !above.is_empty() {
                let rings = Points::new("over the threshold", above)
                    .color(THRESHOLD_COLOR)
                    .radius(10.0)
                    .filled(false)
                    .shape(MarkerShape::Circle);
                plot_ui.points(rings);
            }
        }
    });
}

/// Every run's value, newest first, with the change from its machine's previous run.
fn probe_table_ui(ui: &mut Ui, points: &[ProbePoint], threshold: Option<f64>) {
    egui::ScrollArea::vertical().id_salt("probe-table").max_height(170.0).auto_shrink([false, true]).show(ui, |ui| {
        egui::Grid::new("probe-values").num_columns(6).striped(true).spacing([24.0, 4.0]).show(ui, |ui| {
            for h in ["Run time", "Machine", "Value", "Change", "Exit", "Flags"] {
                ui.label(RichText::new(h).strong());
            }
            ui.end_row();
            for p in points.iter().rev() {
                let high = threshold.is_some_and(|t| p.value > t);
                ui.label(time(p.at));
                ui.label(p.machine.to_string());
                let value = RichText::new(value_text(p));
                ui.label(if high { value.color(ui.visuals().error_fg_color).strong() } else { value });
                ui.label(format_change(p.change));
                ui.label(p.exit_code.map(|c| c.to_string()).unwrap_or_else(|| p.status.clone()));
                let flags = flags(p, threshold);
                let color = match mark(p) {
                    Mark::Failed => ui.visuals().error_fg_color,
                    Mark::Late => ui.visuals().warn_fg_color,
                    Mark::OnTime if high => ui.visuals().error_fg_color,
                    Mark::OnTime => ui.visuals().text_color(),
                };
                ui.colored_label(color, flags);
                ui.end_row();
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisey_doc::id::Id128;

    fn point(value: f64, change: Option<f64>, exit_code: Option<i32>, late: bool) -> ProbePoint {
        ProbePoint {
            machine: "ws-01".into(),
            session: Id128([1; 16]),
            code: Id128([2; 16]),
            at: 1_764_540_000_000,
            late,
            status: if exit_code.is_some() { "exited".into() } else { "timed out".into() },
            exit_code,
            value,
            unit: None,
            change,
        }
    }

    #[test]
    fn values_and_changes_read_as_people_write_them() {
        assert_eq!(format_value(1600.0), "1600");
        assert_eq!(format_value(10.5), "10.5");
        assert_eq!(format_value(0.1 + 0.2), "0.3");
        assert_eq!(format_value(-3.25), "-3.25");
        assert_eq!(format_value(0.0001), "1e-4");
        assert_eq!(format_change(Some(500.0)), "+500");
        assert_eq!(format_change(Some(-0.5)), "-0.5");
        assert_eq!(format_change(Some(0.0)), "0");
        assert_eq!(format_change(None), "—");
    }

    #[test]
    fn a_unit_from_the_machine_is_shown_escaped() {
        let mut p = point(3.0, None, Some(0), false);
        p.unit = Some("MB\u{1b}[2J\u{202e}".into());
        assert_eq!(value_text(&p), "3 MB\\u{1b}[2J\\u{202e}");
    }

    #[test]
    fn a_threshold_is_a_number_or_nothing() {
        assert_eq!(parse_threshold(" 500 "), Ok(Some(500.0)));
        assert_eq!(parse_threshold(""), Ok(None));
        assert!(parse_threshold("lots").is_err());
        assert!(parse_threshold("inf").is_err());
    }

    #[test]
    fn failed_and_late_runs_are_marked_apart_and_flagged() {
        assert_eq!(mark(&point(1.0, None, Some(0), false)), Mark::OnTime);
        assert_eq!(mark(&point(1.0, None, Some(0), true)), Mark::Late);
        assert_eq!(mark(&point(1.0, None, Some(3), true)), Mark::Failed);
        assert_eq!(mark(&point(1.0, None, None, false)), Mark::Failed);
        assert_eq!(flags(&point(900.0, None, Some(3), false), Some(500.0)), "failed: exit code 3, above threshold");
        assert_eq!(flags(&point(900.0, None, None, true), None), "late run, failed: timed out");
        assert_eq!(flags(&point(500.0, None, Some(0), false), Some(500.0)), "", "at the threshold is not above it");
    }

    #[test]
    fn ticks_name_the_time_of_day_or_the_date() {
        let secs = 1_764_540_000.0; // 2025-11-30 22:00:00 UTC
        assert_eq!(time_tick(secs, 60.0), "22:00:00");
        assert_eq!(time_tick(secs, 7.0 * 86_400.0), "11-30 22:00");
        assert_eq!(time_tick(-5.0, 60.0), "");
        assert_eq!(time_tick(1e300, 60.0), "");
    }

    #[test]
    fn hovering_a_marker_names_its_run() {
        let points = vec![point(400.0, Some(300.0), Some(0), false), point(900.0, Some(500.0), Some(3), true)];
        let position = egui_plot::PlotPoint::new(x_of(&points[1]), 900.0);
        let text = hover_text(&points, &HoverPosition::NearDataPoint { plot_name: "ws-01", position, index: 0 })
            .expect("a label");
        assert!(text.starts_with("ws-01 at 2025-11-30 22:00:00"), "{text}");
        assert!(text.contains("900 (+500), exit code 3, late"), "{text}");
        let elsewhere = HoverPosition::Elsewhere { position: egui_plot::PlotPoint::new(0.0, 0.0) };
        assert_eq!(hover_text(&points, &elsewhere), None);
    }
}
