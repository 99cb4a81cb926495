//! The local socket itself, the one platform-specific piece of [`crate::local`]: a Unix socket
//! in the home, mode 0600 (and the home is 0700), so only its owner can connect. A Windows named
//! pipe (tokio's `net::windows::named_pipe`) slots in here behind the same functions.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[cfg(unix)]
pub type Stream = tokio::net::UnixStream;

/// A bound socket, accepting local clients.
#[derive(Debug)]
pub struct Listener {
    #[cfg(unix)]
    inner: tokio::net::UnixListener,
    path: PathBuf,
    /// Which file is ours: a node that starts after this one stopped may have bound its own.
    inode: u64,
}

/// Binds the socket at `path`. A file left there by a process that died is replaced: only the
/// process holding the home's store calls this, so nobody else can be listening there. The
/// socket is made in a private directory, restricted, then moved into place, so it is never
/// reachable with looser permissions.
#[cfg(unix)]
pub fn bind(path: &Path) -> Result<Listener> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = path.parent().context("the socket needs a directory")?;
    let private = dir.join(format!(".socket-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir(&private).with_context(|| format!("creating {}", private.display()))?;
    let made = bind_at(&private.join("s"));
    let result = made.and_then(|inner| {
        std::fs::set_permissions(private.join("s"), std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(private.join("s"), path)
            .with_context(|| format!("placing the socket at {}", path.display()))?;
        let inode = std::fs::metadata(path)?.ino();
        Ok(Listener { inner, path: path.to_path_buf(), inode })
    });
    let _ = std::fs::remove_dir_all(&private);
    result
}

#[cfg(unix)]
fn bind_at(at: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = at.parent() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    tokio::net::UnixListener::bind(at).with_context(|| format!("listening on {}", at.display()))
}

impl Listener {
    /// Lets the members of group `gid` connect too (the socket becomes 0660, its directory
    /// 0710: they can reach the socket, not list or read the rest of the home).
    #[cfg(unix)]
    pub fn share_with_group(&self, gid: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.path.parent().context("the socket needs a directory")?;
        for (path, mode) in [(dir, 0o710), (self.path.as_path(), 0o660)] {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting permissions on {}", path.display()))?;
        }
        Ok(())
    }

    #[cfg(unix)]
    pub async fn accept(&self) -> Result<Stream> {
        Ok(self.inner.accept().await?.0)
    }

    /// What removes this listener's socket file later, once the listener itself is gone.
    pub fn claim(&self) -> Claim {
        Claim { path: self.path.clone(), inode: self.inode }
    }
}

/// The socket file a listener made.
#[derive(Debug, Clone)]
pub struct Claim {
    path: PathBuf,
    inode: u64,
}

impl Claim {
    /// Removes the socket file, if it is still the one the listener made.
    #[cfg(unix)]
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The id of the group called `name`, as the system's user database has it (`/etc/group`,
/// LDAP, …), through `getent`.
#[cfg(unix)]
pub fn group_id(name: &str) -> Result<u32> {
    let out = std::process::Command::new("getent").args(["group", name]).output().context("running getent")?;
    let line = String::from_utf8_lossy(&out.stdout);
    line.split(':').nth(2).and_then(|g| g.trim().parse().ok()).with_context(|| format!("no group called {name:?}"))
}

#[cfg(unix)]
pub async fn connect(path: &Path) -> std::io::Result<Stream> {
    tokio::net::UnixStream::connect(path).await
}
