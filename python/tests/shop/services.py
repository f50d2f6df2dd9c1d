"""The seed's flow, as a service writes it with the kit (docs/python.md shows the same)."""

from django.db import transaction

from outboxd import Event, emit

from .models import Order, Shipment


def pay_order(order_id: int) -> None:
    """Marks the order paid and emits `order.paid`, in one transaction."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(id=order_id)
        order.status = "paid"
        order.save()
        emit("order", order.id, "order.paid", {"order_id": order.id, "amount": order.amount})


def pay_order_and_fail(order_id: int) -> None:
    """Like `pay_order`, but something after the emit fails: nothing is paid, nothing emitted."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(id=order_id)
        order.status = "paid"
        order.save()
        emit("order", order.id, "order.paid", {"order_id": order.id, "amount": order.amount})
        raise RuntimeError("the card was declined after all")


def ship(event: Event) -> None:
    """The handler: one shipment per paid order, and an `order.shipped` event, which
    carries the paid event's correlation id and trace on."""
    if event.type != "order.paid":
        return
    order_id = int(event.payload["order_id"])
    Shipment.objects.create(
        order_id=order_id, event_id=event.id, sequence=int(event.payload.get("seq", 0))
    )
    emit("order", order_id, "order.shipped", {"order_id": order_id})
