//! outboxd's brokers, one folder each. Every sink implements [`outboxd_core::Sink`], whose
//! contract (acknowledged means accepted by the broker, in order, at-least-once) is documented
//! there, and [`SinkPlugin`], which ties it to its configuration section `[sink.<name>]`.
//!
//! - `redis`: Redis Streams, one `MULTI`/`EXEC` of `XADD`s per batch (a Lua script that also
//!   moves the marker, in effectively-once mode).
//! - `kafka`: Kafka, an idempotent producer (`acks=all`); a batch is acknowledged by the
//!   delivery reports of all its messages; transactions in effectively-once mode.
//! - `nats`: NATS JetStream, one publish per event with `Nats-Msg-Id`; a batch is
//!   acknowledged by JetStream's acknowledgements of all its messages.
//! - [`dead_letter`]: what a dead-letter entry carries, for every broker.
//! - [`cloudevents`]: the CloudEvents attributes and structured form, for the sinks that
//!   offer them.
//!
//! Adding a broker: a folder with the client and its section, and one line below (see
//! docs/adding-a-sink.md).

pub mod cloudevents;
pub mod dead_letter;
pub mod plugin;
pub mod registry;

pub use plugin::{CheckLevel, CheckLine, Preflight, SinkConfigError, SinkContext, SinkPlugin};

// The registration: each sink's folder, and cargo feature => folder :: plugin.
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

crate::sinks! {
    "redis" => redis::Redis,
    "kafka" => kafka::Kafka,
    "nats" => nats::Nats,
}
