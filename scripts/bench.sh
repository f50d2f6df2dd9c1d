#!/usr/bin/env bash
# The benchmark: outboxd against pg_recvlogical on the same WAL and against a polling relay,
# in the same run, on throwaway Postgres, Redis and Apache Kafka servers (see docs/benchmarks.md).
#
#   scripts/bench.sh                 the full run; results into docs/benchmarks.{md,json,png}
#   scripts/bench.sh --quick         smaller numbers, results printed only
#   scripts/bench.sh [options]       see: scripts/bench.sh --help
#
# Installs what is missing (redis-server, a Postgres server, Java, Maven and Kafka's jars, matplotlib).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_test_tools
PG_SYSTEM="$(system_pg_bin)"
OUTBOXD_TEST_KAFKA_JARS="$(ensure_kafka)"
export OUTBOXD_TEST_KAFKA_JARS
if ! python3 -c "import matplotlib" 2>/dev/null; then
    say "installing matplotlib (for the chart)"
    python3 -m pip install --quiet matplotlib
fi

args=("$@")
if [ "$#" -eq 0 ]; then
    args=(--out "$ROOT/docs")
fi
say "cargo bench --bench outboxd (release build)"
OUTBOXD_TEST_PG_BIN="${OUTBOXD_TEST_PG_BIN:-$PG_SYSTEM}" \
    cargo bench --locked --bench outboxd -- "${args[@]}"
