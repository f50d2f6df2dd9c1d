//! The outboxd benchmark: outboxd against references measured in the same run, on throwaway
//! servers this program starts (Postgres, Redis, a one-node Apache Kafka broker).
//!
//! ```text
//! scripts/bench.sh                      everything, results into docs/benchmarks.md + .png
//! scripts/bench.sh --events 50000 --quick
//! ```
//!
//! What it measures (see docs/benchmarks.md):
//!
//! 1. Backlog drain: N events in 1,000-row transactions are written with outboxd stopped; then
//!    `pg_recvlogical` (pgoutput, same publication) reads the same WAL to /dev/null, outboxd
//!    drains it to the broker, and `pg_recvlogical` reads it once more; the reference is the
//!    mean of its two runs. For Redis and for Kafka, in both delivery modes.
//! 2. The same with one-row transactions.
//! 3. Live: events committed at fixed rates while outboxd runs; the latency from each
//!    transaction's commit (its `COMMIT` returned) to the event being readable in Redis.
//! 4. One 1,000,000-row transaction: outboxd's peak RSS.
//! 5. A polling relay (`SELECT … FOR UPDATE SKIP LOCKED`, publish, `UPDATE … published_at`)
//!    on the same backlog, the baseline users would otherwise write.
//!
//! Run through cargo (`cargo bench --bench outboxd`), so that the outboxd binary under test is
//! the release build of this tree.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is a failed run

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use support::apache_kafka::Kafka;
use support::*;
use tokio_postgres::Client;

/// Payload padding: about 300 bytes of JSON per event.
const PAD: usize = 270;

#[derive(Debug, Clone)]
struct Args {
    events: u64,
    one_row: u64,
    rates: Vec<u64>,
    live_secs: u64,
    rounds: u64,
    big_txn: u64,
    kafka: bool,
    /// `sink.max_batch_events` of the Kafka drains (both modes); outboxd's default otherwise.
    kafka_batch: Option<u64>,
    /// Live: measure outboxd only, without the pg_recvlogical reference (for profiling).
    no_reference: bool,
    only: Option<String>,
    out: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        events: 200_000,
        one_row: 20_000,
        rates: vec![1_000, 5_000, 20_000],
        live_secs: 10,
        rounds: 3,
        big_txn: 1_000_000,
        kafka: true,
        kafka_batch: None,
        no_reference: false,
        only: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().context("a value is missing after an option");
        match arg.as_str() {
            "--bench" => {} // cargo passes it to benches
            "--events" => a.events = value()?.parse()?,
            "--one-row" => a.one_row = value()?.parse()?,
            "--rates" => {
                a.rates = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--live-secs" => a.live_secs = value()?.parse()?,
            "--rounds" => a.rounds = value()?.parse::<u64>()?.max(1),
            "--big-txn" => a.big_txn = value()?.parse()?,
            "--no-kafka" => a.kafka = false,
            "--kafka-batch" => a.kafka_batch = Some(value()?.parse()?),
            "--no-reference" => a.no_reference = true,
            "--only" => a.only = Some(value()?),
            "--out" => a.out = Some(PathBuf::from(value()?)),
            "--quick" => {
                a.events = 50_000;
                a.one_row = 5_000;
                a.live_secs = 5;
                a.rounds = 1;
                a.big_txn = 200_000;
            }
            "--help" | "-h" => {
                println!(
                    "outboxd-bench [--events N] [--one-row N] [--rates R1,R2,..] [--live-secs S] \
                     [--rounds R] [--big-txn N] [--no-kafka] [--kafka-batch N] [--no-reference] [--quick] [--only live|drain|outbox-size] [--out DIR]\n\
                     Writes the results table and chart into DIR (e.g. docs) when --out is given.\n\
                     --no-reference: the live scenario without pg_recvlogical (for profiling).\n\
                     Each scenario runs R times (default 3; 1 with --quick): drains and the relay\n\
                     report the median, live runs pool their latencies."
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?} (see --help)"),
        }
    }
    Ok(a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    Redis,
    /// A one-node Apache Kafka broker (KRaft), from the jars the tests run.
    Kafka,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Redis => "redis",
            Broker::Kafka => "kafka (Apache Kafka, one node)",
        }
    }
}

/// Where a Kafka-protocol broker is, and whether outboxd must create the topics.
#[derive(Debug, Clone)]
struct KafkaTarget {
    brokers: String,
    /// `sink.max_batch_events`, when not outboxd's default.
    max_batch: Option<u64>,
    /// The broker's JVM, whose CPU time the drain reports.
    pid: Option<u32>,
    create_topics: bool,
}

/// outboxd's environment overrides for a broker.
fn broker_env(broker: Broker, kafka: Option<&KafkaTarget>) -> Vec<(String, String)> {
    broker_env_mode(broker, kafka, false)
}

/// The same, in effectively-once mode when `effectively_once`.
fn broker_env_mode(
    broker: Broker,
    kafka: Option<&KafkaTarget>,
    effectively_once: bool,
) -> Vec<(String, String)> {
    let mut env = vec![("OUTBOXD_LOG".to_owned(), "info".to_owned())];
    if effectively_once {
        env.push((
            "OUTBOXD_SINK__DELIVERY".to_owned(),
            "effectively-once".to_owned(),
        ));
    }
    if broker != Broker::Redis {
        let kafka = kafka.expect("a Kafka broker");
        env.extend([
            ("OUTBOXD_SINK__KIND".to_owned(), "kafka".to_owned()),
            (
                "OUTBOXD_SINK__KAFKA__BROKERS".to_owned(),
                kafka.brokers.clone(),
            ),
            (
                "OUTBOXD_SINK__KAFKA__CREATE_TOPICS".to_owned(),
                kafka.create_topics.to_string(),
            ),
            // The outbox topic in 3 partitions (100 keys).
            (
                "OUTBOXD_SINK__KAFKA__TOPIC_PARTITIONS".to_owned(),
                "3".to_owned(),
            ),
        ]);
        if let Some(n) = kafka.max_batch {
            env.push(("OUTBOXD_SINK__MAX_BATCH_EVENTS".to_owned(), n.to_string()));
        }
    }
    env
}

fn run_outboxd(env: &Env, vars: &[(String, String)]) -> Outboxd {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.run_with(&vars)
}

