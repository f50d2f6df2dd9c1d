//! Setting up and checking the publication and the replication slot.
//!
//! [`prepare`] is shared by `outboxd setup` (which creates what is missing) and by
//! `outboxd run` (which creates nothing: a missing slot means events may have been skipped,
//! and only an operator can decide that). Every refusal says what to do.
//!
//! `setup` does not create a slot when outboxd's record (`outboxd.slots`, see
//! [`state::slots`]) says an earlier slot of the same name or publication is gone: that
//! slot's events since its last confirmed position would be skipped. It refuses with
//! [`SlotError::SlotLost`], naming the gap and the two ways on: a backfill, or
//! [`Creation::NewSlot`], the explicit decision to skip.

use outboxd_core::Lsn;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::catalog::{self, Provider, Server, Slot, Table, quote_ident};
use crate::state::{self, StateError, slots};
use crate::stream::Source;

/// What to set up or check.
#[derive(Debug, Clone, Copy)]
pub struct SlotSpec<'a> {
    /// The replication slot name.
    pub slot: &'a str,
    /// The publication name.
    pub publication: &'a str,
    /// The outbox table, optionally schema-qualified.
    pub table: &'a str,
    /// Create the slot with `failover = true` (PostgreSQL 17+), so it survives a promotion.
    pub failover: bool,
    /// Where events come from: with [`Source::Messages`] no table is needed, and the
    /// publication need not include one.
    pub source: Source,
}

/// Whether [`prepare`] may create what is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `outboxd setup`: create the publication and the slot when missing.
    Create(Creation),
    /// `outboxd run` and `check`: only check.
    Check,
}

/// What `setup` does when outboxd's record says an earlier slot is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// Refuse ([`SlotError::SlotLost`]): the operator decides.
    Refuse,
    /// `--new-slot`: create the slot anyway, skipping what the lost one held, and retire its
    /// record with that decision.
    NewSlot,
}

