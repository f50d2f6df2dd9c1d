//! Test support: real services started per test, and the `outboxd` binary.
//!
//! Each test gets its own Postgres cluster (copied from a template made once with initdb),
//! its own Redis server and its own outboxd processes, all on free ports, all stopped by PID
//! when the test ends (also when it panics). Nothing is shared between tests, so they run in
//! parallel.
//!
//! Postgres binaries: `OUTBOXD_TEST_PG_BIN` (a `bin` directory), else the newest
//! `/usr/lib/postgresql/*/bin`. Redis: `redis-server` on the PATH. Kafka: see [`kafka`].
//!
//! Every file of tests/ is a test of its own (cargo finds it through the
//! `crates/outboxd/tests` link) and includes this module with `mod support;`. Here: the
//! servers and outboxd ([`Postgres`], [`Redis`], [`Outboxd`], [`Env`], [`SinkEnv`]); writing
//! test events ([`events`]); checking what arrived ([`delivered`]); the conformance suite
//! every sink runs ([`conformance`]); Kafka ([`kafka`], [`apache_kafka`]), a TCP proxy
//! ([`proxy`]) and certificates ([`tls`]).
#![allow(dead_code)]

pub mod apache_kafka;
pub mod conformance;
pub mod delivered;
pub mod events;
pub mod kafka;
pub mod proxy;
pub mod tls;

pub use delivered::*;
pub use events::*;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio_postgres::{Client, NoTls};

/// The password the tests give the least-privileged `outboxd` role.
pub const OUTBOXD_PASSWORD: &str = "outboxd-test-Secr3t";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A free TCP port on 127.0.0.1, for a server a test starts.
///
/// Chosen at random below the kernel's ephemeral range (32768 and up), so that no outgoing
/// connection or `bind(0)` of another test takes it between this choice and the server's
/// bind.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(COUNTER.fetch_add(1, Ordering::Relaxed));
        let port = 10_000 + (h.finish() % 20_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A fresh directory for one test's files, under cargo's per-target temporary directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("outboxd-tests")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The Postgres `bin` directory the tests use.
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOXD_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .expect("no Postgres found: install it or set OUTBOXD_TEST_PG_BIN")
}

