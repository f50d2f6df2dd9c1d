//! Crash windows on purpose, for tests: `OUTBOXD_FAILPOINT=<name>[@<n>]` makes the process
//! abort (like `kill -9`: no cleanup, no final confirm) the `n`-th time (default the first)
//! execution passes the named point. Unset, each point costs one relaxed atomic load.
//!
//! | name | where |
//! |---|---|
//! | `after-ack-before-confirm` | the broker acknowledged a batch; the position is not yet confirmed |
//! | `after-confirm` | a position was confirmed and reported to Postgres |
//! | `mid-transaction` | events of a transaction were acknowledged; its Commit is not read yet |
//! | `during-reconnect` | a replication session ended; the next one is not started |
//! | `backfill-batch` | `setup --backfill-where` wrote a batch of rows; not committed yet |
//! | `backfill-committed` | the backfill is committed; its slot is not made yet |
//! | `replay-batch` | `replay` wrote a batch of rows; not committed yet |
//! | `replay-committed` | the replay is committed |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that arms a failpoint.
pub const ENV: &str = "OUTBOXD_FAILPOINT";

struct Armed {
    name: String,
    at: u32,
    hits: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (name, at) = match spec.split_once('@') {
                Some((n, at)) => (n.to_owned(), at.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                at,
                hits: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Whether `name` is the armed failpoint (so that a point may prepare its crash).
pub fn is_armed(name: &str) -> bool {
    armed().is_some_and(|a| a.name == name)
}

/// Aborts the process if `name` is armed and this is its `n`-th pass.
pub fn hit(name: &str) {
    if let Some(a) = armed()
        && a.name == name
        && a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at
    {
        eprintln!("outboxd: failpoint {name} reached: aborting");
        std::process::abort();
    }
}
