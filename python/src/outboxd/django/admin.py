"""The dead letters in Django's admin."""

from django.contrib import admin

from .models import DeadLetter


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    """Read-only: what failed, where it came from, and why."""

    list_display = ("failed_at", "consumer", "event_type", "event_id", "source", "attempts")
    list_filter = ("consumer", "event_type", "source")
    search_fields = ("event_id", "key", "error")
    readonly_fields = [f.name for f in DeadLetter._meta.fields]

    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def]
        return False
