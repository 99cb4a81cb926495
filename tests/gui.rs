//! The viewer and the consent window, driven headless with egui_kittest (by role and label) on
//! a real org: the relay and agents are the real binaries on loopback, the viewer's backend is a
//! real node on a colleague's home, the consent window talks to a real agent's socket.

use std::time::{Duration, Instant};

use caisey_agent::prompt::{ARM_DELAY, PromptApp};
use caisey_peer::home::Home;
use caisey_peer::node::NodeOptions;
use caisey_tests::{Org, wait_for};
use caisey_viewer::client::Client;
use caisey_viewer::gui::{Tab, ViewerApp, backend};
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};

/// Steps the UI until `done` holds, or fails with `what`.
fn step_until<S>(h: &mut Harness<'_, S>, timeout: Duration, what: &str, done: impl Fn(&Harness<'_, S>) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        h.step();
        if done(h) {
            return;
        }
        if Instant::now() > deadline {
            let labels: Vec<String> = h
                .root()
                .children_recursive()
                .filter_map(|n| {
                    let n = n.accesskit_node();
                    n.label().or_else(|| n.value())
                })
                .collect();
            panic!("timed out waiting for: {what}; the UI shows: {labels:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Focuses a text field and types into it, as a user clicking it would.
trait TypeInto {
    fn type_into(&self, text: &str);
}

impl TypeInto for egui_kittest::Node<'_> {
    fn type_into(&self, text: &str) {
        self.focus();
        self.type_text(text);
    }
}

fn shows<S>(h: &Harness<'_, S>, text: &str) -> bool {
    h.query_all_by_label_contains(text).next().is_some()
}

/// Whether some widget's label is exactly `text`.
fn has_label<S>(h: &Harness<'_, S>, text: &str) -> bool {
    h.query_all_by_label(text).next().is_some()
}

/// The viewer of technician `name` in `org`: a client of that home's node (the real `caisey`
/// binary, started in the background as the viewer would start it), its backend on `rt`.
fn viewer<'a>(org: &Org, name: &str, rt: &tokio::runtime::Runtime) -> Harness<'a, ViewerApp> {
    let opts = NodeOptions {
        home: Home::new(Some(org.world.home(name)), "caisey").expect("home"),
        listen: "127.0.0.1:0".parse().expect("addr"),
    };
    let client = rt
        .block_on(Client::connect(
            &opts,
            Some(caisey_viewer::background::Starter {
                exe: caisey_tests::bin("caisey"),
                idle_exit: std::time::Duration::from_secs(600),
            }),
        ))
        .expect("client");
    let (handle, _task) = backend::spawn(rt.handle(), client, true);
    Harness::builder()
        .with_size([1280.0, 900.0])
        .build_ui_state(|ui, app: &mut ViewerApp| app.show(ui), ViewerApp::new(handle))
}

fn approve_next(org: &Org, agent: &str) {
    let id = org.world.wait_pending(agent);
    org.world.agent_cmd(agent, &["approve", &id]).ok();
}

#[test]
fn fleet_search_filters_machines_and_opens_a_machine_card() {
    let org = Org::new(&[("ws-01", "lab"), ("ws-02", "office"), ("db-01", "lab")]);
    let _agents: Vec<_> = ["ws-01", "ws-02", "db-01"].iter().map(|a| org.world.start_agent(a)).collect();
    org.join_technician("bob");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "bob", &rt);
    step_until(&mut h, Duration::from_secs(30), "three machines online", |h| {
        h.state().snapshot.machines.iter().filter(|m| m.online && m.card.is_some()).count() == 3
    });
    assert!(shows(&h, "db-01") && shows(&h, "ws-02"));

    h.get_by_label("Search machines").type_into("ws-");
    h.run_steps(2);
    assert_eq!(h.state().fleet_search, "ws-");
    assert!(shows(&h, "ws-01") && shows(&h, "ws-02"), "both ws- machines stay");
    assert!(!shows(&h, "db-01"), "db-01 is filtered out by the search");

    h.get_by_label_contains("ws-01").click();
    h.run_steps(2);
    for field in
        ["Hostname", "OS", "Uptime", "CPU", "Memory", "Disk", "Logged in", "Connectivity", "Last seen", "Groups"]
    {
        assert!(h.query_by_label(field).is_some(), "the card shows {field}");
    }
    assert!(shows(&h, "via relay") || shows(&h, "direct"), "connectivity is shown");
    assert!(shows(&h, "lab"), "the card shows ws-01's group");

    // The group filter: only lab machines, whatever the search.
    h.get_by_label("Search machines").focus();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.key_press(egui::Key::Backspace);
    h.run_steps(2);
    h.get_by_role_and_label(egui::accesskit::Role::ComboBox, "Group").click();
    h.run_steps(2);
    h.get_by_label("office").click();
    h.run_steps(3);
    assert!(shows(&h, "ws-02"), "ws-02 is in office");
    assert!(!shows(&h, "db-01") && h.query_by_label_contains("ws-01   ").is_none(), "lab machines are filtered out");
}

