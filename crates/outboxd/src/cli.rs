//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// outboxd forwards transactional-outbox events from Postgres to Kafka or Redis Streams.
///
/// It reads the outbox table's inserts from the write-ahead log through a logical replication
/// slot, publishes each event, and confirms the slot's position only after the broker has
/// acknowledged every event up to it.
#[derive(Debug, Parser)]
#[command(name = "outboxd", version, propagate_version = true)]
#[command(after_help = "Examples:
  outboxd setup --config outboxd.toml     create the publication and the slot
  outboxd check --config outboxd.toml     preflight: list every problem
  outboxd run --config outboxd.toml       stream until stopped (SIGTERM drains and exits 0)
  outboxd slot status --json              confirmed position, retained WAL, lag

Every configuration key can be overridden by an environment variable
OUTBOXD_<SECTION>__<KEY>, e.g. OUTBOXD_POSTGRES__URL or OUTBOXD_SINK__REDIS__URL.")]
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
    /// pgoutput slot when they are missing. Events committed before the slot exists are not
    /// forwarded.
    #[command(after_help = "Example:\n  outboxd setup --config outboxd.toml")]
    Setup,

    /// Stream outbox events to the broker until stopped.
    ///
    /// SIGTERM or SIGINT: stop reading, wait for in-flight events to be acknowledged (up to
    /// sink.drain_timeout_ms), confirm the final position to the slot, exit 0.
    #[command(
        after_help = "Example:\n  OUTBOXD_POSTGRES__URL=postgres://outboxd:pw@db/app outboxd run --config outboxd.toml"
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
