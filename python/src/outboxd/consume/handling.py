"""Running a handler for one event: once, in a transaction with its dedupe record, with
bounded retries.

    with store.transaction():
        if store.claim(event.id):        # INSERT ... ON CONFLICT DO NOTHING
            handler(event)               # in the same transaction
    # commit: the work and the record together; a repeat of the event is skipped

A handler that raises rolls the transaction back (no record: the event is not done) and is
tried again after a pause that doubles, `max_attempts` times in all; then the event goes to
the dead letter. The handler runs with the event's correlation id and trace as the current
context, so that an `emit()` inside it carries them on.
"""

from __future__ import annotations

import enum
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..context import correlation_scope, trace_scope
from ..event import Event
from .stores import Store

Handler = Callable[[Event], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failing handler is tried, and the pauses between tries."""

    max_attempts: int = 5
    """Tries per delivery before the event goes to the dead letter."""
    backoff_initial: float = 0.2
    """The first pause, in seconds; it doubles after each failure."""
    backoff_max: float = 30.0
    """The longest pause, in seconds."""

    def pause(self, failures: int) -> float:
        """The pause after the `failures`-th failure."""
        return min(self.backoff_max, self.backoff_initial * 2 ** (failures - 1))


class Outcome(enum.Enum):
    """What became of an event."""

    PROCESSED = "processed"
    """The handler ran and its transaction committed."""
    REPEAT = "repeat"
    """Already processed: skipped."""
    FAILED = "failed"
    """Every attempt failed: it goes to the dead letter."""
    STOPPED = "stopped"
    """A stop was requested between attempts: it stays unacknowledged, for a redelivery."""


@dataclass
class Result:
    """An outcome, with the attempts made and the last error."""

    outcome: Outcome
    attempts: int = 0
    error: str = ""


def handle(
    event: Event,
    handler: Handler,
    store: Store,
    policy: RetryPolicy,
    stopping: threading.Event,
    on_failure: Callable[[Event, BaseException], None] | None = None,
) -> Result:
    """Runs `handler` for `event` as the module says."""
    error = ""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            with store.transaction():
                if not store.claim(event.id):
                    return Result(Outcome.REPEAT, attempt)
                with correlation_scope(event.correlation_id or str(uuid.uuid4())), trace_scope(
                    event.traceparent, event.headers.get("tracestate")
                ):
                    handler(event)
            return Result(Outcome.PROCESSED, attempt)
        except Exception as e:  # the handler's, or the database's: both are retried
            error = "".join(traceback.format_exception_only(type(e), e)).strip()
            if on_failure is not None:
                on_failure(event, e)
            if attempt == policy.max_attempts:
                return Result(Outcome.FAILED, attempt, error)
            if stopping.wait(policy.pause(attempt)):
                return Result(Outcome.STOPPED, attempt, error)
    return Result(Outcome.FAILED, policy.max_attempts, error)
