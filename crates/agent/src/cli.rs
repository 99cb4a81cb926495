//! `caisey-agent`'s command line.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use caisey_doc::token::InviteToken;
use caisey_peer::cli::{NodeArgs, Tools, run_main};
use caisey_peer::node::Node;
use clap::{Parser, Subcommand};

use crate::local::{self, LocalReply, LocalRequest};

/// The Caisey endpoint agent: runs diagnostics a technician asks for, after you approve them.
#[derive(Debug, Parser)]
#[command(name = "caisey-agent", version)]
pub struct Cli {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum ConsentsAction {
    /// Take back consent to a schedule (at least 8 characters of its id): it never runs here again.
    Revoke { id: String },
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Enroll this machine in an org with a one-time token from `caisey invite agent`.
    Enroll {
        token: String,
        /// Machine name shown to technicians (default: the token's, else the hostname).
        #[arg(long)]
        name: Option<String>,
        /// Groups to join, when the token names none.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Run the agent daemon.
    Run {
        /// Members of this group may also list, approve and deny requests (`pending`, the
        /// consent window). Set by `install`, which creates the group.
        #[arg(long, env = "CAISEY_CONSENT_GROUP", value_name = "GROUP")]
        consent_group: Option<String>,
    },
    /// List requests waiting for your approval.
    Pending {
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending request (its whole code, as `pending` shows it); it runs at once. For
    /// a schedule, this consents to all its runs until its end date.
    Approve {
        id: String,
        /// For a schedule: ask again at each run instead.
        #[arg(long)]
        each_run: bool,
    },
    /// Deny a pending request; it never runs.
    Deny { id: String },
    /// Open the consent window: see each request as it arrives, approve or deny it.
    Prompt,
    /// The recurring checks you were asked about, and where each stands; `revoke ID` takes
    /// your consent back, at once.
    Consents {
        #[command(subcommand)]
        action: Option<ConsentsAction>,
        #[arg(long)]
        json: bool,
    },
    /// Install the agent as this machine's service (as root): enroll with TOKEN, start the
    /// daemon at boot, open the consent window at each graphical login. Safe to run again.
    Install {
        /// The token from `caisey invite agent` (not needed once the machine is enrolled).
        token: Option<String>,
        /// Machine name shown to technicians (default: the token's, else the hostname).
        #[arg(long)]
        name: Option<String>,
        /// Groups to join, when the token names none.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// A user who may approve requests on this machine (repeatable; default: the user
        /// who ran sudo, if any).
        #[arg(long = "user", value_name = "USER")]
        users: Vec<String>,
        /// Write into DIR as if it were `/` (to prepare an image); nothing is started.
        #[arg(long, value_name = "DIR")]
        root: Option<std::path::PathBuf>,
        /// The binary the service runs (default: this one).
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
    },
    /// Remove what `install` made; asks before deleting the enrollment and sessions.
    Uninstall {
        /// Delete the store too (enrollment and sessions), without asking.
        #[arg(long, conflicts_with = "keep_store")]
        delete_store: bool,
        /// Keep the store, without asking.
        #[arg(long)]
        keep_store: bool,
        #[arg(long, value_name = "DIR")]
        root: Option<std::path::PathBuf>,
    },
    #[command(flatten)]
    Tools(Tools),
}

pub fn main() -> ExitCode {
    let (cli, layers) = caisey_peer::config::parse_or_exit::<Cli>("agent", "caisey-agent");
    if let Command::Tools(tools) = &cli.command {
        return tools.run::<Cli>(&layers);
    }
    caisey_peer::cli::init_tracing();
    caisey_peer::cli::quiet_on_closed_pipe();
    if let Command::Prompt = cli.command {
        // A window needs the main thread, so this one does not run on the async runtime.
        return match cli.node.options("caisey-agent").and_then(|o| prompt_window(o.home.socket_path())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(caisey_peer::cli::EXIT_LOCAL_ERROR)
            }
        };
    }
    run_main(run(cli))
}

/// Opens the consent window on the daemon at `socket`, until it is closed.
fn prompt_window(socket: std::path::PathBuf) -> Result<()> {
    struct Window(crate::prompt::PromptApp);
    impl eframe::App for Window {
        fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
            self.0.show(ui);
        }
    }
    let app = crate::prompt::PromptApp::connect(socket)?;
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([720.0, 620.0])
            .with_title("Caisey: approval needed"),
        ..Default::default()
    };
    eframe::run_native("caisey-prompt", options, Box::new(|_cc| Ok(Box::new(Window(app))))).map_err(|e| {
        anyhow::anyhow!("could not open the consent window ({e}); `caisey-agent pending` works without a display")
    })
}

