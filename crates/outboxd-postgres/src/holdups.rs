//! What holds logical decoding back on a server, read from its catalogs: so that a session
//! that is connected but not advancing can say why, and `check` can warn before a promotion
//! makes it so.
//!
//! - `synchronized_standby_slots` (PostgreSQL 17+): a logical walsender sends nothing beyond
//!   what every physical slot named there has confirmed. A name the server has no slot for
//!   (a standby cloned with `pg_basebackup` inherits its primary's setting, and after its
//!   promotion names its own former slot) stops logical decoding altogether; an inactive
//!   slot (its standby is down) stops it until the standby is back.
//! - The walsender's own state: what it waits on (`pg_stat_activity.wait_event`).
//! - The oldest open transaction: creating a slot waits for every transaction older than
//!   it, and a session's decoding restarts from a `restart_lsn` that an old transaction
//!   holds back.

use tokio_postgres::Client;

/// One reason decoding does not advance, with the fix where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldUp {
    /// `synchronized_standby_slots` names slots this server lacks, or that no standby streams.
    StandbySlots {
        /// The setting, as the server shows it.
        setting: String,
        /// Names with no slot here.
        missing: Vec<String>,
        /// Physical slots here that no session streams.
        inactive: Vec<String>,
    },
    /// The walsender of the slot waits on an event other than new WAL or the client.
    Walsender {
        /// Its PID.
        pid: i32,
        /// `wait_event_type:wait_event`.
        wait: String,
    },
    /// An open transaction, older than `min_age_secs` of [`find`].
    OldTransaction {
        /// Its backend.
        pid: i32,
        /// How long it has been open, in seconds.
        age_secs: i64,
        /// Its `application_name` (may be empty).
        application: String,
        /// Its `state` (`idle in transaction`, `active`, ...).
        state: String,
    },
}

impl HoldUp {
    /// What it is and how to fix it, in one sentence or two.
    pub fn describe(&self) -> String {
        match self {
            HoldUp::StandbySlots {
                setting,
                missing,
                inactive,
            } => {
                let mut parts = Vec::new();
                if !missing.is_empty() {
                    parts.push(format!(
                        "names {} that this server does not have",
                        quoted_list(missing)
                    ));
                }
                if !inactive.is_empty() {
                    parts.push(format!(
                        "names {} that no standby streams",
                        quoted_list(inactive)
                    ));
                }
                let keep: Vec<&str> = setting
                    .split(',')
                    .map(|n| n.trim().trim_matches('"'))
                    .filter(|n| !n.is_empty() && !missing.iter().any(|m| m == n))
                    .collect();
                format!(
                    "synchronized_standby_slots = '{setting}' {}: logical decoding waits for \
                     those slots to confirm the WAL, so nothing is sent. Create the replication \
                     slot on this server, or run ALTER SYSTEM SET synchronized_standby_slots = \
                     '{}'; SELECT pg_reload_conf();",
                    parts.join(" and "),
                    keep.join(",")
                )
            }
            HoldUp::Walsender { pid, wait } => {
                format!("the slot's walsender (PID {pid}) waits on {wait}")
            }
            HoldUp::OldTransaction {
                pid,
                age_secs,
                application,
                state,
            } => {
                let open = if *age_secs < 0 {
                    "is open (for how long, this role may not see)".to_owned()
                } else {
                    format!("has been open for {age_secs} s")
                };
                format!(
                    "a transaction {open} (PID {pid}, application {application:?}, {state}): \
                     decoding cannot pass what it holds back; end it, or SELECT \
                     pg_terminate_backend({pid})"
                )
            }
        }
    }

    /// A short stable label, for logs and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            HoldUp::StandbySlots { .. } => "synchronized_standby_slots",
            HoldUp::Walsender { .. } => "walsender",
            HoldUp::OldTransaction { .. } => "old_transaction",
        }
    }
}

fn quoted_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let noun = if names.len() == 1 { "slot" } else { "slots" };
    format!("{noun} {}", quoted.join(", "))
}

/// `synchronized_standby_slots` on this server (PostgreSQL 17+) when it names slots the
/// server lacks or that no standby streams; `None` when it is empty, fine, or unknown.
pub async fn standby_slots(client: &Client) -> Result<Option<HoldUp>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await?;
    let setting: String = row.get(0);
    let names: Vec<String> = setting
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT n, s.active FROM unnest($1::text[]) AS n \
             LEFT JOIN pg_replication_slots s ON s.slot_name = n AND s.slot_type = 'physical'",
            &[&names],
        )
        .await?;
    let mut missing = Vec::new();
    let mut inactive = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        match r.get::<_, Option<bool>>(1) {
            None => missing.push(name),
            Some(false) => inactive.push(name),
            Some(true) => {}
        }
    }
    if missing.is_empty() && inactive.is_empty() {
        return Ok(None);
    }
    Ok(Some(HoldUp::StandbySlots {
        setting,
        missing,
        inactive,
    }))
}

