//! The transcript as a self-contained HTML page.
//!
//! Output from endpoints is hostile. Everything shown goes through [`crate::text::visible`]
//! (control characters and escape sequences spelled out) and then maud's escaping (`& < > "`),
//! so no markup, script or terminal escape from an endpoint survives. The page has no script at
//! all, one inline style allowed by its hash in the Content-Security-Policy, and the canonical
//! transcript JSON in a hidden `<pre>`, from which `caisey verify` re-renders the page and
//! compares it byte for byte.

use maud::{DOCTYPE as MAUD_DOCTYPE, Markup, PreEscaped, html};
use sha2::{Digest, Sha256};

use super::{Checked, CheckedCommand, TranscriptFile};
use crate::session::{EndStatus, Verdict};
use crate::text::{PeerText, visible};

pub const DOCTYPE: &str = "<!DOCTYPE html>";
const DATA_ID: &str = "caisey-transcript";

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1d2430}\
h1{font-size:1.5em;margin-bottom:.2em}.meta{color:#5a6472;font-size:.9em}\
section{border:1px solid #d7dce3;border-radius:8px;padding:1em;margin:1.2em 0}\
pre{background:#f5f7fa;padding:.6em;border-radius:6px;overflow-x:auto;white-space:pre-wrap;word-break:break-word}\
pre.err{background:#fff4f2}.ok{color:#17733a}.bad{color:#b3261e}.note{color:#8a5a00}\
table{border-collapse:collapse}td{padding:.15em .8em .15em 0;vertical-align:top}";

/// The CSP source for the page's one inline style.
pub fn style_hash() -> String {
    format!("'sha256-{}'", data_encoding::BASE64.encode(&Sha256::digest(STYLE.as_bytes())))
}

/// The Content-Security-Policy the page is served with: nothing may load or run.
pub fn content_security_policy() -> String {
    format!(
        "default-src 'none'; style-src {}; img-src 'none'; script-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        style_hash()
    )
}

/// A UTC timestamp for people, from milliseconds since the epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Whether a step is proven by its author's signature, in plain words.
fn genuine(signed: bool) -> Markup {
    html! {
        @if signed { span.ok { "✔ signed" } } @else { span.note { "a secret hidden here by the publisher; vouched for by the publisher only" } }
    }
}

fn command_ui(c: &CheckedCommand) -> Markup {
    html! {
        section {
            h2 { (c.requester.visible()) " asked " (c.machine.visible()) " to run a command" }
            table {
                tr { td { "Asked" } td { (utc(c.requested_at)) " — " (genuine(c.request_signed)) } }
                tr { td { "Shell" } td { (c.command.shell) ", timeout " (c.command.timeout_ms / 1000) " s" @if let Some(cwd) = &c.command.cwd { ", in " (visible(cwd)) } } }
                @if !c.description.is_empty() { tr { td { "Why" } td { (c.description.visible()) } } }
                tr { td { "Answer" } td {
                    @match &c.decision {
                        None => span.note { "none yet" },
                        Some(d) => {
                            @match d.verdict {
                                Verdict::Approved => span.ok { "approved" },
                                Verdict::Denied => span.bad { "denied" },
                                Verdict::Expired => span.note { "expired" },
                            }
                            " by " (visible(&d.decided_by)) " (" (d.decided_by_key.short()) "), " (utc(d.decided_at)) " — " (genuine(d.signed))
                        }
                    }
                } }
                @if let Some(s) = c.started_at { tr { td { "Started" } td { (utc(s)) } } }
                tr { td { "Result" } td {
                    @match &c.end {
                        None => span.note { "not finished when published" },
                        Some(e) => {
                            @match (e.status, e.exit_code) {
                                (EndStatus::Exited, Some(0)) => span.ok { "exit code 0" },
                                (EndStatus::Exited, Some(code)) => span.bad { "exit code " (code) },
                                (EndStatus::Exited, None) => span.bad { "ended by a signal" },
                                (EndStatus::TimedOut, _) => span.bad { "timed out" },
                                (EndStatus::Interrupted, _) => span.bad { "interrupted (agent stopped; not run again)" },
                                (EndStatus::FailedToStart, _) => span.bad { "failed to start" },
                                (EndStatus::NotRun, _) => span.bad { "not run" },
                                (EndStatus::Stopped, _) => span.bad { "stopped by the machine's user" },
                            }
                            ", " (utc(e.ended_at))
                            @if let Some(m) = &e.message { " — " (visible(m)) }
                            " — " (genuine(e.signed))
                        }
                    }
                } }
            }
            @if let Some(e) = c.end.as_ref().filter(|e| !e.probes.is_empty()) {
                p { "Values: "
                    @for (i, v) in e.probes.iter().enumerate() {
                        @if i > 0 { ", " }
                        (visible(&v.name)) " = " (v.value) @if let Some(u) = &v.unit { " " (visible(u)) }
                    }
                }
            }
            h3 { "The command, exactly as it ran" }
            pre { (visible(&c.command.script)) }
            h3 { "What it printed" }
            p.meta { "Output — " (genuine(c.stdout_signed)) }
            pre { (visible(&c.stdout)) }
            @if !c.stderr.is_empty() {
                p.meta { "Errors and warnings — " (genuine(c.stderr_signed)) }
                pre.err { (visible(&c.stderr)) }
            }
            @if !c.artifacts.is_empty() {
                h3 { "Files it brought back" }
                p.meta { "Listed by name, size and SHA-256 as the machine signed them; their bytes are not in this page." }
                table {
                    @for a in &c.artifacts {
                        tr {
                            td { (visible(&a.name)) }
                            @match &a.outcome {
                                crate::artifact::Outcome::Collected { size, sha256, .. } => {
                                    td { (size) " bytes" } td { code { (hex::encode(sha256)) } }
                                }
                                crate::artifact::Outcome::Refused { why } => { td.bad { "not brought back" } td { (visible(why)) } }
                            }
                        }
                    }
                }
            }
            @if !c.redactions.is_empty() {
                p.note { "Hidden by the publisher, each shown as [REDACTED]: "
                    @for (i, r) in c.redactions.iter().enumerate() {
                        @if i > 0 { ", " }
                        (r.count) "× " (r.rule) " in the " (r.field)
                    }
                    "."
                }
            }
        }
    }
}

/// Each value the runs yielded, over time: a small chart drawn as inline SVG (no script, no
/// image to load), with the values listed beside it.
fn probes_ui(commands: &[CheckedCommand]) -> Markup {
    let mut names: Vec<&str> =
        commands.iter().filter_map(|c| c.end.as_ref()).flat_map(|e| e.probes.iter().map(|p| p.name.as_str())).collect();
    names.sort_unstable();
    names.dedup();
    html! {
        @for name in names {
            @let points: Vec<(u64, f64)> = commands.iter().filter_map(|c| {
                let v = c.end.as_ref()?.probes.iter().find(|p| p.name == name)?;
                Some((c.requested_at, v.value))
            }).collect();
            section {
                h2 { "Values of " (visible(name)) " over " (points.len()) " run(s)" }
                (chart(&points))
                table {
                    @for (i, (at, v)) in points.iter().enumerate() {
                        tr { td { (utc(*at)) } td { (v) } td { @if i > 0 { "change " (format!("{:+}", v - points[i - 1].1)) } } }
                    }
                }
            }
        }
    }
}

/// A line through `points` (time, value), scaled to a 600×160 box, with its range labelled.
fn chart(points: &[(u64, f64)]) -> Markup {
    const W: f64 = 600.0;
    const H: f64 = 160.0;
    const PAD: f64 = 24.0;
    let (t0, t1) = (points.iter().map(|p| p.0).min().unwrap_or(0), points.iter().map(|p| p.0).max().unwrap_or(0));
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let x = |t: u64| if t1 > t0 { PAD + (t - t0) as f64 / (t1 - t0) as f64 * (W - 2.0 * PAD) } else { W / 2.0 };
    let y = |v: f64| if hi > lo { H - PAD - (v - lo) / (hi - lo) * (H - 2.0 * PAD) } else { H / 2.0 };
    let line: Vec<String> = points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
    html! {
        svg width="600" height="160" viewBox="0 0 600 160" role="img" aria-label="values over time" {
            rect x="0" y="0" width="600" height="160" fill="#f5f7fa" {}
            polyline points=(line.join(" ")) fill="none" stroke="#2b6cb0" stroke-width="2" {}
            @for (t, v) in points { circle cx=(format!("{:.1}", x(*t))) cy=(format!("{:.1}", y(*v))) r="3" fill="#2b6cb0" {} }
            text x="4" y="14" font-size="11" fill="#5a6472" { "max " (hi) }
            text x="4" y="154" font-size="11" fill="#5a6472" { "min " (lo) }
        }
    }
}

/// The machines the published commands ran on, by name.
/// The machines of a transcript, escaped, as one line of the page.
fn machines(c: &Checked) -> String {
    let mut names: Vec<&PeerText> = c.commands.iter().map(|c| &c.machine).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() { "no machine".into() } else { joined(names) }
}

/// Peer texts escaped (newlines kept, as everywhere on the page) and joined with commas.
fn joined<'a>(texts: impl IntoIterator<Item = &'a PeerText>) -> String {
    texts.into_iter().map(PeerText::visible).collect::<Vec<_>>().join(", ")
}

/// The page around `body`: head, style, and the signed data it was rendered from.
fn page(title: &PeerText, data: &str, body: Markup) -> String {
    html! {
        (MAUD_DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { "Caisey transcript: " (title.visible()) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                (body)
                pre id=(DATA_ID) hidden { (data) }
            }
        }
    }
    .into_string()
}

fn summary_ui(publisher: &PeerText, summary: Option<&String>) -> Markup {
    html! {
        @if let Some(summary) = summary {
            section.summary {
                h2 { "Summary" }
                p.meta { "In " (publisher.visible()) "'s words, as they published this page:" }
                pre { (visible(summary)) }
            }
        }
    }
}

fn proof_ui() -> Markup {
    html! {
        p {
            "Every step below was signed by whoever took it: the technician who asked, the person who "
            "approved, the machine that ran the command and printed its output. Where the publisher hid a "
            "secret (a password, a key, a token), that step says so, and only the publisher vouches for it: "
            "a signature over the secret would let anyone test guesses of it."
        }
    }
}

fn notes_ui(notes: &[super::CheckedNote]) -> Markup {
    html! {
        @if !notes.is_empty() {
            section.notes {
                h2 { "Notes" }
                @for n in notes {
                    p.meta { (utc(n.at)) " · " (n.author.visible()) " · " (genuine(n.signed)) }
                    pre { (n.text.visible()) }
                }
            }
        }
    }
}

fn heads(c: &Checked) -> String {
    c.heads.iter().map(|h| &h[..h.len().min(12)]).collect::<Vec<_>>().join(", ")
}

fn how_to_check(c: &Checked, sessions: &[&Checked]) -> Markup {
    html! {
        section.verify {
            h2 { "How to check this page" }
            p {
                "Run " code { "caisey verify" } " on this page or its address: it checks every signature and "
                "that the page says nothing the signed records do not. A saved copy is checked without a network."
            }
            table {
                tr { td { "Org" } td { (visible(&c.org_name)) ", key " (c.org_key.short()) } }
                tr { td { "Publisher" } td { (c.publisher.visible()) ", key " (c.publisher_key.short()) } }
                @for s in sessions {
                    tr { td { "Session" } td { (s.session.short()) ", as of " (heads(s)) } }
                }
            }
        }
    }
}

/// Renders the page. A pure function of the verified transcript.
pub fn render(file: &TranscriptFile, c: &Checked) -> String {
    let data = String::from_utf8_lossy(&file.to_json()).into_owned();
    let body = html! {
        h1 { (c.name.visible()) }
        p.meta {
            "What " (visible(&c.org_name)) " ran on " (machines(c)) ", as " (c.publisher.visible())
            " published it on " (utc(c.published_at)) "."
            @if !c.labels.is_empty() { " Labels: " (joined(&c.labels)) "." }
        }
        (summary_ui(&c.publisher, c.summary.as_ref()))
        (proof_ui())
        @if !c.omitted.is_empty() { p.note { (c.omitted.len()) " command(s) of this session were left out by the publisher." } }
        (probes_ui(&c.commands))
        @for cmd in &c.commands { (command_ui(cmd)) }
        (notes_ui(&c.notes))
        (how_to_check(c, &[c]))
    };
    page(&c.name, &data, body)
}

/// Renders a group run's page: every machine side by side, machines whose last output is
/// identical gathered, then each machine's session in full. A pure function of it, too.
pub fn render_group(file: &super::group::GroupFile, g: &super::group::CheckedGroup) -> String {
    let data = String::from_utf8_lossy(&file.to_json()).into_owned();
    let last = |c: &Checked| c.commands.last().cloned();
    let mut same: Vec<(String, Vec<PeerText>)> = Vec::new();
    for part in &g.parts {
        let Some(cmd) = last(part) else { continue };
        let output = format!("{}{}", cmd.stdout, cmd.stderr);
        match same.iter_mut().find(|(o, _)| *o == output) {
            Some((_, machines)) => machines.push(cmd.machine.clone()),
            None => same.push((output, vec![cmd.machine.clone()])),
        }
    }
    same.sort_by_key(|(_, machines)| std::cmp::Reverse(machines.len()));
    let Some(lead) = g.parts.first() else { return page(&g.name, &data, html! {}) };
    let body = html! {
        h1 { (g.name.visible()) }
        p.meta {
            "What " (visible(&g.org_name)) " ran on " (g.parts.len()) " machines at once, as " (g.publisher.visible())
            " published it on " (utc(g.published_at)) "."
        }
        (summary_ui(&g.publisher, g.summary.as_ref()))
        (proof_ui())
        section.machines {
            h2 { "Every machine" }
            table {
                @for part in &g.parts {
                    @if let Some(cmd) = last(part) {
                        tr {
                            td { (cmd.machine.visible()) }
                            td { (result(&cmd)) }
                            td { @if let Some(d) = &cmd.decision { "answered by " (visible(&d.decided_by)) } }
                        }
                    }
                }
            }
        }
        section.same {
            h2 { "What they printed" }
            @for (output, machines) in &same {
                p.meta { (machines.len()) " machine" @if machines.len() != 1 { "s" } ": " (joined(machines)) }
                pre { (visible(output)) }
            }
        }
        @for part in &g.parts {
            h2 { "On " (machines(part)) }
            @for cmd in &part.commands { (command_ui(cmd)) }
            (notes_ui(&part.notes))
        }
        (how_to_check(lead, &g.parts.iter().collect::<Vec<_>>()))
    };
    page(&g.name, &data, body)
}

/// A command's result in a few words.
fn result(c: &CheckedCommand) -> Markup {
    html! {
        @match &c.end {
            None => span.note { "not finished when published" },
            Some(e) => @match (e.status, e.exit_code) {
                (EndStatus::Exited, Some(0)) => span.ok { "exit code 0" },
                (EndStatus::Exited, Some(code)) => span.bad { "exit code " (code) },
                (EndStatus::Exited, None) => span.bad { "ended by a signal" },
                (EndStatus::TimedOut, _) => span.bad { "timed out" },
                (EndStatus::Interrupted, _) => span.bad { "interrupted" },
                (EndStatus::FailedToStart, _) => span.bad { "failed to start" },
                (EndStatus::NotRun, _) => span.bad { "not run" },
                                (EndStatus::Stopped, _) => span.bad { "stopped by the machine's user" },
            },
        }
    }
}

/// The transcript JSON carried by a page.
pub fn extract(page: &[u8]) -> Option<String> {
    let page = std::str::from_utf8(page).ok()?;
    let marker = format!("id=\"{DATA_ID}\"");
    let start = page.find(&marker)?;
    let open_end = start + page[start..].find('>')? + 1;
    let close = open_end + page[open_end..].find("</pre>")?;
    let escaped = &page[open_end..close];
    Some(escaped.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&amp;", "&"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(1_795_219_200_000), "2026-11-21 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400_000 + 3_723_000), "2000-02-29 01:02:03 UTC");
    }
}
