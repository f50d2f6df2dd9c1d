"""The consumers' tables."""

from django.db import models


class ProcessedEvent(models.Model):
    """An event a consumer has handled: written in the handler's transaction, so that a
    repeat of the event finds it and is skipped, and a failed handler leaves none."""

    consumer = models.CharField(max_length=200)
    event_id = models.CharField(max_length=200)
    processed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "outboxd_processed_event"
        constraints = [
            models.UniqueConstraint(fields=["consumer", "event_id"], name="outboxd_processed_once")
        ]

    def __str__(self) -> str:
        return f"{self.consumer}: {self.event_id}"


class DeadLetter(models.Model):
    """An event a consumer gave up on after its attempts, with the last error. The event is
    also in the broker's dead-letter stream or topic."""

    consumer = models.CharField(max_length=200)
    event_id = models.CharField(max_length=200)
    event_type = models.CharField(max_length=200, blank=True)
    source = models.CharField(max_length=200, help_text="The stream or topic it came from.")
    position = models.CharField(max_length=100, help_text="Entry id, or partition:offset.")
    key = models.CharField(max_length=200, blank=True)
    payload = models.TextField(blank=True)
    headers = models.JSONField(default=dict)
    attempts = models.PositiveIntegerField()
    error = models.TextField()
    failed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "outboxd_dead_letter"
        ordering = ["-failed_at"]

    def __str__(self) -> str:
        return f"{self.consumer}: {self.event_type} {self.event_id}"
