//! Scenario 3, live latency: events committed at fixed rates while outboxd forwards them to
//! Redis; the latency from each transaction's commit (its `COMMIT` returned) to the event
//! being readable in Redis, and outboxd's CPU per event. The reference, pg_recvlogical on a
//! slot of its own with no broker, is measured the same way in the same run: the latency of
//! Postgres' own decoder on this machine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::args::Args;
use crate::arrivals::{Times, watch_redis};
use crate::backlog::wait_active;
use crate::broker::{Broker, broker_env, run_outboxd};
use crate::cpu::{cpu_seconds, idle_and_steal, machine_ticks};
use crate::reference::watch_recvlogical;
use crate::stats::percentile;
use crate::support::*;

/// Who is watching the live events arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observer {
    /// outboxd forwards them; a reader blocks on the Redis stream (XREAD).
    Outboxd,
    /// The reference: `pg_recvlogical` streams the same publication from its own slot, and a
    /// thread notes when each row appears on its output. The latency of Postgres' own
    /// decoder on this machine, with no broker.
    PgRecvlogical,
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

#[derive(Debug, Clone)]
pub struct Live {
    pub observer: Observer,
    pub rate: u64,
    pub achieved: f64,
    /// Every latency measured (ms), sorted.
    latencies: Vec<f64>,
    /// CPU time of the observing process (outboxd or pg_recvlogical) per event, µs.
    pub cpu_us_per_event: f64,
    /// The p99 of each round (one for a single run), ms.
    pub round_p99s: Vec<f64>,
    /// The share of the machine's CPU time the hypervisor stole in each round, percent.
    pub round_steal: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
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
    pub fn per_round(&self) -> String {
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

/// Scenario 3, in `rounds` rounds. Each round measures every rate twice: first the
/// reference (pg_recvlogical, on a new Postgres with no outboxd), then outboxd forwarding to
/// Redis (on another new Postgres). The rounds of each observer and rate are pooled: this
/// machine's latency comes and goes, and alternating spreads it over both. Postgres takes
/// extra settings from `BENCH_PG_CONF` (`;`-separated), for experiments.
pub async fn lives(args: &Args) -> Vec<Live> {
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
            rounds.extend(observe(args, &lines, observer).await);
        }
    }
    pool(args, &rounds)
}

/// One observer at every rate, on a new Postgres with the settings `lines` (and, for
/// [`Observer::Outboxd`], an outboxd forwarding to Redis).
async fn observe(args: &Args, lines: &[&str], observer: Observer) -> Vec<Live> {
    let env = Env::new(Postgres::start_with(lines), "").await;
    env.setup();
    let outboxd = (observer == Observer::Outboxd).then(|| {
        let o = run_outboxd(&env, &broker_env(Broker::Redis, None));
        println!("outboxd pid {}, http {}", o.pid(), env.http_port);
        o
    });
    if outboxd.is_some() {
        wait_active(&env.db().await, "outboxd").await;
    }
    let mut runs = Vec::new();
    let mut first = 0;
    for &rate in &args.rates {
        let pid = outboxd.as_ref().map(|o| o.pid());
        runs.push(live(&env, first, rate, args.live_secs, observer, pid).await);
        first += rate * args.live_secs;
    }
    if outboxd.is_some() {
        print_histograms(env.http_port).await;
    }
    runs
}

