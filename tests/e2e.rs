//! End-to-end: the real binaries, several homes, loopback only. Each test builds its own org so
//! they can run in parallel.

use std::time::Duration;

use caisey_tests::{Org, World, wait_for};

const SCRIPT_BOTH_STREAMS: &str = "echo hello; echo oops >&2; exit 3";

#[test]
fn approved_command_streams_both_outputs_and_exits_with_the_remote_code() {
    let org = Org::new(&[("ws-01", "accounting")]);
    let _agent = org.world.start_agent("ws-01");
    org.join_technician("bob");
    // The machine shows up online with its card, for a colleague too.
    for tech in ["alice", "bob"] {
        let machine = wait_for(Duration::from_secs(20), || {
            let out = org.world.command("caisey", tech, &["machines", "--json"]).output().ok()?;
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let m = list.as_array()?.first()?.clone();
            (m["online"] == true && m["card"]["hostname"].is_string()).then_some(m)
        })
        .unwrap_or_else(|| panic!("{tech} does not see ws-01 online with its card"));
        assert_eq!(machine["name"], "ws-01");
        assert_eq!(machine["groups"][0], "accounting");
    }
    let run = org.world.spawn("caisey", "alice", &["run", "--machine", "ws-01", "--", SCRIPT_BOTH_STREAMS]);
    let id = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &id]).ok();
    let out = run.wait(Duration::from_secs(30));
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(out.stdout.contains("hello"), "{out:?}");
    assert!(out.stderr.contains("oops"), "{out:?}");
    // A command that outlives its timeout is killed and reported, as JSON for scripts.
    let run = org.world.spawn(
        "caisey",
        "alice",
        &["run", "--json", "--timeout", "1s", "--machine", "ws-01", "--", "sleep 30"],
    );
    let id = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &id]).ok();
    let out = run.wait(Duration::from_secs(30));
    assert_eq!(out.code(), 1, "{out:?}");
    let results: serde_json::Value = serde_json::from_str(&out.stdout).expect("run --json prints JSON");
    assert_eq!(results[0]["status"], "timed out", "{results}");
    assert_eq!(results[0]["machine"], "ws-01");
    // The colleague who joined sees it too.
    let sessions = org.world.caisey("bob", &["sessions", "--json"]).ok();
    let list: serde_json::Value = serde_json::from_str(&sessions.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    assert!(list[0]["id"].is_string() && list[0]["name"].is_string());
}

#[test]
fn denied_command_never_runs_and_run_exits_1() {
    let org = Org::new(&[("ws-01", "accounting")]);
    let _agent = org.world.start_agent("ws-01");
    let marker = org.world.root.path().join("ran-anyway");
    let script = format!("touch {}", marker.display());
    let run = org.world.spawn("caisey", "alice", &["run", "--machine", "ws-01", "--", &script]);
    let id = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["deny", &id]).ok();
    let out = run.wait(Duration::from_secs(30));
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("denied"), "{out:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(!marker.exists(), "the denied command ran");
    // Approving after the denial is refused too.
    let again = org.world.agent_cmd("ws-01", &["approve", &id]);
    assert_eq!(again.code(), 2);
    assert!(!marker.exists());
}

#[test]
fn killing_the_technician_mid_command_loses_nothing_and_a_colleague_sees_it_all() {
    let org = Org::new(&[("ws-01", "accounting")]);
    let _agent = org.world.start_agent("ws-01");
    org.join_technician("bob");
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 1; done; exit 0";
    let run = org.world.spawn("caisey", "alice", &["run", "--machine", "ws-01", "--session", "long", "--", script]);
    let id = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &id]).ok();
    wait_for(Duration::from_secs(15), || run.stdout().contains("line 2").then_some(()))
        .expect("output streamed to alice");
    run.kill9();
    let done = wait_for(Duration::from_secs(40), || {
        let s = org.show_json("bob", "long")?;
        (s["commands"][0]["status"] == "exited").then_some(s)
    })
    .expect("bob sees the command finish");
    let stdout = done["commands"][0]["stdout"].as_str().unwrap_or_default().to_string();
    for i in 1..=10 {
        assert!(stdout.contains(&format!("line {i}\n")), "missing line {i}: {stdout:?}");
    }
    assert_eq!(done["commands"][0]["exit_code"], 0);
}

#[test]
fn store_and_forward_through_the_relay_when_never_online_together() {
    let org = Org::new(&[("ws-01", "accounting")]);
    // The agent has been online once (so it is known), then is stopped.
    org.world.start_agent("ws-01").stop();
    let asked = org
        .world
        .caisey("alice", &["run", "--detach", "--machine", "ws-01", "--session", "sf", "--", "echo forwarded-$((6*7))"])
        .ok();
    assert!(asked.stdout.contains("asked"), "{asked:?}");
    let agent = org.world.start_agent("ws-01");
    let id = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &id]).ok();
    // Wait until the relay holds the result (show only talks to relays), then stop the agent.
    wait_for(Duration::from_secs(30), || {
        (org.show_json("alice", "sf")?["commands"][0]["status"] == "exited").then_some(())
    })
    .expect("result reached the relay");
    agent.stop();
    let s = org.show_json("alice", "sf").expect("show");
    assert_eq!(s["commands"][0]["stdout"], "forwarded-42\n");
    assert_eq!(s["commands"][0]["exit_code"], 0);
}

#[test]
fn relay_restart_loses_nothing() {
    let mut org = Org::new(&[("ws-01", "accounting")]);
    let agent = org.world.start_agent("ws-01");
    let run = org.world.spawn(
        "caisey",
        "alice",
        &["run", "--machine", "ws-01", "--session", "before-restart", "--", "echo kept"],
    );
    let id = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &id]).ok();
    assert_eq!(run.wait(Duration::from_secs(30)).code(), 0);
    drop(agent);
    // Hard stop, then the same home again.
    org.relay.take().expect("relay").kill9();
    let (relay, ticket) = org.world.start_relay("relay");
    org.relay = Some(relay);
    assert_eq!(ticket, org.ticket, "the relay came back at another address");
    // A colleague who never met the relay before the restart gets the old session from it.
    org.join_technician("carol");
    let s = org.show_json("carol", "before-restart").expect("carol sees the session");
    assert_eq!(s["commands"][0]["stdout"], "kept\n");
}

