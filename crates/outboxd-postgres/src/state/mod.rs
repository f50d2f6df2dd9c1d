//! outboxd's own state in the database: schema `outboxd`, made by sql/state.sql.
//!
//! Three tables, each closing a way for events to go missing or be forged without anyone
//! deciding it:
//!
//! - [`slots`]: every slot `setup` created or adopted. A recorded slot that is gone means a
//!   gap: `setup` refuses to create another one until an operator decides (a backfill, or
//!   `--new-slot`).
//! - [`keys`]: the key that signs outboxd's logical decoding messages; only signed ones are
//!   acted on.
//! - [`dead_letters`]: events whose dead letter could not hold the payload, kept whole.
//!
//! The schema is the admin's (sql/state.sql, then sql/role.sql for the outboxd role's
//! grants). `setup` creates it itself when it is missing and the role may (a superuser, or a
//! role with CREATE on the database), from the same file.

pub mod dead_letters;
pub mod keys;
pub mod slots;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// sql/state.sql, which `setup` runs when the schema is missing and the role may create it.
pub const STATE_SQL: &str = include_str!("../../../../sql/state.sql");

/// The state schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The schema (or one of its tables) is missing, and this role may not create it.
    #[error(
        "schema outboxd (where outboxd records its slots, the key that signs its messages and \
         dead letters without their payload) is missing in database {database:?}, and role \
         {role:?} may not create it: as the admin that owns the outbox, run sql/state.sql, then \
         sql/role.sql"
    )]
    Missing {
        /// The connected database.
        database: String,
        /// The connected role.
        role: String,
    },
    /// The role may not use a table of the schema.
    #[error(
        "role {role:?} may not {what}: run sql/role.sql as the admin (it grants what outboxd uses in schema outboxd)"
    )]
    Denied {
        /// The connected role.
        role: String,
        /// What it may not do.
        what: &'static str,
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

impl StateError {
    /// A failure of Postgres while doing `what`.
    pub fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StateError {
        move |source| StateError::Postgres { what, source }
    }
}

/// What the connected role finds of the schema, and may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Every table of the schema exists.
    pub present: bool,
    /// The role may read and record slots.
    pub slots: bool,
    /// The role may read the message keys.
    pub keys: bool,
    /// The role may keep dead letters.
    pub dead_letters: bool,
    /// The role may sign messages (`outboxd.sign`, for replay and backfill).
    pub sign: bool,
}

impl Access {
    /// The first thing the role lacks for `run`, `setup` and `replay`, as a refusal.
    pub fn denied(&self, role: &str) -> Option<StateError> {
        let what = if !self.slots {
            "read and record slots in outboxd.slots"
        } else if !self.keys {
            "read the message keys in outboxd.message_keys"
        } else if !self.dead_letters {
            "keep dead letters in outboxd.dead_letters"
        } else if !self.sign {
            "sign messages with outboxd.sign()"
        } else {
            return None;
        };
        Some(StateError::Denied {
            role: role.to_owned(),
            what,
        })
    }
}

/// Reads whether the schema is there and what the role may do with it.
pub async fn access(client: &Client) -> Result<Access, StateError> {
    let row = client
        .query_one(
            "SELECT to_regclass('outboxd.slots') IS NOT NULL \
                    AND to_regclass('outboxd.message_keys') IS NOT NULL \
                    AND to_regclass('outboxd.dead_letters') IS NOT NULL \
                    AND to_regprocedure('outboxd.sign(text, text)') IS NOT NULL",
            &[],
        )
        .await
        .map_err(StateError::pg("looking for schema outboxd"))?;
    if !row.get::<_, bool>(0) {
        return Ok(Access::default());
    }
    let row = client
        .query_one(
            "SELECT has_schema_privilege('outboxd', 'USAGE'), \
                    has_table_privilege('outboxd.slots', 'SELECT, INSERT, UPDATE'), \
                    has_table_privilege('outboxd.message_keys', 'SELECT'), \
                    has_table_privilege('outboxd.dead_letters', 'SELECT, INSERT'), \
                    has_function_privilege('outboxd.sign(text, text)', 'EXECUTE')",
            &[],
        )
        .await
        .map_err(StateError::pg("reading the privileges on schema outboxd"))?;
    let usage: bool = row.get(0);
    Ok(Access {
        present: true,
        slots: usage && row.get::<_, bool>(1),
        keys: usage && row.get::<_, bool>(2),
        dead_letters: usage && row.get::<_, bool>(3),
        sign: usage && row.get::<_, bool>(4),
    })
}

/// Makes sure the schema is there (for `setup`): runs sql/state.sql when it is missing and
/// the role may create it. Returns what the role may do, and whether this call created it.
pub async fn ensure(
    client: &Client,
    database: &str,
    role: &str,
) -> Result<(Access, bool), StateError> {
    let found = access(client).await?;
    if found.present {
        return Ok((found, false));
    }
    match client.batch_execute(STATE_SQL).await {
        Ok(()) => Ok((access(client).await?, true)),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Err(StateError::Missing {
            database: database.to_owned(),
            role: role.to_owned(),
        }),
        Err(e) => Err(StateError::pg("creating schema outboxd (sql/state.sql)")(e)),
    }
}
