//! What outboxd reads from Postgres' catalogs: the server's settings and the role's rights,
//! the outbox table, the publication and the replication slot.

use outboxd_core::Lsn;
use tokio_postgres::Client;

/// A managed Postgres service, recognised by the settings and roles it adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Amazon RDS for PostgreSQL or Aurora PostgreSQL (`rds.*` settings, `rds_superuser`).
    Rds,
    /// Google Cloud SQL (`cloudsql.*` settings, `cloudsqlsuperuser`).
    CloudSql,
    /// Azure Database for PostgreSQL flexible server (`azure.*` settings, `azure_pg_admin`).
    Azure,
    /// Supabase (`supabase_admin`).
    Supabase,
    /// Neon (`neon.*` settings, `neon_superuser`).
    Neon,
}

impl Provider {
    /// The service's name.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Rds => "Amazon RDS / Aurora",
            Provider::CloudSql => "Google Cloud SQL",
            Provider::Azure => "Azure Database for PostgreSQL",
            Provider::Supabase => "Supabase",
            Provider::Neon => "Neon",
        }
    }

    /// How to turn logical decoding on there.
    pub fn enable_logical_decoding(self) -> &'static str {
        match self {
            Provider::Rds => {
                "set rds.logical_replication = 1 in the instance's DB parameter group (Aurora: \
                 the DB cluster parameter group) and reboot the instance (Aurora: the writer)"
            }
            Provider::CloudSql => {
                "set the database flag cloudsql.logical_decoding = on (gcloud sql instances patch \
                 INSTANCE --database-flags=cloudsql.logical_decoding=on, keeping the other \
                 flags); the instance restarts"
            }
            Provider::Azure => {
                "set the server parameter wal_level = logical (az postgres flexible-server \
                 parameter set --name wal_level --value logical) and restart the server"
            }
            Provider::Supabase => {
                "wal_level is logical on Supabase projects: connect to the database's direct \
                 host (port 5432), not to the pooler"
            }
            Provider::Neon => {
                "turn on logical replication in the project's settings (Settings → Logical \
                 Replication; it cannot be turned off) and use the direct, non-pooled endpoint"
            }
        }
    }

    /// How to give `role` the right to stream replication there.
    pub fn grant_replication(self, role: &str) -> String {
        match self {
            Provider::Rds => format!("GRANT rds_replication TO {role}"),
            Provider::Neon => format!(
                "create the role {role} in the Neon Console, CLI or API (roles created there may \
                 replicate; SQL cannot give REPLICATION on Neon)"
            ),
            Provider::Supabase => format!(
                "ALTER ROLE {role} WITH REPLICATION as postgres (before PostgreSQL 17 Supabase \
                 allows this only to postgres itself: connect outboxd as postgres then)"
            ),
            Provider::CloudSql | Provider::Azure => format!(
                "ALTER ROLE {role} WITH REPLICATION, as the admin user ({})",
                if self == Provider::CloudSql {
                    "a cloudsqlsuperuser member"
                } else {
                    "an azure_pg_admin member"
                }
            ),
        }
    }
}

/// Facts about the server and the connected role.
#[derive(Debug, Clone)]
pub struct Server {
    /// `server_version_num`, e.g. 150018.
    pub version_num: i32,
    /// `wal_level`; logical decoding needs `logical`.
    pub wal_level: String,
    /// Whether the server is a standby.
    pub in_recovery: bool,
    /// The connected database.
    pub database: String,
    /// The connected role.
    pub user: String,
    /// Whether the role may stream replication (REPLICATION attribute, superuser, or RDS'
    /// `rds_replication` role).
    pub can_replicate: bool,
    /// The managed service the server runs on, when recognised.
    pub provider: Option<Provider>,
}

