//! Files brought back, end to end: the real binaries, a relay, technicians and an agent on
//! loopback. A 200 MiB file survives kill -9 of the technician's node and of the relay while it
//! travels, arrives whole and hash-checked; a copy damaged at the relay is refused there and
//! fetched again from the agent; a symlink out of the approved path is refused.

use std::process::Command;
use std::time::Duration;

use caisey_tests::{Org, wait_for};

fn sha256sum(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// What `technician` has of the session's files (`caisey artifact list --json`).
fn listed(org: &Org, technician: &str) -> Vec<serde_json::Value> {
    let out = org.world.caisey(technician, &["artifact", "list", "dumps", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn named<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|a| a["name"] == name)
}

#[test]
fn a_200_mib_file_comes_back_whole_through_crashes_and_damage_and_a_symlink_out_is_refused() {
    let mut org = Org::new(&[("ws-01", "lab")]);
    let _agent = org.world.start_agent("ws-01");
    let dumps = org.world.home("ws-01").join("dumps");
    std::fs::create_dir_all(&dumps).expect("dumps");
    let big = dumps.join("app.dmp");
    let escape = dumps.join("escape");
    let script = format!(
        "dd if=/dev/urandom of={} bs=1M count=200 status=none && ln -sf /etc/passwd {}",
        big.display(),
        escape.display()
    );
    let (big_s, escape_s) = (big.display().to_string(), escape.display().to_string());
    org.world
        .caisey(
            "alice",
            &[
                "run",
                "--detach",
                "--machine",
                "ws-01",
                "--session",
                "dumps",
                "--collect",
                &big_s,
                "--collect",
                &escape_s,
                "--collect-limit",
                "300MiB",
                "--timeout",
                "120s",
                "--",
                &script,
            ],
        )
        .ok();
    // The endpoint user sees what will come back, and the limit, before approving.
    let code = org.world.wait_pending("ws-01");
    let pending = org.world.agent_cmd("ws-01", &["pending"]).ok().stdout;
    assert!(pending.contains("BRINGS BACK") && pending.contains(&big_s) && pending.contains("300.0 MiB"), "{pending}");
    org.world.agent_cmd("ws-01", &["approve", &code]).ok();

    // Mid-transfer, the technician's node and the relay die.
    let size = 200 * 1024 * 1024u64;
    let caught = wait_for(Duration::from_secs(120), || {
        let here = named(&listed(&org, "alice"), "app.dmp")?["here"].as_u64()?;
        (here > 0).then_some(here)
    })
    .expect("the file started to arrive");
    assert!(caught < size, "the whole file arrived before the crash could be staged ({caught} bytes)");
    if let Some(pid) = org.world.node_pid("alice") {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    }
    org.relay.take().expect("relay").kill9();
    let (relay, _) = org.world.start_relay("relay");
    org.relay = Some(relay);

    // It goes on where it stopped, and is saved whole, checked against the signed hash.
    let saved = org.world.home("alice").join("app.dmp");
    let got = org
        .world
        .run("caisey", "alice", &["artifact", "get", "dumps", "app.dmp", "--out", saved.to_str().expect("path")])
        .ok();
    assert!(got.stdout.contains("saved app.dmp (209715200 bytes"), "{got:?}");
    let sum = sha256sum(&big);
    assert_eq!(sha256sum(&saved), sum);
    assert!(got.stdout.contains(&sum), "{got:?}");

    // The symlink out of the approved path: refused, with why, and no bytes.
    let list = listed(&org, "alice");
    let refused = named(&list, "escape").expect("the symlink is listed");
    assert!(refused["refused"].as_str().is_some_and(|w| w.contains("symlink")), "{refused}");
    let none = org.world.caisey("alice", &["artifact", "get", "dumps", "escape", "--out", "/tmp/x"]);
    assert!(!none.status.success() && none.stderr.contains("not brought back"), "{none:?}");
    let shown = org.world.caisey("alice", &["show", "dumps"]).ok().stdout;
    assert!(
        shown.contains("brought back app.dmp: 209715200 bytes") && shown.contains("NOT brought back escape"),
        "{shown}"
    );

    // A byte of the relay's copy flipped on its disk: the relay refuses its own copy and fetches
    // it again; the only good copies left are on the agent (alice's node is down). A colleague
    // joining afterwards gets it whole.
    let token = org.world.caisey("alice", &["invite", "technician", "--name", "carol"]).ok().stdout.trim().to_string();
    org.world.down("alice");
    wait_for(Duration::from_secs(60), || {
        let log = std::fs::read(org.world.home("relay").join("store.chunks")).ok()?;
        (log.len() as u64 >= size).then_some(())
    })
    .expect("the relay holds the file");
    org.relay.take().expect("relay").kill9();
    let data = std::fs::read(&big).expect("the file");
    let probe = &data[150 * 1024 * 1024 + 12_345..][..64];
    let log_path = org.world.home("relay").join("store.chunks");
    let mut log = std::fs::read(&log_path).expect("relay log");
    let at = log.windows(64).position(|w| w == probe).expect("the relay's copy is in its log");
    log[at] ^= 0x01;
    std::fs::write(&log_path, &log).expect("damage");
    drop(log);
    let (relay, _) = org.world.start_relay("relay");
    org.relay = Some(relay);
    org.world.caisey("carol", &["join", &token]).ok();
    let carols = org.world.home("carol").join("app.dmp");
    let got = org
        .world
        .run("caisey", "carol", &["artifact", "get", "dumps", "app.dmp", "--out", carols.to_str().expect("path")])
        .ok();
    assert!(got.stdout.contains("saved"), "{got:?}");
    assert_eq!(sha256sum(&carols), sum);
    // The relay found its copy damaged, and holds a good one again, fetched from the agent.
    let mended = wait_for(Duration::from_secs(30), || {
        let log = std::fs::read(&log_path).ok()?;
        log.windows(64).any(|w| w == probe).then_some(())
    });
    assert!(mended.is_some(), "the relay never fetched a good copy of the damaged piece");
}
