-- A least-privileged role for outboxd. Run as a superuser after sql/outbox.sql. Idempotent.
--
-- outboxd needs:
--   LOGIN REPLICATION       to stream the slot (and to create it in `outboxd setup`)
--   CONNECT, USAGE          to reach the database and schema
--   SELECT on the table     logical replication requires it
--   pg_log_standby_snapshot (PostgreSQL 16+, optional) lets an idle outboxd ask for a
--                           running-transactions record, so the slot's restart_lsn and
--                           the WAL Postgres keeps for it follow the confirmed position
--                           within seconds instead of waiting for the next checkpoint
--                           or 15-second standby snapshot
--
-- The publication is created by sql/outbox.sql (CREATE PUBLICATION needs table ownership).
-- Set the password afterwards:  ALTER ROLE outboxd PASSWORD '...';
-- pg_hba.conf: a logical replication connection matches the database name (not the
-- `replication` keyword), e.g.  host  app  outboxd  10.0.0.0/8  scram-sha-256

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outboxd') THEN
        CREATE ROLE outboxd WITH LOGIN REPLICATION;
    ELSE
        ALTER ROLE outboxd WITH LOGIN REPLICATION;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO outboxd', current_database());
    IF current_setting('server_version_num')::int >= 160000 THEN
        GRANT EXECUTE ON FUNCTION pg_catalog.pg_log_standby_snapshot() TO outboxd;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO outboxd;
GRANT SELECT ON public.outbox TO outboxd;
