//! Writing test events the way applications do, through the outbox functions of sql/.
//!
//! Every test event has the payload `{"seq": n}` (n counts from 0 in each test, so that what
//! arrives can be checked against what was written), the key `k<n % keys>`, the aggregate type
//! `order` (topic `outbox.order`), the type `order.created` and the headers
//! `{"source": "test"}`. One family:
//!
//! - [`emit_txn`]: events `first..first+count` in one transaction;
//! - [`write_events`]: many events, in transactions of random sizes;
//! - [`Load`]: applications writing at a steady rate in the background, until stopped;
//! - [`Rng`]: the seeded generator behind the random sizes and the tests' random moments.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::{Client, GenericClient};

/// A small deterministic pseudo-random generator (xorshift64): a failing run is replayed
/// with the same seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value: the state is never zero).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// A duration from `low` (included) to `high` (excluded), to the millisecond: a random
    /// moment, for a kill.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis().max(1) as u64;
        low + Duration::from_millis(self.below(span))
    }
}

/// Emits the test events `first..first+count` in one transaction through `outbox_emit`.
pub async fn emit_txn(db: &impl GenericClient, first: u64, count: u64, keys: u64) {
    emit_txn_through(db, "outbox_emit", first, count, keys).await;
}

/// Emits the test events `first..first+count` in one transaction through `function`:
/// `outbox_emit` (rows of the outbox table) or `outbox_emit_message` (table-less events).
pub async fn emit_txn_through(
    db: &impl GenericClient,
    function: &str,
    first: u64,
    count: u64,
    keys: u64,
) {
    let sql = format!(
        "SELECT {function}('order', 'k' || (g % $3), 'order.created', \
                jsonb_build_object('seq', g), jsonb_build_object('source', 'test')) \
         FROM generate_series($1::bigint, $2::bigint) AS g"
    );
    db.execute(
        &sql,
        &[
            &(first as i64),
            &((first + count - 1) as i64),
            &(keys as i64),
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{function}: {e}"));
}

/// Emits the test events `first..first+total` in transactions of 1 to `max_txn` events, sizes
/// drawn from [`Rng`] with `seed`.
pub async fn write_events(db: &Client, first: u64, total: u64, max_txn: u64, keys: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut seq = first;
    while seq < first + total {
        let n = (1 + rng.below(max_txn)).min(first + total - seq);
        emit_txn(db, seq, n, keys).await;
        seq += n;
    }
}

/// Applications writing in the background: the test events from 0 on, about `rate` a second,
/// in transactions of 1 to `max_txn` events (sizes from [`Rng`] with `seed`), until
/// [`stop`](Self::stop).
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    task: JoinHandle<u64>,
}

impl Load {
    /// Starts writing on its own connection `db`.
    pub fn start(db: Client, rate: u64, max_txn: u64, keys: u64, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), written.clone());
        let task = tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            let started = Instant::now();
            let mut written = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let n = 1 + rng.below(max_txn);
                emit_txn(&db, written, n, keys).await;
                written += n;
                count.store(written, Ordering::Relaxed);
                let due = started + Duration::from_millis(written * 1000 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            written
        });
        Load {
            stop,
            written,
            task,
        }
    }

    /// How many events were committed so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stops writing; returns how many events were written (the seqs `0..n`).
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer")
    }
}
