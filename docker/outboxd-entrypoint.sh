#!/bin/sh
# The container's entrypoint: `outboxd setup` (idempotent: creates the publication and the
# slot when missing), retried while Postgres is still starting, then `outboxd run`.
# Configuration comes from OUTBOXD_* environment variables (or /outboxd.toml via
# OUTBOXD_CONFIG).
set -eu

attempt=1
until outboxd setup; do
    if [ "$attempt" -ge 30 ]; then
        echo "outboxd-entrypoint: outboxd setup failed $attempt times; giving up" >&2
        exit 1
    fi
    attempt=$((attempt + 1))
    sleep 2
done
exec outboxd run
