//! `caisey`'s command line: parsing, then one function per subcommand that calls [`crate::tech`]
//! and prints. Exit codes: 0 ok; 1 the remote command failed, was denied or expired (for a
//! group: any machine's); 2 usage or local error.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use caisey_agent::escape::{join, visible, visible_line};
use caisey_doc::fleet::Role;
use caisey_doc::schedule::{Missed, ProbePattern};
use caisey_doc::session::{CommandSpec, EndStatus, Shell};
use caisey_doc::token::{InviteToken, RelayTicket};
use caisey_peer::cli::{EXIT_REMOTE_FAILED, NodeArgs, Tools, parse_duration, run_main};
use caisey_peer::node::{NodeOptions, PeerPath};
use clap::{Parser, Subcommand};

use crate::api::Event;
use crate::background::Starter;
use crate::client::Client;
use crate::progress::{Mode, Progress};
use crate::tech::{InviteSpec, MachinePath, RunRequest, Targets};
use crate::transcript::{ExportFormat, Follower, OutputStyle, time};

/// Caisey: run diagnostics on enrolled machines, with the user's consent, into durable sessions.
#[derive(Debug, Parser)]
#[command(name = "caisey", version)]
pub struct Cli {
    #[command(flatten)]
    pub node: NodeArgs,
    /// A node started on demand by a client (a command, the viewer) stops after this long with
    /// no client. `caisey up` runs one for good.
    #[arg(long, env = crate::background::IDLE_ENV, value_name = "DURATION",
          default_value = crate::background::DEFAULT_IDLE_EXIT, value_parser = parse_duration)]
    pub idle_exit: Duration,
    /// Without a subcommand, the desktop viewer opens.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an org, with this technician as its first member.
    Init {
        #[arg(long)]
        org: String,
        /// Your name as colleagues and endpoint users see it (default: $USER).
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a one-time enrollment token.
    #[command(subcommand)]
    Invite(InviteKind),
    /// Join a colleague's org as a technician, with a token from `caisey invite technician`.
    Join {
        token: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Manage the org's relay.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// List machines with their online state.
    Machines {
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        search: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One machine's card: how it is reached, when it was last seen, its system as of when the
    /// card was taken.
    Machine {
        name: String,
        /// List its installed software too.
        #[arg(long)]
        software: bool,
        #[arg(long)]
        json: bool,
    },
    /// Ask a machine or group to run a command; waits for approval and streams the output.
    Run(RunArgs),
    /// Ask a machine or group to run a check on a schedule, until an end date. Its endpoint
    /// user consents once, for every run (or chooses to be asked at each); the agent then runs
    /// it on its own clock, with nobody online, and the results sync when they can.
    Schedule(ScheduleArgs),
    /// List schedules and where each stands; `cancel ID` stops one, `edit ID` changes one
    /// (the change needs the endpoint user's consent again).
    Schedules {
        #[command(subcommand)]
        action: Option<SchedulesAction>,
        #[arg(long)]
        json: bool,
    },
    /// List sessions.
    Sessions {
        #[arg(long)]
        search: Option<String>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Requests waiting for you, a designated approver.
    Pending {
        #[arg(long)]
        json: bool,
    },
    /// Approve a request as a designated approver (by its code from `caisey pending`).
    Approve { id: String },
    /// Deny a request as a designated approver.
    Deny { id: String },
    /// Show a session's whole transcript (by id, id prefix or name).
    Show {
        session: String,
        /// Keep streaming new events and output.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Publish a redacted, signed, read-only transcript of a session; prints its link.
    Share {
        session: String,
        /// Also hide what matches this regular expression (repeatable). Common secrets are
        /// always hidden: passwords, tokens, keys, bearer headers, private keys.
        #[arg(long = "redact", value_name = "PATTERN")]
        redact: Vec<String>,
        /// Leave this command out entirely (its id or a unique prefix; repeatable).
        #[arg(long = "omit", value_name = "COMMAND")]
        omit: Vec<String>,
        /// Also write the page to FILE (a FILE ending in .json gets the JSON transcript). With
        /// a relay the transcript is published as well; without one, the file is all there is.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// Your words for the reader, at the top of the page: what was found, what was changed.
        #[arg(long, value_name = "TEXT")]
        summary: Option<String>,
        /// Leave the technicians' notes out.
        #[arg(long)]
        no_notes: bool,
        /// SESSION names a group run: share all its machines as one transcript (one link).
        #[arg(long, conflicts_with = "omit")]
        group_run: bool,
    },
    /// Withdraw a published transcript (its link or link id).
    Unshare { link: String },
    /// Check a transcript's signatures and org chain, offline (a file) or from its link.
    /// Exits 1 if it is not genuine.
    Verify { file: String },
    /// A local relay and three agents in temporary homes: runs a first command, then opens the
    /// viewer on them.
    Demo {
        /// Tell the story in the terminal instead of opening the viewer (also what happens
        /// where there is no display).
        #[arg(long)]
        headless: bool,
    },
    /// Run this home's node in the foreground (for a service manager). Every other command is
    /// its client and starts it in the background when it is not running.
    Up {
        /// Stop after this long with no client connected (default: run until stopped).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        idle_exit: Option<Duration>,
    },
    /// Stop this home's node.
    Down,
    /// Run this home's node as your own service, from login (a systemd user unit).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// What this home's node is doing: peers and how they are reached, relays, what waits to sync.
    Status {
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Tools(Tools),
    /// List group runs: one command asked of several machines, held as one investigation.
    GroupRuns {
        #[arg(long)]
        json: bool,
    },
    /// One group run side by side: each machine's status, exit code and who answered, then the
    /// machines whose output is identical gathered together, the largest group first.
    GroupRun {
        /// Its name (as given with --session, or as listed) or id prefix.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a session's labels.
    Label {
        session: String,
        #[arg(long = "add", value_name = "LABEL", required_unless_present = "remove")]
        add: Vec<String>,
        #[arg(long = "remove", value_name = "LABEL")]
        remove: Vec<String>,
    },
    /// Hand a session to a colleague (by name), or with --nobody to nobody.
    Assign {
        session: String,
        #[arg(required_unless_present = "nobody", conflicts_with = "nobody")]
        technician: Option<String>,
        #[arg(long)]
        nobody: bool,
    },
    /// Add a note to a session, signed and timestamped, for whoever picks it up next.
    Note {
        session: String,
        /// The note; its words are joined with spaces.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// The runs of a command over time: a SESSION's commands on its machine, or --command
    /// TEXT (on --machine NAME, or anywhere). Each run's code names it for `caisey diff`.
    History {
        /// Session name, id or unique id prefix.
        #[arg(conflicts_with = "command", required_unless_present = "command")]
        session: Option<String>,
        /// The command, as it was asked (surrounding whitespace aside).
        #[arg(long)]
        command: Option<String>,
        #[arg(long, requires = "command")]
        machine: Option<String>,
        /// The values of this probe across the runs (a group run's session: every machine's).
        #[arg(long, requires = "session", value_name = "NAME")]
        probe: Option<String>,
        #[arg(long)]
        json: bool,
        /// With --probe: the series as CSV.
        #[arg(long, requires = "probe", conflicts_with = "json")]
        csv: bool,
    },
    /// Files the session's runs brought back: `list` them (name, size, SHA-256, machine,
    /// run), or `get` one, checked whole, into a file.
    #[command(subcommand)]
    Artifact(ArtifactCommand),
    /// Compare two runs' output, line by line (each named by its code from `caisey history`).
    Diff { older: String, newer: String },
    /// Write a session to a file as JSON or CSV (one row per command).
    Export {
        /// Session name, id or unique id prefix.
        session: String,
        #[arg(long, value_enum, default_value = "json")]
        format: ExportFormat,
        /// Where to write (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum InviteKind {
    /// A token enrolling a machine (`caisey-agent install TOKEN`, or `enroll TOKEN`).
    Agent {
        #[arg(long, conflicts_with = "uses")]
        name: Option<String>,
        #[arg(long = "group")]
        groups: Vec<String>,
        /// How long the token stays valid.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many machines may enroll with it: one token for a script or an MDM to push to
        /// a whole group of laptops (each enrolls with its hostname).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        uses: u32,
    },
    /// A token for a designated approver, e.g. a client's contact (`caisey join TOKEN`).
    Approver {
        #[arg(long)]
        name: Option<String>,
        /// A machine it may approve for (repeatable).
        #[arg(long = "machine")]
        machines: Vec<String>,
        /// A group it may approve for (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// A token for a colleague (`caisey join TOKEN`).
    Technician {
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Install and start it (a node already running in the background is stopped first).
    Install,
    /// Stop and remove it; the home is kept.
    Uninstall,
}

#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// Make a running relay the org's relay (its ticket is printed by `caisey-relay run`).
    Add { ticket: String },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The machine to run on; repeat it (or give a comma-separated list) for several, run
    /// like a group.
    #[arg(long, value_delimiter = ',', conflicts_with = "group", required_unless_present_any = ["group", "failed_in"])]
    pub machine: Vec<String>,
    /// Run on the machines of this group run whose last command did not exit 0 (continuing
    /// its sessions, unless --session names others).
    #[arg(long, value_name = "GROUP_RUN", conflicts_with_all = ["machine", "group"])]
    pub failed_in: Option<String>,
    /// Run on every machine of this group, in parallel.
    #[arg(long)]
    pub group: Option<String>,
    /// Add to the session of this name (created if new), e.g. to keep a weekly check in one thread.
    #[arg(long)]
    pub session: Option<String>,
    #[arg(long = "label")]
    pub labels: Vec<String>,
    #[command(flatten)]
    pub how: HowArgs,
    /// How long the endpoint user has to approve before the request expires.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub expires: Duration,
    /// After it ends, bring back the file at this absolute path (or the files under this
    /// directory); repeatable. The endpoint user sees the paths and the limit before approving.
    #[arg(long, value_name = "PATH")]
    pub collect: Vec<String>,
    /// The most bytes brought back in all (`200MiB`, `2GiB`).
    #[arg(long, default_value = "1GiB", value_parser = parse_size, value_name = "SIZE")]
    pub collect_limit: u64,
    /// Return once the request is stored (and handed to the relay when reachable).
    #[arg(long)]
    pub detach: bool,
    #[arg(long)]
    pub json: bool,
    /// The command; its words are joined with spaces and given to the shell.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// How a command runs, and why it is asked: the same for a run and a schedule.
#[derive(Debug, clap::Args)]
pub struct HowArgs {
    #[arg(long, default_value = "sh")]
    pub shell: Shell,
    /// Kill the command (each run of it) after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Working directory on the machine.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Why you ask: shown to the endpoint user next to the command.
    #[arg(long, default_value = "")]
    pub description: String,
}

impl HowArgs {
    /// The command to ask for: `words` joined with spaces, run this way.
    fn spec(&self, words: &[String], collect: Option<caisey_doc::artifact::Collect>) -> CommandSpec {
        CommandSpec {
            shell: self.shell,
            script: words.join(" "),
            cwd: self.cwd.clone(),
            env: Default::default(),
            timeout_ms: self.timeout.as_millis() as u64,
            collect,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ScheduleArgs {
    /// The machine to run on (repeatable, or comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "group", required_unless_present = "group")]
    pub machine: Vec<String>,
    /// Every machine of this group, each in its own session.
    #[arg(long)]
    pub group: Option<String>,
    /// When it runs: an interval (`5s`, `1h`, `7days`) or a cron expression on the machine's
    /// clock (`0 9 * * MON`; six fields for seconds).
    #[arg(long, value_name = "SPEC")]
    pub every: String,
    /// No run starts after this: a date (`2027-03-31`), a time (`2027-03-31T18:00:00Z`), or a
    /// duration from now (`4weeks`).
    #[arg(long, value_name = "DATE")]
    pub until: String,
    /// Keep it in the session of this name (created if new).
    #[arg(long)]
    pub session: Option<String>,
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// A value to pick out of each run's output: NAME=PATTERN, the value in the pattern's
    /// first group (repeatable). Scripts may also print `caisey-probe NAME=VALUE [UNIT]`.
    #[arg(long = "probe", value_name = "NAME=PATTERN", value_parser = ProbePattern::parse)]
    pub probes: Vec<ProbePattern>,
    /// A run missed while the machine was off: run it once, late, at the next chance, or skip it.
    #[arg(long, default_value = "run-late", value_name = "run-late|skip")]
    pub missed: Missed,
    #[command(flatten)]
    pub how: HowArgs,
    /// How long the endpoint user has to answer.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub consent_window: Duration,
    #[arg(long)]
    pub json: bool,
    /// The command; its words are joined with spaces and given to the shell.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ArtifactCommand {
    List {
        session: String,
        #[arg(long)]
        json: bool,
    },
    /// Saves the newest run's file called NAME once all of it is here (waiting for it).
    Get {
        session: String,
        name: String,
        /// Where to save it (default: its name, in the current directory).
        #[arg(long, value_name = "PATH")]
        out: Option<std::path::PathBuf>,
        /// How long to wait for the rest of it to arrive.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        wait: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchedulesAction {
    /// Stop a schedule (at least 8 characters of its id): no run starts once its machine hears.
    Cancel { id: String },
    /// Change a schedule: a new schedule replaces it, and runs only once its endpoint user
    /// consents again.
    Edit {
        id: String,
        #[arg(long, value_name = "SPEC")]
        every: Option<String>,
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
        /// A new command (its words joined with spaces).
        #[arg(last = true)]
        command: Vec<String>,
    },
}

/// Reads a size: a number of bytes, or with a unit (`KiB`, `MiB`, `GiB`, or `K`, `M`, `G`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a size (like 200MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}: use KiB, MiB or GiB")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))
}

/// Reads an end date: a date (`2027-03-31`, the end of that day, UTC), an RFC 3339 time, or a
/// duration from `now`.
pub fn parse_until(text: &str, now: u64) -> Result<u64> {
    let text = text.trim();
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(now + d.as_millis() as u64);
    }
    let stamp = if text.len() == 10 { format!("{text}T23:59:59Z") } else { text.to_string() };
    let at = humantime::parse_rfc3339_weak(&stamp)
        .map_err(|e| anyhow::anyhow!("--until {text:?}: not a date, a time or a duration ({e})"))?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    if ms <= now {
        bail!("--until {text:?} is already past");
    }
    Ok(ms)
}

fn print_schedules(list: &[crate::schedules::ScheduleSummary]) {
    println!(
        "{:<8}  {:<16}  {:<22}  {:<20}  {:>4}  {:<20}  command",
        "id", "machine", "state", "until", "runs", "next run"
    );
    for s in list {
        println!(
            "{:<8}  {:<16}  {:<22}  {:<20}  {:>4}  {:<20}  {}",
            s.id.short(),
            s.machine,
            s.state.as_str(),
            time(s.until),
            s.runs,
            s.next_run.map(time).unwrap_or_else(|| "-".into()),
            visible_line(&s.script)
        );
    }
}

pub fn main() -> ExitCode {
    let (cli, layers) = caisey_peer::config::parse_or_exit::<Cli>("caisey", "caisey");
    if let Some(Command::Tools(tools)) = &cli.command {
        return tools.run::<Cli>(&layers);
    }
    // A technician's terminal shows results; only warnings and errors are logged.
    caisey_peer::cli::init_tracing_with("warn");
    caisey_peer::cli::quiet_on_closed_pipe();
    // The window needs the main thread; the node gets a runtime beside it.
    let window = match &cli.command {
        None => Some(cli.node.options("caisey").and_then(|opts| crate::gui::run(opts, cli.idle_exit))),
        Some(Command::Demo { headless: false }) if has_display() => Some(crate::gui::demo()),
        Some(_) => None,
    };
    match window {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(caisey_peer::cli::EXIT_LOCAL_ERROR)
        }
        None => run_main(run(cli)),
    }
}

/// Whether a window can be opened here at all (X11 or Wayland).
fn has_display() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"].iter().any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()))
}

fn default_name() -> String {
    std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "technician".into())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let Some(command) = cli.command else { bail!("the viewer is opened by `main`") };
    if let Command::Demo { headless } = command {
        if !headless {
            eprintln!(
                "(no display here: telling the demo's story in the terminal; the viewer needs a desktop session)"
            );
        }
        crate::demo::headless().await?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Verify { file } = &command {
        return verify(file).await;
    }
    if let Command::Service(ServiceCommand::Uninstall) = command {
        for line in crate::user_service::uninstall()? {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = cli.node.options("caisey")?;
    match command {
        Command::Up { idle_exit } => return up(opts, idle_exit).await,
        Command::Down => return down(&opts).await,
        Command::Service(what) => return service(&opts, &cli.node, what).await,
        Command::Status { json } => return status(&opts, json).await,
        _ => {}
    }
    let client = Client::connect(&opts, Some(Starter::this_binary(cli.idle_exit)?)).await?;
    dispatch(&client, command).await
}

async fn service(opts: &NodeOptions, args: &NodeArgs, what: ServiceCommand) -> Result<ExitCode> {
    let done = match what {
        ServiceCommand::Install => {
            // The unit's node takes over from one started on demand.
            let stopped = stop_node(opts).await?;
            let exe = std::env::current_exe().context("finding this binary")?;
            let home = std::path::absolute(opts.home.dir())?.display().to_string();
            let mut env = vec![(caisey_peer::home::HOME_ENV, home)];
            if let Some(config) = &args.config {
                env.push((caisey_peer::config::CONFIG_ENV, std::path::absolute(config)?.display().to_string()));
            }
            let mut done: Vec<String> =
                stopped.map(|pid| format!("stopped the node started on demand (pid {pid})")).into_iter().collect();
            done.extend(crate::user_service::install(&exe, &env)?);
            done
        }
        ServiceCommand::Uninstall => bail!("handled before the home is opened"),
    };
    for line in done {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What a node that cannot write its store says about it, on one line.
fn unwritable_line(error: &str, since: u64) -> String {
    let since = format!(" since {}", time(since));
    format!(
        "store: CANNOT WRITE{since} ({}): nothing new is saved or sent until there is room; what waits is kept and \
         written then",
        visible_line(error)
    )
}

/// A machine's card, readable: every value from the machine escaped.
fn print_card(m: &crate::tech::Machine, software: bool) {
    use crate::gui::widgets::{ago, bytes};
    let now = caisey_peer::now_ms();
    let path = match m.path {
        MachinePath::Direct => "online, direct",
        MachinePath::Relayed => "online, relayed",
        MachinePath::ThroughRelay => "online, through the relay",
        MachinePath::Offline => "offline",
    };
    println!("{}  ({path})", m.name);
    let groups = if m.groups.is_empty() { "none".to_string() } else { visible_line(&m.groups.join(", ")) };
    println!("  groups     {groups}");
    let seen = m.last_seen.map(|t| format!("{} ({})", ago(t, now), time(t))).unwrap_or_else(|| "never".into());
    println!("  last seen  {seen}");
    if let Some(error) = &m.unwritable {
        println!(
            "  store      WRITES FAILING ({error}): while they do, nothing new from it is saved or sent; what \
             waits is kept and written when there is room"
        );
    }
    if let Some(v) = &m.vitals {
        println!("  live, as of when it was last seen:");
        let up = humantime::format_duration(Duration::from_secs(v.uptime_secs - v.uptime_secs % 60));
        println!("    uptime   {up}");
        println!("    memory   {} used of {}", bytes(v.memory_used), bytes(v.memory_total));
        println!("    disk     {} used of {} (/)", bytes(v.disk_used), bytes(v.disk_total));
        let users = if v.users.is_empty() { "nobody".to_string() } else { visible_line(&v.users.join(", ")) };
        println!("    users    {users}");
        println!("    address  {}", visible_line(&v.ips.join(", ")));
    }
    let Some(c) = &m.card else {
        println!("  no card yet: the agent sends one when it starts");
        return;
    };
    println!("  card taken {} ({}); the values below are as of then", ago(c.at, now), time(c.at));
    println!("  hostname   {}", c.hostname);
    println!("  system     {} {} (kernel {})", c.os_name, c.os_version, c.kernel);
    let up = humantime::format_duration(Duration::from_secs(c.uptime_secs - c.uptime_secs % 60));
    println!("  uptime     {up}");
    println!("  cpu        {} × {}", c.cpu, c.cpu_count);
    println!("  memory     {} used of {}", bytes(c.memory_used), bytes(c.memory_total));
    if software {
        for s in &c.software {
            println!("  software   {} {}", s.name, s.version);
        }
    } else {
        println!("  software   {} packages (--software lists them)", c.software.len());
    }
}

/// "12 exited 0, 2 exited 1, 1 waiting for approval": a group's outcomes, most common first.
fn exit_summary(machines: &[crate::tech::GroupMachine]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in machines {
        let what = match (m.status.as_str(), m.exit_code) {
            ("exited", Some(code)) => format!("exited {code}"),
            (status, _) => status.to_string(),
        };
        *counts.entry(what).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    counts.iter().map(|(what, n)| format!("{n} {what}")).collect::<Vec<_>>().join(", ")
}

/// The id of the machine called `name`.
async fn machine_named(client: &Client, name: &str) -> Result<caisey_doc::id::NodeId> {
    let machines = client.machines(None, None).await?;
    machines
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .map(|m| m.node)
        .ok_or_else(|| anyhow::anyhow!("no machine named {name:?}; see `caisey machines`"))
}

/// An export, with its progress shown when it is big enough to wait for.
async fn export_with_progress(
    client: &Client,
    id: caisey_doc::id::DocId,
    format: ExportFormat,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    /// Smaller exports take a moment: no progress shown.
    const SHOWN_FROM: u64 = 8 * 1024 * 1024;
    let total = crate::transcript::export_size(client, id).await?;
    let mut progress = Progress::bytes(total, Mode::for_stderr(total < SHOWN_FROM));
    let mut report = |done: u64| {
        let tenths = done.saturating_mul(10) / total.max(1);
        progress.update(done, &format!("exporting: {}%", tenths * 10));
    };
    crate::transcript::export_to(client, id, format, out, &mut report).await
}

/// Waits for the node's first catch-up with the org, saying so when it reached nobody. A wait
/// of more than a moment is shown (a node that was offline for long has much to catch up on).
async fn online(client: &Client) -> Result<()> {
    let catching_up = client.online();
    tokio::pin!(catching_up);
    let warning = tokio::select! {
        done = &mut catching_up => done?,
        _ = tokio::time::sleep(Duration::from_millis(700)) => {
            let mut shown = Progress::spinner(Mode::for_stderr(false));
            shown.update(0, "catching up with the org");
            catching_up.await?
        }
    };
    if let Some(warning) = warning {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

async fn dispatch(client: &Client, command: Command) -> Result<ExitCode> {
    match command {
        Command::Init { org, name } => {
            let org = client.init(&org, &name.unwrap_or_else(default_name)).await?;
            println!("created org {:?}; you are its first technician ({})", org.org_name, org.me.short());
            println!("next: `caisey relay add TICKET` for a relay, `caisey invite agent` for machines");
        }
        Command::Invite(kind) => {
            let (token, only_this_node) = match kind {
                InviteKind::Agent { name, groups, ttl, uses } => {
                    client.invite(InviteSpec { groups, uses, ..InviteSpec::new(Role::Agent, name, ttl) }).await?
                }
                InviteKind::Technician { name, ttl } => {
                    client.invite(InviteSpec::new(Role::Technician, name, ttl)).await?
                }
                InviteKind::Approver { name, machines, groups, ttl } => {
                    if machines.is_empty() && groups.is_empty() {
                        bail!("say what the approver may approve: --machine NAME or --group GROUP");
                    }
                    let approves = machines.into_iter().chain(groups).collect();
                    client.invite(InviteSpec { approves, ..InviteSpec::new(Role::Approver, name, ttl) }).await?
                }
            };
            if only_this_node {
                eprintln!(
                    "note: the org has no relay: this technician's node serves the enrollment while it runs \
                     (`caisey up` keeps it running; `caisey relay add` adds an always-on relay)"
                );
            }
            println!("{token}");
        }
        Command::Join { token, name } => {
            let token = InviteToken::decode(&token, caisey_peer::now_ms())?;
            if !matches!(token.cert.role, Role::Technician | Role::Approver) {
                bail!("this token enrolls a {}; use `caisey-agent enroll` on the machine", token.cert.role);
            }
            let org = client.join(&token.encode(), &name.unwrap_or_else(default_name)).await?;
            println!("joined org {:?} as {}", org.org_name, token.cert.role);
        }
        Command::Relay(RelayCommand::Add { ticket }) => {
            let relay = RelayTicket::decode(&ticket)?.node();
            client.add_relay(&ticket).await?;
            println!("relay {} now serves the org; invites made from now on carry its address", relay.short());
        }
        Command::Machines { group, search, json } => {
            online(client).await?;
            let machines = client.machines(group.as_deref(), search.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&machines)?);
            } else if machines.is_empty() && (group.is_some() || search.is_some()) {
                println!("no machines match");
            } else if machines.is_empty() {
                println!("no machines yet; enroll one with `caisey invite agent`");
            } else {
                for m in machines {
                    let state = if m.online { "online " } else { "offline" };
                    let seen =
                        m.last_seen.map(|t| format!("last seen {}", time(t))).unwrap_or_else(|| "never seen".into());
                    let os = m.card.as_ref().map(|c| format!("{} {}", c.os_name, c.os_version)).unwrap_or_default();
                    let path = match m.path {
                        MachinePath::Direct => "direct, ",
                        MachinePath::Relayed => "relayed, ",
                        MachinePath::ThroughRelay => "through the relay, ",
                        MachinePath::Offline => "",
                    };
                    let full = if m.unwritable.is_some() { ", WRITES FAILING on its store" } else { "" };
                    println!("{state}  {:<20} {:<24} {os}  ({path}{seen}{full})", m.name, visible(&m.groups.join(",")),);
                }
            }
        }
        Command::Machine { name, software, json } => {
            online(client).await?;
            let machines = client.machines(None, None).await?;
            let Some(m) = machines.iter().find(|m| m.name.eq_ignore_ascii_case(&name)) else {
                bail!("no machine named {name:?}; see `caisey machines`");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(m)?);
            } else {
                print_card(m, software);
            }
        }
        Command::Run(args) => return run_command(client, args).await,
        Command::Sessions { search, label, json } => {
            online(client).await?;
            let sessions = client.sessions(search.as_deref(), label.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else if sessions.is_empty() {
                println!("no sessions match");
            } else {
                for s in sessions {
                    let assignee = s.assignee.as_ref().map(|a| format!("  → {a}")).unwrap_or_default();
                    println!(
                        "{}  {:<32} {:<22} {} command(s), {}  [{}]{assignee}",
                        s.id.short(),
                        s.name,
                        time(s.last_activity),
                        s.commands,
                        s.status,
                        join(&s.machines, ",")
                    );
                    if let Some(line) = &s.matched {
                        println!("    found in output: {}", visible_line(line));
                    }
                }
            }
        }
        Command::Show { session, follow, json } => {
            online(client).await?;
            let id = client.find_session(&session).await?;
            if json {
                // Streamed a page of output at a time: a session of any size, in flat memory.
                let mut out = std::io::BufWriter::new(caisey_peer::cli::Stdout);
                crate::transcript::export_to(client, id, ExportFormat::Json, &mut out, &mut |_| {}).await?;
                std::io::Write::write_all(&mut out, b"\n")?;
                std::io::Write::flush(&mut out)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut follower = Follower::new(id, None, OutputStyle::Labelled);
            if !follow {
                follower.update(client).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut events = client.watch().await?;
            follower.update(client).await?;
            loop {
                match events.next().await {
                    Some(Event::DocChanged(d)) if d != id => continue,
                    Some(Event::PeerUp(_) | Event::PeerDown(_)) => continue,
                    Some(_) => {}
                    // The node went away: the next one (started on demand) has everything it had.
                    None => events = client.watch().await?,
                }
                follower.update(client).await?;
            }
        }
        Command::Pending { json } => {
            online(client).await?;
            let awaiting = client.awaiting().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&awaiting)?);
            } else if awaiting.is_empty() {
                println!("nothing is waiting for your approval");
            } else {
                for a in awaiting {
                    let who = format!("{} asks {} to run ({})", a.technician, a.machine, a.shell);
                    println!("{}  {who} in session {:?}:", a.id.short(), a.session_name);
                    for line in caisey_agent::escape::visible(&a.script).lines() {
                        println!("      {line}");
                    }
                    if !a.description.trimmed().is_empty() {
                        println!("    why: {}", a.description);
                    }
                }
            }
        }
        Command::Approve { id } => return remote_decision(client, &id, true).await,
        Command::Deny { id } => return remote_decision(client, &id, false).await,
        Command::Share { session, redact, omit, out, summary, no_notes, group_run } => {
            online(client).await?;
            let share = crate::tech::ShareRequest { redact, omit, summary, without_notes: no_notes };
            let transcript = if group_run {
                client.group_transcript(&session, share).await?
            } else {
                let id = client.find_session(&session).await?;
                client.transcript(id, share).await?
            };
            let published = caisey_doc::transcript::group::Published::verify(transcript.as_bytes())?;
            let parts: Vec<&caisey_doc::transcript::Checked> = match &published {
                caisey_doc::transcript::group::Published::One(p) => vec![&p.1],
                caisey_doc::transcript::group::Published::Group(p) => p.1.parts.iter().collect(),
            };
            for c in parts.iter().flat_map(|p| &p.commands) {
                for r in &c.redactions {
                    eprintln!(
                        "redacted {}× {} in the {} of {} on {}",
                        r.count,
                        r.rule,
                        r.field,
                        c.id.short(),
                        c.machine
                    );
                }
            }
            let has_relay = client.org().await?.has_relay;
            if out.is_none() && !has_relay {
                bail!("the org has no relay to publish to; write the page with --out FILE");
            }
            if let Some(path) = &out {
                let bytes = if path.extension().is_some_and(|e| e == "json") {
                    transcript.clone().into_bytes()
                } else {
                    published.html().into_bytes()
                };
                std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            if has_relay {
                println!("{}", client.publish(transcript).await?);
            }
        }
        Command::Export { session, format, out } => {
            online(client).await?;
            let id = client.find_session(&session).await?;
            let pending = match out {
                Some(path) => {
                    // Written beside the destination and moved into place: a failed export
                    // leaves no half file behind.
                    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
                    let mut file = tempfile::NamedTempFile::new_in(dir)
                        .with_context(|| format!("writing into {}", dir.display()))?;
                    let mut writer = std::io::BufWriter::new(file.as_file_mut());
                    let pending = export_with_progress(client, id, format, &mut writer).await?;
                    drop(writer);
                    let size = file.as_file().metadata()?.len();
                    file.persist(&path).with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {} ({size} bytes)", path.display());
                    pending
                }
                None => {
                    let mut out = std::io::BufWriter::new(caisey_peer::cli::Stdout);
                    export_with_progress(client, id, format, &mut out).await?
                }
            };
            if pending > 0 {
                eprintln!(
                    "warning: {pending} bytes of output have not reached this machine yet; the export has the rest"
                );
            }
        }
        Command::GroupRuns { json } => {
            online(client).await?;
            let runs = client.group_runs().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else if runs.is_empty() {
                println!("no group runs yet (`caisey run --group G` or several --machine)");
            }
            for r in runs.iter().filter(|_| !json) {
                println!(
                    "{}  {:<40} {:>3} machines  {}  {}",
                    r.run.short(),
                    r.name,
                    r.machines.len(),
                    exit_summary(&r.machines),
                    time(r.last_activity)
                );
            }
        }
        Command::GroupRun { name, json } => {
            online(client).await?;
            let run = client.group_run(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("group run {:?} ({}): {}", run.name, run.run.short(), exit_summary(&run.machines));
            println!("  {:<20} {:<22} {:>4}  {:<8}  answered by", "machine", "status", "exit", "code");
            for m in &run.machines {
                println!(
                    "  {:<20} {:<22} {:>4}  {:<8}  {}",
                    m.machine,
                    m.status,
                    m.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    m.code.short(),
                    visible_line(m.decided_by.as_deref().unwrap_or("-"))
                );
            }
            for same in &run.outputs {
                let n = same.machines.len();
                println!("── {n} machine{}: {}", if n == 1 { "" } else { "s" }, join(&same.machines, ", "));
                for line in visible(&same.output).lines() {
                    println!("   {line}");
                }
                if same.cut {
                    println!(
                        "   … (compared on the first {} MiB; `caisey show` has all of it)",
                        crate::tech::GROUPED_BYTES >> 20
                    );
                }
            }
        }
        Command::Label { session, add, remove } => {
            online(client).await?;
            let id = client.find_session(&session).await?;
            client.relabel(id, add, remove).await?;
            let now = client.sessions(None, None).await?.into_iter().find(|s| s.id == id);
            let labels = now.map(|s| join(&s.labels, ", ")).unwrap_or_default();
            println!("labels: {}", if labels.is_empty() { "none" } else { &labels });
        }
        Command::Assign { session, technician, nobody: _ } => {
            online(client).await?;
            let id = client.find_session(&session).await?;
            client.assign(id, technician.clone()).await?;
            match technician {
                Some(t) => println!("assigned to {}", visible_line(&t)),
                None => println!("assigned to nobody"),
            }
        }
        Command::Note { session, text } => {
            online(client).await?;
            let id = client.find_session(&session).await?;
            client.note(id, &text.join(" ")).await?;
            println!("noted");
        }
        Command::Artifact(ArtifactCommand::List { session, json }) => {
            online(client).await?;
            let list = client.artifacts(client.find_session(&session).await?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no files were brought back in this session");
            } else {
                println!("{:<24}  {:>12}  {:<16}  {:<8}  {:<64}  here", "name", "size", "machine", "run", "sha256");
                for a in &list {
                    match (&a.refused, a.size, &a.sha256) {
                        (Some(why), _, _) => println!(
                            "{:<24}  {:>12}  {:<16}  {:<8}  REFUSED: {}",
                            visible_line(&a.name),
                            "-",
                            a.machine,
                            a.run.short(),
                            visible_line(why)
                        ),
                        (None, Some(size), Some(sha)) => println!(
                            "{:<24}  {:>12}  {:<16}  {:<8}  {sha}  {}%",
                            visible_line(&a.name),
                            size,
                            a.machine,
                            a.run.short(),
                            (a.here * 100).checked_div(size).unwrap_or(100)
                        ),
                        _ => {}
                    }
                }
            }
        }
        Command::Artifact(ArtifactCommand::Get { session, name, out, wait }) => {
            online(client).await?;
            let session = client.find_session(&session).await?;
            let out = match out {
                Some(p) => p,
                None => std::path::PathBuf::from(
                    std::path::Path::new(&name).file_name().ok_or_else(|| anyhow::anyhow!("give --out PATH"))?,
                ),
            };
            let out = std::env::current_dir()?.join(out);
            let deadline = std::time::Instant::now() + wait;
            let mut shown = 0;
            loop {
                let st = client.artifact_state(session, &name).await?;
                if let Some(why) = &st.refused {
                    bail!("{:?} was not brought back: {}", name, visible_line(why));
                }
                if st.complete() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "only {} of {} bytes of {name:?} arrived in time; run this again to go on",
                        st.here,
                        st.size.unwrap_or(0)
                    );
                }
                if st.here != shown {
                    eprintln!("{} of {} bytes here", st.here, st.size.unwrap_or(0));
                    shown = st.here;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let st = client.save_artifact(session, &name, out.clone()).await?;
            println!(
                "saved {} ({} bytes, sha256 {}, from {}) to {}",
                visible_line(&st.name),
                st.size.unwrap_or(0),
                st.sha256.unwrap_or_default(),
                st.machine,
                out.display()
            );
        }
        Command::Schedule(args) => {
            online(client).await?;
            let targets = match (args.machine.len(), args.group) {
                (0, Some(g)) => Targets::Group(g),
                (1, _) => Targets::Machine(args.machine[0].clone()),
                (0, None) => bail!("say where to run: --machine NAME (repeatable) or --group GROUP"),
                _ => Targets::Machines(args.machine.clone()),
            };
            let req = crate::schedules::ScheduleRequest {
                where_: crate::tech::Where { targets, session: args.session, labels: args.labels },
                command: args.how.spec(&args.command, None),
                description: args.how.description,
                every: args.every,
                until: parse_until(&args.until, caisey_peer::now_ms())?,
                missed: args.missed,
                probes: args.probes,
                consent_window: args.consent_window,
                replaces: None,
            };
            let asked = client.schedule(req).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&asked)?);
            } else {
                for a in &asked {
                    println!(
                        "schedule {} on {}: waiting for its user's consent (code {})",
                        a.request.short(),
                        a.machine.name,
                        a.code.short()
                    );
                }
                println!("see where it stands with `caisey schedules`");
            }
        }
        Command::Schedules { action, json } => {
            online(client).await?;
            match action {
                None => {
                    let list = client.schedules().await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else if list.is_empty() {
                        println!("no schedules here; ask for one with `caisey schedule`");
                    } else {
                        print_schedules(&list);
                    }
                }
                Some(SchedulesAction::Cancel { id }) => {
                    for s in client.cancel_schedule(&id).await? {
                        println!(
                            "cancelled schedule {} on {}; it stops once the machine hears of it",
                            s.id.short(),
                            s.machine
                        );
                    }
                }
                Some(SchedulesAction::Edit { id, every, until, command }) => {
                    let until = match until {
                        Some(u) => Some(parse_until(&u, caisey_peer::now_ms())?),
                        None => None,
                    };
                    let script = (!command.is_empty()).then(|| command.join(" "));
                    let edit = crate::schedules::ScheduleEdit { key: id, every, until, script };
                    for a in client.edit_schedule(edit).await? {
                        println!(
                            "schedule {} on {} replaces the old one; it runs once its user consents again (code {})",
                            a.request.short(),
                            a.machine.name,
                            a.code.short()
                        );
                    }
                }
            }
        }
        Command::History { session: Some(session), probe: Some(probe), json, csv, .. } => {
            online(client).await?;
            let points = client.probe_series(client.find_session(&session).await?, &probe).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else if csv {
                print!("{}", crate::schedules::probe_csv(&probe, &points));
            } else if points.is_empty() {
                println!("no run of that session yielded {probe:?}");
            } else {
                println!(
                    "{:<20}  {:<16}  {:>12}  {:>10}  {:>4}  {:<8}",
                    "when", "machine", probe, "change", "exit", "run"
                );
                for p in &points {
                    println!(
                        "{:<20}  {:<16}  {:>12}  {:>10}  {:>4}  {:<8}{}",
                        time(p.at),
                        p.machine,
                        format!(
                            "{}{}",
                            p.value,
                            p.unit.as_deref().map(|u| format!(" {}", visible_line(u))).unwrap_or_default()
                        ),
                        p.change.map(|c| format!("{c:+}")).unwrap_or_default(),
                        p.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                        p.code.short(),
                        if p.late { "  (late)" } else { "" }
                    );
                }
            }
        }
        Command::History { session, command, machine, json, .. } => {
            online(client).await?;
            let runs = match (session, command) {
                (Some(session), _) => client.session_history(client.find_session(&session).await?).await?,
                (None, Some(command)) => {
                    let node = match machine {
                        Some(name) => Some(machine_named(client, &name).await?),
                        None => None,
                    };
                    client.history(node, &command).await?
                }
                (None, None) => bail!("say which runs: a SESSION, or --command TEXT [--machine NAME]"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else if runs.is_empty() {
                println!("no runs of that command here");
            } else {
                println!("{:<20}  {:<16}  {:<11}  {:>4}  {:<8}  session", "when", "machine", "status", "exit", "code");
                for r in &runs {
                    println!(
                        "{:<20}  {:<16}  {:<11}  {:>4}  {:<8}  {}",
                        time(r.requested_at),
                        r.machine,
                        r.status,
                        r.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                        r.code.short(),
                        r.session_name
                    );
                }
            }
        }
        Command::Diff { older, newer } => {
            online(client).await?;
            let (old, new) = (client.find_run(&older).await?, client.find_run(&newer).await?);
            let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
            let old_text = text(client.output_bytes(old.session, old.request).await?);
            let new_text = text(client.output_bytes(new.session, new.request).await?);
            for (sign, r) in [("---", &old), ("+++", &new)] {
                println!("{sign} {} {} (code {}, {})", r.machine, time(r.requested_at), r.code.short(), r.status);
            }
            let lines = crate::tech::diff(&old_text, &new_text);
            let changed = lines.iter().filter(|l| !matches!(l, crate::tech::DiffLine::Same(_))).count();
            for line in &lines {
                let (sign, text) = match line {
                    crate::tech::DiffLine::Same(t) => (' ', t),
                    crate::tech::DiffLine::Removed(t) => ('-', t),
                    crate::tech::DiffLine::Added(t) => ('+', t),
                };
                println!("{sign}{}", visible_line(text));
            }
            if changed == 0 {
                println!("(the same output)");
            }
        }
        Command::Unshare { link } => {
            let id =
                link.trim_end_matches('/').rsplit('/').next().unwrap_or_default().trim_end_matches(".json").to_string();
            client.unpublish(&id).await?;
            println!("withdrawn: {id}");
        }
        Command::Verify { .. }
        | Command::Demo { .. }
        | Command::Up { .. }
        | Command::Down
        | Command::Service(_)
        | Command::Status { .. }
        | Command::Tools(_) => {
            unreachable!("handled before a client connects")
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_command(client: &Client, args: RunArgs) -> Result<ExitCode> {
    online(client).await?;
    let mut machines: Vec<String> =
        args.machine.iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
    let mut args = args;
    if let Some(key) = &args.failed_in {
        let run = client.group_run(key).await?;
        // Names to look the machines up by, and the session name to go on in: as they are.
        machines = run
            .machines
            .iter()
            .filter(|m| m.exit_code != Some(0))
            .map(|m| m.machine.as_unescaped_str().to_owned())
            .collect();
        if machines.is_empty() {
            println!("every machine of group run {:?} exited 0; nothing to run", run.name);
            return Ok(ExitCode::SUCCESS);
        }
        args.session.get_or_insert(run.name.into_unescaped_string());
    }
    let targets = match (machines.len(), args.group) {
        // A follow-up in a group run stays in it, whatever the number of machines.
        (_, _) if args.failed_in.is_some() => Targets::Machines(machines),
        (1, _) => Targets::Machine(machines.remove(0)),
        (0, Some(g)) => Targets::Group(g),
        (0, None) => bail!("say where to run: --machine NAME (repeatable) or --group GROUP"),
        _ => Targets::Machines(machines),
    };
    let collect = (!args.collect.is_empty())
        .then(|| caisey_doc::artifact::Collect { paths: args.collect.clone(), limit: args.collect_limit });
    let command = args.how.spec(&args.command, collect);
    let request = RunRequest {
        targets,
        session: args.session,
        labels: args.labels,
        command,
        description: args.how.description,
        approval_window: args.expires,
    };
    // Watching before asking: no change of the new sessions can slip by unseen.
    let mut events = client.watch().await?;
    let asked = client.ask(request).await?;
    if args.detach {
        let machines = asked.iter().map(|a| a.machine.node).collect();
        if !client.wait_delivered(machines, Duration::from_secs(5)).await? {
            eprintln!(
                "warning: the relay did not confirm the request; it is stored here and goes out when this technician next connects"
            );
        }
        if args.json {
            let reqs: Vec<_> = asked
                .iter()
                .map(|a| {
                    serde_json::json!({"session": a.session, "id": a.request, "code": a.code, "machine": a.machine.name})
                })
                .collect();
            println!("{}", serde_json::Value::Array(reqs));
        } else {
            for a in &asked {
                let machine = &a.machine.name;
                println!(
                    "asked {machine}: code {} (what its user approves by; session {})",
                    a.code.short(),
                    a.session.short()
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ids: BTreeSet<_> = asked.iter().map(|a| a.request).collect();
    let style = match (args.json, asked.len()) {
        (true, _) => OutputStyle::Silent,
        (false, 1) => OutputStyle::Passthrough,
        (false, _) => OutputStyle::Labelled,
    };
    let mut followers: Vec<Follower> =
        asked.iter().map(|a| Follower::new(a.session, Some(BTreeSet::from([a.request])), style)).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // A request nobody answered before it expired will never run (the agent refuses approvals
    // after expiry): the run ends then, a moment later for an answer already on its way.
    let expiry = tokio::time::Instant::now() + args.expires + EXPIRY_GRACE;
    let mut expired = false;
    // Each machine's latest view; only followers whose session changed are updated (a group of
    // hundreds would otherwise re-read every session on every change).
    let mut latest: Vec<Option<caisey_doc::session::CommandView>> = vec![None; followers.len()];
    let mut changed: BTreeSet<caisey_doc::id::DocId> = asked.iter().map(|a| a.session).collect();
    // A group's account on one line: how many answered, and why the others have not.
    let mut progress = (asked.len() > 1).then(|| Progress::counter(asked.len() as u64, Mode::for_stderr(args.json)));
    let mut online_now: Option<BTreeSet<caisey_doc::id::NodeId>> = None;
    let commands = loop {
        for (i, f) in followers.iter_mut().enumerate() {
            if changed.contains(&asked[i].session) {
                latest[i] = f.update(client).await?.into_iter().next();
            }
        }
        if let Some(progress) = &mut progress {
            let unanswered_on = |i: usize| latest[i].as_ref().is_none_or(unanswered);
            if online_now.is_none() && (0..asked.len()).any(unanswered_on) {
                let machines = client.machines(None, None).await?;
                online_now = Some(machines.into_iter().filter(|m| m.online).map(|m| m.node).collect());
            }
            let (done, account) = group_account(&latest, &asked, online_now.as_ref(), expired);
            progress.update(done, &account);
        }
        changed.clear();
        if latest.iter().all(|c| c.as_ref().is_some_and(|c| c.is_final() || (expired && unanswered(c)))) {
            break latest.iter().flatten().cloned().collect::<Vec<_>>();
        }
        tokio::select! {
            ev = events.next() => match ev {
                Some(Event::DocChanged(d)) => { changed.insert(d); }
                Some(_) => changed.extend(asked.iter().map(|a| a.session)),
                // The node went away (killed, or stopped): everything asked is durable, so the
                // next node, started on demand, carries on from where this one was.
                None => {
                    eprintln!("warning: this home's node stopped; following the run on a new one");
                    events = client.watch().await?;
                    changed.extend(asked.iter().map(|a| a.session));
                }
            },
            // A slow tick re-reads everything, in case an event was missed.
            _ = tick.tick() => {
                changed.extend(asked.iter().map(|a| a.session));
                online_now = None;
            }
            _ = tokio::time::sleep_until(expiry), if !expired => {
                expired = true;
                changed.extend(asked.iter().map(|a| a.session));
            }
        }
    };
    drop(progress);
    let status_of = |c: &caisey_doc::session::CommandView| -> String {
        if expired && unanswered(c) {
            "no answer reached here before the request expired; it cannot start after that".to_string()
        } else {
            c.status().to_string()
        }
    };
    let code_of = |c: &caisey_doc::session::CommandView| -> u8 {
        match &c.end {
            Some(e) if e.status == EndStatus::Exited => {
                e.exit_code.map(|c| (c & 0xff) as u8).unwrap_or(EXIT_REMOTE_FAILED)
            }
            _ => EXIT_REMOTE_FAILED,
        }
    };
    if args.json {
        // For scripts and cron: one JSON array, one object per machine, when all are done.
        let mut results = Vec::new();
        for session in asked.iter().map(|a| a.session).collect::<BTreeSet<_>>() {
            results.extend(client.session_json(session).await?.commands.into_iter().filter(|c| ids.contains(&c.id)));
        }
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    if commands.len() == 1 {
        let c = &commands[0];
        if c.end.is_none() && !args.json {
            eprintln!("the command did not run on {}: {}", asked[0].machine.name, status_of(c));
        }
        return Ok(ExitCode::from(code_of(c)));
    }
    if args.json {
        let failed = commands.iter().any(|c| code_of(c) != 0);
        return Ok(ExitCode::from(if failed { EXIT_REMOTE_FAILED } else { 0 }));
    }
    println!("summary:");
    let names: std::collections::BTreeMap<_, _> = asked.iter().map(|a| (a.request, a.machine.name.clone())).collect();
    let mut failed = 0;
    for c in &commands {
        let code = code_of(c);
        failed += usize::from(code != 0);
        let exit = c.end.as_ref().and_then(|e| e.exit_code).map(|x| format!(" (exit {x})")).unwrap_or_default();
        let machine = names.get(&c.request.id).cloned().unwrap_or_default();
        println!("  {machine:<20} {}{exit}", status_of(c));
    }
    Ok(ExitCode::from(if failed == 0 { 0 } else { EXIT_REMOTE_FAILED }))
}

/// A group run's account: how many machines answered (and of those, finished), how many wait
/// for approval, how many are offline (their request waits for them to connect).
fn group_account(
    latest: &[Option<caisey_doc::session::CommandView>],
    asked: &[crate::tech::Asked],
    online: Option<&BTreeSet<caisey_doc::id::NodeId>>,
    expired: bool,
) -> (u64, String) {
    let (mut answered, mut finished, mut waiting, mut offline, mut unanswered_expired) = (0, 0, 0, 0, 0);
    for (view, a) in latest.iter().zip(asked) {
        match view {
            Some(c) if !unanswered(c) => {
                answered += 1;
                finished += usize::from(c.is_final());
            }
            _ if expired => unanswered_expired += 1,
            _ if online.is_some_and(|o| !o.contains(&a.machine.node)) => offline += 1,
            _ => waiting += 1,
        }
    }
    let mut parts = vec![format!("{answered}/{} answered ({finished} finished)", asked.len())];
    if waiting > 0 {
        parts.push(format!("{waiting} waiting for approval"));
    }
    if offline > 0 {
        parts.push(format!("{offline} offline"));
    }
    if unanswered_expired > 0 {
        parts.push(format!("{unanswered_expired} expired unanswered"));
    }
    (answered as u64, parts.join(", "))
}

/// How long after its expiry a run still waits for an answer already on its way.
const EXPIRY_GRACE: Duration = Duration::from_secs(5);

/// Nobody decided it and it never started.
fn unanswered(c: &caisey_doc::session::CommandView) -> bool {
    c.decision.is_none() && c.start.is_none()
}

async fn remote_decision(client: &Client, code: &str, approve: bool) -> Result<ExitCode> {
    online(client).await?;
    let (a, delivered) = client.decide(code, approve).await?;
    let verb = if approve { "approved" } else { "denied" };
    println!("{verb} {} on {} ({})", a.id.short(), a.machine, visible(&a.script));
    if !delivered {
        eprintln!("warning: the relay did not confirm; the decision goes out when this node next connects");
    }
    Ok(ExitCode::SUCCESS)
}

/// `caisey up`: the node in the foreground, until Ctrl-C, SIGTERM or `caisey down`.
async fn up(opts: NodeOptions, idle_exit: Option<Duration>) -> Result<ExitCode> {
    if let Some(running) = Client::running(&opts).await? {
        let status = running.status().await?;
        bail!("a node is already running for this home (pid {}); `caisey down` stops it", status.pid);
    }
    crate::service::run(
        opts,
        idle_exit,
        |node| eprintln!("caisey node {} up for {}", node.id().short(), node.home().dir().display()),
        caisey_peer::cli::stop_signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn down(opts: &NodeOptions) -> Result<ExitCode> {
    match stop_node(opts).await? {
        Some(pid) => println!("stopped the node (pid {pid})"),
        None => println!("no node is running for this home"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Stops the home's node and waits until it has closed its store; its pid, if one ran.
async fn stop_node(opts: &NodeOptions) -> Result<Option<u32>> {
    let pid = match Client::running(opts).await {
        Ok(Some(client)) => {
            let pid = client.status().await?.pid;
            client.stop().await?;
            pid
        }
        Ok(None) => return Ok(None),
        // A node of another version will not talk to this client; it still stops on a signal.
        Err(e) => {
            let Some(pid) = crate::background::pid_of(&opts.home) else { return Err(e) };
            crate::background::stop_pid(pid)?;
            pid
        }
    };
    // Stopped once its pid file is gone (it closes its store first).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while crate::background::pid_of(&opts.home) == Some(pid) {
        if tokio::time::Instant::now() > deadline {
            bail!("the node (pid {pid}) did not stop within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Some(pid))
}

async fn status(opts: &NodeOptions, json: bool) -> Result<ExitCode> {
    let Some(client) = Client::running(opts).await? else {
        if json {
            println!("{}", serde_json::json!({ "running": false }));
        } else {
            println!("no node is running for this home; the next `caisey` command starts one (or `caisey up`)");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let s = client.status().await?;
    if json {
        let mut value = serde_json::to_value(&s)?;
        value["running"] = serde_json::Value::Bool(true);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let up = humantime::format_duration(Duration::from_secs(s.up_ms / 1000));
    println!("node {} ({}) of org {:?}: pid {}, up {up}", s.node.short(), s.name, visible(&s.org), s.pid);
    println!("  listening on {}", visible(&s.addrs.join(", ")));
    match s.idle_exit_ms {
        Some(ms) => println!(
            "  {} client(s) connected; stops after {} without clients",
            s.clients,
            humantime::format_duration(Duration::from_millis(ms))
        ),
        None => println!("  {} client(s) connected; runs until `caisey down`", s.clients),
    }
    if s.relays.is_empty() {
        println!("  relays: none (members sync directly)");
    }
    for r in &s.relays {
        let state = if r.connected { "reachable" } else { "unreachable" };
        let waiting = match r.unconfirmed_docs {
            0 => "holds everything here".to_string(),
            n => format!("{n} document(s) to send it"),
        };
        println!("  relay {} at {}: {state}, {waiting}", r.node.short(), visible(&r.addrs.join(", ")));
    }
    if s.peers.is_empty() {
        println!("  peers: none connected");
    }
    for p in &s.peers {
        let role = p.role.map(|r| r.to_string()).unwrap_or_else(|| "not a member".into());
        let path = match p.path {
            PeerPath::Direct => "direct",
            PeerPath::Relayed => "relayed",
        };
        println!("  peer {} ({}, {role}): {path}", p.name, p.node.short());
    }
    println!("  {} session(s); {} document(s) waiting to sync", s.sessions, s.unconfirmed_docs);
    match (&s.unwritable, &s.write_trouble) {
        (Some(u), _) => println!("  {}", unwritable_line(&u.error, u.since)),
        (None, Some(error)) => {
            println!("  store: writes fit again, but one failed within the last minute ({})", visible_line(error))
        }
        (None, None) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `caisey verify`: no node, no network beyond fetching the link.
async fn verify(source: &str) -> Result<ExitCode> {
    let bytes = if source.starts_with("http://") || source.starts_with("https://") {
        // The TLS stack is shared with iroh, which leaves the choice of crypto provider to us.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let response = reqwest::get(source).await.with_context(|| format!("fetching {source}"))?;
        if !response.status().is_success() {
            bail!("{source} answered {}", response.status());
        }
        response.bytes().await?.to_vec()
    } else {
        std::fs::read(source).with_context(|| format!("reading {source}"))?
    };
    let published = match caisey_doc::transcript::group::Published::verify(&bytes) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: NOT GENUINE: {e}");
            return Ok(ExitCode::from(EXIT_REMOTE_FAILED));
        }
    };
    match published {
        caisey_doc::transcript::group::Published::One(p) => print_checked(&p.1),
        caisey_doc::transcript::group::Published::Group(p) => {
            let g = &p.1;
            println!(
                "genuine group run: {:?}, {} machines, published by {} ({}) at {}",
                g.name,
                g.parts.len(),
                g.publisher,
                g.publisher_key.short(),
                time(g.published_at)
            );
            for part in &g.parts {
                print_checked(part);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A verified transcript, step by step, each with whether its author's signature proves it.
fn print_checked(checked: &caisey_doc::transcript::Checked) {
    let visible = caisey_agent::escape::visible;
    let seal =
        |signed: bool| if signed { "signed by its author" } else { "redacted; vouched for by the publisher only" };
    println!("genuine: {:?}, org {:?} (org key {})", checked.name, visible(&checked.org_name), checked.org_key.short());
    println!(
        "published by {} ({}) at {}",
        checked.publisher,
        checked.publisher_key.short(),
        time(checked.published_at)
    );
    println!("built from session {} at heads {}", checked.session, checked.heads.join(", "));
    for c in &checked.commands {
        println!("command {} on {} ({})", c.id.short(), c.machine, c.machine_key.short());
        println!(
            "  asked by {} ({}) at {} [{}]:",
            c.requester,
            c.requester_key.short(),
            time(c.requested_at),
            seal(c.request_signed)
        );
        for line in visible(&c.command.script).lines() {
            println!("      {line}");
        }
        match &c.decision {
            Some(d) => println!(
                "  {:?} by {} ({}) at {} [{}]",
                d.verdict,
                visible(&d.decided_by),
                d.decided_by_key.short(),
                time(d.decided_at),
                seal(d.signed)
            ),
            None => println!("  no decision"),
        }
        match &c.end {
            Some(e) => println!(
                "  ended: {:?}, exit code {} at {} [{}]",
                e.status,
                e.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
                time(e.ended_at),
                seal(e.signed)
            ),
            None => println!("  not finished"),
        }
        println!(
            "  stdout: {} bytes [{}]; stderr: {} bytes [{}]",
            c.stdout.len(),
            seal(c.stdout_signed),
            c.stderr.len(),
            seal(c.stderr_signed)
        );
        for r in &c.redactions {
            println!("  redacted: {}× {} in {}", r.count, r.rule, r.field);
        }
    }
    if !checked.omitted.is_empty() {
        println!("{} command(s) left out by the publisher", checked.omitted.len());
    }
}
