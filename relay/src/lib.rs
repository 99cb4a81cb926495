//! # caisey-relay: the org's always-on store-and-forward member
//!
//! A relay is an ordinary node (see `caisey-peer`) that technicians and agents keep connected
//! to. It holds every document the org shares with it and forwards each change to every other
//! connected member allowed to hold it, so a technician and an agent that are never online at
//! the same time still complete a command through it. It has no authority: it cannot sign
//! membership, requests or approvals, only store and forward what members signed.
//!
//! It also serves enrollment (`caisey/enroll/1`): new agents and technicians claim their invite
//! here, and a technician adopts a fresh relay with `caisey relay add TICKET`. With `--http`, it
//! serves the transcripts technicians publish (`caisey/publish/1`) as read-only pages ([`http`]).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use caisey_doc::fleet::Contact;
use caisey_doc::token::RelayTicket;
use caisey_peer::cli::{NodeArgs, Tools, run_main};
use caisey_peer::node::{Node, NodeOptions};
use clap::{Parser, Subcommand};
use tracing::info;

pub mod http;
pub mod install;
pub mod traversal;

/// The Caisey relay: stores and forwards the org's sessions so nothing waits on both ends being online.
#[derive(Debug, Parser)]
#[command(name = "caisey-relay", version)]
pub struct Cli {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay; prints its ticket (for `caisey relay add`) when it starts.
    Run {
        /// Serve published transcripts over HTTP at this address (e.g. 0.0.0.0:8080).
        #[arg(long, value_name = "ADDR", env = "CAISEY_HTTP")]
        http: Option<std::net::SocketAddr>,
        /// The base URL links should use, when the relay is reached through another name (a
        /// reverse proxy, a DNS name). Default: http://ADDR as bound.
        #[arg(long, value_name = "URL", requires = "http", env = "CAISEY_PUBLIC_URL")]
        public_url: Option<String>,
    },
    /// Print the ticket of the relay in this home again.
    Ticket,
    /// Install the relay as this machine's service (as root) and start it. `--listen` sets
    /// its address (default port 4433).
    Install {
        /// Serve published transcripts over HTTP at this address.
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
        /// The base URL transcript links use.
        #[arg(long, value_name = "URL", requires = "http")]
        public_url: Option<String>,
        /// Write into DIR as if it were `/` (to prepare an image); nothing is started.
        #[arg(long, value_name = "DIR")]
        root: Option<std::path::PathBuf>,
        /// The binary the service runs (default: this one).
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
    },
    /// Stop and remove the relay service; its key and store are kept unless --delete-store.
    Uninstall {
        #[arg(long)]
        delete_store: bool,
        #[arg(long, value_name = "DIR")]
        root: Option<std::path::PathBuf>,
    },
    #[command(flatten)]
    Tools(Tools),
}

pub fn main() -> ExitCode {
    let (cli, layers) = caisey_peer::config::parse_or_exit::<Cli>("relay", "caisey-relay");
    if let Command::Tools(tools) = &cli.command {
        return tools.run::<Cli>(&layers);
    }
    caisey_peer::cli::init_tracing();
    caisey_peer::cli::quiet_on_closed_pipe();
    run_main(async move {
        let opts = || cli.node.options("caisey-relay");
        match cli.command {
            Command::Run { http, public_url } => {
                let http = http.map(|addr| HttpOptions { addr, public_url });
                run(opts()?, http, |ticket| println!("{ticket}"), caisey_peer::cli::stop_signal()).await?
            }
            Command::Ticket => println!("{}", read_ticket(opts()?.home.dir())?),
            Command::Install { http, public_url, root, binary } => {
                let binary = match binary {
                    Some(b) => b,
                    None => std::env::current_exe().context("finding this binary")?,
                };
                let root = caisey_peer::service::Root::new(root)?;
                let req = install::Install { listen: cli.node.listen, http, public_url, root, binary };
                for line in install::install(&req)? {
                    println!("{line}");
                }
            }
            Command::Uninstall { delete_store, root } => {
                for line in install::uninstall(&caisey_peer::service::Root::new(root)?, delete_store)? {
                    println!("{line}");
                }
            }
            Command::Tools(_) => anyhow::bail!("`main` runs this one"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn ticket_path(home: &Path) -> std::path::PathBuf {
    home.join("ticket")
}

fn read_ticket(home: &Path) -> Result<String> {
    let path = ticket_path(home);
    std::fs::read_to_string(&path).map(|t| t.trim().to_string()).with_context(|| {
        format!("no ticket in {}; has `caisey-relay run` been started with this --home?", home.display())
    })
}

/// Where to serve transcripts over HTTP.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub addr: std::net::SocketAddr,
    pub public_url: Option<String>,
}

/// Starts a relay node; `on_ready` gets its ticket once it listens. Runs until `shutdown`.
pub async fn run(
    opts: NodeOptions,
    http: Option<HttpOptions>,
    on_ready: impl FnOnce(String),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let node = start(opts, http).await?;
    on_ready(ticket_of(&node));
    shutdown.await;
    node.shutdown().await;
    Ok(())
}

/// Starts a relay node and returns it (for in-process use: the demo, tests).
pub async fn start(opts: NodeOptions, http: Option<HttpOptions>) -> Result<Node> {
    let listen = opts.listen;
    let node = Node::start(opts).await?;
    node.serve_protocol(caisey_peer::wire::ENROLL_ALPN, caisey_peer::enroll::handler(true));
    let base = match http {
        Some(h) => {
            let listener = tokio::net::TcpListener::bind(h.addr)
                .await
                .with_context(|| format!("could not listen for HTTP on {}", h.addr))?;
            let bound = listener.local_addr()?;
            let base = h.public_url.unwrap_or_else(|| format!("http://{bound}"));
            eprintln!("serving transcripts at {base}");
            tokio::spawn(http::serve(listener, node.clone()));
            Some(base)
        }
        None => None,
    };
    node.serve_protocol(caisey_peer::wire::PUBLISH_ALPN, caisey_peer::publish::handler(base));
    let ticket = ticket_of(&node);
    std::fs::write(ticket_path(node.home().dir()), format!("{ticket}\n")).context("writing the ticket file")?;
    // The org's other relays hold everything too: keep in sync with them (and they with us).
    node.keep_connected();
    let (relay_server, info) = traversal::start(&node, node.home().dir(), listen.ip(), advertised_ip(&node)).await?;
    node.set_own_relay_server(&info).await?;
    // Our addresses may have changed since the last run: tell the org.
    node.announce_in_fleet().await?;
    match node.fleet_doc().await? {
        Some(_) => info!(org = %node.fleet().await?.org_name, relay_server = %info.url, "relay serving its org"),
        None => info!("relay waiting to be adopted with `caisey relay add`"),
    }
    // The relay server lives as long as the node's endpoint.
    tokio::spawn({
        let node = node.clone();
        async move {
            node.closed().await;
            let _ = relay_server.shutdown().await;
        }
    });
    Ok(node)
}

/// The address members reach this relay at: the first it advertises that is not loopback (on
/// loopback alone, loopback).
fn advertised_ip(node: &Node) -> std::net::IpAddr {
    let addrs: Vec<std::net::SocketAddr> = node.addrs().iter().filter_map(|a| a.parse().ok()).collect();
    addrs
        .iter()
        .find(|a| !a.ip().is_loopback())
        .or(addrs.first())
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}

pub fn ticket_of(node: &Node) -> String {
    RelayTicket(Contact { node: node.id(), addrs: node.addrs() }).encode()
}