async fn run(cli: Cli) -> Result<ExitCode> {
    // Installing and uninstalling work on the machine's paths, not on a home of this user's.
    let command = match cli.command {
        Command::Install { token, name, groups, users, root, binary } => {
            return install(cli.node.listen, token, name, groups, users, root, binary).await;
        }
        Command::Uninstall { delete_store, keep_store, root } => return uninstall(delete_store, keep_store, root),
        other => other,
    };
    let opts = cli.node.options("caisey-agent")?;
    match command {
        Command::Enroll { token, name, groups } => {
            let token = InviteToken::decode(&token, caisey_peer::now_ms())?;
            if token.cert.role != caisey_doc::fleet::Role::Agent {
                bail!("this token enrolls a {}; use `caisey join` for technicians", token.cert.role);
            }
            let name = name.unwrap_or_else(|| crate::card::read(0).hostname.into_unescaped_string());
            let node = Node::start(opts).await?;
            let result = caisey_peer::enroll::join(&node, &token, &name, &groups).await;
            node.shutdown().await;
            let fleet = result?;
            let me = fleet.members.get(&node.id()).map(|m| (m.name.clone(), m.groups.join(", "))).unwrap_or_default();
            println!(
                "enrolled as {:?} in org {:?} (groups: {})",
                me.0,
                fleet.org_name,
                if me.1.is_empty() { "none" } else { &me.1 }
            );
            println!("start the agent with: caisey-agent run");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { consent_group } => {
            let access = crate::daemon::LocalAccess { consent_group };
            crate::daemon::run(opts, access, caisey_peer::cli::stop_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pending { json } => {
            let pending = match local::call(&opts.home.socket_path(), &LocalRequest::Pending).await? {
                LocalReply::Pending { pending, .. } => pending,
                LocalReply::Error { error } => bail!("{error}"),
                _ => bail!("unexpected reply from the agent"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&pending)?);
            } else if pending.is_empty() {
                println!("nothing is waiting for your approval");
            } else {
                for p in pending {
                    let left = p.expires_at.saturating_sub(caisey_peer::now_ms()) / 1000;
                    println!(
                        "{}  from {} ({}) in session {:?}, expires in {left}s",
                        p.id.short(),
                        p.technician,
                        p.technician_key.short(),
                        p.session
                    );
                    if !p.description.is_empty() {
                        // One line: a newline in it must not fake the command block below.
                        println!("    why: {}", p.description);
                    }
                    println!(
                        "    {} (timeout {}s{}):",
                        p.shell,
                        p.timeout_ms / 1000,
                        p.cwd.map(|c| format!(", in {c}")).unwrap_or_default()
                    );
                    for line in crate::escape::visible(&p.script).lines() {
                        println!("      {line}");
                    }
                    if let Some(c) = &p.collect {
                        println!(
                            "    then BRINGS BACK these files (at most {} in all):",
                            caisey_peer::cli::format_size(c.limit)
                        );
                        for path in &c.paths {
                            println!("      {}", crate::escape::visible_line(path));
                        }
                    }
                    if let Some(s) = &p.schedule {
                        println!(
                            "    RECURRING: {}, until {}; missed runs: {}{}",
                            caisey_doc::schedule::describe(&s.every),
                            caisey_peer::cli::format_time(s.until),
                            match s.missed {
                                caisey_doc::schedule::Missed::RunLate => "run late",
                                caisey_doc::schedule::Missed::Skip => "skipped",
                            },
                            if s.probes.is_empty() {
                                String::new()
                            } else {
                                format!("; records {}", s.probes.join(", "))
                            }
                        );
                        println!(
                            "    approving runs it on that schedule without asking again (`--each-run` to be asked each time)"
                        );
                    }
                }
                println!("approve with `caisey-agent approve ID`, deny with `caisey-agent deny ID`");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve { id, each_run } => decide(&opts, LocalRequest::Approve { id, each_run }).await,
        Command::Consents { action: Some(ConsentsAction::Revoke { id }), .. } => {
            decide(&opts, LocalRequest::Revoke { id }).await
        }
        Command::Consents { action: None, json } => {
            let consents = match local::call(&opts.home.socket_path(), &LocalRequest::Consents).await? {
                LocalReply::Consents { consents } => consents,
                LocalReply::Error { error } => bail!("{error}"),
                _ => bail!("unexpected reply from the agent"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&consents)?);
            } else if consents.is_empty() {
                println!("no technician has asked to run anything on a schedule here");
            } else {
                for c in consents {
                    println!(
                        "{}  {}  from {} in session {:?}: {}, until {}; {} run(s){}",
                        c.schedule.short(),
                        c.state.as_str().to_uppercase(),
                        c.technician,
                        c.session,
                        caisey_doc::schedule::describe(&c.every),
                        caisey_peer::cli::format_time(c.until),
                        c.runs,
                        c.next_run
                            .map(|t| format!(", next at {}", caisey_peer::cli::format_time(t)))
                            .unwrap_or_default()
                    );
                    for line in crate::escape::visible(&c.script).lines() {
                        println!("      {line}");
                    }
                }
                println!("take consent back with `caisey-agent consents revoke ID`");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Deny { id } => decide(&opts, LocalRequest::Deny { id }).await,
        Command::Install { .. } | Command::Uninstall { .. } => bail!("handled above"),
        Command::Prompt | Command::Tools(_) => bail!("`main` runs this one"),
    }
}

async fn install(
    listen: std::net::SocketAddr,
    token: Option<String>,
    name: Option<String>,
    groups: Vec<String>,
    mut users: Vec<String>,
    root: Option<std::path::PathBuf>,
    binary: Option<std::path::PathBuf>,
) -> Result<ExitCode> {
    let binary = match binary {
        Some(b) => b,
        None => std::env::current_exe().context("finding this binary")?,
    };
    let root = caisey_peer::service::Root::new(root)?;
    if users.is_empty()
        && root.is_live()
        && let Some(user) = std::env::var("SUDO_USER").ok().filter(|u| !u.is_empty() && u != "root")
    {
        users.push(user);
    }
    let req = crate::install::Install { token, name, groups, users, root, binary, listen };
    for line in crate::install::install(req).await? {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

fn uninstall(delete_store: bool, keep_store: bool, root: Option<std::path::PathBuf>) -> Result<ExitCode> {
    let root = caisey_peer::service::Root::new(root)?;
    let delete_store =
        delete_store || (!keep_store && root.at(crate::install::HOME).exists() && ask_delete_store(&root)?);
    for line in crate::install::uninstall(&crate::install::Uninstall { root, delete_store })? {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks at the terminal whether to delete the store; anywhere else, the answer is no.
fn ask_delete_store(root: &caisey_peer::service::Root) -> Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    let home = root.at(crate::install::HOME);
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    print!("Delete {} too (this machine's enrollment and the sessions on it)? [y/N] ", home.display());
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

async fn decide(opts: &caisey_peer::node::NodeOptions, req: LocalRequest) -> Result<ExitCode> {
    match local::call(&opts.home.socket_path(), &req).await? {
        LocalReply::Done { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        LocalReply::Error { error } => bail!("{error}"),
        LocalReply::Pending { .. } | LocalReply::Consents { .. } => bail!("unexpected reply from the agent"),
    }
}