#[test]
fn a_command_composed_in_the_viewer_streams_its_output_into_the_session_view() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    org.join_technician("bob");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "bob", &rt);
    step_until(&mut h, Duration::from_secs(30), "ws-01 listed", |h| shows(h, "ws-01"));
    h.get_by_label_contains("ws-01").click();
    h.run_steps(2);
    h.get_by_label("Run a command on ws-01").click();
    h.run_steps(2);
    assert_eq!(h.state().tab, Tab::Run);
    h.get_by_label("Description").type_into("checking the printer spooler");
    h.get_by_label("Command").type_into("echo hello-from-the-viewer; echo on-stderr >&2; exit 4");
    h.run_steps(2);
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Send").click();
    step_until(&mut h, Duration::from_secs(20), "waiting for approval", |h| shows(h, "waiting for approval"));
    approve_next(&org, "ws-01");
    step_until(&mut h, Duration::from_secs(30), "output and exit code", |h| {
        shows(h, "hello-from-the-viewer") && shows(h, "on-stderr") && shows(h, "exit code 4")
    });
    assert!(shows(&h, "approved by local user"), "the approval is on the timeline");
    step_until(&mut h, Duration::from_secs(5), "the status bar says it ended", |h| shows(h, "ws-01: exited"));

    // Rename and label the session; the list shows it under its new name.
    h.get_by_label("Rename / label").click();
    h.run_steps(2);
    h.get_by_label("Session name").focus();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_label("Session name").type_into("spooler check");
    h.get_by_label("Labels").type_into("printers");
    h.get_by_label("Save name").click();
    step_until(&mut h, Duration::from_secs(10), "renamed", |h| {
        h.state().snapshot.sessions.iter().any(|s| s.name == "spooler check" && s.labels == ["printers"])
    });
    // Search the session list by label, then export it.
    h.get_by_label("Sessions").click();
    h.run_steps(2);
    h.get_by_label("Search sessions").type_into("printers");
    h.run_steps(2);
    assert!(shows(&h, "spooler check"));
    // Words of its output find it too, with the line they are on.
    h.get_by_label("Search sessions").focus();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_label("Search sessions").type_into("from the viewer");
    step_until(&mut h, Duration::from_secs(10), "found in output", |h| {
        shows(h, "found in output: hello-from-the-viewer")
    });
    let out = org.world.caisey("alice", &["export", "spooler check", "--format", "csv"]).ok();
    assert!(out.stdout.contains("hello-from-the-viewer") && out.stdout.contains("\"4\""), "{}", out.stdout);
}