#[test]
fn group_run_returns_one_labelled_result_per_machine() {
    let org =
        Org::new(&[("ws-01", "accounting"), ("ws-02", "accounting"), ("ws-03", "accounting"), ("other", "sales")]);
    let _agents: Vec<_> = ["ws-01", "ws-02", "ws-03", "other"].iter().map(|a| org.world.start_agent(a)).collect();
    let run = org.world.spawn("caisey", "alice", &["run", "--group", "accounting", "--", "echo group-ok"]);
    for a in ["ws-01", "ws-02", "ws-03"] {
        let id = org.world.wait_pending(a);
        org.world.agent_cmd(a, &["approve", &id]).ok();
    }
    let out = run.wait(Duration::from_secs(30));
    assert_eq!(out.code(), 0, "{out:?}");
    for a in ["ws-01", "ws-02", "ws-03"] {
        assert!(out.stdout.contains(&format!("[{a} out] group-ok")), "{a} missing: {}", out.stdout);
    }
    assert!(!out.stdout.contains("[other"), "a machine outside the group ran it");
    let pending_other = org.world.agent_cmd("other", &["pending", "--json"]).ok();
    assert_eq!(pending_other.stdout.trim(), "[]");

    // A subset, named: --machine repeated, or a list.
    let run = org.world.spawn(
        "caisey",
        "alice",
        &["run", "--machine", "ws-01", "--machine", "other,ws-03", "--", "echo subset-ok"],
    );
    for a in ["ws-01", "other", "ws-03"] {
        let id = org.world.wait_pending(a);
        org.world.agent_cmd(a, &["approve", &id]).ok();
    }
    let out = run.wait(Duration::from_secs(30));
    assert_eq!(out.code(), 0, "{out:?}");
    for a in ["ws-01", "other", "ws-03"] {
        assert!(out.stdout.contains(&format!("[{a} out] subset-ok")), "{a} missing: {}", out.stdout);
    }
    assert!(!out.stdout.contains("[ws-02"), "a machine not named ran it");
    assert_eq!(org.world.agent_cmd("ws-02", &["pending", "--json"]).ok().stdout.trim(), "[]");
}

#[test]
fn used_expired_and_damaged_tokens_are_refused_with_one_clear_line() {
    let org = Org::new(&[]);
    let token = org.invite_agent("ws-01", "accounting", "1h");
    org.world.agent_cmd("ws-01", &["enroll", &token]).ok();

    let used = org.world.agent_cmd("ws-02", &["enroll", &token]);
    assert_eq!(used.code(), 2);
    assert_one_line(&used.stderr, "already used");

    let short = org.invite_agent("ws-03", "accounting", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let expired = org.world.agent_cmd("ws-03", &["enroll", &short]);
    assert_eq!(expired.code(), 2);
    assert_one_line(&expired.stderr, "expired");

    let fresh = org.invite_agent("ws-04", "accounting", "1h");
    let mut chars: Vec<char> = fresh.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'a' { 'b' } else { 'a' };
    let damaged: String = chars.into_iter().collect();
    let out = org.world.agent_cmd("ws-04", &["enroll", &damaged]);
    assert_eq!(out.code(), 2);
    assert_one_line(&out.stderr, "damaged");
    // The good token still works after the damaged copy was refused.
    org.world.agent_cmd("ws-04", &["enroll", &fresh]).ok();
}

fn assert_one_line(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got {stderr:?}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{stderr:?}");
}

#[test]
fn a_non_member_cannot_fetch_a_session_document() {
    let org = Org::new(&[("ws-01", "accounting")]);
    org.world
        .caisey("alice", &["run", "--detach", "--machine", "ws-01", "--session", "secret", "--", "echo s3cret"])
        .ok();
    let sessions: serde_json::Value =
        serde_json::from_str(&org.world.caisey("alice", &["sessions", "--json"]).ok().stdout).expect("json");
    let session: caisey_doc::id::Id128 = sessions[0]["id"].as_str().expect("id").parse().expect("session id");
    let ticket = caisey_doc::token::RelayTicket::decode(&org.ticket).expect("ticket");
    let received = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(caisey_tests::probe::fetch_as_stranger(&ticket, session));
    assert!(received.iter().all(|doc| *doc != session), "the relay sent the session to a stranger");
    assert!(received.is_empty(), "the relay sent documents to a stranger: {received:?}");
}

#[test]
fn bad_command_lines_get_one_clear_error() {
    let world = World::new();
    let out = world.caisey("t", &["machines"]);
    // No org yet: nothing to list, but no crash either.
    assert_eq!(out.code(), 0, "{out:?}");
    let out = world.caisey("t", &["relay", "add", "not-a-ticket"]);
    assert_eq!(out.code(), 2);
    assert_one_line(&out.stderr, "not a caisey relay ticket");
    let out = world.caisey("t", &["run", "--machine", "nope", "--", "true"]);
    assert_eq!(out.code(), 2);
    assert_one_line(&out.stderr, "no machine named");
    let out = world.agent_cmd("a", &["approve", "abc"]);
    assert_eq!(out.code(), 2);
    assert_one_line(&out.stderr, "agent is not running");
}

#[test]
fn a_command_too_big_to_ask_gets_one_clear_line() {
    let org = Org::new(&[("ws-01", "lab")]);
    // Three words of 100 KiB (one argument may not exceed 128 KiB); the CLI joins them.
    let word = "x".repeat(100 * 1024);
    let out = org.world.caisey("alice", &["run", "--machine", "ws-01", "--", "echo", &word, &word, &word]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert_one_line(&out.stderr, "at most 256 KiB can be asked");
}

#[test]
fn an_agent_killed_mid_command_records_it_interrupted_and_never_runs_it_again() {
    let org = Org::new(&[("ws-01", "accounting")]);
    let agent = org.world.start_agent("ws-01");
    let marker = org.world.root.path().join("runs");
    let script = format!("echo started >> {}; echo started; sleep 20", marker.display());
    org.world.caisey("alice", &["run", "--detach", "--machine", "ws-01", "--session", "crash", "--", &script]).ok();
    let id = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &id]).ok();
    wait_for(Duration::from_secs(30), || {
        org.show_json("alice", "crash")?["commands"][0]["stdout"].as_str()?.contains("started").then_some(())
    })
    .expect("the command started and its output reached the relay");
    agent.kill9();
    let _agent = org.world.start_agent("ws-01");
    let s = wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", "crash")?;
        (s["commands"][0]["status"] == "interrupted").then_some(s)
    })
    .expect("the restarted agent records the command as interrupted");
    assert_eq!(s["commands"][0]["exit_code"], serde_json::Value::Null);
    std::thread::sleep(Duration::from_secs(2));
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(runs.lines().count(), 1, "the command ran again after the restart: {runs:?}");
}

