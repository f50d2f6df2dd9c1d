"""outboxd's own state (schema outboxd: the record of its slots, the key that signs its
messages, dead letters kept whole): the same SQL as the repository's sql/state.sql. The
forwarding role's grants are sql/role.sql, which an admin runs once."""

from importlib.resources import files

from django.db import migrations

STATE_SQL = files("outboxd").joinpath("sql/state.sql").read_text()

REVERSE_SQL = "DROP SCHEMA IF EXISTS outboxd CASCADE;"


class Migration(migrations.Migration):
    dependencies = [("outboxd", "0001_initial")]

    operations = [migrations.RunSQL(STATE_SQL, REVERSE_SQL)]
