//! A server that cannot shut down until outboxd confirms what it was sent.
//!
//! When Postgres stops (`pg_ctl stop -m fast`, a restart, a managed maintenance window), each
//! walsender first sends the rest of the WAL, then asks its client for its position again and
//! again, and exits only once the client has confirmed everything it was sent. outboxd
//! confirms only what the broker acknowledged (guarantee 2), so while the broker is down or
//! stuck the walsender never exits and the shutdown hangs until `pg_ctl` gives up. Meanwhile
//! each request is answered at once, so the two ping-pong keepalives as fast as the
//! connection allows.
//!
//! [`ShutdownWait`] recognises that state from the replication client's counters, sampled
//! every [`SAMPLE_EVERY`]: keepalive replies arriving faster than any live session asks for
//! them (a live walsender asks at most every `wal_sender_timeout / 2`), at the same WAL end,
//! with the confirmed position not at it and not moving. Once that has lasted [`PATIENCE`]
//! the session ends ([`StreamError::ServerStopping`], transient): closing the connection
//! lets the walsender exit and the server stop. Nothing is confirmed on the way out, so the
//! next session, once Postgres is back, resumes from the slot and sends again what the broker
//! had not acknowledged. While the broker acknowledges (the confirmed position moves), outboxd
//! keeps the session and the server keeps waiting: that shutdown ends when the last event is
//! confirmed.

use std::time::Duration;

use outboxd_core::Lsn;
use tokio::time::Instant;

use super::StreamError;

/// How often the client's counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// How long a server may wait on outboxd, with no progress, before the session is ended.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Keepalive replies per sample that only a server waiting to stop asks for (40 a second).
const REPLIES_PER_SAMPLE: u64 = 10;

/// What the replication client reports, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Replies sent to keepalives that asked for one, since the session began.
    pub keepalive_replies: u64,
    /// The newest WAL end the server announced.
    pub wal_end: Lsn,
    /// The newest position reported to the server.
    pub confirmed: Lsn,
}

/// Tells a server waiting to stop from a live one (see the module docs).
#[derive(Debug, Default)]
pub struct ShutdownWait {
    last: Option<Sample>,
    /// Since when the server has been waiting with no progress (`None` while it is not).
    waiting_since: Option<Instant>,
}

impl ShutdownWait {
    /// Takes the sample read at `now`; returns the error that ends the session once the server
    /// has waited [`PATIENCE`] with nothing newer confirmed.
    pub fn observe(&mut self, sample: Sample, now: Instant) -> Option<StreamError> {
        let waiting = self.last.is_some_and(|last| {
            sample
                .keepalive_replies
                .saturating_sub(last.keepalive_replies)
                >= REPLIES_PER_SAMPLE
                && sample.wal_end == last.wal_end
                && sample.confirmed == last.confirmed
                && sample.confirmed != sample.wal_end
        });
        self.last = Some(sample);
        if !waiting {
            self.waiting_since = None;
            return None;
        }
        let since = *self.waiting_since.get_or_insert(now);
        (now.duration_since(since) >= PATIENCE).then(|| StreamError::ServerStopping {
            wal_end: sample.wal_end,
            confirmed: sample.confirmed,
            waited: now.duration_since(since),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(replies: u64, wal_end: u64, confirmed: u64) -> Sample {
        Sample {
            keepalive_replies: replies,
            wal_end: Lsn::new(wal_end),
            confirmed: Lsn::new(confirmed),
        }
    }

    /// Feeds one sample per [`SAMPLE_EVERY`]; returns after how many samples it tripped.
    fn trips_after(samples: impl IntoIterator<Item = Sample>) -> Option<usize> {
        let mut wait = ShutdownWait::default();
        let start = Instant::now();
        samples.into_iter().enumerate().find_map(|(i, s)| {
            let now = start + SAMPLE_EVERY * u32::try_from(i).unwrap();
            wait.observe(s, now).map(|_| i)
        })
    }

    #[test]
    fn a_server_asking_again_and_again_with_nothing_confirmed_ends_the_session_after_the_patience()
    {
        let at = trips_after((0..100).map(|i| sample(i * 50, 1000, 400)))
            .expect("a waiting server is recognised");
        // The first sample has nothing to compare with; the wait starts at the second.
        let waited = SAMPLE_EVERY * u32::try_from(at - 1).unwrap();
        assert_eq!(waited, PATIENCE);
    }

    #[test]
    fn progress_keeps_the_session_for_as_long_as_it_lasts() {
        // The broker acknowledges: the confirmed position moves, if slowly.
        assert_eq!(
            trips_after((0..400).map(|i| sample(i * 50, 1000, 400 + i))),
            None
        );
        // Stalling for less than the patience, then moving again, starts the count over.
        let stalls = (0..400).map(|i| sample(i * 50, 1000, 400 + i / 30));
        assert_eq!(trips_after(stalls), None);
    }

    #[test]
    fn a_live_stream_is_never_taken_for_a_stopping_server() {
        // Replies at a live walsender's pace (one every few seconds).
        assert_eq!(
            trips_after((0..400).map(|i| sample(i / 20, 1000, 400))),
            None
        );
        // Everything confirmed: the server has nothing to wait for.
        assert_eq!(
            trips_after((0..400).map(|i| sample(i * 50, 1000, 1000))),
            None
        );
        // New WAL keeps coming: a busy server, not a stopping one.
        assert_eq!(
            trips_after((0..400).map(|i| sample(i * 50, 1000 + i, 400))),
            None
        );
    }
}
