//! The `outboxd` binary's library: configuration, commands and the wiring of the pipeline.
//!
//! Reading `crates/` along the data flow: `outboxd-postgres` (slot, stream, decode) →
//! `outboxd-core` (route, checkpoint, the sink contract) → `outboxd-sinks` (brokers). This
//! crate wires them: [`pipeline`] owns the replication session and [`dispatch`] drives the
//! sink; [`config`] and [`cli`] are the user's interface, [`commands`] the entry points.

pub mod backoff;
pub mod broker;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dead_letters;
pub mod dispatch;
pub mod failpoint;
#[cfg(test)]
mod fake_sink;
pub mod http;
pub mod metrics;
pub mod otel;
pub mod pipeline;
pub mod progress;
pub mod prune;
pub mod report;
pub mod retention;
pub mod stall;
pub mod status;
pub mod tasks;
