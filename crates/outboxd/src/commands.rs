//! The entry points of each command. `main` only parses the command line and calls these.
//! `outboxd slot ...` lives in `commands/slot_command.rs`.

mod slot_command;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use std::io::IsTerminal;

use outboxd_postgres::backfill::{self, RowSelection, Step};
use outboxd_postgres::catalog;
use outboxd_postgres::slot::{self, Creation, Mode, SlotError};
use outboxd_postgres::state::{self, slots};
use outboxd_postgres::{ConnInfo, conninfo::ConnInfoError};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::cli::{PruneArgs, ReplayArgs, SetupArgs, SlotCommand};
use crate::config::{Config, SourceKind};
use crate::failpoint;
use crate::metrics::Metrics;
use crate::pipeline::{self, RunError, RunSettings};
use crate::status::Status;
use crate::tasks::Tasks;
use crate::{http, otel, progress, prune};
use outboxd_core::Sink;

/// Loads the configuration: `path` when given (it must exist), else `./outboxd.toml` if
/// present; then the environment.
pub fn load_config(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    let (path, required) = match path {
        Some(p) => (p, true),
        None => (Path::new("outboxd.toml"), false),
    };
    Config::load(path, required, std::env::vars())
}

fn conn_info(config: &Config) -> Result<ConnInfo, ConnInfoError> {
    ConnInfo::parse(config.postgres.url.expose())
}

async fn connect(conn: &ConnInfo) -> Result<tokio_postgres::Client, RunError> {
    conn.connect().await.map_err(RunError::connect(conn))
}

/// `outboxd setup`.
pub async fn setup(config: &Config, args: &SetupArgs) -> anyhow::Result<()> {
    let conn = conn_info(config)?;
    let client = connect(&conn).await?;
    if let Some(predicate) = &args.backfill_where {
        return setup_with_backfill(config, &conn, &client, predicate, args.dry_run).await;
    }
    let spec = config.slot_spec();
    let creation = if args.new_slot {
        Creation::NewSlot
    } else {
        Creation::Refuse
    };
    let prepared = slot::prepare(&client, spec, Mode::Create(creation)).await?;
    let table = prepared.table.as_ref().map_or_else(
        || "no table (table-less messages)".to_owned(),
        |t| format!("{}.{}", t.schema, t.name),
    );
    println!(
        "publication {:?} on {table}: {}",
        config.postgres.publication,
        if prepared.created_publication {
            "created"
        } else {
            "already there"
        }
    );
    println!(
        "slot {:?} (pgoutput): {}, confirmed_flush_lsn {}",
        config.postgres.slot,
        if prepared.created_slot {
            "created"
        } else {
            "already there"
        },
        prepared
            .slot
            .confirmed_flush_lsn
            .map_or_else(|| "-".into(), |l| l.to_string())
    );
    Ok(())
}

/// The outbox table, for commands that read its rows.
async fn outbox_table(
    config: &Config,
    client: &tokio_postgres::Client,
    what: &str,
) -> anyhow::Result<(slot::Inspection, catalog::Table)> {
    if config.postgres.source == SourceKind::Messages {
        bail!(
            "{what} reads the rows of the outbox table, and postgres.source = \"messages\" keeps \
             none: table-less events live only in the WAL"
        );
    }
    let found = slot::inspect(client, config.slot_spec()).await?;
    let Some(table) = found.table.clone() else {
        bail!(
            "table {:?} does not exist: apply sql/outbox.sql, or set postgres.table",
            config.postgres.table
        );
    };
    Ok((found, table))
}

