//! The results: the table (Markdown) printed and written into `benchmarks.md` between its
//! result markers, the raw numbers in `benchmarks.json`, and the chart `benchmarks.png`
//! drawn from them by scripts/bench_chart.py. Each row states its target and whether it was
//! met.

use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;

use crate::args::Args;
use crate::broker::Broker;
use crate::drain::Drain;
use crate::live::{Live, Observer};
use crate::outbox_size::{PruneCost, WriteCost};
use crate::support::*;

/// The results of a full run.
#[derive(Debug)]
pub struct Results {
    pub drains: Vec<Drain>,
    pub lives: Vec<Live>,
    /// outboxd's peak RSS during the big transaction, KiB.
    pub peak_kib: u64,
    /// From the big transaction's commit to its last row in Redis, s.
    pub big_secs: f64,
    pub relay_eps: f64,
    pub writes: Vec<WriteCost>,
    pub prune: PruneCost,
}

/// The versions of the servers and the machine's CPUs, for the report.
pub fn versions() -> String {
    let pg = std::process::Command::new(pg_bin().join("postgres"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kafka = apache_kafka::jars_dir()
        .parent()
        .and_then(|v| v.file_name())
        .map_or_else(String::new, |v| v.to_string_lossy().into_owned());
    format!(
        "{pg}; Redis {redis}; Apache Kafka {kafka} (one KRaft node); {cpus} CPUs; outboxd release build"
    )
}

/// The raw results, as written to `benchmarks.json` (`started`: when the run began).
pub fn json(args: &Args, r: &Results, started: Instant) -> serde_json::Value {
    let (drains, lives, writes, prune) = (&r.drains, &r.lives, &r.writes, &r.prune);
    json!({
        "environment": versions(),
        "drain": drains.iter().map(|d| json!({
            "broker": d.broker.name(), "effectively_once": d.effectively_once, "table_less": d.table_less,
            "reference_overhead_s": d.reference_overhead_secs, "rows_per_transaction": d.per_txn, "events": d.events,
            "outboxd_events_per_s": d.outboxd_eps.round(), "reference_events_per_s": d.reference_eps.round(),
            "ratio": d.ratio, "round_ratios": d.round_ratios, "rounds": args.rounds,
        })).collect::<Vec<_>>(),
        "live": lives.iter().map(|l| json!({
            "observer": match l.observer { Observer::Outboxd => "outboxd", Observer::PgRecvlogical => "pg_recvlogical" },
            "rate": l.rate, "rounds": args.rounds, "achieved": l.achieved.round(),
            "cpu_us_per_event": l.cpu_us_per_event, "round_p99_ms": l.round_p99s,
            "round_steal_pct": l.round_steal, "p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "max_ms": l.max_ms,
        })).collect::<Vec<_>>(),
        "big_transaction": { "rows": args.big_txn, "peak_rss_mib": r.peak_kib as f64 / 1024.0, "seconds": r.big_secs },
        "polling_relay_events_per_s": r.relay_eps.round(),
        "write_costs": writes.iter().map(|w| json!({
            "style": w.style, "commits_per_s": w.commits_per_s.round(),
            "wal_bytes_per_event": w.wal_bytes_per_event.round(),
            "table_bytes_per_event": w.table_bytes_per_event.round(),
        })).collect::<Vec<_>>(),
        "prune": {
            "rows": prune.rows, "seconds": prune.prune_secs,
            "wal_bytes_per_row": prune.wal_bytes_per_row.round(), "dead_tuples": prune.dead_tuples,
            "vacuum_seconds": prune.vacuum_secs, "table_bytes_before": prune.table_bytes_before,
            "table_bytes_after_vacuum": prune.table_bytes_after_vacuum,
        },
        "seconds": started.elapsed().as_secs(),
    })
}

/// " (per round: a, b, c)" in percent, or nothing for one round.
fn per_round(ratios: &[f64]) -> String {
    if ratios.len() < 2 {
        return String::new();
    }
    let each: Vec<String> = ratios.iter().map(|r| format!("{:.0}", 100.0 * r)).collect();
    format!(" (rounds: {})", each.join(", "))
}

/// The drain rows of the results table (with its header), and the cost of effectively-once.
pub fn render_drains(drains: &[Drain]) -> String {
    let mut t = String::new();
    t.push_str("| scenario | outboxd | reference, same run | ratio | target | met |\n|---|---|---|---|---|---|\n");
    for d in drains {
        let target = match (d.broker, d.per_txn) {
            (Broker::Redis, 1000) => 0.95,
            _ => 0.90,
        };
        let ratio = d.ratio;
        t.push_str(&format!(
            "| drain to {}{}{}{}, {} events in {}-row transactions | {:.0} events/s | pg_recvlogical {:.0} events/s (less its {:.2} s fixed cost) | {:.0} %{} | ≥ {:.0} % | {} |\n",
            d.broker.name(),
            if d.effectively_once { " (effectively-once)" } else { "" },
            if d.table_less { " (table-less messages)" } else { "" },
            d.max_batch.map_or_else(String::new, |n| format!(", batches of {n}")),
            d.events,
            d.per_txn,
            d.outboxd_eps,
            d.reference_eps,
            d.reference_overhead_secs,
            100.0 * ratio,
            per_round(&d.round_ratios),
            100.0 * target,
            if ratio >= target { "yes" } else { "no" }
        ));
    }
    for broker in [Broker::Redis, Broker::Kafka] {
        let find = |eo: bool| {
            drains.iter().find(|d| {
                d.broker == broker && d.per_txn == 1000 && d.effectively_once == eo && !d.table_less
            })
        };
        if let (Some(alo), Some(eo)) = (find(false), find(true)) {
            let cost = 1.0 - eo.outboxd_eps / alo.outboxd_eps;
            t.push_str(&format!(
                "| effectively-once cost, {}, 1000-row transactions, same batch size | {:.0} events/s | at-least-once {:.0} events/s | {:.1} % slower | ≤ 10 % | {} |\n",
                broker.name(),
                eo.outboxd_eps,
                alo.outboxd_eps,
                100.0 * cost,
                if cost <= 0.10 { "yes" } else { "no" }
            ));
        }
    }
    t
}

/// The results table of a full run, without the outbox-size rows.
pub fn render_table(args: &Args, r: &Results) -> String {
    let mut t = String::new();
    t.push_str(&format!("Environment: {}.\n\n", versions()));
    t.push_str(&render_drains(&r.drains));
    t.push_str(&render_relay(args, &r.drains, r.relay_eps));
    for l in r.lives.iter().filter(|l| l.observer == Observer::Outboxd) {
        t.push_str(&render_live(l, &r.lives));
    }
    let mib = r.peak_kib as f64 / 1024.0;
    t.push_str(&format!(
        "| one {}-row transaction | peak RSS {mib:.1} MiB | | | ≤ 64 MiB | {} |\n",
        args.big_txn,
        if mib <= 64.0 { "yes" } else { "no" }
    ));
    t
}

/// The row comparing the Redis drain with the polling relay (none without that drain).
fn render_relay(args: &Args, drains: &[Drain], relay_eps: f64) -> String {
    let Some(redis) = drains.iter().find(|d| {
        d.broker == Broker::Redis && d.per_txn == 1000 && !d.effectively_once && !d.table_less
    }) else {
        return String::new();
    };
    let ratio = redis.outboxd_eps / relay_eps;
    format!(
        "| drain to redis against a polling relay ({} events) | {:.0} events/s | polling relay {:.0} events/s | {:.1}× | ≥ 3× | {} |\n",
        args.events,
        redis.outboxd_eps,
        relay_eps,
        ratio,
        if ratio >= 3.0 { "yes" } else { "no" }
    )
}

/// The row of outboxd's live run `l`, beside the reference's run at the same rate in `lives`.
fn render_live(l: &Live, lives: &[Live]) -> String {
    let within = |l: &Live| l.round_p99s.iter().filter(|p| **p <= 25.0).count();
    let reference = lives
        .iter()
        .find(|r| r.observer == Observer::PgRecvlogical && r.rate == l.rate);
    let (target, met) = if l.rate == 5_000 {
        let met = if l.p99_ms <= 25.0 { "yes" } else { "no" };
        let rounds = match reference {
            Some(r) if l.round_p99s.len() > 1 => format!(
                "; p99 ≤ 25 ms in {} of {} rounds (pg_recvlogical: {} of {})",
                within(l),
                l.round_p99s.len(),
                within(r),
                r.round_p99s.len()
            ),
            _ => String::new(),
        };
        ("p99 ≤ 25 ms", format!("{met}{rounds}"))
    } else {
        ("-", "-".to_owned())
    };
    let reference = reference.map_or_else(String::new, |r| {
        format!(
            "pg_recvlogical (achieved {:.0}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; CPU {:.0} µs per event{}",
            r.achieved,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.cpu_us_per_event,
            r.per_round()
        )
    });
    format!(
        "| live {} events/s (achieved {:.0}), commit to readable in Redis, {} rounds pooled | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; CPU {:.0} µs per event{} | {reference} | | {target} | {met} |\n",
        l.rate,
        l.achieved,
        l.round_p99s.len(),
        l.p50_ms,
        l.p99_ms,
        l.max_ms,
        l.cpu_us_per_event,
        l.per_round()
    )
}

/// Writes the table into `dir/benchmarks.md` (between the result markers), the raw results
/// into `dir/benchmarks.json`, and the chart into `dir/benchmarks.png` (via
/// scripts/bench_chart.py).
pub fn write_results(
    dir: &Path,
    results: &serde_json::Value,
    table: &str,
    outbox_size: &str,
) -> anyhow::Result<()> {
    let json_path = dir.join("benchmarks.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(results)? + "\n")?;
    let doc_path = dir.join("benchmarks.md");
    replace_block(&doc_path, "results", &format!("{table}\n{outbox_size}"))?;
    replace_block(&dir.join("outbox-size.md"), "outbox-size", outbox_size)?;
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_chart.py");
    let status = std::process::Command::new("python3")
        .arg(chart)
        .arg(&json_path)
        .arg(dir.join("benchmarks.png"))
        .status()?;
    if !status.success() {
        bail!(
            "drawing the chart failed (python3 with matplotlib is needed: scripts/bench.sh installs it)"
        );
    }
    println!(
        "wrote {}, {} and benchmarks.png",
        doc_path.display(),
        json_path.display()
    );
    Ok(())
}

/// Replaces what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in the file at
/// `path` with `text` (appending the block when the markers are missing).
fn replace_block(path: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let updated = match (doc.find(&begin), doc.find(&end)) {
        (Some(a), Some(b)) if a < b => format!("{}{begin}\n{text}{}", &doc[..a], &doc[b..]),
        _ => format!("{doc}\n{begin}\n{text}{end}\n"),
    };
    std::fs::write(path, updated)?;
    Ok(())
}
