//! The Postgres connection string: parsed once, used for both the SQL connection and the
//! replication connection, and displayed only without its password.
//!
//! Both forms libpq accepts work: a URL (`postgres://user:pw@host:5432/db?sslmode=...`) and
//! `key=value` pairs (`host=db user=outboxd sslmode=verify-full`). The TLS keys (`sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`) are taken out here and resolved by [`crate::tls`];
//! the rest goes to tokio-postgres.
//!
//! Several hosts (`host=a,b port=5432,5433`, or `postgres://u@a:5432,b:5433/db`) are tried in
//! order, as libpq does; with `target_session_attrs=read-write` a host in recovery (a standby)
//! is passed over. The SQL connection does this through tokio-postgres; the replication
//! connection goes to the host the SQL connection found ([`ConnInfo::replication_config`]),
//! so that after a promotion both reach the new primary by themselves.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationConfig};
use tokio_postgres::Client;
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::{PgTls, SslMode, TlsConfigError, TlsParams};

/// A connection string outboxd cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ConnInfoError {
    /// Not a valid URL or `key=value` string.
    #[error("postgres.url is not a valid connection string: {0}")]
    Invalid(#[source] tokio_postgres::Error),
    /// No user given.
    #[error("postgres.url names no user: use postgres://USER:PASSWORD@HOST:PORT/DB")]
    NoUser,
    /// No host given.
    #[error("postgres.url names no host: use postgres://USER:PASSWORD@HOST:PORT/DB")]
    NoHost,
    /// The TLS settings cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// The password is not UTF-8.
    #[error("the password in postgres.url is not valid UTF-8")]
    PasswordNotUtf8,
    /// More ports than hosts, or fewer (and not one for all).
    #[error("postgres.url names {hosts} hosts and {ports} ports: give one port, or one per host")]
    Ports {
        /// Hosts named.
        hosts: usize,
        /// Ports named.
        ports: usize,
    },
}

/// One of the hosts a connection string names.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    /// A host name, an IP address, or a Unix-socket directory.
    host: String,
    port: u16,
}

/// A parsed Postgres connection string.
///
/// `Display` and `Debug` never show the password.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    tls: PgTls,
    /// The hosts in the order they are tried (at least one).
    endpoints: Vec<Endpoint>,
    /// The first host: for TLS advice and whether the server is local.
    host: String,
    user: String,
    password: String,
    dbname: String,
}

impl ConnInfo {
    /// Parses a `postgres://` URL or a `key=value` connection string. Files named by the
    /// TLS keys are read now, so that a wrong path is an error before any connection.
    pub fn parse(url: &str) -> Result<Self, ConnInfoError> {
        let (rest, params) = split_tls_params(url);
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(ConnInfoError::Invalid)?;
        let user = config.get_user().ok_or(ConnInfoError::NoUser)?.to_owned();
        let (host, unix) = match config.get_hosts().first().ok_or(ConnInfoError::NoHost)? {
            Host::Tcp(h) => (h.clone(), false),
            Host::Unix(path) => (path.to_string_lossy().into_owned(), true),
        };
        // libpq never uses TLS on a Unix-domain socket, whatever sslmode says.
        let tls = if unix {
            PgTls::disabled()
        } else {
            let home = std::env::var_os("HOME").map(PathBuf::from);
            PgTls::resolve(&params, home.as_deref())?
        };
        config.ssl_mode(match tls.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        let endpoints = endpoints(&config)?;
        let password = match config.get_password() {
            Some(p) => String::from_utf8(p.to_vec()).map_err(|_| ConnInfoError::PasswordNotUtf8)?,
            None => String::new(),
        };
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("outboxd");
        }
        Ok(ConnInfo {
            config,
            tls,
            endpoints,
            host,
            user,
            password,
            dbname,
        })
    }

