//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// outboxd forwards transactional-outbox events from Postgres to a message broker.
///
/// It reads the outbox table's inserts from the write-ahead log through a logical replication
/// slot, publishes each event, and confirms the slot's position only after the broker has
/// acknowledged every event up to it.
#[derive(Debug, Parser)]
#[command(name = "outboxd", version, propagate_version = true)]
#[command(after_help = "Examples:
  outboxd setup --config outboxd.toml     create the publication and the slot
  outboxd check --config outboxd.toml     preflight: list every problem
  outboxd replay --where \"id = '...'\"    publish a kept row again
  outboxd run --config outboxd.toml       stream until stopped (SIGTERM drains and exits 0)
  outboxd slot status --json              confirmed position, retained WAL, lag

Every configuration key can be overridden by an environment variable
OUTBOXD_<SECTION>__<KEY>, e.g. OUTBOXD_POSTGRES__URL or OUTBOXD_SINK__REDIS__URL.
Secrets can be read from files: OUTBOXD_POSTGRES__URL_FILE=/run/secrets/pg_url.")]
pub struct Cli {
    /// Configuration file (TOML). Without --config, ./outboxd.toml is read if present.
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "FILE",
        env = "OUTBOXD_CONFIG"
    )]
    pub config: Option<PathBuf>,

    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OUTBOXD_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `outboxd=debug`).
    #[arg(long, global = true, default_value = "info", env = "OUTBOXD_LOG")]
    pub log_level: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the publication and the replication slot if missing (idempotent).
    ///
    /// Checks that wal_level is logical, that the outbox table exists, and that the role may
    /// read it and stream replication; creates the publication (publish = 'insert') and the
    /// pgoutput slot when they are missing, and records the slot in schema outboxd. Events
    /// committed before the slot exists are not forwarded. A slot that outboxd streamed and
    /// that is gone is not recreated: setup names the gap and exits 3 (see --new-slot).
    #[command(
        after_help = "Examples:\n  outboxd setup --config outboxd.toml\n  outboxd setup --backfill-where \"published_at IS NULL\" --dry-run\n  outboxd setup --backfill-where \"published_at IS NULL\"\n  outboxd setup --backfill-where \"created_at >= '2026-12-07 10:00'\"   after a lost slot\n  outboxd setup --new-slot                 after a lost slot, skipping its events\n\nExit codes: 0 done, 1 failed, 2 bad configuration, 3 refused until you decide (a lost slot)."
    )]
    Setup(SetupArgs),

    /// Re-publish rows kept in the outbox table, marked with the header outboxd-replay: true.
    ///
    /// Writes the matching rows into the WAL (one transaction, in `[backfill] order_by` order);
    /// the running `outboxd run` forwards them through the same routing, dead letters and
    /// delivery mode as any event. Use it to recover events after a lost or invalidated slot,
    /// or to feed a new consumer (--topic).
    #[command(
        after_help = "Examples:\n  outboxd replay --where \"created_at >= now() - interval '1 hour'\" --dry-run\n  outboxd replay --where \"aggregate_type = 'order'\" --topic orders.replayed --wait"
    )]
    Replay(ReplayArgs),

    /// Delete outbox rows older than a retention, once the slot has confirmed them.
    ///
    /// Takes the server's current WAL position, waits until the slot has confirmed it (that
    /// is, until `outboxd run` has had everything before it acknowledged), then deletes the
    /// rows older than --older-than in batches of postgres.prune_batch_rows. A row the slot
    /// has not confirmed is never deleted. The role needs DELETE on the table.
    #[command(
        after_help = "Examples:\n  outboxd prune --older-than 7d --dry-run\n  outboxd prune --older-than 12h"
    )]
    Prune(PruneArgs),

    /// Stream outbox events to the broker until stopped.
    ///
    /// SIGTERM or SIGINT: stop reading, wait for in-flight events to be acknowledged (up to
    /// sink.drain_timeout_ms, 20 s), confirm the final position to the slot, exit 0: within
    /// 30 s in all. A second SIGTERM or SIGINT exits at once (code 130); nothing is
    /// confirmed that the broker did not acknowledge.
    #[command(
        after_help = "Example:\n  OUTBOXD_POSTGRES__URL=postgres://outboxd:pw@db/app outboxd run --config outboxd.toml\n\nExit codes: 0 stopped cleanly, 1 failed, 2 bad configuration, 130 stopped by a second signal."
    )]
    Run,

    /// Preflight: configuration, Postgres, wal_level, table and rights, publication, slot,
    /// route against the table's columns, broker. Lists every problem; exit 1 if any.
    #[command(
        after_help = "Example:\n  outboxd check --config outboxd.toml && outboxd run --config outboxd.toml"
    )]
    Check,

    /// Inspect or drop the replication slot.
    #[command(after_help = "Examples:\n  outboxd slot status --json\n  outboxd slot drop --yes")]
    Slot(SlotArgs),
}

