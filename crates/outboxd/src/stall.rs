//! Progress you can trust: noticing that a session is connected but not advancing, and saying
//! why.
//!
//! "Streaming" says only that a replication session is open. After a promotion, a new primary
//! that inherited `synchronized_standby_slots` naming a slot it lacks accepts the session and
//! then sends nothing; a broker that refuses or does not acknowledge holds everything in
//! flight. Either way the slot's WAL waits on the server and nothing moves.
//!
//! The retention watch reads the slot every few seconds and gives each reading to a
//! [`Watch`]. The session is *stuck* while WAL waits beyond the slot's confirmed position
//! (`lag > 0`) and neither that position nor the count of events the broker took moves
//! (keepalives move the position of an idle session within seconds, since outboxd's sessions
//! run with a short `wal_sender_timeout`), nor the walsender's read position (`sent_lsn`,
//! which moves while it decodes a long backlog or a large transaction). Stuck for [`NAMED_AFTER`], the watch looks for a
//! cause, in order: the broker refusing the events, events in flight the broker does not
//! acknowledge, then what holds decoding back on the server
//! ([`outboxd_postgres::holdups`]: `synchronized_standby_slots` for a failover slot, the
//! walsender's wait). With a cause it is *stalled*; stuck for [`STALLED_AFTER`] it is stalled
//! whatever it found, with an old open transaction named as a possible cause (an old
//! transaction alone holds back retained WAL, not sending). While stalled: a WARN line at once and then every [`WARN_EVERY`],
//! `outboxd_stalled` 1, and `/readyz` 503 with the cause. Once it moves again: one INFO line.

use std::time::{Duration, Instant};

use outboxd_core::Lsn;
use outboxd_postgres::holdups;
use tokio_postgres::Client;

use crate::metrics::Metrics;
use crate::status::Status;

/// Stuck this long, the watch looks for a cause (and, with one, reports the stall).
pub const NAMED_AFTER: Duration = Duration::from_secs(10);
/// Stuck this long, the session is reported stalled even with no cause found.
pub const STALLED_AFTER: Duration = Duration::from_secs(60);
/// Least time between two WARN lines about one stall.
pub const WARN_EVERY: Duration = Duration::from_secs(60);
/// Least time between two searches for a cause.
const LOOK_EVERY: Duration = Duration::from_secs(10);
/// An open transaction older than this is named as a possible cause.
const OLD_TRANSACTION_SECS: i64 = 60;

/// One reading of the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The slot's `confirmed_flush_lsn`.
    pub confirmed: Lsn,
    /// The server's current WAL position.
    pub wal: Lsn,
    /// Events the broker took since start (forwarded or dead-lettered).
    pub handled: u64,
    /// How far the slot's walsender has read the WAL (`sent_lsn`): it moves while a long
    /// catch-up or a large transaction is decoded, before anything reaches outboxd.
    pub sent: Option<Lsn>,
}

/// Since when nothing moved, and the reading then.
#[derive(Debug, Clone, Copy)]
struct Stuck {
    since: Instant,
    at: Reading,
}

/// How long the session has not advanced: the pure part of the [`Watch`].
#[derive(Debug, Default)]
pub struct Tracker {
    stuck: Option<Stuck>,
}

impl Tracker {
    /// Takes a reading at `now`; returns how long the session has been stuck (`None`: it
    /// advanced since the last reading, or no WAL waits).
    pub fn observe(&mut self, r: Reading, now: Instant) -> Option<Duration> {
        if r.wal <= r.confirmed {
            self.stuck = None;
            return None;
        }
        match self.stuck {
            Some(s)
                if s.at.confirmed == r.confirmed
                    && s.at.handled == r.handled
                    && s.at.sent == r.sent =>
            {
                Some(now.saturating_duration_since(s.since))
            }
            _ => {
                self.stuck = Some(Stuck { since: now, at: r });
                None
            }
        }
    }
}

/// The stall state of one session: the tracker, the cause found, what was said.
#[derive(Debug, Default)]
pub struct Watch {
    tracker: Tracker,
    /// The cause found by the last search, and when it ran.
    cause: Option<Cause>,
    last_look: Option<Instant>,
    /// Reported stalled since (and when the last WARN line was).
    stalled: Option<(Instant, Instant)>,
}

