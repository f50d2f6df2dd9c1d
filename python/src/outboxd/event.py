"""An event as a consumer receives it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One event delivered by outboxd.

    `id` is the outbox row's id: the same on every copy of the event, the key handlers are
    deduplicated on. `payload` is the decoded JSON; `raw_payload` the bytes as delivered.
    """

    id: str
    type: str
    key: str
    payload: Any
    headers: dict[str, str]
    source: str
    """The stream or topic it was read from."""
    position: str
    """Where it was read: the Redis entry id, or `partition:offset` for Kafka."""
    raw_payload: bytes = field(repr=False, default=b"")

    @property
    def correlation_id(self) -> str | None:
        """The correlation id the emitting service put in the headers."""
        return self.headers.get("correlation_id")

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context the emitting service put in the headers."""
        return self.headers.get("traceparent")

    @classmethod
    def from_redis(cls, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> "Event":
        """An entry of outboxd's Redis layout (fields id, type, key, payload, headers)."""
        text = {k.decode(): v for k, v in fields.items()}
        raw = text.get("payload", b"")
        headers_raw = text.get("headers", b"{}") or b"{}"
        headers = {str(k): str(v) for k, v in json.loads(headers_raw).items()}
        return cls(
            id=text.get("id", b"").decode(),
            type=text.get("type", b"").decode(),
            key=text.get("key", b"").decode(),
            payload=json.loads(raw) if raw else None,
            headers=headers,
            source=stream,
            position=entry_id,
            raw_payload=raw,
        )
