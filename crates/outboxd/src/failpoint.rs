//! Crash windows on purpose, for tests: `OUTBOXD_FAILPOINT=<name>[@<n>]` makes the process
//! abort (like `kill -9`: no cleanup, no final confirm) the `n`-th time (default the first)
//! execution passes the named point.
//!
//! Failpoints exist only in builds with the cargo feature `failpoints` (off by default, never
//! in a release build): without it [`hit`] and [`is_armed`] compile to nothing, and a process
//! that finds `OUTBOXD_FAILPOINT` set refuses to start ([`check_env`]) rather than run
//! without the crash its caller asked for. With the feature, an unarmed point costs one
//! relaxed atomic load, and a name that is not in the table below, or a count that is not a
//! positive number, is refused at startup too.
//!
//! | name | constant | where |
//! |---|---|---|
//! | `after-ack-before-confirm` | [`AFTER_ACK_BEFORE_CONFIRM`] | the broker acknowledged a batch; the position is not yet confirmed |
//! | `after-confirm` | [`AFTER_CONFIRM`] | a position was confirmed and reported to Postgres |
//! | `mid-transaction` | [`MID_TRANSACTION`] | events of a transaction were acknowledged; its Commit is not read yet |
//! | `during-reconnect` | [`DURING_RECONNECT`] | a replication session ended; the next one is not started |
//! | `backfill-batch` | [`BACKFILL_BATCH`] | `setup --backfill-where` wrote a batch of rows; not committed yet |
//! | `backfill-committed` | [`BACKFILL_COMMITTED`] | the backfill is committed; its slot is not made yet |
//! | `replay-batch` | [`REPLAY_BATCH`] | `replay` wrote a batch of rows; not committed yet |
//! | `replay-committed` | [`REPLAY_COMMITTED`] | the replay is committed |

/// The environment variable that arms a failpoint.
pub const ENV: &str = "OUTBOXD_FAILPOINT";

/// The broker acknowledged a batch; the position is not yet confirmed.
pub const AFTER_ACK_BEFORE_CONFIRM: &str = "after-ack-before-confirm";
/// A position was confirmed and reported to Postgres.
pub const AFTER_CONFIRM: &str = "after-confirm";
/// Events of a transaction were acknowledged; its Commit is not read yet.
pub const MID_TRANSACTION: &str = "mid-transaction";
/// A replication session ended; the next one is not started.
pub const DURING_RECONNECT: &str = "during-reconnect";
/// `setup --backfill-where` wrote a batch of rows; not committed yet.
pub const BACKFILL_BATCH: &str = "backfill-batch";
/// The backfill is committed; its slot is not made yet.
pub const BACKFILL_COMMITTED: &str = "backfill-committed";
/// `replay` wrote a batch of rows; not committed yet.
pub const REPLAY_BATCH: &str = "replay-batch";
/// The replay is committed.
pub const REPLAY_COMMITTED: &str = "replay-committed";

/// Every failpoint, as the table above lists them.
pub const ALL: [&str; 8] = [
    AFTER_ACK_BEFORE_CONFIRM,
    AFTER_CONFIRM,
    MID_TRANSACTION,
    DURING_RECONNECT,
    BACKFILL_BATCH,
    BACKFILL_COMMITTED,
    REPLAY_BATCH,
    REPLAY_COMMITTED,
];

/// Why `OUTBOXD_FAILPOINT` cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailpointError {
    /// The variable is set, and this build has no failpoints.
    #[error("{ENV} is set but this build has no failpoints (cargo feature `failpoints`)")]
    NotCompiled,
    /// The variable names no failpoint.
    #[error("{ENV}={spec:?} names no failpoint; the failpoints are: {}", ALL.join(", "))]
    UnknownName {
        /// The variable's value.
        spec: String,
    },
    /// The count after `@` is not a positive number.
    #[error("{ENV}={spec:?}: the count after '@' must be a number from 1")]
    BadCount {
        /// The variable's value.
        spec: String,
    },
}

