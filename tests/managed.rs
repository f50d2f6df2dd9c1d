//! Postgres as managed services run it: no superuser for the application's admin, and
//! logical decoding behind a provider's own setting.
//!
//! - An admin with CREATEROLE that owns the database and the outbox table (as the admin users
//!   of Cloud SQL, Azure, RDS and Supabase are) applies sql/outbox.sql, sql/state.sql and sql/role.sql; on
//!   PostgreSQL 16+ it may give REPLICATION itself (when it has it), before 16 the script
//!   stops and says who can, the provider's superuser runs the hint's statement on the role
//!   the script already made, and the script runs again. Then `setup`,
//!   `check` and `run` work as the forwarding role, through a kill -9.
//! - With logical decoding off, `setup` and `check` name the provider's setting, recognised
//!   by the settings and roles each provider adds (made here as placeholders).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::Duration;

use support::*;

const ADMIN_PASSWORD: &str = "admin-pw";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_that_is_not_a_superuser_sets_up_and_outboxd_forwards_as_its_role() {
    let pg = Postgres::start();
    let version = pg.version_num().await;
    let superuser = pg.connect("postgres").await;
    // As a provider sets up its admin user: CREATEROLE, CREATEDB, and on 16+ REPLICATION
    // (Cloud SQL's and Azure's admins may replicate), never SUPERUSER.
    let replication = if version >= 160_000 {
        "REPLICATION"
    } else {
        ""
    };
    superuser
        .batch_execute(&format!(
            "CREATE ROLE app_admin LOGIN CREATEROLE CREATEDB {replication} PASSWORD '{ADMIN_PASSWORD}'"
        ))
        .await
        .unwrap();
    let admin = pg.connect_as("app_admin", ADMIN_PASSWORD, "postgres").await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let admin = pg.connect_as("app_admin", ADMIN_PASSWORD, "app").await;
    admin
        .batch_execute(&sql_file("outbox.sql"))
        .await
        .expect("sql/outbox.sql as the admin");
    admin
        .batch_execute(&sql_file("state.sql"))
        .await
        .expect("sql/state.sql as the admin");

    let role_sql = || pg.psql_file("app_admin", ADMIN_PASSWORD, "app", "role.sql");
    if version < 160_000 {
        // Before 16 only a superuser may give REPLICATION: the script stops at that step and
        // names the remedy...
        let out = role_sql();
        let text = output_text(&out);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("may not give role outboxd the REPLICATION attribute"),
            "{text}"
        );
        assert!(
            text.contains("HINT:") && text.contains("ALTER ROLE outboxd WITH REPLICATION"),
            "{text}"
        );
        // ...with the role already made, so the remedy applies as written: the admin sets
        // the password (only a superuser may alter a replication role before 16), the
        // provider's superuser runs exactly the hint's statement, and the admin runs the
        // script again.
        admin
            .batch_execute(&format!("ALTER ROLE outboxd PASSWORD '{OUTBOXD_PASSWORD}'"))
            .await
            .unwrap();
        superuser
            .batch_execute("ALTER ROLE outboxd WITH REPLICATION")
            .await
            .expect("the hint's statement, on the role the script's first step made");
    }
    let out = role_sql();
    assert!(
        out.status.success(),
        "sql/role.sql as the admin: {}",
        output_text(&out)
    );
    if version >= 160_000 {
        admin
            .batch_execute(&format!("ALTER ROLE outboxd PASSWORD '{OUTBOXD_PASSWORD}'"))
            .await
            .unwrap();
    }
    let rights = superuser
        .query_one(
            "SELECT rolsuper, rolreplication, rolcanlogin FROM pg_roles WHERE rolname = 'outboxd'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (rights.get::<_, bool>(0), rights.get(1), rights.get(2)),
        (false, true, true)
    );

    let env = Env::without_schema(pg, Redis::start(), "");
    env.setup();
    let out = env.command(&["check"]);
    assert!(out.status.success(), "{}", output_text(&out));

    let mut outboxd = env.run();
    for t in 0..20 {
        emit_txn(&admin, t * 100, 100, 13).await;
        if t == 10 {
            outboxd.kill9();
            outboxd = env.run();
        }
    }
    let redis = env.redis.connect().await;
    let entries = wait_stream_len(&redis, "outbox.order", 2000, Duration::from_secs(60)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..2000);
    println!(
        "PostgreSQL {version}: admin without superuser, outboxd as its role: 2,000 events \
         through a kill -9, {duplicates} duplicates"
    );
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}

