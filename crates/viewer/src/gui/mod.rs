//! The desktop viewer (`caisey` with no subcommand): an egui window over the technician's node.
//!
//! The home's node is another process (started on demand); [`backend`], on a tokio runtime
//! beside the UI, is the only part that talks to it. The UI ([`app`] and one module per tab) holds plain data ([`model`]) and sends actions,
//! so it never waits on the network and can be driven headless by `egui_kittest`.
//!
//! ```text
//!  egui frame ── Action ──▶ backend task ── Request ──▶ the home's node (its own process)
//!      ▲                         │  ◀── Event::DocChanged ──┘      over the home's socket
//!      └──── Update + repaint ───┘
//! ```

pub mod app;
mod approvals;
pub mod backend;
mod compose;
mod fleet;
mod group_runs;
mod history;
pub mod model;
pub mod probes;
mod schedules;
mod sessions;
pub mod widgets;

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use caisey_peer::node::NodeOptions;

use crate::client::Client;

pub use app::{Tab, ViewerApp};
pub use fleet::connectivity;
pub use sessions::file_name;

impl eframe::App for ViewerApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

/// Opens the viewer window on `app` and returns when it is closed.
pub fn open_window(title: &str, app: ViewerApp) -> Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_inner_size([1280.0, 800.0]).with_title(title),
        ..Default::default()
    };
    eframe::run_native(title, options, Box::new(|_cc| Ok(Box::new(app)))).map_err(|e| {
        anyhow!("could not open the viewer window ({e}); without a display, use the subcommands (`caisey --help`)")
    })
}

/// `caisey`: the viewer on this home's node (started if it is not running), until the window is
/// closed. The node stays up for its other clients, and stops on its own once it has none.
pub fn run(opts: NodeOptions, idle_exit: std::time::Duration) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let starter = crate::background::Starter::this_binary(idle_exit)?;
    let client = rt.block_on(Client::connect(&opts, Some(starter)))?;
    if rt.block_on(client.org())?.my_role.is_none() {
        bail!("this home belongs to no org yet: `caisey init --org NAME`, `caisey join TOKEN`, or try `caisey demo`");
    }
    let (handle, backend) = backend::spawn(rt.handle(), client, true);
    let shown = open_window("Caisey", ViewerApp::new(handle));
    // The handle is gone with the window: the backend sees its channel close and ends.
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), backend).await;
    });
    shown
}

/// `caisey demo`: the demo org, then the viewer on its technician with the story's session open.
pub fn demo() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let fleet = rt.block_on(crate::demo::DemoFleet::start())?;
    println!("== opening the viewer; in this demo the machines' users approve every request");
    let approver = {
        let _in_runtime = rt.enter();
        fleet.approve_everything()
    };
    let (handle, backend) = backend::spawn(rt.handle(), fleet.client.clone(), false);
    let mut app = ViewerApp::new(handle);
    app.open_session(fleet.session);
    let shown = open_window("Caisey demo", app);
    approver.abort();
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), backend).await });
    rt.block_on(fleet.stop());
    shown
}
