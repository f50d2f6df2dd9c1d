//! The soak's command line, through clap.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// outboxd for an hour under mixed load with faults at random moments, then a full audit of
/// what arrived against what was committed.
///
/// Load: one-row transactions at --rate events a second, some of 2 to 200 rows, and a large
/// transaction every --large-every seconds; three aggregate types (three streams) and --keys
/// keys. Faults, one at a time at random moments (seeded): SIGKILL of outboxd, a graceful
/// restart (SIGTERM), a walsender kill, a Postgres restart, a Redis outage, and a network cut
/// between outboxd and Postgres or Redis. outboxd runs as a container would, restarted at once
/// whenever it exits. The audit reads every stream from its start and the outbox table.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "outboxd-soak",
    bin_name = "scripts/soak.sh",
    after_help = "Run it as scripts/soak.sh [OPTIONS] (which installs what is missing and runs \
        the release build), or as cargo bench --bench soak -- [OPTIONS]. The exit status is 0 \
        only when the audit finds nothing lost, nothing out of order per key, nothing \
        delivered that was not committed, and (effectively-once) no duplicate.\n\n\
        Environment: OUTBOXD_TEST_PG_BIN, the Postgres bin directory (default: the newest \
        /usr/lib/postgresql/*/bin)."
)]
pub struct Args {
    /// How long the load and the faults last, in minutes
    #[arg(long, value_name = "M", default_value_t = 60)]
    pub minutes: u64,
    /// Events a second of the small transactions
    #[arg(long, value_name = "N", default_value_t = 150)]
    pub rate: u64,
    /// Rows of each large transaction
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub large_rows: u64,
    /// Seconds between large transactions
    #[arg(long, value_name = "S", default_value_t = 300)]
    pub large_every: u64,
    /// Distinct event keys (aggregate ids)
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub keys: u64,
    /// Bytes of filler in each payload, besides its sequence number
    #[arg(long, value_name = "B", default_value_t = 200)]
    pub payload_bytes: u64,
    /// Shortest time between two faults, in seconds
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub fault_min: u64,
    /// Longest time between two faults, in seconds
    #[arg(long, value_name = "S", default_value_t = 150)]
    pub fault_max: u64,
    /// `sink.delivery`: effectively-once must show no duplicate at all
    #[arg(long, value_enum, default_value_t = Delivery::EffectivelyOnce)]
    pub delivery: Delivery,
    /// The seed of every random choice (load sizes, fault kinds and moments)
    #[arg(long, default_value_t = 0x50a6)]
    pub seed: u64,
    /// Write the report (Markdown) to this file as well as printing it
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Set by `cargo bench`; ignored
    #[arg(long = "bench", hide = true)]
    pub cargo_bench: bool,
}

/// `sink.delivery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Delivery {
    /// Duplicates possible after a crash, bounded by what was in flight.
    AtLeastOnce,
    /// Redis entry ids from WAL positions: no duplicates.
    EffectivelyOnce,
}

impl Delivery {
    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::EffectivelyOnce => "effectively-once",
        }
    }
}
