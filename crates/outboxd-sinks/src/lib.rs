//! outboxd's brokers. Each implements [`outboxd_core::Sink`]; its contract (acknowledged
//! means accepted by the broker, in order, at-least-once) is documented there.
//!
//! - [`redis`]: Redis Streams, one `MULTI`/`EXEC` of `XADD`s per batch.
//! - [`kafka`]: Kafka, an idempotent producer (`acks=all`); a batch is acknowledged by the
//!   delivery reports of all its messages.
//! - [`dead_letter`]: what a dead-letter entry carries, for every broker.

pub mod dead_letter;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "redis")]
pub mod redis;
