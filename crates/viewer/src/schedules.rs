//! What a technician does with recurring checks: asks for one (`caisey schedule`), lists,
//! cancels and changes them (`caisey schedules`), and reads the values their runs yielded over
//! time (`caisey history SESSION --probe NAME`, the viewer's plot).
//!
//! A schedule is asked of each machine in its own session, as a run is (see
//! [`crate::tech::ask`]); the agent runs it on its own clock once its user consents.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use caisey_doc::id::{DocId, Id128, NodeId};
use caisey_doc::schedule::{Every, Missed, ProbePattern, Schedule, ScheduleCancel, ScheduleState, ScheduleWriter};
use caisey_doc::session::{CommandSpec, EndStatus, SessionView};
use caisey_doc::text::PeerText;
use caisey_peer::node::Node;
use caisey_peer::now_ms;
use serde::{Deserialize, Serialize};

use crate::tech::{AskItem, Asked, Where, ask_machines, check_command, session_views};

/// A schedule as the technician asks for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleRequest {
    #[serde(flatten)]
    pub where_: Where,
    pub command: CommandSpec,
    pub description: String,
    /// An interval (`5s`, `7days`) or a cron expression.
    pub every: String,
    /// No run starts after this (ms since the epoch).
    pub until: u64,
    pub missed: Missed,
    pub probes: Vec<ProbePattern>,
    /// How long the endpoint user has to answer.
    pub consent_window: Duration,
    /// The schedule this one takes the place of (cancelled with it).
    pub replaces: Option<Id128>,
}

/// Writes a schedule for each target machine. Checked first: the timing must read, the end date
/// must be ahead, the probe patterns must compile.
pub async fn schedule(node: &Node, req: ScheduleRequest) -> Result<Vec<Asked>> {
    check_command(&req.command, &req.description)?;
    let now = now_ms();
    let window = req.consent_window.as_millis() as u64;
    let make = |session, target, now| Schedule {
        id: Id128(rand::random()),
        session,
        target,
        command: req.command.clone(),
        description: req.description.as_str().into(),
        every: req.every.trim().to_string(),
        until: req.until,
        missed: req.missed,
        probes: req.probes.clone(),
        requested_at: now,
        expires_at: (now + window).min(req.until),
        replaces: req.replaces,
    };
    // The same checks the agent makes, before anything is written.
    make(Id128([0; 16]), NodeId([0; 32]), now).check().map_err(|e| anyhow!(e))?;
    ask_machines(node, &req.where_, |session, target, now| AskItem::Recurring(make(session, target, now))).await
}

/// A schedule as `caisey schedules` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleSummary {
    pub id: Id128,
    pub session: DocId,
    pub session_name: PeerText,
    pub machine: PeerText,
    pub script: String,
    pub every: String,
    pub until: u64,
    pub state: ScheduleState,
    pub runs: usize,
    pub late_runs: usize,
    pub last_run: Option<u64>,
    pub next_run: Option<u64>,
    pub probes: Vec<String>,
}

/// Every schedule in this node's sessions, oldest first.
pub async fn schedules(node: &Node) -> Result<Vec<ScheduleSummary>> {
    let fleet = node.fleet().await?;
    let now = now_ms();
    let mut out = Vec::new();
    for (session, view) in session_views(node).await? {
        for s in &view.schedules {
            out.push(ScheduleSummary {
                id: s.schedule.id,
                session,
                session_name: view.info.name.clone(),
                machine: fleet.members.get(&s.schedule.target).map(|m| m.name.clone()).unwrap_or_default(),
                script: s.schedule.command.script.clone(),
                every: s.schedule.every.clone(),
                until: s.schedule.until,
                state: s.state(now),
                runs: s.runs.len(),
                late_runs: s.runs.iter().filter(|r| r.late).count(),
                last_run: s.runs.last().map(|r| r.slot_at),
                // A cron expression is read on the machine's clock, in its time zone, which is
                // not known here: only an interval's next run can be told.
                next_run: (s.state(now).is_live() && matches!(Every::parse(&s.schedule.every), Ok(Every::Interval(_))))
                    .then(|| s.next_run(now, &chrono::Local))
                    .flatten(),
                probes: s.schedule.probes.iter().map(|p| p.name.clone()).collect(),
            });
        }
    }
    out.sort_by_key(|s| (s.until, s.id));
    Ok(out)
}

/// The one schedule whose id starts with `key`.
pub async fn find_schedule(node: &Node, key: &str) -> Result<ScheduleSummary> {
    let key = key.trim().to_ascii_lowercase();
    if key.len() < 8 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("give at least 8 hex characters of the schedule's id, as `caisey schedules` lists it");
    }
    let found: Vec<_> = schedules(node).await?.into_iter().filter(|s| s.id.to_hex().starts_with(&key)).collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no schedule {key}; see `caisey schedules`"),
        many => bail!("{key} names {} schedules; give more of the id", many.len()),
    }
}

/// Stops a schedule: no run of it starts after the agent hears of this.
pub async fn cancel(node: &Node, key: &str) -> Result<ScheduleSummary> {
    let s = find_schedule(node, key).await?;
    if !s.state.is_live() {
        bail!("schedule {} is {} already", s.id.short(), s.state.as_str());
    }
    let signer = node.signer().clone();
    let cancel = ScheduleCancel { schedule: s.id, session: s.session, at: now_ms() };
    node.change(s.session, move |doc| ScheduleWriter::cancel(doc, &signer, &cancel)).await??;
    Ok(s)
}