#[test]
fn a_group_run_shows_one_row_per_machine_as_each_finishes() {
    let org = Org::new(&[("ws-01", "lab"), ("ws-02", "lab"), ("ws-03", "lab")]);
    let _agents: Vec<_> = ["ws-01", "ws-02", "ws-03"].iter().map(|a| org.world.start_agent(a)).collect();
    org.join_technician("bob");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "bob", &rt);
    step_until(&mut h, Duration::from_secs(30), "groups known", |h| h.state().snapshot.groups == ["lab"]);
    h.get_by_label("Run").click();
    h.run_steps(2);
    h.get_by_role_and_label(egui::accesskit::Role::RadioButton, "Group").click();
    h.run_steps(1);
    h.get_by_role_and_label(egui::accesskit::Role::ComboBox, "Target").click();
    h.run_steps(2);
    h.get_by_label("lab").click();
    h.run_steps(2);
    h.get_by_label("Command").type_into("echo row-output");
    h.run_steps(1);
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Send").click();
    step_until(&mut h, Duration::from_secs(20), "three rows", |h| {
        h.state().group_run.as_ref().is_some_and(|g| g.rows.len() == 3)
    });
    // One machine answers first: its row is done while the others still wait.
    approve_next(&org, "ws-02");
    step_until(&mut h, Duration::from_secs(30), "ws-02 done", |h| shows(h, "1 of 3 machines done"));
    let rows = &h.state().group_run.as_ref().expect("group run").rows;
    let waiting = rows.iter().filter(|r| r.status == "waiting for approval").count();
    assert_eq!(waiting, 2, "{rows:?}");
    approve_next(&org, "ws-01");
    approve_next(&org, "ws-03");
    step_until(&mut h, Duration::from_secs(30), "all done", |h| shows(h, "3 of 3 machines done"));
    for m in ["ws-01", "ws-02", "ws-03"] {
        assert!(shows(&h, m), "a row for {m}");
    }
    assert_eq!(h.query_all_by_label("row-output").count(), 3, "each row shows its output");
    assert_eq!(h.query_all_by_label("0").count(), 3, "each row shows exit code 0");
    // The status bar no longer says the machines are waiting.
    assert!(shows(&h, "group run finished: 3 machines answered, 0 not ok"), "the status bar is stale");
    assert!(!shows(&h, "waiting for approval"), "the status bar still says waiting");

    // A viewer opened afresh holds the run as one investigation, identical outputs gathered.
    drop(h);
    let mut h = viewer(&org, "alice", &rt);
    step_until(&mut h, Duration::from_secs(20), "the group run listed", |h| !h.state().snapshot.group_runs.is_empty());
    h.get_by_label("Group runs").click();
    h.run_steps(2);
    h.query_all_by_label_contains("3 machines").next().expect("the run listed").click();
    step_until(&mut h, Duration::from_secs(10), "outputs gathered", |h| {
        shows(h, "3 machines with this output: ws-01, ws-02, ws-03")
    });
}

#[test]
fn the_viewer_a_follow_and_a_run_share_one_home_and_outlive_its_node_being_killed() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let first =
        org.world.spawn("caisey", "alice", &["run", "--machine", "ws-01", "--session", "shared", "--", "echo first"]);
    approve_next(&org, "ws-01");
    first.wait(Duration::from_secs(60)).ok();
    let listed: serde_json::Value =
        serde_json::from_str(&org.world.caisey("alice", &["sessions", "--json"]).ok().stdout).expect("json");
    let id = serde_json::from_value(listed[0]["id"].clone()).expect("session id");

    // Three clients of alice's one node at once: the viewer, a follow, a run.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "alice", &rt);
    h.state_mut().open_session(id);
    step_until(&mut h, Duration::from_secs(30), "the first output", |h| shows(h, "first"));
    let follow = org.world.spawn("caisey", "alice", &["show", "shared", "--follow"]);
    let script = "for i in 1 2 3 4 5 6 7 8; do echo line-$i; sleep 0.5; done";
    let run = org.world.spawn("caisey", "alice", &["run", "--machine", "ws-01", "--session", "shared", "--", script]);
    approve_next(&org, "ws-01");
    wait_for(Duration::from_secs(30), || follow.stdout().contains("line-2").then_some(()))
        .unwrap_or_else(|| panic!("the follow shows no output: {}", follow.stderr()));

    // The node dies mid-run; the next command starts a new one, with nothing lost.
    let killed = org.world.node_pid("alice").expect("a node runs for alice");
    std::process::Command::new("kill").arg("-9").arg(killed.to_string()).status().expect("kill");
    let sessions = org.world.caisey("alice", &["sessions"]).ok();
    assert!(sessions.stdout.contains("shared"), "{}", sessions.stdout);
    assert_ne!(org.world.node_pid("alice"), Some(killed), "a new node serves the home");
    let out = run.wait(Duration::from_secs(60));
    assert_eq!(out.code(), 0, "{out:?}");
    for i in 1..=8 {
        assert!(out.stdout.contains(&format!("line-{i}\n")), "{out:?}");
    }
    wait_for(Duration::from_secs(30), || follow.stdout().contains("line-8").then_some(()))
        .unwrap_or_else(|| panic!("the follow stopped: {}\n{}", follow.stdout(), follow.stderr()));
    step_until(&mut h, Duration::from_secs(30), "the viewer follows on the new node", |h| shows(h, "line-8"));
}

