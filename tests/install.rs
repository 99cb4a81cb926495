//! Installing like a real tool: the agent, the relay and the technician's node as services
//! (into a temporary root, checked by `systemd-analyze verify`), the consent group, settings
//! from a config file under the environment and flags, completions and man pages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use caisey_tests::{Org, World, bin, wait_for};

/// Every file and link under `dir` with its content (links: their target), but the backups
/// shadow-utils keeps of the user database (`/etc/group-`).
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(dir).expect("under dir").to_path_buf();
            let meta = path.symlink_metadata().expect("metadata");
            if meta.is_symlink() {
                out.insert(rel, format!("-> {}", std::fs::read_link(&path).expect("link").display()));
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                todo.push(path);
            } else if !rel.to_string_lossy().ends_with('-') {
                out.insert(rel, std::fs::read_to_string(&path).unwrap_or_else(|_| "binary".into()));
            }
        }
    }
    out
}

/// A root with a minimal user database: root and a desktop user, alice.
fn fake_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let etc = root.path().join("etc");
    std::fs::create_dir_all(&etc).expect("etc");
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
        .expect("passwd");
    std::fs::write(etc.join("group"), "root:x:0:\nalice:x:1000:\n").expect("group");
    std::fs::write(etc.join("shadow"), "").expect("shadow");
    std::fs::write(etc.join("gshadow"), "").expect("gshadow");
    root
}

