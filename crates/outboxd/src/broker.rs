//! The configured broker: `[sink] kind` and its section, through the sinks' registry.
//!
//! Nothing here names a sink: each one's section, checks and client live in its folder of
//! `outboxd-sinks`, and the registry there (one line per sink) is how this crate knows them.

use outboxd_core::WalOrigin;
use outboxd_sinks::{AnySink, CheckLevel, SinkContext};

use crate::config::{Config, DeliveryMode};

/// The configured sink is not in this build.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerConfigError(String);

/// How the configuration selects, describes and builds the broker.
#[derive(Debug, Clone, Copy)]
pub struct Broker;

impl Broker {
    /// Checks that the configured broker can be built, without connecting.
    pub fn check(config: &Config) -> Result<(), BrokerConfigError> {
        match outboxd_sinks::SinkSections::effectively_once(&config.sink.kind) {
            Some(_) => Ok(()),
            None => Err(BrokerConfigError(outboxd_sinks::registry::unknown_kind(
                &config.sink.kind,
            ))),
        }
    }

    /// The broker's name for messages and metrics: `[sink] kind`.
    pub fn name(config: &Config) -> &'static str {
        outboxd_sinks::SINKS
            .iter()
            .map(|(name, _)| *name)
            .find(|name| *name == config.sink.kind)
            .unwrap_or("broker")
    }

    /// Where the broker is, without secrets.
    pub fn target(config: &Config) -> String {
        config.sink.sections.target(&config.sink.kind)
    }

    /// How the broker connection is secured, from the configuration.
    pub fn security(config: &Config) -> (CheckLevel, String) {
        config.sink.sections.security(&config.sink.kind)
    }

    /// Builds the broker client (connections are made on first use). `origin`: the WAL
    /// history of the replication session the sink serves (effectively-once sinks keep their
    /// markers under it); `None` for a sink that only answers pings.
    pub fn build(
        config: &Config,
        origin: Option<&WalOrigin>,
    ) -> Result<AnySink, outboxd_core::SinkError> {
        let ctx = SinkContext {
            dead_letter: &config.sink.dead_letter,
            effectively_once: config.sink.delivery == DeliveryMode::EffectivelyOnce,
            slot: &config.postgres.slot,
            type_header: config.route.type_header(),
            envelope: config.sink.envelope,
            source: &config.sink.source,
            origin,
        };
        config.sink.sections.build(&config.sink.kind, &ctx)
    }
}