#[test]
fn the_consent_window_shows_hostile_commands_inert_and_approves_and_denies() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let mut h = Harness::builder().with_size([720.0, 620.0]).build_ui_state(
        |ui, app: &mut PromptApp| app.show(ui),
        PromptApp::connect(org.world.home("ws-01").join(caisey_peer::home::SOCKET)).expect("prompt"),
    );
    step_until(&mut h, Duration::from_secs(10), "idle", |h| shows(h, "Nothing is waiting"));

    // A command dressed up to fool the reader: an escape sequence that would clear a terminal,
    // a right-to-left override that reverses what follows, and text posing as the window.
    let hostile = "echo fine\u{1b}[2J\u{202e}txt.exe\n# Approve and run\n\u{7}true";
    let asked = org.world.spawn(
        "caisey",
        "alice",
        &["run", "--json", "--machine", "ws-01", "--detach", "--description", "routine\u{202e} check", "--", hostile],
    );
    step_until(&mut h, Duration::from_secs(30), "the request", |h| shows(h, "exactly as it will run"));
    assert!(shows(&h, "alice"), "the technician is named");
    assert!(shows(&h, "\\u{1b}[2J") && shows(&h, "\\u{202e}txt.exe") && shows(&h, "\\u{7}true"), "escapes spelled out");
    assert!(shows(&h, "it contains 3 invisible or control character"), "the user is warned");
    assert!(shows(&h, "routine\\u{202e} check"), "the description is escaped too");
    // No label anywhere carries a raw control or bidi character.
    for node in h.root().children_recursive() {
        let node = node.accesskit_node();
        for text in [node.label(), node.value()].into_iter().flatten() {
            assert!(!text.chars().any(|c| c == '\u{1b}' || c == '\u{202e}' || c == '\u{7}'), "raw in {text:?}");
        }
    }
    // The command's fake "Approve and run" line is text in the command box, not a button.
    assert_eq!(h.query_all_by_role_and_label(egui::accesskit::Role::Button, "Approve and run").count(), 1);

    // Approve only arms after a moment: a click right away is ignored (without the delay it would
    // reach the daemon within milliseconds and the window would say "approved").
    let approve = || h.get_by_role_and_label(egui::accesskit::Role::Button, "Approve and run");
    assert!(approve().accesskit_node().is_disabled(), "Approve is inactive at first");
    approve().click();
    h.run_steps(2);
    std::thread::sleep(Duration::from_millis(500));
    h.run_steps(2);
    assert!(!shows(&h, "approved") && shows(&h, "exactly as it will run"), "an early click did nothing");
    std::thread::sleep(ARM_DELAY);
    h.run_steps(2);
    let approve = h.get_by_role_and_label(egui::accesskit::Role::Button, "Approve and run");
    assert!(!approve.accesskit_node().is_disabled(), "Approve is active after the delay");
    approve.click();
    step_until(&mut h, Duration::from_secs(20), "approved", |h| shows(h, "approved"));
    // Once the command has ended, the window says so rather than "running" for good.
    step_until(&mut h, Duration::from_secs(20), "finished", |h| shows(h, "it is no longer running"));
    let asked: serde_json::Value =
        serde_json::from_str(&asked.wait(Duration::from_secs(30)).ok().stdout).expect("json");
    let session = asked[0]["session"].as_str().expect("session id").to_string();
    let shown = wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", &session)?;
        (s["commands"][0]["status"] == "exited").then_some(s)
    })
    .expect("the approved command ran");
    assert!(shown["commands"][0]["stdout"].as_str().is_some_and(|o| o.starts_with("fine")), "{shown}");

    // Deny: the next request never runs.
    let marker = org.world.root.path().join("ran-anyway");
    let script = format!("touch {}", marker.display());
    org.world.caisey("alice", &["run", "--machine", "ws-01", "--detach", "--", &script]).ok();
    step_until(&mut h, Duration::from_secs(30), "second request", |h| shows(h, "ran-anyway"));
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Deny").click();
    step_until(&mut h, Duration::from_secs(20), "denied", |h| shows(h, "denied") && shows(h, "Nothing is waiting"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists(), "a denied command never runs");
}