/// Writes `count` table-less events from `first` in transactions of `per_txn` events, with the
/// content `outbox_emit_message` writes (the same fields and padding as `write_backlog`).
async fn write_message_backlog(db: &Client, first: u64, count: u64, per_txn: u64) {
    let emit = db
        .prepare(
            "SELECT count(pg_logical_emit_message(true, 'outboxd', json_build_object( \
                 'id', gen_random_uuid()::text, 'aggregate_type', 'order', \
                 'aggregate_id', 'k' || (g % 100), 'event_type', 'order.created', \
                 'payload', jsonb_build_object('seq', g, 'pad', repeat('x', $3::int))::text, \
                 'headers', '{}', 'created_at', now()::text)::text)) \
             FROM generate_series($1::bigint, $2::bigint) AS g",
        )
        .await
        .unwrap();
    let pad = PAD as i32;
    let mut seq = first;
    while seq < first + count {
        let m = per_txn.min(first + count - seq);
        db.query_one(&emit, &[&(seq as i64), &((seq + m - 1) as i64), &pad])
            .await
            .unwrap();
        seq += m;
    }
}

/// Writes `count` events from `first` in transactions of `per_txn` rows (INSERT … SELECT).
async fn write_backlog(db: &Client, first: u64, count: u64, per_txn: u64) {
    let insert = db
        .prepare(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'k' || (g % 100), 'order.created', \
                    jsonb_build_object('seq', g, 'pad', repeat('x', $3::int)) \
             FROM generate_series($1::bigint, $2::bigint) AS g",
        )
        .await
        .unwrap();
    let mut seq = first;
    while seq < first + count {
        // Up to 64 transactions in flight on the connection: each still commits on its own.
        let mut pending = Vec::new();
        let mut k = seq;
        while k < first + count && pending.len() < 64 {
            let m = per_txn.min(first + count - k);
            let (a, b) = (k as i64, (k + m - 1) as i64);
            pending.push((a, b));
            k += m;
        }
        let pad = PAD as i32;
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 3]> = pending
            .iter()
            .map(|(a, b)| [a as _, b as _, &pad as _])
            .collect();
        let futures = params.iter().map(|p| db.execute(&insert, p));
        for r in futures::future::join_all(futures).await {
            r.unwrap();
        }
        seq = k;
    }
}

