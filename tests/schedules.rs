//! Recurring checks, end to end: the real binaries, a relay, a technician and an agent on
//! loopback. The agent runs a schedule on its own clock from one consent — with the
//! technician's node and the relay both gone for a run — and stops it at its end date, at a
//! revocation, and when a technician changes it.

use std::process::Command;
use std::time::Duration;

use caisey_tests::{Org, wait_for};

/// The agent's own list of schedules (`caisey-agent consents --json`).
fn consents(org: &Org) -> Vec<serde_json::Value> {
    let out = org.world.agent_cmd("ws-01", &["consents", "--json"]).ok();
    serde_json::from_str::<serde_json::Value>(&out.stdout).expect("json").as_array().cloned().unwrap_or_default()
}

/// Runs of schedule `id` (its id prefix) so far, and its state, as the agent has them.
fn runs_of(org: &Org, id: &str) -> (u64, String) {
    let c = consents(org);
    let s = c.iter().find(|c| c["schedule"].as_str().is_some_and(|s| s.starts_with(id))).expect("schedule listed");
    (s["runs"].as_u64().unwrap_or(0), s["state"].as_str().unwrap_or("").to_string())
}

fn wait_runs(org: &Org, id: &str, at_least: u64) {
    wait_for(Duration::from_secs(40), || (runs_of(org, id).0 >= at_least).then_some(()))
        .unwrap_or_else(|| panic!("schedule {id} did not reach {at_least} runs: {:?}", consents(org)));
}

/// Asks for a schedule as alice; returns the schedule id (short) and the consent code.
fn schedule(org: &Org, args: &[&str]) -> (String, String) {
    let mut all = vec!["schedule", "--machine", "ws-01", "--json"];
    all.extend_from_slice(args);
    let out = org.world.caisey("alice", &all).ok();
    let asked: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let id = asked[0]["request"].as_str().expect("id")[..8].to_string();
    let code = asked[0]["code"].as_str().expect("code").to_string();
    (id, code)
}

/// Waits for consent `code` to be pending on ws-01, then gives it as the endpoint user.
fn consent(org: &Org, code: &str) -> String {
    wait_for(Duration::from_secs(30), || {
        let out = org.world.agent_cmd("ws-01", &["pending", "--json"]).ok();
        out.stdout.contains(code).then_some(())
    })
    .expect("the schedule reached the agent");
    org.world.agent_cmd("ws-01", &["approve", code]).ok().stdout
}