/// Postgres is not ready for outboxd, and why.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Logical decoding is off.
    #[error("wal_level is {actual:?}, logical decoding needs \"logical\": {}", match .provider {
        Some(p) => format!("on {}, {}", p.name(), p.enable_logical_decoding()),
        None => "set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = \
                 logical) and restart Postgres".to_owned(),
    })]
    WalLevel {
        /// The server's `wal_level`.
        actual: String,
        /// The managed service, whose own setting turns it on.
        provider: Option<Provider>,
    },
    /// The outbox table does not exist.
    #[error(
        "table {table:?} does not exist in database {database:?}: apply sql/outbox.sql, or set \
         postgres.table to your outbox table"
    )]
    TableMissing {
        /// The configured table.
        table: String,
        /// The connected database.
        database: String,
    },
    /// The role may not read the table.
    #[error("role {role:?} may not read {table}: GRANT SELECT ON {table} TO {role}")]
    NoSelect {
        /// The connected role.
        role: String,
        /// The table, quoted.
        table: String,
    },
    /// The role may not stream replication.
    #[error("{}", match .provider {
        Some(p) => format!(
            "role {role:?} may not stream replication: on {}, {}",
            p.name(),
            p.grant_replication(role)
        ),
        None => format!(
            "role {role:?} lacks the REPLICATION attribute: ALTER ROLE {role} WITH REPLICATION \
             (see sql/role.sql)"
        ),
    })]
    NoReplication {
        /// The connected role.
        role: String,
        /// The managed service, whose own grant gives the right.
        provider: Option<Provider>,
    },
    /// The publication is missing (check mode).
    #[error(
        "publication {publication:?} does not exist: run `outboxd setup`, or create it: {create}"
    )]
    PublicationMissing {
        /// The publication name.
        publication: String,
        /// The statement that creates it.
        create: String,
    },
    /// The role may not create the publication.
    #[error(
        "role {role:?} may not create publication {publication:?} (creating one needs the \
         CREATE privilege on the database, and ownership of the table it publishes): ask the \
         table owner to run: {create}"
    )]
    PublicationDenied {
        /// The connected role.
        role: String,
        /// The publication name.
        publication: String,
        /// The statement to run.
        create: String,
    },
    /// The publication exists without the table.
    #[error(
        "publication {publication:?} does not include {table}: ALTER PUBLICATION {quoted_pub} \
         ADD TABLE {table}"
    )]
    PublicationLacksTable {
        /// The publication name.
        publication: String,
        /// Its name, quoted.
        quoted_pub: String,
        /// The table, quoted.
        table: String,
    },
    /// The table is partitioned and the publication sends changes as the partitions'.
    #[error(
        "publication {publication:?} publishes the partitions of {table} under their own names: \
         ALTER PUBLICATION {quoted_pub} SET (publish = 'insert', publish_via_partition_root = true)"
    )]
    PublicationNotViaRoot {
        /// The publication name.
        publication: String,
        /// Its name, quoted.
        quoted_pub: String,
        /// The table, quoted.
        table: String,
    },
    /// The publication does not publish inserts.
    #[error(
        "publication {publication:?} does not publish inserts: ALTER PUBLICATION {quoted_pub} \
         SET (publish = 'insert')"
    )]
    PublicationNoInserts {
        /// The publication name.
        publication: String,
        /// Its name, quoted.
        quoted_pub: String,
    },
    /// The slot is missing (check mode).
    #[error(
        "replication slot {slot:?} does not exist: run `outboxd setup` to create it (events \
         committed before the slot exists are not forwarded)"
    )]
    SlotMissing {
        /// The slot name.
        slot: String,
    },
    /// A slot of that name exists but is not a pgoutput slot of this database.
    #[error(
        "replication slot {slot:?} exists but is not a logical pgoutput slot of database \
         {database:?} ({found}): choose another postgres.slot name"
    )]
    SlotForeign {
        /// The slot name.
        slot: String,
        /// The connected database.
        database: String,
        /// What the slot is.
        found: String,
    },
    /// The slot was invalidated: WAL it needed is gone.
    #[error(
        "replication slot {slot:?} was invalidated by Postgres (wal_status = lost, usually because \
         it exceeded max_slot_wal_keep_size): the WAL after its confirmed position {confirmed} is \
         gone, so events committed since then cannot be streamed. Drop it \
         (`outboxd slot drop --yes`), then recover them with `outboxd setup --backfill-where \
         \"created_at >= '...'\"` if the outbox table keeps rows, or start anew with `outboxd \
         setup --new-slot`, skipping them"
    )]
    SlotInvalidated {
        /// The slot name.
        slot: String,
        /// Its last confirmed position.
        confirmed: String,
    },
    /// The slot is gone, and outboxd's record says it (or another slot of the publication)
    /// was streamed: a new slot would skip what it held.
    #[error("{}", lost_slot_message(.slot, .records, *.events_from))]
    SlotLost {
        /// The slot wanted.
        slot: String,
        /// The records of the slots that are gone.
        records: Vec<slots::SlotRecord>,
        /// Where events come from (table-less events cannot be backfilled).
        events_from: Source,
    },
    /// outboxd's state in the database cannot be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// `failover_slot` on a server older than 17.
    #[error(
        "postgres.failover_slot needs PostgreSQL 17 or newer (server is {version}): set it to false"
    )]
    FailoverUnsupported {
        /// `server_version_num`.
        version: i32,
    },
    /// Postgres refused a query or the connection failed.
    #[error("{what}: {source}")]
    Postgres {
        /// What was being done.
        what: &'static str,
        /// The error from Postgres.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl SlotError {
    /// What the problem concerns, for `outboxd check`'s report.
    pub fn subject(&self) -> &'static str {
        match self {
            SlotError::WalLevel { .. } => "wal_level",
            SlotError::TableMissing { .. } => "table",
            SlotError::NoSelect { .. } | SlotError::NoReplication { .. } => "rights",
            SlotError::PublicationMissing { .. }
            | SlotError::PublicationDenied { .. }
            | SlotError::PublicationLacksTable { .. }
            | SlotError::PublicationNotViaRoot { .. }
            | SlotError::PublicationNoInserts { .. } => "publication",
            SlotError::SlotMissing { .. }
            | SlotError::SlotForeign { .. }
            | SlotError::SlotInvalidated { .. }
            | SlotError::SlotLost { .. }
            | SlotError::FailoverUnsupported { .. } => "slot",
            SlotError::State(_) => "state",
            SlotError::Postgres { .. } => "postgres",
        }
    }

    /// The slot was invalidated (its `wal_status` is `lost`).
    pub fn invalidated(slot: &Slot) -> SlotError {
        SlotError::SlotInvalidated {
            slot: slot.name.clone(),
            confirmed: slot
                .confirmed_flush_lsn
                .map_or_else(|| "unknown".to_owned(), |l| l.to_string()),
        }
    }

    fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SlotError {
        move |source| SlotError::Postgres { what, source }
    }
}

