"""The outbox (table, outbox_emit(), publication) and the consumers' tables."""

from importlib.resources import files

from django.db import migrations, models

OUTBOX_SQL = files("outboxd").joinpath("sql/outbox.sql").read_text()

REVERSE_SQL = """
DROP PUBLICATION IF EXISTS outboxd;
DROP FUNCTION IF EXISTS public.outbox_emit_message(text, text, text, jsonb, jsonb);
DROP FUNCTION IF EXISTS public.outbox_emit(text, text, text, jsonb, jsonb, boolean);
DROP TABLE IF EXISTS public.outbox;
"""


class Migration(migrations.Migration):
    initial = True
    dependencies = []  # type: ignore[var-annotated]

    operations = [
        migrations.RunSQL(OUTBOX_SQL, REVERSE_SQL),
        migrations.CreateModel(
            name="ProcessedEvent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("consumer", models.CharField(max_length=200)),
                ("event_id", models.CharField(max_length=200)),
                ("processed_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={"db_table": "outboxd_processed_event"},
        ),
        migrations.AddConstraint(
            model_name="processedevent",
            constraint=models.UniqueConstraint(
                fields=("consumer", "event_id"), name="outboxd_processed_once"
            ),
        ),
        migrations.CreateModel(
            name="DeadLetter",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("consumer", models.CharField(max_length=200)),
                ("event_id", models.CharField(max_length=200)),
                ("event_type", models.CharField(blank=True, max_length=200)),
                ("source", models.CharField(help_text="The stream or topic it came from.", max_length=200)),
                ("position", models.CharField(help_text="Entry id, or partition:offset.", max_length=100)),
                ("key", models.CharField(blank=True, max_length=200)),
                ("payload", models.TextField(blank=True)),
                ("headers", models.JSONField(default=dict)),
                ("attempts", models.PositiveIntegerField()),
                ("error", models.TextField()),
                ("failed_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={"db_table": "outboxd_dead_letter", "ordering": ["-failed_at"]},
        ),
    ]