#[test]
fn the_readme_demo_runs_its_story_to_the_end() {
    let world = World::new();
    let mut cmd = std::process::Command::new(caisey_tests::bin("caisey"));
    // As on a fresh machine without a display (CI): the demo tells its story in the terminal.
    cmd.args(["demo"]).env("RUST_LOG", "error").env("TMPDIR", world.root.path());
    cmd.env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY");
    let out = cmd.output().expect("demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for machine in ["ws-01", "ws-02", "ws-03"] {
        assert!(stdout.contains(&format!("online  {machine}")), "{stdout}");
    }
    assert!(stdout.contains("[ws-01 out] host: "), "{stdout}");
    assert!(stdout.contains("[ws-01 err] a warning on stderr"), "{stdout}");
    assert!(stdout.contains("ws-01: exited with code 0"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no display here"), "says why there is no window");
}

#[test]
fn a_shop_without_a_relay_enrolls_runs_and_hands_off_through_the_technicians_node() {
    let world = World::new();
    world.caisey("alice", &["init", "--org", "Shop", "--name", "alice"]).ok();
    // The technician's node for good, as a service manager would run it.
    world.down("alice");
    let up = world.spawn("caisey", "alice", &["up"]);
    wait_for(Duration::from_secs(20), || {
        let out = world.command("caisey", "alice", &["status", "--json"]).output().ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (status["running"] == true).then_some(())
    })
    .unwrap_or_else(|| panic!("caisey up did not start: {}", up.stderr()));
    let agents = ["ws-01", "ws-02", "ws-03"];
    for name in agents {
        let invite = world.caisey("alice", &["invite", "agent", "--name", name, "--group", "front"]).ok();
        assert!(invite.stderr.contains("serves the enrollment"), "{}", invite.stderr);
        world.agent_cmd(name, &["enroll", invite.stdout.trim()]).ok();
    }
    let _running: Vec<_> = agents.iter().map(|a| world.start_agent(a)).collect();
    let run = world.spawn(
        "caisey",
        "alice",
        &["run", "--group", "front", "--session", "lan", "--", "echo on-$(hostname)-ok"],
    );
    for a in agents {
        let id = world.wait_pending(a);
        world.agent_cmd(a, &["approve", &id]).ok();
    }
    let out = run.wait(Duration::from_secs(60));
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout.matches("out] on-").count(), 3, "{out:?}");

    // Every agent is a direct peer of the technician's node.
    let status: serde_json::Value =
        serde_json::from_str(&world.caisey("alice", &["status", "--json"]).ok().stdout).expect("json");
    let peers = status["peers"].as_array().expect("peers");
    for a in agents {
        assert!(peers.iter().any(|p| p["name"] == a && p["path"] == "direct"), "{status}");
    }
    assert_eq!(status["relays"].as_array().map(Vec::len), Some(0), "{status}");

    // A colleague joins through alice's node and catches up on everything.
    let token = world.caisey("alice", &["invite", "technician", "--name", "bob"]).ok().stdout.trim().to_string();
    world.caisey("bob", &["join", &token]).ok();
    let seen = wait_for(Duration::from_secs(30), || {
        let out = world.command("caisey", "bob", &["sessions", "--json"]).output().ok()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (list.as_array()?.len() == 3).then_some(list)
    });
    assert!(seen.is_some(), "bob does not see the three sessions");
    let shown = world.caisey("bob", &["show", "lan (ws-02)"]).ok();
    assert!(shown.stdout.contains("exited with code 0") && shown.stdout.contains("-ok"), "{}", shown.stdout);

    // `caisey down` stops the foreground node too.
    world.down("alice");
    let stopped = up.wait(Duration::from_secs(20));
    assert!(stopped.status.success(), "{stopped:?}");
}

#[test]
fn a_client_of_another_api_version_gets_one_clear_line() {
    use std::io::{BufRead, Write};
    let world = World::new();
    world.caisey("alice", &["init", "--org", "Acme", "--name", "alice"]).ok();
    let mut socket = std::os::unix::net::UnixStream::connect(world.home("alice").join("node.sock")).expect("socket");
    socket.write_all(b"{\"api\":\"caisey-node\",\"version\":999}\n").expect("hello");
    let mut line = String::new();
    std::io::BufReader::new(&socket).read_line(&mut line).expect("answer");
    assert!(line.contains("v1") && line.contains("v999") && line.contains("one version"), "{line}");
    // And the node goes on serving clients that speak its version.
    world.caisey("alice", &["sessions"]).ok();
}

#[test]
fn with_two_relays_one_can_vanish_for_good_and_a_third_added_later_catches_up() {
    let world = World::new();
    let (relay1, ticket1) = world.start_relay("relay1");
    let (_relay2, ticket2) = world.start_relay("relay2");
    world.caisey("alice", &["init", "--org", "Acme", "--name", "alice"]).ok();
    world.caisey("alice", &["relay", "add", &ticket1]).ok();
    world.caisey("alice", &["relay", "add", &ticket2]).ok();
    let token = world.caisey("alice", &["invite", "agent", "--name", "pc1"]).ok().stdout.trim().to_string();
    world.agent_cmd("pc1", &["enroll", &token]).ok();
    let agent = world.start_agent("pc1");
    let run_on_pc1 = |word: &str| {
        let out = world.run_approved(
            "alice",
            "pc1",
            &["--machine", "pc1", "--session", "weekly", "--", &format!("echo {word}")],
        );
        assert_eq!(out.code(), 0, "{out:?}");
        assert!(out.stdout.contains(word), "{out:?}");
    };
    run_on_pc1("first-run");

    // The relay that enrolled pc1 is gone for good, its disk with it; alice's node restarts.
    relay1.kill9();
    std::fs::remove_dir_all(world.home("relay1")).expect("delete relay1's home");
    world.down("alice");
    run_on_pc1("second-run");

    // A third relay, added afterwards, catches up with everything.
    let (_relay3, ticket3) = world.start_relay("relay3");
    world.caisey("alice", &["relay", "add", &ticket3]).ok();
    let bob_token = world.caisey("alice", &["invite", "technician", "--name", "bob"]).ok().stdout.trim().to_string();
    let relay3 = serde_json::to_value(caisey_doc::token::RelayTicket::decode(&ticket3).expect("ticket").0.node)
        .expect("node id");
    wait_for(Duration::from_secs(30), || {
        let out = world.command("caisey", "alice", &["status", "--json"]).output().ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let relays = status["relays"].as_array()?.clone();
        relays.iter().any(|r| r["node"] == relay3 && r["connected"] == true && r["unconfirmed_docs"] == 0).then_some(())
    })
    .expect("relay3 holds everything alice holds");
    // Only relay3 is left to serve: the other relay, alice's node and the agent are all gone.
    drop(_relay2);
    agent.stop();
    world.down("alice");
    world.caisey("bob", &["join", &bob_token]).ok();
    let shown = world.caisey("bob", &["show", "weekly"]).ok();
    assert!(shown.stdout.contains("first-run") && shown.stdout.contains("second-run"), "{}", shown.stdout);
}

#[test]
fn a_run_against_an_offline_machine_ends_when_its_request_expires() {
    let org = Org::new(&[("ws-01", "lab")]);
    // ws-01 is enrolled but its agent is not running.
    let started = std::time::Instant::now();
    let out = org.world.caisey("alice", &["run", "--expires", "3s", "--machine", "ws-01", "--", "true"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "the run waited {:?}", started.elapsed());
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("ws-01") && last.contains("before the request expired"), "{}", out.stderr);
}

/// A command that writes a heartbeat file every 0.1 s while it runs (in a child process, as real
/// scripts do): whether it still runs shows in the file's changing.
fn heartbeat_script(file: &std::path::Path, prelude: &str) -> String {
    format!("{prelude} (while true; do date +%s%N > {f}; sleep 0.1; done) & echo started; wait", f = file.display())
}

/// Whether `file` is still being written a second later.
fn still_beating(file: &std::path::Path) -> bool {
    let before = std::fs::read_to_string(file).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::read_to_string(file).unwrap_or_default() != before
}

#[test]
fn a_command_interrupted_by_an_agent_crash_has_stopped_and_a_timeout_stops_all_it_started() {
    let org = Org::new(&[("ws-01", "lab")]);
    let agent = org.world.start_agent("ws-01");
    // 1. Killed with its agent: the command and its children stop at once.
    let beat = org.world.root.path().join("beat-1");
    let run = |session: &str, script: &str, timeout: &str| {
        org.world
            .caisey(
                "alice",
                &["run", "--detach", "--timeout", timeout, "--machine", "ws-01", "--session", session, "--", script],
            )
            .ok();
        let id = org.world.wait_pending("ws-01");
        org.world.agent_cmd("ws-01", &["approve", &id]).ok();
    };
    run("crash", &heartbeat_script(&beat, ""), "60s");
    wait_for(Duration::from_secs(20), || beat.exists().then_some(())).expect("the command started");
    assert!(still_beating(&beat));
    agent.kill9();
    assert!(!still_beating(&beat), "the command ran on after its agent was killed");

    // 2. One that ignores the signal is found and killed when the agent restarts, and the
    //    session says so.
    let agent = org.world.start_agent("ws-01");
    let beat2 = org.world.root.path().join("beat-2");
    run("stubborn", &heartbeat_script(&beat2, "trap '' TERM;"), "60s");
    wait_for(Duration::from_secs(20), || beat2.exists().then_some(())).expect("the command started");
    agent.kill9();
    assert!(still_beating(&beat2), "it ignores the signal it gets when its agent dies");
    let _agent = org.world.start_agent("ws-01");
    wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", "stubborn")?;
        (s["commands"][0]["status"] == "interrupted").then_some(())
    })
    .expect("recorded as interrupted");
    assert!(!still_beating(&beat2), "what was left of it was killed at restart");
    let text = org.world.caisey("alice", &["show", "stubborn"]).ok().stdout;
    assert!(text.contains("killed when the agent restarted"), "{text}");

    // 3. A timeout stops everything the command started, not just its shell.
    let beat3 = org.world.root.path().join("beat-3");
    run("slow", &heartbeat_script(&beat3, ""), "2s");
    let s = wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", "slow")?;
        (s["commands"][0]["status"] == "timed out").then_some(s)
    })
    .expect("timed out");
    assert_eq!(s["commands"][0]["status"], "timed out");
    assert!(!still_beating(&beat3), "its children outlived the timeout");
}

