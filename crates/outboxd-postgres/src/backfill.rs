//! Publishing rows that are already in the table: a backfill when the slot is created, and a
//! replay at any time.
//!
//! Neither talks to the broker. Both write the rows into the WAL as logical decoding messages
//! ([`crate::message`], prefixes `outboxd.backfill` and `outboxd.replay`), each row's columns
//! as text, in table order (`order_by`), in one transaction. `outboxd run` then streams them
//! like any other event: same routing, dead letters, delivery modes and effectively-once ids,
//! in commit order with everything else, and only if that transaction committed.
//!
//! # Backfill: no gap, no overlap
//!
//! ```text
//! replication connection: CREATE_REPLICATION_SLOT tmp TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT
//!                         → consistent point CP, snapshot S
//! SQL connection:         BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT S
//!                         emit one message per matching row visible in S; COMMIT (after CP)
//!                         pg_copy_logical_replication_slot(tmp, slot, temporary => false)
//! replication connection: closed: the temporary slot goes away
//! ```
//!
//! Rows visible in S are exactly those committed before CP: they go out as backfill messages.
//! Rows committed after CP are streamed by the slot, which starts at CP. The messages commit
//! after CP, so the slot streams them too, once.
//!
//! Interrupted (kill -9, lost connection) before the copy, nothing of it stays: the temporary
//! slot disappears with its session, and messages committed before the copy lie before any
//! slot that a new backfill creates, so they are never streamed. Running the backfill again
//! starts over with a new snapshot. Once the copy is made, the slot exists and the backfill is
//! complete.

use std::fmt::Write as _;

use outboxd_core::Lsn;
use pgwire_replication::{PgWireError, ReplicationClient};
use tokio_postgres::Client;

use crate::catalog::{Table, quote_ident};
use crate::conninfo::ConnInfo;
use crate::message::{BACKFILL_PREFIX, REPLAY_PREFIX};

/// A backfill or replay that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The predicate is not valid SQL for the table.
    #[error("the predicate {predicate:?} cannot be used on {table}: {}", .source.as_db_error().map_or_else(|| .source.to_string(), |e| e.message().to_owned()))]
    Predicate {
        /// The predicate as given.
        predicate: String,
        /// The table, quoted.
        table: String,
        /// Postgres' error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// An `order_by` column the table does not have.
    #[error(
        "backfill.order_by names {column:?}, which {table} does not have (its columns: {columns})"
    )]
    OrderColumn {
        /// The column.
        column: String,
        /// The table, quoted.
        table: String,
        /// The table's columns.
        columns: String,
    },
    /// The replication connection failed.
    #[error("the replication connection for the backfill's snapshot failed: {0}")]
    Replication(#[source] PgWireError),
    /// Postgres refused a step.
    #[error("{what}: {source}")]
    Postgres {
        /// The step.
        what: &'static str,
        /// Postgres' error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> BackfillError {
    move |source| BackfillError::Postgres { what, source }
}

/// Which rows, in which order.
#[derive(Debug, Clone, Copy)]
pub struct RowSelection<'a> {
    /// The outbox table.
    pub table: &'a Table,
    /// A SQL predicate over its columns.
    pub predicate: &'a str,
    /// The ordering columns (empty: the table's natural order).
    pub order_by: &'a [String],
    /// Rows emitted per round trip (the progress step).
    pub batch_rows: u32,
}

