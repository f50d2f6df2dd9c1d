-- outboxd's own state in the database: schema outboxd. Idempotent.
--
-- Apply once per database, as the admin role that owns the outbox (no superuser needed), after
-- sql/outbox.sql and before sql/role.sql (which grants the outboxd role what it uses here):
--
--   psql "$ADMIN_URL" -f sql/outbox.sql -f sql/state.sql -f sql/role.sql
--
-- What it holds, and why it lives beside the data:
--
--   outboxd.slots         every replication slot `outboxd setup` created (or found and adopted),
--                         and the position `outboxd run` last saw it confirm. A slot that is
--                         gone while its record stays means events may be missing: `setup`
--                         then refuses to create a new one silently (docs/operations.md).
--   outboxd.message_keys  the key that signs outboxd's logical decoding messages (table-less
--                         events, backfills, replays). outboxd acts only on messages signed
--                         with it, so a role that may call pg_logical_emit_message() cannot
--                         publish events (docs/guarantees.md, "Who can publish").
--   outboxd.dead_letters  events whose dead letter could not carry the payload (over the
--                         broker's size limit): the whole event is kept here, and `prune`
--                         keeps its outbox row (docs/operations.md, "Dead letters").
--
-- The tables are replicated and backed up with the database, so a promoted standby or a
-- restored backup knows the same slots and keys.

CREATE SCHEMA IF NOT EXISTS outboxd;
REVOKE ALL ON SCHEMA outboxd FROM PUBLIC;
COMMENT ON SCHEMA outboxd IS
    'outboxd''s own state: the slots it created, the key that signs its messages, dead letters '
    'without their payload. See sql/state.sql.';

CREATE TABLE IF NOT EXISTS outboxd.slots (
    -- The replication slot and the publication it streams.
    slot          text        NOT NULL,
    publication   text        NOT NULL,
    -- When and how the record began: 'setup', 'setup --backfill-where', 'setup --new-slot',
    -- or 'adopted' (a slot that existed before outboxd kept records).
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text        NOT NULL,
    -- The slot's confirmed_flush_lsn when the record began.
    created_lsn   pg_lsn,
    -- The newest position `outboxd run` saw the slot confirm after forwarding events, and
    -- when (written at most once a minute).
    confirmed_lsn pg_lsn,
    confirmed_at  timestamptz,
    -- Set when an operator decided about a lost slot (dropped, invalidated, or left on a
    -- failed primary): replaced it with `setup --backfill-where` or `setup --new-slot`.
    retired_at    timestamptz,
    retired_note  text,
    PRIMARY KEY (slot, created_at)
);

CREATE TABLE IF NOT EXISTS outboxd.message_keys (
    -- Signs new messages; the others still verify (key rotation, docs/operations.md).
    active      boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp() PRIMARY KEY,
    -- The HMAC-SHA256 key, and its inner and outer pads (the key XOR 0x36 and XOR 0x5c
    -- bytes), so that SQL can sign with sha256() alone.
    key         bytea       NOT NULL CHECK (length(key) = 64),
    inner_pad   bytea       NOT NULL CHECK (length(inner_pad) = 64),
    outer_pad   bytea       NOT NULL CHECK (length(outer_pad) = 64)
);
CREATE UNIQUE INDEX IF NOT EXISTS message_keys_one_active ON outboxd.message_keys (active)
    WHERE active;

-- A new key (64 random bytes from the server's strong random source, through
-- gen_random_uuid(): 488 random bits), with its pads; not yet active.
CREATE OR REPLACE FUNCTION outboxd.new_message_key() RETURNS timestamptz
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k bytea := decode(replace(gen_random_uuid()::text || gen_random_uuid()::text
                              || gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
                      'hex');
    ipad bytea := k;
    opad bytea := k;
    made timestamptz := clock_timestamp();
BEGIN
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(k, i) # 54);
        opad := set_byte(opad, i, get_byte(k, i) # 92);
    END LOOP;
    INSERT INTO outboxd.message_keys (active, created_at, key, inner_pad, outer_pad)
    VALUES (false, made, k, ipad, opad);
    RETURN made;
END
$$;
REVOKE ALL ON FUNCTION outboxd.new_message_key() FROM PUBLIC;

-- The first key, active.
DO $$
DECLARE
    made timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outboxd.message_keys) THEN
        made := outboxd.new_message_key();
        UPDATE outboxd.message_keys SET active = true WHERE created_at = made;
    END IF;
END
$$;

-- The content of a signed message: 'sig1:' || hex(HMAC-SHA256(key, prefix || 0x00 || body))
-- || E'\n' || body. Only its owner, outbox_emit_message() and the outboxd role (replay,
-- backfill) may call it: whoever may is trusted to publish events.
CREATE OR REPLACE FUNCTION outboxd.sign(prefix text, body text) RETURNS text
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    enc name := current_setting('server_encoding');
    signed text;
BEGIN
    SELECT 'sig1:' || encode(sha256(k.outer_pad || sha256(k.inner_pad || convert_to(prefix, enc)
                                                        || '\x00'::bytea || convert_to(body, enc))),
                             'hex') || E'\n' || body
    INTO signed
    FROM outboxd.message_keys k
    WHERE k.active;
    IF signed IS NULL THEN
        RAISE EXCEPTION 'outboxd.message_keys has no active key: apply sql/state.sql again';
    END IF;
    RETURN signed;
END
$$;
REVOKE ALL ON FUNCTION outboxd.sign(text, text) FROM PUBLIC;

CREATE TABLE IF NOT EXISTS outboxd.dead_letters (
    -- The slot that streamed the event, and the event's WAL position.
    slot           text        NOT NULL,
    commit_lsn     pg_lsn      NOT NULL,
    position_index integer     NOT NULL,
    -- The event as routed.
    event_id       text        NOT NULL,
    topic          text        NOT NULL,
    event_key      bytea       NOT NULL,
    event_type     text        NOT NULL,
    payload        bytea,
    -- The event's headers as a JSON object's text.
    headers        text        NOT NULL,
    -- Why it went to the dead-letter destination.
    reason         text        NOT NULL,
    detail         text        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, commit_lsn, position_index)
);
CREATE INDEX IF NOT EXISTS dead_letters_event_id ON outboxd.dead_letters (event_id);