#[test]
fn a_damaged_store_gets_one_clear_line_and_is_not_replaced() {
    let org = Org::new(&[("ws-01", "lab")]);
    let store = org.world.home("ws-01").join("store.redb");
    std::fs::write(&store, b"").expect("empty the store");
    let out = org.world.agent_cmd("ws-01", &["run"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert_one_line(&out.stderr, "is damaged (it is empty)");
    assert_eq!(std::fs::metadata(&store).expect("still there").len(), 0, "not replaced by an empty store");
}

#[test]
fn hostile_names_and_descriptions_never_reach_a_terminal_raw() {
    let world = World::new();
    let (_relay, ticket) = world.start_relay("relay");
    let evil_tech = "al\u{1b}]0;pwned\u{7}ice\u{202e}";
    world.caisey("alice", &["init", "--org", "Acme", "--name", evil_tech]).ok();
    world.caisey("alice", &["relay", "add", &ticket]).ok();
    let token = world.caisey("alice", &["invite", "agent"]).ok().stdout.trim().to_string();
    world.agent_cmd("ws", &["enroll", &token, "--name", "ws\u{1b}[2J-01"]).ok();
    let _agent = world.start_agent("ws");
    let fake_block = "checking\n    sh (timeout 1s):\n      echo harmless";
    world
        .caisey(
            "alice",
            &[
                "run",
                "--detach",
                "--machine",
                "ws\u{1b}[2J-01",
                "--session",
                "s",
                "--description",
                fake_block,
                "--",
                "rm -rf /tmp/nothing-here",
            ],
        )
        .ok();
    world.wait_pending("ws");
    let raw = |out: &str| out.contains('\u{1b}') || out.contains('\u{202e}') || out.contains('\u{7}');
    let pending = world.agent_cmd("ws", &["pending"]).ok().stdout;
    assert!(!raw(&pending), "{pending:?}");
    assert!(pending.contains("why: checking\\n"), "the description stays on its line: {pending}");
    for args in [&["machines"][..], &["show", "s"], &["sessions"]] {
        let out = world.caisey("alice", args).ok().stdout;
        assert!(!raw(&out), "caisey {args:?} printed {out:?}");
    }
}

#[test]
fn a_relay_killed_with_kill_9_and_restarted_is_back_in_use_within_seconds() {
    let mut org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    org.world.caisey("alice", &["sessions"]).ok();
    org.relay.take().expect("relay").kill9();
    let killed = std::time::Instant::now();
    let (_relay, _) = org.world.start_relay("relay");
    // A change made now can only reach the relay once alice's node has noticed that its old
    // connection is dead and dialled the new relay.
    org.world.caisey("alice", &["run", "--detach", "--machine", "ws-01", "--", "true"]);
    wait_for(Duration::from_secs(30), || {
        let out = org.world.command("caisey", "alice", &["status", "--json"]).output().ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let relay = status["relays"].as_array()?.first()?.clone();
        (relay["connected"] == true && relay["unconfirmed_docs"] == 0).then_some(())
    })
    .expect("the relay holds alice's change");
    let took = killed.elapsed();
    eprintln!("relay back in use {took:?} after kill -9");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn the_agent_s_socket_keeps_serving_after_a_burst_exhausts_its_file_descriptors() {
    let org = Org::new(&[("ws-01", "lab")]);
    // The daemon with few file descriptors, as a busy machine might leave it.
    let home = org.world.home("ws-01");
    let script = format!(
        "ulimit -n 96; exec {} --home {} --listen 127.0.0.1:0 run",
        caisey_tests::bin("caisey-agent").display(),
        home.display()
    );
    let mut daemon = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("RUST_LOG", "error,iroh::socket::transports::relay=off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("daemon");
    let socket = home.join("node.sock");
    wait_for(Duration::from_secs(20), || org.world.agent_cmd("ws-01", &["pending"]).status.success().then_some(()))
        .expect("the daemon answers");
    // Far more connections than it has descriptors for, all held open at once.
    let burst: Vec<_> = (0..200).filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(burst);
    let answered =
        wait_for(Duration::from_secs(10), || org.world.agent_cmd("ws-01", &["pending"]).status.success().then_some(()));
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(answered.is_some(), "the socket stopped serving after the burst");
}

#[test]
fn output_damaged_on_disk_is_fetched_again_from_a_peer_that_has_it() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    org.world
        .run_approved("alice", "ws-01", &["--machine", "ws-01", "--session", "disk", "--", "echo output-kept-safe"])
        .ok();
    // One flipped byte in alice's output log, while her node is stopped.
    org.world.down("alice");
    let log = org.world.home("alice").join("store.chunks");
    let mut bytes = std::fs::read(&log).expect("output log");
    let at = bytes.windows(11).position(|w| w == b"output-kept").expect("the output is in the log");
    bytes[at] ^= 0x20;
    std::fs::write(&log, &bytes).expect("damage");
    // Reading it finds the damage (the damaged bytes are never shown) and fetches a good copy
    // from the relay.
    let stdout = |s: &serde_json::Value| s["commands"][0]["stdout"].as_str().unwrap_or_default().to_string();
    let first = org.show_json("alice", "disk").expect("show");
    assert!(!stdout(&first).contains("Output-kept"), "damaged bytes shown: {first}");
    let shown = wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", "disk")?;
        (stdout(&s) == "output-kept-safe\n").then_some(())
    });
    assert!(shown.is_some(), "the damaged output never came back: {:?}", org.show_json("alice", "disk"));
}

#[test]
fn the_why_is_kept_in_show_json_exports_and_every_pending_list() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let token = org.world.caisey("alice", &["invite", "approver", "--name", "carol", "--machine", "ws-01"]).ok();
    org.world.caisey("carol", &["join", token.stdout.trim()]).ok();
    let why = "QuickBooks crashed twice this morning while posting payroll; checking memory and the \
               event log before the 2 pm run so we know whether to reschedule it (ticket 4711)";
    org.world
        .caisey(
            "alice",
            &["run", "--detach", "--machine", "ws-01", "--session", "why", "--description", why, "--", "true"],
        )
        .ok();
    org.world.wait_pending("ws-01");
    let at_endpoint = org.world.agent_cmd("ws-01", &["pending"]).ok().stdout;
    assert!(at_endpoint.contains(why), "{at_endpoint}");
    let for_approver = wait_for(Duration::from_secs(20), || {
        let out = org.world.caisey("carol", &["pending"]).stdout;
        out.contains(why).then_some(out)
    });
    assert!(for_approver.is_some(), "the approver's list lacks the why");
    assert!(org.world.caisey("alice", &["show", "why"]).ok().stdout.contains(why));
    let json = org.show_json("alice", "why").expect("show --json");
    assert_eq!(json["commands"][0]["description"], why);
    let csv = org.world.caisey("alice", &["export", "why", "--format", "csv"]).ok().stdout;
    assert!(csv.lines().next().is_some_and(|h| h.contains("description")) && csv.contains(why), "{csv}");
}

