//! A progress line for long catch-ups, when stderr is a terminal.
//!
//! While the slot is more than [`BACKLOG_BYTES`] behind the server's WAL, one line on the
//! terminal shows the events forwarded since the catch-up began, the WAL still to read, and
//! the rate. Log lines clear it before they print ([`ClearingWriter`]); the next tick redraws
//! it. When stderr is not a terminal (a file, a pipe, a container log), nothing is shown.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::status::Status;

/// A backlog of more WAL than this is a catch-up worth showing.
pub const BACKLOG_BYTES: u64 = 8 * 1024 * 1024;

/// Whether a progress line is on the terminal now.
static SHOWN: AtomicBool = AtomicBool::new(false);

/// Whether stderr is a terminal, where a progress line makes sense.
pub fn enabled() -> bool {
    std::io::stderr().is_terminal()
}

/// Redraws the progress line every half second until `stop`.
pub async fn show(metrics: Arc<Metrics>, status: Arc<Status>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut catch_up: Option<(Instant, u64)> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let confirmed = metrics.confirmed_lsn.get();
        let backlog = status.server_wal_end().saturating_sub(confirmed);
        let forwarded = metrics.forwarded_total();
        if backlog > BACKLOG_BYTES {
            let (since, start) = *catch_up.get_or_insert((Instant::now(), forwarded));
            let drained = forwarded - start;
            let secs = since.elapsed().as_secs_f64().max(0.5);
            draw(&format!(
                "catching up: {drained} events forwarded, {} of WAL to go, {:.0} events/s",
                human_bytes(backlog),
                drained as f64 / secs
            ));
        } else if let Some((since, start)) = catch_up.take() {
            clear();
            tracing::info!(
                events = forwarded - start,
                seconds = since.elapsed().as_secs(),
                "caught up with the WAL"
            );
        }
    }
    clear();
}

fn draw(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K{line}");
    let _ = err.flush();
    SHOWN.store(true, Ordering::Relaxed);
}

fn clear() {
    if SHOWN.swap(false, Ordering::Relaxed) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The log writer: stderr, clearing a progress line before each record.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClearingWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ClearingWriter {
    type Writer = Box<dyn Write + 'a>;

    fn make_writer(&'a self) -> Self::Writer {
        clear();
        Box::new(std::io::stderr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_sizes() {
        assert_eq!(human_bytes(512), "512.0 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 512 * 1024), "3.5 MB");
    }
}