/// Reads the server's settings and the role's rights.
pub async fn server(client: &Client) -> Result<Server, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('wal_level'), \
                    pg_is_in_recovery(), current_database()::text, current_user::text, \
                    r.rolreplication OR r.rolsuper OR EXISTS (SELECT 1 FROM pg_roles g \
                        WHERE g.rolname = 'rds_replication' AND pg_has_role(r.oid, g.oid, 'MEMBER')), \
                    current_setting('rds.logical_replication', true) IS NOT NULL \
                        OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_superuser'), \
                    current_setting('cloudsql.logical_decoding', true) IS NOT NULL \
                        OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cloudsqlsuperuser'), \
                    current_setting('azure.extensions', true) IS NOT NULL \
                        OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'azure_pg_admin'), \
                    EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'supabase_admin'), \
                    current_setting('neon.timeline_id', true) IS NOT NULL \
                        OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'neon_superuser') \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let providers = [
        Provider::Rds,
        Provider::CloudSql,
        Provider::Azure,
        Provider::Supabase,
        Provider::Neon,
    ];
    let provider = providers
        .into_iter()
        .enumerate()
        .find_map(|(i, p)| row.get::<_, bool>(6 + i).then_some(p));
    Ok(Server {
        version_num: row.get(0),
        wal_level: row.get(1),
        in_recovery: row.get(2),
        database: row.get(3),
        user: row.get(4),
        can_replicate: row.get(5),
        provider,
    })
}

/// A connection's TLS, as the server sees it (`pg_stat_ssl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsState {
    /// Whether the connection is encrypted.
    pub ssl: bool,
    /// The TLS version, e.g. `TLSv1.3`.
    pub version: Option<String>,
    /// The cipher suite.
    pub cipher: Option<String>,
}

impl TlsState {
    /// The query that reads it for the current session.
    pub const QUERY: &'static str =
        "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
}

/// The TLS of this SQL connection.
pub async fn tls_state(client: &Client) -> Result<TlsState, tokio_postgres::Error> {
    let row = client.query_one(TlsState::QUERY, &[]).await?;
    Ok(TlsState {
        ssl: row.get(0),
        version: row.get(1),
        cipher: row.get(2),
    })
}

/// The outbox table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct Table {
    /// The table's OID, which pgoutput Relation messages carry.
    pub oid: u32,
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// Its columns in table order.
    pub columns: Vec<String>,
    /// The columns' type OIDs, in the same order.
    pub types: Vec<u32>,
    /// Whether the connected role may SELECT from it (logical replication requires it).
    pub can_select: bool,
    /// Whether it is a partitioned table (its rows live in partitions).
    pub partitioned: bool,
}

impl Table {
    /// `schema.name`, quoted for use in SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Looks up a table by its (optionally schema-qualified) name.
pub async fn table(client: &Client, name: &str) -> Result<Option<Table>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, has_table_privilege(c.oid, 'SELECT'), \
                    c.relkind = 'p' \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1::text)",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let rows = client
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await?;
    let columns = rows.iter().map(|r| r.get(0)).collect();
    let types = rows.iter().map(|r| r.get(1)).collect();
    Ok(Some(Table {
        oid,
        schema: row.get(1),
        name: row.get(2),
        columns,
        types,
        can_select: row.get(3),
        partitioned: row.get(4),
    }))
}

/// A publication, as it concerns the outbox table.
#[derive(Debug, Clone, Copy)]
pub struct Publication {
    /// Whether it publishes inserts.
    pub inserts: bool,
    /// Whether it includes the outbox table.
    pub includes_table: bool,
    /// Whether changes of partitions are published as the partitioned table's
    /// (`publish_via_partition_root`).
    pub via_root: bool,
}

