//! The contract between outboxd and a message broker.

use std::future::Future;

use crate::event::{Poison, Record};

/// A boxed error from a broker client, kept as the source of a [`SinkError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A message broker that events are published to.
///
/// The contract every implementation keeps:
///
/// - [`send`](Sink::send) resolves `Ok` only after the broker has accepted every record of
///   the batch: each one is either in its topic, or (when the broker refused that record
///   alone) in the dead-letter destination with the reason, reported in [`Delivery`].
///   "Accepted" means what the broker can promise: a Kafka delivery report with `acks=all`,
///   a Redis reply (and `WAIT` when replicas are configured).
/// - Records reach the broker in the order of the batch. Across calls, batches reach it in
///   the order of the calls.
/// - An `Err` says nothing about which records arrived. The caller sends the same batch
///   again (delivery is at-least-once); the event id is the consumers' idempotency key.
/// - A sink that can tell an event is already at the broker (effectively-once delivery: a
///   replay after a crash) does not publish it again and reports it in
///   [`Delivery::duplicates`]. It must be sure: "already delivered" is claimed only on the
///   broker's own evidence, never to get past an error.
/// - Records with `poison` set go to the dead-letter destination, never to their topic.
pub trait Sink: Send {
    /// Publishes `batch` and waits for the broker to accept all of it.
    fn send(
        &mut self,
        batch: &[Record],
    ) -> impl Future<Output = Result<Delivery, SinkError>> + Send;

    /// Checks that the broker answers, for readiness and preflight checks.
    fn ping(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// What happened to a batch the broker accepted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Records the broker refused and that were written to the dead-letter destination
    /// instead: their index in the batch and the reason.
    pub rejected: Vec<(usize, Poison)>,
    /// Records that were already at the broker (in their topic or the dead-letter
    /// destination) from an earlier attempt, and were not written again: their index in the
    /// batch, ascending. Never also in `rejected`.
    pub duplicates: Vec<usize>,
}

/// A failure to publish a batch, split by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The broker is unreachable, busy or failing over: retry the same batch after a pause.
    #[error("{what}: {source}")]
    Transient {
        /// What was being done.
        what: &'static str,
        /// The broker client's error.
        #[source]
        source: BoxError,
    },
    /// Retrying cannot help (bad credentials, a dead-letter destination that refuses
    /// entries): stop with a clear message.
    #[error("{what}: {source}")]
    Permanent {
        /// What was being done, and what to check.
        what: &'static str,
        /// The broker client's error.
        #[source]
        source: BoxError,
    },
}

impl SinkError {
    /// A transient failure while doing `what`.
    pub fn transient(what: &'static str, source: impl Into<BoxError>) -> Self {
        SinkError::Transient {
            what,
            source: source.into(),
        }
    }

    /// A permanent failure while doing `what`.
    pub fn permanent(what: &'static str, source: impl Into<BoxError>) -> Self {
        SinkError::Permanent {
            what,
            source: source.into(),
        }
    }

    /// Whether retrying the same batch may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient { .. })
    }
}