/// Each provider, the placeholder setting or role that marks it, and the words its hint
/// must contain.
const PROVIDERS: &[(&str, &str, &str, &str)] = &[
    (
        "Amazon RDS / Aurora",
        "rds.logical_replication = 0",
        "",
        "set rds.logical_replication = 1",
    ),
    (
        "Google Cloud SQL",
        "cloudsql.logical_decoding = off",
        "",
        "cloudsql.logical_decoding = on",
    ),
    (
        "Azure Database for PostgreSQL",
        "",
        "azure_pg_admin",
        "az postgres flexible-server parameter set --name wal_level --value logical",
    ),
    (
        "Neon",
        "",
        "neon_superuser",
        "turn on logical replication in the project's settings",
    ),
    ("Supabase", "", "supabase_admin", "not to the pooler"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_logical_decoding_off_setup_and_check_name_the_providers_setting() {
    for (name, setting, role, hint) in PROVIDERS {
        let mut conf = vec!["wal_level = replica"];
        if !setting.is_empty() {
            conf.push(setting);
        }
        let env = Env::new(Postgres::start_with(&conf), "").await;
        if !role.is_empty() {
            let db = env.db().await;
            db.batch_execute(&format!("CREATE ROLE {role} NOLOGIN"))
                .await
                .unwrap();
        }
        let out = env.command(&["setup"]);
        let text = output_text(&out);
        assert!(!out.status.success(), "{name}: {text}");
        assert_eq!(text.lines().count(), 1, "{name}: one line: {text}");
        assert!(
            text.contains(&format!("on {name}, ")) && text.contains(hint),
            "{name}: {text}"
        );
        let out = env.command(&["check"]);
        let report = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{report}");
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("FAIL  wal_level") && l.contains(hint)),
            "{name}: {report}"
        );
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ok    postgres") && l.contains(&format!("on {name}"))),
            "{name}: {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_gets_the_providers_grant() {
    // Azure: its admin gives REPLICATION with ALTER ROLE.
    let env = Env::new(Postgres::start(), "").await;
    let db = env.db().await;
    db.batch_execute("CREATE ROLE azure_pg_admin NOLOGIN; ALTER ROLE outboxd NOREPLICATION")
        .await
        .unwrap();
    let out = env.command(&["setup"]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "role \"outboxd\" may not stream replication: on Azure Database for PostgreSQL, \
             ALTER ROLE outboxd WITH REPLICATION, as the admin user (an azure_pg_admin member)"
        ),
        "{text}"
    );

    // RDS: the script grants rds_replication, and outboxd counts that role as the right.
    let pg = Postgres::start_with(&["wal_level = logical", "rds.logical_replication = 1"]);
    let admin = pg.connect("postgres").await;
    admin
        .batch_execute("CREATE ROLE rds_replication NOLOGIN")
        .await
        .unwrap();
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = pg.connect("app").await;
    app.batch_execute(&sql_file("outbox.sql")).await.unwrap();
    app.batch_execute(&sql_file("state.sql")).await.unwrap();
    app.batch_execute(&sql_file("role.sql")).await.unwrap();
    let row = app
        .query_one(
            "SELECT pg_has_role('outboxd', 'rds_replication', 'MEMBER'), \
                    rolreplication FROM pg_roles WHERE rolname = 'outboxd'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, bool>(0), row.get::<_, bool>(1)),
        (true, false)
    );
}