#[test]
fn a_note_and_a_hand_off_written_in_the_viewer_reach_a_colleague() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    org.join_technician("bob");
    org.world.run_approved("alice", "ws-01", &["--machine", "ws-01", "--session", "printer queue", "--", "true"]).ok();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "bob", &rt);
    step_until(&mut h, Duration::from_secs(30), "the session listed", |h| {
        h.state().snapshot.sessions.iter().any(|s| s.name == "printer queue")
    });
    h.get_by_label("Sessions").click();
    h.run_steps(2);
    h.get_by_label_contains("printer queue").click();
    step_until(&mut h, Duration::from_secs(10), "the session open", |h| h.state().open.is_some());
    h.get_by_label_contains("Hand-off").click();
    h.run_steps(2);
    h.get_by_label("New note").type_into("spooler restarted; waiting on the user");
    h.get_by_label("Add note").click();
    h.run_steps(2);
    h.get_by_label("Hand to").type_into("alice");
    h.get_by_label("Assign").click();
    step_until(&mut h, Duration::from_secs(15), "the note and the assignee shown", |h| {
        shows(h, "spooler restarted; waiting on the user") && shows(h, "Assigned to: alice")
    });
    let seen = caisey_tests::wait_for(Duration::from_secs(30), || {
        let out = org.world.caisey("alice", &["show", "printer queue"]);
        (out.stdout.contains("note by bob:") && out.stdout.contains("assigned to alice")).then_some(out)
    });
    assert!(seen.is_some(), "alice sees bob's note and the hand-off");
}

/// A designated approver's viewer opens on what waits for them, approves and denies with one
/// click each, lists only the machines they approve for, and offers no way to run anything; the
/// CLI refuses a run from them in one line.
#[test]
fn an_approver_approves_and_denies_in_the_viewer_and_cannot_run() {
    let org = Org::new(&[("ws-01", "accounting"), ("srv-01", "servers")]);
    let _agents = [org.world.start_agent("ws-01"), org.world.start_agent("srv-01")];
    let token = org.world.caisey("alice", &["invite", "approver", "--name", "carol", "--group", "accounting"]).ok();
    org.world.caisey("carol", &["join", token.stdout.trim()]).ok();
    let refused = org.world.caisey("carol", &["run", "--machine", "ws-01", "--", "true"]);
    assert_eq!(refused.code(), 2);
    assert!(refused.stderr.contains("only technicians ask machines to run commands"), "{}", refused.stderr);

    let mark = |n: &str| org.world.root.path().join(n);
    for (session, file) in [("approve me", "approved"), ("deny me", "denied")] {
        let script = format!("echo ran > {}", mark(file).display());
        org.world
            .caisey(
                "alice",
                &[
                    "run",
                    "--detach",
                    "--machine",
                    "ws-01",
                    "--session",
                    session,
                    "--description",
                    "checking the ledger export",
                    "--",
                    &script,
                ],
            )
            .ok();
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "carol", &rt);
    step_until(&mut h, Duration::from_secs(30), "two requests waiting", |h| h.state().snapshot.awaiting.len() == 2);
    assert!(h.state().tab == caisey_viewer::gui::app::Tab::Approvals, "the approver's viewer opens on its approvals");
    assert!(shows(&h, "checking the ledger export"), "the why is shown");
    assert!(shows(&h, "exactly as it will run"));
    assert!(h.query_by_label("Run").is_none() && h.query_by_label("History").is_none(), "no technician controls");
    let codes: Vec<(caisey_doc::text::PeerText, String)> =
        h.state().snapshot.awaiting.iter().map(|a| (a.session_name.clone(), a.id.short())).collect();
    for (session, code) in &codes {
        let verb = if session == "approve me" { "Approve" } else { "Deny" };
        h.get_by_label(&format!("{verb} {code}")).click();
        h.run_steps(2);
    }
    step_until(&mut h, Duration::from_secs(30), "nothing left waiting", |h| h.state().snapshot.awaiting.is_empty());
    caisey_tests::wait_for(Duration::from_secs(30), || mark("approved").exists().then_some(())).expect("approved ran");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!mark("denied").exists(), "a denied command ran");

    h.get_by_label("Fleet").click();
    h.run_steps(2);
    assert!(shows(&h, "ws-01") && !shows(&h, "srv-01"), "the approver sees only the machines they approve for");
    h.query_all_by_label_contains("ws-01").next().expect("ws-01 listed").click();
    h.run_steps(2);
    assert!(h.query_by_label("Run a command on ws-01").is_none(), "no run button for an approver");
}

