//! CPU accounting from /proc: a process' CPU time (outboxd's, the broker's, pg_recvlogical's
//! per event), and the machine's idle and stolen shares during a live run.

/// CPU time (user + system) a process has used so far, in seconds (`/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// The machine's CPU time so far from `/proc/stat` (all CPUs, in ticks): (total, idle, steal).
/// Steal is time the hypervisor gave this VM's CPUs to someone else.
pub fn machine_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total = v.iter().take(8).sum();
    Some((total, *v.get(3)? + *v.get(4)?, *v.get(7)?))
}

/// Idle and steal shares (percent) of the machine between two [`machine_ticks`] readings.
pub fn idle_and_steal(
    before: Option<(u64, u64, u64)>,
    after: Option<(u64, u64, u64)>,
) -> (f64, f64) {
    match (before, after) {
        (Some((t0, i0, s0)), Some((t1, i1, s1))) if t1 > t0 => {
            let total = (t1 - t0) as f64;
            (
                100.0 * (i1 - i0) as f64 / total,
                100.0 * (s1 - s0) as f64 / total,
            )
        }
        _ => (f64::NAN, f64::NAN),
    }
}

/// `getconf CLK_TCK`: the unit of `/proc/PID/stat`'s times (100 on Linux).
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}
