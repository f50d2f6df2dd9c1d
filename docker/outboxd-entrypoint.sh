#!/bin/sh
# The container's entrypoint: `outboxd setup` (idempotent: creates the publication and the
# slot when missing), retried while Postgres is still starting, then `outboxd run`.
# Configuration comes from OUTBOXD_* environment variables (or /outboxd.toml via
# OUTBOXD_CONFIG).
#
# setup exits 3 when it refuses for an operator's decision: the slot outboxd streamed is gone
# (dropped, invalidated, or left on a failed primary), and a new one would skip the events
# committed since. That is not retried: the container stops with setup's message, which names
# the gap and the two ways on (a backfill, or `outboxd setup --new-slot`). Under a restart
# policy it stops again at each start, creating nothing, until someone decides.
set -eu

attempt=1
while true; do
    status=0
    outboxd setup || status=$?
    if [ "$status" -eq 0 ]; then
        break
    fi
    if [ "$status" -eq 3 ] || [ "$status" -eq 2 ]; then
        echo "outboxd-entrypoint: outboxd setup refused (exit $status); not retrying" >&2
        exit "$status"
    fi
    if [ "$attempt" -ge 30 ]; then
        echo "outboxd-entrypoint: outboxd setup failed $attempt times; giving up" >&2
        exit 1
    fi
    attempt=$((attempt + 1))
    sleep 2
done
exec outboxd run
