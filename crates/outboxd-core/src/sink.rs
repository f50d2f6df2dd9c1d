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
/// - A dead letter carries the event's payload unless the broker cannot take it (larger
///   than its limit): then the dead letter carries the rest, says so, and the record is
///   reported in [`Delivery::payload_omitted`]; the caller keeps the whole event elsewhere
///   before it counts the record as delivered. No dead letter is too large to write.
/// - Records reach the broker in the order of the batch. Across calls, batches reach it in
///   the order of the calls.
/// - An `Err` says nothing about which records arrived. The caller sends the same batch
///   again (delivery is at-least-once); the event id is the consumers' idempotency key.
/// - A sink that can tell an event is already at the broker (effectively-once delivery: a
///   replay after a crash) does not publish it again and reports it in
///   [`Delivery::duplicates`]. It must be sure: "already delivered" is claimed only on the
///   broker's own evidence, never to get past an error.
/// - Records with `poison` set go to the dead-letter destination, never to their topic.
/// - The [`Delivery`] is built with a [`Ledger`], which keeps its rules.
pub trait Sink: Send {
    /// The broker's name: the `[sink] kind` that selects it, for messages and metrics.
    fn name(&self) -> &'static str;

    /// Publishes `batch` and waits for the broker to accept all of it.
    fn send(
        &mut self,
        batch: &[Record],
    ) -> impl Future<Output = Result<Delivery, SinkError>> + Send;

    /// Checks that the broker answers, for readiness and preflight checks.
    fn ping(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// What happened to a batch the broker accepted, built by a [`Ledger`].
///
/// Its rules: indexes ascending, each at most once, and a record is never both rejected and a
/// duplicate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    rejected: Vec<(usize, Poison)>,
    duplicates: Vec<usize>,
    payload_omitted: Vec<usize>,
}

impl Delivery {
    /// Records the broker refused and that were written to the dead-letter destination
    /// instead: their index in the batch and the reason, ascending.
    pub fn rejected(&self) -> &[(usize, Poison)] {
        &self.rejected
    }

    /// Records whose dead letter was written without the payload, which the broker could not
    /// take: their index, ascending. The caller keeps these events whole elsewhere.
    pub fn payload_omitted(&self) -> &[usize] {
        &self.payload_omitted
    }

    /// Records that were already at the broker (in their topic or the dead-letter
    /// destination) from an earlier attempt, and were not written again: their index in the
    /// batch, ascending. Never also in [`rejected`](Delivery::rejected).
    pub fn duplicates(&self) -> &[usize] {
        &self.duplicates
    }
}

/// What became of one record of a batch, as far as the sink knows.
#[derive(Debug, Clone)]
enum Fate {
    /// Sent to where it belongs: its topic, or the dead-letter destination when it came
    /// poisoned.
    Sent,
    /// Refused by the broker; goes to the dead-letter destination with this reason.
    Rejected(Poison),
    /// Already at the broker from an earlier attempt.
    Duplicate,
}

/// The builder of a batch's [`Delivery`]: one entry per record, so that the rules hold by
/// construction and every sink reads "where does record `i` go" the same way.
///
/// A record starts as sent. [`reject`](Ledger::reject) sends it to the dead-letter
/// destination; [`duplicate`](Ledger::duplicate) marks it as already delivered, which wins
/// over a rejection (its dead-letter entry was the one already there).
#[derive(Debug)]
pub struct Ledger<'a> {
    batch: &'a [Record],
    fates: Vec<Fate>,
    /// Per record: its dead letter was written without the payload.
    omitted: Vec<bool>,
}

impl<'a> Ledger<'a> {
    /// A ledger for `batch`: every record sent.
    pub fn new(batch: &'a [Record]) -> Self {
        Ledger {
            batch,
            fates: vec![Fate::Sent; batch.len()],
            omitted: vec![false; batch.len()],
        }
    }

