//! Settings: every one a flag, an environment variable and a key in a TOML file.
//!
//! A setting is any command-line argument that has an environment variable (`--home` and
//! `CAISEY_HOME`, `--listen` and `CAISEY_LISTEN`, …); its key in the file is its long flag with
//! `_` for `-`, in a table named after its subcommand when it belongs to one (`[up] idle_exit =
//! "1h"`). The command line wins over the environment, which wins over the file, which wins over
//! the built-in default. The file's values become clap's defaults before parsing, so clap keeps
//! doing all the parsing and validating; each is also checked on its own first, so that a bad one
//! is reported with the file, the key and the line.
//!
//! The file is `--config FILE`, else `CAISEY_CONFIG`, else `NAME.toml` in the user's platform
//! config directory (`~/.config/caisey/agent.toml` on Linux), else the machine's
//! (`/etc/caisey/agent.toml`, written by `install`): the first that exists. So every command on
//! a machine with an installed agent finds that agent without being told.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory};
use toml::de::{DeTable, DeValue};

/// The environment variable that names the config file.
pub const CONFIG_ENV: &str = "CAISEY_CONFIG";

/// A config file's settings, each with the line it is on.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    /// Where it is; `None` when there is none.
    pub path: Option<PathBuf>,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Subcommand names leading to the setting (empty for the binary's own).
    commands: Vec<String>,
    /// The argument's id in clap.
    id: String,
    values: Vec<String>,
    line: usize,
}

/// What was parsed, and how: kept for `config show`.
#[derive(Debug)]
pub struct Layers {
    pub file: ConfigFile,
    /// Where the file is looked for when none is named: the user's, then the machine's.
    default_file: Option<PathBuf>,
    system_file: Option<PathBuf>,
    /// The home used when none is set.
    default_home: Option<PathBuf>,
    command: Command,
    matches: ArgMatches,
}

/// One setting's effective value and where it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Effective {
    /// Its key in the config file (`listen`, `up.idle_exit`).
    pub key: String,
    pub flag: String,
    pub env: String,
    /// `None` when it is not set anywhere and has no default.
    pub value: Option<String>,
    /// `flag`, `env`, `file PATH line N`, `default` or `unset`.
    pub source: String,
}

/// Parses the command line of a binary whose default config file is `NAME.toml`, with the file
/// under the flags and the environment. A bad command line exits the way clap does; a bad
/// config file exits with one line naming the file, the key and the line (exit code 2).
pub fn parse_or_exit<C: clap::Parser>(name: &str, app: &str) -> (C, Layers) {
    let args: Vec<OsString> = std::env::args_os().collect();
    match parse_from::<C>(name, app, args) {
        Ok(Parsed::Done(cli, layers)) => (cli, *layers),
        Ok(Parsed::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(i32::from(crate::cli::EXIT_LOCAL_ERROR));
        }
    }
}

/// The outcome of [`parse_from`]: parsed, or clap's own error (help and version included).
#[derive(Debug)]
pub enum Parsed<C> {
    Done(C, Box<Layers>),
    Clap(clap::Error),
}

/// [`parse_or_exit`] on given arguments (the first is the binary's name). `app` names the
/// binary's home in the platform data directory (see [`crate::home::Home::new`]).
pub fn parse_from<C: clap::Parser>(name: &str, app: &str, args: Vec<OsString>) -> Result<Parsed<C>> {
    let mut command = C::command();
    let file = match config_path(name, &args)? {
        Some(path) => load(&path, &command)?,
        None => ConfigFile::default(),
    };
    for entry in &file.entries {
        command = with_default(command, &entry.commands, &entry.id, &entry.values);
    }
    let matches = match command.clone().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => return Ok(Parsed::Clap(e)),
    };
    match C::from_arg_matches(&matches) {
        Ok(cli) => Ok(Parsed::Done(
            cli,
            Box::new(Layers {
                file,
                default_file: default_path(name),
                system_file: system_path(name),
                default_home: crate::home::default_dir(app),
                command,
                matches,
            }),
        )),
        Err(e) => Ok(Parsed::Clap(e)),
    }
}

/// Where the config file is: `--config`, `CAISEY_CONFIG`, or the default one if it exists.
fn config_path(name: &str, args: &[OsString]) -> Result<Option<PathBuf>> {
    let mut given = None;
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let Some(arg) = arg.to_str() else { continue };
        if arg == "--" {
            break;
        } else if arg == "--config" {
            given = rest.next().map(PathBuf::from);
        } else if let Some(path) = arg.strip_prefix("--config=") {
            given = Some(PathBuf::from(path));
        }
    }
    let given = given.or_else(|| std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from));
    if let Some(path) = given {
        if !path.is_file() {
            bail!("config file {} does not exist", path.display());
        }
        return Ok(Some(path));
    }
    Ok([default_path(name), system_path(name)].into_iter().flatten().find(|p| p.is_file()))
}

