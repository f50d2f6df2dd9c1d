"""The consumers with outboxd in the loop: Postgres → outboxd → Redis or Kafka → a consumer
process → the service's database. Side effects happen once per event whatever the broker
repeats and wherever the consumer dies; poison goes to the dead letter; two processes share
a group in key order; an emit inside a handler carries the correlation id on."""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict

from conftest import eventually, stream_events

STREAM = "outbox.order"


def new_orders(n: int) -> list[int]:
    from shop.models import Order

    return [Order.objects.create(customer=f"c{i}", amount="12.50").id for i in range(n)]


def paid_entries(redis_client, order_ids: set[int]) -> list[dict]:
    return [
        e
        for e in stream_events(redis_client, STREAM)
        if e["type"] == "order.paid" and e["payload"]["order_id"] in order_ids
    ]


def shipments(order_ids) -> list:
    from shop.models import Shipment

    return list(Shipment.objects.filter(order_id__in=list(order_ids)).order_by("id"))


def group_at_end(redis_client, group: str) -> None:
    """Creates `group` at the stream's end: the consumer sees what comes next."""
    redis_client.xgroup_create(STREAM, group, id="$", mkstream=True)


def test_pay_order_emits_in_its_transaction_and_a_rollback_emits_nothing(
    pg, redis_server, outboxd_redis
):
    import pytest

    from shop.models import Order
    from shop.services import pay_order, pay_order_and_fail

    failed, paid = new_orders(2)
    with pytest.raises(RuntimeError, match="declined"):
        pay_order_and_fail(failed)
    pay_order(paid)
    r = redis_server.client
    entries = eventually("order.paid in Redis", lambda: paid_entries(r, {paid}))
    assert entries[0]["payload"] == {"order_id": paid, "amount": "12.50"}
    assert entries[0]["headers"]["correlation_id"]
    # Everything committed before `paid` has arrived: the rolled-back one never will.
    assert paid_entries(r, {failed}) == []
    assert Order.objects.get(id=failed).status == "new"
    assert Order.objects.get(id=paid).status == "paid"


def test_each_side_effect_happens_once_when_every_event_arrives_twice(
    pg, redis_server, outboxd_redis, consumers
):
    from shop.services import pay_order

    r = redis_server.client
    group = f"shipping-{uuid.uuid4().hex[:6]}"
    group_at_end(r, group)
    orders = new_orders(20)
    for order in orders:
        pay_order(order)
    def all_paid():
        found = paid_entries(r, set(orders))
        return found if len(found) == 20 else None

    entries = eventually("20 events in Redis", all_paid)
    # The broker repeats every event (as after an outboxd crash in at-least-once mode).
    for _, fields in r.xrange(STREAM, min=entries[0]["entry_id"], max=entries[-1]["entry_id"]):
        r.xadd(STREAM, fields)
    consumer = consumers("--broker", "redis", "--url", redis_server.url, "--source", STREAM,
                         "--group", group, "--name", "w1")
    eventually("a shipment per order", lambda: len(shipments(orders)) >= 20)
    copies = {e["entry_id"] for e in paid_entries(r, set(orders))}
    assert len(copies) == 40
    eventually("every copy read and acknowledged", lambda: _delivered(r, group, max(copies)))
    assert consumer.stop() == 0, consumer.text()
    made = shipments(orders)
    assert sorted(s.order_id for s in made) == sorted(orders), "one shipment per order"
    assert "already processed" in consumer.text()

    # The handler's own emit (order.shipped) carries the paid event's correlation id.
    by_order = {e["payload"]["order_id"]: e["headers"]["correlation_id"] for e in entries}
    def all_shipped():
        found = [
            e for e in stream_events(r, STREAM)
            if e["type"] == "order.shipped" and e["payload"]["order_id"] in by_order
        ]
        return found if len(found) >= 20 else None

    shipped = eventually("the shipped events", all_shipped)
    assert len(shipped) == 20, "one order.shipped per order: the repeat emitted nothing"
    for e in shipped:
        assert e["headers"]["correlation_id"] == by_order[e["payload"]["order_id"]]


def _delivered(r, group: str, last_id: str) -> bool:
    """Whether `group` has read up to `last_id` and has nothing pending."""
    info = next(i for i in r.xinfo_groups(STREAM) if i["name"].decode() == group)
    last = info["last-delivered-id"].decode()
    as_tuple = lambda i: tuple(int(p) for p in i.split("-"))  # noqa: E731
    return as_tuple(last) >= as_tuple(last_id) and int(info["pending"]) == 0


