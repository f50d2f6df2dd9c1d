//! The applications: one writer committing outbox events the way services do, through
//! `outbox_emit`, until stopped, and surviving the faults (a Postgres restart breaks its
//! connection; it reconnects and goes on).
//!
//! Every event's payload is `{"seq": n, "body": "…"}`, n counting from 0 in commit order (one
//! writer, one transaction at a time), its aggregate type `order`, `payment` or `shipment` by
//! `n % 3` (stream `outbox.<type>`), its key `k<n % keys>`. When a commit fails the writer
//! cannot know whether it happened, so after reconnecting it reads the next `seq` back from
//! the outbox table: the table, not the writer's count, is what the audit holds as written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::support::Rng;

/// The aggregate types, by `seq % 3`.
pub const TYPES: [&str; 3] = ["order", "payment", "shipment"];

/// How the writer writes.
#[derive(Debug, Clone)]
pub struct Mix {
    /// Events a second of the small transactions.
    pub rate: u64,
    /// Rows of a large transaction.
    pub large_rows: u64,
    /// Time between large transactions.
    pub large_every: Duration,
    /// Distinct keys.
    pub keys: u64,
    /// Filler bytes per payload.
    pub payload_bytes: u64,
    /// The seed of the transaction sizes.
    pub seed: u64,
}

/// What the writer did.
#[derive(Debug, Default, Clone)]
pub struct WriterStats {
    /// Transactions committed (as far as the writer knows).
    pub transactions: u64,
    /// Of which large.
    pub large: u64,
    /// Transactions that failed (connection lost, server restarting).
    pub failed: u64,
}

/// The writer, running in the background until [`stop`](Self::stop).
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    next_seq: Arc<AtomicU64>,
    task: JoinHandle<WriterStats>,
}

impl Writer {
    /// Starts writing to database `app` at `url` (a superuser URL).
    pub fn start(url: String, mix: Mix) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let next_seq = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write(url, mix, stop.clone(), next_seq.clone()));
        Writer {
            stop,
            next_seq,
            task,
        }
    }

    /// The events committed so far (as far as the writer knows).
    pub fn written(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// The count [`written`](Self::written) reads, to share.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.next_seq.clone()
    }

    /// Stops after the transaction in progress.
    pub async fn stop(self) -> WriterStats {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer")
    }
}

async fn write(
    url: String,
    mix: Mix,
    stop: Arc<AtomicBool>,
    next_seq: Arc<AtomicU64>,
) -> WriterStats {
    let mut rng = Rng::new(mix.seed);
    let mut stats = WriterStats::default();
    let started = Instant::now();
    let mut next_large = started + mix.large_every;
    // Events of small transactions so far: what the pacing counts.
    let mut paced = 0u64;
    let mut db: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(client) = db.as_ref() else {
            db = reconnect(&url, &next_seq).await;
            if db.is_none() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            continue;
        };
        let large = Instant::now() >= next_large;
        let rows = if large {
            next_large += mix.large_every;
            mix.large_rows
        } else if rng.below(20) == 0 {
            2 + rng.below(199)
        } else {
            1
        };
        let first = next_seq.load(Ordering::Relaxed);
        match emit(client, first, rows, &mix).await {
            Ok(()) => {
                next_seq.store(first + rows, Ordering::Relaxed);
                stats.transactions += 1;
                if large {
                    stats.large += 1;
                } else {
                    paced += rows;
                }
            }
            Err(e) => {
                stats.failed += 1;
                eprintln!("soak writer: a transaction failed, reconnecting: {e}");
                db = None;
                continue;
            }
        }
        let due = started + Duration::from_millis(paced * 1000 / mix.rate.max(1));
        tokio::time::sleep_until(due.into()).await;
    }
    stats
}

/// A new connection, and the next `seq` read back from the table; `None` while Postgres is
/// not there.
async fn reconnect(url: &str, next_seq: &AtomicU64) -> Option<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = client
        .query_one(
            "SELECT coalesce(max((payload->>'seq')::bigint) + 1, 0) FROM public.outbox",
            &[],
        )
        .await
        .ok()?;
    next_seq.store(row.get::<_, i64>(0) as u64, Ordering::Relaxed);
    Some(client)
}

/// Events `first..first+rows` in one transaction.
async fn emit(db: &Client, first: u64, rows: u64, mix: &Mix) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "SELECT outbox_emit((ARRAY['order', 'payment', 'shipment'])[1 + g % 3], 'k' || (g % $3), \
                'soak.event', jsonb_build_object('seq', g, 'body', repeat('x', $4::int)), \
                jsonb_build_object('source', 'soak')) \
         FROM generate_series($1::bigint, $2::bigint) AS g",
        &[
            &(first as i64),
            &((first + rows - 1) as i64),
            &(mix.keys as i64),
            &(mix.payload_bytes as i32),
        ],
    )
    .await
    .map(|_| ())
}