    /// Opens a SQL connection; its I/O runs on a spawned task.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        self.connect_with(&self.config).await
    }

    /// A SQL connection with `config`, over this connection string's TLS.
    async fn connect_with(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<Client, tokio_postgres::Error> {
        let client = match self.tls.rustls() {
            Some(tls) => {
                let (client, connection) = config
                    .connect(MakeRustlsConnect::new((*tls).clone()))
                    .await?;
                spawn_connection(connection);
                client
            }
            None => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                spawn_connection(connection);
                client
            }
        };
        Ok(client)
    }

    /// The settings for a replication connection streaming `slot` through `publication`,
    /// without TLS: when TLS is off, to the server itself; otherwise the server is reached
    /// here, TLS negotiated, and the settings name the relay to that connection (see
    /// [`crate::tls`]).
    ///
    /// With several hosts, the server is the one a SQL connection reaches (the first that
    /// answers, and is not in recovery under `target_session_attrs=read-write`).
    pub async fn replication_config(
        &self,
        slot: &str,
        publication: &str,
    ) -> Result<ReplicationConfig, PgWireError> {
        let (server, port) = match self.endpoints.as_slice() {
            [only] => (only.host.clone(), only.port),
            _ => {
                let chosen = self.find_server().await?;
                (chosen.host, chosen.port)
            }
        };
        let host = if self.tls.mode == SslMode::Disable {
            server
        } else {
            let stream = self.tls.connect(&server, port).await?;
            let dir = crate::tls::relay(stream, port)
                .map_err(|e| PgWireError::Io(std::sync::Arc::new(e)))?;
            dir.to_string_lossy().into_owned()
        };
        Ok(ReplicationConfig::new(
            host,
            self.user.clone(),
            self.password.clone(),
            self.dbname.clone(),
            slot,
            publication,
        )
        .with_port(port)
        .with_application_name(format!("outboxd:{slot}")))
    }

    /// The hosts, `host:port`, in the order they are tried.
    pub fn hosts(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| format!("{}:{}", e.host, e.port))
            .collect()
    }

    /// A SQL connection to host number `index` of [`hosts`](Self::hosts) alone (whatever
    /// its role), with the same user, database and TLS: for `check` to look at a standby.
    pub async fn connect_host(&self, index: usize) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        if let Some(e) = self.endpoints.get(index) {
            config.host(&e.host).port(e.port);
        }
        config
            .user(&self.user)
            .password(self.password.as_bytes())
            .dbname(&self.dbname)
            .application_name("outboxd")
            .connect_timeout(
                self.config
                    .get_connect_timeout()
                    .copied()
                    .unwrap_or(Duration::from_secs(10)),
            )
            .ssl_mode(self.config.get_ssl_mode());
        self.connect_with(&config).await
    }

    /// Which of the hosts a SQL connection reaches: told by the port the server listens on
    /// and, where hosts share a port, by its address.
    async fn find_server(&self) -> Result<Endpoint, PgWireError> {
        let failed =
            |what: String| PgWireError::Io(std::sync::Arc::new(std::io::Error::other(what)));
        let client = self
            .connect()
            .await
            .map_err(|e| failed(format!("no host of postgres.url could be used: {e}")))?;
        let row = client
            .query_one("SELECT inet_server_port(), host(inet_server_addr())", &[])
            .await
            .map_err(|e| failed(format!("asking the server where it is: {e}")))?;
        let port = row
            .get::<_, Option<i32>>(0)
            .and_then(|p| u16::try_from(p).ok());
        let addr: Option<String> = row.get(1);
        let by_port: Vec<&Endpoint> = match port {
            Some(port) => self.endpoints.iter().filter(|e| e.port == port).collect(),
            // A Unix-domain socket: the server does not say; the socket hosts are candidates.
            None => self
                .endpoints
                .iter()
                .filter(|e| e.host.starts_with('/'))
                .collect(),
        };
        if let [only] = by_port.as_slice() {
            return Ok((*only).clone());
        }
        for candidate in &by_port {
            let resolved = tokio::net::lookup_host((candidate.host.as_str(), candidate.port))
                .await
                .map(|addrs| addrs.map(|a| a.ip().to_string()).collect::<Vec<_>>())
                .unwrap_or_default();
            if addr.as_ref().is_some_and(|a| resolved.contains(a)) {
                return Ok((*candidate).clone());
            }
        }
        Err(failed(format!(
            "cannot tell which host of postgres.url answered (address {}, port {}): name \
             each host so that its address or port tells it apart",
            addr.unwrap_or_else(|| "unknown".into()),
            port.map_or_else(|| "unknown".into(), |p| p.to_string())
        )))
    }

    /// The TLS settings both connections use.
    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    /// What to do about a failed connection whose message shows a TLS problem.
    pub fn tls_advice(&self, error: &str) -> Option<String> {
        crate::tls::advice(error, &self.tls, &self.host)
    }

    /// Whether the server is on this host (loopback address or Unix-domain socket).
    pub fn is_local(&self) -> bool {
        self.host.starts_with('/')
            || self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The password, for callers that must hide it from their own messages.
    pub fn password(&self) -> &str {
        &self.password
    }
}