/// The refusal of a lost slot: which slots are gone, since when events may be missing, and
/// the two ways on.
fn lost_slot_message(slot: &str, records: &[slots::SlotRecord], source: Source) -> String {
    let gone: Vec<String> = records.iter().map(slots::SlotRecord::describe).collect();
    let since = records
        .iter()
        .map(slots::SlotRecord::gap_since)
        .min()
        .unwrap_or("the slot was lost");
    let recover = match source {
        Source::Table => format!(
            "recover them with `outboxd setup --backfill-where \"created_at >= '{since}'\"` \
             (it publishes the rows still in the outbox table and creates slot {slot:?} at that \
             snapshot, so nothing is skipped; widen the window for safety, consumers dedupe \
             on the event id), or "
        ),
        Source::Messages => {
            "table-less events live only in the WAL and cannot be recovered; ".to_owned()
        }
    };
    format!(
        "replication slot {slot:?} does not exist, and outboxd streamed it: {}. Events \
         committed since then may not have been forwarded, and a new slot would start at the \
         server's current position, skipping them. So setup creates none until you decide: \
         {recover}accept the gap with `outboxd setup --new-slot`",
        gone.join("; ")
    )
}

/// What the catalogs say about everything outboxd needs, read in one go.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The server and role.
    pub server: Server,
    /// The outbox table, if it exists.
    pub table: Option<Table>,
    /// The publication, if it exists (only looked up when the table exists).
    pub publication: Option<catalog::Publication>,
    /// The slot, if it exists.
    pub slot: Option<Slot>,
}

/// Reads the server, the table, the publication and the slot.
pub async fn inspect(client: &Client, spec: SlotSpec<'_>) -> Result<Inspection, SlotError> {
    let server = catalog::server(client)
        .await
        .map_err(SlotError::pg("reading server settings"))?;
    let table = catalog::table(client, spec.table)
        .await
        .map_err(SlotError::pg("looking up the outbox table"))?;
    let publication = catalog::publication(client, spec.publication, table.as_ref())
        .await
        .map_err(SlotError::pg("reading pg_publication"))?;
    let slot = catalog::slot(client, spec.slot)
        .await
        .map_err(SlotError::pg("reading pg_replication_slots"))?;
    Ok(Inspection {
        server,
        table,
        publication,
        slot,
    })
}

impl Inspection {
    /// Every problem found, in the order an operator should fix them. Empty when outboxd
    /// can stream.
    pub fn problems(&self, spec: SlotSpec<'_>) -> Vec<SlotError> {
        let mut problems = self.prerequisites(spec);
        let publication = match (spec.source, &self.table) {
            (Source::Table, Some(table)) => {
                publication_problem(spec, table, self.publication.as_ref())
            }
            (Source::Table, None) => Ok(()),
            (Source::Messages, _) if self.publication.is_none() => {
                Err(SlotError::PublicationMissing {
                    publication: spec.publication.to_owned(),
                    create: create_publication_sql(spec, None),
                })
            }
            (Source::Messages, _) => Ok(()),
        };
        if let Err(e) = publication {
            problems.push(e);
        }
        if let Err(e) = self.slot_problem(spec) {
            problems.push(e);
        }
        problems
    }

