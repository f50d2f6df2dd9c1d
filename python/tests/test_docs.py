"""The examples of docs/python.md are the tested code: the ones that define the seed's
functions are the functions the other tests run (tests/shop/services.py), and the others
run here, against the live servers."""

from __future__ import annotations

import re
import signal
import textwrap
import threading
import uuid
from pathlib import Path

from conftest import eventually

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "python.md").read_text()
SERVICES = (Path(__file__).parent / "shop" / "services.py").read_text()


def blocks() -> list[str]:
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", DOC, re.S)]


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def contains(haystack: str, needle: str) -> bool:
    want, have = lines(needle), lines(haystack)
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def test_the_emit_and_handler_examples_are_the_tested_functions():
    defined = [b for b in blocks() if b.startswith("def ")]
    assert {re.match(r"def (\w+)", b).group(1) for b in defined} == {"pay_order", "ship"}
    for block in defined:
        assert contains(SERVICES, block), f"docs/python.md's example is not services.py's:\n{block}"


def namespace(pg, **extra):
    import psycopg
    import redis
    from django.db import transaction
    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import Session

    from outboxd import Event, emit
    from outboxd.consume import DjangoStore, KafkaConsumer, RedisStreamsConsumer, RetryPolicy
    from shop.models import Order
    from shop.services import ship

    return {
        "psycopg": psycopg, "redis": redis, "transaction": transaction, "Session": Session,
        "update": update, "emit": emit, "Event": Event, "DjangoStore": DjangoStore,
        "KafkaConsumer": KafkaConsumer, "RedisStreamsConsumer": RedisStreamsConsumer,
        "RetryPolicy": RetryPolicy, "Order": Order, "ship": ship,
        "engine": create_engine(pg.url("shop").replace("postgresql://", "postgresql+psycopg://")),
        "url": pg.url("shop"), **extra,
    }


def test_the_psycopg_and_sqlalchemy_examples_run(pg):
    from sqlalchemy import Column, Integer, String
    from sqlalchemy.orm import declarative_base

    from shop.models import Order as DjangoOrder

    order = DjangoOrder.objects.create(customer="docs", amount="1.00")
    with pg.connect("shop", autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, status text)")
        conn.execute("INSERT INTO orders VALUES (%s, 'new') ON CONFLICT DO NOTHING", (order.id,))
    base = declarative_base()

    class Order(base):  # the SQLAlchemy model the example updates
        __tablename__ = "orders"
        id = Column(Integer, primary_key=True)
        status = Column(String)

    (example,) = [b for b in blocks() if "psycopg.connect" in b]
    exec(example, namespace(pg, Order=Order, order_id=order.id))
    with pg.connect("shop") as conn:
        emitted = conn.execute(
            "SELECT count(*) FROM outbox WHERE aggregate_id = %s AND event_type = 'order.paid'",
            (str(order.id),),
        ).fetchone()[0]
        status = conn.execute("SELECT status FROM orders WHERE id = %s", (order.id,)).fetchone()
    assert emitted == 2 and status == ("paid",)


def test_the_redis_consumer_example_runs(pg, redis_server, outboxd_redis):
    from shop.models import Shipment
    from shop.services import pay_order

    (example,) = [b for b in blocks() if "RedisStreamsConsumer(" in b]
    group = f"docs-{uuid.uuid4().hex[:6]}"
    example = example.replace('"shipping"', f'"{group}"')
    redis_server.client.xgroup_create("outbox.order", group, id="$", mkstream=True)
    order = __import__("shop.models", fromlist=["Order"]).Order.objects.create(
        customer="docs", amount="3.00"
    )
    ns = namespace(pg, REDIS_URL=redis_server.url)

    def stop_when_shipped():
        eventually("the docs consumer's shipment",
                   lambda: Shipment.objects.filter(order_id=order.id).exists())
        eventually("the docs consumer", lambda: "consumer" in ns)
        ns["consumer"].stop()

    pay_order(order.id)
    watcher = threading.Thread(target=stop_when_shipped)
    watcher.start()
    try:
        exec(example, ns)  # returns once stopped
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher.join(5)
    assert Shipment.objects.filter(order_id=order.id).count() == 1


def test_the_readme_example_runs(pg):
    from shop.models import Order

    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    order = Order.objects.create(customer="readme", amount="7.25")
    exec(example, {"order": order})
    order.refresh_from_db()
    assert order.status == "paid"
    with pg.connect("shop") as conn:
        payload = conn.execute(
            "SELECT payload FROM outbox WHERE aggregate_id = %s AND event_type = 'order.paid'",
            (str(order.id),),
        ).fetchone()[0]
    assert payload == {"order_id": order.id, "amount": "7.25"}
