//! Full-text search over every command's output on a technician's node.
//!
//! An index of the words of every output line (`HOME/search.redb`), kept up to date as output
//! arrives: for each command it remembers how far its output list was read, and reads only
//! what came after, a page at a time. It is derived data: deleting the file rebuilds it from
//! the store. A search intersects the posting lists of the query's words to find the commands
//! whose output has them all, then reads just those outputs for the line to show.
//!
//! A word is a run of letters, digits and `_` (lowercased, 2 to 64 characters): `private_mb`
//! and `Backup Engine` are found, parts of words are not.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use caisey_doc::id::{DocId, Id128};
use caisey_doc::session::{SessionView, Stream};
use caisey_peer::node::Node;
use redb::{Database, MultimapTableDefinition, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

/// word → (session, request) pairs whose output has it.
const WORDS: MultimapTableDefinition<&str, &[u8]> = MultimapTableDefinition::new("words");
/// (session, request) → how far its output was indexed.
const DONE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("done");

/// How many bytes of output one indexing step reads.
const PAGE: usize = 4 * 1024 * 1024;
/// A line longer than this is indexed in pieces (its carry across chunks stays bounded).
const MAX_CARRY: usize = 64 * 1024;

/// Where one command's output was indexed up to: its list position, and the unfinished last
/// line of each stream.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Progress {
    next: usize,
    carry: [String; 2],
}

/// The index of one node's outputs.
#[derive(Debug)]
pub struct OutputIndex {
    db: Database,
}

/// A command whose output has every word searched for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hit {
    pub session: DocId,
    pub request: Id128,
}

fn key(session: DocId, request: Id128) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&session.0);
    k[16..].copy_from_slice(&request.0);
    k
}

/// The words of `text`, as indexed and searched.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| (2..=64).contains(&w.chars().count()))
        .map(str::to_lowercase)
}

impl OutputIndex {
    /// Opens (or creates) the index at `path`. A damaged index is replaced: it is derived data.
    pub fn open(path: &Path) -> Result<Self> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                anyhow::bail!("the search index {} is open in another process", path.display())
            }
            Err(_) => {
                std::fs::remove_file(path).ok();
                Database::create(path).with_context(|| format!("creating the search index {}", path.display()))?
            }
        };
        let tx = db.begin_write()?;
        tx.open_multimap_table(WORDS)?;
        tx.open_table(DONE)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Indexes whatever output of `session` arrived since last time.
    pub async fn update(&self, node: &Node, session: DocId) -> Result<()> {
        let Some(view) = node.read_with_fleet(session, SessionView::read_without_output).await? else { return Ok(()) };
        let Ok(view) = view else { return Ok(()) };
        for cmd in &view.commands {
            let k = key(session, cmd.request.id);
            loop {
                let mut progress = self.progress(&k)?;
                let (request, from) = (cmd.request.clone(), progress.next);
                let read = node
                    .read_with_output(session, move |d, stored| {
                        SessionView::read_output_from(d, &request, from, PAGE, stored)
                    })
                    .await?;
                let Some((chunks, next)) = read else { break };
                if next == from {
                    break;
                }
                let full = chunks.iter().map(|c| c.data.len()).sum::<usize>() >= PAGE;
                let mut found = BTreeSet::new();
                for chunk in chunks {
                    let carry = &mut progress.carry[usize::from(chunk.stream == Stream::Stderr)];
                    carry.push_str(&String::from_utf8_lossy(&chunk.data));
                    let cut =
                        if carry.len() > MAX_CARRY { carry.len() } else { carry.rfind('\n').map_or(0, |i| i + 1) };
                    found.extend(words(&carry[..cut]));
                    carry.drain(..cut);
                }
                progress.next = next;
                self.record(&k, &found, &progress)?;
                if !full {
                    break;
                }
            }
        }
        Ok(())
    }

    fn progress(&self, k: &[u8; 32]) -> Result<Progress> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(DONE)?;
        Ok(table.get(k.as_slice())?.and_then(|v| serde_json::from_slice(v.value()).ok()).unwrap_or_default())
    }

    fn record(&self, k: &[u8; 32], found: &BTreeSet<String>, progress: &Progress) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_multimap_table(WORDS)?;
            for w in found {
                table.insert(w.as_str(), k.as_slice())?;
            }
            tx.open_table(DONE)?.insert(k.as_slice(), serde_json::to_vec(progress)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The commands whose output has every word of `query` (none when it has no word).
    pub fn search(&self, query: &str) -> Result<Vec<Hit>> {
        let wanted: BTreeSet<String> = words(query).collect();
        let tx = self.db.begin_read()?;
        let table = tx.open_multimap_table(WORDS)?;
        let mut hits: Option<BTreeSet<[u8; 32]>> = None;
        for w in &wanted {
            let mut these = BTreeSet::new();
            for v in table.get(w.as_str())? {
                if let Ok(k) = <[u8; 32]>::try_from(v?.value()) {
                    these.insert(k);
                }
            }
            hits = Some(match hits {
                None => these,
                Some(before) => before.intersection(&these).copied().collect(),
            });
        }
        Ok(hits
            .unwrap_or_default()
            .into_iter()
            .map(|k| {
                let (s, r) = k.split_at(16);
                let id = |b: &[u8]| Id128(b.try_into().unwrap_or([0; 16]));
                Hit { session: id(s), request: id(r) }
            })
            .collect())
    }
}

/// The first line of `text` that has every word of `query`, trimmed to a readable length.
pub fn matching_line(text: &str, query: &str) -> Option<String> {
    let wanted: Vec<String> = words(query).collect();
    let needle = query.trim().to_lowercase();
    text.lines()
        .find(|l| {
            let lower = l.to_lowercase();
            lower.contains(&needle) || (!wanted.is_empty() && wanted.iter().all(|w| lower.contains(w.as_str())))
        })
        .map(|l| l.trim().chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::{matching_line, words};

    #[test]
    fn words_are_runs_of_letters_digits_and_underscores() {
        let w: Vec<String> = words("private_mb=1234.5 Backup-Engine: a é-tè x").collect();
        assert_eq!(w, ["private_mb", "1234", "backup", "engine", "tè"]);
    }

    #[test]
    fn the_line_shown_has_the_phrase_or_every_word() {
        let text = "header\nBackup Engine stopped at 02:00\nengine backup ok\n";
        assert_eq!(matching_line(text, "backup engine").as_deref(), Some("Backup Engine stopped at 02:00"));
        assert_eq!(matching_line(text, "ok engine").as_deref(), Some("engine backup ok"));
        assert_eq!(matching_line(text, "missing"), None);
    }
}