/// Looks up a publication and whether it covers `table` (with no table: whether it exists).
pub async fn publication(
    client: &Client,
    name: &str,
    table: Option<&Table>,
) -> Result<Option<Publication>, tokio_postgres::Error> {
    let (schema, relname, oid) = table.map_or(("", "", 0), |t| (&t.schema[..], &t.name[..], t.oid));
    let row = client
        .query_opt(
            "SELECT p.pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t \
                 WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
                 OR EXISTS (SELECT 1 FROM pg_publication_rel r \
                     WHERE r.prpubid = p.oid AND r.prrelid = $4), \
                 p.pubviaroot \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&name, &schema, &relname, &oid],
        )
        .await?;
    Ok(row.map(|r| Publication {
        inserts: r.get(0),
        includes_table: r.get(1),
        via_root: r.get(2),
    }))
}

/// A replication slot, with the WAL positions an operator watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The slot name.
    pub name: String,
    /// The output plugin (`pgoutput` for outboxd's slot).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// The database a logical slot decodes.
    pub database: Option<String>,
    /// Whether a session is streaming from it now.
    pub active: bool,
    /// The PID of the walsender streaming it.
    pub active_pid: Option<i32>,
    /// The position the consumer confirmed: events before it are not sent again.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The oldest WAL the slot still needs: Postgres keeps WAL from here on.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated).
    pub wal_status: Option<String>,
    /// The server's current WAL insert position.
    pub current_wal_lsn: Lsn,
}

impl Slot {
    /// WAL bytes Postgres keeps for this slot: from `restart_lsn` to the current position.
    pub fn retained_wal_bytes(&self) -> Option<u64> {
        self.restart_lsn
            .map(|r| r.bytes_until(self.current_wal_lsn))
    }

    /// WAL bytes not yet confirmed: from `confirmed_flush_lsn` to the current position.
    pub fn lag_bytes(&self) -> Option<u64> {
        self.confirmed_flush_lsn
            .map(|c| c.bytes_until(self.current_wal_lsn))
    }

    /// Whether Postgres invalidated the slot (its WAL was removed, or for another reason).
    pub fn is_invalidated(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// Reads a slot from `pg_replication_slots`.
pub async fn slot(client: &Client, name: &str) -> Result<Option<Slot>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, slot_type, database::text, active, active_pid, \
                    confirmed_flush_lsn::text, restart_lsn::text, wal_status, \
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                          ELSE pg_current_wal_lsn() END)::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| {
        let lsn = |i: usize| r.get::<_, Option<String>>(i).and_then(|s| s.parse().ok());
        Slot {
            name: r.get(0),
            plugin: r.get(1),
            slot_type: r.get(2),
            database: r.get(3),
            active: r.get(4),
            active_pid: r.get(5),
            confirmed_flush_lsn: lsn(6),
            restart_lsn: lsn(7),
            wal_status: r.get(8),
            current_wal_lsn: lsn(9).unwrap_or_default(),
        }
    }))
}

/// Asks Postgres to write a running-transactions record now (`pg_log_standby_snapshot()`,
/// PostgreSQL 16+). Logical decoding moves a slot's `restart_lsn` only at such records, which
/// Postgres otherwise writes every 15 s while busy and at checkpoints.
pub async fn log_standby_snapshot(client: &Client) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT pg_log_standby_snapshot()::text", &[])
        .await?;
    Ok(row.get::<_, String>(0).parse().unwrap_or_default())
}

/// Whether the server has physical standbys streaming from it, and whether `slot` is
/// synchronised to them (`failover`, PostgreSQL 17+; `None` before 17).
pub async fn failover_state(
    client: &Client,
    slot: &str,
    version_num: i32,
) -> Result<(i64, Option<bool>), tokio_postgres::Error> {
    let standbys: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r WHERE NOT EXISTS \
                 (SELECT 1 FROM pg_replication_slots s \
                  WHERE s.active_pid = r.pid AND s.slot_type = 'logical')",
            &[],
        )
        .await?
        .get(0);
    if version_num < 170_000 {
        return Ok((standbys, None));
    }
    let failover = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get::<_, bool>(0));
    Ok((standbys, failover))
}

/// Quotes an identifier for SQL, like Postgres' `quote_ident` always quoting.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("outbox"), "\"outbox\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
