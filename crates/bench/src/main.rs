//! `caisey-bench`: prints the benchmark table (see the library). Also runs as a lone agent or
//! relay daemon (`--agent-daemon HOME`, `--relay-daemon HOME`) when a row measures one process.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    caisey_peer::cli::init_tracing_with("warn");
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match args.first().map(String::as_str) {
            Some("--agent-daemon") => {
                let home = args.get(1).ok_or_else(|| anyhow::anyhow!("--agent-daemon HOME"))?;
                caisey_agent::daemon::run(caisey_bench::org::options(home.as_ref())?, Default::default(), async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
                Ok(true)
            }
            Some("--relay-daemon") => {
                let home = args.get(1).ok_or_else(|| anyhow::anyhow!("--relay-daemon HOME"))?;
                let opts = caisey_bench::org::options(home.as_ref())?;
                caisey_relay::run(opts, None, |t| println!("{t}"), async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
                Ok(true)
            }
            Some("--quick") | None => {
                let quick = !args.is_empty();
                let sizes = if quick { caisey_bench::Sizes::quick() } else { caisey_bench::Sizes::full() };
                eprintln!("running {} benchmarks…", if quick { "quick" } else { "full" });
                let started = std::time::Instant::now();
                let rows = caisey_bench::run(&sizes).await;
                println!("{}", caisey_bench::table(&rows));
                // A partial run (CAISEY_BENCH_ONLY) must not replace the full report.
                if !quick && std::env::var(caisey_bench::ONLY_ENV).is_err() {
                    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/benchmarks.md");
                    let previous = std::fs::read_to_string(&path).unwrap_or_default();
                    std::fs::write(&path, caisey_bench::report_markdown(&rows, started.elapsed(), &previous))?;
                    eprintln!("wrote {}", path.display());
                }
                // The quick run is a test: every row must at least complete.
                Ok(!rows.iter().any(|r| r.result.starts_with("failed")))
            }
            Some(other) => anyhow::bail!("unknown argument {other:?}; use --quick or nothing"),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
