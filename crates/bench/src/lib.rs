//! # caisey-bench: what a technician waits for, measured
//!
//! Every row runs real parts: iroh endpoints on 127.0.0.1, redb files in temporary homes, the
//! agent daemon (approvals through its local socket, commands through the real runner) and the
//! sync code, in one process ([`org`]), or as separate processes where memory and CPU of one node
//! are the point. `cargo run --release -p caisey-bench` runs the full sizes and writes
//! `docs/benchmarks.md`; `-- --quick` runs tiny sizes in seconds (part of the test command, so the
//! benchmark keeps working).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod org;
pub mod rows;

use std::time::Duration;

/// Sizes for one run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub stream_bytes: usize,
    pub latency_lines: usize,
    pub groups: Vec<usize>,
    pub offline_commands: usize,
    pub big_commands: usize,
    pub big_each: usize,
    pub idle: Duration,
    pub relay_agents: usize,
    pub viewer_bytes: usize,
    /// Requests timed per client kind in the local API row.
    pub local_rounds: usize,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            stream_bytes: 64 << 20,
            latency_lines: 200,
            groups: vec![10, 100, 1000],
            offline_commands: 10_000,
            big_commands: 1000,
            big_each: 100 << 10,
            idle: Duration::from_secs(60),
            relay_agents: 1000,
            viewer_bytes: 10 << 20,
            local_rounds: 200,
        }
    }

    pub fn quick() -> Self {
        Self {
            stream_bytes: 1 << 20,
            latency_lines: 20,
            groups: vec![3],
            offline_commands: 50,
            big_commands: 20,
            big_each: 10 << 10,
            idle: Duration::from_secs(2),
            relay_agents: 5,
            viewer_bytes: 256 << 10,
            local_rounds: 10,
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub measure: String,
    pub result: String,
    pub target: String,
    /// `Some(true)` met, `Some(false)` missed, `None` report only.
    pub met: Option<bool>,
}

fn row(measure: impl Into<String>, result: impl Into<String>, target: &str, met: Option<bool>) -> Row {
    Row { measure: measure.into(), result: result.into(), target: target.into(), met }
}

fn failed(measure: &str, target: &str, e: anyhow::Error) -> Row {
    row(measure, format!("failed: {e:#}"), target, Some(false))
}

/// The environment variable naming the rows to run (comma-separated: stream, artifact, latency, group,
/// offline, open, viewer, local, agent, relay); all when unset. For profiling one row.
pub const ONLY_ENV: &str = "CAISEY_BENCH_ONLY";

fn wanted(row: &str) -> bool {
    std::env::var(ONLY_ENV).map(|v| v.split(',').any(|r| r.trim() == row)).unwrap_or(true)
}

/// Runs every row, printing each as it completes.
pub async fn run(sizes: &Sizes) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |r: Row| {
        eprintln!("  {} → {}", r.measure, r.result);
        rows.push(r);
    };
    let mib = sizes.stream_bytes as f64 / (1 << 20) as f64;
    if wanted("stream") {
        match rows::streaming(sizes.stream_bytes).await {
            Ok(s) => {
                let (ratio, relay_ratio) = (s.direct / s.raw, s.through_relay / s.raw);
                let throughputs = [
                    (format!("output streamed agent → doc → technician, direct ({mib:.0} MiB)"), s.direct),
                    ("the same, through the relay (agent → relay → technician)".into(), s.through_relay),
                    ("same bytes over a raw iroh stream (one hop, from memory)".into(), s.raw),
                    ("same bytes written to this disk, fdatasync per MiB (one writer)".into(), s.durable_disk),
                ];
                for (measure, mib_per_s) in throughputs {
                    push(row(measure, format!("{mib_per_s:.1} MiB/s"), "", None));
                }
                push(row("ratio caisey direct / raw", format!("{ratio:.2}"), "≥ 0.5", Some(ratio >= 0.5)));
                push(row("ratio through the relay / raw", format!("{relay_ratio:.2}"), "", None));
                let per_byte = |b: u64| b as f64 / sizes.stream_bytes as f64;
                let (a, r) = (per_byte(s.agent_disk), per_byte(s.relay_disk));
                push(row("bytes on disk per output byte: agent store", format!("{a:.2}"), "≤ 1.2", Some(a <= 1.2)));
                push(row("bytes on disk per output byte: relay store", format!("{r:.2}"), "≤ 1.2", Some(r <= 1.2)));
            }
            Err(e) => push(failed("output streaming and disk use", "ratio ≥ 0.5, ≤ 1.2", e)),
        }
    }
    if wanted("artifact") {
        match rows::artifact_transfer(sizes.stream_bytes).await {
            Ok(a) => {
                push(row(
                    format!("file brought back (--collect), direct ({mib:.0} MiB)"),
                    format!("{:.1} MiB/s", a.direct),
                    "",
                    None,
                ));
                push(row("the same, through the relay", format!("{:.1} MiB/s", a.through_relay), "", None));
                push(row("same bytes over a raw iroh stream, same run", format!("{:.1} MiB/s", a.raw), "", None));
                let ratio = a.direct / a.raw;
                push(row("ratio file brought back direct / raw", format!("{ratio:.2}"), "", None));
            }
            Err(e) => push(failed("file brought back", "", e)),
        }
    }
    if wanted("latency") {
        match rows::line_latency(sizes.latency_lines).await {
            Ok(l) => {
                let (p50, p99) = (rows::percentile(&l, 0.5), rows::percentile(&l, 0.99));
                push(row(
                    format!(
                        "one output line written → in technician's doc through the relay, p50 / p99 ({} lines)",
                        l.len()
                    ),
                    format!("{p50:.1} ms / {p99:.1} ms"),
                    "≤ 30 ms / ≤ 150 ms",
                    Some(p50 <= 30.0 && p99 <= 150.0),
                ));
            }
            Err(e) => push(failed("line latency", "≤ 30 ms / ≤ 150 ms", e)),
        }
    }
    for &n in sizes.groups.iter().filter(|_| wanted("group")) {
        let target = if n >= 1000 { "≤ 3 s" } else { "" };
        match rows::group_run(n).await {
            Ok(g) => push(row(
                format!("group run on {n} agents until every exit code is back (relay CPU meanwhile)"),
                format!("{:.2} s ({:.2} s)", g.seconds, g.relay_cpu),
                target,
                (n >= 1000).then_some(g.seconds <= 3.0),
            )),
            Err(e) => push(failed(&format!("group run on {n} agents"), target, e)),
        }
    }
    if wanted("offline") {
        match rows::offline_catch_up(sizes.offline_commands).await {
            Ok(s) => push(row(
                format!("technician offline while {} commands ran: reconnect until synced", sizes.offline_commands),
                format!("{s:.2} s"),
                "≤ 2 s",
                Some(s <= 2.0),
            )),
            Err(e) => push(failed("offline catch-up", "≤ 2 s", e)),
        }
    }
    let big_mib = (sizes.big_commands * sizes.big_each) as f64 / (1 << 20) as f64;
    if wanted("open") {
        match rows::open_big_session(sizes.big_commands, sizes.big_each).await {
            Ok((load, list)) => push(row(
                format!(
                    "open a session of {} commands / {big_mib:.0} MiB output: node start+load, then list",
                    sizes.big_commands
                ),
                format!("{load:.0} ms + {list:.0} ms"),
                "≤ 200 ms",
                Some(load + list <= 200.0),
            )),
            Err(e) => push(failed("open a big session", "≤ 200 ms", e)),
        }
    }
    if wanted("viewer") {
        let mb = sizes.viewer_bytes as f64 / (1 << 20) as f64;
        match rows::viewer_frames(sizes.viewer_bytes).await {
            Ok((frames, p50, max, step_max)) => push(row(
                format!(
                    "viewer following {mb:.1} MiB of output ({frames} frames): frame p50 / max (whole harness step max)"
                ),
                format!("{p50:.1} ms / {max:.1} ms ({step_max:.1} ms)"),
                "no frame over 50 ms",
                Some(max <= 50.0 && step_max <= 50.0),
            )),
            Err(e) => push(failed("viewer frame times", "no frame over 50 ms", e)),
        }
    }
    if wanted("local") {
        match rows::local_api(20, sizes.local_rounds).await {
            Ok(l) => {
                let ms =
                    |v: Option<f64>| v.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "(no caisey binary)".into());
                push(row(
                    "one request to the home's node (sessions, 20 sessions): in this process / over its socket",
                    format!("{:.0} µs / {:.0} µs", l.in_process_us, l.socket_us),
                    "",
                    None,
                ));
                push(row("`caisey status` with the node running (whole process)", ms(l.status_ms), "", None));
                push(row(
                    "`caisey sessions` (whole process): node running / started by the command",
                    format!("{} / {}", ms(l.sessions_warm_ms), ms(l.sessions_cold_ms)),
                    "",
                    None,
                ));
            }
            Err(e) => push(failed("local API", "", e)),
        }
    }
    let secs = sizes.idle.as_secs();
    if wanted("agent") {
        match rows::agent_idle(sizes.idle).await {
            Ok((rss, cpu)) => push(row(
                format!("agent idle {secs} s (own process): RSS, CPU time"),
                format!("{rss:.1} MiB, {cpu:.2} s"),
                "≤ 25 MiB, ≈ 0",
                Some(rss <= 25.0 && cpu <= 0.05 * secs as f64),
            )),
            Err(e) => push(failed("agent idle", "≤ 25 MiB, ≈ 0", e)),
        }
    }
    if wanted("relay") {
        match rows::relay_idle(sizes.relay_agents, sizes.idle).await {
            Ok((rss, cpu)) => push(row(
                format!("relay (own process) with {} connected idle agents, {secs} s: RSS, CPU", sizes.relay_agents),
                format!("{rss:.1} MiB, {cpu:.2} s"),
                "report; ≤ 200 MiB",
                Some(rss <= 200.0),
            )),
            Err(e) => push(failed("relay with idle agents", "≤ 200 MiB", e)),
        }
    }
    rows
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| measure | result | target | |\n|---|---|---|---|\n");
    for r in rows {
        let mark = match r.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "",
        };
        out.push_str(&format!("| {} | {} | {} | {mark} |\n", r.measure, r.result, r.target));
    }
    out
}

