//! The soak's report, in Markdown: the run, the audit, the faults, and the timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::args::Args;
use crate::audit::Audit;
use crate::faults::{Fault, Happened};
use crate::sampler::Sample;
use crate::writer::WriterStats;

/// Everything the report says.
#[derive(Debug)]
pub struct Run<'a> {
    /// The command line.
    pub args: &'a Args,
    /// Versions of what ran.
    pub versions: String,
    /// When it started (UTC).
    pub date: String,
    /// The writer's account.
    pub writer: WriterStats,
    /// The faults, in order.
    pub faults: &'a [Happened],
    /// outboxd exits nobody asked for: when, and the exit status.
    pub exits: &'a [(Duration, String)],
    /// Every sample.
    pub samples: &'a [Sample],
    /// From the end of the load until every event was in a stream.
    pub drain: Duration,
    /// The audit.
    pub audit: &'a Audit,
    /// How long each fast stop of Postgres took.
    pub pg_stops: &'a [Duration],
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn clock(at: Duration) -> String {
    let s = at.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

/// The report.
pub fn render(run: &Run<'_>) -> String {
    let a = run.audit;
    let args = run.args;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Soak of {}: {} minutes, Redis, {}\n",
        run.date,
        args.minutes,
        args.delivery.as_str()
    );
    let _ = writeln!(out, "{}\n", run.versions);
    let _ = writeln!(
        out,
        "Load: one-row transactions at {} events/s, one in 20 of 2–200 rows, a {}-row \
         transaction every {} s; {} keys, 3 aggregate types (3 streams), payloads of about {} \
         bytes. Faults every {}–{} s (seed {:#x}).\n",
        args.rate,
        args.large_rows,
        args.large_every,
        args.keys,
        args.payload_bytes + 30,
        args.fault_min,
        args.fault_max,
        args.seed
    );
    let peak_rss = run
        .samples
        .iter()
        .filter_map(|s| s.rss_kib.map(|(_, hwm)| hwm))
        .max()
        .unwrap_or(0);
    let peak_wal = run
        .samples
        .iter()
        .filter_map(|s| s.retained_wal)
        .max()
        .unwrap_or(0);
    let peak_lag = run
        .samples
        .iter()
        .filter_map(|s| s.confirm_lag)
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "| | |\n|---|---:|");
    for (what, value) in [
        ("events committed (outbox table)", a.committed.to_string()),
        (
            "transactions (of which large; failed)",
            format!(
                "{} ({}; {})",
                run.writer.transactions, run.writer.large, run.writer.failed
            ),
        ),
        ("entries in the streams", a.entries.to_string()),
        ("**lost**", format!("**{}**", a.lost)),
        ("duplicates", a.duplicates.to_string()),
        ("out of order within a key", a.out_of_order.to_string()),
        ("entries of no committed event", a.not_committed.to_string()),
        ("in the wrong stream", a.misrouted.to_string()),
        ("dead letters", a.dead_letters.to_string()),
        ("faults", run.faults.len().to_string()),
        (
            "outboxd exits nobody asked for",
            run.exits.len().to_string(),
        ),
        (
            "slowest fast stop of Postgres",
            run.pg_stops
                .iter()
                .max()
                .map_or("–".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        ),
        (
            "peak RSS of outboxd",
            format!("{:.1} MiB", peak_rss as f64 / 1024.0),
        ),
        ("peak retained WAL", mib(peak_wal)),
        ("peak confirm lag", mib(peak_lag)),
        (
            "load end to every event delivered",
            format!("{:.1} s", run.drain.as_secs_f64()),
        ),
    ] {
        let _ = writeln!(out, "| {what} | {value} |");
    }
    if let Some(first) = a.lost_examples.first() {
        let _ = writeln!(out, "\nLost, first: {first} ({:?})", a.lost_examples);
    }
    if let Some((stream, key, seq, prev)) = &a.out_of_order_example {
        let _ = writeln!(
            out,
            "\nOut of order, first: {stream} key {key}: event {seq} after {prev}"
        );
    }

    let mut by_kind: BTreeMap<Fault, u32> = BTreeMap::new();
    for f in run.faults {
        *by_kind.entry(f.fault).or_default() += 1;
    }
    let _ = writeln!(out, "\nFaults by kind:\n");
    for (kind, n) in &by_kind {
        let _ = writeln!(out, "- {}: {n}", kind.name());
    }
    let _ = writeln!(out, "\n<details><summary>Every fault</summary>\n");
    let _ = writeln!(out, "| at | fault | |\n|---|---|---|");
    for f in run.faults {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            clock(f.at),
            f.fault.name(),
            f.detail
        );
    }
    for (at, status) in run.exits {
        let _ = writeln!(
            out,
            "| {} | outboxd exited by itself | {status} |",
            clock(*at)
        );
    }
    let _ = writeln!(out, "\n</details>\n");

    // The timeline: one row per twelfth of the run, with the worst of each window.
    let window = Duration::from_secs((args.minutes * 60 / 12).max(10));
    let _ = writeln!(
        out,
        "Over time (each row: the end of a {} window and the highest value within it):\n",
        if window.as_secs() >= 60 {
            format!("{}-minute", window.as_secs() / 60)
        } else {
            format!("{}-second", window.as_secs())
        }
    );
    let _ = writeln!(
        out,
        "| at | committed | in the streams | confirm lag | retained WAL | outboxd RSS |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    let mut from = Duration::ZERO;
    while from < Duration::from_secs(args.minutes * 60) {
        let to = from + window;
        let in_window: Vec<&Sample> = run
            .samples
            .iter()
            .filter(|s| s.at > from && s.at <= to)
            .collect();
        if let Some(last) = in_window.last() {
            let max =
                |f: &dyn Fn(&Sample) -> Option<i64>| in_window.iter().filter_map(|s| f(s)).max();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                clock(to),
                last.written,
                in_window
                    .iter()
                    .rev()
                    .find_map(|s| s.delivered)
                    .map_or("–".into(), |d| d.to_string()),
                max(&|s| s.confirm_lag).map_or("–".into(), mib),
                max(&|s| s.retained_wal).map_or("–".into(), mib),
                max(&|s| s.rss_kib.map(|(rss, _)| rss as i64))
                    .map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            );
        }
        from = to;
    }
    out
}
