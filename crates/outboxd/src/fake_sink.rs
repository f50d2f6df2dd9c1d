//! A broker in memory, for unit tests: a [`Sink`] that answers each call to `send` as the
//! test scripted it (accepted, a transient or permanent error, records rejected or already
//! delivered, or held until the test releases it) and records every batch it was sent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use outboxd_core::{
    Delivery, Event, Headers, Ledger, Lsn, Poison, Position, Record, Sink, SinkError,
};
use tokio::sync::Notify;

/// What the fake broker answers to one call to `send`.
#[derive(Debug)]
pub enum Reply {
    /// Accepts the batch: every record in its topic.
    Accept,
    /// Accepts the batch with these records refused (dead-lettered with the reason) and
    /// these already at the broker.
    Deliver {
        /// Records the broker refused, with the reason.
        rejected: Vec<(usize, Poison)>,
        /// Records already at the broker.
        duplicates: Vec<usize>,
    },
    /// Fails the call; the caller may retry.
    Transient,
    /// Fails the call for good.
    Permanent,
    /// Accepts the batch once the test notifies the handle.
    Hold(Arc<Notify>),
}

/// One call to `send`: when, and the ids of the batch's records in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// When the call was made (tokio time: paused in the tests).
    pub at: tokio::time::Instant,
    /// The records' ids.
    pub ids: Vec<String>,
}

/// The fake broker. Calls beyond the script are accepted.
#[derive(Debug, Default)]
pub struct FakeSink {
    replies: VecDeque<Reply>,
    sent: Arc<Mutex<Vec<Sent>>>,
}

impl FakeSink {
    /// A broker answering the calls to `send` with `replies`, in order.
    pub fn new(replies: impl IntoIterator<Item = Reply>) -> Self {
        FakeSink {
            replies: replies.into_iter().collect(),
            sent: Arc::default(),
        }
    }

    /// What the broker was sent: read it while the sink is in use elsewhere.
    pub fn log(&self) -> SentLog {
        SentLog(self.sent.clone())
    }
}

/// The calls a [`FakeSink`] received.
#[derive(Debug, Clone)]
pub struct SentLog(Arc<Mutex<Vec<Sent>>>);

impl SentLog {
    /// Every call so far.
    pub fn calls(&self) -> Vec<Sent> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The batches sent so far, as ids.
    pub fn batches(&self) -> Vec<Vec<String>> {
        self.calls().into_iter().map(|c| c.ids).collect()
    }
}

impl Sink for FakeSink {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Delivery, SinkError> {
        let ids = batch
            .iter()
            .map(|r| String::from_utf8_lossy(&r.event.id).into_owned())
            .collect();
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Sent {
                at: tokio::time::Instant::now(),
                ids,
            });
        match self.replies.pop_front().unwrap_or(Reply::Accept) {
            Reply::Accept => Ok(Delivery::default()),
            Reply::Deliver {
                rejected,
                duplicates,
            } => {
                let mut ledger = Ledger::new(batch);
                for (i, poison) in rejected {
                    ledger.reject(i, poison);
                }
                duplicates.into_iter().for_each(|i| ledger.duplicate(i));
                Ok(ledger.finish())
            }
            Reply::Transient => Err(SinkError::transient("publishing", "broker unavailable")),
            Reply::Permanent => Err(SinkError::permanent("publishing", "not authorized")),
            Reply::Hold(release) => {
                release.notified().await;
                Ok(Delivery::default())
            }
        }
    }

    async fn ping(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// An event to publish to `topic`, with id `id` and a payload of `payload_bytes` bytes.
pub fn record(id: u32, topic: &str, payload_bytes: usize) -> Record {
    Record::publish(Event {
        id: Bytes::from(id.to_string()),
        topic: topic.to_owned(),
        key: Bytes::new(),
        event_type: Bytes::new(),
        payload: Bytes::from(vec![b'x'; payload_bytes]),
        headers: Headers::empty(),
        position: Position {
            commit_lsn: Lsn::new(1),
            index: id,
        },
        commit_time_micros: 0,
        tombstone: false,
        time_millis: None,
        attributes: Vec::new(),
    })
}

/// Ids as the fake sink logs them.
pub fn ids(range: impl IntoIterator<Item = u32>) -> Vec<String> {
    range.into_iter().map(|i| i.to_string()).collect()
}