/// What the numbers were taken on.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0 / 1024.0
            })
        })
        .unwrap_or(0.0);
    format!("{cpu}, {cores} cores, {mem:.0} GiB RAM, {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

/// The report written to docs/benchmarks.md: the machine, how to reproduce, the table, and
/// then every `## ` section of the `previous` report (the written analysis of the numbers), so
/// a new run replaces the numbers without losing what was learned from the old ones.
pub fn report_markdown(rows: &[Row], took: Duration, previous: &str) -> String {
    let analysis = previous.find("\n## ").map(|at| &previous[at..]).unwrap_or("\n");
    format!(
        "# Benchmarks\n\nMachine: {} (a shared VM: numbers vary ±20 % between runs, and rows run late in a full run are slower than alone). Run took {:.0} s.\n\nReproduce: `cargo run --release -p caisey-bench` (writes this file); `cargo run -p caisey-bench -- --quick` for tiny sizes (part of the test command); `{ONLY_ENV}=stream,artifact,latency,group,offline,open,viewer,agent,relay` runs some rows without rewriting this file.\n\nEvery row runs real iroh endpoints on 127.0.0.1, real redb files, the real agent daemon and runner, and the real sync code; see `crates/bench/src/rows.rs` for how each is taken.\n\n{}{analysis}",
        machine(),
        took.as_secs_f64(),
        table(rows)
    )
}
