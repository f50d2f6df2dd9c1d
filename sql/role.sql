-- A least-privileged role for outboxd. Idempotent. Run after sql/outbox.sql, as the admin role
-- that owns the outbox table: a superuser is not needed. On managed services (RDS, Aurora,
-- Cloud SQL, Azure, Supabase, Neon) see docs/managed-postgres.md for what runs where.
--
-- outboxd needs:
--   LOGIN                   to connect
--   replication rights      to stream the slot (and to create it in `outboxd setup`): the
--                           REPLICATION attribute, or on RDS/Aurora the rds_replication role
--   CONNECT, USAGE          to reach the database and schema
--   SELECT on the table     logical replication requires it
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
