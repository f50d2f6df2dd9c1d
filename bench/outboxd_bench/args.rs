//! The command line: which scenarios run, how large they are, and where the results go.

use std::path::PathBuf;

use anyhow::{Context, bail};

#[derive(Debug, Clone)]
pub struct Args {
    pub events: u64,
    pub one_row: u64,
    pub rates: Vec<u64>,
    pub live_secs: u64,
    pub rounds: u64,
    pub big_txn: u64,
    pub kafka: bool,
    /// `sink.max_batch_events` of the Kafka drains (both modes); outboxd's default otherwise.
    pub kafka_batch: Option<u64>,
    /// Live: measure outboxd only, without the pg_recvlogical reference (for profiling).
    pub no_reference: bool,
    pub only: Option<String>,
    pub out: Option<PathBuf>,
}

pub fn parse_args() -> anyhow::Result<Args> {
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
