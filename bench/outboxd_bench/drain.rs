//! Scenarios 1 and 2, the backlog drain: N events written with outboxd stopped, then
//! `pg_recvlogical` reads the same WAL to /dev/null, outboxd drains it to the broker, and
//! `pg_recvlogical` reads it once more. The reference is the mean of its two reads, less its
//! fixed cost (measured on an empty slot); the ratio is outboxd's rate over the reference's.
//! In 1,000-row transactions (Redis in both delivery modes, table rows and table-less
//! messages; Kafka, see [`crate::kafka`]) and in one-row transactions (Redis).

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::args::Args;
use crate::backlog::{current_lsn, wait_active, write_backlog, write_message_backlog};
use crate::broker::{Broker, KafkaTarget, broker_env_mode, delivered, run_outboxd};
use crate::cpu::cpu_seconds;
use crate::reference::pg_recvlogical;
use crate::stats::median;
use crate::support::*;

#[derive(Debug, Clone)]
pub struct Drain {
    pub broker: Broker,
    pub effectively_once: bool,
    pub per_txn: u64,
    pub events: u64,
    pub outboxd_eps: f64,
    pub reference_eps: f64,
    /// pg_recvlogical's fixed cost (connecting, noticing the end position), measured on an
    /// empty backlog and taken out of the reference's time.
    pub reference_overhead_secs: f64,
    /// outboxd's rate over the reference's.
    pub ratio: f64,
    /// The ratio of each round (one for a single run).
    pub round_ratios: Vec<f64>,
    /// `sink.max_batch_events`, when not outboxd's default.
    pub max_batch: Option<u64>,
    /// Table-less events (`postgres.source = "messages"`) instead of table rows.
    pub table_less: bool,
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

/// Every drain scenario in `args.rounds` rounds, each scenario's rounds as one result (its
/// median), in the order they ran.
pub async fn drains_in_rounds(args: &Args) -> anyhow::Result<Vec<Drain>> {
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        println!("drain round {round} of {}", args.rounds);
        rounds.extend(drains(args).await?);
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
    Ok(drains)
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
        drains.extend(crate::kafka::drains(args).await);
    }
    Ok(drains)
}

/// The WAL a drain reads, and the reference's reads before outboxd runs.
struct Backlog {
    /// The WAL position after the last event.
    end: String,
    /// pg_recvlogical on an empty slot: its fixed cost (s).
    overhead: f64,
    /// pg_recvlogical's first read of the backlog (s).
    reference_a: f64,
}

/// Scenario 1 and 2: a backlog drained by outboxd, against pg_recvlogical on the same WAL.
pub async fn drain(
    broker: Broker,
    per_txn: u64,
    events: u64,
    kafka: Option<&KafkaTarget>,
    effectively_once: bool,
    table_less: bool,
) -> Drain {
    let env = Env::start().await;
    let db = env.db().await;
    let Backlog {
        end,
        overhead,
        reference_a,
    } = write(&env, &db, per_txn, events, table_less).await;

    let mut vars = broker_env_mode(broker, kafka, effectively_once);
    if table_less {
        vars.push(("OUTBOXD_POSTGRES__SOURCE".to_owned(), "messages".to_owned()));
    }
    let (outboxd_secs, cpu) = forward(&env, &db, broker, kafka, &vars, events).await;

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

/// Writes the backlog with two reference slots before it and an empty one after it, and
/// times pg_recvlogical on the empty slot and on the first reference slot.
async fn write(env: &Env, db: &Client, per_txn: u64, events: u64, table_less: bool) -> Backlog {
    for slot in ["reference_a", "reference_b"] {
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    }
    if table_less {
        write_message_backlog(db, 0, events, per_txn).await;
    } else {
        write_backlog(db, 0, events, per_txn).await;
    }
    let end = current_lsn(db).await;
    db.execute(
        "SELECT pg_create_logical_replication_slot('reference_empty', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    let empty_end = current_lsn(db).await;
    db.batch_execute("CHECKPOINT").await.unwrap();

    let overhead = pg_recvlogical(&env.pg, "reference_empty", &empty_end);
    let reference_a = pg_recvlogical(&env.pg, "reference_a", &end);
    Backlog {
        end,
        overhead,
        reference_a,
    }
}

/// Runs outboxd (with `vars`) until the broker has all `events`, then stops it. Returns the
/// seconds from its slot becoming active to the last event delivered, and the CPU per event
/// of outboxd and of the broker (when its pid is known), as text for the report.
async fn forward(
    env: &Env,
    db: &Client,
    broker: Broker,
    kafka: Option<&KafkaTarget>,
    vars: &[(String, String)],
    events: u64,
) -> (f64, String) {
    let mut redis = env.redis.connect().await;
    let mut outboxd = run_outboxd(env, vars);
    let started = wait_active(db, "outboxd").await;
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
    (outboxd_secs, cpu)
}