#[test]
fn a_request_has_one_code_from_the_technician_to_the_endpoint() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let asked =
        org.world.caisey("alice", &["run", "--detach", "--machine", "ws-01", "--", "echo one-code"]).ok().stdout;
    let code = asked.split("code ").nth(1).and_then(|r| r.split_whitespace().next()).expect("a code").to_string();
    assert_eq!(code.len(), 8, "{asked}");
    let pending = org.world.agent_cmd("ws-01", &["pending"]).ok().stdout;
    assert!(pending.starts_with(&code), "the endpoint lists the same code: {asked} / {pending}");
    org.world.agent_cmd("ws-01", &["approve", &code]).ok();
    let shown = wait_for(Duration::from_secs(20), || {
        let session = asked.split("session ").nth(1)?.trim_end_matches([')', '\n']);
        let s = org.world.caisey("alice", &["show", session]).stdout;
        s.contains("exited with code 0").then_some(s)
    })
    .expect("it ran");
    assert!(shown.contains(&format!("code {code}")), "{shown}");
}

#[test]
fn a_reader_that_goes_away_ends_a_listing_quietly() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    org.world.run_approved("alice", "ws-01", &["--group", "lab", "--session", "listed", "--", "seq 1 5000"]).ok();
    let listings: [&[&str]; 9] = [
        &["machines", "--json"],
        &["machine", "ws-01", "--software"],
        &["sessions"],
        &["status"],
        &["show", "listed (ws-01)"],
        &["history", "--command", "seq 1 5000"],
        &["group-runs"],
        &["group-run", "listed"],
        &["export", "listed (ws-01)", "--format", "csv"],
    ];
    for args in listings {
        let mut child = org.world.command("caisey", "alice", args).spawn().expect("spawn");
        // Like `caisey machines | head -0`: the reader is gone before anything is printed.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "caisey {args:?}: {stderr}");
        assert!(out.status.success(), "caisey {args:?}: {:?} {stderr}", out.status);
    }
}

#[test]
fn machines_are_found_by_installed_software_and_sessions_by_their_why() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let software = wait_for(Duration::from_secs(30), || {
        let out = org.world.command("caisey", "alice", &["machines", "--json"]).output().ok()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let apps = list.as_array()?.first()?["card"]["software"].as_array()?.clone();
        apps.last()?["name"].as_str().map(str::to_string)
    })
    .expect("the card lists installed software");
    let found = org.world.caisey("alice", &["machines", "--search", &software]).ok().stdout;
    assert!(found.contains("ws-01"), "--search {software}: {found}");
    let none = org.world.caisey("alice", &["machines", "--search", "no-such-thing-installed"]).ok().stdout;
    assert_eq!(none.trim(), "no machines match", "no misleading hint to enroll: {none}");

    org.world
        .caisey(
            "alice",
            &[
                "run",
                "--detach",
                "--machine",
                "ws-01",
                "--session",
                "payroll",
                "--description",
                "Backup Engine stalls at night",
                "--",
                "true",
            ],
        )
        .ok();
    let listed = org.world.caisey("alice", &["sessions", "--search", "backup engine"]).ok().stdout;
    assert!(listed.contains("payroll"), "{listed}");
}

