"""outboxd's Django app: add `"outboxd.django"` to `INSTALLED_APPS` and run `migrate`.

Its migrations create the outbox table, `outbox_emit()` and the `outboxd` publication (the
same SQL as the repository's sql/outbox.sql), outboxd's own state (schema `outboxd`, as
sql/state.sql), and the consumers' tables: `ProcessedEvent`
(the dedupe record of each handled event) and `DeadLetter` (events a handler failed on too
often), with an admin page for the latter.
"""
