//! Deleting old outbox rows, only once the slot has confirmed their transactions.
//!
//! A row may go when it is older than the retention (`created_at < now() - older_than`) and
//! the broker has acknowledged it. Rows carry no WAL position, so the second condition is
//! proven with a [`Horizon`]: at one instant the server's WAL insert position `W` and the
//! oldest transaction id still running `X` are read together. Every transaction with an id
//! below `X` had ended by then, so its commit record lies before `W`; once the slot's
//! `confirmed_flush_lsn` reaches `W`, every such committed row was acknowledged. A row is
//! confirmed when its inserting transaction (`xmin`) is older than `X` of a horizon whose `W`
//! the slot has confirmed.
//!
//! ```text
//!   sample (W₁, X₁) … (W₂, X₂) … (W₃, X₃)        confirmed_flush_lsn C
//!   ──────────W₁───────────W₂──────C────W₃──▶ WAL
//!   newest sample with W ≤ C: (W₂, X₂) → delete rows with xmin older than X₂
//! ```
//!
//! Deletes run in small batches (one short transaction each, `LIMIT batch_rows`), so that no
//! lock is held long; they are not streamed (the publication publishes inserts only). Each
//! delete leaves a dead tuple for autovacuum.

use outboxd_core::Lsn;
use tokio_postgres::Client;

use crate::catalog::{Table, quote_ident};

/// A point in time, as far as confirming rows is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    /// The WAL insert position then.
    pub wal: Lsn,
    /// The oldest transaction id still running then (its low 32 bits, as rows' `xmin`).
    pub xmin: u32,
}

/// Reads a horizon now.
pub async fn sample(client: &Client) -> Result<Horizon, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, \
                    (pg_snapshot_xmin(pg_current_snapshot())::text::bigint % 4294967296)::bigint",
            &[],
        )
        .await?;
    Ok(Horizon {
        wal: row.get::<_, String>(0).parse().unwrap_or_default(),
        xmin: u32::try_from(row.get::<_, i64>(1)).unwrap_or(0),
    })
}

/// Which rows may go.
#[derive(Debug, Clone, Copy)]
pub struct PruneSpec<'a> {
    /// The outbox table (its partitions, if partitioned).
    pub table: &'a Table,
    /// Rows created at least this many seconds ago.
    pub older_than_secs: u64,
    /// Rows per delete.
    pub batch_rows: u32,
    /// The column of the event id, when `outboxd.dead_letters` exists: rows of events kept
    /// there (their dead letter went without the payload) are not deleted.
    pub keep_dead_letters: Option<&'a str>,
}

impl PruneSpec<'_> {
    /// The rows older than the retention that `horizon` proves confirmed, less those of
    /// events kept in `outboxd.dead_letters`.
    fn selection(&self) -> String {
        let kept = self.keep_dead_letters.map_or_else(String::new, |id| {
            format!(
                " AND NOT EXISTS (SELECT 1 FROM outboxd.dead_letters d \
                 WHERE d.event_id = o.{}::text)",
                quote_ident(id)
            )
        });
        format!(
            "FROM {} o WHERE created_at < now() - make_interval(secs => $1::float8) \
             AND age(o.xmin) > age($2::text::xid){kept}",
            self.table.quoted()
        )
    }

    /// Whether the table has the `created_at` column pruning reads.
    pub fn has_created_at(table: &Table) -> bool {
        table.columns.iter().any(|c| c == "created_at")
    }
}

/// How many rows `horizon` lets go now.
pub async fn count(
    client: &Client,
    spec: &PruneSpec<'_>,
    horizon: Horizon,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!("SELECT count(*) {}", spec.selection()),
            &[&(spec.older_than_secs as f64), &horizon.xmin.to_string()],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Deletes one batch of rows `horizon` lets go; returns how many.
pub async fn delete_batch(
    client: &Client,
    spec: &PruneSpec<'_>,
    horizon: Horizon,
) -> Result<u64, tokio_postgres::Error> {
    // (tableoid, ctid) names a row uniquely in a partitioned table too.
    let sql = format!(
        "DELETE FROM {table} WHERE (tableoid, ctid) IN \
         (SELECT tableoid, ctid {selection} LIMIT {limit})",
        table = spec.table.quoted(),
        selection = spec.selection(),
        limit = spec.batch_rows.max(1)
    );
    client
        .execute(
            &sql,
            &[&(spec.older_than_secs as f64), &horizon.xmin.to_string()],
        )
        .await
}

/// Whether the connected role may delete from `table`.
pub async fn may_delete(client: &Client, table: &Table) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT has_table_privilege($1::oid, 'DELETE')",
            &[&table.oid],
        )
        .await?;
    Ok(row.get(0))
}

/// The statement that gives `role` the right pruning needs.
pub fn grant_sql(table: &Table, role: &str) -> String {
    format!(
        "GRANT DELETE ON {} TO {}",
        table.quoted(),
        quote_ident(role)
    )
}

/// The newest of `samples` (oldest first) whose WAL position `confirmed` has passed; the
/// ones older than it are no longer needed and are dropped.
pub fn usable(
    samples: &mut std::collections::VecDeque<Horizon>,
    confirmed: Lsn,
) -> Option<Horizon> {
    let mut best = None;
    while let Some(front) = samples.front() {
        if front.wal > confirmed {
            break;
        }
        best = samples.pop_front();
    }
    // Keep the chosen one: the next round may have nothing newer.
    if let Some(h) = best {
        samples.push_front(h);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn h(wal: u64, xmin: u32) -> Horizon {
        Horizon {
            wal: Lsn::new(wal),
            xmin,
        }
    }

    #[test]
    fn the_newest_confirmed_sample_is_used_and_older_ones_dropped() {
        let mut samples: VecDeque<Horizon> = [h(100, 5), h(200, 7), h(300, 9)].into();
        assert_eq!(usable(&mut samples, Lsn::new(99)), None);
        assert_eq!(samples.len(), 3, "nothing dropped while nothing is usable");
        assert_eq!(usable(&mut samples, Lsn::new(250)), Some(h(200, 7)));
        assert_eq!(samples, VecDeque::from([h(200, 7), h(300, 9)]));
        assert_eq!(usable(&mut samples, Lsn::new(250)), Some(h(200, 7)));
        assert_eq!(usable(&mut samples, Lsn::new(300)), Some(h(300, 9)));
        assert_eq!(samples, VecDeque::from([h(300, 9)]));
    }
}