/// The technician's why is shown in full in the consent window, wrapped to the window's width
/// rather than cut at one line.
#[test]
fn the_why_is_wrapped_in_full_in_the_consent_window() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let mut h = Harness::builder().with_size([720.0, 620.0]).build_ui_state(
        |ui, app: &mut PromptApp| app.show(ui),
        PromptApp::connect(org.world.home("ws-01").join(caisey_peer::home::SOCKET)).expect("prompt"),
    );
    let why = "The accounting team reports that the nightly export to the bank fails since Monday; \
               this lists the spool folder and the service's last log lines so we can see whether the \
               disk filled up or the service stopped. Nothing is changed on your computer. END-OF-WHY";
    org.world.caisey("alice", &["run", "--detach", "--machine", "ws-01", "--description", why, "--", "ls /tmp"]).ok();
    step_until(&mut h, Duration::from_secs(30), "the request", |h| shows(h, "exactly as it will run"));
    let label = h.get_by_label_contains("END-OF-WHY");
    let rect = label.rect();
    let line = 20.0;
    assert!(rect.width() <= 720.0, "the why runs past the window: {rect:?}");
    assert!(rect.height() > 2.0 * line, "the why is on one line, not wrapped: {rect:?}");
    let node = label.accesskit_node();
    let text = format!("{}{}", node.label().unwrap_or_default(), node.value().unwrap_or_default());
    assert!(text.contains("The accounting team reports") && text.contains("disk filled up"), "not in full: {text:?}");
}

/// Several machines picked in the Run tab's target list run as one group run, and only they.
#[test]
fn several_machines_picked_in_the_viewer_run_together() {
    let org = Org::new(&[("ws-01", "lab"), ("ws-02", "lab"), ("ws-03", "lab")]);
    let _agents: Vec<_> = ["ws-01", "ws-02", "ws-03"].iter().map(|a| org.world.start_agent(a)).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "alice", &rt);
    step_until(&mut h, Duration::from_secs(30), "machines known", |h| h.state().snapshot.machines.len() == 3);
    h.get_by_label("Run").click();
    h.run_steps(2);
    h.get_by_role_and_label(egui::accesskit::Role::ComboBox, "Target").click();
    h.run_steps(2);
    for m in ["ws-01", "ws-03"] {
        h.get_by_role_and_label(egui::accesskit::Role::CheckBox, m).click();
        h.run_steps(2);
    }
    assert_eq!(h.state().compose.target, "ws-01, ws-03");
    h.get_by_label("Command").type_into("echo picked");
    h.run_steps(1);
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Send").click();
    step_until(&mut h, Duration::from_secs(20), "two rows", |h| {
        h.state().group_run.as_ref().is_some_and(|g| g.rows.len() == 2)
    });
    approve_next(&org, "ws-01");
    approve_next(&org, "ws-03");
    step_until(&mut h, Duration::from_secs(30), "both done", |h| shows(h, "2 of 2 machines done"));
    assert_eq!(org.world.agent_cmd("ws-02", &["pending", "--json"]).ok().stdout.trim(), "[]", "ws-02 was asked");
}

/// A group run started from the command line is in the viewer as one investigation too.
#[test]
fn a_group_run_started_from_the_command_line_is_in_the_viewer() {
    let org = Org::new(&[("ws-01", "lab"), ("ws-02", "lab")]);
    let _agents: Vec<_> = ["ws-01", "ws-02"].iter().map(|a| org.world.start_agent(a)).collect();
    let run = org.world.spawn(
        "caisey",
        "alice",
        &["run", "--group", "lab", "--session", "from the cli", "--", "echo cli-run"],
    );
    for a in ["ws-01", "ws-02"] {
        approve_next(&org, a);
    }
    run.wait(Duration::from_secs(60)).ok();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "alice", &rt);
    step_until(&mut h, Duration::from_secs(20), "the run listed", |h| {
        h.state().snapshot.group_runs.iter().any(|r| r.name == "from the cli")
    });
    h.get_by_label("Group runs").click();
    h.run_steps(2);
    h.query_all_by_label_contains("from the cli").next().expect("listed").click();
    step_until(&mut h, Duration::from_secs(10), "its machines side by side", |h| {
        shows(h, "2 machines with this output: ws-01, ws-02") && shows(h, "local user on ws-02")
    });
}

