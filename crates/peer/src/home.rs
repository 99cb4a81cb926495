//! A node's home directory: its secret key, its store, its local socket, its settings.
//!
//! Several nodes can run on one machine by giving each its own `--home`. The secret key file is
//! created with mode 0600; it is the node's ed25519 identity for iroh and for signing records.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use caisey_doc::record::Signer;

/// The environment variable that sets `--home`.
pub const HOME_ENV: &str = "CAISEY_HOME";
/// The local socket's file name in a home.
pub const SOCKET: &str = "node.sock";

#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// `dir` if given, else the platform data directory for `app` (e.g. `caisey`, `caisey-agent`).
    pub fn new(dir: Option<PathBuf>, app: &str) -> Result<Self> {
        let dir = match dir {
            Some(d) => d,
            None => default_dir(app).context("no --home given and no data directory (set HOME or CAISEY_HOME)")?,
        };
        // Only a directory we create is locked down; an existing one keeps its owner's choice
        // (the key and the socket restrict themselves).
        if !dir.exists() {
            fs::create_dir_all(&dir).with_context(|| format!("creating home directory {}", dir.display()))?;
            restrict(&dir, 0o700)?;
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.join("store.redb")
    }

    /// The socket local clients reach the home's running node on (`crate::local`). Lives in the
    /// home, which only its owner can enter.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    /// Where a node started in the background writes what it logs.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// This node's signing key, created on first use.
    pub fn node_key(&self) -> Result<Signer> {
        load_or_create_key(&self.dir.join("node.key"))
    }

    /// The org key, present only in the home of the technician who ran `caisey init`.
    pub fn org_key(&self) -> Result<Option<Signer>> {
        let path = self.dir.join("org.key");
        if path.exists() { load_or_create_key(&path).map(Some) } else { Ok(None) }
    }

    pub fn create_org_key(&self) -> Result<Signer> {
        load_or_create_key(&self.dir.join("org.key"))
    }
}

/// `app`'s home when none is given: its folder in the platform's per-user data directory
/// (`$XDG_DATA_HOME`, else `~/.local/share`, on Linux).
pub fn default_dir(app: &str) -> Option<PathBuf> {
    directories::BaseDirs::new().map(|dirs| dirs.data_dir().join(app))
}

fn load_or_create_key(path: &Path) -> Result<Signer> {
    if path.exists() {
        let text = fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut secret)
            .with_context(|| format!("key file {} is damaged (expected 64 hex characters)", path.display()))?;
        return Ok(Signer::from_secret(secret));
    }
    let secret: [u8; 32] = rand::random();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating key {}", path.display()))?;
    restrict(path, 0o600)?;
    f.write_all(hex::encode(secret).as_bytes())?;
    f.sync_all()?;
    Ok(Signer::from_secret(secret))
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions on {}", path.display()))
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}
