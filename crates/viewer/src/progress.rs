//! Progress on long waits (a group run's answers, catching up with the org, an export): a live
//! line on a terminal, drawn on stderr with `indicatif`; where stderr is not a terminal, a plain
//! line each time the account changes; nothing at all for `--json`.
//!
//! While a live line is on screen, other printing goes through [`println`], which lifts the
//! line, prints, and draws it again, so that neither tears the other.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The live line on screen, if any.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// How a wait is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A live line on the terminal.
    Live,
    /// A plain line on stderr for each change.
    Plain,
    /// Not at all.
    Off,
}

impl Mode {
    /// Live on a terminal, plain elsewhere; `off` for machine-readable output.
    pub fn for_stderr(off: bool) -> Self {
        match (off, std::io::stderr().is_terminal()) {
            (true, _) => Mode::Off,
            (false, true) => Mode::Live,
            (false, false) => Mode::Plain,
        }
    }
}

/// One wait being shown.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    mode: Mode,
    last: String,
}

impl Progress {
    /// Counts `total` things done, with a message.
    pub fn counter(total: u64, mode: Mode) -> Self {
        Self::start(mode, || bar(total, "{bar:24.cyan/blue} {msg}"))
    }

    /// Counts bytes of a known total.
    pub fn bytes(total: u64, mode: Mode) -> Self {
        Self::start(mode, || bar(total, "{bar:24.cyan/blue} {bytes}/{total_bytes} {msg}"))
    }

    /// Something that takes a while, of no known size.
    pub fn spinner(mode: Mode) -> Self {
        Self::start(mode, || {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        })
    }

    fn start(mode: Mode, make: impl FnOnce() -> ProgressBar) -> Self {
        let bar = (mode == Mode::Live).then(make);
        if let (Some(bar), Ok(mut shown)) = (&bar, SHOWN.lock()) {
            *shown = Some(bar.clone());
        }
        Self { bar, mode, last: String::new() }
    }

    /// Sets how far it is and what to say.
    pub fn update(&mut self, done: u64, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(message.to_string());
        } else if self.mode == Mode::Plain && message != self.last {
            eprintln!("{message}");
        }
        self.last = message.to_string();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            if let Ok(mut shown) = SHOWN.lock() {
                *shown = None;
            }
        }
    }
}

/// A bar of `total` steps drawn with `template` on stderr.
fn bar(total: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}

/// Prints a line on stdout around the live line, if one is shown.
pub fn println(line: &str) {
    let shown = SHOWN.lock().ok().and_then(|s| s.clone());
    match shown {
        Some(bar) => bar.suspend(|| println!("{line}")),
        None => println!("{line}"),
    }
}
