//! The command line, through clap: which scenarios run, how large they are, and where the
//! results go.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

/// outboxd against references measured in the same run (pg_recvlogical on the same WAL, a
/// polling relay), on throwaway Postgres, Redis and Apache Kafka servers.
///
/// Scenarios: backlog drains to Redis and Kafka in both delivery modes (1,000-row and one-row
/// transactions, table rows and table-less messages), live commit-to-readable latency at fixed
/// rates, outboxd's peak RSS during one large transaction, a polling relay, and the cost of
/// each way of writing an event and of pruning (outbox size). Each scenario runs --rounds times:
/// drains and the relay report the median, live runs pool their latencies.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "outboxd-bench",
    bin_name = "scripts/bench.sh",
    after_help = "Run it as scripts/bench.sh [OPTIONS] (which installs what is missing and runs \
        the release build; without options it is a full run with --out docs), or as \
        cargo bench --bench outboxd -- [OPTIONS].\n\n\
        Environment: OUTBOXD_TEST_PG_BIN, the Postgres bin directory (default: the newest \
        /usr/lib/postgresql/*/bin); OUTBOXD_TEST_KAFKA_JARS, Apache Kafka's jars; \
        BENCH_PG_CONF, extra postgresql.conf lines for the live scenario, `;`-separated; \
        BENCH_SERIES (set), print the live scenario's maximum latency per 250 ms."
)]
pub struct Args {
    /// Events of each 1,000-row-transaction drain and of the polling relay [with --quick: 50000]
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub events: u64,
    /// Events of the one-row-transaction drain and transactions per way of writing (outbox
    /// size; pruning takes 5 times as many rows) [with --quick: 5000]
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pub one_row: u64,
    /// Live scenario: the rates, in events per second, at which events are committed
    #[arg(
        long,
        value_name = "R1,R2,..",
        value_delimiter = ',',
        default_value = "1000,5000,20000"
    )]
    pub rates: Vec<u64>,
    /// Live scenario: seconds per rate (the first second is a warm-up, not counted) [with
    /// --quick: 5]
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub live_secs: u64,
    /// Times each scenario runs (0 counts as 1) [with --quick: 1]
    #[arg(long, value_name = "R", default_value_t = 3)]
    pub rounds: u64,
    /// Rows of the one large transaction whose peak RSS is measured [with --quick: 200000]
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub big_txn: u64,
    /// Skip the Kafka drains (no Apache Kafka broker is started)
    #[arg(long = "no-kafka", action = clap::ArgAction::SetFalse)]
    pub kafka: bool,
    /// `sink.max_batch_events` of the Kafka drains (both modes) [default: outboxd's default]
    #[arg(long, value_name = "N")]
    pub kafka_batch: Option<u64>,
    /// Live scenario: measure outboxd only, without the pg_recvlogical reference (for
    /// profiling)
    #[arg(long)]
    pub no_reference: bool,
    /// Smaller numbers for a quick run: the defaults marked "with --quick" (options given
    /// explicitly keep their values)
    #[arg(long)]
    pub quick: bool,
    /// Run one part only, its results printed [default: everything]
    #[arg(long, value_enum, value_name = "PART")]
    pub only: Option<Only>,
    /// Write the results into DIR (e.g. docs): the table into DIR/benchmarks.md between its
    /// result markers, DIR/benchmarks.json and the chart DIR/benchmarks.png. Only for a full
    /// run [default: results printed only]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// The parts `--only` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Only {
    /// The backlog drains (the first results rows)
    Drain,
    /// The live latency scenario (for profiling)
    Live,
    /// The cost of each way of writing an event, and of pruning
    OutboxSize,
}

impl Args {
    /// The arguments of this process; exits with clap's message on an error or `--help`.
    pub fn parse_with_quick() -> Args {
        let matches = Args::command().get_matches();
        let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        args.resolve(&matches)
    }

    /// `--quick` lowers the sizes not given on the command line; `--rounds` is at least 1.
    fn resolve(mut self, matches: &ArgMatches) -> Args {
        let defaulted = |id: &str| matches.value_source(id) == Some(ValueSource::DefaultValue);
        if self.quick {
            let smaller = [
                ("events", &mut self.events, 50_000),
                ("one_row", &mut self.one_row, 5_000),
                ("live_secs", &mut self.live_secs, 5),
                ("rounds", &mut self.rounds, 1),
                ("big_txn", &mut self.big_txn, 200_000),
            ];
            for (id, value, quick) in smaller {
                if defaulted(id) {
                    *value = quick;
                }
            }
        }
        self.rounds = self.rounds.max(1);
        self
    }
}
