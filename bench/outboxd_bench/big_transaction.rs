//! Scenario 4, memory: one transaction of many rows (1,000,000 by default) committed while
//! outboxd streams to Redis; outboxd's peak RSS (`VmHWM`) and the time from the commit to the
//! last row in Redis.

use std::time::{Duration, Instant};

use crate::backlog::{wait_active, write_backlog};
use crate::broker::{Broker, broker_env, run_outboxd};
use crate::support::*;

/// Scenario 4: one transaction of `rows` rows; outboxd's peak RSS (KiB) and the seconds
/// from its commit to its last row in Redis.
pub async fn big_transaction(rows: u64) -> (u64, f64) {
    let env = Env::start().await;
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    let outboxd = run_outboxd(&env, &broker_env(Broker::Redis, None));
    wait_active(&db, "outboxd").await;
    write_backlog(&db, 0, rows, rows).await;
    let started = Instant::now();
    while stream_len(&mut redis, "outbox.order").await < rows {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the transaction did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let (_, peak) = outboxd.rss_kib().unwrap();
    println!(
        "one {rows}-row transaction: forwarded in {secs:.1} s after its commit; outboxd peak RSS {:.1} MiB",
        peak as f64 / 1024.0
    );
    (peak, secs)
}
