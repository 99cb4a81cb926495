//! The viewer's side of the home's node, off the UI thread: a task on a tokio runtime that holds
//! a [`Client`] of the node, turns the UI's [`Action`]s into requests, and sends back [`Update`]s
//! built from the documents as they sync. The node is another process (or, in the demo, this
//! one); if it goes away, the next request starts a new one and the watch is taken up again.
//!
//! Document events arrive in floods while output streams; the backend marks what is stale and
//! rebuilds at most every [`TICK`]: the fleet and session list at most once a second, the open
//! session and group rows every tick, reading only output appended since the last read. The
//! probe values being plotted are re-read at most once a second while any session changes (a
//! group run's values come from every machine's session, not only the open one). Every update
//! wakes the UI through the `egui::Context` it was given.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use caisey_doc::id::{DocId, Id128, NodeId};
use tokio::sync::mpsc as tmpsc;

use crate::api::{Chunk, Event};
use crate::client::{Client, Watch};

use super::model::{GroupRow, LineSplitter, OutputAppend, OutputBuf, SharePreview, Snapshot, Update};
use crate::tech::{self, RunRequest};
use crate::transcript::ExportFormat;

/// How often stale views are rebuilt.
pub const TICK: Duration = Duration::from_millis(100);
/// How often a lost watch on the node is taken up again.
const WATCH_RETRY: Duration = Duration::from_secs(2);
/// How often the fleet and session list are rebuilt while documents keep changing.
const LIST_EVERY: Duration = Duration::from_secs(1);
/// How often machines' "online" and the sync state are re-read when nothing changes (a machine
/// goes offline by *not* sending heartbeats; the session list does not age, so it is not re-read).
const MACHINES_EVERY: Duration = Duration::from_secs(5);

/// What the UI asks of the backend.
#[derive(Debug, Clone)]
pub enum Action {
    OpenSession(DocId),
    CloseSession,
    Ask(RunRequest),
    Rename {
        session: DocId,
        name: String,
        labels: Vec<String>,
    },
    Note {
        session: DocId,
        text: String,
    },
    /// Hand the session to the technician of that name, or to nobody.
    Assign {
        session: DocId,
        technician: Option<String>,
    },
    Export {
        session: DocId,
        format: ExportFormat,
        path: PathBuf,
    },
    SaveOutput {
        session: DocId,
        request: Id128,
        path: PathBuf,
    },
    /// Saves a file a run brought back, whole and checked.
    SaveArtifact {
        session: DocId,
        name: String,
        path: PathBuf,
    },
    History {
        machine: Option<NodeId>,
        script: String,
    },
    CommandsOn(NodeId),
    Diff {
        old: (DocId, Id128),
        new: (DocId, Id128),
    },
    SharePreview {
        session: DocId,
        share: tech::ShareRequest,
    },
    Publish {
        session: DocId,
        share: tech::ShareRequest,
    },
    /// Open a group run (by id) side by side.
    OpenGroupRun(String),
    /// Search the sessions' output for these words.
    SearchOutput(String),
    /// A designated approver's answer to a request (by its code).
    Decide {
        code: String,
        approve: bool,
    },
    /// Send the values of probe `name` in `session` now, and again whenever they may have changed,
    /// until another session is opened or another probe is asked for.
    WatchProbe {
        session: DocId,
        name: String,
    },
    /// Stop a recurring check (its full id).
    CancelSchedule(String),
}

/// The UI's end of the backend.
pub struct BackendHandle {
    actions: tmpsc::UnboundedSender<Action>,
    updates: mpsc::Receiver<Update>,
    /// Set by the UI on its first frame; the backend wakes it through this.
    pub repaint: Arc<OnceLock<egui::Context>>,
}

impl std::fmt::Debug for BackendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendHandle")
    }
}

impl BackendHandle {
    pub fn send(&self, action: Action) {
        // The backend only stops when the node does; then there is nobody to tell.
        let _ = self.actions.send(action);
    }

    /// Updates received since the last call.
    pub fn drain(&self) -> Vec<Update> {
        self.updates.try_iter().collect()
    }
}

