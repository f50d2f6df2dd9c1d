"""The app's configuration."""

from django.apps import AppConfig


class OutboxdConfig(AppConfig):
    """`outboxd.django`, with the label `outboxd` (tables `outboxd_*`)."""

    name = "outboxd.django"
    label = "outboxd"
    verbose_name = "outboxd"
    default_auto_field = "django.db.models.BigAutoField"