    /// What must hold before anything can be created: wal_level, the table, the rights.
    fn prerequisites(&self, spec: SlotSpec<'_>) -> Vec<SlotError> {
        let server = &self.server;
        let mut problems = Vec::new();
        if server.wal_level != "logical" {
            problems.push(SlotError::WalLevel {
                actual: server.wal_level.clone(),
                provider: server.provider,
            });
        }
        match &self.table {
            _ if spec.source == Source::Messages => {}
            None => problems.push(SlotError::TableMissing {
                table: spec.table.to_owned(),
                database: server.database.clone(),
            }),
            Some(t) if !t.can_select => problems.push(SlotError::NoSelect {
                role: server.user.clone(),
                table: t.quoted(),
            }),
            Some(_) => {}
        }
        if !server.can_replicate {
            problems.push(SlotError::NoReplication {
                role: server.user.clone(),
                provider: server.provider,
            });
        }
        problems
    }

    fn slot_problem(&self, spec: SlotSpec<'_>) -> Result<(), SlotError> {
        let Some(slot) = &self.slot else {
            return Err(SlotError::SlotMissing {
                slot: spec.slot.to_owned(),
            });
        };
        let database = &self.server.database;
        let ours = slot.slot_type == "logical"
            && slot.plugin.as_deref() == Some("pgoutput")
            && slot.database.as_deref() == Some(database.as_str());
        if !ours {
            return Err(SlotError::SlotForeign {
                slot: slot.name.clone(),
                database: database.clone(),
                found: format!(
                    "{} slot, plugin {}, database {}",
                    slot.slot_type,
                    slot.plugin.as_deref().unwrap_or("none"),
                    slot.database.as_deref().unwrap_or("none")
                ),
            });
        }
        if slot.is_invalidated() {
            return Err(SlotError::invalidated(slot));
        }
        Ok(())
    }
}

fn publication_problem(
    spec: SlotSpec<'_>,
    table: &Table,
    publication: Option<&catalog::Publication>,
) -> Result<(), SlotError> {
    let quoted_pub = quote_ident(spec.publication);
    match publication {
        None => Err(SlotError::PublicationMissing {
            publication: spec.publication.to_owned(),
            create: create_publication_sql(spec, Some(table)),
        }),
        Some(p) if !p.includes_table => Err(SlotError::PublicationLacksTable {
            publication: spec.publication.to_owned(),
            quoted_pub,
            table: table.quoted(),
        }),
        Some(p) if !p.inserts => Err(SlotError::PublicationNoInserts {
            publication: spec.publication.to_owned(),
            quoted_pub,
        }),
        Some(p) if table.partitioned && !p.via_root => Err(SlotError::PublicationNotViaRoot {
            publication: spec.publication.to_owned(),
            quoted_pub,
            table: table.quoted(),
        }),
        Some(_) => Ok(()),
    }
}

/// The statement that creates the publication: of the table (through its root when it is
/// partitioned), or, for table-less messages, of no table (messages are not filtered by
/// publications, but pgoutput needs one to stream).
fn create_publication_sql(spec: SlotSpec<'_>, table: Option<&Table>) -> String {
    let name = quote_ident(spec.publication);
    match table {
        Some(t) if t.partitioned => format!(
            "CREATE PUBLICATION {name} FOR TABLE {} WITH (publish = 'insert', publish_via_partition_root = true)",
            t.quoted()
        ),
        Some(t) => format!(
            "CREATE PUBLICATION {name} FOR TABLE {} WITH (publish = 'insert')",
            t.quoted()
        ),
        None => format!("CREATE PUBLICATION {name} WITH (publish = 'insert')"),
    }
}

/// Everything [`prepare`] found, ready for streaming.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The server and role.
    pub server: Server,
    /// The outbox table (`None` for table-less messages).
    pub table: Option<Table>,
    /// The slot.
    pub slot: Slot,
    /// Whether this call created the publication.
    pub created_publication: bool,
    /// Whether this call created the slot.
    pub created_slot: bool,
}