/// outboxd's commit-to-read and commit-to-ack histograms (a few buckets), over all rates.
async fn print_histograms(http_port: u16) {
    if let Some((_, text)) = http_get(http_port, "/metrics").await {
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

/// The runs of every round pooled per observer and rate (the reference first).
fn pool(args: &Args, rounds: &[Live]) -> Vec<Live> {
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

/// Notes when each event shows up; ends once `total` did.
enum Watch {
    Redis(tokio::task::JoinHandle<()>),
    Recvlogical(std::process::Child, std::thread::JoinHandle<()>),
}

impl Watch {
    async fn start(env: &Env, observer: Observer, seen: Times, first: u64, total: u64) -> Watch {
        match observer {
            Observer::Outboxd => Watch::Redis(watch_redis(env, seen, total).await),
            Observer::PgRecvlogical => {
                let (child, thread) = watch_recvlogical(env, seen, first, total).await;
                Watch::Recvlogical(child, thread)
            }
        }
    }

    /// The process whose CPU time is measured: outboxd (`outboxd`, its pid) or pg_recvlogical.
    fn measured(&self, outboxd: Option<u32>) -> Option<u32> {
        match self {
            Watch::Redis(_) => outboxd,
            Watch::Recvlogical(child, _) => Some(child.id()),
        }
    }

    /// Waits (up to 2 minutes) until every event showed up; returns `cpu()` read then, before
    /// the reference's pg_recvlogical is stopped and its slot dropped.
    async fn finish(self, env: &Env, cpu: impl Fn() -> Option<f64>) -> Option<f64> {
        match self {
            Watch::Redis(task) => {
                tokio::time::timeout(Duration::from_secs(120), task)
                    .await
                    .expect("every live event arrives")
                    .unwrap();
                cpu()
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
                let cpu = cpu();
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
        }
    }
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
    let total = rate * secs;
    let commits: Times = Arc::new(Mutex::new(HashMap::new()));
    let arrivals: Times = Arc::new(Mutex::new(HashMap::new()));
    let watch = Watch::start(env, observer, arrivals.clone(), first, total).await;
    let measured = watch.measured(outboxd);
    let cpu_before = measured.and_then(cpu_seconds);
    let machine_before = machine_ticks();

    // The writers: one-row transactions (up to 5,000/s), more rows per transaction above.
    let per_txn = (rate / 5_000).max(1);
    let schedule = Schedule {
        first,
        rate,
        per_txn,
        txns: total / per_txn,
        started: Instant::now(),
    };
    let started = schedule.started;
    write_at_rate(env, schedule, &commits).await;
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let (idle_pct, steal_pct) = idle_and_steal(machine_before, machine_ticks());
    let cpu_us_per_event = || {
        let used = measured.and_then(cpu_seconds)? - cpu_before?;
        Some(used * 1e6 / total as f64)
    };
    let cpu_us_per_event = watch.finish(env, cpu_us_per_event).await;

    let commits = commits.lock().unwrap();
    let arrivals = arrivals.lock().unwrap();
    let latencies = latencies(&commits, &arrivals, started);
    if std::env::var("BENCH_SERIES").is_ok() {
        print_series(&commits, &arrivals, started);
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

/// The concurrent writers of a live run.
const WRITERS: usize = 4;

/// When the live writers commit: transaction `t` (of `per_txn` events from
/// `first + t * per_txn`) is due at `started + t * per_txn / rate` seconds.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    first: u64,
    rate: u64,
    per_txn: u64,
    txns: u64,
    started: Instant,
}

/// Commits the schedule's transactions on `WRITERS` connections, each taking every
/// `WRITERS`th transaction, and notes in `commits` when each event's `COMMIT` returned.
async fn write_at_rate(env: &Env, schedule: Schedule, commits: &Times) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS as u64 {
        let db = env.db().await;
        tasks.push(tokio::spawn(writer(db, w, schedule, commits.clone())));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Writer `w`: transactions `w`, `w + WRITERS`, … of the schedule, each when it is due.
async fn writer(db: Client, w: u64, schedule: Schedule, commits: Times) {
    let Schedule {
        first,
        rate,
        per_txn,
        txns,
        started,
    } = schedule;
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
        let due = started + Duration::from_secs_f64(t as f64 * per_txn as f64 / rate as f64);
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
}

/// Commit-to-arrival latencies (ms) of the events committed after the first second, a
/// warm-up (connections start, caches fill) that is not counted.
fn latencies(
    commits: &HashMap<u64, Instant>,
    arrivals: &HashMap<u64, Instant>,
    started: Instant,
) -> Vec<f64> {
    let warm = started + Duration::from_secs(1);
    commits
        .iter()
        .filter(|(_, c)| **c >= warm)
        .filter_map(|(seq, c)| {
            arrivals
                .get(seq)
                .map(|a| a.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        })
        .collect()
}

/// `BENCH_SERIES`: the highest latency of the events committed in each 250 ms of the run.
fn print_series(
    commits: &HashMap<u64, Instant>,
    arrivals: &HashMap<u64, Instant>,
    started: Instant,
) {
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
