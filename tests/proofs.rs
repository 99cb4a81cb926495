//! What must be true, end to end: approvals bound to the command, forgeries and replays refused, and
//! public transcripts (one session's or a group run's) served inert, redacted and verifiable.

use std::process::Command;
use std::time::Duration;

use caisey_tests::{Org, forge, http_get, wait_for};

fn pending_ids(org: &Org, agent: &str) -> Vec<serde_json::Value> {
    let out = org.world.agent_cmd(agent, &["pending", "--json"]).ok();
    serde_json::from_str::<serde_json::Value>(&out.stdout).expect("json").as_array().cloned().unwrap_or_default()
}

fn quarantine_reasons(org: &Org, session: &str) -> String {
    org.show_json("alice", session).map(|s| s["quarantined"].to_string()).unwrap_or_default()
}

#[test]
fn a_forged_or_self_approval_is_never_executed_and_the_user_can_still_decide() {
    let org = Org::new(&[("ws-01", "accounting")]);
    let _agent = org.world.start_agent("ws-01");
    org.join_technician("bob");
    let marker = org.world.root.path().join("forged-ran");
    let script = format!("touch {}", marker.display());
    org.world.caisey("alice", &["run", "--detach", "--machine", "ws-01", "--session", "forged", "--", &script]).ok();
    org.world.wait_pending("ws-01");

    // A colleague's node approves on the machine's behalf.
    forge::approve_as(&org.world.home("bob"), "forged");
    wait_for(Duration::from_secs(15), || quarantine_reasons(&org, "forged").contains("may not approve").then_some(()))
        .expect("bob's approval is quarantined");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!marker.exists(), "a forged approval ran the command");
    assert_eq!(pending_ids(&org, "ws-01").len(), 1, "the request must still wait for the user");

    // The requester approves its own request.
    forge::approve_as(&org.world.home("alice"), "forged");
    wait_for(Duration::from_secs(15), || quarantine_reasons(&org, "forged").contains("own request").then_some(()))
        .expect("self-approval is quarantined");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!marker.exists(), "a self-approval ran the command");

    // The endpoint user still decides, and only that runs it.
    let code = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &code]).ok();
    wait_for(Duration::from_secs(15), || marker.exists().then_some(())).expect("the user's approval runs it");
}

#[test]
fn remote_approvals_run_once_and_are_refused_when_replayed_or_the_command_was_edited() {
    let org = Org::new(&[("ws-01", "accounting"), ("ws-02", "accounting")]);
    let ws01 = org.world.start_agent("ws-01");
    let _ws02 = org.world.start_agent("ws-02");
    let token = org.world.caisey("alice", &["invite", "approver", "--name", "carol", "--group", "accounting"]).ok();
    org.world.caisey("carol", &["join", token.stdout.trim()]).ok();
    let mark = |n: &str| org.world.root.path().join(n);
    let run = |session: &str, machine: &str, file: &str| {
        let script = format!("echo ran >> {}", mark(file).display());
        org.world.caisey("alice", &["run", "--detach", "--machine", machine, "--session", session, "--", &script]).ok();
    };
    let carol_approves = |session: &str| {
        let code = wait_for(Duration::from_secs(20), || {
            let out = org.world.command("caisey", "carol", &["pending", "--json"]).output().ok()?;
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let mine = list.as_array()?.iter().find(|p| p["session_name"] == session)?;
            mine.get("id")?.as_str().map(str::to_string)
        })
        .expect("carol sees the request");
        org.world.caisey("carol", &["approve", &code]).ok();
    };

    // A designated approver's approval runs the command, once.
    run("s1", "ws-01", "m1");
    carol_approves("s1");
    wait_for(Duration::from_secs(20), || mark("m1").exists().then_some(())).expect("carol's approval ran it");
    let s1 = wait_for(Duration::from_secs(20), || {
        let s = org.show_json("alice", "s1")?;
        (s["commands"][0]["status"] == "exited").then_some(s)
    })
    .expect("finished");
    assert_eq!(s1["commands"][0]["decided_by"], "approver carol");

    // Her approval copied onto another machine's request, and into another session on the same machine.
    run("s2", "ws-02", "m2");
    run("s3", "ws-01", "m3");
    org.world.wait_pending("ws-02");
    forge::replay_decision(&org.world.home("alice"), "s1", "s2");
    forge::replay_decision(&org.world.home("alice"), "s1", "s3");
    for s in ["s2", "s3"] {
        wait_for(Duration::from_secs(15), || quarantine_reasons(&org, s).contains("replayed").then_some(()))
            .unwrap_or_else(|| panic!("replay into {s} not flagged"));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(!mark("m2").exists() && !mark("m3").exists(), "a replayed approval ran a command");
    assert_eq!(std::fs::read_to_string(mark("m1")).expect("m1").lines().count(), 1, "the approval was used twice");

    // Approved while the machine is off, then edited by the requester before it runs.
    ws01.stop();
    run("s4", "ws-01", "m4");
    carol_approves("s4");
    forge::edit_script(&org.world.home("alice"), "s4", &format!("echo edited >> {}", mark("m4").display()));
    let _ws01 = org.world.start_agent("ws-01");
    wait_for(Duration::from_secs(15), || {
        quarantine_reasons(&org, "s4").contains("edited after approval").then_some(())
    })
    .expect("the edit is flagged");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!mark("m4").exists(), "a command edited after approval ran");
    let pending = pending_ids(&org, "ws-01");
    assert!(
        pending.iter().any(|p| p["script"].as_str().is_some_and(|s| s.contains("edited"))),
        "the edited command must be asked again: {pending:?}"
    );
}

