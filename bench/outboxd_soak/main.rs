//! The soak: outboxd for an hour under mixed load, with faults at random moments, then a full
//! audit of what arrived against what was committed (see docs/guarantees.md, "The soak").
//!
//! ```text
//! scripts/soak.sh                        one hour, the report printed
//! scripts/soak.sh --minutes 5 --out /tmp/soak.md
//! scripts/soak.sh --help                 every option and its default
//! ```
//!
//! ```text
//!  writer ──outbox_emit──▶ Postgres ◀──proxy── outboxd ──proxy──▶ Redis ◀── audit
//!                             ▲                   ▲                  ▲
//!                             └──── faults: restart, walsender kill, SIGKILL, cuts, outage
//! ```
//!
//! The pieces: [`writer`] (the applications: mixed transactions, surviving restarts),
//! [`faults`] (what is done to the servers and to outboxd), [`sampler`] (retained WAL, lag,
//! memory every 10 s), [`audit`] (the table against the streams) and [`report`]. Every server
//! is a throwaway one on free ports, stopped by PID at the end; outboxd is restarted at once
//! whenever it exits, as a container with `restart: unless-stopped` would be.
//!
//! Run through cargo (`cargo bench --bench soak`), so that outboxd is the release build of
//! this tree. Not part of the test suite: an hour of CI time proves nothing a test does not,
//! except that nothing goes wrong over time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a soak: a panic is a failed run

#[path = "../../tests/support/mod.rs"]
mod support;

mod args;
mod audit;
mod faults;
mod report;
mod sampler;
mod writer;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use support::proxy::Proxy;
use support::{Outboxd, Postgres, Redis, Rng, create_outbox_db, outboxd_bin, scratch_dir};
use tokio_postgres::{Client, NoTls};

/// The servers, the proxies outboxd reaches them through, and outboxd itself.
pub(crate) struct World {
    /// Postgres; the outbox is in database `app`.
    pub pg: Postgres,
    /// Redis, with an append-only file fsynced at every write.
    pub redis: Redis,
    /// outboxd's way to Postgres (both of its connections).
    pub pg_proxy: Proxy,
    /// outboxd's way to Redis.
    pub redis_proxy: Proxy,
    /// The outboxd running now.
    pub outboxd: Outboxd,
    /// Its PID, for the sampler.
    pub outboxd_pid: Arc<AtomicU32>,
    /// How long each fast stop of Postgres took.
    pub pg_stops: Vec<Duration>,
    config: PathBuf,
    dir: PathBuf,
    runs: u32,
}

impl World {
    /// Starts another outboxd (the one before it has exited).
    pub fn spawn_outboxd(&mut self) {
        self.outboxd = spawn(&self.config, &self.dir, &mut self.runs);
        self.outboxd_pid
            .store(self.outboxd.pid(), Ordering::Relaxed);
    }

    /// A superuser connection to the outbox database, if Postgres answers.
    pub async fn admin(&self) -> Option<Client> {
        connect(&self.pg.admin_url("app")).await
    }
}

async fn connect(url: &str) -> Option<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

