//! The kill -9 campaign: a relay, a technician's node and two agents, with commands asked all
//! the while, and one of those processes killed at a random moment and started again, many
//! times. Then, at another technician, every command must have reached one final state, no
//! command may have started twice (a marker file on the endpoint counts starts), no command
//! shown as interrupted may have finished, and none asked may be missing.
//!
//! The suite runs a short one (4 kills). The long one: `CAISEY_CAMPAIGN_KILLS=100 cargo test -p
//! caisey-tests --test campaign -- --nocapture` (`CAISEY_CAMPAIGN_SEED` repeats a run);
//! `docs/reliability.md` has its last result.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use caisey_tests::{Org, Running, wait_for};

/// xorshift64*: enough randomness to choose victims and moments, repeatable from its seed.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const AGENTS: [&str; 2] = ["camp-a", "camp-b"];

#[test]
fn kill_9_anywhere_loses_nothing_and_starts_nothing_twice() {
    let kills: u64 = std::env::var("CAISEY_CAMPAIGN_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let seed: u64 = std::env::var("CAISEY_CAMPAIGN_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1
    });
    println!("campaign: {kills} kills, seed {seed}");
    let started = Instant::now();
    let mut dice = Dice(seed);
    let mut org = Org::new(&[(AGENTS[0], "camp"), (AGENTS[1], "camp")]);
    org.join_technician("bob");
    let markers = org.world.root.path().join("markers");
    std::fs::create_dir_all(&markers).expect("markers");
    let mut agents: BTreeMap<&str, Running> = AGENTS.iter().map(|a| (*a, org.world.start_agent(a))).collect();

    // Every endpoint user approves whatever waits, all the time (a helper thread per agent).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let approvers: Vec<_> = AGENTS
        .iter()
        .map(|a| {
            let (stop, home) = (stop.clone(), org.world.home(a));
            let agent = caisey_tests::bin("caisey-agent");
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let pending = std::process::Command::new(&agent)
                        .arg("--home")
                        .arg(&home)
                        .args(["pending", "--json"])
                        .output();
                    let ids: Vec<String> = pending
                        .ok()
                        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                        .and_then(|v| v.as_array().cloned())
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|p| p["id"].as_str().map(str::to_string))
                        .collect();
                    for id in ids {
                        let _ =
                            std::process::Command::new(&agent).arg("--home").arg(&home).args(["approve", &id]).output();
                    }
                    std::thread::sleep(Duration::from_millis(150));
                }
            })
        })
        .collect();

    let mut asked: Vec<(String, &str)> = Vec::new();
    let mut killed: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..kills {
        // A few commands, each leaving a start and an end mark on its endpoint.
        for _ in 0..2 {
            let machine = AGENTS[dice.below(2) as usize];
            let id = format!("c{round}-{}", dice.below(1_000_000));
            let mark = markers.join(machine);
            let script = format!(
                "echo start-{id} >> {m}; sleep 0.{d}; echo out-{id}; echo end-{id} >> {m}",
                m = mark.display(),
                d = 2 + dice.below(7)
            );
            let out =
                org.world.caisey("alice", &["run", "--detach", "--machine", machine, "--session", &id, "--", &script]);
            if out.code() == 0 {
                asked.push((id, machine));
            }
        }
        std::thread::sleep(Duration::from_millis(dice.below(1500)));
        let victim = ["relay", "alice", AGENTS[0], AGENTS[1]][dice.below(4) as usize];
        *killed.entry(victim).or_default() += 1;
        match victim {
            "relay" => {
                if let Some(r) = org.relay.take() {
                    r.kill9();
                }
                org.relay = Some(org.world.start_relay("relay").0);
            }
            "alice" => {
                if let Some(pid) = org.world.node_pid("alice") {
                    let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
            agent => {
                if let Some(a) = agents.remove(agent) {
                    a.kill9();
                }
                agents.insert(agent, org.world.start_agent(agent));
            }
        }
    }

    // Everything asked reaches a final state at bob, who was never killed.
    let mut states: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let settled = wait_for(Duration::from_secs(180), || {
        for (id, _) in &asked {
            if states.get(id).is_some_and(final_state) {
                continue;
            }
            if let Some(c) = org.show_json("bob", id).and_then(|s| s["commands"].get(0).cloned()) {
                states.insert(id.clone(), c);
            }
        }
        asked.iter().all(|(id, _)| states.get(id).is_some_and(final_state)).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for a in approvers {
        let _ = a.join();
    }

    let marks: String = AGENTS.iter().map(|a| std::fs::read_to_string(markers.join(a)).unwrap_or_default()).collect();
    let count = |what: &str| marks.lines().filter(|l| *l == what).count();
    let (mut double, mut false_interrupted, mut lost, mut missing_output) = (vec![], vec![], vec![], vec![]);
    for (id, _) in &asked {
        if count(&format!("start-{id}")) > 1 {
            double.push(id.clone());
        }
        match states.get(id) {
            None => lost.push(id.clone()),
            Some(c) => {
                let status = c["status"].as_str().unwrap_or_default();
                if status == "interrupted" && count(&format!("end-{id}")) > 0 {
                    false_interrupted.push(id.clone());
                }
                if status == "exited" && !c["stdout"].as_str().unwrap_or_default().contains(&format!("out-{id}")) {
                    missing_output.push(id.clone());
                }
            }
        }
    }
    let by_status = states.values().fold(BTreeMap::<String, usize>::new(), |mut m, c| {
        *m.entry(c["status"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        m
    });
    println!(
        "campaign result: {kills} kills {killed:?}, {} commands {by_status:?}, {} not final, {} lost, {} started twice, \
         {} falsely interrupted, {} missing output, {:.0} s",
        asked.len(),
        asked.len() - states.values().filter(|c| final_state(c)).count(),
        lost.len(),
        double.len(),
        false_interrupted.len(),
        missing_output.len(),
        started.elapsed().as_secs_f64()
    );
    // A campaign in which nothing could be asked proves nothing.
    assert!(asked.len() as u64 >= kills, "only {} commands were asked in {kills} rounds (seed {seed})", asked.len());
    assert!(settled.is_some(), "not every command reached a final state (seed {seed})");
    assert!(double.is_empty(), "started twice: {double:?} (seed {seed})");
    assert!(lost.is_empty(), "lost: {lost:?} (seed {seed})");
    assert!(false_interrupted.is_empty(), "shown interrupted but finished: {false_interrupted:?} (seed {seed})");
    assert!(missing_output.is_empty(), "exited without all its output: {missing_output:?} (seed {seed})");
}

/// Whether a command's state can no longer change.
fn final_state(c: &serde_json::Value) -> bool {
    matches!(
        c["status"].as_str(),
        Some("exited" | "interrupted" | "timed out" | "failed to start" | "not run" | "denied" | "expired")
    ) && c["output_pending"].as_u64() == Some(0)
}
