//! `outboxd check`: a preflight of everything `run` needs, reporting every problem at once.
//!
//! Each check prints one line, `ok`, `warn` or `FAIL`, with what it found or what to do. The
//! command exits 1 when any check fails. Checks that cannot run because an earlier one failed
//! (Postgres unreachable) say so.

use std::fmt::Write as _;
use std::time::Duration;

use outboxd_core::{Lsn, Router, Sink, Template};
use outboxd_postgres::slot;
use outboxd_postgres::state::{self, keys, slots};
use outboxd_postgres::{ConnInfo, catalog, holdups, probe_replication};
use outboxd_sinks::{CheckLevel, Preflight};

use crate::broker::Broker;
use crate::config::{Config, DeliveryMode, SourceKind};
use crate::report::one_line;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth attention.
    Warn,
    /// `run` would fail (or lose the ability to recover).
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How it came out.
    pub status: Status,
    /// What was checked.
    pub subject: &'static str,
    /// What was found, or what to do.
    pub message: String,
}

/// The whole report.
#[derive(Debug, Default)]
pub struct Report {
    /// The findings in order.
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, status: Status, subject: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            status,
            subject,
            message: message.into(),
        });
    }

    /// How many checks failed.
    pub fn failures(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count()
    }

    /// The report as text, one line per finding.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let status = match f.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(out, "{status}  {:<13} {}", f.subject, f.message);
        }
        out
    }
}

/// Runs every check.
pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    report.add(
        Status::Ok,
        "configuration",
        format!(
            "sink {} at {}, slot {:?}, publication {:?}, table {}",
            Broker::name(config),
            Broker::target(config),
            config.postgres.slot,
            config.postgres.publication,
            config.postgres.table
        ),
    );
    let wal = check_postgres(config, &mut report).await;
    check_broker(config, wal, &mut report).await;
    report
}

/// Checks Postgres; returns the server's current WAL position when it could be read.
async fn check_postgres(config: &Config, report: &mut Report) -> Option<Lsn> {
    let conn = match ConnInfo::parse(config.postgres.url.expose()) {
        Ok(c) => c,
        Err(e) => {
            report.add(Status::Fail, "postgres", one_line(&e));
            return None;
        }
    };
    let client = match conn.connect().await {
        Ok(c) => c,
        Err(e) => {
            let err = crate::pipeline::RunError::connect(&conn)(e);
            report.add(Status::Fail, "postgres", one_line(&err));
            report.add(Status::Fail, "slot", "not checked: Postgres is unreachable");
            return None;
        }
    };
    let spec = config.slot_spec();
    let found = match slot::inspect(&client, spec).await {
        Ok(f) => f,
        Err(e) => {
            report.add(Status::Fail, "postgres", one_line(&e));
            return None;
        }
    };
    check_connections(config, &conn, &client, &found, report).await;
    let mut problems = found.problems(spec);
    if found.slot.is_none() {
        // A slot outboxd streamed and lost is a decision, not a missing setup step.
        if let Ok(Err(lost @ slot::SlotError::SlotLost { .. })) = tokio::time::timeout(
            Duration::from_secs(10),
            slot::prepare(&client, spec, slot::Mode::Check),
        )
        .await
        {
            problems.retain(|p| !matches!(p, slot::SlotError::SlotMissing { .. }));
            problems.push(lost);
        }
    }
    for p in &problems {
        report.add(Status::Fail, p.subject(), one_line(p));
    }
    let failed = |subject: &str| problems.iter().any(|p| p.subject() == subject);
    if !failed("wal_level") {
        report.add(Status::Ok, "wal_level", "logical");
    }
    check_source(config, &found, &failed, report);
    check_state(config, &client, &found, report).await;
    if !config.postgres.prune_after.trim().is_empty() {
        check_pruning(config, &client, report).await;
    }
    if let (Some(s), false) = (&found.slot, failed("slot")) {
        check_slot(&client, &conn, s, found.server.version_num, report).await;
    }
    client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .ok()
        .and_then(|row| row.try_get::<_, i64>(0).ok())
        .map(|raw| Lsn::new(raw as u64))
}