/// Checks everything outboxd needs; in [`Mode::Create`], first creates the publication and
/// the slot when they are missing (and records the slot, or adopts one that has no record).
/// Returns the first problem that remains.
pub async fn prepare(
    client: &Client,
    spec: SlotSpec<'_>,
    mode: Mode,
) -> Result<Prepared, SlotError> {
    let mut found = inspect(client, spec).await?;
    let (mut created_publication, mut created_slot) = (false, false);
    if let Mode::Create(creation) = mode {
        created_publication = ensure_publication(client, spec, &found).await?;
        let server = &found.server;
        let (access, _) = state::ensure(client, &server.database, &server.user).await?;
        if let Some(denied) = access.denied(&server.user) {
            return Err(denied.into());
        }
        if found.slot.is_none() {
            let lost = slots::lost(client, spec.slot, spec.publication).await?;
            if !lost.is_empty() && creation == Creation::Refuse {
                return Err(SlotError::SlotLost {
                    slot: spec.slot.to_owned(),
                    records: lost,
                    events_from: spec.source,
                });
            }
            let lsn = create_slot(client, spec, server).await?;
            let how = match creation {
                Creation::Refuse => "setup",
                Creation::NewSlot => "setup --new-slot",
            };
            slots::record(client, spec.slot, spec.publication, how, lsn).await?;
            let note = format!(
                "replaced by `outboxd setup --new-slot` (slot {:?} created at {lsn}): events \
                 committed after this slot's last confirmed position and before {lsn} were \
                 skipped by that decision",
                spec.slot
            );
            slots::retire(client, &lost, &note).await?;
            created_slot = true;
        }
        if created_publication || created_slot {
            found = inspect(client, spec).await?;
        }
    } else if found.slot.is_none() && state::access(client).await?.slots {
        // `run` and `check`: name the gap when the record knows it.
        let lost = slots::lost(client, spec.slot, spec.publication).await?;
        if !lost.is_empty() {
            return Err(SlotError::SlotLost {
                slot: spec.slot.to_owned(),
                records: lost,
                events_from: spec.source,
            });
        }
    }
    if let Some(first) = found.problems(spec).into_iter().next() {
        return Err(first);
    }
    match found {
        Inspection {
            server,
            table,
            slot: Some(slot),
            ..
        } if table.is_some() || spec.source == Source::Messages => {
            if matches!(mode, Mode::Create(_)) {
                slots::adopt(
                    client,
                    spec.slot,
                    spec.publication,
                    slot.confirmed_flush_lsn,
                )
                .await?;
            }
            Ok(Prepared {
                server,
                table,
                slot,
                created_publication,
                created_slot,
            })
        }
        // problems() reports a missing table or slot.
        Inspection { .. } => Err(SlotError::SlotMissing {
            slot: spec.slot.to_owned(),
        }),
    }
}

/// Checks the prerequisites (wal_level, table, rights) and creates the publication when it
/// is missing; returns whether it did. The slot is not looked at.
pub async fn ensure_publication(
    client: &Client,
    spec: SlotSpec<'_>,
    found: &Inspection,
) -> Result<bool, SlotError> {
    if let Some(first) = found.prerequisites(spec).into_iter().next() {
        return Err(first);
    }
    let table = match spec.source {
        Source::Table => found.table.as_ref(),
        Source::Messages => None,
    };
    if found.publication.is_none() && (table.is_some() || spec.source == Source::Messages) {
        create_publication(client, spec, &found.server, table).await?;
        return Ok(true);
    }
    Ok(false)
}

async fn create_publication(
    client: &Client,
    spec: SlotSpec<'_>,
    server: &Server,
    table: Option<&Table>,
) -> Result<(), SlotError> {
    let create = create_publication_sql(spec, table);
    match client.batch_execute(&create).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            Err(SlotError::PublicationDenied {
                role: server.user.clone(),
                publication: spec.publication.to_owned(),
                create,
            })
        }
        // Another `setup` created it first.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) => Err(SlotError::pg("creating the publication")(e)),
    }
}

