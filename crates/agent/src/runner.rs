//! Runs one approved command and streams its output into the session.
//!
//! Output is batched: output arriving after a quiet spell is written at once (low latency for a
//! line now and then); otherwise whatever arrived is flushed every `FLUSH_EVERY` or once
//! `FLUSH_BYTES` are waiting, as one Automerge change of one or more chunk records (each at most
//! `MAX_CHUNK`).
//! Stdout and stderr keep their relative order within and across batches. Each flush is durable
//! in the agent's store before it is sent anywhere (see `caisey_peer::node`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use caisey_doc::id::DocId;
use caisey_doc::session::{CommandRequest, End, EndStatus, MAX_CHUNK, OutputChunk, SessionWriter, Shell, Stream};
use caisey_peer::node::Node;
use caisey_peer::now_ms;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::warn;

const FLUSH_EVERY: Duration = Duration::from_millis(50);
const FLUSH_BYTES: usize = 32 * 1024;
/// Output after this long without any is the start of a new burst, and goes out at once.
const QUIET: Duration = Duration::from_millis(10);
/// After the process exits, how long to wait for its pipes to close (a background child may
/// hold them open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The program and arguments that run `script` in `shell`.
pub fn shell_command(shell: Shell, script: &str) -> (String, Vec<String>) {
    match shell {
        Shell::Sh => ("sh".into(), vec!["-c".into(), script.into()]),
        Shell::Bash => ("bash".into(), vec!["-c".into(), script.into()]),
        Shell::Pwsh => {
            ("pwsh".into(), vec!["-NoProfile".into(), "-NonInteractive".into(), "-Command".into(), script.into()])
        }
        Shell::Cmd => ("cmd".into(), vec!["/C".into(), script.into()]),
    }
}

/// Ordered output waiting to be written.
#[derive(Default)]
struct Batch {
    segments: Vec<(Stream, Vec<u8>)>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, stream: Stream, data: &[u8]) {
        self.bytes += data.len();
        match self.segments.last_mut() {
            Some((s, buf)) if *s == stream => buf.extend_from_slice(data),
            _ => self.segments.push((stream, data.to_vec())),
        }
    }

    fn take_chunks(&mut self, request: caisey_doc::id::Id128, seq: &mut u64) -> Vec<OutputChunk> {
        let mut out = Vec::new();
        for (stream, data) in self.segments.drain(..) {
            for piece in data.chunks(MAX_CHUNK) {
                out.push(OutputChunk { request, seq: *seq, stream, data: piece.to_vec() });
                *seq += 1;
            }
        }
        self.bytes = 0;
        out
    }
}