/// The server, and how both connections (SQL and replication) are secured.
async fn check_connections(
    config: &Config,
    conn: &ConnInfo,
    client: &tokio_postgres::Client,
    found: &slot::Inspection,
    report: &mut Report,
) {
    let server = &found.server;
    report.add(
        Status::Ok,
        "postgres",
        format!(
            "{conn}: server {}, role {:?}{}",
            server.version_num,
            server.user,
            server
                .provider
                .map_or_else(String::new, |p| format!(", on {}", p.name()))
        ),
    );
    match catalog::tls_state(client).await {
        Ok(state) => {
            let (status, message) = tls_finding(conn, &state);
            report.add(status, "tls", format!("SQL connection: {message}"));
        }
        Err(e) => report.add(
            Status::Warn,
            "tls",
            format!("could not read pg_stat_ssl: {}", one_line(&e)),
        ),
    }
    match probe_replication(conn, &config.postgres.slot, &config.postgres.publication).await {
        Ok(state) => {
            let (status, message) = tls_finding(conn, &state);
            report.add(
                status,
                "replication",
                format!("a replication connection is accepted; {message}"),
            );
        }
        Err(e) => report.add(
            Status::Fail,
            "replication",
            format!(
                "a replication connection (what `run` streams on) is refused: {}",
                one_line(&e)
            ),
        ),
    }
}

/// What the events come from: the table (its columns, the route, the publication) or
/// table-less messages.
fn check_source(
    config: &Config,
    found: &slot::Inspection,
    failed: &dyn Fn(&str) -> bool,
    report: &mut Report,
) {
    let publication = &config.postgres.publication;
    if config.postgres.source == SourceKind::Messages {
        let columns = outboxd_postgres::message::event_columns();
        match Router::bind(&config.route.spec(), &columns) {
            Ok(_) => report.add(
                Status::Ok,
                "route",
                "every routed field is one outbox_emit_message writes",
            ),
            Err(e) => report.add(Status::Fail, "route", one_line(&e)),
        }
        if !failed("publication") {
            report.add(
                Status::Ok,
                "publication",
                format!(
                    "{publication:?} exists (table-less: messages with prefix \"outboxd\" are \
                     streamed)"
                ),
            );
        }
        return;
    }
    let Some(table) = &found.table else {
        return;
    };
    if !failed("table") && !failed("rights") {
        report.add(
            Status::Ok,
            "table",
            format!(
                "{}.{} ({} columns); role may read it and stream replication",
                table.schema,
                table.name,
                table.columns.len()
            ),
        );
    }
    match Router::bind(&config.route.spec(), &table.columns) {
        Ok(_) => report.add(
            Status::Ok,
            "route",
            "every routed column exists in the table",
        ),
        Err(e) => report.add(Status::Fail, "route", one_line(&e)),
    }
    if !failed("publication") {
        report.add(
            Status::Ok,
            "publication",
            format!("{publication:?} publishes inserts of the table"),
        );
    }
}

/// outboxd's state (schema outboxd): the slot's record, the message keys, and who may write
/// logical decoding messages.
async fn check_state(
    config: &Config,
    client: &tokio_postgres::Client,
    found: &slot::Inspection,
    report: &mut Report,
) {
    let table_less = config.postgres.source == SourceKind::Messages;
    let access = match state::access(client).await {
        Ok(a) => a,
        Err(e) => return report.add(Status::Warn, "state", one_line(&e)),
    };
    if !access.present {
        report.add(
            if table_less {
                Status::Fail
            } else {
                Status::Warn
            },
            "state",
            "schema outboxd is missing: outboxd keeps no record of its slot (a lost slot would \
             go unnoticed), cannot verify signed messages (table-less events, replays and \
             backfills are refused) and cannot keep dead letters too large for the broker. As \
             the admin: apply sql/state.sql, then sql/role.sql",
        );
    } else if let Some(denied) = access.denied(&found.server.user) {
        report.add(Status::Warn, "state", one_line(&denied));
    } else {
        report.add(
            Status::Ok,
            "state",
            "schema outboxd: slots are recorded, messages verified, oversized dead letters kept",
        );
    }
    if access.slots && found.slot.is_some() {
        match slots::live(client, &config.postgres.slot).await {
            Ok(Some(r)) => report.add(
                Status::Ok,
                "slot record",
                format!(
                    "recorded {} by {}{}: if the slot is lost, setup refuses to recreate it \
                     silently",
                    r.created_at,
                    r.created_by,
                    r.confirmed
                        .as_ref()
                        .map_or_else(String::new, |(l, at)| format!(", confirmed {l} at {at}"))
                ),
            ),
            Ok(None) => report.add(
                Status::Warn,
                "slot record",
                "the slot is not in outboxd.slots yet (`outboxd setup` or `run` records it): \
                 until then a lost slot would be recreated without notice",
            ),
            Err(e) => report.add(Status::Warn, "slot record", one_line(&e)),
        }
    }
    if access.keys {
        match keys::load(client).await {
            Ok(k) if k.is_empty() => report.add(
                if table_less {
                    Status::Fail
                } else {
                    Status::Warn
                },
                "message key",
                "outboxd.message_keys is empty: no message can be verified; apply sql/state.sql \
                 again (it makes the first key)",
            ),
            Ok(_) => {}
            Err(e) => report.add(Status::Warn, "message key", one_line(&e)),
        }
    }
    check_message_grants(client, table_less, report).await;
}

