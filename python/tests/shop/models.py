from django.db import models


class Order(models.Model):
    customer = models.CharField(max_length=100)
    amount = models.DecimalField(max_digits=10, decimal_places=2)
    status = models.CharField(max_length=20, default="new")


class Shipment(models.Model):
    """The consumer's side effect: one per paid order, whatever the deliveries."""

    order_id = models.BigIntegerField()
    event_id = models.CharField(max_length=100)
    handled_by = models.CharField(max_length=100, default="")
    sequence = models.BigIntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)