/// Runs a SQL connection's I/O on a task of its own, logging the server's notices
/// ([`crate::notices`]).
fn spawn_connection<S, T>(mut connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notice(notice))) => {
                    crate::notices::log(&notice);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "postgres SQL connection closed");
                    return;
                }
                None => return,
            }
        }
    });
}

/// Takes the TLS keys out of a connection string (URL query parameters or `key=value`
/// pairs); returns the rest, for tokio-postgres, and their values.
fn split_tls_params(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut take = |key: &str, value: String| -> bool {
        let slot = match key {
            "sslmode" => &mut params.sslmode,
            "sslrootcert" => &mut params.sslrootcert,
            "sslcert" => &mut params.sslcert,
            "sslkey" => &mut params.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // The query starts at the first '?' after the user info (a password may hold one
        // only percent-encoded, but be lenient).
        let after_at = url.rfind('@').map_or(0, |i| i + 1);
        let Some(q) = url[after_at..].find('?').map(|i| i + after_at) else {
            return (url.to_owned(), params);
        };
        let kept: Vec<&str> = url[q + 1..]
            .split('&')
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                !take(k, percent_decode(v))
            })
            .filter(|pair| !pair.is_empty())
            .collect();
        let base = &url[..q];
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, params);
    }
    let mut kept = Vec::new();
    for (key, value, raw) in key_value_pairs(url) {
        if !take(&key, value) {
            kept.push(raw);
        }
    }
    (kept.join(" "), params)
}

