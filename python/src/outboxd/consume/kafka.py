"""A Kafka consumer (confluent-kafka): a consumer group, `read_committed`, the offset
committed only after the handler's transaction, failures retried and then dead-lettered.

Messages are handled one at a time in partition order, so events of one key (one partition)
are handled in the order outboxd wrote them, also when several processes share the group:
each partition belongs to one of them at a time. For each message:

1. it is handled (see `handling`): the handler and the dedupe record in one transaction;
2. when every attempt failed, it is produced to `<topic><dead_letter_suffix>` with headers
   `error`, `attempts`, `source_topic`, `source_partition`, `source_offset` (and waited for);
3. then its offset is committed, synchronously.

A crash before 3 delivers the message again, to whichever process has the partition then;
the dedupe record makes a repeat of a committed handler a no-op.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..event import Event
from . import metrics
from .handling import Handler, Outcome, RetryPolicy
from .stores import Store
from .worker import Worker, log


class KafkaConsumer(Worker):
    """Consumes `topics` in consumer group `group`; `config` is librdkafka's (at least
    `bootstrap.servers`)."""

    def __init__(
        self,
        config: dict[str, Any],
        topics: list[str],
        group: str,
        handler: Handler,
        store: Store,
        policy: RetryPolicy | None = None,
        *,
        dead_letter_suffix: str = ".dlq",
        poll_timeout: float = 1.0,
        create_dead_letter_topics: bool = True,
    ) -> None:
        super().__init__(handler, store, group, policy)
        self.config = dict(config)
        self.topics = list(topics)
        self.dead_letter_suffix = dead_letter_suffix
        self.poll_timeout = poll_timeout
        self.create_dead_letter_topics = create_dead_letter_topics
        self._lag_at = 0.0

    def run(self) -> None:
        """Consumes until `stop()` (or SIGTERM with `stop_on_signals()`)."""
        from confluent_kafka import Consumer, Producer

        consumer = Consumer(
            {
                **self.config,
                "group.id": self.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": self.config.get("auto.offset.reset", "earliest"),
            }
        )
        producer = Producer(
            {
                "bootstrap.servers": self.config["bootstrap.servers"],
                "acks": "all",
                "enable.idempotence": True,
            }
        )
        if self.create_dead_letter_topics:
            self._create_dead_letter_topics()
        consumer.subscribe(self.topics)
        try:
            while not self.stopping.is_set():
                message = consumer.poll(self.poll_timeout)
                self._report_lag(consumer)
                if message is None:
                    continue
                if message.error():
                    log.warning("kafka: %s", message.error())
                    continue
                if self._handle(message, producer):
                    consumer.commit(message=message, asynchronous=False)
        finally:
            consumer.close()
            producer.flush(10)
        log.info("kafka consumer of %s stopped", self.group)

    def _handle(self, message: Any, producer: Any) -> bool:
        """Handles one message; whether its offset may be committed."""
        try:
            event = _event(message)
        except ValueError as e:
            error = f"not an outboxd event: {e}"
            self._dead_letter(message, producer, 0, error)
            metrics.DEAD_LETTERED.labels(message.topic(), self.group).inc()
            return True
        result = self.process(event)
        if result.outcome is Outcome.STOPPED:
            return False
        if result.outcome is Outcome.FAILED:
            self._dead_letter(message, producer, result.attempts, result.error)
        return True

    def _create_dead_letter_topics(self) -> None:
        """Creates `<topic><suffix>` for each topic, where it does not exist (clusters often
        do not create topics on first use)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.config["bootstrap.servers"]})
        wanted = [t + self.dead_letter_suffix for t in self.topics]
        existing = admin.list_topics(timeout=10).topics
        missing = [NewTopic(t, num_partitions=1) for t in wanted if t not in existing]
        for topic, future in admin.create_topics(missing).items() if missing else []:
            try:
                future.result(timeout=30)
                log.info("created the dead-letter topic %s", topic)
            except KafkaException as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise

    def _dead_letter(self, message: Any, producer: Any, attempts: int, error: str) -> None:
        headers = list(message.headers() or [])
        headers += [
            ("error", error.encode()),
            ("attempts", str(attempts).encode()),
            ("source_topic", message.topic().encode()),
            ("source_partition", str(message.partition()).encode()),
            ("source_offset", str(message.offset()).encode()),
            ("group", self.group.encode()),
        ]
        topic = message.topic() + self.dead_letter_suffix
        failures: list[Any] = []
        producer.produce(
            topic,
            key=message.key(),
            value=message.value(),
            headers=headers,
            on_delivery=lambda err, _msg: failures.append(err) if err else None,
        )
        if producer.flush(30) != 0 or failures:
            # The offset stays uncommitted: the event is handled again after a restart.
            reason = failures[0] if failures else "no acknowledgement within 30 s"
            raise RuntimeError(f"writing to the dead-letter topic {topic} failed: {reason}")

    def _report_lag(self, consumer: Any) -> None:
        now = time.monotonic()
        if now - self._lag_at < 5:
            return
        self._lag_at = now
        per_topic: dict[str, int] = {}
        for tp in consumer.assignment():
            _, high = consumer.get_watermark_offsets(tp, timeout=1, cached=False)
            position = consumer.position([tp])[0].offset
            if position >= 0 and high >= 0:
                per_topic[tp.topic] = per_topic.get(tp.topic, 0) + max(0, high - position)
        for topic, lag in per_topic.items():
            metrics.LAG.labels(topic, self.group).set(lag)


def _event(message: Any) -> Event:
    """An event of outboxd's Kafka layout: headers `id` and `type`, then the row's."""
    headers: dict[str, str] = {}
    for name, value in message.headers() or []:
        headers[name] = (value or b"").decode("utf-8", "replace")
    event_id = headers.pop("id", "")
    if not event_id:
        raise ValueError("no id header")
    event_type = headers.pop("type", "")
    raw = message.value() or b""
    key = message.key()
    return Event(
        id=event_id,
        type=event_type,
        key=key.decode("utf-8", "replace") if key else "",
        payload=json.loads(raw) if raw else None,
        headers=headers,
        source=message.topic(),
        position=f"{message.partition()}:{message.offset()}",
        raw_payload=raw,
    )
