//! `outboxd slot status [--json]` and `outboxd slot drop --yes`: the replication slot, as
//! Postgres shows it, and its removal (refused without `--yes`, or while a session streams it).

use anyhow::{Context, bail};
use outboxd_postgres::{ConnInfo, slot};
use outboxd_postgres::{catalog, holdups};

use super::connect;

/// `outboxd slot status [--json]`.
pub(super) async fn status(conn: &ConnInfo, name: &str, json: bool) -> anyhow::Result<()> {
    let client = connect(conn).await?;
    let Some(s) = catalog::slot(&client, name)
        .await
        .context("reading pg_replication_slots")?
    else {
        bail!("replication slot {name:?} does not exist: run `outboxd setup` to create it");
    };
    // What holds decoding back now (nothing, usually): the same search as a stalled run's.
    let holdups = holdups::find(&client, name, 60)
        .await
        .context("looking for what holds decoding back")?;
    if json {
        let mut value = slot_json(&s);
        value["holdups"] = holdups
            .iter()
            .map(|h| serde_json::json!({"kind": h.kind(), "detail": h.describe()}))
            .collect();
        println!("{value}");
    } else {
        print_slot(&s);
        if holdups.is_empty() {
            println!("held back by         nothing found");
        }
        for h in &holdups {
            println!("held back by         {}", h.describe());
        }
    }
    Ok(())
}

fn lsn_text(lsn: Option<outboxd_core::Lsn>) -> Option<String> {
    lsn.map(|l| l.to_string())
}

/// `slot status --json`: one object.
fn slot_json(s: &catalog::Slot) -> serde_json::Value {
    serde_json::json!({
        "slot": s.name,
        "plugin": s.plugin,
        "slot_type": s.slot_type,
        "database": s.database,
        "active": s.active,
        "active_pid": s.active_pid,
        "confirmed_flush_lsn": lsn_text(s.confirmed_flush_lsn),
        "restart_lsn": lsn_text(s.restart_lsn),
        "current_wal_lsn": s.current_wal_lsn.to_string(),
        "retained_wal_bytes": s.retained_wal_bytes(),
        "lag_bytes": s.lag_bytes(),
        "wal_status": s.wal_status,
    })
}

/// `slot status`: a line per field, `-` for what is unknown.
fn print_slot(s: &catalog::Slot) {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    println!("slot                 {}", s.name);
    println!("plugin               {}", or_dash(s.plugin.clone()));
    println!(
        "active               {}{}",
        s.active,
        s.active_pid
            .map_or(String::new(), |p| format!(" (walsender pid {p})"))
    );
    println!(
        "confirmed_flush_lsn  {}",
        or_dash(lsn_text(s.confirmed_flush_lsn))
    );
    println!("restart_lsn          {}", or_dash(lsn_text(s.restart_lsn)));
    println!("current_wal_lsn      {}", s.current_wal_lsn);
    println!(
        "retained_wal_bytes   {}",
        or_dash(s.retained_wal_bytes().map(|b| b.to_string()))
    );
    println!(
        "lag_bytes            {}",
        or_dash(s.lag_bytes().map(|b| b.to_string()))
    );
    println!("wal_status           {}", or_dash(s.wal_status.clone()));
}

/// `outboxd slot drop --yes`.
pub(super) async fn drop(conn: &ConnInfo, name: &str, yes: bool) -> anyhow::Result<()> {
    if !yes {
        bail!(
            "refusing to drop replication slot {name:?} without --yes: events not yet \
             forwarded are lost to outboxd once it is gone"
        );
    }
    let client = connect(conn).await?;
    if let Some(s) = catalog::slot(&client, name).await? {
        if s.active {
            bail!(
                "replication slot {name:?} is in use (walsender pid {}): stop outboxd first",
                s.active_pid.unwrap_or_default()
            );
        }
    } else {
        bail!("replication slot {name:?} does not exist");
    }
    slot::drop_slot(&client, name)
        .await
        .with_context(|| format!("dropping replication slot {name:?}"))?;
    println!("dropped replication slot {name:?}");
    Ok(())
}
