-- A least-privileged role for outboxd. Idempotent. Run after sql/outbox.sql and sql/state.sql,
-- as the admin role that owns the outbox table: a superuser is not needed. On managed services (RDS, Aurora,
-- Cloud SQL, Azure, Supabase, Neon) see docs/managed-postgres.md for what runs where.
--
-- outboxd needs:
--   LOGIN                   to connect
--   replication rights      to stream the slot (and to create it in `outboxd setup`): the
--                           REPLICATION attribute, or on RDS/Aurora the rds_replication role
--   CONNECT, USAGE          to reach the database and schema
--   SELECT on the table     logical replication requires it
--   schema outboxd          to record its slots, verify and sign its messages, and keep dead
--                           letters too large for the broker (sql/state.sql; step 3)
--   pg_log_standby_snapshot (PostgreSQL 16+, optional) lets an idle outboxd ask for a
--                           running-transactions record, so the slot's restart_lsn and
--                           the WAL Postgres keeps for it follow the confirmed position
--                           within seconds instead of waiting for the next checkpoint
--                           or 15-second standby snapshot
--
-- Who may give REPLICATION: a superuser; on PostgreSQL 16+ an admin with CREATEROLE that has
-- REPLICATION itself; Cloud SQL's cloudsqlsuperuser and Azure's azure_pg_admin members. On
-- RDS/Aurora the script grants rds_replication instead. Where the admin may not, the script
-- stops at that last step and says who can: the role and its other grants are already in
-- place (the first block commits on its own), so the named person runs one ALTER ROLE and the
-- script is run again. A role that already has the right (created by a provider's console, as
-- on Neon) is left as it is.
--
-- The publication is created by sql/outbox.sql (CREATE PUBLICATION needs table ownership).
-- Set the password afterwards:  ALTER ROLE outboxd PASSWORD '...';  (or \password outboxd);
-- where the script stops at step 2, set it before a superuser gives REPLICATION.
-- pg_hba.conf: a logical replication connection matches the database name (not the
-- `replication` keyword), e.g.  hostssl  app  outboxd  10.0.0.0/8  scram-sha-256

-- 1. The role, and what it may read. Committed on its own, so that the step below can stop
--    with a remedy that applies to an existing role.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outboxd') THEN
        CREATE ROLE outboxd WITH LOGIN;
    ELSIF NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'outboxd') THEN
        ALTER ROLE outboxd WITH LOGIN;
    END IF;

    IF NOT has_database_privilege('outboxd', current_database(), 'CONNECT') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO outboxd', current_database());
    END IF;
    IF NOT has_schema_privilege('outboxd', 'public', 'USAGE') THEN
        GRANT USAGE ON SCHEMA public TO outboxd;
    END IF;
    GRANT SELECT ON public.outbox TO outboxd;

    IF current_setting('server_version_num')::int >= 160000
       AND NOT has_function_privilege('outboxd', 'pg_catalog.pg_log_standby_snapshot()', 'EXECUTE') THEN
        BEGIN
            GRANT EXECUTE ON FUNCTION pg_catalog.pg_log_standby_snapshot() TO outboxd;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'skipped GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() TO outboxd '
                '(only a superuser may): outboxd works without it, an idle slot releases WAL at '
                'checkpoints instead of within seconds';
        END;
    END IF;

    -- To name what holds decoding back (an old transaction, the walsender's wait) when a
    -- session stalls or a new slot waits: other roles' sessions are hidden without it.
    IF NOT pg_has_role('outboxd', 'pg_read_all_stats', 'USAGE') THEN
        BEGIN
            GRANT pg_read_all_stats TO outboxd;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'skipped GRANT pg_read_all_stats TO outboxd (this role may not grant '
                'it): outboxd works without it, and names an old transaction or a waiting '
                'walsender by PID only';
        END;
    END IF;
END
$$;

-- 2. Replication rights, the one step an admin that is not a superuser may be refused.
DO $$
BEGIN
    IF (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = 'outboxd') THEN
        NULL; -- already may stream
    ELSIF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication') THEN
        -- Amazon RDS and Aurora: replication rights come from this role.
        GRANT rds_replication TO outboxd;
    ELSE
        BEGIN
            ALTER ROLE outboxd WITH REPLICATION;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'role % may not give role outboxd the REPLICATION attribute', current_user
                USING DETAIL = 'Role outboxd exists with LOGIN and its grants; only the replication right is missing.',
                    HINT = 'Set the password now (\password outboxd: before PostgreSQL 16 only a '
                    'superuser may alter a role that has REPLICATION), then have a superuser run: '
                    'ALTER ROLE outboxd WITH REPLICATION; then run this script again. On PostgreSQL '
                    '16+ an admin with CREATEROLE and REPLICATION may do it; on Cloud SQL run it as a '
                    'cloudsqlsuperuser member, on Azure as the server admin; on Neon create the role '
                    'in the Console; on Supabase before PostgreSQL 17 connect outboxd '
                    'as postgres (docs/managed-postgres.md).';
        END;
    END IF;
END
$$;

-- 3. outboxd's state (schema outboxd, sql/state.sql): the record of its slots, the key that
--    signs its messages (read only: to verify them), dead letters kept whole.
DO $$
BEGIN
    IF to_regnamespace('outboxd') IS NULL THEN
        RAISE EXCEPTION 'schema outboxd does not exist'
            USING HINT = 'Apply sql/state.sql first (psql -f sql/outbox.sql -f sql/state.sql -f sql/role.sql).';
    END IF;
    GRANT USAGE ON SCHEMA outboxd TO outboxd;
    GRANT SELECT, INSERT, UPDATE ON outboxd.slots TO outboxd;
    GRANT SELECT ON outboxd.message_keys TO outboxd;
    GRANT SELECT, INSERT ON outboxd.dead_letters TO outboxd;
    -- outboxd replay and setup --backfill-where sign the rows they write to the WAL.
    GRANT EXECUTE ON FUNCTION outboxd.sign(text, text) TO outboxd;
END
$$;

-- 4. Who may write logical decoding messages. pg_logical_emit_message() is executable by
--    PUBLIC: any role could write messages with outboxd's prefixes. outboxd acts only on
--    messages signed by outboxd.sign(), so that is no way to publish events; revoking it as
--    well keeps the WAL free of them. Only the function's owner (a superuser) may revoke it:
--    elsewhere this step says so and changes nothing (`outboxd check` reports the grant).
--    outboxd (replay, backfill) and the owner of outbox_emit_message() keep it.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.proname = 'pg_logical_emit_message'
               AND p.pronamespace = 'pg_catalog'::regnamespace LOOP
        IF has_function_privilege('public', f, 'EXECUTE') THEN
            IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO outboxd, %I', f, current_user);
                EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
            ELSE
                RAISE NOTICE 'skipped REVOKE EXECUTE ON FUNCTION % FROM PUBLIC (only a superuser may): '
                    'outboxd ignores unsigned messages, so other roles still cannot publish events', f;
            END IF;
        END IF;
    END LOOP;
END
$$;
