//! outboxd's Postgres side.
//!
//! - [`conninfo`]: the connection string, never displayed with its password.
//! - [`tls`]: TLS with libpq's `sslmode` meanings, for both connections.
//! - [`catalog`]: what outboxd reads from the catalogs (server, table, publication, slot).
//! - [`holdups`]: what holds logical decoding back (`synchronized_standby_slots`, the
//!   walsender's wait, an old transaction).
//! - [`slot`]: setting up and checking the publication and the slot.
//! - [`backfill`]: publishing rows already in the table (backfill at setup, replay).
//! - [`prune`]: deleting old rows once the slot has confirmed them.
//! - [`stream`]: one replication session, as events for the pipeline.
//! - [`decode`]: pgoutput messages.
//! - [`message`]: outboxd's own logical decoding messages (table-less events, backfill, replay).
//! - [`notices`]: the server's notices and warnings on SQL connections, in the log.
//! - [`state`]: outboxd's own state in the database (schema `outboxd`): the slots it
//!   created, the key that signs its messages, dead letters kept whole.

pub mod backfill;
pub mod catalog;
pub mod conninfo;
pub mod decode;
pub mod holdups;
pub mod message;
pub mod notices;
pub mod prune;
pub mod slot;
pub mod state;
pub mod stream;
pub mod tls;

pub use conninfo::ConnInfo;
pub use stream::{Source, StreamError, StreamOptions, WalEvent, WalStream, probe_replication};