def test_a_consumer_killed_mid_handler_leaves_no_trace_and_the_work_is_done_once(
    pg, redis_server, outboxd_redis, consumers
):
    from shop.services import pay_order

    r = redis_server.client
    group = f"shipping-{uuid.uuid4().hex[:6]}"
    group_at_end(r, group)
    first, second = new_orders(2)
    common = ("--broker", "redis", "--url", redis_server.url, "--source", STREAM, "--group", group)

    def in_handler() -> bool:
        with pg.connect("shop") as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'shop' "
                "AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
            ).fetchone()[0] > 0

    # Killed inside the handler, then restarted: it handles its own pending entry.
    slow = consumers(*common, "--name", "w1", "--mode", "slow")
    pay_order(first)
    eventually("the handler to be in its transaction", in_handler)
    slow.kill9()
    assert shipments([first]) == [], "the killed handler's transaction rolled back"
    restarted = consumers(*common, "--name", "w1")
    eventually("the shipment", lambda: shipments([first]))
    eventually("the entry acknowledged", lambda: r.xpending(STREAM, group)["pending"] == 0)
    assert restarted.stop() == 0
    assert [s.handled_by for s in shipments([first])] == ["w1"]

    # Killed, and not coming back: another process of the group takes the entry over
    # (XAUTOCLAIM) once it has been idle for claim_idle_ms.
    slow = consumers(*common, "--name", "w3", "--mode", "slow")
    pay_order(second)
    eventually("the handler to be in its transaction", in_handler)
    slow.kill9()
    other = consumers(*common, "--name", "w2", "--claim-idle-ms", "1000")
    eventually("the shipment", lambda: shipments([second]))
    eventually("the entry acknowledged", lambda: r.xpending(STREAM, group)["pending"] == 0)
    assert other.stop() == 0
    assert [s.handled_by for s in shipments([second])] == ["w2"]
    assert "claimed outbox.order" in other.text()


def test_a_poison_event_goes_to_the_dead_letter_after_its_attempts(
    pg, redis_server, outboxd_redis
):
    """In this process (a thread), to read the Prometheus counters too."""
    import redis
    from django.db import transaction
    from prometheus_client import REGISTRY

    from outboxd import emit
    from outboxd.consume import DjangoStore, RedisStreamsConsumer, RetryPolicy
    from outboxd.django.models import DeadLetter
    from shop.services import pay_order, ship

    r = redis_server.client
    group = f"shipping-{uuid.uuid4().hex[:6]}"
    group_at_end(r, group)
    poison_order, later = new_orders(2)
    with transaction.atomic():
        poison_id = str(emit("order", poison_order, "order.poison", {"order_id": poison_order}))
    pay_order(later)
    attempts = []

    def handler(event):
        if event.type == "order.poison":
            attempts.append(event.id)
            raise ValueError("no warehouse for this order")
        ship(event)

    consumer = RedisStreamsConsumer(
        redis.Redis.from_url(redis_server.url), [STREAM], group, "t1", handler,
        DjangoStore(group), RetryPolicy(max_attempts=3, backoff_initial=0.01), block_ms=100,
    )
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        letters = eventually("the dead letter", lambda: stream_events(r, STREAM + ".dlq") and [
            e for e in stream_events(r, STREAM + ".dlq") if e.get("id") == poison_id])
        eventually("the later order shipped", lambda: shipments([later]))
    finally:
        consumer.stop()
        thread.join(10)
    assert attempts == [poison_id] * 3
    letter = letters[0]
    assert letter["attempts"] == "3"
    assert "ValueError: no warehouse for this order" in letter["error"]
    assert letter["source_stream"] == STREAM and letter["group"] == group
    row = DeadLetter.objects.get(consumer=group, event_id=poison_id)
    assert row.attempts == 3 and "no warehouse" in row.error and row.event_type == "order.poison"
    assert r.xpending(STREAM, group)["pending"] == 0
    labels = {"source": STREAM, "group": group}
    assert REGISTRY.get_sample_value("outboxd_consumer_dead_lettered_total", labels) == 1
    assert REGISTRY.get_sample_value("outboxd_consumer_failed_total", labels) == 3
    assert REGISTRY.get_sample_value("outboxd_consumer_processed_total", labels) >= 1
    lag = REGISTRY.get_sample_value("outboxd_consumer_lag", labels)
    assert lag is not None and lag >= 0, "the group's lag is reported (XINFO GROUPS)"

    # The admin lists it.
    from django.contrib.auth.models import User
    from django.test import Client

    admin = User.objects.create_superuser(f"admin-{group}", "a@example.com", "pw")
    client = Client()
    client.force_login(admin)
    page = client.get("/admin/outboxd/deadletter/")
    assert page.status_code == 200 and poison_id in page.content.decode()


