"""What every consumer shares: the handler, the store, the retry policy, the stop signal,
and what to do with each outcome."""

from __future__ import annotations

import logging
import signal
import threading

from ..event import Event
from . import metrics
from .handling import Handler, Outcome, Result, RetryPolicy, handle
from .stores import Store

log = logging.getLogger("outboxd.consume")


class Worker:
    """A consumer loop's common parts. Subclasses read the broker and acknowledge."""

    def __init__(
        self, handler: Handler, store: Store, group: str, policy: RetryPolicy | None = None
    ) -> None:
        self.handler = handler
        self.store = store
        self.group = group
        self.policy = policy or RetryPolicy()
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Asks the loop to stop after the event in hand (callable from any thread)."""
        self.stopping.set()

    def stop_on_signals(self) -> None:
        """SIGTERM and SIGINT stop the loop gracefully (call from the main thread)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def process(self, event: Event) -> Result:
        """Runs the handler for `event`; counts and logs the outcome. A `FAILED` event is in
        the store's dead letters when this returns (the subclass writes the broker's)."""
        labels = (event.source, self.group)

        def failed(e: Event, error: BaseException) -> None:
            metrics.FAILED.labels(*labels).inc()
            log.warning("handler failed for %s %s: %s", e.type, e.id, error)

        result = handle(event, self.handler, self.store, self.policy, self.stopping, failed)
        if result.outcome is Outcome.PROCESSED:
            metrics.PROCESSED.labels(*labels).inc()
        elif result.outcome is Outcome.REPEAT:
            metrics.REPEATS.labels(*labels).inc()
            log.info("skipped %s %s: already processed", event.type, event.id)
        elif result.outcome is Outcome.FAILED:
            self.store.dead_letter(event, result.attempts, result.error)
            metrics.DEAD_LETTERED.labels(*labels).inc()
            log.error(
                "gave up on %s %s after %d attempts: %s",
                event.type,
                event.id,
                result.attempts,
                result.error,
            )
        return result