/// A copy of `file` another user can run (the checkout may sit where only root can enter).
fn shared_copy(dir: &Path, file: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let copy = dir.join(file.file_name().expect("a file"));
    std::fs::copy(file, &copy).expect("copy");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

/// `systemd-analyze verify` on unit files: exits 0 with nothing said.
fn verify_units(units: &[PathBuf], user: bool) {
    let runtime = tempfile::tempdir().expect("runtime dir");
    let mut cmd = Command::new("systemd-analyze");
    if user {
        cmd.arg("--user").env("XDG_RUNTIME_DIR", runtime.path());
    }
    let out = cmd.arg("verify").args(units).output().expect("systemd-analyze (install systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {units:?}: {said}");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn agent_installs_into_a_root_runs_as_its_unit_says_and_uninstalls_without_a_trace() {
    let org = Org::new(&[]);
    let w = &org.world;
    let token = org.invite_agent("ws-07", "accounting", "1h");
    let root = fake_root();
    let before = tree(root.path());
    let r = root.path().to_str().expect("utf-8 path");

    let out = w.agent_cmd("ws-07", &["install", &token, "--root", r, "--user", "alice"]).ok();
    assert!(out.stdout.contains("enrolled as \"ws-07\" in org \"Acme\""), "{}", out.stdout);
    let agent_bin = bin("caisey-agent");

    let unit = root.path().join("etc/systemd/system/caisey-agent.service");
    let text = read(&unit);
    assert!(text.contains(&format!("ExecStart={} run\n", agent_bin.display())), "{text}");
    assert!(text.contains("Environment=\"CAISEY_CONFIG=/etc/caisey/agent.toml\"\n"), "{text}");
    assert!(text.contains("KillMode=control-group\n") && text.contains("WantedBy=multi-user.target\n"), "{text}");
    let wants = root.path().join("etc/systemd/system/multi-user.target.wants/caisey-agent.service");
    assert_eq!(std::fs::read_link(&wants).expect("enabled"), Path::new("/etc/systemd/system/caisey-agent.service"));
    verify_units(&[unit], false);

    let autostart = read(&root.path().join("etc/xdg/autostart/caisey-agent-prompt.desktop"));
    assert!(
        autostart.contains(&format!("Exec={} --config /etc/caisey/agent.toml prompt\n", agent_bin.display())),
        "{autostart}"
    );
    let group = read(&root.path().join("etc/group"));
    assert!(group.lines().any(|l| l.starts_with("caisey-consent:") && l.ends_with(":alice")), "{group}");

    // The settings file is what every command on the machine reads.
    let config = root.path().join("etc/caisey/agent.toml");
    let shown = w.agent_cmd("ws-07", &["--config", config.to_str().expect("utf-8"), "config", "show", "--json"]).ok();
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout).expect("config json");
    let setting = |key: &str| shown.as_array().and_then(|a| a.iter().find(|s| s["key"] == key)).cloned();
    let consent = setting("run.consent_group").expect("consent group setting");
    assert_eq!(consent["value"], "caisey-consent");
    assert!(consent["source"].as_str().is_some_and(|s| s.ends_with("agent.toml line 8")), "{consent}");

    // The store is root's alone, though the home will be shared with the consent group.
    let home = root.path().join("var/lib/caisey-agent");
    for file in ["store.redb", "store.chunks", "node.key"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&home.join(file).metadata().expect("store").permissions());
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    // The daemon as the unit starts it, on the installed home (the flag wins over the file's
    // home, the environment over its group, which this machine does not have): it answers.
    let mut daemon = Command::new(&agent_bin)
        .args(["--config", config.to_str().expect("utf-8"), "--home", home.to_str().expect("utf-8")])
        .args(["--listen", "127.0.0.1:0", "run"])
        .env("CAISEY_CONSENT_GROUP", "root")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let asked = w.spawn("caisey", "alice", &["run", "--machine", "ws-07", "--", "echo installed-ok"]);
    let pending = |args: &[&str]| {
        Command::new(&agent_bin).args(["--home", home.to_str().expect("utf-8")]).args(args).output().expect("agent")
    };
    let id = wait_for(Duration::from_secs(30), || {
        let out = pending(&["pending", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        list.as_array()?.first()?.get("id")?.as_str().map(str::to_string)
    })
    .expect("the request reached the installed agent");
    assert!(pending(&["approve", &id]).status.success());
    let ran = asked.wait(Duration::from_secs(60)).ok();
    assert!(ran.stdout.contains("installed-ok"), "{}", ran.stdout);
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();

    // Again, as an MDM re-runs its script: the enrollment is kept, the token not needed.
    let again = w.agent_cmd("ws-07", &["install", "--root", r]).ok();
    assert!(again.stdout.contains("already enrolled as \"ws-07\" in org \"Acme\"; kept"), "{}", again.stdout);

    let gone = w.agent_cmd("ws-07", &["uninstall", "--root", r, "--delete-store"]).ok();
    assert!(gone.stdout.contains("removed group caisey-consent"), "{}", gone.stdout);
    assert_eq!(tree(root.path()), before, "uninstall left something behind");
}

#[test]
fn install_refuses_clearly() {
    let org = Org::new(&[]);
    let w = &org.world;
    let root = fake_root();
    let r = root.path().to_str().expect("utf-8 path");
    let no_token = w.agent_cmd("ws-08", &["install", "--root", r]);
    assert_eq!(no_token.code(), 2);
    assert!(no_token.stderr.contains("not enrolled yet: give the token"), "{}", no_token.stderr);

    // A used token: the second machine is told, and its root is left with nothing enrolled.
    let token = org.invite_agent("ws-08", "accounting", "1h");
    w.agent_cmd("ws-08", &["install", &token, "--root", r]).ok();
    let other = fake_root();
    let used = w.agent_cmd("ws-09", &["install", &token, "--root", other.path().to_str().expect("utf-8")]);
    assert_eq!(used.code(), 2, "{}", used.stdout);
    assert_eq!(used.stderr.trim().lines().count(), 1, "one line: {}", used.stderr);
    assert!(used.stderr.contains("already used"), "{}", used.stderr);

    let expired = org.invite_agent("ws-10", "accounting", "1ms");
    std::thread::sleep(Duration::from_millis(20));
    let late = w.agent_cmd("ws-10", &["install", &expired, "--root", fake_root().path().to_str().expect("utf-8")]);
    assert_eq!(late.code(), 2);
    assert!(late.stderr.contains("expired"), "{}", late.stderr);
}

#[test]
fn relay_and_technician_units_verify_and_go_away() {
    let w = World::new();
    let root = fake_root();
    let before = tree(root.path());
    let r = root.path().to_str().expect("utf-8 path");
    let out = w.run("caisey-relay", "relay", &["install", "--root", r, "--http", "0.0.0.0:8080"]).ok();
    assert!(out.stdout.contains("UDP port"), "{}", out.stdout);
    let unit = root.path().join("etc/systemd/system/caisey-relay.service");
    let text = read(&unit);
    assert!(text.contains("DynamicUser=yes\n") && text.contains("ProtectHome=yes\n"), "{text}");
    verify_units(&[unit], false);
    let config = read(&root.path().join("etc/caisey/relay.toml"));
    // World::command listens on loopback: the relay's installed address keeps that, port 4433.
    assert!(config.contains("listen = \"127.0.0.1:4433\"") && config.contains("http = \"0.0.0.0:8080\""), "{config}");
    w.run("caisey-relay", "relay", &["uninstall", "--root", r, "--delete-store"]).ok();
    assert_eq!(tree(root.path()), before, "uninstall left something behind");

    // The technician's user unit, in a home directory of its own.
    let user_home = tempfile::tempdir().expect("home");
    let as_user = |args: &[&str]| {
        let mut cmd = w.command("caisey", "alice", args);
        cmd.env("HOME", user_home.path()).env_remove("XDG_CONFIG_HOME");
        let out = cmd.output().expect("caisey");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = as_user(&["service", "install"]);
    let unit = user_home.path().join(".config/systemd/user/caisey.service");
    assert!(said.contains(&format!("wrote {}", unit.display())), "{said}");
    let text = read(&unit);
    assert!(text.contains(&format!("ExecStart={} up\n", bin("caisey").display())), "{text}");
    assert!(text.contains(&format!("Environment=\"CAISEY_HOME={}\"", w.home("alice").display())), "{text}");
    assert!(user_home.path().join(".config/systemd/user/default.target.wants/caisey.service").exists());
    verify_units(std::slice::from_ref(&unit), true);
    as_user(&["service", "uninstall"]);
    assert!(!unit.exists() && !user_home.path().join(".config/systemd").exists());
}

/// A user in the consent group may list and approve on a machine whose agent runs as root; a
/// user who is not gets one line saying so.
#[test]
fn the_consent_group_may_approve_and_nobody_else() {
    let org = Org::new(&[("ws-11", "accounting")]);
    let w = &org.world;
    // The world's homes sit in a private temporary directory: let others reach through it.
    std::fs::set_permissions(w.root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let group = "users";
    let gid = caisey_peer::local::socket::group_id(group).expect("this machine has a `users` group");
    let _agent = {
        let running = w.spawn("caisey-agent", "ws-11", &["run", "--consent-group", group]);
        wait_for(Duration::from_secs(20), || w.home("ws-11").join("node.sock").exists().then_some(()))
            .expect("agent socket");
        running
    };
    let agent = shared_copy(w.root.path(), &bin("caisey-agent"));
    let as_nobody = |groups: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", &format!("--groups={groups}")])
            .arg(&agent)
            .args(["--home", w.home("ws-11").to_str().expect("utf-8"), "pending"])
            .env("HOME", "/nonexistent")
            .output()
            .expect("setpriv")
    };
    let member = as_nobody(&gid.to_string());
    assert!(member.status.success(), "{}", String::from_utf8_lossy(&member.stderr));
    assert!(String::from_utf8_lossy(&member.stdout).contains("nothing is waiting"));
    let stranger = as_nobody("65534");
    let said = String::from_utf8_lossy(&stranger.stderr);
    assert_eq!(stranger.status.code(), Some(2));
    assert!(said.contains("may not use") && said.trim().lines().count() == 1, "{said}");
}

#[test]
fn settings_come_from_the_file_then_the_environment_then_flags() {
    let w = World::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("caisey.toml");
    std::fs::write(&file, "# a technician's settings\nidle_exit = \"1h\"\nlisten = \"127.0.0.1:7000\"\n")
        .expect("write");
    let show = |env: &[(&str, &str)], flags: &[&str]| {
        let mut cmd = Command::new(bin("caisey"));
        cmd.arg("--config").arg(&file).args(flags).args(["config", "show", "--json"]);
        cmd.env_remove("CAISEY_IDLE_EXIT").env_remove("CAISEY_LISTEN").env_remove("CAISEY_HOME");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("caisey");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let pick = |key: &str| {
            let s = all.as_array().and_then(|a| a.iter().find(|s| s["key"] == key)).cloned().expect("setting");
            (s["value"].as_str().unwrap_or_default().to_string(), s["source"].as_str().unwrap_or_default().to_string())
        };
        (pick("idle_exit"), pick("listen"))
    };
    let (idle, listen) = show(&[], &[]);
    assert_eq!(idle.0, "1h");
    assert!(idle.1.ends_with("caisey.toml line 2"), "{}", idle.1);
    assert_eq!(listen, ("127.0.0.1:7000".into(), format!("file {} line 3", file.display())));
    let (idle, listen) = show(&[("CAISEY_IDLE_EXIT", "5m"), ("CAISEY_LISTEN", "127.0.0.1:7001")], &[]);
    assert_eq!((idle.0.as_str(), idle.1.as_str()), ("5m", "env"));
    assert_eq!(listen.1, "env");
    let (_, listen) = show(&[("CAISEY_LISTEN", "127.0.0.1:7001")], &["--listen", "127.0.0.1:7002"]);
    assert_eq!(listen, ("127.0.0.1:7002".into(), "flag".into()));

    // A bad file: one line naming the file, the key and the line; nothing runs.
    for (text, expect) in [
        ("\n\nlisten = \"nowhere\"\n", "line 3: `listen`: invalid value 'nowhere'"),
        ("colour = \"red\"\n", "line 1: unknown setting `colour`"),
        ("listen = [\n", "line 1"),
        ("[up]\nidle_exit = \"1h\"\n", "line 2: unknown setting `up.idle_exit`"),
    ] {
        std::fs::write(&file, text).expect("write");
        let out = w.command("caisey", "alice", &["--config", file.to_str().expect("utf-8"), "status"]).output();
        let out = out.expect("caisey");
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {said}");
        assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
        assert!(said.contains(&file.display().to_string()) && said.contains(expect), "{text}: {said}");
    }
    // A subcommand's settings in its table, one requiring another: both taken from the file.
    let relay = dir.path().join("relay.toml");
    std::fs::write(&relay, "[run]\nhttp = \"127.0.0.1:8080\"\npublic_url = \"https://caisey.example\"\n")
        .expect("write");
    let out =
        Command::new(bin("caisey-relay")).arg("--config").arg(&relay).args(["config", "show"]).output().expect("relay");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("run.public_url") && l.contains("https://caisey.example") && l.contains("line 3")),
        "{shown}"
    );
    let missing = w.command("caisey", "alice", &["--config", "/nonexistent/caisey.toml", "status"]).output();
    assert!(String::from_utf8_lossy(&missing.expect("caisey").stderr).contains("does not exist"));
}

#[test]
fn completions_for_four_shells_and_man_pages() {
    for shell in ["bash", "zsh", "fish", "powershell"] {
        for binary in ["caisey", "caisey-agent", "caisey-relay"] {
            let out = Command::new(bin(binary)).args(["completions", shell]).output().expect("completions");
            let script = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && script.contains(binary), "{binary} {shell}");
            if binary == "caisey" {
                assert!(script.contains("sessions") && script.contains("export"), "{shell}: no subcommands");
            }
        }
    }
    // The bash script is valid bash, and completes subcommands for real.
    let script = Command::new(bin("caisey")).args(["completions", "bash"]).output().expect("bash completions").stdout;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("caisey.bash");
    std::fs::write(&path, script).expect("write");
    let probe = format!(
        "source {}; COMP_WORDS=(caisey sess); COMP_CWORD=1; COMP_LINE='caisey sess'; COMP_POINT=11; _caisey caisey sess caisey; echo \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let out = Command::new("bash").args(["-c", &probe]).output().expect("bash");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sessions", "{}", String::from_utf8_lossy(&out.stderr));

    let pages = tempfile::tempdir().expect("tempdir");
    for binary in ["caisey", "caisey-agent", "caisey-relay"] {
        let out = Command::new(bin(binary)).args(["man", "--out"]).arg(pages.path()).output().expect("man");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let page = read(&pages.path().join(format!("{binary}.1")));
        assert!(page.contains(&format!(".TH {binary} 1")), "{page}");
    }
    assert!(read(&pages.path().join("caisey-run.1")).contains("approval"));
    assert!(read(&pages.path().join("caisey-agent-install.1")).contains("consent window"));
}

/// The one-line installer an MDM runs: checksum-verified binary in place, then `install`.
#[test]
fn the_install_script_checks_the_binary_is_idempotent_and_says_what_failed() {
    let mut org = Org::new(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-agent.sh");
    let agent = bin("caisey-agent");
    let sha = {
        let out = Command::new("sha256sum").arg(&agent).output().expect("sha256sum");
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("hash").to_string()
    };
    let root = fake_root();
    // What every system has, where the script puts the binary and its man pages.
    for dir in ["usr/local/bin", "usr/local/share/man/man1"] {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    let before = tree(root.path());
    let r = root.path().to_str().expect("utf-8").to_string();
    let run = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(&script)
            .args(args)
            .env("CAISEY_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "error")
            .output()
            .expect("sh");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let from = agent.to_str().expect("utf-8");
    let placed = root.path().join("usr/local/bin/caisey-agent");

    let (code, _, err) = run(&["--from", from, "--sha256", &"0".repeat(64), "--root", &r, "tok"]);
    assert_eq!(code, Some(2));
    assert!(err.starts_with("install-agent: checksum mismatch") && err.lines().count() == 1, "{err}");
    assert!(!placed.exists(), "a binary that failed its check was put in place");

    let token = org.invite_agent("ws-20", "accounting", "1h");
    let (code, out, err) = run(&["--from", from, "--sha256", &sha, "--root", &r, "--user", "alice", &token]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("placed caisey-agent") && out.contains("enrolled as \"ws-20\""), "{out}");
    let unit = read(&root.path().join("etc/systemd/system/caisey-agent.service"));
    assert!(unit.contains("ExecStart=/usr/local/bin/caisey-agent run\n"), "{unit}");
    assert!(root.path().join("usr/local/share/man/man1/caisey-agent-install.1").exists());

    let (code, out, _) = run(&["--from", from, "--sha256", &sha, "--root", &r, &token]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already in place") && out.contains("already enrolled as \"ws-20\""), "{out}");

    // The same token on another machine: used.
    let other = fake_root();
    let o = other.path().to_str().expect("utf-8");
    let (code, _, err) = run(&["--from", from, "--sha256", &sha, "--root", o, &token]);
    assert_eq!(code, Some(3));
    assert!(err.contains("already used") && err.trim().lines().count() == 1, "{err}");

    // Nobody to enroll with: the relay is gone and the technician's node is down.
    let fresh = org.invite_agent("ws-21", "accounting", "1h");
    org.world.down("alice");
    if let Some(relay) = org.relay.take() {
        relay.stop();
    }
    let third = fake_root();
    let t = third.path().to_str().expect("utf-8");
    let (code, _, err) = run(&["--from", from, "--sha256", &sha, "--root", t, &fresh]);
    assert_eq!(code, Some(3));
    assert!(err.contains("could not reach the org to enroll") && err.trim().lines().count() == 1, "{err}");

    // Off again: nothing left but what was there.
    let (code, out, err) = run(&["--uninstall", "--delete-store", "--root", &r]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(tree(root.path()), before, "the script's uninstall left something behind");

    // Not root.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh"])
        .arg(shared_copy(elsewhere.path(), &script))
        .args(["--from", from, "--sha256", &sha, &fresh])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("needs root") && err.trim().lines().count() == 1, "{err}");
}

/// A group run's account ("1/3 answered …, 1 waiting for approval, 1 offline") is a live line on
/// a terminal and plain lines in a pipe; `--json` output is left alone.
#[test]
fn a_group_run_shows_its_progress_live_on_a_terminal_and_as_plain_lines_in_a_pipe() {
    let org = Org::new(&[("ws-31", "lab"), ("ws-32", "lab"), ("ws-33", "lab")]);
    let w = &org.world;
    let _agents = [w.start_agent("ws-31"), w.start_agent("ws-32")]; // ws-33 stays offline
    let run_args = ["run", "--group", "lab", "--expires", "8s", "--", "echo progress-ok"];

    // In a pipe: plain lines on stderr.
    let piped = w.spawn("caisey", "alice", &run_args);
    let id = w.wait_pending("ws-31");
    w.agent_cmd("ws-31", &["approve", &id]).ok();
    let id = w.wait_pending("ws-32");
    w.agent_cmd("ws-32", &["approve", &id]).ok();
    let out = piped.wait(Duration::from_secs(60));
    assert!(out.stderr.contains("0/3 answered (0 finished), 2 waiting for approval, 1 offline"), "{}", out.stderr);
    assert!(out.stderr.contains("2/3 answered (2 finished), 1 offline"), "{}", out.stderr);
    assert!(!out.stderr.contains('\u{1b}'), "escape sequences in a pipe: {:?}", out.stderr);
    assert!(out.stdout.contains("[ws-31 out] progress-ok"), "{}", out.stdout);

    // On a pseudo-terminal: the same account, drawn live (a bar, the line rewritten in place).
    let tty = {
        let mut running = on_a_terminal(w.command("caisey", "alice", &run_args)).spawn().expect("script");
        let mut approved = 0;
        for machine in ["ws-31", "ws-32"] {
            // Requests from the piped run were answered; wait for the new one.
            let id = wait_for(Duration::from_secs(30), || {
                let out = w.command("caisey-agent", machine, &["pending", "--json"]).output().ok()?;
                let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                list.as_array()?.first()?.get("id")?.as_str().map(str::to_string)
            })
            .expect("pending");
            w.agent_cmd(machine, &["approve", &id]).ok();
            approved += 1;
        }
        assert_eq!(approved, 2);
        let _ = running.wait();
        let mut text = String::new();
        std::io::Read::read_to_string(running.stdout.as_mut().expect("stdout"), &mut text).expect("read");
        text
    };
    assert!(tty.contains("waiting for approval") && tty.contains("1 offline"), "{tty:?}");
    assert!(tty.contains("\r") && tty.contains("\u{1b}["), "not drawn live: {tty:?}");
    assert!(tty.contains("[ws-32 out] progress-ok"), "{tty:?}");

    // --json: stdout is the JSON array alone, stderr has no account.
    let piped = w.spawn("caisey", "alice", &["run", "--group", "lab", "--expires", "3s", "--json", "--", "true"]);
    for machine in ["ws-31", "ws-32"] {
        let id = w.wait_pending(machine);
        w.agent_cmd(machine, &["approve", &id]).ok();
    }
    let out = piped.wait(Duration::from_secs(60));
    assert!(serde_json::from_str::<serde_json::Value>(&out.stdout).is_ok(), "{}", out.stdout);
    assert!(!out.stderr.contains("answered"), "{}", out.stderr);
}

/// One token for a group of laptops, as an MDM pushes one script to all of them.
#[test]
fn a_token_for_several_machines_enrolls_that_many_and_no_more() {
    let org = Org::new(&[]);
    let w = &org.world;
    let token = w.caisey("alice", &["invite", "agent", "--group", "lab", "--uses", "2"]).ok().stdout.trim().to_string();
    let roots: Vec<_> = (0..3).map(|_| fake_root()).collect();
    let install = |i: usize| {
        let r = roots[i].path().to_str().expect("utf-8");
        w.agent_cmd(&format!("lab-{i}"), &["install", &token, "--root", r, "--name", &format!("lab-{i}")])
    };
    for i in 0..2 {
        let out = install(i).ok();
        assert!(out.stdout.contains(&format!("enrolled as \"lab-{i}\"")), "{}", out.stdout);
    }
    let third = install(2);
    assert_eq!(third.code(), 2);
    assert!(third.stderr.contains("already used by all the 2 machines it was for"), "{}", third.stderr);
    let machines = w.caisey("alice", &["machines", "--group", "lab", "--json"]).ok();
    let list: serde_json::Value = serde_json::from_str(&machines.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    let named = w.caisey("alice", &["invite", "agent", "--name", "x", "--uses", "3"]);
    assert_eq!(named.code(), 2);
    assert!(named.stderr.contains("cannot be used with"), "{}", named.stderr);
}

/// `cmd` run on a pseudo-terminal (`script`), everything it shows on the terminal on stdout.
fn on_a_terminal(cmd: Command) -> Command {
    let line: Vec<String> = std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| format!("'{}'", a.to_string_lossy())))
        .collect();
    let mut script = Command::new("script");
    script.args(["-qfec", &line.join(" "), "/dev/null"]);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    script.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    script
}

/// A node that comes up with nobody to catch up with says so while it tries: a spinner on a
/// terminal, one plain line in a pipe.
#[test]
fn catching_up_with_the_org_is_shown_while_it_lasts() {
    let mut org = Org::new(&[]);
    let w = &org.world;
    w.down("alice");
    if let Some(relay) = org.relay.take() {
        relay.stop();
    }
    let piped = w.caisey("alice", &["sessions"]);
    assert!(piped.stderr.lines().any(|l| l == "catching up with the org"), "{}", piped.stderr);
    w.down("alice");
    let out = on_a_terminal(w.command("caisey", "alice", &["sessions"])).output().expect("script");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.contains("catching up with the org (") && tty.contains('\r'), "{tty:?}");
}
