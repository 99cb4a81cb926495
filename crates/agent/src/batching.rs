//! When a running command's output is written: a sans-IO state machine the runner drives with
//! the time since the command started, and asks when to wake next ([`Batcher::poll_timeout`]).
//!
//! - Output after a quiet spell (`QUIET`) is the start of a burst: written almost at once (low
//!   latency for a line now and then), after `SETTLE`, in case the command is about to end —
//!   then its output and its end travel as one change (one sync round per hop instead of two),
//!   which is most of what a quick command like `hostname` makes.
//! - A chatty command is written once per `FLUSH_EVERY`, or as soon as `FLUSH_BYTES` wait.
//! - A command whose pipes closed gets `EXIT_GRACE` to exit before what was read is written on
//!   its own.
//!
//! Stdout and stderr keep their relative order within and across batches.

use std::time::Duration;

use caisey_doc::id::Id128;
use caisey_doc::session::{MAX_CHUNK, OutputChunk, Stream};

pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// At most this much output goes into one change (a command writing faster than changes commit
/// gets bigger changes, not a growing backlog).
pub const MAX_BATCH: usize = 4 * 1024 * 1024;
pub const FLUSH_BYTES: usize = MAX_BATCH;
/// Output after this long without any is the start of a new burst.
pub const QUIET: Duration = Duration::from_millis(10);
/// How long a new burst waits, in case the command is about to finish.
pub const SETTLE: Duration = Duration::from_millis(2);
/// A command whose pipes have closed gets this much longer to exit before the output already
/// read is written on its own.
pub const EXIT_GRACE: Duration = Duration::from_millis(20);

/// Ordered output waiting to be written.
#[derive(Debug, Default)]
pub struct Batch {
    segments: Vec<(Stream, Vec<u8>)>,
    bytes: usize,
}

impl Batch {
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        self.bytes += data.len();
        match self.segments.last_mut() {
            Some((s, buf)) if *s == stream => buf.extend_from_slice(data),
            _ => self.segments.push((stream, data.to_vec())),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Cuts it into chunks of at most `MAX_CHUNK`, numbered on from `seq`.
    pub fn take_chunks(&mut self, request: Id128, seq: &mut u64) -> Vec<OutputChunk> {
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

/// Decides when the output waiting is written.
#[derive(Debug, Default)]
pub struct Batcher {
    batch: Batch,
    last_flush: Option<Duration>,
    last_data: Option<Duration>,
    /// When the output waiting is due (a new burst after `SETTLE`, or the exit grace).
    due: Option<Duration>,
    exit_grace_given: bool,
}

impl Batcher {
    /// Whether `more` bytes read besides what waits still leave room for more in this batch.
    pub fn has_room_after(&self, more: usize) -> bool {
        self.batch.bytes + more < MAX_BATCH
    }

    /// Output read at `now` (the pieces read together); true when it is to be written now.
    pub fn arrived(&mut self, now: Duration, pieces: impl IntoIterator<Item = (Stream, Vec<u8>)>) -> bool {
        let new_burst = self.last_data.is_none_or(|t| now.saturating_sub(t) >= QUIET);
        self.last_data = Some(now);
        for (stream, data) in pieces {
            self.batch.push(stream, &data);
        }
        let chatty = !new_burst && self.last_flush.is_none_or(|t| now.saturating_sub(t) >= FLUSH_EVERY);
        if self.batch.bytes >= FLUSH_BYTES || chatty {
            return true;
        }
        if new_burst && self.due.is_none() {
            self.due = Some(now + SETTLE);
        }
        false
    }

    /// When to wake next, if anything waits.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match (self.due, &self.last_flush) {
            (Some(due), _) => Some(due),
            (None, _) if self.batch.is_empty() => None,
            (None, Some(t)) => Some(*t + FLUSH_EVERY),
            (None, None) => Some(Duration::ZERO),
        }
    }

    /// The wake-up came at `now`; `exiting`: the command's pipes closed and it has not exited
    /// yet. True when the output waiting is to be written now.
    pub fn handle_timeout(&mut self, now: Duration, exiting: bool) -> bool {
        match self.due {
            Some(due) if due <= now => {
                if exiting && !self.exit_grace_given {
                    self.exit_grace_given = true;
                    self.due = Some(now + EXIT_GRACE);
                    return false;
                }
                true
            }
            Some(_) => false,
            None => !self.batch.is_empty() && self.last_flush.is_none_or(|t| now >= t + FLUSH_EVERY),
        }
    }

    /// The output waiting, to be written now.
    pub fn take(&mut self, now: Duration) -> Batch {
        self.last_flush = Some(now);
        self.due = None;
        std::mem::take(&mut self.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn line() -> Vec<(Stream, Vec<u8>)> {
        vec![(Stream::Stdout, b"line\n".to_vec())]
    }

    #[test]
    fn a_line_after_a_quiet_spell_waits_only_to_settle() {
        let mut b = Batcher::default();
        assert_eq!(b.poll_timeout(), None, "nothing waits");
        assert!(!b.arrived(ms(100), line()));
        assert_eq!(b.poll_timeout(), Some(ms(100) + SETTLE));
        assert!(!b.handle_timeout(ms(101), false));
        assert!(b.handle_timeout(ms(102), false));
        let batch = b.take(ms(102));
        assert!(!batch.is_empty());
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn a_chatty_command_is_written_once_per_flush_interval() {
        let mut b = Batcher::default();
        b.arrived(ms(0), line());
        assert!(b.handle_timeout(ms(2), false));
        b.take(ms(2));
        // More output every millisecond: no burst, so it waits for the interval.
        let mut flushed_at = vec![];
        for t in 3..=200 {
            if b.arrived(ms(t), line()) {
                b.take(ms(t));
                flushed_at.push(t);
            }
        }
        assert_eq!(flushed_at, vec![52, 102, 152]);
        // What arrived after the last write is due at the interval's end.
        assert_eq!(b.poll_timeout(), Some(ms(152) + FLUSH_EVERY));
    }

    #[test]
    fn a_full_batch_is_written_at_once() {
        let mut b = Batcher::default();
        assert!(b.arrived(ms(0), vec![(Stream::Stdout, vec![b'x'; FLUSH_BYTES])]));
        assert!(!b.has_room_after(0));
    }

    #[test]
    fn a_command_whose_pipes_closed_gets_a_grace_to_exit_once() {
        let mut b = Batcher::default();
        b.arrived(ms(10), line());
        // Due; the pipes are closed but the command has not exited: wait a little longer, once.
        assert!(!b.handle_timeout(ms(12), true));
        assert_eq!(b.poll_timeout(), Some(ms(12) + EXIT_GRACE));
        assert!(b.handle_timeout(ms(32), true));
    }

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
        assert!(b.is_empty());
    }
}