    /// The batch.
    pub fn batch(&self) -> &'a [Record] {
        self.batch
    }

    fn at(&mut self, i: usize) -> &mut Fate {
        let len = self.fates.len();
        match self.fates.get_mut(i) {
            Some(fate) => fate,
            None => panic!("record {i} is not in the batch of {len}: a sink bug"),
        }
    }

    /// The broker refused record `i`: it goes to the dead-letter destination with `poison`.
    /// A record already known as a duplicate stays one.
    pub fn reject(&mut self, i: usize, poison: Poison) {
        let fate = self.at(i);
        if !matches!(fate, Fate::Duplicate) {
            *fate = Fate::Rejected(poison);
        }
    }

    /// Record `i`'s dead letter is written without its payload (the broker cannot take it);
    /// reported in [`Delivery::payload_omitted`] unless the record turns out a duplicate.
    pub fn omit_payload(&mut self, i: usize) {
        self.at(i);
        self.omitted[i] = true;
    }

    /// Whether record `i`'s dead letter goes without its payload.
    pub fn is_payload_omitted(&self, i: usize) -> bool {
        self.omitted[i]
    }

    /// Record `i` was already at the broker.
    pub fn duplicate(&mut self, i: usize) {
        *self.at(i) = Fate::Duplicate;
    }

    /// The broker's refusal of record `i`, if it refused it.
    pub fn rejection(&self, i: usize) -> Option<&Poison> {
        match &self.fates[i] {
            Fate::Rejected(p) => Some(p),
            _ => None,
        }
    }

    /// Why record `i` goes to the dead-letter destination, if it does: the broker's refusal,
    /// or its own poison (it could not be routed).
    pub fn poison(&self, i: usize) -> Option<&Poison> {
        self.rejection(i).or(self.batch[i].poison.as_ref())
    }

    /// Whether record `i` is known to be at the broker already.
    pub fn is_duplicate(&self, i: usize) -> bool {
        matches!(self.fates[i], Fate::Duplicate)
    }

    /// The records the broker refused, ascending, with the reason.
    pub fn rejections(&self) -> impl Iterator<Item = (usize, &Poison)> {
        self.fates.iter().enumerate().filter_map(|(i, f)| match f {
            Fate::Rejected(p) => Some((i, p)),
            _ => None,
        })
    }

    /// Whether any record goes to the dead-letter destination.
    pub fn any_dead_letter(&self) -> bool {
        (0..self.fates.len()).any(|i| self.poison(i).is_some() && !self.is_duplicate(i))
    }

    /// The delivery, in the order of the batch.
    pub fn finish(self) -> Delivery {
        let mut delivery = Delivery::default();
        for (i, fate) in self.fates.into_iter().enumerate() {
            let dead_letter = match fate {
                Fate::Sent => self.batch[i].poison.is_some(),
                Fate::Rejected(p) => {
                    delivery.rejected.push((i, p));
                    true
                }
                Fate::Duplicate => {
                    delivery.duplicates.push(i);
                    false
                }
            };
            if dead_letter && self.omitted[i] {
                delivery.payload_omitted.push(i);
            }
        }
        delivery
    }
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
    /// The broker refuses the stream rather than one event: an authorization (ACL) that does
    /// not cover the topic, a topic or stream that does not exist. Retried after a pause, as a
    /// transient error, and never dead-lettered (one ACL slip would otherwise empty the stream
    /// into the dead-letter destination); reported loudly, since it lasts until someone fixes
    /// the broker.
    #[error("{what}: {source}")]
    Refused {
        /// What was being done, and what to fix.
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

    /// The broker refusing the stream while doing `what` (see [`SinkError::Refused`]).
    pub fn refused(what: &'static str, source: impl Into<BoxError>) -> Self {
        SinkError::Refused {
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

    /// Whether retrying the same batch may succeed (a transient failure, or a refusal that
    /// someone may fix).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SinkError::Transient { .. } | SinkError::Refused { .. }
        )
    }

    /// Whether the broker refuses the stream ([`SinkError::Refused`]).
    pub fn is_refusal(&self) -> bool {
        matches!(self, SinkError::Refused { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Headers, PoisonKind, Position};
    use crate::lsn::Lsn;

    fn batch(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| {
                Record::publish(Event {
                    id: format!("e{i}").into(),
                    topic: "t".into(),
                    key: "k".into(),
                    event_type: "x".into(),
                    payload: "{}".into(),
                    headers: Headers::empty(),
                    position: Position {
                        commit_lsn: Lsn::new(100),
                        index: u32::try_from(i).unwrap_or(u32::MAX),
                    },
                    commit_time_micros: 0,
                    tombstone: false,
                    time_millis: None,
                    attributes: Vec::new(),
                })
            })
            .collect()
    }

    fn refused(why: &str) -> Poison {
        Poison::new(PoisonKind::Rejected, why)
    }

    #[test]
    fn a_delivery_is_ascending_and_a_duplicate_is_never_rejected() {
        let records = batch(5);
        let mut ledger = Ledger::new(&records);
        ledger.reject(3, refused("three"));
        ledger.reject(1, refused("one"));
        ledger.duplicate(4);
        ledger.reject(4, refused("four, after it was found at the broker"));
        ledger.reject(0, refused("zero"));
        ledger.duplicate(0);
        let delivery = ledger.finish();
        let rejected: Vec<usize> = delivery.rejected().iter().map(|(i, _)| *i).collect();
        assert_eq!(rejected, [1, 3]);
        assert_eq!(delivery.duplicates(), [0, 4]);
        assert_eq!(delivery.rejected()[0].1.detail, "one");
    }

    #[test]
    fn a_record_goes_to_the_dead_letter_for_its_own_poison_or_the_brokers_refusal() {
        let mut records = batch(3);
        records[2] = Record::dead_letter(
            records[2].event.clone(),
            Poison::new(PoisonKind::EmptyField, "key"),
        );
        assert!(!Ledger::new(&records[..2]).any_dead_letter());
        let mut ledger = Ledger::new(&records);
        assert!(ledger.any_dead_letter(), "record 2 came poisoned");
        ledger.reject(0, refused("no"));
        assert_eq!(ledger.poison(0).map(|p| p.kind), Some(PoisonKind::Rejected));
        assert!(ledger.poison(1).is_none());
        assert_eq!(
            ledger.poison(2).map(|p| p.kind),
            Some(PoisonKind::EmptyField)
        );
        assert!(
            ledger.rejection(2).is_none(),
            "its own poison is not a refusal"
        );
        assert!(ledger.any_dead_letter());
        assert_eq!(ledger.rejections().count(), 1);
    }

    #[test]
    fn an_omitted_payload_is_reported_only_for_a_dead_letter_written_now() {
        let mut records = batch(4);
        records[3] = Record::dead_letter(
            records[3].event.clone(),
            Poison::new(PoisonKind::TooLarge, "big"),
        );
        let mut ledger = Ledger::new(&records);
        ledger.reject(0, refused("too large"));
        ledger.omit_payload(0);
        ledger.omit_payload(1); // sent to its topic: no dead letter
        ledger.reject(2, refused("too large"));
        ledger.omit_payload(2);
        ledger.duplicate(2); // its dead letter was already there
        ledger.omit_payload(3);
        assert_eq!(ledger.finish().payload_omitted(), [0, 3]);
    }

    #[test]
    #[should_panic(expected = "not in the batch")]
    fn an_index_outside_the_batch_is_a_bug() {
        let records = batch(2);
        Ledger::new(&records).reject(2, refused("x"));
    }
}
