//! The metrics listed in docs/metrics.md, all prefixed `outboxd_`, in the Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

/// The `topic` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    /// The routed topic (or stream, without prefix).
    pub topic: String,
}

/// The `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The poison reason (`null_field`, `rejected`, ...).
    pub reason: String,
}

/// The most distinct `topic` label values a metric gets: topics come from row data, and a
/// label value per distinct topic could grow without end. Events of further topics are
/// counted under [`OTHER_TOPICS`].
pub const MAX_TOPIC_LABELS: usize = 1000;

/// The `topic` label of the events of topics beyond [`MAX_TOPIC_LABELS`].
pub const OTHER_TOPICS: &str = "_other";

/// Now, in microseconds since the Unix epoch (the unit of `Event::commit_time_micros`).
pub fn unix_micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Seconds from `micros` until `now_micros` (both since the Unix epoch); 0 if `micros` is
/// later.
pub fn seconds_between(micros: i64, now_micros: i64) -> f64 {
    (now_micros - micros).max(0) as f64 / 1e6
}

/// Every metric outboxd exports. Cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `events_forwarded_total{topic}`: events the broker acknowledged in their topic.
    pub events_forwarded: Family<TopicLabel, Counter>,
    /// `events_dead_lettered_total{reason}`: events written to the dead-letter destination.
    pub events_dead_lettered: Family<ReasonLabel, Counter>,
    /// `events_already_delivered_total{topic}`: replayed events the broker already held
    /// (effectively-once delivery), not written again.
    pub events_already_delivered: Family<TopicLabel, Counter>,
    /// `sink_errors_total`: failed attempts to publish a batch (each is retried).
    pub sink_errors: Counter,
    /// `sink_refused`: 1 while the broker refuses the stream (an authorization, a missing
    /// topic), 0 otherwise.
    pub sink_refused: Gauge,
    /// `stalled`: 1 while a session streams but does not advance (WAL waits on the server,
    /// nothing is acknowledged or confirmed), 0 otherwise; see `crate::stall`.
    pub stalled: Gauge,
    /// `reconnects_total`: replication sessions started after the first.
    pub reconnects: Counter,
    /// `inflight_events`: events read from the WAL and not yet acknowledged.
    pub inflight_events: Gauge,
    /// `confirmed_lsn`: the position confirmed to the slot, as a number.
    pub confirmed_lsn: Gauge<u64, AtomicU64>,
    /// `retained_wal_bytes`: WAL Postgres keeps for the slot.
    pub retained_wal_bytes: Gauge<u64, AtomicU64>,
    /// `commit_to_ack_seconds`: from the transaction's commit to the broker's acknowledgement.
    pub commit_to_ack_seconds: Histogram,
    /// `commit_to_read_seconds`: from the transaction's commit to outboxd reading the event
    /// from the replication stream (the part of `commit_to_ack_seconds` before the broker).
    pub commit_to_read_seconds: Histogram,
    /// `pruned_rows_total`: outbox rows deleted by pruning (`postgres.prune_after`).
    pub pruned_rows: Counter,
    /// `prune_errors_total`: pruning rounds that failed (each is retried).
    pub prune_errors: Counter,
    /// `messages_refused_total{reason}`: logical decoding messages with one of outboxd's
    /// prefixes that were not acted on (not transactional, not signed), by reason.
    pub messages_refused: Family<ReasonLabel, Counter>,
    /// The topics that have a label value of their own (at most [`MAX_TOPIC_LABELS`]).
    topics: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Whether [`MAX_TOPIC_LABELS`] was reached (said once).
    topics_capped: std::sync::atomic::AtomicBool,
    /// Sum of `events_forwarded` over all topics, for the summary log.
    forwarded_all: AtomicU64,
    /// Sum of `events_dead_lettered` over all reasons, for the summary log.
    dead_lettered_all: AtomicU64,
}