/// `NAME.toml` in the machine's config directory.
pub fn system_path(name: &str) -> Option<PathBuf> {
    if cfg!(unix) { Some(PathBuf::from("/etc/caisey").join(format!("{name}.toml"))) } else { None }
}

/// `NAME.toml` in the platform config directory's `caisey` folder.
pub fn default_path(name: &str) -> Option<PathBuf> {
    directories::BaseDirs::new().map(|dirs| dirs.config_dir().join("caisey").join(format!("{name}.toml")))
}

/// Reads and checks a config file against the settings `command` has.
fn load(path: &Path, command: &Command) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let at = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let table = DeTable::parse(&text).map_err(|e| {
        let line = e.span().map(|s| format!(" line {}", at(s.start))).unwrap_or_default();
        anyhow!("{}{line}: {}", path.display(), e.message().trim())
    })?;
    let mut entries = Vec::new();
    collect(path, &at, command, &[], table.get_ref(), &mut entries)?;
    Ok(ConfigFile { path: Some(path.to_path_buf()), entries })
}

fn collect(
    path: &Path,
    at: &dyn Fn(usize) -> usize,
    command: &Command,
    commands: &[String],
    table: &DeTable<'_>,
    out: &mut Vec<Entry>,
) -> Result<()> {
    for (key, value) in table {
        let line = at(key.span().start);
        let name = key.get_ref().as_ref();
        let full_key = commands.iter().map(String::as_str).chain([name]).collect::<Vec<_>>().join(".");
        let here = || format!("{} line {line}", path.display());
        if let Some(sub) = command.get_subcommands().find(|s| s.get_name() == name.replace('_', "-")) {
            let DeValue::Table(inner) = value.get_ref() else {
                bail!("{}: `{full_key}` is a command; its settings go in a [{full_key}] table", here());
            };
            let mut deeper = commands.to_vec();
            deeper.push(sub.get_name().to_string());
            collect(path, at, sub, &deeper, inner, out)?;
            continue;
        }
        let flag = name.replace('_', "-");
        let Some(arg) = settings(command).find(|a| a.get_long() == Some(flag.as_str())) else {
            let known: Vec<String> =
                settings(command).filter_map(|a| a.get_long()).map(|l| l.replace('-', "_")).collect();
            bail!(
                "{}: unknown setting `{full_key}` (settings here: {})",
                here(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        };
        let values = match value.get_ref() {
            DeValue::Array(items) => {
                items.iter().map(|v| scalar(v.get_ref())).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    anyhow!("{}: `{full_key}` is a list of plain values (strings, numbers, true/false)", here())
                })?
            }
            other => vec![scalar(other).ok_or_else(|| anyhow!("{}: `{full_key}` takes a plain value", here()))?],
        };
        check(command, arg, &values).map_err(|e| anyhow!("{}: `{full_key}`: {e}", here()))?;
        out.push(Entry { commands: commands.to_vec(), id: arg.get_id().to_string(), values, line });
    }
    Ok(())
}

/// A command's settings: its arguments with an environment variable, but for `--config`.
fn settings(command: &Command) -> impl Iterator<Item = &clap::Arg> {
    command.get_arguments().filter(|a| a.get_env().is_some() && a.get_env() != Some(CONFIG_ENV.as_ref()))
}

fn scalar(value: &DeValue<'_>) -> Option<String> {
    Some(match value {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.as_str().replace('_', ""),
        DeValue::Float(f) => f.as_str().replace('_', ""),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(_) | DeValue::Table(_) => return None,
    })
}

/// Parses `values` with the argument's own parser, alone, so its error names only it.
fn check(command: &Command, arg: &clap::Arg, values: &[String]) -> Result<()> {
    let Some(long) = arg.get_long() else { return Ok(()) };
    // Just the flag and its parser: what it requires or conflicts with is not here to see.
    let flag = clap::Arg::new(arg.get_id().clone())
        .long(long.to_string())
        .value_parser(arg.get_value_parser().clone())
        .action(arg.get_action().clone())
        .value_names(arg.get_value_names().unwrap_or_default().to_vec());
    let alone = Command::new(command.get_name().to_string()).no_binary_name(true).disable_help_flag(true).arg(flag);
    let args = values.iter().flat_map(|v| [format!("--{long}"), v.clone()]);
    match alone.try_get_matches_from(args) {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid value");
            bail!("{}", first.trim_start_matches("error: "))
        }
    }
}

