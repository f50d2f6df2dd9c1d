#!/usr/bin/env bash
# Quick start: a local Postgres (wal_level = logical) and Redis, outboxd streaming between
# them, a few sample events emitted in transactions, and the events shown arriving in Redis.
#
#   scripts/quickstart.sh          run the demo, then stop everything it started
#   scripts/quickstart.sh --keep   leave Postgres, Redis and outboxd running (stop: --stop)
#   scripts/quickstart.sh --stop   stop what a --keep run left running
#
# Everything lives in .local/quickstart (Postgres on 127.0.0.1:54329, Redis on 127.0.0.1:63799).
# Installs redis-server, redis-cli, psql and a Postgres server when missing.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

DIR="$LOCAL/quickstart"
PG_PORT="${PG_PORT:-54329}"
REDIS_PORT="${REDIS_PORT:-63799}"
PASSWORD="quickstart-only"

pg_run() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

stop_all() {
    if [ -f "$DIR/outboxd.pid" ]; then
        local pid
        pid="$(cat "$DIR/outboxd.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            say "stopping outboxd (SIGTERM: drain, confirm, exit)"
            kill -TERM "$pid"
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
            tail -n 3 "$DIR/outboxd.log" | sed 's/^/    /'
        fi
        rm -f "$DIR/outboxd.pid"
    fi
    if [ -f "$DIR/redis.pid" ]; then
        kill -TERM "$(cat "$DIR/redis.pid")" 2>/dev/null || true
        rm -f "$DIR/redis.pid"
    fi
    if [ -f "$DIR/pg/postmaster.pid" ]; then
        pg_run "$PG_BIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null || true
    fi
}

ensure_build_deps
ensure_apt redis-server redis-server
ensure_apt redis-tools redis-cli
ensure_apt postgresql-client psql
ensure_postgres_user
PG_BIN="$(system_pg_bin)"

if [ "${1:-}" = "--stop" ]; then
    stop_all
    exit 0
fi

say "building outboxd (release)"
cargo build --release --locked --bin outboxd
OUTBOXD="$ROOT/target/release/outboxd"

mkdir -p "$DIR"
stop_all
if [ "${1:-}" != "--keep" ]; then
    trap stop_all EXIT
fi

if [ ! -f "$DIR/pg/PG_VERSION" ]; then
    say "initialising Postgres in $DIR/pg"
    rm -rf "$DIR/pg"
    mkdir -p "$DIR/pg"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR" "$DIR/pg"
    pg_run "$PG_BIN/initdb" -D "$DIR/pg" -U postgres -E UTF8 --locale=C --auth=trust >/dev/null
    cat >>"$DIR/pg/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
wal_level = logical
max_replication_slots = 4
max_wal_senders = 4
CONF
    cat >"$DIR/pg/pg_hba.conf" <<HBA
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
HBA
fi
[ "$(id -u)" = 0 ] && chown postgres: "$DIR"
say "starting Postgres on 127.0.0.1:$PG_PORT"
pg_run "$PG_BIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg/postgres.log" -w start >/dev/null

say "starting Redis on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log"
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

ADMIN="postgres://postgres@127.0.0.1:$PG_PORT"
say "applying sql/outbox.sql, sql/state.sql and sql/role.sql to database app"
psql -q "$ADMIN/postgres" -tc "SELECT 1 FROM pg_database WHERE datname = 'app'" | grep -q 1 \
    || psql -q "$ADMIN/postgres" -c "CREATE DATABASE app"
psql -q -v ON_ERROR_STOP=1 "$ADMIN/app" -f sql/outbox.sql -f sql/state.sql -f sql/role.sql
psql -q "$ADMIN/app" -c "ALTER ROLE outboxd PASSWORD '$PASSWORD'"

cat >"$DIR/outboxd.toml" <<TOML
[postgres]
url = "postgres://outboxd:$PASSWORD@127.0.0.1:$PG_PORT/app"

[sink.redis]
url = "redis://127.0.0.1:$REDIS_PORT"
TOML

say "outboxd setup"
"$OUTBOXD" setup --config "$DIR/outboxd.toml"

say "outboxd run (log: $DIR/outboxd.log)"
"$OUTBOXD" run --config "$DIR/outboxd.toml" >"$DIR/outboxd.log" 2>&1 &
echo $! >"$DIR/outboxd.pid"

say "emitting sample events, each in a transaction with business data"
psql -q -o /dev/null -v ON_ERROR_STOP=1 "$ADMIN/app" <<'SQL'
CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, status text NOT NULL);
BEGIN;
INSERT INTO orders VALUES ('1001', 'placed') ON CONFLICT (id) DO UPDATE SET status = 'placed';
SELECT outbox_emit('order', '1001', 'order.placed', '{"total": 42.5, "currency": "EUR"}',
                   '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
COMMIT;
BEGIN;
UPDATE orders SET status = 'paid' WHERE id = '1001';
SELECT outbox_emit('order', '1001', 'order.paid', '{"amount": 42.5}');
SELECT outbox_emit('customer', 'c-7', 'customer.loyalty_points_added', '{"points": 42}');
COMMIT;
BEGIN;
SELECT outbox_emit('order', '1002', 'order.placed', '{"total": 7}');
ROLLBACK;  -- rolled back: never forwarded
SQL

for _ in $(seq 100); do
    n="$(redis-cli -p "$REDIS_PORT" XLEN outbox.order)"
    [ "$n" -ge 2 ] && break
    sleep 0.1
done
say "redis-cli XRANGE outbox.order - +"
redis-cli -p "$REDIS_PORT" XRANGE outbox.order - +
say "redis-cli XRANGE outbox.customer - +"
redis-cli -p "$REDIS_PORT" XRANGE outbox.customer - +
sleep 1.5  # one status interval, so the slot shows the confirmed position
say "outboxd slot status"
"$OUTBOXD" slot status --config "$DIR/outboxd.toml"

if [ "${1:-}" = "--keep" ]; then
    cat <<EOF

Everything is still running:
  psql $ADMIN/app -c "SELECT outbox_emit('order', '1003', 'order.placed', '{}')"
  redis-cli -p $REDIS_PORT XRANGE outbox.order - +
  tail -f $DIR/outboxd.log
Stop it all with: scripts/quickstart.sh --stop
EOF
fi
