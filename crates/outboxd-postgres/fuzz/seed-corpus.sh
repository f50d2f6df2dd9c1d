#!/usr/bin/env bash
# Writes the seed corpus of the `pgoutput` target from a real Postgres: every pgoutput message
# (protocol version 1, logical decoding messages on) that a throwaway cluster's slot gives for
# outbox rows, another table's rows, an update, a delete, a truncate, a custom type, and
# outboxd's three kinds of logical decoding message. One file per message, named by its
# kind and position. The cluster is stopped and removed at the end.
#
#   crates/outboxd-postgres/fuzz/seed-corpus.sh [PG_BIN]   (default: the newest system one)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
bin="${1:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}"
dir="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    as_pg=(runuser -u postgres --)
fi
cleanup() {
    "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres >/dev/null 2>&1
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-c wal_level=logical -c port=$port -c listen_addresses='' -k $dir" start >/dev/null
psql=("$bin/psql" -h "$dir" -p "$port" -U postgres -X -q -v ON_ERROR_STOP=1 -d postgres)
"${psql[@]}" -f "$root/sql/outbox.sql" >/dev/null 2>&1
"${psql[@]}" >/dev/null <<'SQL'
CREATE TYPE mood AS ENUM ('ok', 'sad');
CREATE TABLE other (id int PRIMARY KEY, note text, m mood);
CREATE PUBLICATION seeds FOR TABLE public.outbox, other;
SELECT pg_create_logical_replication_slot('seeds', 'pgoutput');
SELECT outbox_emit('order', 'k1', 'order.created', '{"seq": 1}', '{"source": "seed"}');
BEGIN;
SELECT outbox_emit('order', 'k' || g, 'order.paid', jsonb_build_object('seq', g, 'x', repeat('é', g)))
FROM generate_series(2, 4) AS g;
INSERT INTO other VALUES (1, NULL, 'ok');
COMMIT;
UPDATE other SET note = 'changed' WHERE id = 1;
DELETE FROM other WHERE id = 1;
TRUNCATE other;
SELECT pg_logical_emit_message(true, 'outboxd', '{"id":"e1","aggregate_type":"order","aggregate_id":"7","event_type":"order.paid","payload":"{}","headers":"{}","created_at":"2026-12-02 10:00:00+00"}');
SELECT pg_logical_emit_message(true, 'outboxd.backfill', '{"row":{"id":"1","payload":{"a":[1,2]},"published_at":null}}');
SELECT pg_logical_emit_message(true, 'outboxd.replay', '{"row":{"id":"2"},"topic":"replays"}');
SELECT pg_logical_emit_message(false, 'someone-else', 'not ours');
ALTER TABLE public.outbox ADD COLUMN extra bytea;
SELECT outbox_emit('order', 'k9', 'order.created', '{"seq": 9}');
SQL
rm -f "$here/corpus/pgoutput/"real-*
mkdir -p "$here/corpus/pgoutput"
"${psql[@]}" -At -F ' ' -c "SELECT lsn, encode(data, 'hex') FROM pg_logical_slot_get_binary_changes('seeds', NULL, NULL, 'proto_version', '1', 'publication_names', 'seeds', 'messages', 'true')" |
    python3 -c '
import sys
out = sys.argv[1]
for n, line in enumerate(sys.stdin):
    lsn, data = line.split()
    raw = bytes.fromhex(data)
    kind = chr(raw[0])
    with open(f"{out}/real-{n:03d}-{kind}-{lsn.replace(chr(47), chr(95))}", "wb") as f:
        f.write(raw)
' "$here/corpus/pgoutput"
echo "wrote $(ls "$here/corpus/pgoutput" | grep -c '^real-') seed messages to $here/corpus/pgoutput" >&2
