"""`emit()` with Django, psycopg 3 and SQLAlchemy: inside a transaction it writes the event
with the context's correlation id and trace; outside one it refuses; rolled back, nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import outboxd
from outboxd import OutsideTransaction, correlation_scope, emit, trace_scope

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def outbox_row(pg, event_id):
    with pg.connect("shop") as conn:
        return conn.execute(
            "SELECT aggregate_type, aggregate_id, event_type, payload, headers "
            "FROM outbox WHERE id = %s",
            (event_id,),
        ).fetchone()


def test_the_migration_creates_the_same_outbox_as_sql_outbox_sql():
    packaged = Path(outboxd.__file__).parent / "sql" / "outbox.sql"
    repository = Path(__file__).resolve().parents[2] / "sql" / "outbox.sql"
    assert packaged.read_text() == repository.read_text(), (
        "python/src/outboxd/sql/outbox.sql must be a copy of sql/outbox.sql"
    )


def test_django_emit_inside_atomic_writes_the_event_with_its_context(pg):
    from django.db import transaction

    with transaction.atomic(), correlation_scope("corr-1"), trace_scope(TRACEPARENT, "shop=1"):
        event_id = emit("order", 42, "order.paid", {"amount": 5}, {"schema_version": "2"})
    row = outbox_row(pg, event_id)
    assert row[:4] == ("order", "42", "order.paid", {"amount": 5})
    assert row[4] == {
        "schema_version": "2",
        "correlation_id": "corr-1",
        "traceparent": TRACEPARENT,
        "tracestate": "shop=1",
    }


def test_django_emit_without_context_gets_a_new_correlation_id(pg):
    from django.db import transaction

    with transaction.atomic():
        first = emit("order", 1, "order.paid", {})
        second = emit("order", 1, "order.paid", {})
    h1, h2 = outbox_row(pg, first)[4], outbox_row(pg, second)[4]
    assert h1["correlation_id"] and h2["correlation_id"] and h1 != h2
    assert "traceparent" not in h1


def test_django_emit_outside_atomic_raises_and_writes_nothing(pg):
    with pg.connect("shop") as conn:
        before = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    with pytest.raises(OutsideTransaction, match=r"transaction\.atomic"):
        emit("order", 7, "order.paid", {})
    with pg.connect("shop") as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == before


def test_django_rolled_back_emit_leaves_nothing(pg):
    from django.db import transaction

    ids = []
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            ids.append(emit("order", 8, "order.paid", {}))
            raise RuntimeError("rolled back")
    assert outbox_row(pg, ids[0]) is None


def test_psycopg_emit(pg):
    with pg.connect("shop", autocommit=True) as conn:
        with pytest.raises(OutsideTransaction, match="autocommit"):
            emit("order", 9, "order.paid", {}, connection=conn)
        with conn.transaction():
            event_id = emit("order", 9, "order.paid", {"n": 1}, connection=conn)
    assert outbox_row(pg, event_id)[3] == {"n": 1}
    # Without autocommit every statement is in a transaction: it commits with the others.
    with pg.connect("shop") as conn:
        with conn.cursor() as cur:
            event_id = emit("order", 10, "order.paid", {"n": 2}, connection=cur)
        conn.rollback()
    assert outbox_row(pg, event_id) is None


def test_sqlalchemy_emit(pg):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(pg.url("shop").replace("postgresql://", "postgresql+psycopg://"))
    with Session(engine) as session, session.begin():
        event_id = emit("order", 11, "order.paid", {"n": 3}, connection=session)
    assert outbox_row(pg, event_id)[3] == {"n": 3}
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn:
        with pytest.raises(OutsideTransaction, match="autocommit"):
            emit("order", 12, "order.paid", {}, connection=conn)
    engine.dispose()


def test_payloads_take_uuids_dates_and_decimals(pg):
    import datetime
    import decimal
    import uuid

    from django.db import transaction

    value = {
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "at": datetime.datetime(2026, 12, 6, 5, 0, tzinfo=datetime.timezone.utc),
        "amount": decimal.Decimal("42.50"),
    }
    with transaction.atomic():
        event_id = emit("order", 13, "order.paid", value)
    assert outbox_row(pg, event_id)[3] == {
        "id": "12345678-1234-5678-1234-567812345678",
        "at": "2026-12-06T05:00:00+00:00",
        "amount": "42.50",
    }
    with pytest.raises(TypeError, match="connection"):
        emit("order", 1, "t", {}, connection=object())
    with pytest.raises(TypeError, match="not JSON serializable"):
        with transaction.atomic():
            emit("order", 1, "t", {"x": object()})


def test_emit_takes_the_trace_of_the_current_opentelemetry_span(pg):
    from django.db import transaction
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x00F067AA0BA902B7,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("shop", "2")]),
    )
    # The current span wins over a trace set by a consumer for the event in hand.
    with trace_scope(TRACEPARENT), trace.use_span(NonRecordingSpan(context)):
        with transaction.atomic():
            event_id = emit("order", 14, "order.paid", {})
    headers = outbox_row(pg, event_id)[4]
    assert headers["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    assert headers["tracestate"] == "shop=2"