async fn create_slot(
    client: &Client,
    spec: SlotSpec<'_>,
    server: &Server,
) -> Result<Lsn, SlotError> {
    // A new slot starts only once every transaction that holds an xid now has ended: say
    // which, rather than wait without a word.
    if let Ok(waits) = crate::holdups::writing_transactions(client, 5).await {
        for w in &waits {
            if let crate::holdups::HoldUp::OldTransaction {
                pid,
                age_secs,
                application,
                state,
            } = w
            {
                tracing::warn!(
                    pid,
                    open_s = age_secs,
                    application = %application,
                    state = %state,
                    "creating the slot waits for this transaction to end (a logical slot starts \
                     once every transaction older than it has ended): commit or roll it back, or \
                     SELECT pg_terminate_backend({pid})"
                );
            }
        }
    }
    let result = if spec.failover {
        if server.version_num < 170_000 {
            return Err(SlotError::FailoverUnsupported {
                version: server.version_num,
            });
        }
        client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                &[&spec.slot],
            )
            .await
    } else {
        client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&spec.slot],
            )
            .await
    };
    match result {
        Ok(row) => Ok(row.get::<_, String>(0).parse().unwrap_or_default()),
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(Lsn::ZERO),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            Err(SlotError::NoReplication {
                role: server.user.clone(),
                provider: server.provider,
            })
        }
        Err(e) => Err(SlotError::pg("creating the replication slot")(e)),
    }
}