/// The latency histograms' buckets, in seconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Registers `metric` as `outboxd_<name>` with `help`; returns it (a handle to the same
/// metric) for updating.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("outboxd");
        Metrics {
            events_forwarded: registered(
                &mut r,
                "events_forwarded",
                "Events the broker acknowledged in their topic",
                Family::default(),
            ),
            events_dead_lettered: registered(
                &mut r,
                "events_dead_lettered",
                "Events written to the dead-letter destination, by reason",
                Family::default(),
            ),
            events_already_delivered: registered(
                &mut r,
                "events_already_delivered",
                "Replayed events the broker already held (effectively-once delivery), not written again",
                Family::default(),
            ),
            sink_errors: registered(
                &mut r,
                "sink_errors",
                "Failed attempts to publish a batch to the broker (each is retried)",
                Counter::default(),
            ),
            sink_refused: registered(
                &mut r,
                "sink_refused",
                "1 while the broker refuses the stream (an authorization, a missing topic or stream): nothing is forwarded or dead-lettered until it is fixed",
                Gauge::default(),
            ),
            stalled: registered(
                &mut r,
                "stalled",
                "1 while connected but not advancing: WAL waits on the server and nothing is acknowledged or confirmed (the log and /readyz say why)",
                Gauge::default(),
            ),
            reconnects: registered(
                &mut r,
                "reconnects",
                "Replication sessions started after the first",
                Counter::default(),
            ),
            inflight_events: registered(
                &mut r,
                "inflight_events",
                "Events read from the WAL and not yet acknowledged by the broker",
                Gauge::default(),
            ),
            confirmed_lsn: registered(
                &mut r,
                "confirmed_lsn",
                "The WAL position confirmed to the replication slot",
                Gauge::default(),
            ),
            retained_wal_bytes: registered(
                &mut r,
                "retained_wal_bytes",
                "WAL bytes Postgres keeps for the slot (current position minus restart_lsn)",
                Gauge::default(),
            ),
            commit_to_ack_seconds: registered(
                &mut r,
                "commit_to_ack_seconds",
                "Time from an event's commit in Postgres to the broker's acknowledgement",
                Histogram::new(LATENCY_BUCKETS),
            ),
            commit_to_read_seconds: registered(
                &mut r,
                "commit_to_read_seconds",
                "Time from an event's commit in Postgres to outboxd reading it from the replication stream",
                Histogram::new(LATENCY_BUCKETS),
            ),
            pruned_rows: registered(
                &mut r,
                "pruned_rows",
                "Outbox rows deleted by pruning, once the slot had confirmed them",
                Counter::default(),
            ),
            prune_errors: registered(
                &mut r,
                "prune_errors",
                "Pruning rounds that failed (each is retried)",
                Counter::default(),
            ),
            messages_refused: registered(
                &mut r,
                "messages_refused",
                "Logical decoding messages with an outboxd prefix not acted on (not transactional, not signed), by reason",
                Family::default(),
            ),
            topics: std::sync::Mutex::default(),
            topics_capped: std::sync::atomic::AtomicBool::new(false),
            forwarded_all: AtomicU64::new(0),
            dead_lettered_all: AtomicU64::new(0),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Counts a batch's outcome: `forwarded` events per topic, `dead_lettered` per reason.
    pub fn record_batch<'a>(
        &self,
        forwarded: impl IntoIterator<Item = (&'a str, u64)>,
        dead_lettered: impl IntoIterator<Item = (&'static str, u64)>,
    ) {
        for (topic, n) in forwarded {
            self.events_forwarded
                .get_or_create(&self.topic_label(topic))
                .inc_by(n);
            self.forwarded_all.fetch_add(n, Ordering::Relaxed);
        }
        for (reason, n) in dead_lettered {
            self.events_dead_lettered
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc_by(n);
            self.dead_lettered_all.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts replayed events the broker already held, per topic.
    pub fn record_already_delivered<'a>(&self, counts: impl IntoIterator<Item = (&'a str, u64)>) {
        for (topic, n) in counts {
            self.events_already_delivered
                .get_or_create(&self.topic_label(topic))
                .inc_by(n);
        }
    }

    /// The label of `topic`: itself while fewer than [`MAX_TOPIC_LABELS`] topics have one,
    /// [`OTHER_TOPICS`] after (said once).
    fn topic_label(&self, topic: &str) -> TopicLabel {
        let own = match self.topics.lock() {
            Ok(topics) if topics.contains(topic) => true,
            Ok(mut topics) if topics.len() < MAX_TOPIC_LABELS => {
                topics.insert(topic.to_owned());
                true
            }
            Ok(_) => {
                if !self.topics_capped.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        topic,
                        "{MAX_TOPIC_LABELS} topics have their own metric label; events of \
                         further topics are counted under topic=\"{OTHER_TOPICS}\""
                    );
                }
                false
            }
            Err(_) => false,
        };
        TopicLabel {
            topic: if own { topic } else { OTHER_TOPICS }.to_owned(),
        }
    }

    /// Events forwarded since start, over all topics.
    pub fn forwarded_total(&self) -> u64 {
        self.forwarded_all.load(Ordering::Relaxed)
    }

    /// Events dead-lettered since start, over all reasons.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered_all.load(Ordering::Relaxed)
    }

    /// Events the broker took since start: forwarded or dead-lettered.
    pub fn events_handled_total(&self) -> u64 {
        self.forwarded_total() + self.dead_lettered_total()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_labels_are_bounded() {
        let m = super::Metrics::new();
        let topics: Vec<String> = (0..super::MAX_TOPIC_LABELS + 5)
            .map(|i| format!("t{i}"))
            .collect();
        m.record_batch(topics.iter().map(|t| (t.as_str(), 1)), []);
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("outboxd_events_forwarded_total{"))
            .count();
        assert_eq!(series, super::MAX_TOPIC_LABELS + 1);
        assert!(
            text.contains("outboxd_events_forwarded_total{topic=\"_other\"} 5"),
            "{text}"
        );
        assert_eq!(m.forwarded_total(), topics.len() as u64);
    }

    use super::*;

    /// Metric families as the exposition names them (`# TYPE <name> <type>`).
    fn families() -> Vec<String> {
        Metrics::new()
            .encode()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// `outboxd_...` names in a text.
    fn names_in(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("outboxd_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            // The bare prefix, as in "prefixed `outboxd_`", names nothing.
            if end > "outboxd_".len() {
                names.push(tail[..end].to_owned());
            }
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn the_spec_names_are_exported() {
        let families = families();
        for name in [
            "outboxd_events_forwarded",
            "outboxd_events_dead_lettered",
            "outboxd_sink_errors",
            "outboxd_reconnects",
            "outboxd_inflight_events",
            "outboxd_confirmed_lsn",
            "outboxd_retained_wal_bytes",
            "outboxd_commit_to_ack_seconds",
        ] {
            assert!(
                families.iter().any(|f| f == name),
                "{name} missing: {families:?}"
            );
        }
    }

    #[test]
    fn the_docs_and_the_dashboard_name_only_real_metrics() {
        let families = families();
        let doc = include_str!("../../../docs/metrics.md");
        for family in &families {
            assert!(
                doc.contains(family.as_str()),
                "docs/metrics.md does not describe {family}"
            );
        }
        let dashboard = include_str!("../../../docs/grafana-dashboard.json");
        for text in [doc, dashboard] {
            for name in names_in(text) {
                let base = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    families.iter().any(|f| f == base),
                    "{name} is not an outboxd metric (families: {families:?})"
                );
            }
        }
    }
}
