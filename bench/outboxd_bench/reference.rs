//! `pg_recvlogical`, Postgres' own client of logical replication, as the reference outboxd is
//! measured against: it decodes the same publication (pgoutput) from a slot of its own, with
//! no broker behind it. The drains time it reading a backlog's WAL to /dev/null; the live
//! scenario notes when each row appears on its output.

use std::time::Instant;

use crate::arrivals::{Times, payload_seq};
use crate::backlog::wait_active;
use crate::support::*;

/// Reads the slot's WAL up to `end` with pg_recvlogical; returns the seconds it took.
pub fn pg_recvlogical(pg: &Postgres, slot: &str, end: &str) -> f64 {
    let bin = pg_bin().join("pg_recvlogical");
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        .args(["-d", &pg.admin_url("app"), "--slot", slot, "--start"])
        .args(["--endpos", end, "--no-loop", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=outboxd"])
        // Table-less events are messages: the reference decodes them too.
        .args(["-o", "messages=true"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_recvlogical failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

/// Starts `pg_recvlogical` on a new slot `reference_live` (pgoutput, the outbox publication,
/// output to a pipe) and a thread that notes when each row with a `seq` from `first` appears
/// in its output. Returns once the slot is streamed.
pub async fn watch_recvlogical(
    env: &Env,
    seen: Times,
    first: u64,
    total: u64,
) -> (std::process::Child, std::thread::JoinHandle<()>) {
    let db = env.db().await;
    db.execute(
        "SELECT pg_create_logical_replication_slot('reference_live', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    let mut child = std::process::Command::new(pg_bin().join("pg_recvlogical"))
        .args(["-d", &env.pg.admin_url("app"), "--slot", "reference_live"])
        .args(["--start", "--no-loop", "-f", "-", "-F", "0"])
        .args(["-o", "proto_version=1", "-o", "publication_names=outboxd"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pg_recvlogical");
    let out = child.stdout.take().unwrap();
    let thread = std::thread::spawn(move || read_rows(out, seen, first, total));
    wait_active(&db, "reference_live").await;
    (child, thread)
}

/// pg_recvlogical's output, read until `total` rows from `first` were seen (or it ends):
/// notes when each first appeared.
fn read_rows(mut out: std::process::ChildStdout, seen: Times, first: u64, total: u64) {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 16];
    // The unfinished tail of the previous read (a row may span two reads).
    let mut carry: Vec<u8> = Vec::new();
    let mut count = 0u64;
    while count < total {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        carry.extend_from_slice(&buf[..n]);
        let mut rest = &carry[..];
        let mut seen = seen.lock().unwrap();
        // Each row is followed by a newline (pg_recvlogical ends every message with one;
        // the JSON text holds none).
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            if let Some(seq) = payload_seq(&rest[..end])
                && seq >= first
                && seen.insert(seq, now).is_none()
            {
                count += 1;
            }
            rest = &rest[end + 1..];
        }
        carry = rest.to_vec();
    }
}
