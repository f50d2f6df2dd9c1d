//! Creating topics through the Admin API, with `create_topics`.
//!
//! A topic (including the dead-letter topic) is created the first time a batch needs it, with
//! `topic_partitions` partitions and `topic_replication_factor`; "already exists" counts as
//! success, and a topic created or found is not asked about again. A topic the broker will not
//! create for a reason of its own (an invalid name, a forbidden topic) is left to the produce
//! that follows, which dead-letters its events with the broker's reason; refused credentials
//! are permanent, anything else transient. Without `create_topics`, nothing is created: the
//! topics must exist, or be created by the broker on first use.
//!
//! The admin client has the producer's settings, but not its `transactional.id`.

use outboxd_core::SinkError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;

use super::KafkaSink;
use super::errors::{Context, ErrorClass, classify, client_error};

impl KafkaSink {
    pub(super) fn admin(&mut self) -> Result<&AdminClient<Context>, SinkError> {
        if self.admin.is_none() {
            // Not transactional: an admin client with a transactional.id would wait for
            // transactions that it never starts.
            let mut config = self.client_config.clone();
            config
                .remove("transactional.id")
                .remove("transaction.timeout.ms");
            let admin: AdminClient<Context> = config
                .create_with_context(self.context.clone())
                .map_err(|e| {
                    SinkError::permanent(
                        "the Kafka admin client configuration was refused (check sink.kafka.options)",
                        e,
                    )
                })?;
            self.admin = Some(admin);
        }
        Ok(self.admin.as_ref().expect("admin client was just set"))
    }

    /// Creates the topics of `names` that are not known yet, when `create_topics` is on.
    pub(super) async fn ensure_topics<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), SinkError> {
        if !self.config.create_topics {
            return Ok(());
        }
        let mut missing: Vec<&str> = Vec::new();
        for name in names {
            if !name.is_empty() && !self.topics.contains(name) && !missing.contains(&name) {
                missing.push(name);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let replication = TopicReplication::Fixed(self.config.topic_replication_factor);
        let partitions = self.config.topic_partitions;
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|name| NewTopic::new(name, partitions, replication_copy(&replication)))
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(self.config.timeout))
            .operation_timeout(Some(self.config.timeout));
        let results = self
            .admin()?
            .create_topics(new.iter(), &options)
            .await
            .map_err(|e| client_error("creating Kafka topics (sink.kafka.create_topics)", e))?;
        for result in results {
            match result {
                Ok(name) => {
                    tracing::info!(topic = %name, partitions, "created Kafka topic");
                    self.topics.insert(name);
                }
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    self.topics.insert(name);
                }
                Err((name, code)) => match classify(code) {
                    ErrorClass::Transient | ErrorClass::Fatal => {
                        return Err(SinkError::transient(
                            "creating Kafka topics (sink.kafka.create_topics)",
                            format!("topic {name:?}: {code}"),
                        ));
                    }
                    ErrorClass::Refused => {
                        return Err(SinkError::refused(
                            "creating Kafka topics (sink.kafka.create_topics): the user may not \
                             create them (grant Create on the topic or the cluster, or create \
                             them yourself)",
                            format!("topic {name:?}: {code}"),
                        ));
                    }
                    ErrorClass::Credentials => {
                        return Err(SinkError::permanent(
                            "creating Kafka topics (sink.kafka.create_topics): check the credentials and permissions in sink.kafka.options",
                            format!("topic {name:?}: {code}"),
                        ));
                    }
                    // An invalid name, a forbidden topic, a bad partition count: producing to
                    // it fails too, and that dead-letters its events with the broker's reason.
                    ErrorClass::TooLarge | ErrorClass::Rejected => {
                        tracing::warn!(topic = %name, error = %code, "cannot create Kafka topic; its events will be dead-lettered if the broker refuses them");
                        self.topics.insert(name);
                    }
                },
            }
        }
        Ok(())
    }
}

/// `TopicReplication` is not `Clone`.
fn replication_copy<'a>(r: &TopicReplication<'a>) -> TopicReplication<'a> {
    match r {
        TopicReplication::Fixed(n) => TopicReplication::Fixed(*n),
        TopicReplication::Variable(v) => TopicReplication::Variable(v),
    }
}

impl KafkaSink {
    /// After a batch timed out: the first of `topics` that the cluster says does not exist
    /// (deleted while outboxd produced to it: librdkafka then holds its messages instead of
    /// failing them), as a refusal of the stream. Forgets which topics exist, so that
    /// `create_topics` makes it again.
    pub(super) async fn missing_topic<'a>(
        &mut self,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> Option<SinkError> {
        let mut wanted: Vec<String> = topics.into_iter().map(str::to_owned).collect();
        wanted.sort();
        wanted.dedup();
        let timeout = self.config.timeout.min(std::time::Duration::from_secs(5));
        let mut config = self.client_config.clone();
        config
            .remove("transactional.id")
            .remove("transaction.timeout.ms");
        let client: rdkafka::producer::FutureProducer<Context> =
            config.create_with_context(self.context.clone()).ok()?;
        let missing = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            let client = client.client();
            wanted.into_iter().find(|topic| {
                client.fetch_metadata(Some(topic), timeout).is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == topic
                            && matches!(
                                t.error().map(RDKafkaErrorCode::from),
                                Some(
                                    RDKafkaErrorCode::UnknownTopicOrPartition
                                        | RDKafkaErrorCode::UnknownTopic
                                )
                            )
                    })
                })
            })
        })
        .await
        .ok()??;
        self.topics.clear();
        Some(super::errors::refused(format!(
            "topic {missing:?} does not exist (deleted?); its events wait"
        )))
    }
}