/// Starts the backend for the node `client` reaches, on `runtime`. When the handle is dropped
/// the returned task ends; the node stays up for whoever started it to shut down.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    client: Client,
    go_online: bool,
) -> (BackendHandle, tokio::task::JoinHandle<()>) {
    let (actions, actions_rx) = tmpsc::unbounded_channel();
    let (updates_tx, updates) = mpsc::channel();
    let repaint = Arc::new(OnceLock::new());
    let out = Out { tx: updates_tx, repaint: repaint.clone() };
    let task = runtime.spawn(async move {
        let mut backend = Backend::new(client, out);
        backend.run(actions_rx, go_online).await;
    });
    (BackendHandle { actions, updates, repaint }, task)
}

struct Out {
    tx: mpsc::Sender<Update>,
    repaint: Arc<OnceLock<egui::Context>>,
}

impl Out {
    fn send(&self, u: Update) {
        let _ = self.tx.send(u);
        if let Some(ctx) = self.repaint.get() {
            ctx.request_repaint();
        }
    }

    fn result(&self, r: Result<Update>) {
        self.send(r.unwrap_or_else(|e| Update::Error(format!("{e:#}"))));
    }
}

/// Output read so far of one command: list position and unfinished lines.
#[derive(Default)]
struct Reading {
    pos: usize,
    bytes: u64,
    splitter: LineSplitter,
}

impl Reading {
    /// Takes in the chunks read up to list position `pos`, as what the UI appends.
    fn take(&mut self, request: Id128, chunks: &[Chunk], pos: usize) -> OutputAppend {
        self.pos = pos;
        let mut lines = Vec::new();
        for c in chunks {
            self.bytes += c.data.len() as u64;
            lines.extend(self.splitter.push(c.stream, &c.data));
        }
        OutputAppend { request, lines, partial: self.splitter.partial(), bytes: self.bytes }
    }
}

struct Backend {
    client: Client,
    out: Out,
    open: Option<DocId>,
    open_reading: BTreeMap<Id128, Reading>,
    /// The group run being watched: (machine, session, request) per row.
    group: Vec<(caisey_doc::text::PeerText, DocId, Id128)>,
    group_reading: BTreeMap<Id128, (Reading, OutputBuf)>,
    stale_list: bool,
    stale_docs: BTreeSet<DocId>,
    last_list: tokio::time::Instant,
    /// The probe series the UI plots: (session, probe name).
    probe: Option<(DocId, String)>,
    /// Some session changed since the series was last read.
    stale_probe: bool,
    last_probe: tokio::time::Instant,
    /// A listed schedule may still run: its state and next run move with the clock, so the list
    /// is re-read now and then even when no document changes.
    live_schedules: bool,
}

impl Backend {
    fn new(client: Client, out: Out) -> Self {
        Self {
            client,
            out,
            open: None,
            open_reading: BTreeMap::new(),
            group: vec![],
            group_reading: BTreeMap::new(),
            stale_list: true,
            stale_docs: BTreeSet::new(),
            last_list: tokio::time::Instant::now(),
            probe: None,
            stale_probe: false,
            last_probe: tokio::time::Instant::now(),
            live_schedules: false,
        }
    }