/// A session of many megabytes exports a page of output at a time: the file, `show --json`
/// and the CSV hold all of it exactly (characters cut by chunk edges, an invalid byte), and a
/// wait that long shows its progress.
#[test]
fn a_large_session_exports_streamed_whole_and_shows_progress() {
    let org = Org::new(&[("ws-40", "lab")]);
    let w = &org.world;
    let _agent = w.start_agent("ws-40");
    const SIZE: usize = 12_000_000;
    let script = format!("printf '\\377\\n'; yes 'héllo wörld ünïcode' | head -c {SIZE}; echo err-line >&2");
    w.run_approved("alice", "ws-40", &["--machine", "ws-40", "--session", "big", "--", &script]).ok();
    let mut raw = b"\xff\n".to_vec();
    raw.extend("héllo wörld ünïcode\n".bytes().cycle().take(SIZE));
    let expected = String::from_utf8_lossy(&raw).into_owned();

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("big.json");
    let out = w.caisey("alice", &["export", "big", "--format", "json", "--out", file.to_str().expect("utf-8")]).ok();
    assert!(out.stderr.contains("exporting: 0%") && out.stderr.contains("exporting: 100%"), "{}", out.stderr);
    let written = std::fs::read_to_string(&file).expect("export");
    let json: serde_json::Value = serde_json::from_str(&written).expect("export is JSON");
    let cmd = &json["commands"][0];
    assert!(cmd["stdout"].as_str() == Some(expected.as_str()), "stdout differs ({} bytes)", written.len());
    assert_eq!(cmd["stderr"], "err-line\n");
    assert_eq!(cmd["output_pending"], 0);

    let shown = w.caisey("alice", &["show", "big", "--json"]).ok();
    if shown.stdout.trim_end() != written.trim_end() {
        let at = shown.stdout.bytes().zip(written.bytes()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "show --json ({} bytes) and the export ({} bytes) differ at {at}: {:?} / {:?}",
            shown.stdout.len(),
            written.len(),
            String::from_utf8_lossy(&shown.stdout.as_bytes()[at.saturating_sub(80)..(at + 80).min(shown.stdout.len())]),
            String::from_utf8_lossy(&written.as_bytes()[at.saturating_sub(80)..(at + 80).min(written.len())])
        );
    }

    let csv = w.caisey("alice", &["export", "big", "--format", "csv"]).ok();
    let row = csv.stdout.split_once("\r\n").map(|(_, r)| r).unwrap_or_default();
    assert!(row.contains(&format!("\"{}\",\"err-line\n\"\r\n", expected)), "the CSV row lacks the output");
}

/// A weekly check's runs over time, two of them compared, and a machine's card, from the CLI.
#[test]
fn history_diff_and_a_machine_card_from_the_command_line() {
    let org = Org::new(&[("ws-50", "lab")]);
    let w = &org.world;
    let _agent = w.start_agent("ws-50");
    let script = "printf 'same\\nvaries %s\\n' $$";
    for _ in 0..2 {
        w.run_approved("alice", "ws-50", &["--machine", "ws-50", "--session", "weekly", "--", script]).ok();
    }
    let listed = w.caisey("alice", &["history", "weekly"]).ok();
    assert_eq!(
        listed.stdout.lines().filter(|l| l.contains("ws-50") && l.contains("exited")).count(),
        2,
        "{}",
        listed.stdout
    );
    let runs: serde_json::Value = serde_json::from_str(
        &w.caisey("alice", &["history", "--command", script, "--machine", "ws-50", "--json"]).ok().stdout,
    )
    .expect("json");
    let codes: Vec<String> =
        runs.as_array().expect("runs").iter().map(|r| r["code"].as_str().expect("code")[..8].to_string()).collect();
    assert_eq!(codes.len(), 2, "{runs}");
    assert!(listed.stdout.contains(&codes[0]) && listed.stdout.contains(&codes[1]), "{}", listed.stdout);

    let diff = w.caisey("alice", &["diff", &codes[0], &codes[1]]).ok();
    let lines: Vec<&str> = diff.stdout.lines().collect();
    assert!(lines.contains(&" same"), "{}", diff.stdout);
    assert_eq!(lines.iter().filter(|l| l.starts_with("-varies ")).count(), 1, "{}", diff.stdout);
    assert_eq!(lines.iter().filter(|l| l.starts_with("+varies ")).count(), 1, "{}", diff.stdout);
    let unknown = w.caisey("alice", &["diff", "ffffffff", &codes[1]]);
    assert_eq!(unknown.code(), 2);
    assert!(unknown.stderr.contains("no run with code"), "{}", unknown.stderr);
    let none = w.caisey("alice", &["history"]);
    assert_eq!(none.code(), 2);

    let card = w.caisey("alice", &["machine", "ws-50"]).ok();
    for part in [
        "ws-50  (online",
        "groups     lab",
        "live, as of",
        "uptime",
        "disk",
        "users",
        "card taken",
        "hostname",
        "packages",
    ] {
        assert!(card.stdout.contains(part), "{part}: {}", card.stdout);
    }
    let json: serde_json::Value =
        serde_json::from_str(&w.caisey("alice", &["machine", "WS-50", "--json"]).ok().stdout).expect("json");
    assert_eq!(json["name"], "ws-50");
    // The live part rides on the heartbeat: memory and the system disk as of the last one.
    assert!(json["vitals"]["memory_total"].as_u64().is_some_and(|m| m > 0), "{json}");
    assert!(json["vitals"]["disk_total"].as_u64().is_some_and(|d| d > 0), "{json}");
    let missing = w.caisey("alice", &["machine", "nope"]);
    assert_eq!(missing.code(), 2);
    assert!(missing.stderr.contains("no machine named \"nope\""), "{}", missing.stderr);
}

