#!/usr/bin/env bash
# The soak: outboxd for an hour under mixed load with faults at random moments (SIGKILL, a
# graceful restart, a walsender kill, a Postgres restart, a Redis outage, network cuts), then
# a full audit of the streams against the outbox table (see docs/guarantees.md, "The soak").
# On demand, not in CI.
#
#   scripts/soak.sh                        one hour; the report is printed
#   scripts/soak.sh --minutes 10 --out /tmp/soak.md
#   scripts/soak.sh --help                 every option and its default
#
# Installs what is missing (redis-server, a Postgres server). Exits non-zero when the audit
# finds an event lost, out of order or not committed, or (effectively-once) a duplicate.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_test_tools
PG_SYSTEM="$(system_pg_bin)"
say "cargo bench --bench soak (release build)"
OUTBOXD_TEST_PG_BIN="${OUTBOXD_TEST_PG_BIN:-$PG_SYSTEM}" \
    cargo bench --locked --bench soak -- "$@"