#[test]
fn a_schedule_runs_from_one_consent_with_nobody_online_and_stops_when_it_should() {
    let mut org = Org::with_http(&[("ws-01", "accounting")]);
    let mut agent = org.world.start_agent("ws-01");
    let counter = org.world.home("ws-01").join("runs-counted");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo private_mb=$((200*n)); \
         echo caisey-probe handles=$((1000+n)) count",
        c = counter.display()
    );

    // One consent, then runs every 5 s on the agent's clock.
    let (weekly, code) = schedule(
        &org,
        &[
            "--every",
            "5s",
            "--until",
            "10m",
            "--session",
            "memory",
            "--probe",
            "private_mb=private_mb=([0-9.]+)",
            "--",
            &script,
        ],
    );
    let said = consent(&org, &code);
    assert!(said.contains("for all its runs"), "{said}");
    wait_runs(&org, &weekly, 1);

    // The technician's node and the relay both go away: the agent runs it anyway.
    org.world.down("alice");
    org.relay.take().expect("relay").kill9();
    wait_runs(&org, &weekly, 2);
    let (relay, ticket) = org.world.start_relay_with("relay", &["--http", "127.0.0.1:0"]);
    org.relay = Some(relay);
    assert_eq!(ticket, org.ticket);
    wait_runs(&org, &weekly, 4);

    // The run made while nobody was online reaches the technician later, values and all.
    let csv = wait_for(Duration::from_secs(40), || {
        let out = org.world.caisey("alice", &["history", "memory", "--probe", "private_mb", "--csv"]).ok();
        (out.stdout.lines().count() > 4).then_some(out.stdout)
    })
    .expect("four runs' values reached the technician");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert!(csv.starts_with("time,machine,probe,value,unit,change,exit_code,status,late,run\n"), "{csv}");
    let values: Vec<&str> = rows.iter().map(|r| r[3]).collect();
    assert_eq!(&values[..4], ["200", "400", "600", "800"], "{csv}");
    assert_eq!(rows[1][5], "200", "the change from the run before: {csv}");
    assert!(rows.iter().all(|r| r[1] == "\"ws-01\"" && r[6] == "0"), "{csv}");
    let handles = org.world.caisey("alice", &["history", "memory", "--probe", "handles", "--json"]).ok();
    let handles: serde_json::Value = serde_json::from_str(&handles.stdout).expect("json");
    assert_eq!(handles[0]["value"], 1001.0);
    assert_eq!(handles[0]["unit"], "count");

    // In the exports and in a shared transcript (signed, with a chart drawn without scripts).
    let export = org.world.caisey("alice", &["export", "memory", "--format", "csv"]).ok().stdout;
    assert!(export.contains("private_mb=400") && export.contains("handles=1002 count"), "{export}");
    let page = org.world.home("alice").join("memory.html");
    org.world.caisey("alice", &["share", "memory", "--out", page.to_str().expect("path")]).ok();
    let html = std::fs::read_to_string(&page).expect("page");
    assert!(html.contains("Values of private_mb over") && html.contains("<svg") && !html.contains("<script"));
    org.world.caisey("alice", &["verify", page.to_str().expect("path")]).ok();

    // Revoked: it stops at once, whoever is online.
    let revoked = org.world.agent_cmd("ws-01", &["consents", "revoke", &weekly]).ok();
    assert!(revoked.stdout.contains("revoked"), "{revoked:?}");
    let (runs, state) = runs_of(&org, &weekly);
    assert_eq!(state, "revoked");
    let counted = std::fs::read_to_string(&counter).expect("counter");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(runs_of(&org, &weekly).0, runs, "a revoked schedule ran again");
    assert_eq!(std::fs::read_to_string(&counter).expect("counter"), counted);
    let listed = org.world.caisey("alice", &["schedules"]).ok();
    assert!(
        wait_for(Duration::from_secs(20), || {
            org.world.caisey("alice", &["schedules"]).ok().stdout.contains("revoked").then_some(())
        })
        .is_some(),
        "{listed:?}"
    );

    // An end date: a schedule ending 14 s after it was asked runs at most twice, then never.
    let (short, code) = schedule(&org, &["--every", "5s", "--until", "14s", "--session", "short", "--", "echo short"]);
    consent(&org, &code);
    wait_for(Duration::from_secs(30), || (runs_of(&org, &short).1 == "ended").then_some(()))
        .expect("the schedule ended");
    let (ended_runs, _) = runs_of(&org, &short);
    assert!((1..=2).contains(&ended_runs), "{ended_runs} runs before its end date");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(runs_of(&org, &short).0, ended_runs, "a schedule ran past its end date");

    // A technician's change is a new schedule: it does not run until its user consents again.
    let (edited, code) = schedule(&org, &["--every", "5s", "--until", "10m", "--session", "edited", "--", "echo v1"]);
    consent(&org, &code);
    wait_runs(&org, &edited, 1);
    let out = org.world.caisey("alice", &["schedules", "edit", &edited, "--", "echo v2"]).ok();
    assert!(out.stdout.contains("consents again"), "{out:?}");
    wait_for(Duration::from_secs(30), || (runs_of(&org, &edited).1 == "cancelled").then_some(()))
        .expect("the old schedule was cancelled");
    let pending = org.world.agent_cmd("ws-01", &["pending"]).ok().stdout;
    assert!(pending.contains("echo v2") && pending.contains("RECURRING"), "{pending}");
    let (old_runs, _) = runs_of(&org, &edited);
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(runs_of(&org, &edited).0, old_runs, "the old schedule ran after it was replaced");
    let replacement = consents(&org).into_iter().find(|c| c["script"] == "echo v2").expect("the new schedule");
    assert_eq!(replacement["state"], "awaiting_consent");
    assert_eq!(replacement["runs"], 0, "the changed schedule ran without consent");

    // The machine off for three runs: one run, marked late, when it is back; or, if the
    // schedule says so, none until the next on time.
    let (late, code) = schedule(&org, &["--every", "5s", "--until", "10m", "--session", "late", "--", "echo late"]);
    consent(&org, &code);
    let (skip, code) = schedule(
        &org,
        &["--every", "5s", "--until", "10m", "--session", "skip", "--missed", "skip", "--", "echo skip"],
    );
    consent(&org, &code);
    wait_runs(&org, &late, 1);
    wait_runs(&org, &skip, 1);
    let skipped_before = runs_of(&org, &skip).0;
    agent.stop();
    std::thread::sleep(Duration::from_secs(16));
    agent = org.world.start_agent("ws-01");
    let runs = |session: &str, at_least: usize| {
        let s = org.show_json("alice", session)?;
        let cmds = s["commands"].as_array()?.clone();
        (cmds.len() >= at_least && cmds.iter().all(|c| c["status"] == "exited"))
            .then(|| cmds.iter().map(|c| c["late"].as_bool().unwrap_or(false)).collect::<Vec<bool>>())
    };
    let late_runs = wait_for(Duration::from_secs(40), || runs("late", 1).filter(|l| l.contains(&true)))
        .expect("a late run reached alice");
    assert_eq!(late_runs.iter().filter(|l| **l).count(), 1, "three missed runs ran once, late: {late_runs:?}");
    wait_runs(&org, &skip, skipped_before + 1);
    let skip_runs = wait_for(Duration::from_secs(40), || runs("skip", skipped_before as usize + 1))
        .expect("the next run reached alice");
    assert!(skip_runs.iter().all(|l| !l), "a skipped run ran late: {skip_runs:?}");

    // Asked at each run: every run waits for the endpoint user.
    let (each, code) = schedule(&org, &["--every", "5s", "--until", "10m", "--session", "each", "--", "echo each"]);
    wait_for(Duration::from_secs(30), || {
        org.world.agent_cmd("ws-01", &["pending", "--json"]).ok().stdout.contains(&code).then_some(())
    })
    .expect("the schedule reached the agent");
    let said = org.world.agent_cmd("ws-01", &["approve", "--each-run", &code]).ok().stdout;
    assert!(said.contains("each run will ask"), "{said}");
    let run_code = wait_for(Duration::from_secs(30), || {
        let out = org.world.agent_cmd("ws-01", &["pending", "--json"]).ok();
        let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        list.as_array()?.iter().find(|p| p["script"] == "echo each" && p.get("schedule").is_none())?["id"]
            .as_str()
            .map(str::to_string)
    })
    .expect("a run waits for the user");
    let (runs, state) = runs_of(&org, &each);
    assert_eq!(state, "each_run");
    assert!(runs >= 1, "the run waiting for the user is listed");
    org.world.agent_cmd("ws-01", &["approve", &run_code]).ok();
    let ran = wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", "each")?;
        (s["commands"][0]["status"] == "exited").then_some(())
    });
    assert!(ran.is_some(), "the run approved on its own did not run");

    // Revoked while a run is under way: that run stops at once too.
    let pid_file = org.world.home("ws-01").join("long-run.pid");
    let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let (long, code) = schedule(&org, &["--every", "2s", "--until", "10m", "--session", "long", "--", &script]);
    consent(&org, &code);
    let pid: i32 = wait_for(Duration::from_secs(30), || std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok())
        .expect("the long run started");
    let alive = |pid: i32| Command::new("kill").arg("-0").arg(pid.to_string()).status().is_ok_and(|s| s.success());
    assert!(alive(pid));
    org.world.agent_cmd("ws-01", &["consents", "revoke", &long]).ok();
    let stopped = wait_for(Duration::from_secs(10), || (!alive(pid)).then_some(()));
    assert!(stopped.is_some(), "the run went on after its consent was revoked");
    let shown = wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", "long")?;
        (s["commands"][0]["status"] == "stopped by the user").then_some(s)
    });
    assert!(shown.is_some(), "the session does not say the run was stopped: {:?}", org.show_json("alice", "long"));
    assert_eq!(runs_of(&org, &long).0, 1, "no run after the revocation");
    drop(agent);
}
