"""outboxd for Python services: emit events inside your transaction, consume them idempotently.

    from outboxd import emit

    with transaction.atomic():
        order.status = "paid"
        order.save()
        emit("order", order.id, "order.paid", {"amount": str(order.amount)})

See docs/python.md.
"""

from .context import correlation_id, correlation_scope, trace_scope, traceparent
from .emit import OutsideTransaction, emit
from .event import Event

__all__ = [
    "Event",
    "OutsideTransaction",
    "correlation_id",
    "correlation_scope",
    "emit",
    "trace_scope",
    "traceparent",
]
