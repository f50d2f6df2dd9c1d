"""`emit()`: write an event into the outbox, inside the caller's transaction.

The event is a row of the outbox table written through `outbox_emit(...)` (sql/outbox.sql),
so it becomes visible to outboxd when, and only when, the caller's transaction commits. A
rolled-back transaction emits nothing.

`emit()` refuses to run where the row would be committed on its own, apart from the
business data: Django outside `transaction.atomic()`, a psycopg connection in autocommit
mode outside `conn.transaction()`, an SQLAlchemy session or connection whose driver
connection is in autocommit mode.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from typing import Any

from .context import headers_for_emit

_SQL = "SELECT outbox_emit(%s, %s, %s, %s::jsonb, %s::jsonb)"


class OutsideTransaction(RuntimeError):
    """`emit()` was called where its row would be committed alone."""


def emit(
    aggregate_type: str,
    aggregate_id: str | int | uuid.UUID,
    event_type: str,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    connection: Any = None,
) -> uuid.UUID:
    """Writes an event in the current transaction and returns its id.

    `payload` is anything `json.dumps` takes (also UUIDs, datetimes and Decimals).
    `headers` are strings; `correlation_id` and `traceparent` are added from the current
    context (see `outboxd.context`) unless given.

    `connection`: `None` for Django's default database, a Django database alias, a psycopg 3
    connection or cursor, or an SQLAlchemy `Session` or `Connection`.
    """
    params = (
        aggregate_type,
        str(aggregate_id),
        event_type,
        json.dumps(payload, default=_json_default),
        json.dumps(headers_for_emit(headers)),
    )
    if connection is None or isinstance(connection, str):
        return _emit_django(connection or "default", params)
    module = type(connection).__module__
    if module.startswith("sqlalchemy"):
        return _emit_sqlalchemy(connection, params)
    if module.startswith("psycopg"):
        return _emit_psycopg(connection, params)
    raise TypeError(
        f"emit(connection=...) takes a Django database alias, a psycopg 3 connection or "
        f"cursor, or an SQLAlchemy Session or Connection, not {type(connection).__name__}"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _emit_django(alias: str, params: tuple[str, ...]) -> uuid.UUID:
    from django.db import connections

    conn = connections[alias]
    if conn.get_autocommit() and not conn.in_atomic_block:
        raise OutsideTransaction(
            "outboxd.emit() outside a transaction: call it inside `with transaction.atomic():` "
            "(or an ATOMIC_REQUESTS view), with the writes it reports, so that both commit "
            "or neither does"
        )
    with conn.cursor() as cur:
        cur.execute(_SQL, params)
        row = cur.fetchone()
        return _as_uuid(row[0] if row else None)


def _emit_psycopg(conn: Any, params: tuple[str, ...]) -> uuid.UUID:
    import psycopg

    connection = conn.connection if isinstance(conn, psycopg.Cursor) else conn
    idle = connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    if connection.autocommit and idle:
        raise OutsideTransaction(
            "outboxd.emit() outside a transaction: this psycopg connection is in autocommit "
            "mode; call it inside `with conn.transaction():` with the writes it reports"
        )
    row = connection.execute(_SQL, params).fetchone()
    return _as_uuid(row[0] if row else None)


def _emit_sqlalchemy(conn: Any, params: tuple[str, ...]) -> uuid.UUID:
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    sa_conn = conn.connection() if isinstance(conn, Session) else conn
    dbapi = sa_conn.connection.dbapi_connection
    if getattr(dbapi, "autocommit", False) or (
        sa_conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    ):
        raise OutsideTransaction(
            "outboxd.emit() outside a transaction: this SQLAlchemy connection autocommits; "
            "use a Session or `engine.begin()` so that the event commits with your writes"
        )
    statement = text(
        "SELECT outbox_emit(:aggregate_type, :aggregate_id, :event_type, "
        "CAST(:payload AS jsonb), CAST(:headers AS jsonb))"
    )
    keys = ("aggregate_type", "aggregate_id", "event_type", "payload", "headers")
    return _as_uuid(sa_conn.execute(statement, dict(zip(keys, params))).scalar_one())


def _as_uuid(value: Any) -> uuid.UUID:
    if value is None:
        raise RuntimeError("outbox_emit() returned no id: is sql/outbox.sql applied?")
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
