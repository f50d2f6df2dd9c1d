//! What an error from librdkafka or the broker means, and what the sink does about it.
//!
//! Each error code has one class ([`ErrorClass`], see [`classify`]):
//!
//! | class | codes (examples) | what happens |
//! |---|---|---|
//! | too large | `MSG_SIZE_TOO_LARGE`, `RECORD_LIST_TOO_LARGE` | the record goes to the dead-letter topic (`too_large`), the rest of the batch goes on |
//! | rejected | `INVALID_TOPIC_EXCEPTION` (a name Kafka cannot take), `INVALID_RECORD`, `POLICY_VIOLATION` | the record goes to the dead-letter topic (`rejected`) |
//! | refused | `TOPIC_AUTHORIZATION_FAILED`, `CLUSTER_AUTHORIZATION_FAILED`, `TRANSACTIONAL_ID_AUTHORIZATION_FAILED`, unknown topic or partition | the stream stops: the batch is retried with backoff, loudly, never dead-lettered (an ACL slip or a deleted topic would otherwise send every event to the dead-letter topic) |
//! | credentials | SASL authentication | permanent: outboxd stops with a message |
//! | fatal | librdkafka's fatal producer errors (idempotence state lost) | the producer is recreated and the batch retried |
//! | transient | everything else: transport, leader change, timeouts, purges | the batch is retried whole |
//!
//! A code not listed is transient: retried, never dropped. A dead-letter message that Kafka
//! refuses is a permanent error ([`dead_letter_refused`]): nothing is dropped.
//!
//! Errors that come outside delivery reports (a refused connection, a failed authentication)
//! reach the client's [`Context`], which logs them at debug level and keeps the last one
//! ([`LastError`]), so that a batch that times out, or a ping, can say why.

use std::sync::{Arc, Mutex};

use outboxd_core::SinkError;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What to do about an error code from librdkafka or the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The message is larger than the broker or the producer accepts: dead-letter it.
    TooLarge,
    /// The broker refuses this message (what it holds): dead-letter it.
    Rejected,
    /// The broker refuses the stream: an authorization (ACL), a topic that does not exist.
    /// Retry until someone fixes it; never dead-letter.
    Refused,
    /// The credentials or the permissions of the client are wrong: stop.
    Credentials,
    /// The producer is in a state it cannot leave: recreate it, retry the batch.
    Fatal,
    /// Anything that may pass: retry the batch.
    Transient,
}

/// Classifies an error code of a delivery report, an enqueue or the client.
pub fn classify(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge | C::MessageBatchTooLarge => ErrorClass::TooLarge,
        C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::UnknownPartition => ErrorClass::Refused,
        C::InvalidTopic
        | C::InvalidRecord
        | C::PolicyViolation
        | C::InvalidTimestamp
        | C::InvalidMessageSize
        | C::UnsupportedForMessageFormat
        | C::BadMessage => ErrorClass::Rejected,
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::InvalidRequiredAcks => ErrorClass::Credentials,
        C::Fatal
        | C::OutOfOrderSequenceNumber
        | C::UnknownProducerId
        | C::InvalidProducerEpoch
        | C::ProducerFenced
        | C::Fenced
        | C::InvalidProducerIdMapping => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// The last error librdkafka reported outside delivery reports (connection failures,
/// authentication), shown when a batch times out.
///
/// A refused authentication is kept until it is taken, over the errors that follow it: the
/// broker closes the connection after a failed SASL handshake, and librdkafka then reports a
/// transport failure on every reconnect, which would hide the reason (a wrong password would
/// read as an unreachable broker).
#[derive(Clone, Default)]
pub(super) struct LastError(Arc<Mutex<Option<(RDKafkaErrorCode, String)>>>);

impl LastError {
    fn set(&self, code: RDKafkaErrorCode, text: String) {
        if let Ok(mut last) = self.0.lock() {
            let keep = last
                .as_ref()
                .is_some_and(|(kept, _)| classify(*kept) == ErrorClass::Credentials)
                && classify(code) != ErrorClass::Credentials;
            if !keep {
                *last = Some((code, text));
            }
        }
    }

    pub(super) fn take(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.0.lock().ok().and_then(|mut last| last.take())
    }
}

/// Routes librdkafka's logs and client errors to `tracing`, and remembers the last error.
#[derive(Clone, Default)]
pub(super) struct Context {
    pub(super) last_error: LastError,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(facility, "librdkafka: {message}");
            }
            // Connection failures are logged at error level on every attempt; the sink
            // reports an outage once, through its errors.
            _ => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        tracing::debug!(%error, reason, "kafka client error");
        self.last_error.set(code, reason.to_owned());
    }
}

