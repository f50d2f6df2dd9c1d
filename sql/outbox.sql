-- The outbox table, its publication, and outbox_emit().
--
-- Apply once per database, as the owner of the schema, then sql/state.sql (outboxd's own
-- state) and sql/role.sql (the outboxd role):
--   psql "$ADMIN_URL" -f sql/outbox.sql -f sql/state.sql -f sql/role.sql
-- Idempotent. Requires PostgreSQL 14 or newer (gen_random_uuid() is built in since 13).

CREATE TABLE IF NOT EXISTS public.outbox (
    -- Stable event id: the consumers' idempotency key.
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- What the event is about, e.g. 'order'; routes to a topic.
    aggregate_type text        NOT NULL,
    -- Which one, e.g. '123'; the key: events of one key stay ordered.
    aggregate_id   text        NOT NULL,
    -- Past-tense fact, e.g. 'order.paid'.
    event_type     text        NOT NULL,
    -- The event body, forwarded as is.
    payload        jsonb       NOT NULL,
    -- String map: traceparent, correlation_id, schema_version, ...
    headers        jsonb       NOT NULL DEFAULT '{}'
                               CONSTRAINT outbox_headers_is_object CHECK (jsonb_typeof(headers) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE public.outbox IS
    'Transactional outbox: rows are forwarded to the broker by outboxd from the WAL. '
    'Rows may be deleted any time after commit (the WAL keeps the insert).';

-- outboxd streams inserts only: updates and deletes of outbox rows (cleanup) are not events.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outboxd') THEN
        CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');
    END IF;
END
$$;

-- Pruning (`[postgres] prune_after`, `outboxd prune`) and backfills read by creation time.
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON public.outbox (created_at);

-- Emit an event inside the caller's transaction; returns its id.
--
--   BEGIN;
--   UPDATE orders SET status = 'paid' WHERE id = 123;
--   SELECT outbox_emit('order', '123', 'order.paid', '{"amount": 42}',
--                      '{"traceparent": "00-..."}');
--   COMMIT;
--
-- keep => false deletes the row again in the same transaction: the table stays empty, the
-- WAL still carries the insert, and outboxd forwards it (the publication publishes inserts
-- only). The event cannot be replayed from the table then.
DROP FUNCTION IF EXISTS public.outbox_emit(text, text, text, jsonb, jsonb);
CREATE OR REPLACE FUNCTION public.outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb   DEFAULT '{}',
    keep           boolean DEFAULT true
) RETURNS uuid
LANGUAGE plpgsql
VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    event_id uuid;
BEGIN
    INSERT INTO public.outbox (aggregate_type, aggregate_id, event_type, payload, headers)
    VALUES (aggregate_type, aggregate_id, event_type, payload, COALESCE(headers, '{}'))
    RETURNING id INTO event_id;
    IF NOT keep THEN
        DELETE FROM public.outbox WHERE id = event_id;
    END IF;
    RETURN event_id;
END
$$;

-- Table-less: emit an event as a transactional logical decoding message (prefix 'outboxd')
-- instead of a row; returns its id. Nothing is written to a table: the event lives only in
-- the WAL, and outboxd forwards it when `[postgres] source = "messages"` (PostgreSQL 14+).
-- Same guarantees as a row: only committed events, in commit order.
--
-- The message is signed with the key of sql/state.sql (outboxd.sign()): outboxd acts only on
-- signed messages, so a role that calls pg_logical_emit_message() itself cannot publish
-- events. The function runs as its owner to sign; like INSERT on the outbox table, calling it
-- is a right to grant:
--   GRANT EXECUTE ON FUNCTION public.outbox_emit_message(text, text, text, jsonb, jsonb) TO app;
CREATE OR REPLACE FUNCTION public.outbox_emit_message(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    event_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(true, 'outboxd', outboxd.sign('outboxd', json_build_object(
        'id', event_id::text,
        'aggregate_type', aggregate_type,
        'aggregate_id', aggregate_id,
        'event_type', event_type,
        'payload', payload::text,
        'headers', COALESCE(headers, '{}')::text,
        'created_at', now()::text
    )::text));
    RETURN event_id;
END
$$;
REVOKE ALL ON FUNCTION public.outbox_emit_message(text, text, text, jsonb, jsonb) FROM PUBLIC;
