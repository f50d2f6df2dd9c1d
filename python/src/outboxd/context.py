"""The context an event carries: its correlation id and its trace.

`emit()` puts these into the event's headers. A consumer sets them from the event it
handles, so that an `emit()` inside the handler carries them on: the correlation id of the
whole chain, and the handler's trace as the parent.

Sources, first found wins:

- correlation id: `correlation_scope()` (a consumer sets it for each handler), else a new
  one per `emit()` call;
- trace: the current OpenTelemetry span when `opentelemetry-api` is installed and a span is
  recording, else `trace_scope()` (a consumer sets it from the event's headers).
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "outboxd_correlation_id", default=None
)
_traceparent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "outboxd_traceparent", default=None
)
_tracestate: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "outboxd_tracestate", default=None
)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def correlation_id() -> str | None:
    """The correlation id of the current context, if one was set."""
    return _correlation_id.get()


def traceparent() -> str | None:
    """The W3C `traceparent` of the current context: OpenTelemetry's current span when
    there is one, else the one `trace_scope()` set."""
    from_otel = _otel_traceparent()
    return from_otel if from_otel is not None else _traceparent.get()


def tracestate() -> str | None:
    """The W3C `tracestate` that goes with `traceparent()`."""
    if _otel_traceparent() is not None:
        return _otel_tracestate()
    return _tracestate.get()


@contextmanager
def correlation_scope(value: str | None) -> Iterator[None]:
    """Runs the block with `value` as the correlation id (`None`: none)."""
    token = _correlation_id.set(value)
    try:
        yield
    finally:
        _correlation_id.reset(token)


@contextmanager
def trace_scope(traceparent: str | None, tracestate: str | None = None) -> Iterator[None]:
    """Runs the block with the given trace context (an invalid `traceparent` is ignored)."""
    valid = traceparent if traceparent and _TRACEPARENT.match(traceparent) else None
    t1 = _traceparent.set(valid)
    t2 = _tracestate.set(tracestate if valid else None)
    try:
        yield
    finally:
        _traceparent.reset(t1)
        _tracestate.reset(t2)


def headers_for_emit(extra: dict[str, str] | None) -> dict[str, str]:
    """The headers `emit()` writes: the caller's, plus the context's correlation id (a new
    one when there is none) and trace, unless the caller set them."""
    headers = dict(extra or {})
    headers.setdefault("correlation_id", correlation_id() or str(uuid.uuid4()))
    parent = traceparent()
    if parent is not None and "traceparent" not in headers:
        headers["traceparent"] = parent
        state = tracestate()
        if state:
            headers.setdefault("tracestate", state)
    return headers


def _otel_span_context():  # type: ignore[no-untyped-def]
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    span = trace.get_current_span()
    ctx = span.get_span_context()
    return ctx if ctx is not None and ctx.is_valid else None


def _otel_traceparent() -> str | None:
    ctx = _otel_span_context()
    if ctx is None:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _otel_tracestate() -> str | None:
    ctx = _otel_span_context()
    if ctx is None or not ctx.trace_state:
        return None
    return ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