/// How far the walsender streaming `slot` has read and sent the WAL (`sent_lsn`): it moves
/// while decoding goes on, even before anything reaches the client (a large transaction).
pub async fn walsender_sent(
    client: &Client,
    slot: &str,
) -> Result<Option<outboxd_core::Lsn>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT r.sent_lsn::text FROM pg_replication_slots s \
             JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|t| t.parse().ok()))
}

/// Wait events of a logical walsender that mean it is idle or waiting for its client, not
/// held back: caught up, or outboxd itself is slow.
const ORDINARY_WAITS: &[&str] = &[
    "WalSenderWaitForWal",
    "WalSenderWaitForWAL",
    "WalSenderMain",
    "WalSenderWriteData",
    "ClientRead",
    "ClientWrite",
];

/// Everything that may hold `slot`'s decoding back now: the standby slots, the walsender's
/// wait, and open transactions older than `min_age_secs`.
pub async fn find(
    client: &Client,
    slot: &str,
    min_age_secs: i64,
) -> Result<Vec<HoldUp>, tokio_postgres::Error> {
    let mut found = Vec::new();
    // Only slots created with failover = true (PostgreSQL 17+) wait for the standby slots.
    let failover: bool = client
        .query_opt(
            "SELECT coalesce((to_jsonb(s) ->> 'failover')::bool, false) \
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some_and(|r| r.get(0));
    if failover && let Some(h) = standby_slots(client).await? {
        found.push(h);
    }
    let walsender = client
        .query_opt(
            "SELECT a.pid, a.wait_event_type, a.wait_event FROM pg_replication_slots s \
             JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(r) = walsender {
        let (pid, kind, event): (i32, Option<String>, Option<String>) =
            (r.get(0), r.get(1), r.get(2));
        if let Some(event) = event.filter(|e| !ORDINARY_WAITS.contains(&e.as_str())) {
            found.push(HoldUp::Walsender {
                pid,
                wait: format!("{}:{event}", kind.unwrap_or_default()),
            });
        }
    }
    let old = client
        .query_opt(
            "SELECT pid, extract(epoch FROM now() - xact_start)::bigint, \
                    coalesce(application_name, ''), coalesce(state, '') \
             FROM pg_stat_activity \
             WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() \
               AND backend_type = 'client backend' \
               AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) \
               AND now() - xact_start > make_interval(secs => $1) \
             ORDER BY xact_start LIMIT 1",
            &[&(min_age_secs as f64)],
        )
        .await?;
    if let Some(r) = old {
        found.push(HoldUp::OldTransaction {
            pid: r.get(0),
            age_secs: r.get(1),
            application: r.get(2),
            state: r.get(3),
        });
    }
    Ok(found)
}

/// Open transactions that hold an xid and are older than `min_age_secs`, oldest first, in
/// every database: creating a logical slot waits until each has ended. Found through their
/// lock on their own xid (`pg_locks` shows every session's); their age, application and state
/// only where the role may see other sessions (`pg_read_all_stats`; else the age is -1).
pub async fn writing_transactions(
    client: &Client,
    min_age_secs: i64,
) -> Result<Vec<HoldUp>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT * FROM (SELECT DISTINCT ON (l.pid) l.pid, \
                    coalesce(extract(epoch FROM now() - a.xact_start)::bigint, -1) AS age, \
                    coalesce(a.application_name, ''), coalesce(a.state, '') \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted \
               AND l.pid <> pg_backend_pid() \
               AND (a.xact_start IS NULL OR now() - a.xact_start > make_interval(secs => $1)) \
             ORDER BY l.pid) t ORDER BY age DESC",
            &[&(min_age_secs as f64)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| HoldUp::OldTransaction {
            pid: r.get(0),
            age_secs: r.get(1),
            application: r.get(2),
            state: r.get(3),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_standby_slot_is_named_with_the_statement_that_fixes_it() {
        let h = HoldUp::StandbySlots {
            setting: "sb1, sb2".into(),
            missing: vec!["sb1".into()],
            inactive: vec![],
        };
        let text = h.describe();
        assert!(
            text.contains("names slot \"sb1\" that this server does not have"),
            "{text}"
        );
        assert!(
            text.contains("ALTER SYSTEM SET synchronized_standby_slots = 'sb2'"),
            "{text}"
        );
        assert_eq!(h.kind(), "synchronized_standby_slots");
    }
}