#[test]
fn a_shared_transcript_is_inert_redacted_served_and_verifiable_until_a_byte_flips() {
    let org = Org::with_http(&[("ws-01", "accounting")]);
    let _agent = org.world.start_agent("ws-01");
    let script = r#"echo password=hunter2; printf '<script>alert(1)</script><b>bold</b>\033[31mred\033[0m\n'; exit 4"#;
    let run = org.world.spawn("caisey", "alice", &["run", "--machine", "ws-01", "--session", "evil", "--", script]);
    let code = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["approve", &code]).ok();
    assert_eq!(run.wait(Duration::from_secs(30)).code(), 4);

    let shared = org.world.caisey("alice", &["share", "evil"]).ok();
    let link = shared.stdout.trim().to_string();
    assert!(link.starts_with("http://127.0.0.1:") && link.contains("/t/"), "{shared:?}");
    let id = link.rsplit('/').next().unwrap_or_default();
    assert!(id.len() >= 26, "link id too short to be unguessable: {id}");

    let (status, headers, page) = http_get(&link);
    assert_eq!(status, 200);
    assert!(headers.contains("content-security-policy: default-src 'none'"), "{headers}");
    assert!(headers.contains("script-src 'none'"), "{headers}");
    assert!(headers.contains("x-content-type-options: nosniff"), "{headers}");
    let html = String::from_utf8(page.clone()).expect("utf-8");
    assert!(!html.to_lowercase().contains("<script"), "a script element survived");
    assert!(!html.contains("<b>"), "markup from the endpoint survived");
    assert!(!html.contains('\u{1b}'), "an ANSI escape survived");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let (_, _, json) = http_get(&format!("{link}.json"));
    for artifact in [&page, &json] {
        assert!(!String::from_utf8_lossy(artifact).contains("hunter2"), "the password leaked");
    }
    assert!(html.contains("password=[REDACTED:password]"));

    let verified = org.world.caisey("alice", &["verify", &link]).ok();
    assert!(verified.stdout.contains("exit code 4"), "{verified:?}");
    let file = org.world.root.path().join("downloaded.html");
    std::fs::write(&file, &page).expect("save");
    org.world.caisey("alice", &["verify", file.to_str().expect("path")]).ok();
    let mut flipped = page.clone();
    let at = flipped.len() / 3;
    flipped[at] ^= 0x20;
    std::fs::write(&file, &flipped).expect("save");
    let bad = org.world.caisey("alice", &["verify", file.to_str().expect("path")]);
    assert_eq!(bad.code(), 1, "{bad:?}");
    assert!(bad.stderr.contains("NOT GENUINE"), "{bad:?}");

    org.world.caisey("alice", &["unshare", &link]).ok();
    assert_eq!(http_get(&link).0, 404);
}

