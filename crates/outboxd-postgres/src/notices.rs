//! The server's notices and warnings on outboxd's SQL connections, in outboxd's log: at their
//! own level (a WARNING as WARN, a NOTICE or INFO as INFO, DEBUG as DEBUG), with their DETAIL
//! and HINT, and rate-limited (the same code and message at most once a minute, for all
//! connections together) so that a server repeating itself does not flood the log.
//!
//! (The replication connection's client, pgwire-replication, drops the notices it receives:
//! what matters there, a walsender waiting for `synchronized_standby_slots`, outboxd finds on
//! its own through its stall watch.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::error::{DbError, Severity};

/// Least time between two log lines of the same notice.
pub const EVERY: Duration = Duration::from_secs(60);

/// When each notice (code and message) was last logged.
static LAST: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

/// Whether the notice keyed `key` may be logged now (and notes that it was).
fn due(key: String, now: Instant) -> bool {
    let Ok(mut last) = LAST.lock() else {
        return true;
    };
    let map = last.get_or_insert_with(HashMap::new);
    if map.len() > 1000 {
        map.retain(|_, t| now.duration_since(*t) < EVERY);
    }
    match map.get(&key) {
        Some(t) if now.duration_since(*t) < EVERY => false,
        _ => {
            map.insert(key, now);
            true
        }
    }
}

/// Logs `notice`, received on a SQL connection, unless the same one was logged within
/// [`EVERY`].
pub fn log(notice: &DbError) {
    if !due(
        format!("{}:{}", notice.code().code(), notice.message()),
        Instant::now(),
    ) {
        return;
    }
    let (message, code) = (notice.message(), notice.code().code());
    let detail = notice.detail().unwrap_or_default();
    let hint = notice.hint().unwrap_or_default();
    // The parsed severity: the text one is in the server's language.
    match notice.parsed_severity() {
        Some(Severity::Warning) => {
            tracing::warn!(code, detail, hint, "postgres says: {message}")
        }
        Some(Severity::Debug) => tracing::debug!(code, detail, hint, "postgres says: {message}"),
        _ => tracing::info!(code, detail, hint, "postgres says: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_notice_is_logged_once_a_minute() {
        let t0 = Instant::now();
        assert!(due("01000:x".into(), t0));
        assert!(!due("01000:x".into(), t0 + Duration::from_secs(59)));
        assert!(due("01000:y".into(), t0 + Duration::from_secs(59)));
        assert!(due("01000:x".into(), t0 + Duration::from_secs(61)));
    }
}