/// A change to a schedule: a new schedule (which its endpoint user must consent to again) that
/// replaces the old one, in the same session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleEdit {
    pub key: String,
    pub every: Option<String>,
    pub until: Option<u64>,
    pub script: Option<String>,
}

pub async fn edit(node: &Node, e: ScheduleEdit) -> Result<Vec<Asked>> {
    let old = find_schedule(node, &e.key).await?;
    let view = node
        .read_with_fleet(old.session, SessionView::read_without_output)
        .await?
        .ok_or_else(|| anyhow!("session {} is not here", old.session.short()))??;
    let s = view
        .schedules
        .iter()
        .find(|s| s.schedule.id == old.id)
        .ok_or_else(|| anyhow!("schedule {} is not in its session", old.id.short()))?;
    let mut command = s.schedule.command.clone();
    if let Some(script) = e.script {
        command.script = script;
    }
    let fleet = node.fleet().await?;
    let machine = fleet
        .members
        .get(&s.schedule.target)
        .map(|m| m.name.as_unescaped_str().to_string())
        .ok_or_else(|| anyhow!("its machine is no longer in the org"))?;
    let req = ScheduleRequest {
        where_: Where {
            targets: crate::tech::Targets::Machine(machine),
            session: Some(view.info.name.as_unescaped_str().to_string()),
            labels: vec![],
        },
        command,
        description: s.schedule.description.as_unescaped_str().to_string(),
        every: e.every.unwrap_or_else(|| s.schedule.every.clone()),
        until: e.until.unwrap_or(s.schedule.until),
        missed: s.schedule.missed,
        probes: s.schedule.probes.clone(),
        consent_window: Duration::from_millis(s.schedule.expires_at.saturating_sub(s.schedule.requested_at)),
        replaces: Some(s.schedule.id),
    };
    schedule(node, req).await
}

/// One value of a probe: a run, when it ran, how it ended, what it yielded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbePoint {
    pub machine: PeerText,
    pub session: DocId,
    /// The run's code (`caisey diff`).
    pub code: Id128,
    /// When the run was due (scheduled) or asked.
    pub at: u64,
    pub late: bool,
    pub status: String,
    pub exit_code: Option<i32>,
    pub value: f64,
    pub unit: Option<String>,
    /// The change from the same machine's previous value.
    pub change: Option<f64>,
}

/// The values of probe `name` across the runs of `session`'s commands — and, for a session of
/// a group run, across every machine of it — oldest first.
pub async fn probe_series(node: &Node, session: DocId, name: &str) -> Result<Vec<ProbePoint>> {
    let fleet = node.fleet().await?;
    let views = session_views(node).await?;
    let this = views
        .iter()
        .find(|(id, _)| *id == session)
        .map(|(_, v)| v)
        .ok_or_else(|| anyhow!("session {} is not here", session.short()))?;
    let run = this.group_run.as_ref().map(|g| g.run);
    let sessions: BTreeSet<DocId> = views
        .iter()
        .filter(|(id, v)| *id == session || (run.is_some() && v.group_run.as_ref().map(|g| g.run) == run))
        .map(|(id, _)| *id)
        .collect();
    let mut points = Vec::new();
    for (id, view) in views.iter().filter(|(id, _)| sessions.contains(id)) {
        for c in &view.commands {
            let Some(end) = &c.end else { continue };
            let Some(v) = end.probes.iter().find(|p| p.name == name) else { continue };
            points.push(ProbePoint {
                machine: fleet.members.get(&c.request.target).map(|m| m.name.clone()).unwrap_or_default(),
                session: *id,
                code: c.request.approval_code(),
                at: c.request.requested_at,
                late: c.late,
                status: c.status().to_string(),
                exit_code: end.exit_code.filter(|_| end.status == EndStatus::Exited),
                value: v.value,
                unit: v.unit.clone(),
                change: None,
            });
        }
    }
    points.sort_by_key(|p| (p.at, p.code));
    with_changes(&mut points);
    Ok(points)
}

/// Fills in each point's change from its machine's previous one.
pub fn with_changes(points: &mut [ProbePoint]) {
    let mut last: std::collections::BTreeMap<String, f64> = Default::default();
    for p in points {
        let key = p.machine.as_unescaped_str().to_string();
        p.change = last.get(&key).map(|prev| p.value - prev);
        last.insert(key, p.value);
    }
}

/// The series as CSV: a header, then one row per value (text fields quoted).
pub fn probe_csv(name: &str, points: &[ProbePoint]) -> String {
    let mut out = String::from("time,machine,probe,value,unit,change,exit_code,status,late,run\n");
    for p in points {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            caisey_peer::cli::format_time(p.at),
            crate::transcript::csv_cell(p.machine.as_unescaped_str()),
            name,
            p.value,
            p.unit.as_deref().map(crate::transcript::csv_cell).unwrap_or_default(),
            p.change.map(|c| c.to_string()).unwrap_or_default(),
            p.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            crate::transcript::csv_cell(&p.status),
            p.late,
            p.code.short()
        ));
    }
    out
}
