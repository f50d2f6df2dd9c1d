//! The entry points of each command. `main` only parses the command line and calls these.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use outboxd_postgres::catalog;
use outboxd_postgres::slot::{self, Mode};
use outboxd_postgres::{ConnInfo, conninfo::ConnInfoError};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::cli::SlotCommand;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{self, RunError, RunSettings};
use crate::status::Status;
use crate::{http, progress};
use outboxd_core::{Sink, WalHorizon};

/// Loads the configuration: `path` when given (it must exist), else `./outboxd.toml` if
/// present; then the environment.
pub fn load_config(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    let (path, required) = match path {
        Some(p) => (p, true),
        None => (Path::new("outboxd.toml"), false),
    };
    Config::load(path, required, std::env::vars())
}

fn conn_info(config: &Config) -> Result<ConnInfo, ConnInfoError> {
    ConnInfo::parse(config.postgres.url.expose())
}

async fn connect(conn: &ConnInfo) -> Result<tokio_postgres::Client, RunError> {
    conn.connect().await.map_err(RunError::connect(conn))
}

/// `outboxd setup`.
pub async fn setup(config: &Config) -> anyhow::Result<()> {
    let conn = conn_info(config)?;
    let client = connect(&conn).await?;
    let spec = config.slot_spec();
    let prepared = slot::prepare(&client, spec, Mode::Create).await?;
    let table = prepared.table.as_ref().map_or_else(
        || "no table (table-less messages)".to_owned(),
        |t| format!("{}.{}", t.schema, t.name),
    );
    println!(
        "publication {:?} on {table}: {}",
        config.postgres.publication,
        if prepared.created_publication {
            "created"
        } else {
            "already there"
        }
    );
    println!(
        "slot {:?} (pgoutput): {}, confirmed_flush_lsn {}",
        config.postgres.slot,
        if prepared.created_slot {
            "created"
        } else {
            "already there"
        },
        prepared
            .slot
            .confirmed_flush_lsn
            .map_or_else(|| "-".into(), |l| l.to_string())
    );
    Ok(())
}

/// `outboxd run`. `show_progress`: draw a progress line for long catch-ups (terminal only).
pub async fn run(config: &Config, show_progress: bool) -> anyhow::Result<()> {
    Broker::check(config)?;
    let settings = RunSettings {
        conn: conn_info(config)?,
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        table: config.postgres.table.clone(),
        source: config.postgres.source.stream_source(),
        route: config.route.spec(),
        status_interval: Duration::from_millis(config.postgres.status_interval_ms),
        max_batch_events: config.sink.max_batch_events,
        linger: Duration::from_millis(config.sink.linger_ms),
        max_inflight_events: config.sink.max_inflight_events,
        max_inflight_bytes: config.sink.max_inflight_bytes,
        drain_timeout: Duration::from_millis(config.sink.drain_timeout_ms),
        broker: Broker::name(config),
        broker_target: Broker::target(config),
        http: config.http.listen.trim().to_owned(),
    };
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(Status::default());
    // Bind first: a taken port is a startup error, not a surprise later.
    let listen = config.http.listen.trim();
    if !listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
            format!(
                "cannot listen on http.listen = {listen:?}: choose a free address, or set it to \"\" to serve no HTTP"
            )
        })?;
        tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            status.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tokio::spawn(probe_broker(
        config.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    if show_progress {
        tokio::spawn(progress::show(
            metrics.clone(),
            status.clone(),
            shutdown.clone(),
        ));
    }
    let horizon = status.wal_horizon();
    let result = pipeline::run(
        settings,
        || Broker::build(config, &horizon),
        metrics,
        status,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    result?;
    Ok(())
}

/// Asks the broker, on a connection of its own, whether it answers, every 2 seconds: so
/// that `/readyz` notices a broker that went away while the outbox is idle.
async fn probe_broker(config: Config, status: Arc<Status>, stop: CancellationToken) {
    let mut broker = match Broker::build(&config, &WalHorizon::default()) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the broker readiness probe");
            return;
        }
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(5), broker.ping()).await,
            Ok(Ok(()))
        );
        status.set_broker_ok(ok);
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
            return;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "stop requested");
    token.cancel();
}

/// `outboxd check`.
pub async fn check(config: &Config) -> anyhow::Result<()> {
    let report = crate::check::run(config).await;
    print!("{}", report.render());
    match report.failures() {
        0 => Ok(()),
        1 => bail!("1 problem found"),
        n => bail!("{n} problems found"),
    }
}

/// `outboxd slot ...`.
pub async fn slot(config: &Config, command: &SlotCommand) -> anyhow::Result<()> {
    let conn = conn_info(config)?;
    let name = &config.postgres.slot;
    match command {
        SlotCommand::Status { json } => {
            let client = connect(&conn).await?;
            let Some(s) = catalog::slot(&client, name)
                .await
                .context("reading pg_replication_slots")?
            else {
                bail!("replication slot {name:?} does not exist: run `outboxd setup` to create it");
            };
            let lsn = |l: Option<outboxd_core::Lsn>| l.map(|l| l.to_string());
            if *json {
                let value = serde_json::json!({
                    "slot": s.name,
                    "plugin": s.plugin,
                    "slot_type": s.slot_type,
                    "database": s.database,
                    "active": s.active,
                    "active_pid": s.active_pid,
                    "confirmed_flush_lsn": lsn(s.confirmed_flush_lsn),
                    "restart_lsn": lsn(s.restart_lsn),
                    "current_wal_lsn": s.current_wal_lsn.to_string(),
                    "retained_wal_bytes": s.retained_wal_bytes(),
                    "lag_bytes": s.lag_bytes(),
                    "wal_status": s.wal_status,
                });
                println!("{value}");
            } else {
                let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                println!("slot                 {}", s.name);
                println!("plugin               {}", or_dash(s.plugin.clone()));
                println!(
                    "active               {}{}",
                    s.active,
                    s.active_pid
                        .map_or(String::new(), |p| format!(" (walsender pid {p})"))
                );
                println!(
                    "confirmed_flush_lsn  {}",
                    or_dash(lsn(s.confirmed_flush_lsn))
                );
                println!("restart_lsn          {}", or_dash(lsn(s.restart_lsn)));
                println!("current_wal_lsn      {}", s.current_wal_lsn);
                println!(
                    "retained_wal_bytes   {}",
                    or_dash(s.retained_wal_bytes().map(|b| b.to_string()))
                );
                println!(
                    "lag_bytes            {}",
                    or_dash(s.lag_bytes().map(|b| b.to_string()))
                );
                println!("wal_status           {}", or_dash(s.wal_status.clone()));
            }
            Ok(())
        }
        SlotCommand::Drop { yes } => {
            if !yes {
                bail!(
                    "refusing to drop replication slot {name:?} without --yes: events not yet \
                     forwarded are lost to outboxd once it is gone"
                );
            }
            let client = connect(&conn).await?;
            if let Some(s) = catalog::slot(&client, name).await? {
                if s.active {
                    bail!(
                        "replication slot {name:?} is in use (walsender pid {}): stop outboxd first",
                        s.active_pid.unwrap_or_default()
                    );
                }
            } else {
                bail!("replication slot {name:?} does not exist");
            }
            slot::drop_slot(&client, name)
                .await
                .with_context(|| format!("dropping replication slot {name:?}"))?;
            println!("dropped replication slot {name:?}");
            Ok(())
        }
    }
}