def test_two_kafka_consumers_share_a_group_in_key_order(pg, kafka, outboxd_kafka, consumers):
    from django.db import transaction

    from outboxd import emit

    group = f"shipping-{uuid.uuid4().hex[:6]}"
    common = ("--broker", "kafka", "--url", kafka.brokers, "--source", STREAM, "--group", group)
    orders = new_orders(12)
    # The topic exists once outboxd has written to it; then both consumers join the group.
    with transaction.atomic():
        emit("order", orders[0], "order.created", {"order_id": orders[0]})
    eventually("the topic", lambda: STREAM in kafka.admin.list_topics(timeout=2).topics)
    one = consumers(*common, "--name", "k1")
    two = consumers(*common, "--name", "k2")
    eventually("both consumers assigned", lambda: _members(kafka, group) == 2, timeout=60)
    sequence = 0
    for _ in range(10):
        with transaction.atomic():
            for order in orders:
                sequence += 1
                emit("order", order, "order.paid", {"order_id": order, "seq": sequence})
    eventually("120 shipments", lambda: len(shipments(orders)) >= 120, timeout=120)
    assert one.stop() == 0 and two.stop() == 0
    made = shipments(orders)
    assert len({s.event_id for s in made}) == len(made) == 120, "each event once"
    assert {s.handled_by for s in made} == {"k1", "k2"}, "the group shared the load"
    per_order = defaultdict(list)
    for s in made:
        per_order[s.order_id].append(s.sequence)
    for order, seqs in per_order.items():
        assert seqs == sorted(seqs), f"order {order} handled out of order: {seqs}"


def _members(kafka, group: str) -> int:
    future = kafka.admin.describe_consumer_groups([group])[group]
    try:
        description = future.result(timeout=5)
    except Exception:
        return 0
    assigned = [m for m in description.members if m.assignment.topic_partitions]
    return len(assigned)


def test_a_kafka_poison_event_goes_to_the_dead_letter_topic(pg, kafka, outboxd_kafka, consumers):
    from confluent_kafka import Consumer
    from django.db import transaction

    from outboxd import emit
    from outboxd.django.models import DeadLetter
    from shop.services import pay_order

    group = f"shipping-{uuid.uuid4().hex[:6]}"
    poison_order, later = new_orders(2)
    with transaction.atomic():
        poison_id = str(emit("order", poison_order, "order.poison", {"order_id": poison_order}))
    pay_order(later)
    consumer = consumers("--broker", "kafka", "--url", kafka.brokers, "--source", STREAM,
                         "--group", group, "--name", "k1", "--mode", "poison")
    eventually("the later order shipped", lambda: shipments([later]), timeout=90)
    row = eventually("the DeadLetter row", lambda: DeadLetter.objects.filter(
        consumer=group, event_id=poison_id).first())
    assert row.attempts == 3 and "cannot handle" in row.error
    assert consumer.stop() == 0

    reader = Consumer({"bootstrap.servers": kafka.brokers, "group.id": f"read-{group}",
                       "auto.offset.reset": "earliest", "log_level": 3})
    reader.subscribe([STREAM + ".dlq"])
    letters = []

    def read_letter():
        message = reader.poll(0.5)
        if message is not None and not message.error():
            headers = {k: v.decode() for k, v in message.headers()}
            if headers.get("id") == poison_id:
                letters.append(headers)
        return letters

    try:
        eventually("the dead-letter message", read_letter, timeout=60)
    finally:
        reader.close()
    assert letters[0]["attempts"] == "3"
    assert "ValueError: cannot handle" in letters[0]["error"]
    assert letters[0]["source_topic"] == STREAM and letters[0]["group"] == group
