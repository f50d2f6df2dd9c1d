//! The record of the slots outboxd streams (`outboxd.slots`): what turns a lost slot into a
//! decision instead of a silent gap.
//!
//! A slot, once created, holds back the WAL of every event committed after its position. If
//! it is dropped, invalidated, or left behind on a primary that failed before PostgreSQL 17, a
//! new slot starts at the server's current WAL position: everything committed in between is
//! never forwarded. `run` refuses a missing slot, but `setup` (which container images run at
//! every start) would create one. So:
//!
//! - `setup` records every slot it creates ([`record`]); `setup` and `run` adopt a slot that
//!   exists without a record ([`adopt`]);
//! - `run` notes, at most once a minute while events flow, the position the slot confirmed
//!   ([`note_confirmed`]): the start of the gap if it is lost;
//! - before `setup` creates a slot, [`lost`] lists the live records whose slot is gone (the
//!   same slot name, or another slot of the same publication). Any: `setup` refuses, naming
//!   them; `setup --backfill-where` (the recovery) or `setup --new-slot` (the decision to skip)
//!   retire them ([`retire`]).
//!
//! Records are never deleted by outboxd: retired ones say who decided what, and when.

use outboxd_core::Lsn;
use tokio_postgres::Client;

use super::StateError;

/// One row of `outboxd.slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// The slot.
    pub slot: String,
    /// The publication it streams.
    pub publication: String,
    /// When the record began, as Postgres shows it.
    pub created_at: String,
    /// How: `setup`, `setup --backfill-where`, `setup --new-slot` or `adopted`.
    pub created_by: String,
    /// The slot's position when the record began.
    pub created_lsn: Option<Lsn>,
    /// The newest position `run` saw the slot confirm, and when.
    pub confirmed: Option<(Lsn, String)>,
}

impl SlotRecord {
    /// What is known of the gap this record's slot left, for a refusal: since when events
    /// may be missing.
    pub fn describe(&self) -> String {
        let since = match &self.confirmed {
            Some((lsn, at)) => format!("it last confirmed {lsn} at {at}"),
            None => format!(
                "it started at {} and no confirmed position was noted since",
                self.created_lsn
                    .map_or_else(|| "an unknown position".to_owned(), |l| l.to_string())
            ),
        };
        format!(
            "slot {:?} of publication {:?} (recorded {} by {}; {since})",
            self.slot, self.publication, self.created_at, self.created_by
        )
    }

    /// When events may have started to go missing: the last noted confirmation, else the
    /// record's start.
    pub fn gap_since(&self) -> &str {
        self.confirmed
            .as_ref()
            .map_or(self.created_at.as_str(), |(_, at)| at.as_str())
    }
}

const COLUMNS: &str = "slot, publication, created_at::text, created_by, created_lsn::text, \
                       confirmed_lsn::text, confirmed_at::text";

fn from_row(row: &tokio_postgres::Row) -> SlotRecord {
    let lsn = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|s| s.parse::<Lsn>().ok())
    };
    SlotRecord {
        slot: row.get(0),
        publication: row.get(1),
        created_at: row.get(2),
        created_by: row.get(3),
        created_lsn: lsn(4),
        confirmed: lsn(5).zip(row.get::<_, Option<String>>(6)),
    }
}

/// The live (not retired) record of `slot`, if any.
pub async fn live(client: &Client, slot: &str) -> Result<Option<SlotRecord>, StateError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM outboxd.slots WHERE slot = $1 AND retired_at IS NULL \
                 ORDER BY created_at DESC LIMIT 1"
            ),
            &[&slot],
        )
        .await
        .map_err(StateError::pg("reading outboxd.slots"))?;
    Ok(row.as_ref().map(from_row))
}

/// The live records of slots that are gone: `slot` itself, or any slot of `publication`,
/// whose replication slot no longer exists on this server.
pub async fn lost(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<Vec<SlotRecord>, StateError> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM outboxd.slots s \
                 WHERE s.retired_at IS NULL AND (s.slot = $1 OR s.publication = $2) \
                   AND NOT EXISTS (SELECT 1 FROM pg_replication_slots r \
                                   WHERE r.slot_name = s.slot) \
                 ORDER BY s.created_at"
            ),
            &[&slot, &publication],
        )
        .await
        .map_err(StateError::pg("reading outboxd.slots"))?;
    Ok(rows.iter().map(from_row).collect())
}

/// Records a slot `setup` just created at `lsn`, `how` (`setup`, `setup --backfill-where`,
/// `setup --new-slot`).
pub async fn record(
    client: &Client,
    slot: &str,
    publication: &str,
    how: &str,
    lsn: Lsn,
) -> Result<(), StateError> {
    client
        .execute(
            "INSERT INTO outboxd.slots (slot, publication, created_at, created_by, created_lsn) \
             VALUES ($1, $2, clock_timestamp(), $3, $4::text::pg_lsn)",
            &[&slot, &publication, &how, &lsn.to_string()],
        )
        .await
        .map_err(StateError::pg("recording the slot in outboxd.slots"))?;
    Ok(())
}

/// Records `slot` as adopted when it exists and has no live record (created before outboxd
/// kept records, or by hand). Returns whether it did.
pub async fn adopt(
    client: &Client,
    slot: &str,
    publication: &str,
    confirmed: Option<Lsn>,
) -> Result<bool, StateError> {
    if live(client, slot).await?.is_some() {
        return Ok(false);
    }
    client
        .execute(
            "INSERT INTO outboxd.slots (slot, publication, created_at, created_by, created_lsn) \
             VALUES ($1, $2, clock_timestamp(), 'adopted', $3::text::pg_lsn)",
            &[&slot, &publication, &confirmed.map(|l| l.to_string())],
        )
        .await
        .map_err(StateError::pg("recording the slot in outboxd.slots"))?;
    Ok(true)
}

/// Retires the live records of `lost` slots, with the operator's decision in `note`.
pub async fn retire(client: &Client, lost: &[SlotRecord], note: &str) -> Result<(), StateError> {
    for record in lost {
        client
            .execute(
                "UPDATE outboxd.slots SET retired_at = clock_timestamp(), retired_note = $3 \
                 WHERE slot = $1 AND created_at = $2::text::timestamptz AND retired_at IS NULL",
                &[&record.slot, &record.created_at, &note],
            )
            .await
            .map_err(StateError::pg("retiring a record in outboxd.slots"))?;
    }
    Ok(())
}

/// Notes that `slot` confirmed `lsn`, now.
pub async fn note_confirmed(client: &Client, slot: &str, lsn: Lsn) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE outboxd.slots SET confirmed_lsn = $2::text::pg_lsn, confirmed_at = now() \
             WHERE slot = $1 AND retired_at IS NULL",
            &[&slot, &lsn.to_string()],
        )
        .await
        .map_err(StateError::pg(
            "noting the confirmed position in outboxd.slots",
        ))?;
    Ok(())
}