/// Runs `req` (already approved and recorded as started) to the end, writing output and the end
/// record into `session`.
pub async fn run(node: Node, session: DocId, req: CommandRequest) -> Result<()> {
    let (program, args) = shell_command(req.command.shell, &req.command.script);
    let mut cmd = Command::new(&program);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
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
            return write_end(&node, session, &req, EndStatus::FailedToStart, None, 0, Some(message)).await;
        }
    };
    let (tx, mut rx) = mpsc::channel::<(Stream, Vec<u8>)>(64);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, Stream::Stdout, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, Stream::Stderr, tx.clone()));
    }
    drop(tx);

    let deadline = started + Duration::from_millis(req.command.timeout_ms);
    let mut batch = Batch::default();
    let mut ticker = tokio::time::interval(FLUSH_EVERY);
    let mut last_flush = tokio::time::Instant::now() - FLUSH_EVERY;
    let mut last_data = tokio::time::Instant::now() - QUIET;
    let mut status = None;
    let mut pipes_open = true;
    let mut drain_until = None;
    loop {
        tokio::select! {
            piece = rx.recv(), if pipes_open => match piece {
                Some((stream, data)) => {
                    let new_burst = last_data.elapsed() >= QUIET;
                    last_data = tokio::time::Instant::now();
                    batch.push(stream, &data);
                    // Take whatever else is already waiting, so a fast command's changes grow
                    // while the previous one commits instead of queueing up.
                    while batch.bytes < MAX_BATCH {
                        match rx.try_recv() {
                            Ok((stream, data)) => batch.push(stream, &data),
                            Err(_) => break,
                        }
                    }
                    // The first output after a quiet spell goes out at once; a chatty command is
                    // batched to one change per FLUSH_EVERY (or per FLUSH_BYTES).
                    if new_burst || batch.bytes >= FLUSH_BYTES || last_flush.elapsed() >= FLUSH_EVERY {
                        flush(&node, session, &mut batch, req.id, &mut seq).await?;
                        last_flush = tokio::time::Instant::now();
                    }
                }
                None => pipes_open = false,
            },
            exit = child.wait(), if status.is_none() => {
                status = Some(exit.map(|s| (EndStatus::Exited, s.code(), None)).unwrap_or_else(|e| (EndStatus::Exited, None, Some(e.to_string()))));
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            _ = tokio::time::sleep_until(deadline), if status.is_none() => {
                let _ = child.kill().await;
                let secs = req.command.timeout_ms / 1000;
                status = Some((EndStatus::TimedOut, None, Some(format!("killed after the {secs} s timeout"))));
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            _ = ticker.tick() => {
                if !batch.segments.is_empty() {
                    flush(&node, session, &mut batch, req.id, &mut seq).await?;
                    last_flush = tokio::time::Instant::now();
                }
                if drain_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    break;
                }
            },
        }
        if status.is_some() && !pipes_open {
            break;
        }
    }
    flush(&node, session, &mut batch, req.id, &mut seq).await?;
    let (status, code, message) = status.unwrap_or((EndStatus::Exited, None, None));
    tracing::debug!(request = %req.id.short(), chunks = seq, took = ?started.elapsed(), "command finished");
    write_end(&node, session, &req, status, code, seq, message).await
}

async fn pump(mut reader: impl AsyncReadExt + Unpin, stream: Stream, tx: mpsc::Sender<(Stream, Vec<u8>)>) {
    let mut buf = vec![0u8; 64 * 1024];
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

/// At most this much output goes into one change (a command writing faster than changes commit
/// gets bigger changes, not a growing backlog).
const MAX_BATCH: usize = 4 * 1024 * 1024;

async fn flush(
    node: &Node,
    session: DocId,
    batch: &mut Batch,
    request: caisey_doc::id::Id128,
    seq: &mut u64,
) -> Result<()> {
    if batch.segments.is_empty() {
        return Ok(());
    }
    let chunks = batch.take_chunks(request, seq);
    let signer = node.signer().clone();
    let refs: Vec<_> = chunks.iter().map(OutputChunk::reference).collect();
    let held = refs.iter().zip(chunks).map(|(r, c)| (r.hash, c.data)).collect();
    node.append_output(session, held, move |doc| SessionWriter::append_output(doc, &signer, &refs)).await??;
    Ok(())
}

async fn write_end(
    node: &Node,
    session: DocId,
    req: &CommandRequest,
    status: EndStatus,
    exit_code: Option<i32>,
    chunks: u64,
    message: Option<String>,
) -> Result<()> {
    if let Some(m) = &message {
        warn!(request = %req.id.short(), "{m}");
    }
    let end = End { request: req.id, session, status, exit_code, ended_at: now_ms(), chunks, message };
    let signer = node.signer().clone();
    node.change(session, move |doc| SessionWriter::end(doc, &signer, &end)).await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisey_doc::id::Id128;

    #[test]
    fn batches_keep_stream_order_and_split_large_writes() {
        let mut b = Batch::default();
        b.push(Stream::Stdout, b"a");
        b.push(Stream::Stdout, b"b");
        b.push(Stream::Stderr, b"c");
        b.push(Stream::Stdout, &vec![b'x'; MAX_CHUNK + 1]);
        let mut seq = 0;
        let chunks = b.take_chunks(Id128([0; 16]), &mut seq);
        let shape: Vec<(Stream, usize)> = chunks.iter().map(|c| (c.stream, c.data.len())).collect();
        assert_eq!(
            shape,
            vec![(Stream::Stdout, 2), (Stream::Stderr, 1), (Stream::Stdout, MAX_CHUNK), (Stream::Stdout, 1)]
        );
        assert_eq!(seq, 4);
        assert_eq!(b.bytes, 0);
    }
}