/// Who may write logical decoding messages: `pg_logical_emit_message()` for PUBLIC (refused
/// by outboxd unless signed, but better revoked), and table-less events for PUBLIC.
async fn check_message_grants(
    client: &tokio_postgres::Client,
    table_less: bool,
    report: &mut Report,
) {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p WHERE p.proname = 'pg_logical_emit_message' \
                              AND p.pronamespace = 'pg_catalog'::regnamespace \
                              AND has_function_privilege('public', p.oid, 'EXECUTE')), \
                    to_regprocedure('public.outbox_emit_message(text, text, text, jsonb, jsonb)') \
                        IS NOT NULL \
                    AND has_function_privilege('public', \
                        'public.outbox_emit_message(text, text, text, jsonb, jsonb)', 'EXECUTE')",
            &[],
        )
        .await;
    let Ok(row) = row else {
        return;
    };
    if row.get::<_, bool>(0) {
        report.add(
            Status::Warn,
            "messages",
            "every role may call pg_logical_emit_message(): outboxd acts only on messages \
             signed with outboxd.message_keys, so no role can publish events that way, but \
             revoke it where you may (a superuser): REVOKE EXECUTE ON FUNCTION \
             pg_logical_emit_message(boolean, text, text) FROM PUBLIC (and its bytea and \
             PostgreSQL 17 variants; sql/role.sql does it when run by a superuser)",
        );
    } else {
        report.add(
            Status::Ok,
            "messages",
            "pg_logical_emit_message() is not executable by PUBLIC",
        );
    }
    if table_less && row.get::<_, bool>(1) {
        report.add(
            Status::Warn,
            "messages",
            "every role may call outbox_emit_message() and so publish table-less events: \
             REVOKE EXECUTE ON FUNCTION public.outbox_emit_message(text, text, text, jsonb, \
             jsonb) FROM PUBLIC, and grant it to the roles that write events (sql/outbox.sql \
             does)",
        );
    }
}

/// `[postgres] prune_after`: the rights and the column pruning needs.
async fn check_pruning(config: &Config, client: &tokio_postgres::Client, report: &mut Report) {
    match crate::prune::prepare(client, config, &config.postgres.prune_after).await {
        Ok(p) => report.add(
            Status::Ok,
            "prune",
            format!(
                "rows of {} older than {} are deleted once the slot has confirmed them",
                p.table.quoted(),
                config.postgres.prune_after
            ),
        ),
        Err(e) => report.add(Status::Fail, "prune", one_line(e.as_ref())),
    }
}

