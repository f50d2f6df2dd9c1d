"""The consumers' Prometheus metrics (with `prometheus-client` installed; otherwise none).

| metric | type | labels |
|---|---|---|
| `outboxd_consumer_processed_total` | counter | `source`, `group` (events whose handler committed) |
| `outboxd_consumer_repeats_total` | counter | `source`, `group` (repeats skipped by the dedupe record) |
| `outboxd_consumer_failed_total` | counter | `source`, `group` (handler attempts that raised) |
| `outboxd_consumer_dead_lettered_total` | counter | `source`, `group` (events given up on) |
| `outboxd_consumer_lag` | gauge | `source`, `group` (entries or messages not yet read by the group) |

Serve them with `prometheus_client.start_http_server(port)` in the consumer's process.
"""

from __future__ import annotations

from typing import Any


class _Nothing:
    def labels(self, *args: Any, **kwargs: Any) -> "_Nothing":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass


try:
    from prometheus_client import Counter, Gauge

    _LABELS = ["source", "group"]
    PROCESSED: Any = Counter(
        "outboxd_consumer_processed", "Events whose handler committed.", _LABELS
    )
    REPEATS: Any = Counter(
        "outboxd_consumer_repeats", "Repeated events skipped by the dedupe record.", _LABELS
    )
    FAILED: Any = Counter("outboxd_consumer_failed", "Handler attempts that raised.", _LABELS)
    DEAD_LETTERED: Any = Counter(
        "outboxd_consumer_dead_lettered", "Events given up on after their attempts.", _LABELS
    )
    LAG: Any = Gauge("outboxd_consumer_lag", "Entries or messages the group has not read.", _LABELS)
except ImportError:  # metrics are optional
    PROCESSED = REPEATS = FAILED = DEAD_LETTERED = LAG = _Nothing()
