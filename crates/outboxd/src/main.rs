//! `outboxd`: parses the command line, sets up logging, runs the command, and turns its error
//! into one line and a non-zero exit code (2 for a configuration, or an `OUTBOXD_FAILPOINT`,
//! it cannot use; 3 when it stopped for an operator's decision: a lost slot).

use std::io::IsTerminal;
use std::process::ExitCode;

use outboxd::cli::{Cli, Command, LogFormat};
use outboxd::pipeline::RunError;
use outboxd::report::one_line;
use outboxd::{commands, failpoint, progress};
use outboxd_postgres::slot::SlotError;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse_with_sinks();
    // A crash window asked for and not available (or misspelt) would make a test pass for
    // the wrong reason: refuse to start instead.
    if let Err(e) = failpoint::check_env() {
        eprintln!("outboxd: {e}");
        return ExitCode::from(2);
    }
    // One crypto provider for every TLS client in the process (Postgres, Redis): rustls
    // cannot choose on its own when more than one is compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_logging(cli.log_format, &cli.log_level);

    let config = match commands::load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outboxd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outboxd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Setup(args) => commands::setup(&config, args).await,
            Command::Replay(args) => commands::replay(&config, args).await,
            Command::Prune(args) => commands::prune(&config, args).await,
            Command::Run => {
                let show_progress = cli.log_format == LogFormat::Text && progress::enabled();
                commands::run(&config, show_progress).await
            }
            Command::Check => commands::check(&config).await,
            Command::Slot(args) => commands::slot(&config, &args.command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = one_line(e.as_ref());
            // `run` reports through its log (text or JSON); the other commands on stderr.
            if matches!(cli.command, Command::Run) {
                tracing::error!(error = %line, "outboxd stopped");
            } else {
                eprintln!("outboxd: {line}");
            }
            if needs_decision(&e) {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether outboxd stopped for an operator's decision (a lost slot): exit code 3, which the
/// container's entrypoint does not retry.
fn needs_decision(e: &anyhow::Error) -> bool {
    let lost = |s: &SlotError| matches!(s, SlotError::SlotLost { .. });
    e.downcast_ref::<SlotError>().is_some_and(lost)
        || matches!(e.downcast_ref::<RunError>(), Some(RunError::Slot(s)) if lost(s))
}

fn init_logging(format: LogFormat, filter: &str) {
    let mut filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // The sinks' client libraries, as their plugins ask; a filter that names one decides.
    let given = format!("{filter}");
    for directive in outboxd_sinks::SinkSections::log_directives() {
        let target = directive.split('=').next().unwrap_or(directive);
        if !given.contains(target)
            && let Ok(d) = directive.parse()
        {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress::ClearingWriter)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
