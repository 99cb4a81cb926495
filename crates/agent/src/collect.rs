//! Bringing back the files a command left (`caisey_doc::artifact`): after the command ends,
//! each approved path is read and stored as checked chunks, and one signed record per file
//! says what it was — or why it was not taken.
//!
//! Only what the endpoint user approved is read: the exact paths, within the size limit. A
//! path is taken as it stands, never through a symlink: a symlink (at the path or inside a
//! collected directory) is refused, so is anything that resolves outside the path asked, a
//! device, a pipe or a socket, and a file that changes while it is read (still being written).
//! A refused file leaves no record of bytes, so nobody mistakes part of a file for all of it.
//!
//! The platform part is how a file is opened without following a symlink (`O_NOFOLLOW` on
//! Unix); the rest is the same everywhere.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Result;
use caisey_doc::artifact::{self, Artifact, Collect, MAX_FILES, Outcome, Piece};
use caisey_doc::id::{DocId, Id128};
use caisey_doc::session::{ChunkHash, MAX_CHUNK, chunk_hash};
use caisey_peer::node::Node;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// How many chunks go to the store in one durable write.
const CHUNKS_PER_WRITE: usize = 8;
/// How deep a collected directory is walked.
const MAX_DEPTH: usize = 8;

/// A file found under an approved path, or why it is not taken.
struct Found {
    path: PathBuf,
    name: String,
    /// Where it must stay: the approved path, resolved.
    within: PathBuf,
    refused: Option<String>,
}

/// What the reading thread tells the writer.
enum Reading {
    /// Chunks of the file being read, to store.
    Chunks(Vec<(ChunkHash, Vec<u8>)>),
    /// A file is done: its record.
    Done(Artifact),
}

/// Collects what `collect` names for `request` into `session`: reads on a blocking thread,
/// stores chunks and records as it goes. Returns how many files were brought back.
pub async fn run(node: &Node, session: DocId, request: Id128, collect: &Collect) -> Result<usize> {
    let (tx, mut rx) = mpsc::channel::<Reading>(2);
    let collect = collect.clone();
    let reader = tokio::task::spawn_blocking(move || read_all(&collect, session, request, &tx));
    let signer = node.signer().clone();
    let mut brought = 0;
    while let Some(msg) = rx.recv().await {
        match msg {
            Reading::Chunks(chunks) => node.append_output(session, chunks, |_| ()).await?,
            Reading::Done(a) => {
                if matches!(a.outcome, Outcome::Collected { .. }) {
                    brought += 1;
                } else if let Outcome::Refused { why } = &a.outcome {
                    tracing::warn!(request = %request.short(), path = %a.path, "not collected: {why}");
                }
                let signer = signer.clone();
                node.change(session, move |doc| artifact::put(doc, &signer, &a)).await??;
            }
        }
    }
    reader.await?;
    Ok(brought)
}

/// Reads every approved file in turn, sending its chunks and then its record.
fn read_all(collect: &Collect, session: DocId, request: Id128, tx: &mpsc::Sender<Reading>) {
    let mut budget = collect.limit;
    let mut index = 0u32;
    let mut found = Vec::new();
    for path in &collect.paths {
        find(path, &mut found);
    }
    for f in found.into_iter().take(MAX_FILES) {
        let outcome = match f.refused {
            Some(why) => Outcome::Refused { why },
            None => match read_one(&f, &mut budget, tx) {
                Ok(outcome) => outcome,
                Err(why) => Outcome::Refused { why },
            },
        };
        let path = f.path.display().to_string();
        let a = Artifact { request, session, index, path, name: f.name, outcome };
        index += 1;
        if tx.blocking_send(Reading::Done(a)).is_err() {
            return;
        }
    }
}

/// The files an approved path stands for: itself, or the files under it.
fn find(path: &str, found: &mut Vec<Found>) {
    let refused = |why: String| Found {
        path: PathBuf::from(path),
        name: file_name(Path::new(path)),
        within: PathBuf::new(),
        refused: Some(why),
    };
    if let Err(why) = artifact::check_path(path) {
        found.push(refused(why));
        return;
    }
    let p = Path::new(path);
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) => return found.push(refused(format!("not there after the command ran ({e})"))),
    };
    if meta.file_type().is_symlink() {
        let to = std::fs::read_link(p).map(|t| t.display().to_string()).unwrap_or_default();
        return found.push(refused(format!("is a symlink (to {to}); only the file at the path itself is taken")));
    }
    let within = match std::fs::canonicalize(p) {
        Ok(c) => c,
        Err(e) => return found.push(refused(format!("cannot be resolved ({e})"))),
    };
    if meta.is_dir() {
        walk(p, &within, "", 0, found);
    } else {
        found.push(Found { path: p.to_path_buf(), name: file_name(p), within, refused: None });
    }
}