/// `outboxd setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Cutover from a polling relay: create the slot with a snapshot and publish the rows
    /// matching this SQL predicate that are visible in it (in `[backfill] order_by` order);
    /// `run` then streams from the snapshot's point on: no gap, no overlap, while writers go
    /// on. Refused when the slot exists.
    #[arg(long, value_name = "SQL_PREDICATE")]
    pub backfill_where: Option<String>,

    /// With --backfill-where: count the matching rows; create and publish nothing.
    #[arg(long, requires = "backfill_where")]
    pub dry_run: bool,

    /// Create the slot although outboxd's record says an earlier slot of this name or
    /// publication is gone (dropped, invalidated, or left on a failed primary): the events
    /// committed since it last confirmed are skipped, by this decision. Without it, setup
    /// refuses, names the gap and exits 3; `--backfill-where` recovers the rows instead.
    #[arg(long, conflicts_with = "backfill_where")]
    pub new_slot: bool,
}

/// `outboxd replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Which rows: a SQL predicate over the outbox table's columns.
    #[arg(long = "where", value_name = "SQL_PREDICATE")]
    pub predicate: String,

    /// Publish to this topic (Kafka) or stream (Redis) instead of the routed one.
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,

    /// Count the matching rows; publish nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Wait until `outboxd run` has had every replayed row acknowledged by the broker.
    #[arg(long)]
    pub wait: bool,
}

/// `outboxd prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The retention: rows created longer ago than this (7d, 12h, 30m, 90s) may go.
    #[arg(long, value_name = "DURATION")]
    pub older_than: String,

    /// Count the rows that would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// How long to wait for the slot to confirm the current WAL position, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub wait: u64,
}

/// `outboxd slot`.
#[derive(Debug, Args)]
pub struct SlotArgs {
    /// What to do with the slot.
    #[command(subcommand)]
    pub command: SlotCommand,
}

/// `outboxd slot ...`.
#[derive(Debug, Subcommand)]
pub enum SlotCommand {
    /// Show the slot: active or not, confirmed_flush_lsn, restart_lsn, retained WAL, wal_status, lag.
    #[command(
        after_help = "Examples:\n  outboxd slot status\n  outboxd slot status --json | jq .retained_wal_bytes"
    )]
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Drop the slot. Postgres then frees its WAL; events not yet forwarded are lost to outboxd.
    #[command(after_help = "Example:\n  outboxd slot drop --yes")]
    Drop {
        /// Confirm: dropping the slot cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

impl Cli {
    /// Parses the command line, with the sinks of this build named in `--help`.
    pub fn parse_with_sinks() -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let sinks: Vec<&str> = outboxd_sinks::SINKS
            .iter()
            .filter(|(_, built)| *built)
            .map(|(name, _)| *name)
            .collect();
        let command = Cli::command().before_help(format!(
            "Brokers in this build ([sink] kind): {}.",
            sinks.join(", ")
        ));
        match Cli::from_arg_matches(&command.get_matches()) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        }
    }
}