/// Hand-off with words: labels added to a session that goes on, a note, an assignee; the
/// colleague sees them in show, show --json, the CSV export and the search.
#[test]
fn labels_notes_and_an_assignee_hand_a_session_off() {
    let org = Org::new(&[("ws-60", "lab")]);
    org.join_technician("bob");
    let w = &org.world;
    let _agent = w.start_agent("ws-60");
    w.run_approved("alice", "ws-60", &["--machine", "ws-60", "--session", "slow pc", "--label", "first", "--", "true"])
        .ok();
    w.run_approved(
        "alice",
        "ws-60",
        &["--machine", "ws-60", "--session", "slow pc", "--label", "second", "--", "true"],
    )
    .ok();
    let labels = w.caisey("alice", &["label", "slow pc", "--add", "urgent", "--remove", "FIRST"]).ok();
    assert_eq!(labels.stdout.trim(), "labels: second, urgent");
    assert_eq!(w.caisey("alice", &["assign", "slow pc", "bob"]).ok().stdout.trim(), "assigned to bob");
    w.caisey("alice", &["note", "slow pc", "disk cleanup did not fix it;", "chkdsk pending \u{1b}[2J"]).ok();
    let wrong = w.caisey("alice", &["assign", "slow pc", "mallory"]);
    assert_eq!(wrong.code(), 2);
    assert!(wrong.stderr.contains("no technician named \"mallory\""), "{}", wrong.stderr);

    // Bob, on his own node, once it has caught up.
    let shown = wait_for(Duration::from_secs(30), || {
        let out = w.caisey("bob", &["show", "slow pc"]);
        (out.code() == 0 && out.stdout.contains("chkdsk")).then_some(out)
    })
    .expect("bob sees the note");
    assert!(shown.stdout.contains("labels: second, urgent"), "{}", shown.stdout);
    assert!(shown.stdout.contains("assigned to bob"), "{}", shown.stdout);
    assert!(shown.stdout.contains("note by alice:"), "{}", shown.stdout);
    assert!(shown.stdout.contains("disk cleanup did not fix it; chkdsk pending \\u{1b}[2J"), "{}", shown.stdout);
    assert!(!shown.stdout.contains('\u{1b}'), "a raw escape reached the terminal");
    let json: serde_json::Value =
        serde_json::from_str(&w.caisey("bob", &["show", "slow pc", "--json"]).ok().stdout).expect("json");
    assert_eq!(json["assignee"], "bob");
    assert_eq!(json["notes"][0]["author"], "alice");
    let csv = w.caisey("bob", &["export", "slow pc", "--format", "csv"]).ok().stdout;
    assert!(csv.lines().next().is_some_and(|h| h.contains(",assignee,notes,")), "{csv}");
    assert!(csv.contains("\"bob\",\"") && csv.contains("alice: disk cleanup did not fix it"), "{csv}");
    let found = w.caisey("bob", &["sessions", "--search", "chkdsk"]).ok();
    assert!(found.stdout.contains("slow pc") && found.stdout.contains("→ bob"), "{}", found.stdout);

    w.caisey("bob", &["assign", "slow pc", "--nobody"]).ok();
    let json: serde_json::Value =
        serde_json::from_str(&w.caisey("bob", &["show", "slow pc", "--json"]).ok().stdout).expect("json");
    assert!(json["assignee"].is_null(), "{json}");
    assert_eq!(json["labels"], serde_json::json!(["second", "urgent"]), "an assignment kept the labels");
}

/// Output is searchable: `sessions --search` finds a word printed anywhere in a command's
/// output (a long one, cut into many chunks), shows the line, and still does after the node
/// restarts.
#[test]
fn sessions_are_found_by_words_in_their_output_with_the_line_shown() {
    let org = Org::new(&[("ws-70", "lab")]);
    let w = &org.world;
    let _agent = w.start_agent("ws-70");
    let long = "seq 1 40000 | sed 's/^/line /'; echo 'private_mb=1234 on the print spooler'; seq 1 20000";
    w.run_approved("alice", "ws-70", &["--machine", "ws-70", "--session", "memory", "--", long]).ok();
    w.run_approved(
        "alice",
        "ws-70",
        &["--machine", "ws-70", "--session", "backups", "--", "echo 'Backup Engine stopped'"],
    )
    .ok();

    let search = |q: &str| {
        wait_for(Duration::from_secs(20), || {
            let out = w.caisey("alice", &["sessions", "--search", q]);
            out.stdout.contains("found in output").then_some(out.stdout)
        })
        .unwrap_or_else(|| panic!("nothing found for {q:?}"))
    };
    let found = search("private_mb");
    assert!(
        found.contains("memory") && found.contains("found in output: private_mb=1234 on the print spooler"),
        "{found}"
    );
    assert!(!found.contains("backups"), "{found}");
    let found = search("Backup Engine");
    assert!(found.contains("backups") && found.contains("found in output: Backup Engine stopped"), "{found}");
    let none = w.caisey("alice", &["sessions", "--search", "nowhere_to_be_found"]).ok();
    assert_eq!(none.stdout.trim(), "no sessions match");

    w.down("alice");
    let again = search("private_mb");
    assert!(again.contains("memory"), "{again}");
    let json: serde_json::Value =
        serde_json::from_str(&w.caisey("alice", &["sessions", "--search", "spooler", "--json"]).ok().stdout)
            .expect("json");
    assert_eq!(json[0]["matched"], "private_mb=1234 on the print spooler");
}