/// Runs a Postgres program as the `postgres` user when the tests run as root (initdb and
/// postgres refuse root).
fn pg_command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn chown_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success(), "chown {path:?} failed");
    }
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `initdb` into `data` (owned by the server's user).
fn initdb(bin: &Path, data: &Path) {
    run_ok(
        pg_command(bin, "initdb").arg("-D").arg(data).args([
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth=trust",
            "--no-sync",
        ]),
        "initdb",
    );
}

/// The initdb'd template for `bin`, made once per build directory.
fn template(bin: &Path) -> PathBuf {
    let key: String = bin
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("outboxd-pg-templates");
    let template = root.join(&key);
    if template.join("PG_VERSION").exists() {
        return template;
    }
    fs::create_dir_all(&root).expect("template root");
    // Unique per process and per thread: tests of one binary may race to make it.
    let tmp = root.join(format!(
        "{key}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).expect("template tmp");
    chown_postgres(&tmp);
    initdb(bin, &tmp);
    // Another test process may have won the race; either template is fine.
    if fs::rename(&tmp, &template).is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    template
}

/// A throwaway Postgres cluster with `wal_level = logical`.
pub struct Postgres {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    /// The Unix-socket directory the superuser connects through, when TCP takes only TLS.
    socket: Option<PathBuf>,
}

/// How a TLS cluster is set up: its certificate, the CA it trusts for client certificates,
/// and its `hostssl` lines (TCP without TLS is refused; the tests' superuser connects through
/// a Unix socket).
pub struct PgTlsSetup<'a> {
    /// The server's certificate and key.
    pub server: &'a tls::CertFiles,
    /// `ssl_ca_file`: the CA of client certificates.
    pub client_ca: &'a Path,
    /// pg_hba.conf lines for TCP.
    pub hba: &'a str,
}

impl Postgres {
    /// Starts a logical-replication-ready cluster.
    pub fn start() -> Postgres {
        Self::start_with(&["wal_level = logical"])
    }

    /// Starts a cluster with these postgresql.conf lines.
    pub fn start_with(conf: &[&str]) -> Postgres {
        Self::start_configured(conf, None)
    }

    /// Starts a logical-replication-ready cluster whose slots may keep 1 MB of WAL at most
    /// (`max_slot_wal_keep_size`), with WAL segments recycled soon: a slot nobody confirms is
    /// invalidated within seconds of writing (see [`write_wal_until_the_slot_is`]).
    pub fn start_slot_limited() -> Postgres {
        Self::start_with(&[
            "wal_level = logical",
            "max_slot_wal_keep_size = 1MB",
            "max_wal_size = 32MB",
            "min_wal_size = 32MB",
        ])
    }

    /// Starts a logical-replication-ready cluster that takes TCP connections only over TLS.
    pub fn start_tls(setup: &PgTlsSetup<'_>) -> Postgres {
        Self::start_configured(&["wal_level = logical"], Some(setup))
    }

    /// Starts a logical-replication-ready cluster of its own system (initdb'd for it, not
    /// copied from the template every other test cluster shares): its system identifier is
    /// unlike any other's, as two production clusters' are.
    pub fn start_new_system() -> Postgres {
        Self::start_from(&["wal_level = logical"], None, true)
    }

    fn start_configured(conf: &[&str], tls: Option<&PgTlsSetup<'_>>) -> Postgres {
        Self::start_from(conf, tls, false)
    }

    fn start_from(conf: &[&str], tls: Option<&PgTlsSetup<'_>>, new_system: bool) -> Postgres {
        let bin = pg_bin();
        let dir = scratch_dir("pg");
        let data = dir.join("data");
        if new_system {
            fs::create_dir_all(&data).expect("data dir");
            chown_postgres(&dir);
            initdb(&bin, &data);
        } else {
            let template = template(&bin);
            run_ok(
                Command::new("cp").arg("-a").arg(&template).arg(&data),
                "copy template",
            );
        }
        chown_postgres(&dir);
        let port = free_port();
        let mut settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n\
             max_replication_slots = 16\nmax_wal_senders = 16\nwal_sender_timeout = '10s'\n\
             fsync = off\nmax_connections = 60\nlog_min_messages = warning\n"
        );
        for line in conf {
            settings.push_str(line);
            settings.push('\n');
        }
        let mut hba = "host all postgres 127.0.0.1/32 trust\n\
                       host replication postgres 127.0.0.1/32 trust\n\
                       host all all 127.0.0.1/32 scram-sha-256\n\
                       host replication all 127.0.0.1/32 scram-sha-256\n"
            .to_owned();
        let mut socket = None;
        if let Some(tls) = tls {
            // The server reads its key only if the server's user owns it with mode 0600:
            // copies in the data directory.
            for (from, to) in [
                (&tls.server.cert, "server.crt"),
                (&tls.server.key, "server.key"),
                (&tls.client_ca.to_path_buf(), "client-ca.crt"),
            ] {
                fs::copy(from, data.join(to)).expect("copy TLS file");
            }
            let sock = dir.join("sock");
            fs::create_dir_all(&sock).expect("socket dir");
            settings.push_str(&format!(
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 ssl_ca_file = 'client-ca.crt'\nunix_socket_directories = '{}'\n",
                sock.display()
            ));
            hba = format!("local all postgres trust\n{}\n", tls.hba);
            socket = Some(sock);
        }
        append(&data.join("postgresql.conf"), &settings);
        fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        chown_postgres(&dir);
        if tls.is_some() {
            let status = Command::new("chmod")
                .arg("0600")
                .arg(data.join("server.key"))
                .status()
                .expect("chmod");
            assert!(status.success());
        }
        let pg = Postgres {
            port,
            bin,
            dir,
            socket,
        };
        pg.pg_ctl_start();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts a hot standby of this cluster (`pg_basebackup -R`, streaming replication from
    /// it) on a port of its own.
    pub fn start_standby(&self) -> Postgres {
        self.start_standby_with(&[])
    }

    /// [`start_standby`](Self::start_standby) with more postgresql.conf lines. The standby
    /// streams through a physical slot of the primary, `standby_1`, and its
    /// `primary_conninfo` names database `app` (slot synchronisation needs one).
    pub fn start_standby_with(&self, conf: &[&str]) -> Postgres {
        let dir = scratch_dir("pg-standby");
        chown_postgres(&dir);
        let data = dir.join("data");
        let mut backup = pg_command(&self.bin, "pg_basebackup");
        backup
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R"])
            .args(["-c", "fast", "-C", "-S", "standby_1"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-D")
            .arg(&data);
        run_ok(&mut backup, "pg_basebackup");
        let port = free_port();
        let mut settings = format!("\nport = {port}\nhot_standby = on\n");
        for line in conf {
            settings.push_str(line);
            settings.push('\n');
        }
        append(&data.join("postgresql.conf"), &settings);
        append(
            &data.join("postgresql.auto.conf"),
            &format!(
                "\nprimary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=app'\n\
                 primary_slot_name = 'standby_1'\n",
                self.port
            ),
        );
        chown_postgres(&dir);
        let standby = Postgres {
            port,
            bin: self.bin.clone(),
            dir,
            socket: None,
        };
        standby.pg_ctl_start();
        standby
    }

    /// Starts a copy of this cluster as a backup restores it: `pg_basebackup` (without
    /// standby settings, so it starts as a primary of the same system, at the backup's WAL
    /// position) on a port of its own. Replication slots are not part of a base backup.
    pub fn start_restored_copy(&self) -> Postgres {
        let dir = scratch_dir("pg-copy");
        chown_postgres(&dir);
        let data = dir.join("data");
        let mut backup = pg_command(&self.bin, "pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-c",
                "fast",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-D")
            .arg(&data);
        run_ok(&mut backup, "pg_basebackup");
        let port = free_port();
        append(
            &data.join("postgresql.conf"),
            &format!(
                "
port = {port}
"
            ),
        );
        chown_postgres(&dir);
        let copy = Postgres {
            port,
            bin: self.bin.clone(),
            dir,
            socket: None,
        };
        copy.pg_ctl_start();
        copy
    }

    fn pg_ctl_start(&self) {
        run_ok(
            pg_command(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("postgres.log"))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        );
    }

    /// Stops the server (fast shutdown). If that does not finish within 60 s, stops it at
    /// once instead (`immediate`, as a crash would), and says so on stderr.
    ///
    /// Seen in CI on PostgreSQL 14 and 16 (the checkpointer waiting for outboxd's walsender
    /// for over 180 s): a walsender stops only once its client confirmed everything it sent,
    /// which outboxd cannot while its broker does not acknowledge; outboxd now closes a
    /// session the server has waited on for 10 s with nothing newer confirmed
    /// (`faults::a_postgres_shutdown_during_a_broker_outage_is_not_held_up_and_loses_nothing`).
    /// The fallback stays so that a test never hangs on a shutdown.
    pub fn stop(&self) {
        let fast = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-m", "fast", "stop"])
            .output()
            .expect("pg_ctl stop");
        if fast.status.success() {
            return;
        }
        eprintln!(
            "pg_ctl stop -m fast did not finish within 60 s ({}): stopping immediately",
            String::from_utf8_lossy(&fast.stderr).trim()
        );
        self.stop_immediately();
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop_immediately(&self) {
        run_ok(
            pg_command(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-m", "immediate", "stop"]),
            "pg_ctl stop -m immediate",
        );
    }

    /// Promotes this standby to a primary and waits for it.
    pub fn promote(&self) {
        run_ok(
            pg_command(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-t", "60", "promote"]),
            "pg_ctl promote",
        );
    }

    /// Starts the server again after [`stop`](Self::stop).
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// A superuser URL for database `db`.
    pub fn admin_url(&self, db: &str) -> String {
        match &self.socket {
            Some(sock) => format!(
                "host={} port={} user=postgres dbname={db}",
                sock.display(),
                self.port
            ),
            None => format!("postgres://postgres@127.0.0.1:{}/{db}", self.port),
        }
    }

    /// A URL for the `outboxd` role on database `db`.
    pub fn outboxd_url(&self, db: &str) -> String {
        format!(
            "postgres://outboxd:{OUTBOXD_PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// A superuser connection to `db`.
    pub async fn connect(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.admin_url(db), NoTls)
            .await
            .expect("connect to test Postgres");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// A connection to `db` as `user` with `password` (over TCP).
    pub async fn connect_as(&self, user: &str, password: &str, db: &str) -> Client {
        let url = format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port);
        let (client, conn) = tokio_postgres::connect(&url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Runs sql/`file` with psql as `user`, as the docs tell an admin to
    /// (`psql "$ADMIN_URL" -f sql/...`): each statement commits on its own, the first error
    /// stops the script.
    pub fn psql_file(&self, user: &str, password: &str, db: &str, file: &str) -> Output {
        let url = format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port);
        let bundled = self.bin.join("psql");
        let psql = if bundled.exists() {
            bundled
        } else {
            PathBuf::from("psql")
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../sql")
            .join(file);
        Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"])
            .arg(path)
            .output()
            .expect("run psql")
    }

    /// `server_version_num`.
    pub async fn version_num(&self) -> i32 {
        let db = self.connect("postgres").await;
        db.query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .expect("server version")
            .get(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

/// A throwaway Redis server.
pub struct Redis {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// `requirepass`, if any.
    pub password: Option<String>,
    /// More `redis-server` arguments.
    extra: Vec<String>,
    /// TLS only (`rediss://`): the CA and the client certificate the tests' own client uses.
    tls: Option<(PathBuf, tls::CertFiles)>,
    /// An ACL user and its password, when the server has one.
    user: Option<(String, String)>,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server on a free port.
    pub fn start() -> Redis {
        Self::start_with_password(None)
    }

    /// Starts a server that requires `password`.
    pub fn start_with_password(password: Option<&str>) -> Redis {
        let mut r = Redis {
            port: free_port(),
            password: password.map(str::to_owned),
            extra: Vec::new(),
            tls: None,
            user: None,
            child: None,
        };
        r.start_again();
        r
    }

    /// Starts a server that keeps every acknowledged write on disk in `dir` (append-only
    /// file, fsync always), so that it survives `stop` and `start_again`.
    pub fn start_persistent(dir: &Path) -> Redis {
        let mut r = Redis {
            port: free_port(),
            password: None,
            extra: [
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                &dir.to_string_lossy(),
            ]
            .map(String::from)
            .to_vec(),
            tls: None,
            user: None,
            child: None,
        };
        r.start_again();
        r
    }

    /// Starts a server that listens only on TLS (no plain port), with `pki`'s server
    /// certificate, requiring client certificates signed by its CA, and with an ACL user
    /// `user` (password `password`) besides a disabled default user.
    pub fn start_tls(pki: &tls::TestPki, user: &str, password: &str) -> Redis {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let extra = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            String::new(), // the port, filled in below
            "--tls-cert-file".into(),
            path(&pki.server.cert),
            "--tls-key-file".into(),
            path(&pki.server.key),
            "--tls-ca-cert-file".into(),
            path(&pki.ca),
            "--tls-auth-clients".into(),
            "yes".into(),
            "--user".into(),
            "default".into(),
            "off".into(),
            "--user".into(),
            user.into(),
            "on".into(),
            format!(">{password}"),
            "~*".into(),
            "&*".into(),
            "+@all".into(),
        ];
        let mut r = Redis {
            port: free_port(),
            password: None,
            extra,
            tls: Some((pki.ca.clone(), pki.client.clone())),
            user: Some((user.into(), password.into())),
            child: None,
        };
        r.extra[3] = r.port.to_string();
        r.start_again();
        r
    }

    /// Starts the server again on the same port (after [`stop`](Self::stop)).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        cmd.args(&self.extra);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (install it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP`: it hangs, taking connections and answering nothing; `CONT`)
    /// to the server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Stops the server (SIGKILL: everything it held is gone).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://[:PASSWORD@]127.0.0.1:PORT`, or `rediss://USER:PASSWORD@localhost:PORT` for a
    /// TLS server (its certificate names localhost).
    pub fn url(&self) -> String {
        if let Some((user, pw)) = &self.user {
            let scheme = if self.tls.is_some() {
                "rediss"
            } else {
                "redis"
            };
            return format!("{scheme}://{user}:{pw}@localhost:{}", self.port);
        }
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// A connection. Replies may take long on a loaded test machine: 30 s timeout.
    pub async fn connect(&self) -> MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_connection_timeout(Some(Duration::from_secs(10)));
        let client = match &self.tls {
            Some((ca, client)) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                redis::Client::build_with_tls(
                    self.url(),
                    redis::TlsCertificates {
                        client_tls: Some(redis::ClientTlsConfig {
                            client_cert: fs::read(&client.cert).expect("client cert"),
                            client_key: fs::read(&client.key).expect("client key"),
                        }),
                        root_cert: Some(fs::read(ca).expect("ca")),
                    },
                )
                .expect("redis TLS client")
            }
            None => redis::Client::open(self.url()).expect("redis url"),
        };
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to test redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `outboxd` process; its output goes to a log file.
pub struct Outboxd {
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// The resident memory of process `pid` now and at its peak (`VmRSS`, `VmHWM`), in KiB;
/// `None` once it is gone.
pub fn rss_kib_of(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The `outboxd` binary under test.
pub fn outboxd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_outboxd")
}

impl Outboxd {
    /// Starts `outboxd <args>`, logging to `log`.
    pub fn spawn(args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Outboxd {
        let out = fs::File::create(&log).expect("create outboxd log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new(outboxd_bin())
            .args(args)
            .env("OUTBOXD_LOG", "info,outboxd=debug")
            .envs(env.iter().copied())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start outboxd");
        Outboxd { child, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "outboxd did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its resident memory now and at its peak (`VmRSS`, `VmHWM`), in KiB.
    pub fn rss_kib(&self) -> Option<(u64, u64)> {
        rss_kib_of(self.pid())
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its output so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Outboxd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Postgres with the outbox schema and role, Redis, a configuration file, and `setup` done.
pub struct Env {
    /// The Postgres cluster; the outbox is in database `app`.
    pub pg: Postgres,
    /// The Redis server.
    pub redis: Redis,
    /// This test's scratch directory.
    pub dir: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    /// The port of outboxd's HTTP endpoints.
    pub http_port: u16,
    runs: AtomicU32,
}

impl Env {
    /// Everything ready for `outboxd run`: servers, schema, configuration, `outboxd setup`.
    pub async fn start() -> Env {
        let env = Self::new(Postgres::start(), "").await;
        env.setup();
        env
    }

    /// Runs `outboxd setup` and insists that it succeeds.
    pub fn setup(&self) {
        setup(&self.config);
    }

    /// Servers, schema and configuration on a given cluster, with extra configuration lines;
    /// `setup` not run.
    pub async fn new(pg: Postgres, extra_config: &str) -> Env {
        Self::with_redis(pg, Redis::start(), extra_config).await
    }

    /// Like [`new`](Self::new), with a given Redis server.
    pub async fn with_redis(pg: Postgres, redis: Redis, extra_config: &str) -> Env {
        create_outbox_db(&pg).await;
        Self::without_schema(pg, redis, extra_config)
    }

    /// Servers and configuration, no database or schema: the test creates them its own way.
    pub fn without_schema(pg: Postgres, redis: Redis, extra_config: &str) -> Env {
        let dir = scratch_dir("env");
        let config = dir.join("outboxd.toml");
        let env = Env {
            pg,
            redis,
            dir,
            config,
            http_port: free_port(),
            runs: AtomicU32::new(0),
        };
        env.write_config(extra_config);
        env
    }

    /// Writes the configuration file: the test's servers, plus `extra` lines.
    pub fn write_config(&self, extra: &str) {
        self.write_config_with(&format!("url = \"{}\"", self.pg.outboxd_url("app")), extra);
    }

    /// Writes the configuration file with these `[postgres]` lines (the URL, or a
    /// `url_file`), the test's Redis, plus `extra` lines (which may add to `[sink.redis]`).
    pub fn write_config_with(&self, postgres: &str, extra: &str) {
        let text = format!(
            "[postgres]\n{postgres}\n\n[http]\nlisten = \"127.0.0.1:{}\"\n\n[sink.redis]\nurl = \"{}\"\n{extra}\n",
            self.http_port,
            self.redis.url(),
        );
        fs::write(&self.config, text).expect("write config");
    }

    /// Runs an outboxd command to completion.
    pub fn command(&self, args: &[&str]) -> Output {
        command(&self.config, args, &[])
    }

    /// Runs an outboxd command to completion with extra environment variables.
    pub fn command_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        command(&self.config, args, env)
    }

    /// Starts `outboxd run`.
    pub fn run(&self) -> Outboxd {
        self.run_with(&[])
    }

    /// Starts `outboxd run` with extra environment variables.
    pub fn run_with(&self, env: &[(&str, &str)]) -> Outboxd {
        run(&self.config, &self.dir, &self.runs, env)
    }

    /// A superuser connection to the outbox database.
    pub async fn db(&self) -> Client {
        self.pg.connect("app").await
    }
}

/// Postgres with the outbox schema and role, a configuration for a broker the test starts
/// itself (its `[sink]` sections given whole), and `outboxd setup` done.
pub struct SinkEnv {
    /// The Postgres cluster; the outbox is in database `app`.
    pub pg: Postgres,
    /// This test's scratch directory.
    pub dir: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    /// The port of outboxd's HTTP endpoints.
    pub http_port: u16,
    runs: AtomicU32,
}

impl SinkEnv {
    /// Everything ready for `outboxd run`, with `sink`: the `[sink]` section and the
    /// broker's own (`[sink.kafka]`, ...), as TOML.
    pub async fn start(sink: &str) -> SinkEnv {
        Self::start_on(Postgres::start(), sink).await
    }

    /// [`start`](Self::start) on a given cluster.
    pub async fn start_on(pg: Postgres, sink: &str) -> SinkEnv {
        create_outbox_db(&pg).await;
        let dir = scratch_dir("sink-env");
        let config = dir.join("outboxd.toml");
        let http_port = free_port();
        let text = format!(
            "[postgres]\nurl = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n{sink}\n",
            pg.outboxd_url("app"),
        );
        fs::write(&config, text).expect("write config");
        setup(&config);
        SinkEnv {
            pg,
            dir,
            config,
            http_port,
            runs: AtomicU32::new(0),
        }
    }

    /// Starts `outboxd run`.
    pub fn run(&self) -> Outboxd {
        self.run_with(&[])
    }

    /// Starts `outboxd run` with extra environment variables.
    pub fn run_with(&self, env: &[(&str, &str)]) -> Outboxd {
        run(&self.config, &self.dir, &self.runs, env)
    }

    /// Runs an outboxd command to completion with extra environment variables.
    pub fn command_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        command(&self.config, args, env)
    }

    /// A superuser connection to the outbox database.
    pub async fn db(&self) -> Client {
        self.pg.connect("app").await
    }
}

/// Runs `outboxd setup` with `config` and insists that it succeeds.
fn setup(config: &Path) {
    let out = command(config, &["setup"], &[]);
    assert!(
        out.status.success(),
        "outboxd setup failed: {}",
        output_text(&out)
    );
}

/// Runs `outboxd <args> --config <config>` to completion.
pub fn command(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(outboxd_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("run outboxd")
}

/// Starts `outboxd run --config <config>`, logging to `dir`/outboxd-<n>.log, n counting the
/// runs of one test from 0.
fn run(config: &Path, dir: &Path, runs: &AtomicU32, env: &[(&str, &str)]) -> Outboxd {
    let n = runs.fetch_add(1, Ordering::Relaxed);
    Outboxd::spawn(
        &["run", "--config", &config.to_string_lossy()],
        dir.join(format!("outboxd-{n}.log")),
        env,
    )
}

/// `GET path` on 127.0.0.1:`port`: the status code and the body, or `None` when nothing
/// answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The value of one sample line of a Prometheus text exposition (`name{labels}` exactly as
/// written, or the bare name).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The value of `series` on outboxd's `/metrics` at 127.0.0.1:`port`, if it answers and has
/// that series.
pub async fn metric_value(port: u16, series: &str) -> Option<f64> {
    let (_, text) = http_get(port, "/metrics").await?;
    metric(&text, series)
}

/// Waits until outboxd reports the broker refusing (`refusing`) or taking the events again:
/// the metric, and `/readyz`.
pub async fn wait_refusal(port: u16, refusing: bool) {
    wait_until(
        if refusing {
            "outboxd to report the refusal"
        } else {
            "outboxd to report it over"
        },
        Duration::from_secs(60),
        || async move {
            let metric = metric_value(port, "outboxd_sink_refused")
                .await
                .unwrap_or(-1.0);
            let ready = http_get(port, "/readyz").await;
            let said = ready
                .as_ref()
                .is_some_and(|(code, body)| *code == 503 && body.contains("refuses the events"));
            if refusing {
                metric == 1.0 && said
            } else {
                metric == 0.0 && ready.is_some_and(|(code, _)| code == 200)
            }
        },
    )
    .await;
}

/// A finished command's stdout and stderr, for messages and searches.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until a session streams the `outboxd` slot.
pub async fn wait_slot_active(db: &Client) {
    wait_until(
        "outboxd to stream the slot",
        Duration::from_secs(20),
        || async move {
            db.query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'outboxd'",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
        },
    )
    .await;
}

/// Waits until no process streams the `outboxd` slot: after a kill -9, the killed outboxd's
/// walsender may still hold it for a moment, and a check for an active slot would see that
/// one instead of its successor.
pub async fn wait_slot_released(db: &Client) {
    wait_until(
        "the killed outboxd's walsender to release the slot",
        Duration::from_secs(20),
        || async move {
            db.query_one(
                "SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'outboxd'",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
        },
    )
    .await;
}

/// Writes WAL to another table (switching segments and checkpointing) while the `outboxd`
/// slot is not confirmed, until its `wal_status` is `status` (`extended`, `lost`).
pub async fn write_wal_until_the_slot_is(db: &Client, status: &'static str) {
    db.batch_execute("CREATE TABLE IF NOT EXISTS filler (pad text)")
        .await
        .expect("create filler");
    wait_until(
        &format!("the slot's wal_status to be {status}"),
        Duration::from_secs(60),
        || async move {
            // Errors are possible while a slot is being invalidated under outboxd: try again.
            let _ = db
                .batch_execute(
                    "INSERT INTO filler SELECT repeat(md5(g::text), 60) FROM generate_series(1, 3000) g; \
                     SELECT pg_switch_wal(); CHECKPOINT;",
                )
                .await;
            db.query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outboxd'",
                &[],
            )
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .as_deref()
                == Some(status)
        },
    )
    .await;
}

/// The text of a file of the repository's sql/ directory.
pub fn sql_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../sql")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Creates database `app` with the outbox schema (sql/) and the `outboxd` role's password.
pub async fn create_outbox_db(pg: &Postgres) {
    let admin = pg.connect("postgres").await;
    admin
        .batch_execute("CREATE DATABASE app")
        .await
        .expect("create database");
    let db = pg.connect("app").await;
    for file in ["outbox.sql", "state.sql", "role.sql"] {
        let sql = sql_file(file);
        db.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    db.batch_execute(&format!("ALTER ROLE outboxd PASSWORD '{OUTBOXD_PASSWORD}'"))
        .await
        .expect("set password");
}

/// The key effectively-once markers of slot `outboxd` in `db`'s database are kept under:
/// `<system identifier>/<database>/outboxd`.
pub async fn marker_key(db: &Client) -> String {
    let row = db
        .query_one(
            "SELECT system_identifier::text || '/' || current_database() || '/outboxd' \
             FROM pg_control_system()",
            &[],
        )
        .await
        .expect("read the system identifier");
    row.get(0)
}

/// Polls `check` every 50 ms until it holds, for at most `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The Redis entry id.
    pub entry_id: String,
    /// The fields in order.
    pub fields: Vec<(String, String)>,
}

impl Entry {
    /// A field's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An entry of an `XRANGE` reply: its id and its flat field/value list.
    fn from_reply(entry_id: String, flat: Vec<Vec<u8>>) -> Entry {
        let fields = flat
            .chunks(2)
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv[0]).into_owned(),
                    String::from_utf8_lossy(&kv[1]).into_owned(),
                )
            })
            .collect();
        Entry { entry_id, fields }
    }
}

impl Delivered for Entry {
    fn seq(&self) -> u64 {
        let payload: serde_json::Value =
            serde_json::from_str(self.get("payload").expect("payload")).expect("payload JSON");
        payload["seq"].as_u64().expect("seq")
    }

    fn key(&self) -> &str {
        self.get("key").expect("key")
    }
}

/// Every entry of a stream, oldest first.
pub async fn read_stream(conn: &mut MultiplexedConnection, stream: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(5000)
            .query_async(conn)
            .await
            .expect("XRANGE");
        let n = reply.len();
        for (entry_id, flat) in reply {
            start = format!("({entry_id}");
            out.push(Entry::from_reply(entry_id, flat));
        }
        if n < 5000 {
            return out;
        }
    }
}

/// `count` entries of `stream` from `start` towards `end` (`XRANGE`, or `XREVRANGE` when
/// `start` is `+`).
pub async fn read_range(
    conn: &mut MultiplexedConnection,
    stream: &str,
    start: &str,
    end: &str,
    count: usize,
) -> Vec<Entry> {
    let command = if start == "+" { "XREVRANGE" } else { "XRANGE" };
    let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd(command)
        .arg(stream)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .expect(command);
    reply
        .into_iter()
        .map(|(entry_id, flat)| Entry::from_reply(entry_id, flat))
        .collect()
}

/// Waits until `stream` holds at least `n` entries; returns them.
pub async fn wait_stream_len(
    redis: &MultiplexedConnection,
    stream: &str,
    n: u64,
    timeout: Duration,
) -> Vec<Entry> {
    wait_until(&format!("{n} entries in {stream}"), timeout, || {
        let mut redis = redis.clone();
        async move { stream_len(&mut redis, stream).await >= n }
    })
    .await;
    read_stream(&mut redis.clone(), stream).await
}

/// Waits until every seq of `expected` is in `stream` (duplicates after a crash do not
/// count); returns the stream's entries.
pub async fn wait_complete(
    redis: &MultiplexedConnection,
    stream: &str,
    expected: std::ops::Range<u64>,
    timeout: Duration,
) -> Vec<Entry> {
    let want = expected.end - expected.start;
    wait_until(&format!("events {expected:?} in {stream}"), timeout, || {
        let mut redis = redis.clone();
        let expected = expected.clone();
        async move {
            stream_len(&mut redis, stream).await >= want
                && has_all(&read_stream(&mut redis, stream).await, expected)
        }
    })
    .await;
    read_stream(&mut redis.clone(), stream).await
}

/// The number of entries in a stream.
pub async fn stream_len(conn: &mut MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XLEN")
}

/// A slot's `confirmed_flush_lsn` as a number.
pub async fn confirmed_flush(db: &Client, slot: &str) -> u64 {
    let row = db
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read slot");
    row.get::<_, i64>(0) as u64
}

/// The server's WAL insert position as a number.
pub async fn wal_insert_lsn(db: &Client) -> u64 {
    let row = db
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await
        .expect("read wal position");
    row.get::<_, i64>(0) as u64
}
