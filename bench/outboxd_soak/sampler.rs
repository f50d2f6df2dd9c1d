//! What the soak watches while it runs, every 10 seconds: events written and delivered, the
//! slot's retained WAL and confirm lag, and outboxd's memory. Each reading is its own
//! connection's answer; while a server is down (a fault) its fields are missing, not zero.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::audit::stream_entries;
use crate::support::rss_kib_of;

/// How often the soak samples.
pub const EVERY: Duration = Duration::from_secs(10);

/// One reading.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the load started.
    pub at: Duration,
    /// Events committed so far (the writer's count).
    pub written: u64,
    /// Entries in the three streams.
    pub delivered: Option<u64>,
    /// `pg_current_wal_lsn() - restart_lsn` of the slot: WAL the slot keeps.
    pub retained_wal: Option<i64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: WAL not yet confirmed.
    pub confirm_lag: Option<i64>,
    /// outboxd's resident memory now and at its peak (this process), KiB.
    pub rss_kib: Option<(u64, u64)>,
}

/// The sampler, running until [`stop`](Self::stop).
#[derive(Debug)]
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

/// What the sampler reads from.
#[derive(Debug, Clone)]
pub struct Targets {
    /// A superuser URL of the outbox database (direct, not through a proxy).
    pub pg_url: String,
    /// Redis (direct).
    pub redis_url: String,
    /// The PID of the outboxd running now (0: none).
    pub outboxd_pid: Arc<AtomicU32>,
    /// The writer's count.
    pub written: Arc<AtomicU64>,
}

impl Sampler {
    /// Starts sampling; `started` is the soak's time zero.
    pub fn start(targets: Targets, started: Instant) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut pg: Option<Client> = None;
            let mut redis: Option<MultiplexedConnection> = None;
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                let sample = Sample {
                    at: started.elapsed(),
                    written: targets.written.load(Ordering::Relaxed),
                    delivered: delivered(&targets.redis_url, &mut redis).await,
                    retained_wal: None,
                    confirm_lag: None,
                    rss_kib: match targets.outboxd_pid.load(Ordering::Relaxed) {
                        0 => None,
                        pid => rss_kib_of(pid),
                    },
                };
                let (retained_wal, confirm_lag) = slot(&targets.pg_url, &mut pg).await;
                out.lock().expect("samples").push(Sample {
                    retained_wal,
                    confirm_lag,
                    ..sample
                });
            }
        });
        Sampler { samples, task }
    }

    /// Stops; returns every sample.
    pub fn stop(self) -> Vec<Sample> {
        self.task.abort();
        self.samples.lock().expect("samples").clone()
    }
}

/// Entries in the three streams; `None` while Redis does not answer (the connection is
/// made again at the next sample).
async fn delivered(url: &str, conn: &mut Option<MultiplexedConnection>) -> Option<u64> {
    if conn.is_none() {
        let client = redis::Client::open(url).ok()?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        *conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .ok();
    }
    let entries = stream_entries(conn.as_mut()?).await;
    if entries.is_none() {
        *conn = None;
    }
    entries
}

/// The slot's retained WAL and confirm lag; `None`s while Postgres does not answer.
async fn slot(url: &str, conn: &mut Option<Client>) -> (Option<i64>, Option<i64>) {
    if conn.as_ref().is_none_or(Client::is_closed) {
        *conn = match tokio_postgres::connect(url, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Some(client)
            }
            Err(_) => None,
        };
    }
    let Some(c) = conn.as_ref() else {
        return (None, None);
    };
    let row = c
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await;
    match row {
        Ok(Some(r)) => (r.get(0), r.get(1)),
        Ok(None) => (None, None),
        Err(_) => {
            *conn = None;
            (None, None)
        }
    }
}
