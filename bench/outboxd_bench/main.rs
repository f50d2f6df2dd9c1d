//! The outboxd benchmark: outboxd against references measured in the same run, on throwaway
//! servers this program starts (Postgres, Redis, a one-node Apache Kafka broker).
//!
//! ```text
//! scripts/bench.sh                      everything, results into docs/benchmarks.md + .png
//! scripts/bench.sh --events 50000 --quick
//! scripts/bench.sh --help               every option and its default
//! ```
//!
//! What it measures (see docs/benchmarks.md), and where:
//!
//! 1. Backlog drain ([`drain`], [`kafka`]): N events in 1,000-row transactions are written
//!    with outboxd stopped; then `pg_recvlogical` (pgoutput, same publication) reads the same
//!    WAL to /dev/null, outboxd drains it to the broker, and `pg_recvlogical` reads it once
//!    more; the reference ([`reference`]) is the mean of its two runs. For Redis and for
//!    Kafka, in both delivery modes.
//! 2. The same with one-row transactions.
//! 3. Live ([`live`], [`arrivals`]): events committed at fixed rates while outboxd runs; the
//!    latency from each transaction's commit (its `COMMIT` returned) to the event being
//!    readable in Redis, beside pg_recvlogical's in the same run.
//! 4. One 1,000,000-row transaction ([`big_transaction`]): outboxd's peak RSS.
//! 5. A polling relay ([`relay`]: `SELECT … FOR UPDATE SKIP LOCKED`, publish,
//!    `UPDATE … published_at`) on the same backlog, the baseline users would otherwise write.
//! 6. Outbox size ([`outbox_size`]): what each way of writing an event costs the writers, and
//!    what pruning costs.
//!
//! The rest: [`args`] (the command line), [`broker`] (outboxd's settings per broker),
//! [`backlog`] (the events written), [`cpu`] (CPU time from /proc), [`stats`] (medians,
//! percentiles) and [`report`] (the table, the JSON, the chart).
//!
//! Run through cargo (`cargo bench --bench outboxd`), so that the outboxd binary under test is
//! the release build of this tree.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is a failed run

#[path = "../../tests/support/mod.rs"]
mod support;

mod args;
mod arrivals;
mod backlog;
mod big_transaction;
mod broker;
mod cpu;
mod drain;
mod kafka;
mod live;
mod outbox_size;
mod reference;
mod relay;
mod report;
mod stats;

use std::time::Instant;

use args::{Args, Only};
use report::{Results, versions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse_with_quick();
    let started = Instant::now();
    println!("outboxd benchmark: {}", versions());
    match args.only {
        Some(Only::Live) => {
            // Only the live scenario, for profiling.
            live::lives(&args).await;
            return Ok(());
        }
        Some(Only::OutboxSize) => {
            let writes = outbox_size::write_costs(args.one_row, args.rounds).await;
            let prune = outbox_size::prune_cost(args.one_row * 5).await;
            println!("\n{}", outbox_size::render_outbox_size(&writes, &prune));
            return Ok(());
        }
        Some(Only::Drain) | None => {}
    }

    let drains = drain::drains_in_rounds(&args).await?;
    if args.only == Some(Only::Drain) {
        println!("\n{}", report::render_drains(&drains));
        return Ok(());
    }
    everything_else(&args, drains, started).await
}

/// The full run after the drains: live, outbox size, the big transaction, the polling relay;
/// then the report, printed and, with `--out`, written.
async fn everything_else(
    args: &Args,
    drains: Vec<drain::Drain>,
    started: Instant,
) -> anyhow::Result<()> {
    let lives = live::lives(args).await;

    let writes = outbox_size::write_costs(args.one_row, args.rounds).await;
    let prune = outbox_size::prune_cost(args.one_row * 5).await;
    println!("\n{}", outbox_size::render_outbox_size(&writes, &prune));

    let (peak_kib, big_secs) = big_transaction::big_transaction(args.big_txn).await;
    let mut relays = Vec::new();
    for _ in 0..args.rounds {
        relays.push(relay::polling_relay(args.events).await);
    }
    let relay_eps = stats::median(relays);

    let results = Results {
        drains,
        lives,
        peak_kib,
        big_secs,
        relay_eps,
        writes,
        prune,
    };
    let json = report::json(args, &results, started);
    let table = report::render_table(args, &results);
    let outbox_size = outbox_size::render_outbox_size(&results.writes, &results.prune);
    println!("\n{table}\n{outbox_size}");
    if let Some(dir) = &args.out {
        report::write_results(dir, &json, &table, &outbox_size)?;
    }
    Ok(())
}
