//! Keeping the outbox table small: `[postgres] prune_after` while `run` streams, and
//! `outboxd prune` once.
//!
//! Both delete rows older than the retention whose transactions the slot has confirmed (see
//! `outboxd_postgres::prune` for how that is proven), in batches of `prune_batch_rows`. While
//! the broker is down the slot confirms nothing new, so nothing new becomes prunable: an
//! event's row is never deleted before the broker has it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use outboxd_postgres::ConnInfo;
use outboxd_postgres::catalog::{self, Table};
use outboxd_postgres::prune::{self, Horizon, PruneSpec};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, parse_duration};
use crate::metrics::Metrics;

/// Most batches one round deletes, so that a large backlog of old rows is worked off over
/// several rounds instead of in one long burst.
const MAX_BATCHES_PER_ROUND: u32 = 100;
/// The pause between two batches of a round.
const BATCH_PAUSE: Duration = Duration::from_millis(20);
/// Horizons kept: one per round, for about as many rounds as the slot may lag behind.
const MAX_SAMPLES: usize = 1000;

/// What pruning needs, checked when `run` or `prune` starts.
#[derive(Debug, Clone)]
pub struct Pruning {
    /// The outbox table.
    pub table: Table,
    /// The retention.
    pub older_than: Duration,
    /// Rows per delete.
    pub batch_rows: u32,
    /// The event id's column, when `outboxd.dead_letters` exists: the rows of events kept
    /// there are not deleted.
    pub keep_dead_letters: Option<String>,
}

impl Pruning {
    fn spec(&self) -> PruneSpec<'_> {
        PruneSpec {
            table: &self.table,
            older_than_secs: self.older_than.as_secs(),
            batch_rows: self.batch_rows,
            keep_dead_letters: self.keep_dead_letters.as_deref(),
        }
    }
}

/// Checks that pruning can work: the table has `created_at`, and the role may delete.
pub async fn prepare(
    client: &Client,
    config: &Config,
    older_than: &str,
) -> anyhow::Result<Pruning> {
    let older_than = parse_duration(older_than).map_err(anyhow::Error::msg)?;
    let Some(table) = catalog::table(client, &config.postgres.table).await? else {
        bail!(
            "table {:?} does not exist: pruning deletes its rows",
            config.postgres.table
        );
    };
    if !PruneSpec::has_created_at(&table) {
        bail!(
            "{} has no created_at column: pruning deletes rows by their creation time",
            table.quoted()
        );
    }
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    if !prune::may_delete(client, &table).await? {
        bail!(
            "role {role:?} may not delete from {} (pruning does): {}",
            table.quoted(),
            prune::grant_sql(&table, &role)
        );
    }
    // Rows whose event's dead letter lacks the payload stay (their whole event is kept in
    // outboxd.dead_letters too), so that they can be replayed once the broker takes them.
    let id = &config.route.id_column;
    let kept: bool = client
        .query_one(
            "SELECT to_regclass('outboxd.dead_letters') IS NOT NULL \
                    AND has_table_privilege('outboxd.dead_letters', 'SELECT')",
            &[],
        )
        .await?
        .get(0);
    let keep_dead_letters = (kept && table.columns.iter().any(|c| c == id)).then(|| id.clone());
    Ok(Pruning {
        table,
        older_than,
        batch_rows: config.postgres.prune_batch_rows,
        keep_dead_letters,
    })
}

/// Deletes what `horizon` lets go, batch after batch, at most `max_batches`; returns the
/// rows deleted.
async fn delete(
    client: &Client,
    pruning: &Pruning,
    horizon: Horizon,
    max_batches: u32,
) -> Result<u64, tokio_postgres::Error> {
    let spec = pruning.spec();
    let mut deleted = 0;
    for _ in 0..max_batches {
        let n = prune::delete_batch(client, &spec, horizon).await?;
        deleted += n;
        if n < u64::from(spec.batch_rows) {
            break;
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    Ok(deleted)
}

/// While `run` streams: every `interval`, takes a horizon and deletes what the newest
/// confirmed one lets go. Failures are logged and retried next round.
pub async fn run_periodically(
    conn: ConnInfo,
    slot: String,
    pruning: Pruning,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut client: Option<Client> = None;
    let mut samples: VecDeque<Horizon> = VecDeque::new();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = match conn.connect().await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "pruning cannot connect; will retry");
                    continue;
                }
            };
        }
        let Some(c) = client.as_ref() else { continue };
        let round = async {
            samples.push_back(prune::sample(c).await?);
            if samples.len() > MAX_SAMPLES {
                samples.pop_front();
            }
            let confirmed = catalog::slot(c, &slot)
                .await?
                .and_then(|s| s.confirmed_flush_lsn)
                .unwrap_or_default();
            let Some(horizon) = prune::usable(&mut samples, confirmed) else {
                return Ok(0);
            };
            delete(c, &pruning, horizon, MAX_BATCHES_PER_ROUND).await
        };
        match round.await {
            Ok(0) => {}
            Ok(n) => {
                metrics.pruned_rows.inc_by(n);
                tracing::info!(
                    rows = n,
                    table = %pruning.table.quoted(),
                    "pruned rows the slot has confirmed"
                );
            }
            Err(e) => {
                metrics.prune_errors.inc();
                tracing::warn!(error = %e, "pruning failed; will retry");
                client = None;
            }
        }
    }
}

/// `outboxd prune`: takes a horizon, waits (up to `wait`) until the slot has confirmed it,
/// then deletes (or, with `dry_run`, counts) the rows it lets go.
pub async fn once(
    client: &Client,
    slot: &str,
    pruning: &Pruning,
    dry_run: bool,
    wait: Duration,
) -> anyhow::Result<u64> {
    let horizon = prune::sample(client).await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Some(s) = catalog::slot(client, slot).await? else {
            bail!(
                "replication slot {slot:?} does not exist: without it nothing is known to be \
                 forwarded, so nothing is pruned"
            );
        };
        if s.confirmed_flush_lsn.unwrap_or_default() >= horizon.wal {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "replication slot {slot:?} has not confirmed the current WAL position {} within \
                 {} s ({}): rows it has not confirmed are never pruned. Is `outboxd run` \
                 streaming and the broker up?",
                horizon.wal,
                wait.as_secs(),
                if s.active {
                    format!(
                        "confirmed_flush_lsn {}",
                        s.confirmed_flush_lsn.unwrap_or_default()
                    )
                } else {
                    "no session streams it".to_owned()
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if dry_run {
        return prune::count(client, &pruning.spec(), horizon)
            .await
            .context("counting the rows to prune");
    }
    delete(client, pruning, horizon, u32::MAX)
        .await
        .context("deleting rows")
}
