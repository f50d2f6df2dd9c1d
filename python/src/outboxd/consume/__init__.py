"""Consumers that run each handler once per event, on top of outboxd's at-least-once
delivery: the handler and the event's dedupe record commit in one transaction.

    from outboxd.consume import RedisStreamsConsumer, DjangoStore

    def ship(event):                       # runs in a transaction; emit() inside carries
        Shipment.objects.create(...)       # the event's correlation id and trace on

    consumer = RedisStreamsConsumer(redis.Redis(), ["outbox.order"], group="shipping",
                                    name="worker-1", handler=ship,
                                    store=DjangoStore("shipping"))
    consumer.stop_on_signals()
    consumer.run()

`KafkaConsumer` does the same for Kafka (confluent-kafka). See docs/python.md.
"""

from .handling import Outcome, RetryPolicy
from .kafka import KafkaConsumer
from .redis import RedisStreamsConsumer
from .stores import DjangoStore, PsycopgStore, Store

__all__ = [
    "DjangoStore",
    "KafkaConsumer",
    "Outcome",
    "PsycopgStore",
    "RedisStreamsConsumer",
    "RetryPolicy",
    "Store",
]
