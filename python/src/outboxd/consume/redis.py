"""A Redis Streams consumer: a consumer group, handlers run once per event, stuck entries
claimed, failures retried and then dead-lettered.

Each loop:

1. entries of this group idle for longer than `claim_idle_ms` (their consumer died or hangs)
   are claimed with `XAUTOCLAIM`; an entry already delivered more than `max_attempts` times
   (a handler that kills its process) goes straight to the dead letter;
2. new entries are read with `XREADGROUP ... >` (at start, this consumer's own pending
   entries first, from `0`);
3. each is handled (see `handling`), then acknowledged (`XACK`): after its transaction
   committed, after it was found already processed, or after it was written to the dead
   letter stream `<stream><dead_letter_suffix>` with the error and the attempts.

A crash anywhere leaves the entry pending: it is handled again (by this consumer on restart,
or by another after `claim_idle_ms`), and the dedupe record makes a repeat of a committed
handler a no-op. Per-key order is not kept across the consumers of a group (Redis hands each
entry to whichever asks first): run one consumer per stream when order matters, or use Kafka.
"""

from __future__ import annotations

import time
from typing import Any

from ..event import Event
from . import metrics
from .handling import Handler, Outcome, RetryPolicy
from .stores import Store
from .worker import Worker, log


class RedisStreamsConsumer(Worker):
    """Consumes `streams` as consumer `name` of `group`."""

    def __init__(
        self,
        client: Any,
        streams: list[str],
        group: str,
        name: str,
        handler: Handler,
        store: Store,
        policy: RetryPolicy | None = None,
        *,
        claim_idle_ms: int = 60_000,
        count: int = 10,
        block_ms: int = 1_000,
        dead_letter_suffix: str = ".dlq",
    ) -> None:
        super().__init__(handler, store, group, policy)
        self.client = client
        self.streams = list(streams)
        self.name = name
        self.claim_idle_ms = claim_idle_ms
        self.count = count
        self.block_ms = block_ms
        self.dead_letter_suffix = dead_letter_suffix
        self._lag_at = 0.0

    def run(self) -> None:
        """Consumes until `stop()` (or SIGTERM with `stop_on_signals()`)."""
        self._create_groups()
        self._read({s: "0" for s in self.streams}, block=None)
        while not self.stopping.is_set():
            self._claim_stuck()
            if self.stopping.is_set():
                break
            self._read({s: ">" for s in self.streams}, block=self.block_ms)
            self._report_lag()
        log.info("consumer %s of %s stopped", self.name, self.group)

    def _create_groups(self) -> None:
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except Exception as e:  # BUSYGROUP: it exists
                if "BUSYGROUP" not in str(e):
                    raise

    def _read(self, ids: dict[str, str], block: int | None) -> None:
        reply = self.client.xreadgroup(self.group, self.name, ids, count=self.count, block=block)
        for stream, entries in reply or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            # Entries read are delivered to this consumer: all of them are handled, also
            # after a stop was asked (a failing one is then left pending, not retried).
            for entry_id, fields in entries:
                if fields:  # a pending entry trimmed away meanwhile has none
                    self._handle_entry(stream, _text(entry_id), fields)

    def _claim_stuck(self) -> None:
        for stream in self.streams:
            reply = self.client.xautoclaim(
                stream, self.group, self.name, self.claim_idle_ms, "0-0", count=self.count
            )
            for entry_id, fields in reply[1]:
                if not fields:
                    continue
                entry_id = _text(entry_id)
                delivered = self._deliveries(stream, entry_id)
                if delivered > self.policy.max_attempts:
                    event = _event(stream, entry_id, fields)
                    error = (
                        f"delivered {delivered} times without being acknowledged: its "
                        "consumers died or hung while handling it"
                    )
                    self.store.dead_letter(event, delivered, error)
                    metrics.DEAD_LETTERED.labels(stream, self.group).inc()
                    self._dead_letter(stream, entry_id, fields, delivered, error)
                    continue
                log.info("claimed %s %s, idle since a consumer stopped", stream, entry_id)
                self._handle_entry(stream, entry_id, fields)

    def _deliveries(self, stream: str, entry_id: str) -> int:
        pending = self.client.xpending_range(stream, self.group, entry_id, entry_id, 1)
        return int(pending[0]["times_delivered"]) if pending else 1

    def _handle_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            event = Event.from_redis(stream, entry_id, fields)
        except (ValueError, AttributeError) as e:
            # Not an outboxd entry (or a broken one): no handler can take it.
            event = _event(stream, entry_id, fields)
            error = f"not an outboxd event: {e}"
            self.store.dead_letter(event, 0, error)
            metrics.DEAD_LETTERED.labels(stream, self.group).inc()
            self._dead_letter(stream, entry_id, fields, 0, error)
            return
        result = self.process(event)
        if result.outcome is Outcome.STOPPED:
            return
        if result.outcome is Outcome.FAILED:
            self._dead_letter(stream, entry_id, fields, result.attempts, result.error)
            return
        self.client.xack(stream, self.group, entry_id)

    def _dead_letter(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes], attempts: int, error: str
    ) -> None:
        """Copies the entry to the dead-letter stream with why, then acknowledges it."""
        letter: dict[Any, Any] = dict(fields)
        letter.update(
            {
                "error": error,
                "attempts": str(attempts),
                "source_stream": stream,
                "source_id": entry_id,
                "group": self.group,
                "consumer": self.name,
            }
        )
        self.client.xadd(stream + self.dead_letter_suffix, letter)
        self.client.xack(stream, self.group, entry_id)

    def _report_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_at < 5:
            return
        self._lag_at = now
        for stream in self.streams:
            for info in self.client.xinfo_groups(stream):
                name = _text(info.get("name", b""))
                lag = info.get("lag")
                if name == self.group and lag is not None:
                    metrics.LAG.labels(stream, self.group).set(int(lag))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event(stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Event:
    """What can be read of an entry that is not a valid outboxd event."""
    get = lambda name: _text(fields.get(name.encode(), b""))  # noqa: E731
    return Event(
        id=get("id") or f"{stream}/{entry_id}",
        type=get("type"),
        key=get("key"),
        payload=None,
        headers={},
        source=stream,
        position=entry_id,
        raw_payload=fields.get(b"payload", b""),
    )