impl RowSelection<'_> {
    /// The ordering to use: `configured` (comma-separated columns) when given, else
    /// `created_at, id` as far as the table has them. Checks that every column exists.
    pub fn order_columns(table: &Table, configured: &str) -> Result<Vec<String>, BackfillError> {
        let wanted: Vec<String> = if configured.trim().is_empty() {
            ["created_at", "id"]
                .iter()
                .filter(|c| table.columns.iter().any(|t| t == *c))
                .map(|c| (*c).to_owned())
                .collect()
        } else {
            configured
                .split(',')
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
                .collect()
        };
        for column in &wanted {
            if !table.columns.contains(column) {
                return Err(BackfillError::OrderColumn {
                    column: column.clone(),
                    table: table.quoted(),
                    columns: table.columns.join(", "),
                });
            }
        }
        Ok(wanted)
    }

    fn source_sql(&self) -> String {
        format!("FROM {} WHERE ({})", self.table.quoted(), self.predicate)
    }

    fn order(&self) -> String {
        if self.order_by.is_empty() {
            return String::new();
        }
        let columns: Vec<String> = self.order_by.iter().map(|c| quote_ident(c)).collect();
        format!(" ORDER BY {}", columns.join(", "))
    }

    /// The message content for a row: `{"row": {column: text, …}[, "topic": …]}`.
    fn content_sql(&self, topic: Option<&str>) -> String {
        let mut pairs = String::new();
        for (i, column) in self.table.columns.iter().enumerate() {
            if i > 0 {
                pairs.push_str(", ");
            }
            let _ = write!(
                pairs,
                "{}, {}::text",
                quote_literal(column),
                quote_ident(column)
            );
        }
        let topic = topic.map_or_else(String::new, |t| format!(", 'topic', {}", quote_literal(t)));
        format!("json_build_object('row', json_object(ARRAY[{pairs}]::text[]){topic})::text")
    }
}

/// How many rows match, now (or in the current transaction's snapshot). Also checks the
/// predicate.
pub async fn count(client: &Client, rows: &RowSelection<'_>) -> Result<u64, BackfillError> {
    let sql = format!("SELECT count(*) {}", rows.source_sql());
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|source| BackfillError::Predicate {
            predicate: rows.predicate.to_owned(),
            table: rows.table.quoted(),
            source,
        })?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Where a backfill or replay stands, for progress displays (and tests' crash windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `done` of `total` rows emitted; not committed yet.
    Batch {
        /// Rows emitted so far.
        done: u64,
        /// Rows to emit.
        total: u64,
    },
    /// The messages are committed; (backfill) the slot is not made yet.
    Committed,
}

/// Emits one message per selected row, in order, inside the open transaction of `client`.
async fn emit_rows(
    client: &Client,
    rows: &RowSelection<'_>,
    prefix: &str,
    topic: Option<&str>,
    total: u64,
    observe: &mut impl FnMut(Step),
) -> Result<u64, BackfillError> {
    // A volatile function in the select list is evaluated after the sort, row by row as the
    // cursor is read: the messages go into the WAL in `order_by` order. Each is signed by
    // outboxd.sign() (sql/state.sql), or `run` would refuse it.
    let prefix = quote_literal(prefix);
    let declare = format!(
        "DECLARE outboxd_rows NO SCROLL CURSOR FOR \
         SELECT pg_logical_emit_message(true, {prefix}, outboxd.sign({prefix}, {})) {}{}",
        rows.content_sql(topic),
        rows.source_sql(),
        rows.order()
    );
    // One statement, extended protocol: the predicate cannot smuggle in another statement.
    client
        .execute(&declare, &[])
        .await
        .map_err(pg("declaring the cursor over the rows"))?;
    let fetch = format!("FETCH FORWARD {} FROM outboxd_rows", rows.batch_rows.max(1));
    let mut done = 0u64;
    loop {
        let batch = client
            .query(&fetch, &[])
            .await
            .map_err(pg("emitting the rows"))?
            .len() as u64;
        if batch == 0 {
            break;
        }
        done += batch;
        observe(Step::Batch { done, total });
    }
    Ok(done)
}