/// Drops the slot. Refuses while a session streams from it.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    //! [`Inspection::problems`] on catalogs built by hand: every problem it recognises, the
    //! ones it must not report, and their order.

    use super::*;
    use crate::catalog::Publication;

    /// Events from the outbox table.
    const TABLE: SlotSpec<'static> = SlotSpec {
        slot: "outboxd",
        publication: "outboxd_pub",
        table: "outbox",
        failover: false,
        source: Source::Table,
    };

    /// Table-less events, as logical decoding messages.
    const MESSAGES: SlotSpec<'static> = SlotSpec {
        source: Source::Messages,
        ..TABLE
    };

    /// A server, table, publication and slot outboxd can stream from.
    fn ready() -> Inspection {
        Inspection {
            server: Server {
                version_num: 160_004,
                wal_level: "logical".to_owned(),
                in_recovery: false,
                database: "app".to_owned(),
                user: "outboxd".to_owned(),
                can_replicate: true,
                provider: None,
            },
            table: Some(Table {
                oid: 16_384,
                schema: "public".to_owned(),
                name: "outbox".to_owned(),
                columns: vec!["id".to_owned(), "topic".to_owned(), "payload".to_owned()],
                types: Vec::new(),
                can_select: true,
                partitioned: false,
            }),
            publication: Some(Publication {
                inserts: true,
                includes_table: true,
                via_root: false,
            }),
            slot: Some(Slot {
                name: "outboxd".to_owned(),
                plugin: Some("pgoutput".to_owned()),
                slot_type: "logical".to_owned(),
                database: Some("app".to_owned()),
                active: false,
                active_pid: None,
                confirmed_flush_lsn: Some(Lsn::new(0x16B_3748)),
                restart_lsn: Some(Lsn::new(0x16B_3700)),
                wal_status: Some("reserved".to_owned()),
                current_wal_lsn: Lsn::new(0x16C_0000),
            }),
        }
    }

    /// [`ready`], changed by `change`.
    fn with(change: impl FnOnce(&mut Inspection)) -> Inspection {
        let mut found = ready();
        change(&mut found);
        found
    }

    fn table(found: &mut Inspection) -> &mut Table {
        found.table.as_mut().expect("a table")
    }

    fn publication(found: &mut Inspection) -> &mut Publication {
        found.publication.as_mut().expect("a publication")
    }

    fn slot(found: &mut Inspection) -> &mut Slot {
        found.slot.as_mut().expect("a slot")
    }

    fn subjects(problems: &[SlotError]) -> Vec<&'static str> {
        problems.iter().map(SlotError::subject).collect()
    }

    #[test]
    fn a_ready_server_has_no_problem() {
        assert!(ready().problems(TABLE).is_empty());
        // A partitioned table published through its root.
        let partitioned = with(|f| {
            table(f).partitioned = true;
            publication(f).via_root = true;
        });
        assert!(partitioned.problems(TABLE).is_empty());
        // Retained WAL beyond max_wal_size is not yet a problem: only `lost` is.
        for status in ["extended", "unreserved"] {
            let found = with(|f| slot(f).wal_status = Some(status.to_owned()));
            assert!(found.problems(TABLE).is_empty(), "{status}");
        }
    }

    #[test]
    fn wal_level_must_be_logical() {
        let problems = with(|f| f.server.wal_level = "replica".to_owned()).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::WalLevel { actual, provider: None }] if actual == "replica"
            ),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["wal_level"]);
        assert!(problems[0].to_string().contains("set wal_level = logical"));
        // On a managed service, its own setting.
        let problems = with(|f| {
            f.server.wal_level = "replica".to_owned();
            f.server.provider = Some(Provider::Rds);
        })
        .problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::WalLevel {
                    provider: Some(Provider::Rds),
                    ..
                }]
            ),
            "{problems:?}"
        );
        assert!(
            problems[0]
                .to_string()
                .contains("rds.logical_replication = 1")
        );
    }

    #[test]
    fn a_missing_table_is_reported_and_its_publication_not_looked_at() {
        let problems = with(|f| {
            f.table = None;
            f.publication = None;
        })
        .problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::TableMissing { table, database }] if table == "outbox" && database == "app"
            ),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["table"]);
    }

    #[test]
    fn the_role_must_read_the_table_and_stream() {
        let problems = with(|f| table(f).can_select = false).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::NoSelect { role, table }]
                    if role == "outboxd" && table == "\"public\".\"outbox\""
            ),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["rights"]);

        let problems = with(|f| f.server.can_replicate = false).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::NoReplication { role, provider: None }] if role == "outboxd"
            ),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["rights"]);
        assert!(
            problems[0]
                .to_string()
                .contains("ALTER ROLE outboxd WITH REPLICATION")
        );

        let problems = with(|f| {
            f.server.can_replicate = false;
            f.server.provider = Some(Provider::Rds);
        })
        .problems(TABLE);
        assert!(
            problems[0]
                .to_string()
                .contains("GRANT rds_replication TO outboxd"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_missing_publication_comes_with_the_statement_that_creates_it() {
        let problems = with(|f| f.publication = None).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationMissing { publication, create }]
                    if publication == "outboxd_pub"
                        && create == "CREATE PUBLICATION \"outboxd_pub\" FOR TABLE \
                                      \"public\".\"outbox\" WITH (publish = 'insert')"
            ),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["publication"]);
        // A partitioned table is published through its root.
        let problems = with(|f| {
            f.publication = None;
            table(f).partitioned = true;
        })
        .problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationMissing { create, .. }]
                    if create.ends_with("WITH (publish = 'insert', publish_via_partition_root = true)")
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn a_publication_must_include_the_table_publish_inserts_and_go_through_the_root() {
        let problems = with(|f| publication(f).includes_table = false).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationLacksTable { publication, quoted_pub, table }]
                    if publication == "outboxd_pub"
                        && quoted_pub == "\"outboxd_pub\""
                        && table == "\"public\".\"outbox\""
            ),
            "{problems:?}"
        );
        let problems = with(|f| publication(f).inserts = false).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationNoInserts { publication, quoted_pub }]
                    if publication == "outboxd_pub" && quoted_pub == "\"outboxd_pub\""
            ),
            "{problems:?}"
        );
        let problems = with(|f| table(f).partitioned = true).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationNotViaRoot { publication, table, .. }]
                    if publication == "outboxd_pub" && table == "\"public\".\"outbox\""
            ),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["publication"]);
    }

    #[test]
    fn one_publication_problem_at_a_time_the_first_to_fix_first() {
        let problems = with(|f| {
            table(f).partitioned = true;
            *publication(f) = Publication {
                inserts: false,
                includes_table: false,
                via_root: false,
            };
        })
        .problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationLacksTable { .. }]
            ),
            "{problems:?}"
        );
        let problems = with(|f| {
            table(f).partitioned = true;
            publication(f).inserts = false;
        })
        .problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationNoInserts { .. }]
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn table_less_messages_need_no_table_but_a_publication() {
        // Without a table (or one the role may not read), nothing is missing.
        let no_table = with(|f| {
            f.table = None;
            publication(f).includes_table = false;
        });
        assert!(no_table.problems(MESSAGES).is_empty());
        let unreadable = with(|f| table(f).can_select = false);
        assert!(unreadable.problems(MESSAGES).is_empty());
        // pgoutput needs a publication to stream, of no table.
        let problems = with(|f| {
            f.table = None;
            f.publication = None;
        })
        .problems(MESSAGES);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::PublicationMissing { publication, create }]
                    if publication == "outboxd_pub"
                        && create == "CREATE PUBLICATION \"outboxd_pub\" WITH (publish = 'insert')"
            ),
            "{problems:?}"
        );
        // wal_level and the right to stream still matter.
        let problems = with(|f| {
            f.server.wal_level = "replica".to_owned();
            f.server.can_replicate = false;
        })
        .problems(MESSAGES);
        assert_eq!(subjects(&problems), ["wal_level", "rights"]);
    }

    #[test]
    fn a_missing_slot_is_reported() {
        let problems = with(|f| f.slot = None).problems(TABLE);
        assert!(
            matches!(problems.as_slice(), [SlotError::SlotMissing { slot }] if slot == "outboxd"),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["slot"]);
        assert_eq!(with(|f| f.slot = None).problems(MESSAGES).len(), 1);
    }

    #[test]
    fn a_slot_of_another_kind_plugin_or_database_is_not_ours() {
        // slot_type, plugin, database, and the slot as the refusal describes it.
        let cases = [
            (
                "physical",
                None,
                None,
                "physical slot, plugin none, database none",
            ),
            (
                "logical",
                Some("test_decoding"),
                Some("app"),
                "logical slot, plugin test_decoding, database app",
            ),
            (
                "logical",
                Some("wal2json"),
                Some("app"),
                "logical slot, plugin wal2json, database app",
            ),
            (
                "logical",
                Some("pgoutput"),
                Some("other"),
                "logical slot, plugin pgoutput, database other",
            ),
        ];
        for (slot_type, plugin, database, expected) in cases {
            let problems = with(|f| {
                let s = slot(f);
                s.slot_type = slot_type.to_owned();
                s.plugin = plugin.map(str::to_owned);
                s.database = database.map(str::to_owned);
            })
            .problems(TABLE);
            assert!(
                matches!(
                    problems.as_slice(),
                    [SlotError::SlotForeign { slot, database, found }]
                        if slot == "outboxd" && database == "app" && found == expected
                ),
                "{expected}: {problems:?}"
            );
            assert_eq!(subjects(&problems), ["slot"]);
        }
        // A foreign slot is reported as such, even when it is also lost.
        let problems = with(|f| {
            slot(f).plugin = Some("wal2json".to_owned());
            slot(f).wal_status = Some("lost".to_owned());
        })
        .problems(TABLE);
        assert!(
            matches!(problems.as_slice(), [SlotError::SlotForeign { .. }]),
            "{problems:?}"
        );
    }

    #[test]
    fn a_lost_slot_is_invalidated_with_its_last_confirmed_position() {
        let problems = with(|f| slot(f).wal_status = Some("lost".to_owned())).problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::SlotInvalidated { slot, confirmed }]
                    if slot == "outboxd" && confirmed == "0/16B3748"
            ),
            "{problems:?}"
        );
        assert_eq!(subjects(&problems), ["slot"]);
        let problems = with(|f| {
            slot(f).wal_status = Some("lost".to_owned());
            slot(f).confirmed_flush_lsn = None;
        })
        .problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [SlotError::SlotInvalidated { confirmed, .. }] if confirmed == "unknown"
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn every_problem_at_once_in_the_order_to_fix_them() {
        let problems = with(|f| {
            f.server.wal_level = "minimal".to_owned();
            f.server.can_replicate = false;
            table(f).can_select = false;
            publication(f).includes_table = false;
            f.slot = None;
        })
        .problems(TABLE);
        assert!(
            matches!(
                problems.as_slice(),
                [
                    SlotError::WalLevel { .. },
                    SlotError::NoSelect { .. },
                    SlotError::NoReplication { .. },
                    SlotError::PublicationLacksTable { .. },
                    SlotError::SlotMissing { .. },
                ]
            ),
            "{problems:?}"
        );
        let problems = with(|f| {
            f.server.wal_level = "replica".to_owned();
            f.table = None;
            f.publication = None;
            slot(f).wal_status = Some("lost".to_owned());
        })
        .problems(TABLE);
        assert_eq!(subjects(&problems), ["wal_level", "table", "slot"]);
    }
}
