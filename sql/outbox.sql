-- The outbox table, its publication, and outbox_emit().
--
-- Apply once per database, as the owner of the schema (psql -f sql/outbox.sql). Idempotent.
-- Requires PostgreSQL 14 or newer (gen_random_uuid() is built in since 13).

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

-- Emit an event inside the caller's transaction; returns its id.
--
--   BEGIN;
--   UPDATE orders SET status = 'paid' WHERE id = 123;
--   SELECT outbox_emit('order', '123', 'order.paid', '{"amount": 42}',
--                      '{"traceparent": "00-..."}');
--   COMMIT;
CREATE OR REPLACE FUNCTION public.outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE sql
VOLATILE
AS $$
    INSERT INTO public.outbox (aggregate_type, aggregate_id, event_type, payload, headers)
    VALUES (aggregate_type, aggregate_id, event_type, payload, COALESCE(headers, '{}'))
    RETURNING id
$$;
