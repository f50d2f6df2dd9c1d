"""The handling rules on a plain psycopg store (no Django, no broker): once per event id,
a failure leaves no record and is retried, then given up on; the context is the event's."""

from __future__ import annotations

import threading
from importlib.resources import files

import pytest

from outboxd import Event, correlation_id, traceparent
from outboxd.consume import Outcome, PsycopgStore, RetryPolicy
from outboxd.consume.handling import handle

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def store(pg):
    pg.create_database("plain")
    with pg.connect("plain", autocommit=True) as conn:
        conn.execute(files("outboxd").joinpath("sql/consumer.sql").read_text())
        conn.execute("CREATE TABLE work (event_id text, note text)")
    s = PsycopgStore("billing", pg.url("plain"))
    yield s
    s.close()


def event(event_id: str) -> Event:
    return Event(
        id=event_id, type="order.paid", key="1", payload={"n": 1},
        headers={"correlation_id": "corr-9", "traceparent": TRACEPARENT},
        source="outbox.order", position="1-0", raw_payload=b'{"n": 1}',
    )


def count(store: PsycopgStore, sql: str, *args) -> int:
    return store.conn.execute(sql, args).fetchone()[0]


def test_an_event_is_handled_once_with_its_context(store):
    seen = []

    def handler(e: Event) -> None:
        store.conn.execute("INSERT INTO work VALUES (%s, 'done')", (e.id,))
        seen.append((correlation_id(), traceparent()))

    policy = RetryPolicy(max_attempts=2, backoff_initial=0.01)
    first = handle(event("e1"), handler, store, policy, threading.Event())
    again = handle(event("e1"), handler, store, policy, threading.Event())
    assert (first.outcome, again.outcome) == (Outcome.PROCESSED, Outcome.REPEAT)
    assert seen == [("corr-9", TRACEPARENT)]
    assert count(store, "SELECT count(*) FROM work WHERE event_id = 'e1'") == 1
    assert correlation_id() is None, "the context ends with the handler"


def test_a_failing_handler_leaves_no_record_and_is_given_up_on(store):
    calls = []

    def handler(e: Event) -> None:
        calls.append(e.id)
        store.conn.execute("INSERT INTO work VALUES (%s, 'half done')", (e.id,))
        raise RuntimeError("the warehouse is closed")

    result = handle(event("e2"), handler, store, RetryPolicy(3, 0.01), threading.Event())
    assert result.outcome is Outcome.FAILED and result.attempts == 3
    assert "RuntimeError: the warehouse is closed" in result.error
    assert calls == ["e2"] * 3
    assert count(store, "SELECT count(*) FROM work WHERE event_id = 'e2'") == 0
    assert count(
        store, "SELECT count(*) FROM outboxd_processed_event WHERE event_id = 'e2'"
    ) == 0
    store.dead_letter(event("e2"), result.attempts, result.error)
    assert count(
        store, "SELECT attempts FROM outboxd_dead_letter WHERE event_id = 'e2'"
    ) == 3


def test_a_stop_between_attempts_leaves_the_event_for_a_redelivery(store):
    stopping = threading.Event()

    def handler(e: Event) -> None:
        stopping.set()
        raise RuntimeError("failing while a stop is asked")

    result = handle(event("e3"), handler, store, RetryPolicy(5, 10.0), stopping)
    assert result.outcome is Outcome.STOPPED and result.attempts == 1