/// The offsets topic's consumer reports through the same context: its end-of-partition
/// "error" (`enable.partition.eof`, how the reader knows it read everything) is normal, and
/// librdkafka's default context would log it at ERROR at every start.
impl ConsumerContext for Context {}

/// An error of the client (metadata, Admin, the offsets topic's consumer): permanent when it
/// is about the credentials, a refusal when it is an authorization, transient otherwise.
pub(super) fn client_error(what: &'static str, e: KafkaError) -> SinkError {
    match e.rdkafka_error_code().map(classify) {
        Some(ErrorClass::Credentials) => SinkError::permanent(what, e),
        Some(ErrorClass::Refused) => refused(e),
        _ => SinkError::transient(what, e),
    }
}

/// Kafka refuses the stream (`err`): an ACL, or a topic that does not exist.
pub(super) fn refused(err: impl Into<outboxd_core::sink::BoxError>) -> SinkError {
    SinkError::refused(
        "Kafka refuses the events: the user may not write the topic (an ACL: grant Write and \
         Describe on it, and on the dead-letter and offsets topics), or the topic does not \
         exist (create it, or set sink.kafka.create_topics). Nothing is dead-lettered meanwhile",
        err,
    )
}

/// The dead-letter topic refused a message: permanent, since the event would otherwise be
/// lost — unless the failure itself was transient (`judged` is that error).
pub(super) fn dead_letter_refused(
    topic: &str,
    err: &KafkaError,
    judged: Option<SinkError>,
) -> SinkError {
    match judged {
        Some(e) if e.is_transient() => e,
        Some(SinkError::Permanent { what, source }) => SinkError::Permanent { what, source },
        _ => SinkError::permanent(
            "the dead-letter topic refused a message (check sink.dead_letter names a topic the \
             Kafka user may write, with a large enough max.message.bytes)",
            format!("topic {topic:?}: {err}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_what_to_do() {
        use RDKafkaErrorCode as C;
        for code in [C::MessageSizeTooLarge, C::MessageBatchTooLarge] {
            assert_eq!(classify(code), ErrorClass::TooLarge, "{code:?}");
        }
        for code in [C::InvalidTopic, C::InvalidRecord, C::PolicyViolation] {
            assert_eq!(classify(code), ErrorClass::Rejected, "{code:?}");
        }
        for code in [
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::TransactionalIdAuthorizationFailed,
            C::UnknownTopic,
            C::UnknownTopicOrPartition,
        ] {
            assert_eq!(classify(code), ErrorClass::Refused, "{code:?}");
        }
        for code in [C::SaslAuthenticationFailed, C::Authentication] {
            assert_eq!(classify(code), ErrorClass::Credentials, "{code:?}");
        }
        for code in [C::Fatal, C::OutOfOrderSequenceNumber, C::UnknownProducerId] {
            assert_eq!(classify(code), ErrorClass::Fatal, "{code:?}");
        }
        for code in [
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::RequestTimedOut,
            C::MessageTimedOut,
            C::NotEnoughReplicas,
            C::NotEnoughReplicasAfterAppend,
            C::NetworkException,
            C::PurgeQueue,
            C::PurgeInflight,
            C::QueueFull,
            C::KafkaStorageError,
            C::Unknown,
        ] {
            assert_eq!(classify(code), ErrorClass::Transient, "{code:?}");
        }
    }

    #[test]
    fn a_refused_authentication_is_not_hidden_by_the_transport_failures_after_it() {
        let last = LastError::default();
        last.set(RDKafkaErrorCode::BrokerTransportFailure, "refused".into());
        last.set(
            RDKafkaErrorCode::Authentication,
            "SASL authentication error: invalid credentials".into(),
        );
        last.set(
            RDKafkaErrorCode::BrokerTransportFailure,
            "disconnected".into(),
        );
        last.set(RDKafkaErrorCode::AllBrokersDown, "all down".into());
        assert_eq!(
            last.take().map(|(code, _)| code),
            Some(RDKafkaErrorCode::Authentication)
        );
        // Taken: what comes next is reported as it is.
        last.set(RDKafkaErrorCode::BrokerTransportFailure, "refused".into());
        assert_eq!(
            last.take().map(|(code, _)| code),
            Some(RDKafkaErrorCode::BrokerTransportFailure)
        );
    }
}