/// A recurring check's values in the session view: a schedule with a probe, consented to once on
/// the machine, plotted as its runs come in (values, changes, the failed run flagged), a
/// threshold typed in flags the values above it, and the Schedules tab lists the check and
/// cancels it — which the agent then reports too.
#[test]
fn a_schedules_values_are_plotted_with_their_changes_and_it_is_cancelled_in_the_viewer() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    // Run n prints "queue length: 100·n²" (picked out by the schedule's pattern) and a spool
    // size with its unit (a probe line); the third run fails.
    let counter = org.world.home("ws-01").join("runs-counted");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo queue length: $((100*n*n)); \
         echo caisey-probe spool=$((10*n)).5 MB; if [ $n -eq 3 ]; then exit 3; fi",
        c = counter.display()
    );
    let asked = org
        .world
        .caisey(
            "alice",
            &[
                "schedule",
                "--json",
                "--machine",
                "ws-01",
                "--every",
                "3s",
                "--until",
                "10m",
                "--session",
                "print queue",
                "--probe",
                "queue=queue length: ([0-9]+)",
                "--",
                &script,
            ],
        )
        .ok();
    let asked: serde_json::Value = serde_json::from_str(&asked.stdout).expect("json");
    let schedule_id = asked[0]["request"].as_str().expect("schedule id").to_string();
    let code = asked[0]["code"].as_str().expect("consent code").to_string();
    wait_for(Duration::from_secs(30), || {
        org.world.agent_cmd("ws-01", &["pending", "--json"]).ok().stdout.contains(&code).then_some(())
    })
    .expect("the schedule reached the agent");
    org.world.agent_cmd("ws-01", &["approve", &code]).ok();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut h = viewer(&org, "alice", &rt);
    step_until(&mut h, Duration::from_secs(30), "the session listed", |h| {
        h.state().snapshot.sessions.iter().any(|s| s.name == "print queue")
    });
    h.get_by_label("Sessions").click();
    h.run_steps(2);
    h.get_by_label_contains("print queue").click();
    // Opened after the first run or so: the rest arrive while it is open.
    step_until(&mut h, Duration::from_secs(60), "four values in the table", |h| {
        ["100", "400", "900", "1600"].iter().all(|v| has_label(h, v))
    });
    assert!(shows(&h, "Values over time"), "the section is shown");
    let probe = h.get_by_role_and_label(egui::accesskit::Role::ComboBox, "Probe");
    assert_eq!(probe.accesskit_node().value().as_deref(), Some("queue"), "the first probe is shown");
    for change in ["+300", "+500", "+700"] {
        assert!(has_label(&h, change), "the change {change} is in the table");
    }
    assert!(has_label(&h, "—"), "the first run has no change");
    assert_eq!(h.query_all_by_label("failed: exit code 3").count(), 1, "the third run is flagged failed");
    let points = h.state().probes.points.clone().expect("the series");
    assert_eq!(&points.iter().map(|p| p.value).collect::<Vec<_>>()[..4], [100.0, 400.0, 900.0, 1600.0]);
    assert!(points.iter().all(|p| p.machine == "ws-01"), "{points:?}");
    assert_eq!(points[2].exit_code, Some(3));

    // A threshold flags the values above it: 900 and 1600 of the first four, and every later one.
    h.get_by_label("Threshold").type_into("500");
    step_until(&mut h, Duration::from_secs(5), "the values above 500 counted", |h| {
        let n = h.state().probes.points.as_ref().map_or(0, Vec::len);
        n >= 4 && shows(h, &format!("{} of {n} values above 500", n - 2))
    });
    let n = h.state().probes.points.as_ref().map_or(0, Vec::len);
    let flagged = h.query_all_by_label_contains("above threshold").count();
    assert_eq!(flagged, n - 2, "each value above 500 is flagged in the table");
    assert_eq!(h.query_all_by_label("failed: exit code 3, above threshold").count(), 1);
    // The plot's legend: the machine's line, the failed run's marker, the threshold line.
    for entry in ["ws-01", "failed run", "threshold 500", "over the threshold"] {
        let found = h.query_all_by_role_and_label(egui::accesskit::Role::CheckBox, entry).count();
        assert_eq!(found, 1, "the plot's legend has {entry}");
    }

    // The other probe, with its unit.
    h.get_by_role_and_label(egui::accesskit::Role::ComboBox, "Probe").click();
    h.run_steps(2);
    h.get_by_label("spool").click();
    step_until(&mut h, Duration::from_secs(10), "the spool values", |h| {
        ["10.5 MB", "20.5 MB", "30.5 MB", "40.5 MB"].iter().all(|v| has_label(h, v))
    });
    assert!(h.query_all_by_label("+10").count() >= 3, "each run's spool grew by 10");

    // The Schedules tab lists the check; Cancel stops it.
    h.get_by_label("Schedules").click();
    let short = &schedule_id[..8];
    step_until(&mut h, Duration::from_secs(10), "the schedule listed", |h| {
        shows(h, short) && shows(h, "standing consent") && shows(h, "every 3s")
    });
    let listed = h.state().snapshot.schedules.iter().find(|s| s.id.to_hex() == schedule_id).cloned().expect("listed");
    assert_eq!(listed.machine, "ws-01");
    assert!(listed.runs >= 4, "{listed:?}");
    assert!(listed.next_run.is_some(), "a standing schedule has a next run");
    h.get_by_role_and_label(egui::accesskit::Role::Button, &format!("Cancel {short}")).click();
    step_until(&mut h, Duration::from_secs(10), "cancelled", |h| {
        h.query_all_by_label("cancelled").count() == 1 && !has_label(h, &format!("Cancel {short}"))
    });
    assert!(shows(&h, &format!("cancelled schedule {short} on ws-01")), "the status bar says so");
    let consents = wait_for(Duration::from_secs(30), || {
        let out = org.world.agent_cmd("ws-01", &["consents", "--json"]).ok().stdout;
        let list: serde_json::Value = serde_json::from_str(&out).ok()?;
        let listed = list.as_array()?.iter().find(|c| c["schedule"].as_str().is_some_and(|s| s.starts_with(short)))?;
        let state = listed["state"].as_str()?.to_string();
        (state == "cancelled").then_some(state)
    });
    assert!(consents.is_some(), "the agent heard of the cancel");
}