    async fn run(&mut self, mut actions: tmpsc::UnboundedReceiver<Action>, go_online: bool) {
        let mut events = self.watch().await;
        let mut last_watch = tokio::time::Instant::now();
        if go_online {
            // Offline is normal: the viewer shows what this machine has and the node keeps retrying.
            match self.client.online().await {
                Ok(Some(warning)) => self.out.send(Update::Notice(warning)),
                Ok(None) => {}
                Err(e) => self.out.send(Update::Error(format!("{e:#}"))),
            }
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                action = actions.recv() => match action {
                    Some(a) => self.act(a).await,
                    None => break,
                },
                event = next_event(&mut events) => match event {
                    Some(Event::DocChanged(id)) => {
                        self.stale_docs.insert(id);
                        self.stale_list = true;
                        self.stale_probe = true;
                    }
                    Some(Event::PeerUp(_) | Event::PeerDown(_)) => self.stale_list = true,
                    // Missed some, or the node was restarted: treat everything as changed.
                    Some(Event::Lagged) | None => {
                        if event.is_none() {
                            last_watch = tokio::time::Instant::now();
                            events = self.watch().await;
                        }
                        self.stale_list = true;
                        self.stale_probe = true;
                        self.stale_docs.extend(self.open);
                        self.stale_docs.extend(self.group.iter().map(|g| g.1));
                    }
                },
                _ = tick.tick() => {
                    if events.is_none() && last_watch.elapsed() >= WATCH_RETRY {
                        last_watch = tokio::time::Instant::now();
                        events = self.watch().await;
                    }
                    self.refresh().await
                }
            }
        }
    }

    /// The node's events; `None` (after telling the UI why) when it cannot be reached now.
    async fn watch(&self) -> Option<Watch> {
        match self.client.watch().await {
            Ok(w) => Some(w),
            Err(e) => {
                self.out.send(Update::Error(format!("{e:#}")));
                None
            }
        }
    }

    async fn refresh(&mut self) {
        let since = self.last_list.elapsed();
        if self.stale_list && since >= LIST_EVERY {
            self.stale_list = false;
            self.last_list = tokio::time::Instant::now();
            let snapshot = self.snapshot().await;
            if let Ok(s) = &snapshot {
                self.live_schedules = s.schedules.iter().any(|s| s.state.is_live());
            }
            self.out.result(snapshot.map(|s| Update::Snapshot(Box::new(s))));
        } else if since >= MACHINES_EVERY {
            self.last_list = tokio::time::Instant::now();
            let machines = async {
                Ok(Update::Machines {
                    machines: self.client.machines(None, None).await?,
                    sync: self.client.sync_status().await?,
                })
            };
            self.out.result(machines.await);
            if self.live_schedules {
                self.read_schedules().await;
            }
        }
        if self.stale_probe
            && self.last_probe.elapsed() >= LIST_EVERY
            && let Some((session, name)) = self.probe.clone()
        {
            self.read_probe(session, name).await;
        }
        let stale = std::mem::take(&mut self.stale_docs);
        if let Some(open) = self.open.filter(|o| stale.contains(o))
            && let Err(e) = self.read_open(open).await
        {
            self.out.send(Update::Error(format!("{e:#}")));
        }
        let rows: Vec<(caisey_doc::text::PeerText, DocId, Id128)> =
            self.group.iter().filter(|(_, s, _)| stale.contains(s)).cloned().collect();
        for (machine, session, request) in rows {
            match self.read_group_row(machine, session, request).await {
                Ok(row) => self.out.send(Update::GroupRow(row)),
                Err(e) => self.out.send(Update::Error(format!("{e:#}"))),
            }
        }
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let org = self.client.org().await?;
        let approver = org.my_role == Some(caisey_doc::fleet::Role::Approver);
        Ok(Snapshot {
            awaiting: if approver { self.client.awaiting().await? } else { vec![] },
            group_runs: if approver { vec![] } else { self.client.group_runs().await? },
            role: org.my_role,
            org: org.org_name,
            me: org.my_name,
            machines: self.client.machines(None, None).await?,
            groups: org.groups,
            sessions: self.client.sessions(None, None).await?,
            schedules: if approver { vec![] } else { self.client.schedules().await? },
            sync: self.client.sync_status().await?,
        })
    }

    /// Sends the values of probe `name` in `session` as they stand.
    async fn read_probe(&mut self, session: DocId, name: String) {
        self.stale_probe = false;
        self.last_probe = tokio::time::Instant::now();
        let points = self.client.probe_series(session, &name).await;
        self.out.result(points.map(|points| Update::ProbeSeries { session, name, points }));
    }

    /// Sends the recurring checks as they stand now (states and next runs move with the clock).
    async fn read_schedules(&mut self) {
        match self.client.schedules().await {
            Ok(schedules) => {
                self.live_schedules = schedules.iter().any(|s| s.state.is_live());
                self.out.send(Update::Schedules(schedules));
            }
            Err(e) => self.out.send(Update::Error(format!("{e:#}"))),
        }
    }

    /// Sends the open session's records and whatever output arrived since the last read.
    async fn read_open(&mut self, id: DocId) -> Result<()> {
        let read = self.client.session(id).await?;
        let mut appends = Vec::new();
        for c in &read.view.commands {
            let reading = self.open_reading.entry(c.request.id).or_default();
            let out = self.client.output(id, &c.request, reading.pos).await?;
            if !out.chunks.is_empty() {
                appends.push(reading.take(c.request.id, &out.chunks, out.next));
            }
        }
        let update = Update::SessionView {
            id,
            view: Box::new(read.view),
            names: read.names,
            missing_chunks: read.missing_chunks,
        };
        self.out.send(update);
        for append in appends {
            self.out.send(Update::Output { session: id, append });
        }
        Ok(())
    }

    async fn read_group_row(
        &mut self,
        machine: caisey_doc::text::PeerText,
        session: DocId,
        request: Id128,
    ) -> Result<GroupRow> {
        let read = self.client.session(session).await?;
        let cmd = read.view.command(&request).cloned().ok_or_else(|| anyhow!("request not found"))?;
        let from = self.group_reading.get(&request).map(|r| r.0.pos).unwrap_or(0);
        let out = self.client.output(session, &cmd.request, from).await?;
        let (reading, buf) = self.group_reading.entry(request).or_default();
        buf.apply(reading.take(request, &out.chunks, out.next));
        // A row keeps only a preview: the full output is one click away, in the session.
        let keep = 200;
        if buf.lines.len() > keep * 2 {
            buf.lines.drain(..buf.lines.len() - keep);
        }
        Ok(GroupRow {
            machine,
            session,
            request,
            status: cmd.status().to_string(),
            exit_code: cmd.end.as_ref().and_then(|e| e.exit_code),
            output: buf.clone(),
        })
    }

    async fn act(&mut self, action: Action) {
        let client = &self.client;
        match action {
            Action::OpenSession(id) => {
                self.open = Some(id);
                self.open_reading.clear();
                self.probe = None;
                if let Err(e) = self.read_open(id).await {
                    self.out.send(Update::Error(format!("{e:#}")));
                }
            }
            Action::CloseSession => {
                self.open = None;
                self.open_reading.clear();
                self.probe = None;
            }
            Action::WatchProbe { session, name } => {
                self.probe = Some((session, name.clone()));
                self.read_probe(session, name).await;
            }
            Action::CancelSchedule(id) => {
                match self.client.cancel_schedule(&id).await {
                    Ok(cancelled) => {
                        for s in cancelled {
                            let (id, machine) = (s.id.short(), s.machine);
                            let when = "no run of it starts once the machine hears of it";
                            self.out.send(Update::Notice(format!("cancelled schedule {id} on {machine}: {when}")));
                        }
                    }
                    Err(e) => self.out.send(Update::Error(format!("{e:#}"))),
                }
                self.stale_list = true;
                self.read_schedules().await;
            }
            Action::Ask(req) => {
                let group = match &req.targets {
                    tech::Targets::Group(g) => Some(g.clone()),
                    tech::Targets::Machines(names) => Some(names.join(", ")),
                    tech::Targets::Machine(_) => None,
                };
                match client.ask(req).await {
                    Ok(asked) => {
                        self.group = asked.iter().map(|a| (a.machine.name.clone(), a.session, a.request)).collect();
                        self.group_reading.clear();
                        let rows = asked
                            .iter()
                            .map(|a| GroupRow {
                                machine: a.machine.name.clone(),
                                session: a.session,
                                request: a.request,
                                status: "waiting for approval".into(),
                                exit_code: None,
                                output: OutputBuf::default(),
                            })
                            .collect();
                        self.stale_list = true;
                        self.out.send(Update::Asked { group, rows });
                    }
                    Err(e) => self.out.send(Update::Error(format!("{e:#}"))),
                }
            }
            Action::Rename { session, name, labels } => {
                let r = client.rename(session, &name, labels).await;
                self.stale_list = true;
                self.stale_docs.insert(session);
                self.out.result(r.map(|()| Update::Notice(format!("renamed to {name:?}"))));
            }
            Action::Note { session, text } => {
                let r = client.note(session, &text).await;
                self.stale_list = true;
                self.stale_docs.insert(session);
                self.out.result(r.map(|()| Update::Notice("note added".into())));
            }
            Action::Assign { session, technician } => {
                let r = client.assign(session, technician.clone()).await;
                self.stale_list = true;
                self.stale_docs.insert(session);
                let to = technician.unwrap_or_else(|| "nobody".into());
                self.out.result(r.map(|()| Update::Notice(format!("assigned to {to}"))));
            }
            Action::Export { session, format, path } => {
                let r = async {
                    let (bytes, pending) = crate::transcript::export(client, session, format).await?;
                    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
                    let missing = match pending {
                        0 => String::new(),
                        n => format!(" ({n} bytes of output are not on this machine yet)"),
                    };
                    Ok(Update::Notice(format!("exported {} bytes to {}{missing}", bytes.len(), path.display())))
                };
                self.out.result(r.await);
            }
            Action::SaveOutput { session, request, path } => {
                let r = async {
                    let bytes = client.output_bytes(session, request).await?;
                    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
                    Ok(Update::Notice(format!("saved {} bytes of output to {}", bytes.len(), path.display())))
                };
                self.out.result(r.await);
            }
            Action::SaveArtifact { session, name, path } => {
                let r = async {
                    let st = client.artifact_state(session, &name).await?;
                    if let Some(why) = st.refused {
                        anyhow::bail!("{name:?} was not brought back: {why}");
                    }
                    if !st.complete() {
                        anyhow::bail!(
                            "{} of {} bytes of {name:?} are here so far; try again in a moment",
                            st.here,
                            st.size.unwrap_or(0)
                        );
                    }
                    let st = client.save_artifact(session, &name, path.clone()).await?;
                    Ok(Update::Notice(format!(
                        "saved {} ({} bytes, checked) to {}",
                        name,
                        st.size.unwrap_or(0),
                        path.display()
                    )))
                };
                self.out.result(r.await);
            }
            Action::History { machine, script } => {
                self.out.result(client.history(machine, &script).await.map(|runs| Update::History { runs }));
            }
            Action::CommandsOn(machine) => {
                let r = client.commands_run_on(machine).await;
                self.out.result(r.map(|commands| Update::CommandsOn { machine, commands }));
            }
            Action::Diff { old, new } => {
                let r = async {
                    let a = String::from_utf8_lossy(&client.output_bytes(old.0, old.1).await?).into_owned();
                    let b = String::from_utf8_lossy(&client.output_bytes(new.0, new.1).await?).into_owned();
                    Ok(Update::Diff(tech::diff(&a, &b)))
                };
                self.out.result(r.await);
            }
            Action::OpenGroupRun(key) => {
                let r = client.group_run(&key).await;
                self.out.result(r.map(|view| Update::GroupRunView(Box::new(view))));
            }
            Action::SearchOutput(query) => {
                let r = client.sessions(Some(&query), None).await;
                self.out.result(r.map(|sessions| Update::OutputMatches { query, sessions }));
            }
            Action::Decide { code, approve } => {
                let r = client.decide(&code, approve).await;
                self.stale_list = true;
                let verb = if approve { "approved" } else { "denied" };
                self.out.result(r.map(|(a, delivered)| {
                    let machine = &a.machine;
                    let wait = if delivered { "" } else { "; it goes out when this node next connects" };
                    Update::Notice(format!("{verb} {} on {machine}{wait}", a.id.short()))
                }));
            }
            Action::SharePreview { session, share } => {
                self.out.result(share_preview(client, session, share).await.map(Update::SharePreview));
            }
            Action::Publish { session, share } => {
                let r = async {
                    let transcript = client.transcript(session, share).await?;
                    Ok(Update::Shared { url: client.publish(transcript).await? })
                };
                self.out.result(r.await);
            }
        }
    }
}

/// What sharing `session` would publish: the redactions made and the lines they touch.
async fn share_preview(client: &Client, session: DocId, share: tech::ShareRequest) -> Result<SharePreview> {
    let transcript = client.transcript(session, share).await?;
    let (_, checked) = caisey_doc::transcript::verify(transcript.as_bytes())?;
    let mut preview = SharePreview {
        session,
        commands: checked.commands.len(),
        notes: checked.notes.len(),
        redactions: vec![],
        redacted_lines: vec![],
    };
    for c in &checked.commands {
        for r in &c.redactions {
            preview.redactions.push(format!(
                "{}× {} in the {} of {} on {}",
                r.count,
                r.rule,
                r.field,
                c.id.short(),
                c.machine
            ));
        }
        for text in [&c.command.script, &c.stdout, &c.stderr] {
            for line in text.lines().filter(|l| l.contains("[REDACTED")) {
                if preview.redacted_lines.len() < 200 {
                    preview.redacted_lines.push(caisey_doc::text::visible(line));
                }
            }
        }
    }
    Ok(preview)
}

/// The next event of `events`, or never when there is no watch (the tick keeps the views fresh).
async fn next_event(events: &mut Option<Watch>) -> Option<Event> {
    match events {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
