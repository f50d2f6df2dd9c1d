"""Where a consumer keeps its dedupe records and dead letters: the service's own database.

- `DjangoStore`: Django's database, the tables of the `outboxd.django` app
  (`ProcessedEvent`, `DeadLetter`).
- `PsycopgStore`: a psycopg 3 connection, the same tables (created by the Django migration,
  or by `outboxd/sql/consumer.sql`).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..event import Event

_CLAIM = (
    "INSERT INTO outboxd_processed_event (consumer, event_id, processed_at) "
    "VALUES (%s, %s, now()) ON CONFLICT (consumer, event_id) DO NOTHING"
)
_DEAD_LETTER = (
    "INSERT INTO outboxd_dead_letter (consumer, event_id, event_type, source, position, key, "
    "payload, headers, attempts, error, failed_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, now())"
)


class Store(Protocol):
    """A consumer's database."""

    def transaction(self) -> AbstractContextManager[Any]:
        """A transaction: committed when the block ends normally, rolled back otherwise."""
        ...

    def claim(self, event_id: str) -> bool:
        """Records `event_id` as processed in the current transaction; `False` when it was
        already."""
        ...

    def dead_letter(self, event: Event, attempts: int, error: str) -> None:
        """Records an event given up on, in a transaction of its own."""
        ...


def _dead_letter_params(consumer: str, event: Event, attempts: int, error: str) -> tuple:
    return (
        consumer,
        event.id,
        event.type,
        event.source,
        event.position,
        event.key,
        event.raw_payload.decode("utf-8", "replace"),
        json.dumps(event.headers),
        attempts,
        error,
    )


class DjangoStore:
    """The consumer `name`'s records in Django's database `using`."""

    def __init__(self, name: str, using: str = "default") -> None:
        self.name = name
        self.using = using

    def transaction(self) -> AbstractContextManager[Any]:
        from django.db import transaction

        return transaction.atomic(using=self.using)

    def claim(self, event_id: str) -> bool:
        from django.db import connections

        with connections[self.using].cursor() as cur:
            cur.execute(_CLAIM, (self.name, event_id))
            return cur.rowcount == 1

    def dead_letter(self, event: Event, attempts: int, error: str) -> None:
        from django.db import connections, transaction

        with transaction.atomic(using=self.using), connections[self.using].cursor() as cur:
            cur.execute(_DEAD_LETTER, _dead_letter_params(self.name, event, attempts, error))

    def close(self) -> None:
        """Closes this thread's database connection."""
        from django.db import connections

        connections[self.using].close()


class PsycopgStore:
    """The consumer `name`'s records through a psycopg 3 connection to `conninfo`."""

    def __init__(self, name: str, conninfo: str) -> None:
        import psycopg

        self.name = name
        self.conn = psycopg.connect(conninfo, autocommit=True)

    def transaction(self) -> AbstractContextManager[Any]:
        return self.conn.transaction()

    def claim(self, event_id: str) -> bool:
        return self.conn.execute(_CLAIM, (self.name, event_id)).rowcount == 1

    def dead_letter(self, event: Event, attempts: int, error: str) -> None:
        with self.conn.transaction():
            self.conn.execute(_DEAD_LETTER, _dead_letter_params(self.name, event, attempts, error))

    def close(self) -> None:
        """Closes the connection."""
        self.conn.close()
