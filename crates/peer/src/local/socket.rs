//! The local socket itself, the one platform-specific piece of [`crate::local`]: a Unix socket
//! in the home, mode 0600 (and the home is 0700), so only its owner can connect. A Windows named
//! pipe (tokio's `net::windows::named_pipe`) slots in here behind the same three functions.

use std::path::Path;

use anyhow::{Context, Result};

#[cfg(unix)]
pub type Stream = tokio::net::UnixStream;

/// A bound socket, accepting local clients.
#[derive(Debug)]
pub struct Listener {
    #[cfg(unix)]
    inner: tokio::net::UnixListener,
}

/// Binds the socket at `path`. A file left there by a process that died is removed first: only
/// the process holding the home's store calls this, so nobody else can be listening there.
#[cfg(unix)]
pub fn bind(path: &Path) -> Result<Listener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let inner = tokio::net::UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(Listener { inner })
}

impl Listener {
    #[cfg(unix)]
    pub async fn accept(&self) -> Result<Stream> {
        Ok(self.inner.accept().await?.0)
    }
}

#[cfg(unix)]
pub async fn connect(path: &Path) -> std::io::Result<Stream> {
    tokio::net::UnixStream::connect(path).await
}