/// Checks `OUTBOXD_FAILPOINT` once at startup (an empty value counts as unset): whether this
/// build can honour it, and whether it names a failpoint.
pub fn check_env() -> Result<(), FailpointError> {
    match std::env::var(ENV) {
        Ok(spec) if !spec.is_empty() => check(&spec),
        Ok(_) => Ok(()),
        Err(std::env::VarError::NotPresent) => Ok(()),
        Err(std::env::VarError::NotUnicode(raw)) => check(&raw.to_string_lossy()),
    }
}

/// Checks one value of `OUTBOXD_FAILPOINT`.
fn check(spec: &str) -> Result<(), FailpointError> {
    if !cfg!(feature = "failpoints") {
        return Err(FailpointError::NotCompiled);
    }
    parse(spec).map(drop)
}

/// `<name>[@<n>]` into the name and `n`.
fn parse(spec: &str) -> Result<(&'static str, u32), FailpointError> {
    let (name, at) = match spec.split_once('@') {
        Some((name, at)) => match at.parse::<u32>() {
            Ok(n) if n >= 1 => (name, n),
            _ => {
                return Err(FailpointError::BadCount {
                    spec: spec.to_owned(),
                });
            }
        },
        None => (spec, 1),
    };
    match ALL.iter().find(|known| **known == name) {
        Some(known) => Ok((known, at)),
        None => Err(FailpointError::UnknownName {
            spec: spec.to_owned(),
        }),
    }
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The armed failpoint: its name, the pass that aborts, the passes so far.
    pub(super) struct Armed {
        name: &'static str,
        at: u32,
        hits: AtomicU32,
    }

    fn armed() -> Option<&'static Armed> {
        static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                // A value `check_env` refuses arms nothing (and the process does not start).
                let spec = std::env::var(super::ENV).ok()?;
                let (name, at) = super::parse(&spec).ok()?;
                Some(Armed {
                    name,
                    at,
                    hits: AtomicU32::new(0),
                })
            })
            .as_ref()
    }

    pub(super) fn is_armed(name: &str) -> bool {
        armed().is_some_and(|a| a.name == name)
    }

    pub(super) fn hit(name: &str) {
        if let Some(a) = armed()
            && a.name == name
            && a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at
        {
            eprintln!("outboxd: failpoint {name} reached: aborting");
            std::process::abort();
        }
    }
}

/// Whether `name` is the armed failpoint (so that a point may prepare its crash).
#[cfg(feature = "failpoints")]
pub fn is_armed(name: &str) -> bool {
    armed::is_armed(name)
}

/// Whether `name` is the armed failpoint: never, in a build without failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub const fn is_armed(_name: &str) -> bool {
    false
}

/// Aborts the process if `name` is armed and this is its `n`-th pass.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    armed::hit(name);
}

/// Nothing, in a build without failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub const fn hit(_name: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_in_the_module_doc_lists_every_failpoint() {
        let doc = include_str!("failpoint.rs");
        for name in ALL {
            assert!(
                doc.contains(&format!("//! | `{name}` |")),
                "{name} not in the table"
            );
        }
    }

    #[test]
    fn a_spec_names_a_failpoint_and_optionally_its_pass() {
        assert_eq!(parse("after-confirm"), Ok((AFTER_CONFIRM, 1)));
        assert_eq!(
            parse("after-ack-before-confirm@3"),
            Ok((AFTER_ACK_BEFORE_CONFIRM, 3))
        );
        for bad in ["after-confirm@0", "after-confirm@", "after-confirm@x"] {
            assert!(
                matches!(parse(bad), Err(FailpointError::BadCount { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("after-confrim"),
            Err(FailpointError::UnknownName { .. })
        ));
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn a_build_without_failpoints_refuses_any_spec() {
        let err = check("after-confirm").unwrap_err();
        assert_eq!(
            err.to_string(),
            "OUTBOXD_FAILPOINT is set but this build has no failpoints (cargo feature `failpoints`)"
        );
        assert!(!is_armed(AFTER_CONFIRM));
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_build_with_failpoints_refuses_only_unknown_specs() {
        assert_eq!(check("during-reconnect@2"), Ok(()));
        assert!(matches!(
            check("no-such-point"),
            Err(FailpointError::UnknownName { .. })
        ));
    }
}