/// The pairs of a libpq `key=value` string: key, unquoted value, and the pair as written.
/// Values may be single-quoted, with `\'` and `\\` escapes. Whatever does not parse is kept
/// as written, for tokio-postgres to report.
fn key_value_pairs(s: &str) -> Vec<(String, String, String)> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            return out;
        }
        let start = i;
        let mut key = String::new();
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            key.push(chars[i]);
            i += 1;
        }
        skip_ws(&mut i);
        if i >= chars.len() || chars[i] != '=' {
            // Not a pair: keep it as written.
            out.push((
                String::new(),
                String::new(),
                chars[start..i].iter().collect(),
            ));
            continue;
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = String::new();
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        let raw = chars[start..i.min(chars.len())].iter().collect();
        out.push((key, value, raw));
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The hosts of `config` with their ports: one port for all, or one per host.
fn endpoints(config: &tokio_postgres::Config) -> Result<Vec<Endpoint>, ConnInfoError> {
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    if !(ports.len() <= 1 || ports.len() == hosts.len()) {
        return Err(ConnInfoError::Ports {
            hosts: hosts.len(),
            ports: ports.len(),
        });
    }
    Ok(hosts
        .iter()
        .enumerate()
        .map(|(i, host)| Endpoint {
            host: match host {
                Host::Tcp(h) => h.clone(),
                Host::Unix(path) => path.to_string_lossy().into_owned(),
            },
            port: ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432),
        })
        .collect())
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.host, e.port))
            .collect();
        write!(
            f,
            "postgres://{}@{}/{}",
            self.user,
            hosts.join(","),
            self.dbname
        )
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnInfo").field(&self.to_string()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_hosts_are_kept_in_order_with_their_ports() {
        let info = ConnInfo::parse(
            "postgres://u:pw@db-a:5432,db-b:5433/app?target_session_attrs=read-write",
        )
        .expect("parses");
        assert_eq!(
            info.endpoints,
            [
                Endpoint {
                    host: "db-a".into(),
                    port: 5432
                },
                Endpoint {
                    host: "db-b".into(),
                    port: 5433
                },
            ]
        );
        assert_eq!(info.to_string(), "postgres://u@db-a:5432,db-b:5433/app");
        let info = ConnInfo::parse("host=a,b port=6432 user=u dbname=app").expect("parses");
        assert_eq!(
            info.endpoints.iter().map(|e| e.port).collect::<Vec<_>>(),
            [6432, 6432],
            "one port for every host"
        );
        let err = ConnInfo::parse("host=a,b,c port=1,2 user=u").unwrap_err();
        assert!(err.to_string().contains("3 hosts and 2 ports"), "{err}");
    }

    #[test]
    fn never_displays_the_password() {
        let info =
            ConnInfo::parse("postgres://outboxd:s3cr3t-pw@db.internal:6543/app").expect("parses");
        for shown in [info.to_string(), format!("{info:?}")] {
            assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        }
        assert_eq!(info.to_string(), "postgres://outboxd@db.internal:6543/app");
        assert_eq!(info.password(), "s3cr3t-pw");
    }

    #[test]
    fn accepts_key_value_strings_and_defaults() {
        let info = ConnInfo::parse("host=/var/run/postgresql user=app").expect("parses");
        assert_eq!(info.dbname(), "app");
        assert_eq!(
            info.to_string(),
            "postgres://app@/var/run/postgresql:5432/app"
        );
    }

    #[test]
    fn takes_the_tls_keys_out_of_both_forms() {
        let (rest, p) = split_tls_params(
            "postgres://u:p%3Fw@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p%3Fw@h:5432/db?application_name=x");
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, p) = split_tls_params("postgres://u@h/db?sslmode=require");
        assert_eq!(
            (rest.as_str(), p.sslmode.as_deref()),
            ("postgres://u@h/db", Some("require"))
        );

        let (rest, p) = split_tls_params(
            "host=db user=outboxd sslmode = verify-ca sslrootcert='/etc/my ca.pem' password='it\\'s' dbname=app",
        );
        assert_eq!(rest, "host=db user=outboxd password='it\\'s' dbname=app");
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        let (_, p) = split_tls_params(r"sslkey=/k\ ey sslcert='/c\'rt' host=h");
        assert_eq!(p.sslkey.as_deref(), Some("/k ey"));
        assert_eq!(p.sslcert.as_deref(), Some("/c'rt"));
    }

    #[test]
    fn tls_modes_follow_the_connection_string() {
        let info = ConnInfo::parse("postgres://u@db.internal/app?sslmode=require").expect("parses");
        assert_eq!(info.tls().mode, SslMode::Require);
        let info = ConnInfo::parse("host=h user=u sslmode=disable").expect("parses");
        assert_eq!(info.tls().mode, SslMode::Disable);
        // A Unix-domain socket never uses TLS.
        let info = ConnInfo::parse("host=/run/postgresql user=u sslmode=require").expect("parses");
        assert_eq!(info.tls().mode, SslMode::Disable);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert!(matches!(
            ConnInfo::parse("postgres://host/db"),
            Err(ConnInfoError::NoUser)
        ));
        assert!(matches!(
            ConnInfo::parse("postgres://u@h/db?sslmode=verify-full"),
            Err(ConnInfoError::Tls(TlsConfigError::NoRoots(_)))
        ));
        assert!(matches!(
            ConnInfo::parse("not a url ="),
            Err(ConnInfoError::Invalid(_))
        ));
    }
}