#[test]
fn a_denied_request_never_runs_even_when_an_approval_is_merged_in_afterwards() {
    let org = Org::new(&[("ws-01", "accounting")]);
    let _agent = org.world.start_agent("ws-01");
    let token = org.world.caisey("alice", &["invite", "approver", "--name", "carol", "--machine", "ws-01"]).ok();
    org.world.caisey("carol", &["join", token.stdout.trim()]).ok();
    let marker = org.world.root.path().join("ran-after-denial");
    let script = format!("touch {}", marker.display());
    org.world.caisey("alice", &["run", "--detach", "--machine", "ws-01", "--session", "denied", "--", &script]).ok();
    let code = org.world.wait_pending("ws-01");
    org.world.agent_cmd("ws-01", &["deny", &code]).ok();
    // A genuine approval by the designated approver, written over the denial (as a merge of a
    // concurrent decision could leave it).
    forge::approve_as(&org.world.home("carol"), "denied");
    wait_for(Duration::from_secs(15), || {
        let s = org.show_json("alice", "denied")?;
        s["commands"][0]["decided_by"].as_str()?.contains("forged").then_some(())
    })
    .expect("the approval reached the session");
    // Every technician sees that it will not run, and why — not "running" for good.
    let s = wait_for(Duration::from_secs(15), || {
        let s = org.show_json("alice", "denied")?;
        (s["commands"][0]["status"] == "not run").then_some(s)
    })
    .unwrap_or_else(|| panic!("the session does not say it will not run: {:?}", org.show_json("alice", "denied")));
    let shown = org.world.caisey("alice", &["show", "denied"]).ok().stdout;
    assert!(shown.contains("not run") && shown.contains("denied on this machine"), "{shown}\n{s}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!marker.exists(), "a request the machine's user denied ran");
}

#[test]
fn an_approval_must_name_the_whole_code_the_user_was_shown() {
    let org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    org.world.caisey("alice", &["run", "--detach", "--machine", "ws-01", "--", "echo approved-by-code"]).ok();
    let code = org.world.wait_pending("ws-01");
    // One character could match a request sent after the listing: refused, nothing approved.
    let short = org.world.agent_cmd("ws-01", &["approve", &code[..1]]);
    assert_eq!(short.code(), 2, "{short:?}");
    assert!(short.stderr.contains("8-character code"), "{}", short.stderr);
    assert_eq!(pending_ids(&org, "ws-01").len(), 1, "still pending");
    // The code as `pending` shows it is enough.
    let listed = org.world.agent_cmd("ws-01", &["pending"]).ok().stdout;
    let shown = listed.split_whitespace().next().expect("a code").to_string();
    assert_eq!(shown.len(), 8, "{listed}");
    org.world.agent_cmd("ws-01", &["approve", &shown]).ok();
    assert!(pending_ids(&org, "ws-01").is_empty());
}

/// The page a stakeholder opens, read in a real browser (headless Chromium): the publisher's
/// summary first, each step in plain words, the secret hidden and said so, the technicians'
/// notes, and how to check it at the end. `CAISEY_SCREENSHOT=FILE` also saves what it shows.
#[test]
fn a_transcript_reads_in_plain_words_in_a_real_browser() {
    let org = Org::with_http(&[("ws-01", "accounting")]);
    let _agent = org.world.start_agent("ws-01");
    let script = "echo 'backup agent: token=s3cr3t-v4lu3'; df -h / | tail -1";
    org.world
        .run_approved(
            "alice",
            "ws-01",
            &[
                "--machine",
                "ws-01",
                "--session",
                "backups failing",
                "--description",
                "why the nightly backup fails",
                "--",
                script,
            ],
        )
        .ok();
    org.world.caisey("alice", &["note", "backups failing", "the disk was full; cleared old snapshots"]).ok();
    let summary = "The backup disk was full. We removed old snapshots; tonight's backup should run.";
    let link =
        org.world.caisey("alice", &["share", "backups failing", "--summary", summary]).ok().stdout.trim().to_string();

    let profile = tempfile::tempdir().expect("profile");
    let shot = std::env::var_os("CAISEY_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| profile.path().join("transcript.png"));
    let chromium = |extra: &[&str]| {
        Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
            .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&link)
            .output()
            .expect("chromium (apt-get install chromium; .ci/run does)")
    };
    let dom = String::from_utf8_lossy(&chromium(&["--dump-dom"]).stdout).into_owned();
    let text_at = |needle: &str| dom.find(needle).unwrap_or_else(|| panic!("the page lacks {needle:?}: {dom}"));
    let order = [
        text_at("backups failing"),
        text_at(summary),
        text_at("Every step below was signed by whoever took it"),
        text_at("alice asked ws-01 to run a command"),
        text_at("why the nightly backup fails"),
        text_at("by local user on ws-01"),
        text_at("Hidden by the publisher, each shown as [REDACTED]"),
        text_at("the disk was full; cleared old snapshots"),
        text_at("How to check this page"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "the page is out of order: {order:?}");
    assert!(!dom.contains("s3cr3t-v4lu3"), "the secret reached the page");
    assert!(!dom.contains("signature withheld"), "jargon instead of plain words");

    let out = chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1000,1500"]);
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "the screenshot is empty");
}

/// A group run is shared as one transcript: one link, every machine on one page with identical
/// outputs gathered, each machine's session checkable as signed, the whole signed once more.
#[test]
fn a_group_run_is_shared_as_one_transcript_with_one_link() {
    let org = Org::with_http(&[("lab-a", "lab"), ("lab-b", "lab")]);
    let _agents = [org.world.start_agent("lab-a"), org.world.start_agent("lab-b")];
    let run = org.world.spawn(
        "caisey",
        "alice",
        &["run", "--group", "lab", "--session", "printer check", "--", "echo spooler ok"],
    );
    for a in ["lab-a", "lab-b"] {
        let id = org.world.wait_pending(a);
        org.world.agent_cmd(a, &["approve", &id]).ok();
    }
    assert_eq!(run.wait(Duration::from_secs(60)).code(), 0);
    let summary = "Both printers' spoolers are running again.";
    let shared = org.world.caisey("alice", &["share", "printer check", "--group-run", "--summary", summary]).ok();
    let link = shared.stdout.trim().to_string();
    assert!(link.contains("/t/") && link.lines().count() == 1, "one link: {shared:?}");

    let (status, _, page) = http_get(&link);
    assert_eq!(status, 200);
    let html = String::from_utf8(page).expect("utf-8");
    for part in [
        summary,
        "ran on 2 machines at once",
        "2 machines: lab-a, lab-b",
        "On lab-a",
        "On lab-b",
        "How to check this page",
    ] {
        assert!(html.contains(part), "the page lacks {part:?}");
    }
    let verified = org.world.caisey("alice", &["verify", &link]).ok();
    assert!(verified.stdout.contains("genuine group run: \"printer check\", 2 machines"), "{}", verified.stdout);
    assert_eq!(verified.stdout.matches("genuine: \"printer check (lab-").count(), 2, "{}", verified.stdout);

    // One byte changed in the JSON: not genuine.
    let (_, _, json) = http_get(&format!("{link}.json"));
    let mut flipped = json.clone();
    let at = String::from_utf8_lossy(&json).find("spooler ok").map(|i| i + 2).unwrap_or(json.len() / 2);
    flipped[at] ^= 0x01;
    let file = org.world.root.path().join("group.json");
    std::fs::write(&file, &flipped).expect("save");
    let bad = org.world.caisey("alice", &["verify", file.to_str().expect("utf-8")]);
    assert_eq!(bad.code(), 1, "{bad:?}");
    assert!(bad.stderr.contains("NOT GENUINE"), "{}", bad.stderr);
}
