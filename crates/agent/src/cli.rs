//! `caisey-agent`'s command line.

use std::process::ExitCode;

use anyhow::{Result, bail};
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
    /// Approve a pending request (any unique prefix of its id); it runs at once.
    Approve { id: String },
    /// Deny a pending request; it never runs.
    Deny { id: String },
    /// Open the consent window: see each request as it arrives, approve or deny it.
    Prompt,
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
    let opts = cli.node.options("caisey-agent")?;
    match cli.command {
        Command::Enroll { token, name, groups } => {
            let token = InviteToken::decode(&token, caisey_peer::now_ms())?;
            if token.cert.role != caisey_doc::fleet::Role::Agent {
                bail!("this token enrolls a {}; use `caisey join` for technicians", token.cert.role);
            }
            let name = name.unwrap_or_else(|| crate::card::read(0).hostname);
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
                LocalReply::Pending { pending } => pending,
                LocalReply::Error { error } => bail!("{error}"),
                LocalReply::Done { .. } => bail!("unexpected reply from the agent"),
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
                        crate::escape::visible_line(&p.technician),
                        p.technician_key.short(),
                        p.session
                    );
                    if !p.description.is_empty() {
                        // One line: a newline in it must not fake the command block below.
                        println!("    why: {}", crate::escape::visible_line(&p.description));
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
                }
                println!("approve with `caisey-agent approve ID`, deny with `caisey-agent deny ID`");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve { id } => decide(&opts, LocalRequest::Approve { id }).await,
        Command::Deny { id } => decide(&opts, LocalRequest::Deny { id }).await,
        Command::Prompt | Command::Tools(_) => bail!("`main` runs this one"),
    }
}

async fn decide(opts: &caisey_peer::node::NodeOptions, req: LocalRequest) -> Result<ExitCode> {
    match local::call(&opts.home.socket_path(), &req).await? {
        LocalReply::Done { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        LocalReply::Error { error } => bail!("{error}"),
        LocalReply::Pending { .. } => bail!("unexpected reply from the agent"),
    }
}