#[test]
fn the_consent_window_shows_a_schedule_and_the_files_asked_for_and_revokes_a_standing_consent() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let mut h = Harness::builder().with_size([720.0, 760.0]).build_ui_state(
        |ui, app: &mut PromptApp| app.show(ui),
        PromptApp::connect(org.world.home("ws-01").join(caisey_peer::home::SOCKET)).expect("prompt"),
    );
    step_until(&mut h, Duration::from_secs(10), "idle", |h| shows(h, "Nothing is waiting"));

    // Files to bring back: the paths and the limit are shown before anything runs.
    org.world
        .caisey(
            "alice",
            &[
                "run",
                "--detach",
                "--machine",
                "ws-01",
                "--collect",
                "/var/crash/app.dmp",
                "--collect-limit",
                "200MiB",
                "--",
                "true",
            ],
        )
        .ok();
    step_until(&mut h, Duration::from_secs(30), "the files", |h| shows(h, "/var/crash/app.dmp"));
    assert!(shows(&h, "at most 200 MiB"), "the limit is shown");
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Deny").click();
    step_until(&mut h, Duration::from_secs(20), "denied", |h| shows(h, "Nothing is waiting"));

    // A schedule: what, how often, until when — approved once for all its runs.
    org.world
        .caisey(
            "alice",
            &["schedule", "--machine", "ws-01", "--every", "2s", "--until", "10m", "--", "echo weekly-memory-check"],
        )
        .ok();
    step_until(&mut h, Duration::from_secs(30), "the schedule", |h| shows(h, "weekly-memory-check"));
    assert!(shows(&h, "RECURRING: every 2s"), "the schedule is shown");
    assert_eq!(h.query_all_by_role_and_label(egui::accesskit::Role::Button, "Ask me at each run").count(), 1);
    std::thread::sleep(ARM_DELAY);
    h.run_steps(2);
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Approve all its runs").click();
    step_until(&mut h, Duration::from_secs(20), "approved", |h| shows(h, "for all its runs"));

    // It runs on its own; the window lists it with Revoke, and Revoke stops it at once.
    let runs = || {
        let out = org.world.agent_cmd("ws-01", &["consents", "--json"]).ok();
        let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        (list[0]["runs"].as_u64().unwrap_or(0), list[0]["state"].as_str().unwrap_or_default().to_string())
    };
    wait_for(Duration::from_secs(30), || (runs().0 >= 2).then_some(())).expect("it ran twice");
    step_until(&mut h, Duration::from_secs(10), "the standing consent", |h| {
        shows(h, "Recurring checks you allowed (1)")
    });
    h.get_by_label("Recurring checks you allowed (1)").click();
    h.run_steps(2);
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Revoke").click();
    step_until(&mut h, Duration::from_secs(20), "revoked", |h| shows(h, "it will not run again"));
    let (after, state) = runs();
    assert_eq!(state, "revoked");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(runs().0, after, "a revoked schedule ran again");
}