/// The slot's state, its retained WAL, and whether it survives a failover.
async fn check_slot(
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
    s: &catalog::Slot,
    version_num: i32,
    report: &mut Report,
) {
    let lsn = |l: Option<Lsn>| l.map_or_else(|| "-".into(), |l| l.to_string());
    report.add(
        Status::Ok,
        "slot",
        format!(
            "{:?}: {}, confirmed_flush_lsn {}, retained WAL {} bytes, wal_status {}",
            s.name,
            if s.active {
                format!("streamed by pid {}", s.active_pid.unwrap_or_default())
            } else {
                "not streamed now".to_owned()
            },
            lsn(s.confirmed_flush_lsn),
            s.retained_wal_bytes().unwrap_or_default(),
            s.wal_status.as_deref().unwrap_or("-")
        ),
    );
    match s.wal_status.as_deref() {
        Some("extended") => report.add(
            Status::Warn,
            "slot",
            "wal_status is \"extended\": the slot retains more WAL than max_wal_size; is \
             outboxd running and keeping up?",
        ),
        Some("unreserved") => report.add(
            Status::Warn,
            "slot",
            "wal_status is \"unreserved\": the slot will be invalidated at the next checkpoint \
             unless outboxd catches up (max_slot_wal_keep_size)",
        ),
        _ => {}
    }
    match catalog::failover_state(client, &s.name, version_num).await {
        Ok((standbys, Some(false))) if standbys > 0 => report.add(
            Status::Warn,
            "failover",
            format!(
                "{standbys} standby(s) stream from this server but the slot has failover = \
                 false: after a promotion the slot is gone. Set postgres.failover_slot = true and \
                 recreate the slot (PostgreSQL 17+), with sync_replication_slots on the standbys"
            ),
        ),
        Ok((_, Some(true))) => check_standbys(conn, &s.name, report).await,
        Ok((standbys, None)) if standbys > 0 => report.add(
            Status::Warn,
            "failover",
            format!(
                "{standbys} standby(s) stream from this server; before PostgreSQL 17 logical \
                 slots are not synchronised to standbys, so a promotion loses the slot"
            ),
        ),
        _ => {}
    }
    // Here and now: decoding that waits for standby slots sends outboxd nothing.
    if let Ok(Some(h)) = holdups::standby_slots(client).await {
        report.add(Status::Warn, "failover", h.describe());
    }
}

/// A failover slot: whether the other hosts of `postgres.url` hold a synchronised copy that
/// can take over (synced, not temporary), and whether there are other hosts at all.
async fn check_standbys(conn: &ConnInfo, slot: &str, report: &mut Report) {
    let hosts = conn.hosts();
    if hosts.len() < 2 {
        report.add(
            Status::Warn,
            "failover",
            "the slot has failover = true but postgres.url names one host: after a promotion \
             outboxd keeps trying that one. Name the standbys too, with \
             target_session_attrs=read-write (or use a name that follows the primary)",
        );
        return;
    }
    for (i, host) in hosts.iter().enumerate() {
        let Ok(client) = conn.connect_host(i).await else {
            report.add(
                Status::Warn,
                "failover",
                format!("{host}: cannot connect to look at its copy of the slot"),
            );
            continue;
        };
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), \
                        (SELECT synced FROM pg_replication_slots WHERE slot_name = $1), \
                        (SELECT temporary FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await;
        match row.map(|r| {
            (
                r.get::<_, bool>(0),
                r.get::<_, Option<bool>>(1),
                r.get::<_, Option<bool>>(2),
            )
        }) {
            Ok((false, _, _)) => {}
            Ok((true, Some(true), Some(false))) => report.add(
                Status::Ok,
                "failover",
                format!(
                    "{host} (standby) has the slot synchronised: it can take over after a promotion"
                ),
            ),
            Ok((true, Some(_), Some(true))) => report.add(
                Status::Warn,
                "failover",
                format!(
                    "{host} (standby) has only a temporary copy of the slot: it is not ready to \
                     take over yet (it becomes permanent once the standby has caught up with it)"
                ),
            ),
            Ok((true, _, _)) => report.add(
                Status::Warn,
                "failover",
                format!(
                    "{host} (standby) has no synchronised copy of the slot: a promotion would \
                     lose it. On the standby: sync_replication_slots = on, \
                     hot_standby_feedback = on, primary_slot_name, and a dbname in \
                     primary_conninfo; on the primary: synchronized_standby_slots"
                ),
            ),
            Err(e) => report.add(Status::Warn, "failover", format!("{host}: {e}")),
        }
        if let Ok(true) = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
        {
            check_standby_settings(&client, host, report).await;
        }
    }
}

