//! The faults, one at a time, each at a random moment: what production does to outboxd.
//!
//! | fault              | how                                                     |
//! |--------------------|---------------------------------------------------------|
//! | SIGKILL            | outboxd killed, restarted at once                       |
//! | restart            | SIGTERM (graceful: in-flight events acknowledged first) |
//! | walsender kill     | `pg_terminate_backend` of the slot's walsender          |
//! | Postgres restart   | `pg_ctl stop -m fast`, then start                       |
//! | Redis outage       | redis-server killed (its append-only file kept), 10–45 s |
//! | Postgres cut       | the TCP proxy outboxd reaches Postgres through cut, 5–30 s |
//! | Redis cut          | the TCP proxy outboxd reaches Redis through cut, 5–30 s |

use std::time::{Duration, Instant};

use crate::World;
use crate::support::Rng;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL of outboxd.
    Kill9,
    /// SIGTERM of outboxd, and a new one.
    Restart,
    /// The walsender terminated.
    WalsenderKill,
    /// Postgres stopped (fast) and started.
    PostgresRestart,
    /// Redis down for a while.
    BrokerOutage,
    /// No network to Postgres for a while.
    PostgresCut,
    /// No network to Redis for a while.
    BrokerCut,
}

impl Fault {
    /// A fault drawn from `rng`, weighted: crashes and outages more often than the rest.
    pub fn pick(rng: &mut Rng) -> Fault {
        match rng.below(20) {
            0..=3 => Fault::Kill9,
            4..=5 => Fault::Restart,
            6..=8 => Fault::WalsenderKill,
            9..=11 => Fault::PostgresRestart,
            12..=15 => Fault::BrokerOutage,
            16..=17 => Fault::PostgresCut,
            _ => Fault::BrokerCut,
        }
    }

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "SIGKILL of outboxd",
            Fault::Restart => "graceful restart (SIGTERM)",
            Fault::WalsenderKill => "walsender killed",
            Fault::PostgresRestart => "Postgres restart (fast)",
            Fault::BrokerOutage => "Redis outage",
            Fault::PostgresCut => "network cut to Postgres",
            Fault::BrokerCut => "network cut to Redis",
        }
    }
}

/// A fault that happened.
#[derive(Debug, Clone)]
pub struct Happened {
    /// When it began, since the load started.
    pub at: Duration,
    /// Which.
    pub fault: Fault,
    /// How long it lasted and what it found.
    pub detail: String,
}

/// Injects `fault` and ends it (the outage over, the network back, outboxd running again).
pub async fn inject(world: &mut World, fault: Fault, rng: &mut Rng) -> String {
    match fault {
        Fault::Kill9 => {
            world.outboxd.kill9();
            world.spawn_outboxd();
            "restarted at once".into()
        }
        Fault::Restart => {
            let began = Instant::now();
            world.outboxd.sigterm();
            let deadline = began + Duration::from_secs(60);
            while world.outboxd.is_running() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let detail = if world.outboxd.is_running() {
                world.outboxd.kill9();
                "did not stop within 60 s of SIGTERM: killed".to_owned()
            } else {
                format!("stopped in {:.1} s", began.elapsed().as_secs_f64())
            };
            world.spawn_outboxd();
            detail
        }
        Fault::WalsenderKill => {
            let killed = match world.admin().await {
                Some(db) => db
                    .query(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE slot_name = 'outboxd' AND active",
                        &[],
                    )
                    .await
                    .map(|rows| rows.len())
                    .unwrap_or(0),
                None => 0,
            };
            if killed == 0 {
                "no walsender was streaming at that moment".into()
            } else {
                "terminated".into()
            }
        }
        Fault::PostgresRestart => {
            let pg = &world.pg;
            let (stop, start) = tokio::task::block_in_place(|| {
                let began = Instant::now();
                pg.stop();
                let stop = began.elapsed();
                pg.start_again();
                (stop, began.elapsed() - stop)
            });
            world.pg_stops.push(stop);
            format!(
                "stop took {:.1} s{}, start {:.1} s",
                stop.as_secs_f64(),
                if stop >= Duration::from_secs(60) {
                    " (the fast stop did not finish in 60 s: stopped immediately)"
                } else {
                    ""
                },
                start.as_secs_f64()
            )
        }
        Fault::BrokerOutage => {
            let down = rng.between(Duration::from_secs(10), Duration::from_secs(45));
            tokio::task::block_in_place(|| world.redis.stop());
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| world.redis.start_again());
            format!("down {:.0} s", down.as_secs_f64())
        }
        Fault::PostgresCut => {
            let down = rng.between(Duration::from_secs(5), Duration::from_secs(30));
            world.pg_proxy.cut();
            tokio::time::sleep(down).await;
            world.pg_proxy.restore();
            format!("cut {:.0} s", down.as_secs_f64())
        }
        Fault::BrokerCut => {
            let down = rng.between(Duration::from_secs(5), Duration::from_secs(30));
            world.redis_proxy.cut();
            tokio::time::sleep(down).await;
            world.redis_proxy.restore();
            format!("cut {:.0} s", down.as_secs_f64())
        }
    }
}