fn spawn(config: &std::path::Path, dir: &std::path::Path, runs: &mut u32) -> Outboxd {
    *runs += 1;
    Outboxd::spawn(
        &["run", "--config", &config.to_string_lossy()],
        dir.join(format!("outboxd-{runs}.log")),
        &[("OUTBOXD_LOG", "info")],
    )
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args::Args::parse();
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let versions = format!(
        "{}, {}, redis-server {}, {} CPUs",
        output(Command::new(outboxd_bin()).arg("--version")),
        output(Command::new(support::pg_bin().join("postgres")).arg("--version")),
        output(Command::new("redis-server").arg("--version"))
            .split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .unwrap_or("?"),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("outboxd soak: {versions}; {args:?}");

    let pg = Postgres::start();
    create_outbox_db(&pg).await;
    let redis = Redis::start_persistent(&scratch_dir("soak-redis"));
    let pg_proxy = Proxy::start(pg.port);
    let redis_proxy = Proxy::start(redis.port);
    let dir = scratch_dir("soak");
    let config = dir.join("outboxd.toml");
    let pg_url = pg
        .outboxd_url("app")
        .replace(&format!(":{}/", pg.port), &format!(":{}/", pg_proxy.port));
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{pg_url}\"\n\n[http]\nlisten = \"127.0.0.1:{}\"\n\n\
             [sink]\ndelivery = \"{}\"\n\n[sink.redis]\nurl = \"redis://127.0.0.1:{}\"\n",
            support::free_port(),
            args.delivery.as_str(),
            redis_proxy.port
        ),
    )
    .expect("write the configuration");
    let setup = Command::new(outboxd_bin())
        .args(["setup", "--config"])
        .arg(&config)
        .output()
        .expect("outboxd setup");
    assert!(
        setup.status.success(),
        "outboxd setup failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let mut runs = 0;
    let outboxd = spawn(&config, &dir, &mut runs);
    let mut world = World {
        outboxd_pid: Arc::new(AtomicU32::new(outboxd.pid())),
        pg,
        redis,
        pg_proxy,
        redis_proxy,
        outboxd,
        pg_stops: Vec::new(),
        config,
        dir,
        runs,
    };
    let admin = world.admin().await.expect("connect to Postgres");
    support::wait_slot_active(&admin).await;
    drop(admin);
    println!("logs and data: {}", world.dir.display());

    let started = Instant::now();
    let writer = writer::Writer::start(
        world.pg.admin_url("app"),
        writer::Mix {
            rate: args.rate,
            large_rows: args.large_rows,
            large_every: Duration::from_secs(args.large_every),
            keys: args.keys,
            payload_bytes: args.payload_bytes,
            seed: args.seed,
        },
    );
    let sampler = sampler::Sampler::start(
        sampler::Targets {
            pg_url: world.pg.admin_url("app"),
            redis_url: world.redis.url(),
            outboxd_pid: world.outboxd_pid.clone(),
            written: writer.counter(),
        },
        started,
    );

    // The run: faults at random moments; outboxd restarted whenever it exits by itself.
    let mut rng = Rng::new(args.seed ^ 0xfa_17);
    let gap = |rng: &mut Rng| {
        rng.between(
            Duration::from_secs(args.fault_min),
            Duration::from_secs(args.fault_max.max(args.fault_min + 1)),
        )
    };
    let end = started + Duration::from_secs(args.minutes * 60);
    let mut next_fault = started + gap(&mut rng);
    let mut faults = Vec::new();
    let mut exits = Vec::new();
    let mut last_report = started;
    while Instant::now() < end {
        if !world.outboxd.is_running() {
            let status = world.outboxd.wait(Duration::from_secs(1));
            let tail: Vec<String> = world
                .outboxd
                .log_text()
                .lines()
                .rev()
                .take(5)
                .map(str::to_owned)
                .collect();
            eprintln!("outboxd exited by itself ({status}); its last lines: {tail:#?}");
            exits.push((started.elapsed(), status.to_string()));
            world.spawn_outboxd();
        }
        if Instant::now() >= next_fault {
            let fault = faults::Fault::pick(&mut rng);
            let at = started.elapsed();
            let detail = faults::inject(&mut world, fault, &mut rng).await;
            println!("[{:>5.0} s] {}: {detail}", at.as_secs_f64(), fault.name());
            faults.push(faults::Happened { at, fault, detail });
            next_fault = Instant::now() + gap(&mut rng);
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = Instant::now();
            println!(
                "[{:>5.0} s] {} events committed",
                started.elapsed().as_secs_f64(),
                writer.written()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The load stops; everything must arrive.
    let load_end = Instant::now();
    let writer_stats = writer.stop().await;
    let db = world.admin().await.expect("connect to Postgres");
    let committed: i64 = db
        .query_one("SELECT count(*) FROM public.outbox", &[])
        .await
        .expect("count")
        .get(0);
    let mut redis = world.redis.connect().await;
    println!("load over: {committed} events committed; waiting for all of them to arrive");
    let drain_deadline = Instant::now() + Duration::from_secs(900);
    let audit = loop {
        if !world.outboxd.is_running() {
            let status = world.outboxd.wait(Duration::from_secs(1));
            exits.push((started.elapsed(), status.to_string()));
            world.spawn_outboxd();
        }
        let entries = audit::stream_entries(&mut redis).await.unwrap_or(0);
        if entries >= committed as u64 || Instant::now() >= drain_deadline {
            let audit = audit::audit(&db, &mut redis).await;
            if audit.lost == 0 || Instant::now() >= drain_deadline {
                break audit;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let drain = load_end.elapsed();
    let samples = sampler.stop();
    let report = report::render(&report::Run {
        args: &args,
        versions,
        date,
        writer: writer_stats,
        faults: &faults,
        exits: &exits,
        samples: &samples,
        drain,
        audit: &audit,
        pg_stops: &world.pg_stops,
    });
    println!("\n{report}");
    if let Some(path) = &args.out {
        std::fs::write(path, &report).expect("write the report");
    }
    let clean = audit.clean(args.delivery == args::Delivery::EffectivelyOnce);
    world.outboxd.kill9();
    drop(world);
    std::process::exit(if clean { 0 } else { 1 });
}
