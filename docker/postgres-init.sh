#!/bin/sh
# Runs once, when the Postgres container initialises its data directory
# (/docker-entrypoint-initdb.d): the outbox schema and the outboxd role from sql/ (mounted at
# /outboxd-sql), then the role's password from OUTBOXD_PASSWORD.
set -eu

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -f /outboxd-sql/outbox.sql -f /outboxd-sql/state.sql -f /outboxd-sql/role.sql
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v password="$OUTBOXD_PASSWORD" <<'SQL'
ALTER ROLE outboxd PASSWORD :'password';
SQL