/// One transaction, opened by `begin`: counts the rows, emits them, commits (or rolls back
/// on a failure), then tells `observe`.
async fn emit_in_transaction(
    client: &Client,
    begin: &str,
    rows: &RowSelection<'_>,
    prefix: &str,
    topic: Option<&str>,
    observe: &mut impl FnMut(Step),
) -> Result<u64, BackfillError> {
    client
        .batch_execute(begin)
        .await
        .map_err(pg("starting the transaction"))?;
    let result = async {
        let total = count(client, rows).await?;
        let emitted = emit_rows(client, rows, prefix, topic, total, observe).await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(pg("committing the rows"))?;
        Ok::<u64, BackfillError>(emitted)
    }
    .await;
    match result {
        Ok(n) => {
            observe(Step::Committed);
            Ok(n)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// What a backfill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backfilled {
    /// Rows published.
    pub rows: u64,
    /// The slot's consistent point: rows committed after it are streamed from the slot.
    pub consistent_point: Lsn,
}

/// Creates `slot` (pgoutput, streaming `publication`) with the matching rows visible at its
/// consistent point published ahead of everything after it. The slot must not exist.
/// `failover`: give the slot `failover = true` (PostgreSQL 17+; a copied slot does not
/// inherit it).
pub async fn backfill(
    conn: &ConnInfo,
    client: &Client,
    slot: &str,
    publication: &str,
    failover: bool,
    rows: &RowSelection<'_>,
    mut observe: impl FnMut(Step),
) -> Result<Backfilled, BackfillError> {
    // A name of its own, so that the temporary slot of an interrupted run, which the server
    // may not have dropped yet, is in no one's way.
    let temporary: String = format!("{slot}_backfill_{}", std::process::id())
        .chars()
        .take(63)
        .collect();
    let config = conn
        .replication_config(&temporary, publication)
        .await
        .map_err(BackfillError::Replication)?;
    let mut session = ReplicationClient::connect_gated(config)
        .await
        .map_err(BackfillError::Replication)?;
    let created = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&temporary)
        ))
        .await
        .map_err(BackfillError::Replication)?;
    let field = |i: usize| {
        created
            .first()
            .and_then(|r| r.get(i).cloned().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let consistent_point: Lsn = field(1).parse().unwrap_or_default();
    let snapshot = field(2);

    let begin = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}",
        quote_literal(&snapshot)
    );
    let emitted =
        emit_in_transaction(client, &begin, rows, BACKFILL_PREFIX, None, &mut observe).await?;
    client
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2, false)",
            &[&temporary, &slot],
        )
        .await
        .map_err(pg("making the slot from the backfill's temporary slot"))?;
    if failover {
        session
            .simple_query(&format!(
                "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
                quote_ident(slot)
            ))
            .await
            .map_err(BackfillError::Replication)?;
    }
    // Closing the session drops the temporary slot.
    drop(session);
    Ok(Backfilled {
        rows: emitted,
        consistent_point,
    })
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Rows re-published.
    pub rows: u64,
    /// The WAL position after the replay's commit: the slot's `confirmed_flush_lsn` passes it
    /// once every replayed row is acknowledged.
    pub after: Lsn,
}

/// Re-publishes the matching rows (to `topic` instead of the routed one, when given), in one
/// transaction.
pub async fn replay(
    client: &Client,
    rows: &RowSelection<'_>,
    topic: Option<&str>,
    mut observe: impl FnMut(Step),
) -> Result<Replayed, BackfillError> {
    let emitted = emit_in_transaction(
        client,
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        rows,
        REPLAY_PREFIX,
        topic,
        &mut observe,
    )
    .await?;
    let after: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(pg("reading the WAL position"))?
        .get(0);
    Ok(Replayed {
        rows: emitted,
        after: after.parse().unwrap_or_default(),
    })
}

/// Quotes a string literal for SQL.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(columns: &[&str]) -> Table {
        Table {
            oid: 1,
            schema: "public".into(),
            name: "outbox".into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            types: Vec::new(),
            can_select: true,
            partitioned: false,
        }
    }

    #[test]
    fn order_defaults_to_created_at_and_id_where_they_exist() {
        let t = table(&["id", "topic", "payload", "created_at"]);
        assert_eq!(
            RowSelection::order_columns(&t, "").expect("ok"),
            ["created_at", "id"]
        );
        let t = table(&["event_id", "payload"]);
        assert!(RowSelection::order_columns(&t, "").expect("ok").is_empty());
        assert_eq!(
            RowSelection::order_columns(&t, " event_id ").expect("ok"),
            ["event_id"]
        );
        let err = RowSelection::order_columns(&t, "event_id, nope").expect_err("unknown");
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }

    #[test]
    fn rows_become_one_json_object_of_text_values() {
        let t = table(&["id", "it's"]);
        let order = vec!["id".to_owned()];
        let rows = RowSelection {
            table: &t,
            predicate: "true",
            order_by: &order,
            batch_rows: 10,
        };
        assert_eq!(
            rows.content_sql(Some("re'plays")),
            "json_build_object('row', json_object(ARRAY['id', \"id\"::text, 'it''s', \"it's\"::text]::text[]), 'topic', 're''plays')::text"
        );
        assert_eq!(rows.order(), " ORDER BY \"id\"");
        assert_eq!(rows.source_sql(), "FROM \"public\".\"outbox\" WHERE (true)");
    }
}