fn with_default(command: Command, commands: &[String], id: &str, values: &[String]) -> Command {
    match commands.split_first() {
        None => command.mut_arg(id, |a| a.default_values(values.iter().cloned())),
        Some((sub, rest)) => {
            let rest = rest.to_vec();
            command.mut_subcommand(sub, |s| with_default(s, &rest, id, values))
        }
    }
}

impl Layers {
    /// Parses a binary's command line without a config file (tests, embedding).
    pub fn without_file<C: CommandFactory>(args: Vec<OsString>) -> Result<Self> {
        let command = C::command();
        let matches = command.clone().try_get_matches_from(args)?;
        Ok(Self {
            file: ConfigFile::default(),
            default_file: None,
            system_file: None,
            default_home: None,
            command,
            matches,
        })
    }

    /// Every setting of the binary, with its effective value and source. Settings of other
    /// subcommands than the one being run come from the environment, the file or the default.
    pub fn effective(&self) -> Vec<Effective> {
        let mut out = Vec::new();
        self.walk(&self.command, &[], &mut out);
        out
    }

    fn walk(&self, command: &Command, commands: &[String], out: &mut Vec<Effective>) {
        for arg in settings(command) {
            let id = arg.get_id().as_str();
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
            let flag = arg.get_long().map(|l| format!("--{l}")).unwrap_or_default();
            let key = commands
                .iter()
                .map(String::as_str)
                .chain([flag.trim_start_matches("--")])
                .collect::<Vec<_>>()
                .join(".")
                .replace('-', "_");
            let from_file = self.file.entries.iter().find(|e| e.commands == commands && e.id == id);
            let file_source = |e: &Entry| {
                format!("file {} line {}", self.file.path.as_deref().unwrap_or(Path::new("?")).display(), e.line)
            };
            let joined = |v: Vec<String>| if v.is_empty() { None } else { Some(v.join(", ")) };
            let parsed = if commands.is_empty() { self.matches_source(id) } else { None };
            let parsed = parsed.filter(|(values, _)| !values.is_empty());
            let (value, source) = match parsed {
                Some((values, ValueSource::CommandLine)) => (joined(values), "flag".to_string()),
                Some((values, ValueSource::EnvVariable)) => (joined(values), "env".to_string()),
                Some((values, _)) => {
                    (joined(values), from_file.map(file_source).unwrap_or_else(|| "default".to_string()))
                }
                None => match std::env::var(&env).ok().filter(|v| !v.is_empty()) {
                    Some(v) => (Some(v), "env".to_string()),
                    None => match from_file {
                        Some(e) => (joined(e.values.clone()), file_source(e)),
                        None => {
                            let mut defaults: Vec<String> =
                                arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
                            if env == crate::home::HOME_ENV
                                && let Some(home) = &self.default_home
                            {
                                defaults.push(home.display().to_string());
                            }
                            let source = if defaults.is_empty() { "unset" } else { "default" };
                            (joined(defaults), source.to_string())
                        }
                    },
                },
            };
            out.push(Effective { key, flag, env, value, source });
        }
        for sub in command.get_subcommands() {
            let mut deeper = commands.to_vec();
            deeper.push(sub.get_name().to_string());
            self.walk(sub, &deeper, out);
        }
    }

    fn matches_source(&self, id: &str) -> Option<(Vec<String>, ValueSource)> {
        let source = self.matches.value_source(id)?;
        let values = self.matches.get_raw(id)?.map(|v| v.to_string_lossy().into_owned()).collect();
        Some((values, source))
    }

    /// `config show` as text: the file, then one line a setting.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match (&self.file.path, &self.default_file) {
            (Some(p), _) => writeln!(out, "config file: {}", p.display()),
            (None, Some(p)) => writeln!(
                out,
                "config file: none ({} and {} do not exist)",
                p.display(),
                self.system_file.as_deref().unwrap_or(Path::new("-")).display()
            ),
            (None, None) => writeln!(out, "config file: none"),
        }
        .ok();
        let rows = self.effective();
        let width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0);
        let value_width = rows.iter().map(|r| r.value.as_deref().unwrap_or("-").len()).max().unwrap_or(0).min(40);
        for r in rows {
            let value = r.value.as_deref().unwrap_or("-");
            writeln!(out, "{:width$}  {value:value_width$}  {}  ({}, {})", r.key, r.source, r.flag, r.env).ok();
        }
        out
    }
}