async fn current_lsn(db: &Client) -> String {
    db.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Reads the slot's WAL up to `end` with pg_recvlogical; returns the seconds it took.
fn pg_recvlogical(pg: &Postgres, slot: &str, end: &str) -> f64 {
    let bin = pg_bin().join("pg_recvlogical");
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        .args(["-d", &pg.admin_url("app"), "--slot", slot, "--start"])
        .args(["--endpos", end, "--no-loop", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=outboxd"])
        // Table-less events are messages: the reference decodes them too.
        .args(["-o", "messages=true"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_recvlogical failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

/// How many events reached the broker: Redis' own count, or for Kafka the events outboxd
/// counted as acknowledged by delivery reports (`/metrics` on `http_port`).
async fn delivered(broker: Broker, redis: &mut MultiplexedConnection, http_port: u16) -> u64 {
    match broker {
        Broker::Redis => stream_len(redis, "outbox.order").await,
        Broker::Kafka => http_get(http_port, "/metrics")
            .await
            .and_then(|(_, text)| {
                metric(
                    &text,
                    "outboxd_events_forwarded_total{topic=\"outbox.order\"}",
                )
            })
            .map_or(0, |n| n as u64),
    }
}

/// Waits until `slot` is streamed; returns when it was first seen active.
async fn wait_active(db: &Client, slot: &str) -> Instant {
    loop {
        let active: bool = db
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, Clone)]
struct Drain {
    broker: Broker,
    effectively_once: bool,
    per_txn: u64,
    events: u64,
    outboxd_eps: f64,
    reference_eps: f64,
    /// pg_recvlogical's fixed cost (connecting, noticing the end position), measured on an
    /// empty backlog and taken out of the reference's time.
    reference_overhead_secs: f64,
    /// outboxd's rate over the reference's.
    ratio: f64,
    /// The ratio of each round (one for a single run).
    round_ratios: Vec<f64>,
    /// `sink.max_batch_events`, when not outboxd's default.
    max_batch: Option<u64>,
    /// Table-less events (`postgres.source = "messages"`) instead of table rows.
    table_less: bool,
}

impl Drain {
    /// The rounds of one scenario as one result: the median of each rate and of the ratios
    /// (each round's ratio compares outboxd with pg_recvlogical on the same WAL).
    fn median(rounds: &[Drain]) -> Drain {
        let pick = |f: fn(&Drain) -> f64| median(rounds.iter().map(f).collect());
        Drain {
            outboxd_eps: pick(|d| d.outboxd_eps),
            reference_eps: pick(|d| d.reference_eps),
            reference_overhead_secs: pick(|d| d.reference_overhead_secs),
            ratio: pick(|d| d.ratio),
            round_ratios: rounds.iter().map(|d| d.ratio).collect(),
            ..rounds[0].clone()
        }
    }

    fn same_scenario(&self, other: &Drain) -> bool {
        (
            self.broker,
            self.per_txn,
            self.effectively_once,
            self.table_less,
        ) == (
            other.broker,
            other.per_txn,
            other.effectively_once,
            other.table_less,
        )
    }
}

/// The median (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Scenario 1 and 2: a backlog drained by outboxd, against pg_recvlogical on the same WAL.
async fn drain(
    broker: Broker,
    per_txn: u64,
    events: u64,
    kafka: Option<&KafkaTarget>,
    effectively_once: bool,
    table_less: bool,
) -> Drain {
    let env = Env::start().await;
    let db = env.db().await;
    for slot in ["reference_a", "reference_b"] {
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    }
    if table_less {
        write_message_backlog(&db, 0, events, per_txn).await;
    } else {
        write_backlog(&db, 0, events, per_txn).await;
    }
    let end = current_lsn(&db).await;
    db.execute(
        "SELECT pg_create_logical_replication_slot('reference_empty', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    let empty_end = current_lsn(&db).await;
    db.batch_execute("CHECKPOINT").await.unwrap();

    let overhead = pg_recvlogical(&env.pg, "reference_empty", &empty_end);
    let reference_a = pg_recvlogical(&env.pg, "reference_a", &end);

    let mut redis = env.redis.connect().await;
    let mut vars = broker_env_mode(broker, kafka, effectively_once);
    if table_less {
        vars.push(("OUTBOXD_POSTGRES__SOURCE".to_owned(), "messages".to_owned()));
    }
    let mut outboxd = run_outboxd(&env, &vars);
    let started = wait_active(&db, "outboxd").await;
    let broker_pid = kafka.and_then(|k| k.pid);
    let cpu_before = (cpu_seconds(outboxd.pid()), broker_pid.and_then(cpu_seconds));
    let deadline = started + Duration::from_secs(600);
    while delivered(broker, &mut redis, env.http_port).await < events {
        assert!(
            Instant::now() < deadline,
            "outboxd did not drain the backlog:\n{}",
            outboxd.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outboxd_secs = started.elapsed().as_secs_f64();
    let per_event = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(b), Some(a)) => format!("{:.1} µs", (a - b) * 1e6 / events as f64),
        _ => "-".to_owned(),
    };
    let cpu = format!(
        "CPU per event: outboxd {}, broker {}",
        per_event(cpu_before.0, cpu_seconds(outboxd.pid())),
        per_event(cpu_before.1, broker_pid.and_then(cpu_seconds))
    );
    outboxd.sigterm();
    outboxd.wait(Duration::from_secs(60));

    let reference_b = pg_recvlogical(&env.pg, "reference_b", &end);
    // The reference without its fixed cost: the stricter comparison for outboxd, whose time
    // starts when its slot is active.
    let reference_secs = ((reference_a + reference_b) / 2.0 - overhead).max(0.001);
    let result = Drain {
        broker,
        effectively_once,
        per_txn,
        events,
        outboxd_eps: events as f64 / outboxd_secs,
        reference_eps: events as f64 / reference_secs,
        reference_overhead_secs: overhead,
        ratio: reference_secs / outboxd_secs,
        round_ratios: vec![reference_secs / outboxd_secs],
        max_batch: kafka.and_then(|k| k.max_batch),
        table_less,
    };
    println!(
        "drain {}{}{} ({} events, {}-row transactions): outboxd {:.0} events/s, pg_recvlogical {:.0} events/s ({reference_a:.2} s and {reference_b:.2} s, less {overhead:.2} s of fixed cost), ratio {:.1} %; {cpu}",
        broker.name(),
        if effectively_once {
            " effectively-once"
        } else {
            ""
        },
        if table_less { " table-less" } else { "" },
        events,
        per_txn,
        result.outboxd_eps,
        result.reference_eps,
        100.0 * result.ratio
    );
    result
}

#[derive(Debug, Clone)]
struct Live {
    observer: Observer,
    rate: u64,
    achieved: f64,
    /// Every latency measured (ms), sorted.
    latencies: Vec<f64>,
    /// CPU time of the observing process (outboxd or pg_recvlogical) per event, µs.
    cpu_us_per_event: f64,
    /// The p99 of each round (one for a single run), ms.
    round_p99s: Vec<f64>,
    /// The share of the machine's CPU time the hypervisor stole in each round, percent.
    round_steal: Vec<f64>,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Live {
    fn new(
        observer: Observer,
        rate: u64,
        achieved: f64,
        mut latencies: Vec<f64>,
        cpu_us_per_event: f64,
        steal_pct: f64,
    ) -> Live {
        latencies.sort_by(f64::total_cmp);
        let p99 = percentile(&latencies, 99.0);
        Live {
            cpu_us_per_event,
            round_p99s: vec![p99],
            round_steal: vec![steal_pct],
            observer,
            rate,
            achieved,
            p50_ms: percentile(&latencies, 50.0),
            p99_ms: p99,
            max_ms: latencies.last().copied().unwrap_or(f64::NAN),
            latencies,
        }
    }

    /// The rounds of one observer and rate as one run: every latency pooled, the achieved
    /// rates averaged.
    fn pool(rounds: &[Live]) -> Live {
        let achieved = rounds.iter().map(|l| l.achieved).sum::<f64>() / rounds.len() as f64;
        let all = rounds
            .iter()
            .flat_map(|l| l.latencies.iter().copied())
            .collect();
        let cpu = rounds.iter().map(|l| l.cpu_us_per_event).sum::<f64>() / rounds.len() as f64;
        let mut pooled = Live::new(rounds[0].observer, rounds[0].rate, achieved, all, cpu, 0.0);
        pooled.round_p99s = rounds.iter().flat_map(|l| l.round_p99s.clone()).collect();
        pooled.round_steal = rounds.iter().flat_map(|l| l.round_steal.clone()).collect();
        pooled
    }

    /// " (p99 per round: 5.1 ms at 2 % steal, …)", or nothing for a single round.
    fn per_round(&self) -> String {
        if self.round_p99s.len() < 2 {
            return String::new();
        }
        let each: Vec<String> = self
            .round_p99s
            .iter()
            .zip(&self.round_steal)
            .map(|(p, st)| format!("{p:.1} ms at {st:.0} % steal"))
            .collect();
        format!(" (p99 per round: {})", each.join(", "))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Scenario 3, in `rounds` rounds. Each round measures every rate twice: first the
/// reference (pg_recvlogical, on a new Postgres with no outboxd), then outboxd forwarding to
/// Redis (on another new Postgres). The rounds of each observer and rate are pooled: this
/// machine's latency comes and goes, and alternating spreads it over both. Postgres takes
/// extra settings from `BENCH_PG_CONF` (`;`-separated), for experiments.
async fn lives(args: &Args) -> Vec<Live> {
    let conf: Vec<String> = std::env::var("BENCH_PG_CONF")
        .map(|c| c.split(';').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut lines = vec!["wal_level = logical"];
    lines.extend(conf.iter().map(String::as_str));
    let mut rounds: Vec<Live> = Vec::new();
    for round in 1..=args.rounds {
        println!("live round {round} of {}", args.rounds);
        // Each goes first in every other round.
        let mut order = [Observer::PgRecvlogical, Observer::Outboxd];
        if round % 2 == 0 {
            order.reverse();
        }
        for observer in order {
            if args.no_reference && observer == Observer::PgRecvlogical {
                continue;
            }
            let env = Env::new(Postgres::start_with(&lines), "").await;
            env.setup();
            let outboxd = (observer == Observer::Outboxd).then(|| {
                let o = run_outboxd(&env, &broker_env(Broker::Redis, None));
                println!("outboxd pid {}, http {}", o.pid(), env.http_port);
                o
            });
            if outboxd.is_some() {
                wait_active(&env.db().await, "outboxd").await;
            }
            let mut first = 0;
            for &rate in &args.rates {
                let pid = outboxd.as_ref().map(|o| o.pid());
                rounds.push(live(&env, first, rate, args.live_secs, observer, pid).await);
                first += rate * args.live_secs;
            }
            if outboxd.is_some()
                && let Some((_, text)) = http_get(env.http_port, "/metrics").await
            {
                let buckets = text.lines().filter(|l| {
                    l.starts_with("outboxd_commit_to_")
                        && l.contains("_bucket")
                        && ["0.001\"", "0.005\"", "0.025\"", "0.1\"", "Inf\""]
                            .iter()
                            .any(|le| l.contains(le))
                });
                println!(
                    "outboxd's histograms (all rates): {}",
                    buckets.collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    let mut pooled = Vec::new();
    for observer in [Observer::PgRecvlogical, Observer::Outboxd] {
        for &rate in &args.rates {
            let of: Vec<Live> = rounds
                .iter()
                .filter(|l| l.observer == observer && l.rate == rate)
                .cloned()
                .collect();
            if of.is_empty() {
                continue;
            }
            let p = Live::pool(&of);
            println!(
                "live {rate} events/s, {} rounds pooled: commit to {} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} CPU {:.1} µs per event{}",
                of.len(),
                observer.arrival(),
                p.p50_ms,
                p.p99_ms,
                p.max_ms,
                observer.process(),
                p.cpu_us_per_event,
                p.per_round()
            );
            pooled.push(p);
        }
    }
    pooled
}

/// CPU time (user + system) a process has used so far, in seconds (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// The machine's CPU time so far from `/proc/stat` (all CPUs, in ticks): (total, idle, steal).
/// Steal is time the hypervisor gave this VM's CPUs to someone else.
fn machine_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total = v.iter().take(8).sum();
    Some((total, *v.get(3)? + *v.get(4)?, *v.get(7)?))
}

/// Idle and steal shares (percent) of the machine between two [`machine_ticks`] readings.
fn idle_and_steal(before: Option<(u64, u64, u64)>, after: Option<(u64, u64, u64)>) -> (f64, f64) {
    match (before, after) {
        (Some((t0, i0, s0)), Some((t1, i1, s1))) if t1 > t0 => {
            let total = (t1 - t0) as f64;
            (
                100.0 * (i1 - i0) as f64 / total,
                100.0 * (s1 - s0) as f64 / total,
            )
        }
        _ => (f64::NAN, f64::NAN),
    }
}

/// `getconf CLK_TCK`: the unit of `/proc/PID/stat`'s times (100 on Linux).
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Who is watching the live events arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Observer {
    /// outboxd forwards them; a reader blocks on the Redis stream (XREAD).
    Outboxd,
    /// The reference: `pg_recvlogical` streams the same publication from its own slot, and a
    /// thread notes when each row appears on its output. The latency of Postgres' own
    /// decoder on this machine, with no broker.
    PgRecvlogical,
}

/// Notes when each event shows up; ends once `total` did.
enum Watch {
    Redis(tokio::task::JoinHandle<()>),
    Recvlogical(std::process::Child, std::thread::JoinHandle<()>),
}

/// Scenario 3: events committed at `rate` per second for `secs`; commit-to-visible latency.
/// `outboxd` is the pid of the running outboxd (with [`Observer::Outboxd`]), whose CPU time is
/// measured; with the reference, pg_recvlogical's is.
async fn live(
    env: &Env,
    first: u64,
    rate: u64,
    secs: u64,
    observer: Observer,
    outboxd: Option<u32>,
) -> Live {
    const WRITERS: usize = 4;
    let total = rate * secs;
    let commits: Arc<Mutex<HashMap<u64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let arrivals: Arc<Mutex<HashMap<u64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let seen = arrivals.clone();
    let watch = match observer {
        Observer::Outboxd => Watch::Redis(watch_redis(env, seen, total).await),
        Observer::PgRecvlogical => {
            let (child, thread) = watch_recvlogical(env, seen, first, total).await;
            Watch::Recvlogical(child, thread)
        }
    };
    let measured = match &watch {
        Watch::Redis(_) => outboxd,
        Watch::Recvlogical(child, _) => Some(child.id()),
    };
    let cpu_before = measured.and_then(cpu_seconds);
    let machine_before = machine_ticks();

    // The writers: one-row transactions (up to 5,000/s), more rows per transaction above.
    let per_txn = (rate / 5_000).max(1);
    let txns = total / per_txn;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS as u64 {
        let db = env.db().await;
        let commits = commits.clone();
        tasks.push(tokio::spawn(async move {
            // One row: INSERT … VALUES, which costs the backend about half as much as
            // INSERT … SELECT (measured with pgbench here), leaving more of the machine to
            // what is measured.
            let insert = db
                .prepare(if per_txn == 1 {
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('order', 'k' || ($1::bigint % 100), 'order.created', \
                             jsonb_build_object('seq', $1::bigint, 'pad', repeat('x', 270)))"
                } else {
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     SELECT 'order', 'k' || (g % 100), 'order.created', \
                            jsonb_build_object('seq', g, 'pad', repeat('x', 270)) \
                     FROM generate_series($1::bigint, $2::bigint) AS g"
                })
                .await
                .unwrap();
            let mut t = w;
            while t < txns {
                let due =
                    started + Duration::from_secs_f64(t as f64 * per_txn as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let a = first + t * per_txn;
                let b = a + per_txn - 1;
                let (a64, b64) = (a as i64, b as i64);
                let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
                    if per_txn == 1 { &[&a64] } else { &[&a64, &b64] };
                db.execute(&insert, params).await.unwrap();
                let now = Instant::now();
                let mut c = commits.lock().unwrap();
                for seq in a..=b {
                    c.insert(seq, now);
                }
                t += WRITERS as u64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let (idle_pct, steal_pct) = idle_and_steal(machine_before, machine_ticks());
    let cpu_us_per_event = || {
        let used = measured.and_then(cpu_seconds)? - cpu_before?;
        Some(used * 1e6 / total as f64)
    };
    let cpu_us_per_event = match watch {
        Watch::Redis(task) => {
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("every live event arrives")
                .unwrap();
            cpu_us_per_event()
        }
        Watch::Recvlogical(mut child, thread) => {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !thread.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "pg_recvlogical did not show every live event"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let cpu = cpu_us_per_event();
            let _ = child.kill();
            let _ = child.wait();
            thread.join().unwrap();
            env.db()
                .await
                .execute("SELECT pg_drop_replication_slot('reference_live')", &[])
                .await
                .unwrap();
            cpu
        }
    };

    let commits = commits.lock().unwrap();
    let arrivals = arrivals.lock().unwrap();
    // The first second is a warm-up (connections start, caches fill): not counted.
    let warm = started + Duration::from_secs(1);
    let latencies: Vec<f64> = commits
        .iter()
        .filter(|(_, c)| **c >= warm)
        .filter_map(|(seq, c)| {
            arrivals
                .get(seq)
                .map(|a| a.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        })
        .collect();
    if std::env::var("BENCH_SERIES").is_ok() {
        let mut per: std::collections::BTreeMap<u64, f64> = Default::default();
        for (seq, c) in commits.iter() {
            if let Some(a) = arrivals.get(seq) {
                let slot = (c.duration_since(started).as_millis() / 250) as u64;
                let l = a.saturating_duration_since(*c).as_secs_f64() * 1000.0;
                let e = per.entry(slot).or_default();
                *e = e.max(l);
            }
        }
        println!(
            "max latency per 250 ms: {:?}",
            per.values().map(|v| *v as u64).collect::<Vec<_>>()
        );
    }
    let result = Live::new(
        observer,
        rate,
        achieved,
        latencies,
        cpu_us_per_event.unwrap_or(f64::NAN),
        steal_pct,
    );
    println!(
        "live {rate} events/s (achieved {achieved:.0}): commit to {} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} CPU {:.1} µs per event; machine idle {idle_pct:.0} %, stolen by the hypervisor {steal_pct:.1} %",
        observer.arrival(),
        result.p50_ms,
        result.p99_ms,
        result.max_ms,
        observer.process(),
        result.cpu_us_per_event
    );
    result
}

impl Observer {
    /// The process whose CPU time is measured.
    fn process(self) -> &'static str {
        match self {
            Observer::Outboxd => "outboxd",
            Observer::PgRecvlogical => "pg_recvlogical",
        }
    }

    /// Where the latency ends, for the report.
    fn arrival(self) -> &'static str {
        match self {
            Observer::Outboxd => "readable in Redis",
            Observer::PgRecvlogical => "pg_recvlogical output (reference)",
        }
    }
}

/// XREAD BLOCK from the end of the stream, noting when each event shows up.
async fn watch_redis(
    env: &Env,
    seen: Arc<Mutex<HashMap<u64, Instant>>>,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    let mut reader = env.redis.connect().await;
    let start_id: String = {
        let last: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
            .arg("outbox.order")
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut reader)
            .await
            .unwrap();
        last.first()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone())
    };
    tokio::spawn(async move {
        let mut after = start_id;
        loop {
            let reply: redis::Value = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(100)
                .arg("COUNT")
                .arg(5000)
                .arg("STREAMS")
                .arg("outbox.order")
                .arg(&after)
                .query_async(&mut reader)
                .await
                .unwrap();
            let now = Instant::now();
            for (id, seq) in xread_seqs(&reply) {
                seen.lock().unwrap().insert(seq, now);
                after = id;
            }
            if seen.lock().unwrap().len() as u64 >= total {
                return;
            }
        }
    })
}

/// Starts `pg_recvlogical` on a new slot `reference_live` (pgoutput, the outbox publication,
/// output to a pipe) and a thread that notes when each row with a `seq` from `first` appears
/// in its output. Returns once the slot is streamed.
async fn watch_recvlogical(
    env: &Env,
    seen: Arc<Mutex<HashMap<u64, Instant>>>,
    first: u64,
    total: u64,
) -> (std::process::Child, std::thread::JoinHandle<()>) {
    use std::io::Read;
    let db = env.db().await;
    db.execute(
        "SELECT pg_create_logical_replication_slot('reference_live', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    let mut child = std::process::Command::new(pg_bin().join("pg_recvlogical"))
        .args(["-d", &env.pg.admin_url("app"), "--slot", "reference_live"])
        .args(["--start", "--no-loop", "-f", "-", "-F", "0"])
        .args(["-o", "proto_version=1", "-o", "publication_names=outboxd"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pg_recvlogical");
    let mut out = child.stdout.take().unwrap();
    let thread = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        // The unfinished tail of the previous read (a row may span two reads).
        let mut carry: Vec<u8> = Vec::new();
        let mut count = 0u64;
        while count < total {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = Instant::now();
            carry.extend_from_slice(&buf[..n]);
            let mut rest = &carry[..];
            let mut seen = seen.lock().unwrap();
            // Each row is followed by a newline (pg_recvlogical ends every message with one;
            // the JSON text holds none).
            while let Some(end) = rest.iter().position(|b| *b == b'\n') {
                if let Some(seq) = payload_seq(&rest[..end])
                    && seq >= first
                    && seen.insert(seq, now).is_none()
                {
                    count += 1;
                }
                rest = &rest[end + 1..];
            }
            carry = rest.to_vec();
        }
    });
    wait_active(&db, "reference_live").await;
    (child, thread)
}

/// (entry id, payload seq) of an XREAD reply.
fn xread_seqs(reply: &redis::Value) -> Vec<(String, u64)> {
    use redis::Value;
    let mut out = Vec::new();
    let streams: Vec<&Value> = match reply {
        Value::Array(s) => s.iter().collect(),
        Value::Map(m) => m.iter().map(|(_, v)| v).collect(),
        _ => return out,
    };
    for stream in streams {
        let entries = match stream {
            Value::Array(pair) if pair.len() == 2 => &pair[1],
            other => other,
        };
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) =
                (parts.first(), parts.get(1))
            else {
                continue;
            };
            let mut seq = None;
            for kv in fields.chunks(2) {
                if let [Value::BulkString(k), Value::BulkString(v)] = kv
                    && k == b"payload"
                {
                    seq = payload_seq(v);
                }
            }
            if let Some(seq) = seq {
                out.push((String::from_utf8_lossy(id).into_owned(), seq));
            }
        }
    }
    out
}

/// The `seq` of a payload `{"seq": N, ...}`, without parsing the JSON (the reader must stay
/// light: it shares the machine with what it measures).
fn payload_seq(payload: &[u8]) -> Option<u64> {
    let at = payload.windows(6).position(|w| w == b"\"seq\":")? + 6;
    let digits = payload[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n * 10 + u64::from(d - b'0');
        any = true;
    }
    any.then_some(n)
}

/// Scenario 4: one transaction of `rows` rows; outboxd's peak RSS.
async fn big_transaction(rows: u64) -> (u64, f64) {
    let env = Env::start().await;
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    let outboxd = run_outboxd(&env, &broker_env(Broker::Redis, None));
    wait_active(&db, "outboxd").await;
    write_backlog(&db, 0, rows, rows).await;
    let started = Instant::now();
    while stream_len(&mut redis, "outbox.order").await < rows {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the transaction did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let (_, peak) = outboxd.rss_kib().unwrap();
    println!(
        "one {rows}-row transaction: forwarded in {secs:.1} s after its commit; outboxd peak RSS {:.1} MiB",
        peak as f64 / 1024.0
    );
    (peak, secs)
}

/// What one way of writing events costs the writers (scenario 6).
#[derive(Debug, Clone)]
struct WriteCost {
    style: &'static str,
    commits_per_s: f64,
    wal_bytes_per_event: f64,
    table_bytes_per_event: f64,
}

/// The ways of writing an event that keep the outbox small, against a kept row, in the same
/// run (one-row transactions, 16 in flight on one connection; ~300-byte payloads).
const WRITE_STYLES: &[(&str, &str)] = &[
    (
        "INSERT (no function)",
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'order.created', $2::text::jsonb)",
    ),
    (
        "outbox_emit (row kept)",
        "SELECT outbox_emit('order', $1, 'order.created', $2::text::jsonb)",
    ),
    (
        "outbox_emit(keep => false)",
        "SELECT outbox_emit('order', $1, 'order.created', $2::text::jsonb, '{}', false)",
    ),
    (
        "outbox_emit_message (table-less)",
        "SELECT outbox_emit_message('order', $1, 'order.created', $2::text::jsonb)",
    ),
];

async fn wal_and_table_bytes(db: &Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT (pg_current_wal_lsn() - '0/0')::bigint, pg_total_relation_size('outbox')",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Scenario 6a: each write style for `events` one-row transactions, in alternating rounds.
async fn write_costs(events: u64, rounds: u64) -> Vec<WriteCost> {
    let env = Env::start().await;
    let db = env.db().await;
    let pad = "x".repeat(PAD);
    let mut per_style: Vec<Vec<WriteCost>> = vec![Vec::new(); WRITE_STYLES.len()];
    for round in 0..rounds {
        for (i, (style, sql)) in WRITE_STYLES.iter().enumerate() {
            let statement = db.prepare(sql).await.unwrap();
            db.batch_execute("CHECKPOINT").await.unwrap();
            let (wal_before, table_before) = wal_and_table_bytes(&db).await;
            let started = Instant::now();
            let mut seq = round * events;
            let end = seq + events;
            while seq < end {
                let batch: Vec<(String, String)> = (seq..(seq + 16).min(end))
                    .map(|n| {
                        (
                            format!("k{}", n % 100),
                            format!(r#"{{"seq": {n}, "pad": "{pad}"}}"#),
                        )
                    })
                    .collect();
                let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 2]> = batch
                    .iter()
                    .map(|(key, payload)| [key as _, payload as _])
                    .collect();
                let futures = params.iter().map(|p| db.execute(&statement, p));
                for r in futures::future::join_all(futures).await {
                    r.unwrap();
                }
                seq = end.min(seq + 16);
            }
            let secs = started.elapsed().as_secs_f64();
            let (wal_after, table_after) = wal_and_table_bytes(&db).await;
            per_style[i].push(WriteCost {
                style,
                commits_per_s: events as f64 / secs,
                wal_bytes_per_event: (wal_after - wal_before) as f64 / events as f64,
                table_bytes_per_event: (table_after - table_before) as f64 / events as f64,
            });
        }
    }
    per_style
        .into_iter()
        .map(|costs| WriteCost {
            commits_per_s: median(costs.iter().map(|c| c.commits_per_s).collect()),
            wal_bytes_per_event: median(costs.iter().map(|c| c.wal_bytes_per_event).collect()),
            table_bytes_per_event: median(costs.iter().map(|c| c.table_bytes_per_event).collect()),
            ..costs[0].clone()
        })
        .collect()
}

/// What pruning `rows` rows cost (scenario 6b).
#[derive(Debug, Clone)]
struct PruneCost {
    rows: u64,
    prune_secs: f64,
    wal_bytes_per_row: f64,
    dead_tuples: i64,
    vacuum_secs: f64,
    table_bytes_before: i64,
    table_bytes_after_vacuum: i64,
}

/// Scenario 6b: `rows` rows forwarded by outboxd, then deleted by `outboxd prune` (which
/// waits for the slot's confirmation), then a VACUUM.
async fn prune_cost(rows: u64) -> PruneCost {
    let env = Env::start().await;
    let db = env.db().await;
    db.batch_execute("GRANT DELETE ON outbox TO outboxd")
        .await
        .unwrap();
    write_backlog(&db, 0, rows, 1000).await;
    let mut redis = env.redis.connect().await;
    let mut outboxd = run_outboxd(&env, &broker_env(Broker::Redis, None));
    while stream_len(&mut redis, "outbox.order").await < rows {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    let (wal_before, table_bytes_before) = wal_and_table_bytes(&db).await;
    let started = Instant::now();
    let out = env.command(&["prune", "--older-than", "0s"]);
    let prune_secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "outboxd prune: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (wal_after, _) = wal_and_table_bytes(&db).await;
    // The statistics collector reports dead tuples with a delay.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let dead_tuples: i64 = db
        .query_one(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let started = Instant::now();
    db.batch_execute("VACUUM outbox").await.unwrap();
    let vacuum_secs = started.elapsed().as_secs_f64();
    let (_, table_bytes_after_vacuum) = wal_and_table_bytes(&db).await;
    outboxd.sigterm();
    outboxd.wait(Duration::from_secs(60));
    PruneCost {
        rows,
        prune_secs,
        wal_bytes_per_row: (wal_after - wal_before) as f64 / rows as f64,
        dead_tuples,
        vacuum_secs,
        table_bytes_before,
        table_bytes_after_vacuum,
    }
}

/// The rows of the outbox-size scenarios.
fn render_outbox_size(writes: &[WriteCost], prune: &PruneCost) -> String {
    let mut t = String::from(
        "| way of writing an event (one-row transactions) | commits/s | WAL per event | table growth per event |\n|---|---|---|---|\n",
    );
    for w in writes {
        t.push_str(&format!(
            "| {} | {:.0} | {:.0} B | {:.0} B |\n",
            w.style, w.commits_per_s, w.wal_bytes_per_event, w.table_bytes_per_event
        ));
    }
    t.push_str(&format!(
        "\nPruning {} forwarded rows with `outboxd prune --older-than 0s`: {:.2} s ({:.0} rows/s, \
         including the wait for the slot's confirmation), {:.0} B of WAL per row, {} dead tuples \
         left; `VACUUM` {:.2} s; table and indexes {:.1} MiB before, {:.1} MiB after (VACUUM \
         returns empty pages at the end of the file; space freed in between is reused by new \
         rows, not returned).\n",
        prune.rows,
        prune.prune_secs,
        prune.rows as f64 / prune.prune_secs,
        prune.wal_bytes_per_row,
        prune.dead_tuples,
        prune.vacuum_secs,
        prune.table_bytes_before as f64 / 1048576.0,
        prune.table_bytes_after_vacuum as f64 / 1048576.0,
    ));
    t
}

/// Scenario 5: a polling relay on the same kind of backlog.
async fn polling_relay(events: u64) -> f64 {
    let env = Env::start().await;
    let db = env.db().await;
    db.batch_execute(
        "ALTER TABLE outbox ADD COLUMN published_at timestamptz; \
         CREATE INDEX outbox_unpublished ON outbox (created_at, id) WHERE published_at IS NULL",
    )
    .await
    .unwrap();
    write_backlog(&db, 0, events, 1000).await;
    let mut relay = env.db().await;
    let mut redis = env.redis.connect().await;
    let started = Instant::now();
    let mut published = 0;
    while published < events {
        let tx = relay.transaction().await.unwrap();
        let rows = tx
            .query(
                "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, headers::text \
                 FROM outbox WHERE published_at IS NULL ORDER BY created_at, id \
                 LIMIT 1000 FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await
            .unwrap();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.get(0);
            let topic = format!("outbox.{}", row.get::<_, String>(1));
            pipe.cmd("XADD")
                .arg(topic)
                .arg("*")
                .arg("id")
                .arg(&id)
                .arg("type")
                .arg(row.get::<_, String>(3))
                .arg("key")
                .arg(row.get::<_, String>(2))
                .arg("payload")
                .arg(row.get::<_, String>(4))
                .arg("headers")
                .arg(row.get::<_, String>(5))
                .ignore();
            ids.push(id);
        }
        let () = pipe.query_async(&mut redis).await.unwrap();
        tx.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::text[]::uuid[])",
            &[&ids],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        published += rows.len() as u64;
    }
    let eps = events as f64 / started.elapsed().as_secs_f64();
    println!("polling relay ({events} events, batches of 1,000): {eps:.0} events/s");
    eps
}

fn versions() -> String {
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
    let kafka = support::apache_kafka::jars_dir()
        .parent()
        .and_then(|v| v.file_name())
        .map_or_else(String::new, |v| v.to_string_lossy().into_owned());
    format!(
        "{pg}; Redis {redis}; Apache Kafka {kafka} (one KRaft node); {cpus} CPUs; outboxd release build"
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    println!("outboxd benchmark: {}", versions());
    if args.only.as_deref() == Some("live") {
        // Only the live scenario, for profiling.
        lives(&args).await;
        return Ok(());
    }
    if args.only.as_deref() == Some("outbox-size") {
        let writes = write_costs(args.one_row, args.rounds).await;
        let prune = prune_cost(args.one_row * 5).await;
        println!("\n{}", render_outbox_size(&writes, &prune));
        return Ok(());
    }

    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        println!("drain round {round} of {}", args.rounds);
        rounds.extend(drains(&args).await?);
    }
    let mut drains: Vec<Drain> = Vec::new();
    for d in &rounds {
        if !drains.iter().any(|m| m.same_scenario(d)) {
            let same: Vec<Drain> = rounds
                .iter()
                .filter(|r| r.same_scenario(d))
                .cloned()
                .collect();
            drains.push(Drain::median(&same));
        }
    }
    if args.only.as_deref() == Some("drain") {
        println!("\n{}", render_drains(&drains));
        return Ok(());
    }

    let lives = lives(&args).await;

    let writes = write_costs(args.one_row, args.rounds).await;
    let prune = prune_cost(args.one_row * 5).await;
    println!("\n{}", render_outbox_size(&writes, &prune));

    let (peak_kib, big_secs) = big_transaction(args.big_txn).await;
    let mut relays = Vec::new();
    for _ in 0..args.rounds {
        relays.push(polling_relay(args.events).await);
    }
    let relay_eps = median(relays);

    let results = json!({
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
        "big_transaction": { "rows": args.big_txn, "peak_rss_mib": peak_kib as f64 / 1024.0, "seconds": big_secs },
        "polling_relay_events_per_s": relay_eps.round(),
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
    });
    let table = format!(
        "{}\n{}",
        render_table(&args, &drains, &lives, peak_kib, relay_eps),
        render_outbox_size(&writes, &prune)
    );
    println!("\n{table}");
    if let Some(dir) = &args.out {
        write_results(dir, &results, &table)?;
    }
    Ok(())
}

/// " (per round: a, b, c)" in percent, or nothing for one round.
fn per_round(ratios: &[f64]) -> String {
    if ratios.len() < 2 {
        return String::new();
    }
    let each: Vec<String> = ratios.iter().map(|r| format!("{:.0}", 100.0 * r)).collect();
    format!(" (rounds: {})", each.join(", "))
}

/// Scenarios 1 and 2, once: Redis (both delivery modes), one-row transactions, Kafka on a
/// one-node Apache Kafka broker (both delivery modes).
async fn drains(args: &Args) -> anyhow::Result<Vec<Drain>> {
    let mut drains = vec![
        drain(Broker::Redis, 1000, args.events, None, false, false).await,
        drain(Broker::Redis, 1000, args.events, None, true, false).await,
        drain(Broker::Redis, 1000, args.events, None, false, true).await,
        drain(Broker::Redis, 1, args.one_row, None, false, false).await,
    ];
    if args.kafka {
        for effectively_once in [false, true] {
            // A fresh broker per run: no topic, log or transaction state of the previous one.
            let kafka = Kafka::single();
            warm_up(&kafka.brokers(), effectively_once).await;
            let target = KafkaTarget {
                brokers: kafka.brokers(),
                pid: kafka.pids().first().copied(),
                max_batch: args.kafka_batch,
                create_topics: true,
            };
            drains.push(
                drain(
                    Broker::Kafka,
                    1000,
                    args.events,
                    Some(&target),
                    effectively_once,
                    false,
                )
                .await,
            );
            drop(kafka);
        }
    }
    Ok(drains)
}

/// Events a fresh broker is sent before it is measured, with the producer settings of the
/// mode measured.
const WARM_UP_EVENTS: u64 = 300_000;

/// Brings a fresh Kafka broker to speed before it is measured: a JVM started seconds ago runs
/// its code interpreted until the JIT compiles it, and spends several times the CPU per
/// record of a broker that has been running (measured here: about one core for 50,000
/// records/s just after start). The broker takes `WARM_UP_EVENTS` records of the drain's size
/// into a topic of its own, in 5,000-record transactions when `transactional`, so that the
/// code paths of the measured mode are compiled.
async fn warm_up(brokers: &str, transactional: bool) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    support::apache_kafka::create_topic(brokers, "bench.warmup", 3, &[]).await;
    let brokers = brokers.to_owned();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0");
        if transactional {
            // As outboxd's transactional producer (see the Kafka sink).
            config
                .set("transactional.id", "outboxd-bench-warm-up")
                .set("retry.backoff.ms", "5");
        }
        let producer: ThreadedProducer<DefaultProducerContext> =
            config.create().expect("warm-up producer");
        let timeout = Duration::from_secs(30);
        if transactional {
            producer
                .init_transactions(timeout)
                .expect("init_transactions");
        }
        let payload = format!("{{\"seq\":0,\"pad\":\"{}\"}}", "x".repeat(PAD));
        // Transactions of 5,000: a ThreadedProducer's commit waits for its polling thread
        // (100 ms), a cost outboxd's producer does not have.
        for chunk in 0..WARM_UP_EVENTS / 5000 {
            if transactional {
                producer.begin_transaction().expect("begin_transaction");
            }
            for i in 0..5000u64 {
                let key = format!("k{}", (chunk * 5000 + i) % 100);
                let mut record = BaseRecord::to("bench.warmup").key(&key).payload(&payload);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
            if transactional {
                producer
                    .commit_transaction(timeout)
                    .expect("commit_transaction");
            }
        }
        producer.flush(timeout).expect("flush");
    })
    .await
    .expect("warm-up thread");
    println!(
        "warm-up: {WARM_UP_EVENTS} records to a fresh broker{} in {:.1} s",
        if transactional { ", transactional" } else { "" },
        started.elapsed().as_secs_f64()
    );
}

/// The drain rows of the results table (with its header), and the cost of effectively-once.
fn render_drains(drains: &[Drain]) -> String {
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

fn render_table(
    args: &Args,
    drains: &[Drain],
    lives: &[Live],
    peak_kib: u64,
    relay_eps: f64,
) -> String {
    let mut t = String::new();
    t.push_str(&format!("Environment: {}.\n\n", versions()));
    t.push_str(&render_drains(drains));
    if let Some(redis) = drains.iter().find(|d| {
        d.broker == Broker::Redis && d.per_txn == 1000 && !d.effectively_once && !d.table_less
    }) {
        let ratio = redis.outboxd_eps / relay_eps;
        t.push_str(&format!(
            "| drain to redis against a polling relay ({} events) | {:.0} events/s | polling relay {:.0} events/s | {:.1}× | ≥ 3× | {} |\n",
            args.events,
            redis.outboxd_eps,
            relay_eps,
            ratio,
            if ratio >= 3.0 { "yes" } else { "no" }
        ));
    }
    let within = |l: &Live| l.round_p99s.iter().filter(|p| **p <= 25.0).count();
    for l in lives.iter().filter(|l| l.observer == Observer::Outboxd) {
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
        t.push_str(&format!(
            "| live {} events/s (achieved {:.0}), commit to readable in Redis, {} rounds pooled | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; CPU {:.0} µs per event{} | {reference} | | {target} | {met} |\n",
            l.rate,
            l.achieved,
            l.round_p99s.len(),
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            l.cpu_us_per_event,
            l.per_round()
        ));
    }
    let mib = peak_kib as f64 / 1024.0;
    t.push_str(&format!(
        "| one {}-row transaction | peak RSS {mib:.1} MiB | | | ≤ 64 MiB | {} |\n",
        args.big_txn,
        if mib <= 64.0 { "yes" } else { "no" }
    ));
    t
}

/// Writes the table into `dir/benchmarks.md` (between the result markers), the raw results
/// into `dir/benchmarks.json`, and the chart into `dir/benchmarks.png` (via
/// scripts/bench_chart.py).
fn write_results(dir: &Path, results: &serde_json::Value, table: &str) -> anyhow::Result<()> {
    let json_path = dir.join("benchmarks.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(results)? + "\n")?;
    let doc_path = dir.join("benchmarks.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
    let (begin, end) = ("<!-- results:begin -->", "<!-- results:end -->");
    let updated = match (doc.find(begin), doc.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{begin}\n{table}{}", &doc[..a], &doc[b..]),
        _ => format!("{doc}\n{begin}\n{table}{end}\n"),
    };
    std::fs::write(&doc_path, updated)?;
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