impl Watch {
    /// Takes a reading of the slot; searches for a cause on `client` when stuck long enough,
    /// and reports a stall or its end through the log, `metrics` and `status`.
    pub async fn observe(
        &mut self,
        client: &Client,
        slot: &str,
        r: Reading,
        metrics: &Metrics,
        status: &Status,
    ) {
        let now = Instant::now();
        let Some(stuck) = self.tracker.observe(r, now) else {
            self.advancing(metrics, status);
            return;
        };
        if stuck < NAMED_AFTER {
            return;
        }
        if self.last_look.is_none_or(|t| t.elapsed() >= LOOK_EVERY) {
            self.last_look = Some(now);
            self.cause = cause(client, slot, metrics, status).await;
        }
        let why = match &self.cause {
            Some(Cause::Definite(c)) => c.clone(),
            Some(Cause::Hint(h)) if stuck >= STALLED_AFTER => format!(
                "{} bytes of WAL wait beyond the confirmed position {} and the server sends \
                 nothing; possibly: {h}",
                r.confirmed.bytes_until(r.wal),
                r.confirmed
            ),
            None if stuck >= STALLED_AFTER => format!(
                "{} bytes of WAL wait beyond the confirmed position {} and the server sends \
                 nothing; no cause found (see outboxd slot status, and the walsender in \
                 pg_stat_replication)",
                r.confirmed.bytes_until(r.wal),
                r.confirmed
            ),
            _ => {
                // A cause found before is gone, and it is not stalled long enough to report
                // without one.
                self.clear(metrics, status);
                return;
            }
        };
        status.set_stall(Some(why.clone()));
        metrics.stalled.set(1);
        let warn = match self.stalled {
            None => {
                self.stalled = Some((now, now));
                true
            }
            Some((since, last)) if last.elapsed() >= WARN_EVERY => {
                self.stalled = Some((since, now));
                true
            }
            Some(_) => false,
        };
        if warn {
            tracing::warn!(
                slot,
                stuck_s = stuck.as_secs(),
                confirmed_lsn = %r.confirmed,
                waiting_bytes = r.confirmed.bytes_until(r.wal),
                "connected but not advancing: {why}"
            );
        }
    }

    /// Progress: a stall reported before is over.
    fn advancing(&mut self, metrics: &Metrics, status: &Status) {
        self.cause = None;
        self.last_look = None;
        self.clear(metrics, status);
    }

    /// Whatever was reported is over.
    fn clear(&mut self, metrics: &Metrics, status: &Status) {
        if let Some((since, _)) = self.stalled.take() {
            status.set_stall(None);
            metrics.stalled.set(0);
            tracing::info!(stalled_s = since.elapsed().as_secs(), "advancing again");
        }
    }

    /// The session ended: whatever it reported is over (the next one starts afresh).
    pub fn end(&mut self, metrics: &Metrics, status: &Status) {
        if self.stalled.take().is_some() {
            status.set_stall(None);
            metrics.stalled.set(0);
        }
    }
}

/// What a search found.
#[derive(Debug, Clone)]
enum Cause {
    /// It holds the session back: reported once stuck for [`NAMED_AFTER`].
    Definite(String),
    /// It may: named once stuck for [`STALLED_AFTER`].
    Hint(String),
}

/// Why a stuck session does not advance, if something says.
async fn cause(client: &Client, slot: &str, metrics: &Metrics, status: &Status) -> Option<Cause> {
    if let Some(why) = status.refusal() {
        return Some(Cause::Definite(format!(
            "the broker refuses the events: {why}"
        )));
    }
    let in_flight = metrics.inflight_events.get();
    if in_flight > 0 {
        return Some(Cause::Definite(format!(
            "the broker has not acknowledged the {in_flight} events in flight (down, or too slow)"
        )));
    }
    let found = match holdups::find(client, slot, OLD_TRANSACTION_SECS).await {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(error = %e, "cannot look for what holds decoding back");
            return None;
        }
    };
    let text = |hs: Vec<&holdups::HoldUp>| {
        hs.iter()
            .map(|h| h.describe())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (hints, definite): (Vec<_>, Vec<_>) = found
        .iter()
        .partition(|h| matches!(h, holdups::HoldUp::OldTransaction { .. }));
    if !definite.is_empty() {
        Some(Cause::Definite(text(definite)))
    } else if !hints.is_empty() {
        Some(Cause::Hint(text(hints)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(confirmed: u64, wal: u64, handled: u64) -> Reading {
        Reading {
            confirmed: Lsn::new(confirmed),
            wal: Lsn::new(wal),
            handled,
            sent: None,
        }
    }

    #[test]
    fn stuck_only_while_wal_waits_and_nothing_moves() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut t = Tracker::default();
        // Caught up: never stuck.
        assert_eq!(t.observe(reading(100, 100, 0), s(0)), None);
        assert_eq!(t.observe(reading(100, 100, 0), s(30)), None);
        // WAL waits; nothing moves from here on.
        assert_eq!(t.observe(reading(100, 200, 0), s(31)), None);
        assert_eq!(
            t.observe(reading(100, 300, 0), s(45)),
            Some(Duration::from_secs(14))
        );
        // The broker took events: progress, counted afresh.
        assert_eq!(t.observe(reading(100, 300, 5), s(46)), None);
        assert_eq!(
            t.observe(reading(100, 300, 5), s(50)),
            Some(Duration::from_secs(4))
        );
        // The slot confirmed more: progress.
        assert_eq!(t.observe(reading(150, 300, 5), s(51)), None);
        // The walsender reads on (a large transaction being decoded): progress.
        let reading_on = Reading {
            sent: Some(Lsn::new(250)),
            ..reading(150, 300, 5)
        };
        assert_eq!(t.observe(reading(150, 300, 5), s(51)), Some(Duration::ZERO));
        assert_eq!(t.observe(reading_on, s(52)), None);
        // Caught up again.
        assert_eq!(t.observe(reading(300, 300, 5), s(52)), None);
        assert_eq!(t.observe(reading(300, 310, 5), s(53)), None);
        assert_eq!(
            t.observe(reading(300, 310, 5), s(60)),
            Some(Duration::from_secs(7))
        );
    }
}
