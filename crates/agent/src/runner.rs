//! Runs one approved command and streams its output into the session: the IO around the
//! [`Batcher`], which decides when output is written.
//!
//! Each write is one Automerge change of one or more chunk records (each at most `MAX_CHUNK`),
//! durable in the agent's store before it is sent anywhere (see `caisey_peer::node`); while the
//! store cannot be written, the write waits, and so does the command, on its pipes. The output
//! left when the command ends goes in the same change as its end, so a quick command's result
//! is one change.

#[cfg(target_os = "linux")]
use std::os::fd::AsFd as _;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use caisey_doc::id::DocId;
use caisey_doc::probe::ProbeScanner;
use caisey_doc::schedule::ProbePattern;
use caisey_doc::session::{ChunkHash, CommandRequest, End, EndStatus, OutputChunk, OutputRef, SessionWriter, Stream};
use caisey_peer::node::Node;
use caisey_peer::now_ms;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::batching::{Batch, Batcher, MAX_BATCH};
use crate::process;

/// After the process exits, how long to wait for its pipes to close (a background child may
/// hold them open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Runs `req` (already approved and recorded as started) to the end, writing output and the end
/// record into `session`. The values its standard output yields (`caisey-probe` lines, and
/// `probes` for a scheduled check) go in the end record.
/// `stop`, when notified, stops it at once (its machine's user revoked the consent it ran under).
pub async fn run(
    node: Node,
    session: DocId,
    req: CommandRequest,
    probes: &[ProbePattern],
    stop: Option<Arc<Notify>>,
) -> Result<()> {
    let mut scanner = ProbeScanner::new(probes);
    let timeout = Duration::from_millis(req.command.timeout_ms);
    let (program, args) = process::supervised_command(req.command.shell, &req.command.script, timeout);
    let mut cmd = Command::new(&program);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // Its own process group: a timeout stops everything the command started.
    #[cfg(unix)]
    cmd.process_group(0);
    if let Some(dir) = &req.command.cwd {
        cmd.current_dir(dir);
    }
    cmd.envs(&req.command.env);
    let mut seq = 0u64;
    let started = tokio::time::Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let message = format!("could not start {program}: {e}");
            let end = End {
                probes: Vec::new(),
                request: req.id,
                session,
                status: EndStatus::FailedToStart,
                exit_code: None,
                ended_at: now_ms(),
                chunks: 0,
                message: Some(message),
            };
            return write_end(&node, &mut Batch::default(), &mut seq, end).await;
        }
    };
    // Where to find what is left of it if this agent dies meanwhile (killed at restart).
    let running = child.id().map(process::Running::of);
    if let Some(r) = &running {
        node.set_setting(&running_key(&req.id), serde_json::to_vec(r)?).await?;
    }
    // Pieces are at most PIPE_BYTES: at most MAX_BATCH waits here (then the pipes, then the
    // command, wait for us).
    let (tx, mut rx) = mpsc::channel::<(Stream, Vec<u8>)>(MAX_BATCH / PIPE_BYTES);
    // Bigger pipes: a command writing fast is woken (and we read) per MiB, not per 64 KiB.
    #[cfg(target_os = "linux")]
    for fd in [child.stdout.as_ref().map(|p| p.as_fd()), child.stderr.as_ref().map(|p| p.as_fd())].into_iter().flatten()
    {
        let _ = rustix::pipe::fcntl_setpipe_size(fd, PIPE_BYTES);
    }
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, Stream::Stdout, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, Stream::Stderr, tx.clone()));
    }
    drop(tx);

    let deadline = started + Duration::from_millis(req.command.timeout_ms);
    // When output is written is the batcher's to decide; this loop only sleeps until it says.
    let mut batcher = Batcher::default();
    let mut status = None;
    let mut pipes_open = true;
    let mut drain_until = None;
    loop {
        let wake = batcher.poll_timeout().map(|t| started + t);
        tokio::select! {
            piece = rx.recv(), if pipes_open => match piece {
                Some(first) => {
                    // Take whatever else is already waiting, so a fast command's changes grow
                    // while the previous one commits instead of queueing up.
                    let mut read = first.1.len();
                    let mut pieces = vec![first];
                    while batcher.has_room_after(read) {
                        match rx.try_recv() {
                            Ok(piece) => {
                                read += piece.1.len();
                                pieces.push(piece);
                            }
                            Err(_) => break,
                        }
                    }
                    for (_, data) in pieces.iter().filter(|(stream, _)| *stream == Stream::Stdout) {
                        scanner.feed(data);
                    }
                    if batcher.arrived(started.elapsed(), pieces) {
                        flush(&node, session, &mut batcher.take(started.elapsed()), req.id, &mut seq).await?;
                    }
                }
                None => pipes_open = false,
            },
            _ = tokio::time::sleep_until(wake.unwrap_or(deadline)), if wake.is_some() => {
                if batcher.handle_timeout(started.elapsed(), !pipes_open && status.is_none()) {
                    flush(&node, session, &mut batcher.take(started.elapsed()), req.id, &mut seq).await?;
                }
            },
            exit = child.wait(), if status.is_none() => {
                status = Some(exit.map(|s| (EndStatus::Exited, s.code(), None)).unwrap_or_else(|e| (EndStatus::Exited, None, Some(e.to_string()))));
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            _ = tokio::time::sleep_until(deadline), if status.is_none() => {
                if let Some(r) = &running {
                    r.kill();
                }
                let _ = child.kill().await;
                let secs = req.command.timeout_ms / 1000;
                status = Some((EndStatus::TimedOut, None, Some(format!("killed after the {secs} s timeout"))));
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            _ = async { match &stop { Some(s) => s.notified().await, None => std::future::pending().await } }, if status.is_none() => {
                if let Some(r) = &running {
                    r.kill();
                }
                let _ = child.kill().await;
                let why = "stopped when this machine's user revoked the consent it ran under";
                status = Some((EndStatus::Stopped, None, Some(why.into())));
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            // Exited, but something it started still holds its pipes: stop waiting for them.
            _ = tokio::time::sleep_until(drain_until.unwrap_or(deadline)), if drain_until.is_some() => break,
        }
        if status.is_some() && !pipes_open {
            break;
        }
    }
    let (status, code, message) = status.unwrap_or((EndStatus::Exited, None, None));
    // The files it was approved to bring back, before its end: a run that ended has them all.
    // (None once the user withdrew the consent it ran under.)
    if let Some(collect) = req.command.collect.as_ref().filter(|_| status != EndStatus::Stopped) {
        let brought = crate::collect::run(&node, session, req.id, collect).await?;
        tracing::debug!(request = %req.id.short(), brought, "files collected");
    }
    tracing::debug!(request = %req.id.short(), chunks = seq, took = ?started.elapsed(), "command finished");
    // Whatever output is left goes in the same change as the end.
    let end = End {
        request: req.id,
        session,
        status,
        exit_code: code,
        ended_at: now_ms(),
        chunks: 0,
        message,
        probes: scanner.finish(),
    };
    write_end(&node, &mut batcher.take(started.elapsed()), &mut seq, end).await?;
    node.forget_setting(&running_key(&req.id)).await
}

/// The local record of a command's process group while it runs ([`process::Running`]).
pub fn running_key(request: &caisey_doc::id::Id128) -> String {
    format!("running/{request}")
}

async fn pump(mut reader: impl AsyncReadExt + Unpin, stream: Stream, tx: mpsc::Sender<(Stream, Vec<u8>)>) {
    let mut buf = vec![0u8; PIPE_BYTES];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The pipe size asked for (Linux allows up to 1 MiB by default), and the read size.
const PIPE_BYTES: usize = 1024 * 1024;

async fn flush(
    node: &Node,
    session: DocId,
    batch: &mut Batch,
    request: caisey_doc::id::Id128,
    seq: &mut u64,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let (held, refs) = prepare(batch, request, seq);
    let signer = node.signer().clone();
    node.append_output(session, held, move |doc| SessionWriter::append_output(doc, &signer, &refs)).await??;
    Ok(())
}

/// Cuts what `batch` holds into chunks: their bytes with their hashes (for the store) and
/// their references (for the document), hashing each chunk once.
fn prepare(
    batch: &mut Batch,
    request: caisey_doc::id::Id128,
    seq: &mut u64,
) -> (Vec<(ChunkHash, Vec<u8>)>, Vec<OutputRef>) {
    let chunks = batch.take_chunks(request, seq);
    let refs: Vec<OutputRef> = chunks.iter().map(OutputChunk::reference).collect();
    let held = refs.iter().zip(chunks).map(|(r, c)| (r.hash, c.data)).collect();
    (held, refs)
}

/// Writes the output left in `batch` and `end` as one change; `end.chunks` is set here, to the
/// run's total chunk count.
async fn write_end(node: &Node, batch: &mut Batch, seq: &mut u64, mut end: End) -> Result<()> {
    let (held, refs) = prepare(batch, end.request, seq);
    end.chunks = *seq;
    if let Some(m) = &end.message {
        warn!(request = %end.request.short(), "{m}");
    }
    let signer = node.signer().clone();
    node.append_output(end.session, held, move |doc| SessionWriter::end_with_output(doc, &signer, &refs, &end))
        .await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisey_doc::id::Id128;
    use caisey_doc::session::{CommandSpec, SessionInfo, SessionView, Shell};
    use caisey_peer::home::Home;
    use caisey_peer::node::NodeOptions;
    use caisey_peer::wire::DocKind;

    /// A node of its own with a session holding one request for `script`; returns the
    /// node, the request and how many changes the session has so far.
    async fn node_with_request(dir: &std::path::Path, script: &str) -> (Node, CommandRequest, usize) {
        let home = Home::new(Some(dir.to_path_buf()), "test").unwrap();
        let node = Node::start(NodeOptions { home, listen: "127.0.0.1:0".parse().unwrap() }).await.unwrap();
        let session = Id128([7; 16]);
        let info = SessionInfo { id: session, name: "t".into(), labels: vec![], created_at: 0, org_key: node.id() };
        let mut doc = SessionWriter::create(node.signer(), &info).unwrap();
        let req = CommandRequest {
            id: Id128([8; 16]),
            session,
            target: node.id(),
            command: CommandSpec {
                shell: Shell::Sh,
                script: script.into(),
                cwd: None,
                env: Default::default(),
                timeout_ms: 60_000,
                collect: None,
            },
            description: Default::default(),
            requested_at: 0,
            expires_at: u64::MAX,
        };
        SessionWriter::request(&mut doc, node.signer(), &req).unwrap();
        let before = doc.get_changes(&[]).len();
        node.create(session, DocKind::Session, doc).await.unwrap();
        (node, req, before)
    }

    /// Changes made since `before`, and the exit code and output the session records for `req`.
    async fn after_run(node: &Node, req: &CommandRequest, before: usize) -> (usize, Option<i32>, String) {
        let r = req.clone();
        node.read_with_output(req.session, move |d, stored| {
            use caisey_doc::automerge::{ROOT, ReadDoc};
            use caisey_doc::record::{RecordKind, verify_kind};
            let end = d
                .get(ROOT, "ends")
                .ok()
                .flatten()
                .and_then(|(_, ends)| d.get(&ends, r.id.to_hex()).ok().flatten())
                .and_then(|(v, _)| v.into_bytes().ok())
                .and_then(|b| verify_kind(&b, RecordKind::End).ok()?.json::<End>().ok());
            let out: Vec<u8> = SessionView::read_output_from(d, &r, 0, usize::MAX, stored)
                .0
                .into_iter()
                .flat_map(|c| c.data)
                .collect();
            let changes = d.get_changes(&[]).len() - before;
            (changes, end.and_then(|e| e.exit_code), String::from_utf8_lossy(&out).into_owned())
        })
        .await
        .unwrap()
        .unwrap()
    }

    #[tokio::test]
    async fn the_output_left_at_the_end_goes_in_the_same_change_as_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (node, req, before) = node_with_request(dir.path(), "true").await;
        let mut batch = Batch::default();
        batch.push(Stream::Stdout, b"ok\n");
        batch.push(Stream::Stderr, b"warning\n");
        let mut seq = 0;
        let end = End {
            probes: Vec::new(),
            request: req.id,
            session: req.session,
            status: EndStatus::Exited,
            exit_code: Some(3),
            ended_at: 1,
            chunks: 0,
            message: None,
        };
        write_end(&node, &mut batch, &mut seq, end).await.unwrap();
        assert_eq!(seq, 2);
        assert_eq!(after_run(&node, &req, before).await, (1, Some(3), "ok\nwarning\n".to_string()));
        node.shutdown().await;
    }

    #[tokio::test]
    async fn a_real_run_records_all_output_in_order_and_its_exit_code() {
        // A quick command usually makes one change (output waits SETTLE for the end); output
        // that comes long before the end is written when it comes. How the first case splits
        // depends on scheduling, so only the bounds are asserted.
        let cases = [
            ("echo ok; exit 3", 1..=2, Some(3), "ok\n"),
            ("echo first; sleep 0.3; echo second", 2..=3, Some(0), "first\nsecond\n"),
        ];
        for (script, changes_between, exit_code, output) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (node, req, before) = node_with_request(dir.path(), script).await;
            run(node.clone(), req.session, req.clone(), &[], None).await.unwrap();
            let (changes, code, out) = after_run(&node, &req, before).await;
            assert!(changes_between.contains(&changes), "{script}: {changes} changes");
            assert_eq!((code, out.as_str()), (exit_code, output), "{script}");
            node.shutdown().await;
        }
    }
}