/// A group run is one investigation: listed as one after any restart, every machine side by
/// side, machines with identical output gathered, exit codes summed up.
#[test]
fn a_group_run_is_one_investigation_with_identical_outputs_gathered() {
    let org = Org::new(&[("lab-a", "lab"), ("lab-b", "lab"), ("lab-c", "lab")]);
    org.join_technician("bob");
    let w = &org.world;
    // Each agent runs commands in a folder of its own: two see one file, the third another.
    let mut agents = Vec::new();
    for (agent, marker) in [("lab-a", "disk ok"), ("lab-b", "disk ok"), ("lab-c", "disk full")] {
        let dir = w.root.path().join(format!("cwd-{agent}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("state.txt"), format!("{marker}\n")).expect("state");
        let mut cmd = w.command("caisey-agent", agent, &["run"]);
        cmd.current_dir(&dir);
        agents.push(caisey_tests::Running::spawn(cmd));
    }
    for agent in ["lab-a", "lab-b", "lab-c"] {
        wait_for(Duration::from_secs(20), || w.home(agent).join("node.sock").exists().then_some(())).expect("agent up");
    }
    let run = w.spawn(
        "caisey",
        "alice",
        &["run", "--group", "lab", "--session", "disk check", "--", "cat state.txt; grep -q ok state.txt"],
    );
    for a in ["lab-a", "lab-b", "lab-c"] {
        let id = w.wait_pending(a);
        w.agent_cmd(a, &["approve", &id]).ok();
    }
    assert_eq!(run.wait(Duration::from_secs(60)).code(), 1, "one machine failed");

    let listed = w.caisey("alice", &["group-runs"]).ok();
    assert!(listed.stdout.contains("disk check") && listed.stdout.contains("3 machines"), "{}", listed.stdout);
    assert!(listed.stdout.contains("2 exited 0, 1 exited 1"), "{}", listed.stdout);
    // The colleague's node, started afresh, holds it as one too.
    let shown = wait_for(Duration::from_secs(30), || {
        let out = w.caisey("bob", &["group-run", "disk check"]);
        (out.code() == 0 && out.stdout.contains("1 machine: lab-c")).then_some(out.stdout)
    })
    .expect("bob sees the group run");
    assert!(shown.contains("2 exited 0, 1 exited 1"), "{shown}");
    let two = shown.find("── 2 machines: lab-a, lab-b").expect("the identical outputs gathered");
    let one = shown.find("── 1 machine: lab-c").expect("the different one apart");
    assert!(two < one && shown[two..one].contains("disk ok") && shown[one..].contains("disk full"), "{shown}");
    for m in ["lab-a", "lab-b", "lab-c"] {
        assert!(shown.lines().any(|l| l.trim_start().starts_with(m) && l.contains("local user on")), "{m}: {shown}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&w.caisey("bob", &["group-run", "disk check", "--json"]).ok().stdout).expect("json");
    assert_eq!(json["machines"].as_array().map(Vec::len), Some(3));
    assert_eq!(json["outputs"][0]["machines"], serde_json::json!(["lab-a", "lab-b"]));

    // A second command on the machine that failed, with one flag: it stays in the investigation.
    let again =
        w.spawn("caisey", "alice", &["run", "--failed-in", "disk check", "--", "echo cleaned > state.txt; echo ok"]);
    let id = w.wait_pending("lab-c");
    w.agent_cmd("lab-c", &["approve", &id]).ok();
    let again = again.wait(Duration::from_secs(60));
    assert_eq!(again.code(), 0, "{again:?}");
    for a in ["lab-a", "lab-b"] {
        assert_eq!(w.agent_cmd(a, &["pending", "--json"]).ok().stdout.trim(), "[]", "{a} was asked again");
    }
    let runs = w.caisey("alice", &["group-runs"]).ok();
    assert_eq!(runs.stdout.lines().count(), 1, "the follow-up made another group run: {}", runs.stdout);
    assert!(runs.stdout.contains("3 exited 0"), "{}", runs.stdout);
}

/// A small filesystem of its own (tmpfs) at `dir`, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not mount a tmpfs at {} (this test runs as root)", dir.display());
        SmallDisk(dir.to_path_buf())
    }

    /// Fills it to the last byte.
    fn fill(&self) {
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.0.join("filler").display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).expect("filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_agent_whose_disk_fills_mid_command_says_so_keeps_the_output_and_delivers_it_all_when_space_returns() {
    let org = Org::new(&[]);
    let disk = SmallDisk::mount(&org.world.home("ws-01"), "24m");
    org.enroll_agent("ws-01", "lab");
    // Warnings shown: the agent says in its log when it cannot write.
    let mut run = org.world.command("caisey-agent", "ws-01", &["run"]);
    run.env("RUST_LOG", "info,iroh=error,iroh_quinn=error");
    let agent = caisey_tests::Running::spawn(run);
    wait_for(Duration::from_secs(20), || org.world.agent_cmd("ws-01", &["pending"]).status.success().then_some(()))
        .expect("the agent answers");
    let script = "for i in $(seq 1 300); do echo line-$i; sleep 0.02; done";
    let technician =
        org.world.spawn("caisey", "alice", &["run", "--machine", "ws-01", "--session", "full", "--", script]);
    let code = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &code]).ok();
    let lines = |org: &Org| {
        let s = org.show_json("alice", "full")?;
        Some(s["commands"][0]["stdout"].as_str()?.lines().count())
    };
    wait_for(Duration::from_secs(30), || lines(&org).filter(|n| *n >= 20)).expect("output streams");

    disk.fill();
    wait_for(Duration::from_secs(20), || agent.stderr().contains("cannot write the store").then_some(()))
        .unwrap_or_else(|| panic!("the agent never said it cannot write: {}", agent.stderr()));
    assert!(lines(&org).is_some_and(|n| n < 300), "the command finished before the disk filled; nothing was tested");
    // Technicians see it on the machine.
    let said = wait_for(Duration::from_secs(20), || {
        let out = org.world.caisey("alice", &["machines"]).stdout;
        out.contains("WRITES FAILING").then_some(out)
    });
    assert!(said.is_some(), "the machine list does not say the agent cannot write: {}", agent.stderr());
    let card = org.world.caisey("alice", &["machine", "ws-01"]).ok().stdout;
    assert!(card.contains("No space left on device"), "{card}");
    // (That nothing leaves a node before it is written is shown exactly in the simulation: a
    // real filesystem gives some writes room now and then, and those go out.)

    // Room again: everything arrives, in order, and the run ends as it should.
    disk.free();
    let all = wait_for(Duration::from_secs(90), || (lines(&org) == Some(300)).then_some(()));
    assert!(
        all.is_some(),
        "the output did not all arrive once there was room: {:?} lines\nagent: {}\nalice: {}\nalice's node log: {}",
        lines(&org),
        agent.stderr(),
        org.world.caisey("alice", &["status"]).stdout,
        std::fs::read_to_string(org.world.home("alice").join("node.log")).unwrap_or_default()
    );
    let done = technician.wait(Duration::from_secs(60));
    assert_eq!(done.code(), 0, "{}\n{}", done.stdout, done.stderr);
    let expected: Vec<String> = (1..=300).map(|i| format!("line-{i}")).collect();
    let got: Vec<&str> = done.stdout.lines().filter(|l| l.starts_with("line-")).collect();
    assert_eq!(got, expected, "output lost or out of order");
    // And it was all written on the agent: killed and started again, it loads and knows the
    // command ended (nothing is marked interrupted).
    agent.kill9();
    let _agent = org.world.start_agent("ws-01");
    let s = org.show_json("alice", "full").expect("show");
    assert_eq!(s["commands"][0]["status"], "exited", "{s}");
    assert_eq!(s["commands"][0]["stdout"].as_str().map(|o| o.lines().count()), Some(300));
}

#[test]
fn a_stored_session_that_no_longer_loads_is_fetched_again_from_the_relay() {
    use caisey_peer::store::{Store, Write};
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    org.world.run_approved("alice", "ws-01", &["--machine", "ws-01", "--session", "kept", "--", "echo kept-safe"]).ok();
    // Alice's copy of the session is damaged while her node is down (a torn write, a bad disk).
    org.world.down("alice");
    {
        let mut store = Store::open(&org.world.home("alice").join("store.redb")).expect("store");
        let docs = store.load_docs().expect("docs");
        let (id, kind, _) = docs.iter().find(|(_, k, _)| *k == caisey_peer::wire::DocKind::Session).expect("a session");
        let garbage =
            Write::Doc { doc: *id, kind: *kind, bytes: b"\x85\x6f\x4a\x83 not automerge".to_vec(), compact: true };
        store.apply(&[garbage]).expect("damage");
    }
    let shown = wait_for(Duration::from_secs(30), || {
        let s = org.show_json("alice", "kept")?;
        (s["commands"][0]["stdout"] == "kept-safe\n").then_some(())
    });
    assert!(shown.is_some(), "the damaged session never came back: {:?}", org.show_json("alice", "kept"));
    // What is stored now loads: the good copy replaced the damaged one whole.
    org.world.down("alice");
    let store = Store::open(&org.world.home("alice").join("store.redb")).expect("store");
    for (id, kind, bytes) in store.load_docs().expect("docs") {
        assert!(caisey_doc::automerge::Automerge::load(&bytes).is_ok(), "{kind:?} {} still does not load", id.short());
    }
}