/// The files of directory `dir` (named below the approved path as `prefix/...`).
fn walk(dir: &Path, within: &Path, prefix: &str, depth: usize, found: &mut Vec<Found>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if found.len() >= MAX_FILES {
            return;
        }
        let path = e.path();
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() && depth < MAX_DEPTH {
            walk(&path, within, &format!("{name}/"), depth + 1, found);
            continue;
        }
        let refused = if kind.is_symlink() {
            let to = std::fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default();
            Some(format!("is a symlink (to {to}), which is not followed"))
        } else {
            None
        };
        found.push(Found { path, name, within: within.to_path_buf(), refused });
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// Reads one file into chunks (sent as it goes) within `budget`; its outcome.
fn read_one(f: &Found, budget: &mut u64, tx: &mpsc::Sender<Reading>) -> Result<Outcome, String> {
    let mut file = open_no_follow(&f.path).map_err(|e| format!("cannot be opened without following a link ({e})"))?;
    let before = file.metadata().map_err(|e| e.to_string())?;
    if !before.file_type().is_file() {
        return Err("is a device, pipe or socket, not a file".into());
    }
    // Opened at the path itself; resolved, it must still be where the user approved.
    let resolved = std::fs::canonicalize(&f.path).map_err(|e| e.to_string())?;
    if !resolved.starts_with(&f.within) {
        return Err(format!("resolves to {}, outside the path approved", resolved.display()));
    }
    if before.len() > *budget {
        return Err(format!(
            "is {} bytes, more than the {} bytes left of the limit the user approved",
            before.len(),
            budget
        ));
    }
    let mut whole = Sha256::new();
    let mut pieces = Vec::new();
    let mut batch = Vec::new();
    let mut total = 0u64;
    loop {
        let mut chunk = Vec::with_capacity(MAX_CHUNK.min(before.len() as usize + 1));
        let n = (&mut file).take(MAX_CHUNK as u64).read_to_end(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > before.len() {
            return Err("grew while it was read (a file still being written); not taken".into());
        }
        whole.update(&chunk);
        let hash = chunk_hash(&chunk);
        pieces.push(Piece { hash, len: n as u64 });
        batch.push((hash, chunk));
        if batch.len() >= CHUNKS_PER_WRITE && tx.blocking_send(Reading::Chunks(std::mem::take(&mut batch))).is_err() {
            return Err("the agent is stopping".into());
        }
    }
    let after = file.metadata().map_err(|e| e.to_string())?;
    if total != before.len() || after.len() != before.len() || after.modified().ok() != before.modified().ok() {
        return Err("changed while it was read (a file still being written); not taken".into());
    }
    if !batch.is_empty() && tx.blocking_send(Reading::Chunks(batch)).is_err() {
        return Err("the agent is stopping".into());
    }
    *budget -= total;
    Ok(Outcome::Collected { size: total, sha256: whole.finalize().into(), pieces })
}

#[cfg(unix)]
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not blocking on a fifo: its type is checked once it is open.
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    std::fs::OpenOptions::new().read(true).custom_flags(flags.bits() as i32).open(path)
}

#[cfg(not(unix))]
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    // Symlinks were refused when the path was looked at; Windows opens the path as it is.
    File::open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect_here(paths: &[&Path], limit: u64) -> Vec<(String, Outcome)> {
        let collect = Collect { paths: paths.iter().map(|p| p.display().to_string()).collect(), limit };
        let (tx, mut rx) = mpsc::channel(1024);
        read_all(&collect, Id128([1; 16]), Id128([2; 16]), &tx);
        drop(tx);
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Reading::Done(a) = m {
                out.push((a.name, a.outcome));
            }
        }
        out
    }

    fn refused(o: &Outcome) -> &str {
        match o {
            Outcome::Refused { why } => why,
            Outcome::Collected { .. } => "",
        }
    }

    #[test]
    fn files_come_whole_and_tricks_are_refused_with_why() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("dumps");
        std::fs::create_dir(&d).unwrap();
        let data = vec![7u8; MAX_CHUNK + 10];
        std::fs::write(d.join("app.dmp"), &data).unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), d.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), dir.path().join("toplink")).unwrap();
        let got = collect_here(&[&d, &dir.path().join("toplink"), Path::new("/dev/null"), &d.join("none")], 1 << 30);
        assert_eq!(got.len(), 5, "{got:?}");
        match &got[0] {
            (name, Outcome::Collected { size, sha256, pieces }) => {
                assert_eq!(name, "app.dmp");
                assert_eq!(*size, data.len() as u64);
                assert_eq!(*sha256, <[u8; 32]>::from(Sha256::digest(&data)));
                assert_eq!(pieces.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(refused(&got[1].1).contains("symlink"), "{got:?}");
        assert!(refused(&got[2].1).contains("symlink"), "{got:?}");
        assert!(refused(&got[3].1).contains("device"), "{got:?}");
        assert!(refused(&got[4].1).contains("not there"), "{got:?}");
        // Over the limit: refused, not cut short.
        let got = collect_here(&[&d.join("app.dmp")], 1000);
        assert!(refused(&got[0].1).contains("limit"), "{got:?}");
        let got = collect_here(&[Path::new("/etc/../etc/passwd")], 1000);
        assert!(refused(&got[0].1).contains(".."), "{got:?}");
    }

    #[test]
    fn a_file_still_being_written_is_refused_not_cut_short() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("growing.log");
        std::fs::write(&log, vec![b'x'; 32 * MAX_CHUNK]).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (log, stop) = (log.clone(), stop.clone());
            move || {
                let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    f.write_all(&[b'y'; 4096]).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        let got = collect_here(&[&log], 1 << 32);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        let why = refused(&got[0].1);
        assert!(why.contains("while it was read"), "{got:?}");
    }
}