/// A standby's settings that would stall or lose the slot once it is promoted.
async fn check_standby_settings(client: &tokio_postgres::Client, host: &str, report: &mut Report) {
    // Inherited from the primary by pg_basebackup, it names the primary's slot for this very
    // standby: after the promotion logical decoding would wait for it forever.
    match holdups::standby_slots(client).await {
        Ok(Some(holdups::HoldUp::StandbySlots {
            setting, missing, ..
        })) if !missing.is_empty() => report.add(
            Status::Warn,
            "failover",
            format!(
                "{host} (standby) has synchronized_standby_slots = '{setting}', naming {} it \
                 does not have: once promoted it would send outboxd nothing (logical decoding \
                 waits for those slots). On the standby: ALTER SYSTEM SET \
                 synchronized_standby_slots = ''; SELECT pg_reload_conf(); and after a \
                 promotion name the new standbys' slots there",
                missing.join(", ")
            ),
        ),
        Ok(_) => {}
        Err(e) => report.add(Status::Warn, "failover", format!("{host}: {e}")),
    }
    let settings = client
        .query_one(
            "SELECT current_setting('hot_standby_feedback'), \
             coalesce(current_setting('sync_replication_slots', true), 'off'), \
             current_setting('primary_slot_name')",
            &[],
        )
        .await;
    let Ok(row) = settings else { return };
    let (feedback, sync, primary_slot): (String, String, String) =
        (row.get(0), row.get(1), row.get(2));
    let mut fixes = Vec::new();
    if feedback != "on" {
        fixes.push("hot_standby_feedback = on (else the primary may remove rows the synchronised slot still needs, and the slot is invalidated)");
    }
    if sync != "on" {
        fixes.push("sync_replication_slots = on (else the slot is not copied to this standby)");
    }
    if primary_slot.is_empty() {
        fixes.push("primary_slot_name = '<its physical slot on the primary>' (slot synchronisation needs one)");
    }
    if !fixes.is_empty() {
        report.add(
            Status::Warn,
            "failover",
            format!(
                "{host} (standby): set {} (ALTER SYSTEM SET ...; SELECT pg_reload_conf();)",
                fixes.join("; ")
            ),
        );
    }
}

/// How a connection's TLS came out: verified is fine; unencrypted or unverified is fine on
/// this host (loopback) and worth a warning anywhere else.
fn tls_finding(conn: &ConnInfo, state: &catalog::TlsState) -> (Status, String) {
    let tls = conn.tls();
    let local = conn.is_local();
    if !state.ssl {
        let status = if local { Status::Ok } else { Status::Warn };
        return (
            status,
            format!(
                "not encrypted (sslmode={}){}",
                tls.requested,
                if local {
                    ""
                } else {
                    ": passwords and events cross the network in clear; use sslmode=verify-full"
                }
            ),
        );
    }
    let status = if tls.mode.verifies() || local {
        Status::Ok
    } else {
        Status::Warn
    };
    let hint = if tls.mode.verifies() || local {
        ""
    } else {
        "; anyone between here and the server could pose as it: use sslmode=verify-full with sslrootcert"
    };
    (
        status,
        format!(
            "{} ({}), {}{hint}",
            state.version.as_deref().unwrap_or("TLS"),
            state.cipher.as_deref().unwrap_or("-"),
            tls.verification()
        ),
    )
}

async fn check_broker(config: &Config, wal: Option<Lsn>, report: &mut Report) {
    let name = Broker::name(config);
    let target = Broker::target(config);
    if let Err(e) = Broker::check(config) {
        return report.add(Status::Fail, "broker", one_line(&e));
    }
    let mut broker = match Broker::build(config, None) {
        Ok(b) => b,
        Err(e) => return report.add(Status::Fail, "broker", one_line(&e)),
    };
    match tokio::time::timeout(Duration::from_secs(15), broker.ping()).await {
        Ok(Ok(())) => {
            let (level, tls) = Broker::security(config);
            report.add(
                status(level),
                "broker",
                format!("{name} at {target} answers; {tls}"),
            );
            let preflight = Preflight {
                dead_letter: &config.sink.dead_letter,
                effectively_once: config.sink.delivery == DeliveryMode::EffectivelyOnce,
                wal,
                topic_glob: Template::parse(&config.route.topic).ok().map(|t| t.glob()),
            };
            for line in broker.preflight(&config.sink.sections, &preflight).await {
                report.add(status(line.level), line.subject, line.message);
            }
        }
        Ok(Err(e)) if !e.is_transient() => report.add(
            Status::Fail,
            "broker",
            format!("{name} at {target} refused outboxd: {}", one_line(&e)),
        ),
        Ok(Err(e)) => report.add(
            Status::Fail,
            "broker",
            format!(
                "cannot reach {name} at {target}: {}. Check the [sink.{name}] settings and that \
                 the broker is running",
                one_line(&e)
            ),
        ),
        Err(_) => report.add(
            Status::Fail,
            "broker",
            format!("{name} at {target} did not answer within 15 s"),
        ),
    }
}

/// A sink's check level as a report status.
fn status(level: CheckLevel) -> Status {
    match level {
        CheckLevel::Ok => Status::Ok,
        CheckLevel::Warn => Status::Warn,
        CheckLevel::Fail => Status::Fail,
    }
}