/// Shows a backfill's or replay's progress on stderr: a line that redraws on a terminal, a
/// line per tenth of the rows otherwise.
fn show_step(what: &'static str) -> impl FnMut(Step) {
    let terminal = std::io::stderr().is_terminal();
    let mut shown_tenth = 0;
    move |step| match step {
        Step::Batch { done, total } => {
            failpoint::hit(if what == "backfill" {
                failpoint::BACKFILL_BATCH
            } else {
                failpoint::REPLAY_BATCH
            });
            let tenth = (done * 10).checked_div(total).unwrap_or(10);
            if terminal {
                eprint!("\r{what}: {done} of {total} rows");
                if done >= total {
                    eprintln!();
                }
            } else if tenth > shown_tenth || done >= total {
                shown_tenth = tenth;
                eprintln!("{what}: {done} of {total} rows");
            }
        }
        Step::Committed => {
            failpoint::hit(if what == "backfill" {
                failpoint::BACKFILL_COMMITTED
            } else {
                failpoint::REPLAY_COMMITTED
            });
        }
    }
}

/// `outboxd setup --backfill-where`.
async fn setup_with_backfill(
    config: &Config,
    conn: &ConnInfo,
    client: &tokio_postgres::Client,
    predicate: &str,
    dry_run: bool,
) -> anyhow::Result<()> {
    let (found, table) = outbox_table(config, client, "setup --backfill-where").await?;
    let name = &config.postgres.slot;
    if found.slot.is_some() {
        bail!(
            "replication slot {name:?} already exists, and a backfill must create it (its \
             snapshot decides which rows are backfilled and which the slot streams). The slot \
             streams every row committed since it was made; to publish older rows through it, \
             use `outboxd replay --where ...`. To start the cutover over, drop it first \
             (`outboxd slot drop --yes`, once nothing it holds is still to be forwarded)"
        );
    }
    let order = RowSelection::order_columns(&table, &config.backfill.order_by)?;
    let rows = RowSelection {
        table: &table,
        predicate,
        order_by: &order,
        batch_rows: config.backfill.batch_rows,
    };
    let matching = backfill::count(client, &rows).await?;
    let order_text = if order.is_empty() {
        "the table's natural order".to_owned()
    } else {
        order.join(", ")
    };
    if dry_run {
        println!(
            "backfill (dry run): {matching} rows of {} match {predicate:?} now; they would be \
             published in order of {order_text}, and slot {name:?} created. Nothing was changed.",
            table.quoted()
        );
        return Ok(());
    }
    let created_publication = slot::ensure_publication(client, config.slot_spec(), &found).await?;
    // The slot is recorded once made, and the records of lost ones retired: check first
    // that the role may, so that no slot is left unrecorded.
    let server = &found.server;
    let (access, _) = state::ensure(client, &server.database, &server.user)
        .await
        .map_err(SlotError::from)?;
    if let Some(denied) = access.denied(&server.user) {
        return Err(SlotError::from(denied).into());
    }
    let publication = &config.postgres.publication;
    let lost = slots::lost(client, name, publication)
        .await
        .map_err(SlotError::from)?;
    if created_publication {
        println!(
            "publication {:?} on {}: created",
            config.postgres.publication,
            table.quoted()
        );
    }
    let done = backfill::backfill(
        conn,
        client,
        name,
        &config.postgres.publication,
        config.postgres.failover_slot,
        &rows,
        show_step("backfill"),
    )
    .await?;
    let point = done.consistent_point;
    slots::record(client, name, publication, "setup --backfill-where", point)
        .await
        .map_err(SlotError::from)?;
    let note = format!(
        "recovered by `outboxd setup --backfill-where {predicate:?}`: slot {name:?} created at \
         {point}, and the rows matching the predicate in its snapshot published"
    );
    slots::retire(client, &lost, &note)
        .await
        .map_err(SlotError::from)?;
    println!(
        "backfill: {} rows matching {predicate:?} published (in order of {order_text}) as of \
         consistent point {point}; slot {name:?} created there. `outboxd run` forwards them \
         first, then every row committed after that point.",
        done.rows
    );
    if !lost.is_empty() {
        println!(
            "the record of the lost slot is retired: {}",
            lost.iter()
                .map(slots::SlotRecord::describe)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

/// `outboxd replay`.
pub async fn replay(config: &Config, args: &ReplayArgs) -> anyhow::Result<()> {
    let conn = conn_info(config)?;
    let client = connect(&conn).await?;
    let (found, table) = outbox_table(config, &client, "replay").await?;
    let name = &config.postgres.slot;
    if found.slot.is_none() {
        bail!(
            "replication slot {name:?} does not exist, and replayed rows reach the broker \
             through it: run `outboxd setup` first (or `outboxd setup --backfill-where ...` to \
             publish kept rows while creating it)"
        );
    }
    // Replayed rows are signed (outboxd.sign()), or `run` refuses them.
    let access = state::access(&client).await.map_err(SlotError::from)?;
    if !access.present {
        return Err(SlotError::from(state::StateError::Missing {
            database: found.server.database.clone(),
            role: found.server.user.clone(),
        })
        .into());
    }
    if !access.sign {
        return Err(SlotError::from(state::StateError::Denied {
            role: found.server.user.clone(),
            what: "sign messages with outboxd.sign()",
        })
        .into());
    }
    let order = RowSelection::order_columns(&table, &config.backfill.order_by)?;
    let rows = RowSelection {
        table: &table,
        predicate: &args.predicate,
        order_by: &order,
        batch_rows: config.backfill.batch_rows,
    };
    let destination = args
        .topic
        .as_ref()
        .map_or_else(|| "their routed topics".to_owned(), |t| format!("{t:?}"));
    if args.dry_run {
        let matching = backfill::count(&client, &rows).await?;
        println!(
            "replay (dry run): {matching} rows of {} match {:?}; they would be published to \
             {destination}, marked outboxd-replay: true. Nothing was changed.",
            table.quoted(),
            args.predicate
        );
        return Ok(());
    }
    let done = backfill::replay(&client, &rows, args.topic.as_deref(), show_step("replay")).await?;
    println!(
        "replay: {} rows written to the WAL for {destination}, marked outboxd-replay: true; \
         `outboxd run` forwards them, and slot {name:?} passes {} once every one is \
         acknowledged.",
        done.rows, done.after
    );
    if args.wait {
        wait_confirmed(&client, name, done.after).await?;
    }
    Ok(())
}

/// `outboxd prune`.
pub async fn prune(config: &Config, args: &PruneArgs) -> anyhow::Result<()> {
    let conn = conn_info(config)?;
    let client = connect(&conn).await?;
    outbox_table(config, &client, "prune").await?;
    let pruning = prune::prepare(&client, config, &args.older_than).await?;
    let n = prune::once(
        &client,
        &config.postgres.slot,
        &pruning,
        args.dry_run,
        Duration::from_secs(args.wait),
    )
    .await?;
    if args.dry_run {
        println!(
            "prune (dry run): {n} rows of {} are older than {} and confirmed by the slot; \
             nothing was deleted",
            pruning.table.quoted(),
            args.older_than
        );
    } else {
        println!(
            "prune: deleted {n} rows of {} older than {} (each confirmed by the slot)",
            pruning.table.quoted(),
            args.older_than
        );
    }
    Ok(())
}

/// Waits until `slot` has confirmed `lsn`, saying every 10 s where it stands.
async fn wait_confirmed(
    client: &tokio_postgres::Client,
    name: &str,
    lsn: outboxd_core::Lsn,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut said = started;
    loop {
        let Some(s) = catalog::slot(client, name).await? else {
            bail!("replication slot {name:?} disappeared while waiting");
        };
        let confirmed = s.confirmed_flush_lsn.unwrap_or_default();
        if confirmed >= lsn {
            println!(
                "replay: acknowledged (confirmed_flush_lsn {confirmed}) after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = std::time::Instant::now();
            eprintln!(
                "replay: waiting, confirmed_flush_lsn {confirmed} of {lsn}{}",
                if s.active {
                    ""
                } else {
                    " (no outboxd streams the slot now)"
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long `outboxd run`'s own tasks (HTTP server, pruning, signal handler, broker probe,
/// progress line) get to stop once the pipeline returned, before they are aborted.
///
/// The shutdown budget, from SIGTERM to exit, fits Kubernetes' default 30 s grace period:
/// the drain (`sink.drain_timeout_ms`, 20 s by default), the final confirm (3 s), the
/// session's tasks (2 s), these tasks (2 s) and, with `[otel]`, the last spans (2 s): 27 s,
/// 29 s with OpenTelemetry. A second SIGTERM or SIGINT exits at once.
const TASKS_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// `outboxd run`. `show_progress`: draw a progress line for long catch-ups (terminal only).
///
/// Returns once the pipeline stopped and every task it started here has ended (or, after
/// `TASKS_STOP_TIMEOUT`, been aborted).
pub async fn run(config: &Config, show_progress: bool) -> anyhow::Result<()> {
    Broker::check(config)?;
    let mut settings = run_settings(config)?;
    let endpoint = config.otel.endpoint.trim();
    let exporter = if endpoint.is_empty() {
        None
    } else {
        let (exporter, spans) = otel::start(endpoint, &config.otel.service_name, settings.broker)?;
        tracing::info!(endpoint, "a span per event, exported over OTLP/HTTP");
        settings.spans = Some(spans);
        Some(exporter)
    };
    let shutdown = CancellationToken::new();
    let tasks = Tasks::new();
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(Status::default());
    let result = async {
        let services = Services {
            metrics: &metrics,
            status: &status,
            shutdown: &shutdown,
            tasks: &tasks,
        };
        tokio::select! {
            started = services.start(config, &settings, show_progress) => started?,
            () = shutdown.cancelled() => return anyhow::Ok(()),
        }
        pipeline::run(
            settings,
            |origin| Broker::build(config, origin),
            metrics.clone(),
            status.clone(),
            shutdown.clone(),
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    shutdown.cancel();
    tasks.join(TASKS_STOP_TIMEOUT).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    result
}

/// What the pipeline needs, from the configuration.
fn run_settings(config: &Config) -> anyhow::Result<RunSettings> {
    Ok(RunSettings {
        conn: conn_info(config)?,
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        table: config.postgres.table.clone(),
        source: config.postgres.source.stream_source(),
        route: config.route_spec(),
        status_interval: Duration::from_millis(config.postgres.status_interval_ms),
        wal_sender_timeout: match config.postgres.wal_sender_timeout_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
        max_batch_events: config.sink.max_batch_events,
        linger: Duration::from_millis(config.sink.linger_ms),
        max_inflight_events: config.sink.max_inflight_events,
        max_inflight_bytes: config.sink.max_inflight_bytes,
        drain_timeout: Duration::from_millis(config.sink.drain_timeout_ms),
        broker: Broker::name(config),
        broker_target: Broker::target(config),
        http: config.http.listen.trim().to_owned(),
        spans: None,
    })
}

/// `outboxd run`'s tasks beside the pipeline, all stopped by `shutdown` and joined by `run`.
struct Services<'a> {
    metrics: &'a Arc<Metrics>,
    status: &'a Arc<Status>,
    shutdown: &'a CancellationToken,
    tasks: &'a Tasks,
}

impl Services<'_> {
    /// Starts the HTTP server and pruning (if configured), the signal handler, the broker
    /// probe and (if `show_progress`) the progress line.
    async fn start(
        &self,
        config: &Config,
        settings: &RunSettings,
        show_progress: bool,
    ) -> anyhow::Result<()> {
        // First, so that a stop during the checks below is honoured too.
        let shutdown = self.shutdown;
        self.tasks
            .spawn("signal handler", stop_on_signal(shutdown.clone()));
        self.serve_http(config).await?;
        self.prune(config, settings).await?;
        self.tasks.spawn(
            "broker probe",
            probe_broker(config.clone(), self.status.clone(), shutdown.clone()),
        );
        if show_progress {
            self.tasks.spawn(
                "progress line",
                progress::show(self.metrics.clone(), self.status.clone(), shutdown.clone()),
            );
        }
        Ok(())
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `http.listen`, unless it is empty.
    async fn serve_http(&self, config: &Config) -> anyhow::Result<()> {
        // Bind first: a taken port is a startup error, not a surprise later.
        let listen = config.http.listen.trim();
        if listen.is_empty() {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
            format!(
                "cannot listen on http.listen = {listen:?}: choose a free address, or set it to \"\" to serve no HTTP"
            )
        })?;
        self.tasks.spawn(
            "HTTP server",
            http::serve(
                listener,
                self.metrics.clone(),
                self.status.clone(),
                self.shutdown.clone(),
            ),
        );
        Ok(())
    }

    /// Prunes confirmed rows periodically, when `postgres.prune_after` is set.
    async fn prune(&self, config: &Config, settings: &RunSettings) -> anyhow::Result<()> {
        if config.postgres.prune_after.trim().is_empty() {
            return Ok(());
        }
        let client = settings
            .conn
            .connect()
            .await
            .map_err(RunError::connect(&settings.conn))?;
        let pruning = prune::prepare(&client, config, &config.postgres.prune_after).await?;
        tracing::info!(
            table = %pruning.table.quoted(),
            older_than = %config.postgres.prune_after,
            "pruning rows the slot has confirmed"
        );
        self.tasks.spawn(
            "pruning",
            prune::run_periodically(
                settings.conn.clone(),
                settings.slot.clone(),
                pruning,
                Duration::from_millis(config.postgres.prune_interval_ms),
                self.metrics.clone(),
                self.shutdown.clone(),
            ),
        );
        Ok(())
    }
}

/// Asks the broker, on a connection of its own, whether it answers, every 2 seconds: so
/// that `/readyz` notices a broker that went away while the outbox is idle. Ends when `stop`
/// is cancelled, also in the middle of a ping.
async fn probe_broker(config: Config, status: Arc<Status>, stop: CancellationToken) {
    let mut broker = match Broker::build(&config, None) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the broker readiness probe");
            return;
        }
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let ping = tokio::time::timeout(Duration::from_secs(5), broker.ping());
        let ok = tokio::select! {
            () = stop.cancelled() => return,
            res = ping => matches!(res, Ok(Ok(()))),
        };
        status.set_broker_ok(ok);
    }
}

/// Cancels `token` on SIGTERM or SIGINT; ends when `token` is cancelled otherwise.
async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
            return;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        () = token.cancelled() => return,
    };
    tracing::info!(
        signal = name,
        "stop requested: draining in-flight events (a second SIGTERM or SIGINT exits at once)"
    );
    token.cancel();
    // Not one of the joined tasks: it waits for a second signal until the process exits.
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        exit_now(name);
    });
}

/// The exit code of a stop forced by a second signal.
pub const FORCED_EXIT_CODE: i32 = 130;

/// A second signal: exit without waiting for the drain. Nothing is confirmed beyond what the
/// broker acknowledged (confirms only ever follow acknowledgements); what was in flight is
/// sent again on the next start.
fn exit_now(signal: &str) -> ! {
    tracing::warn!(
        signal,
        "second stop signal: exiting now; events in flight are sent again on the next start"
    );
    std::process::exit(FORCED_EXIT_CODE)
}

/// `outboxd check`.
pub async fn check(config: &Config) -> anyhow::Result<()> {
    let report = crate::check::run(config).await;
    print!("{}", report.render());
    match report.failures() {
        0 => Ok(()),
        1 => bail!("1 problem found"),
        n => bail!("{n} problems found"),
    }
}

/// `outboxd slot ...`.
pub async fn slot(config: &Config, command: &SlotCommand) -> anyhow::Result<()> {
    let conn = conn_info(config)?;
    let name = &config.postgres.slot;
    match command {
        SlotCommand::Status { json } => slot_command::status(&conn, name, *json).await,
        SlotCommand::Drop { yes } => slot_command::drop(&conn, name, *yes).await,
    }
}
