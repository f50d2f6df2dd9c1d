//! The Postgres connection string: parsed once, used for both the SQL connection and the
//! replication connection, and displayed only without its password.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use pgwire_replication::{ReplicationConfig, TlsConfig};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};

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
    /// TLS was required, and this build speaks plain TCP only.
    #[error(
        "postgres.url asks for sslmode=require, but this build of outboxd connects without TLS: \
         use sslmode=disable or prefer, or reach Postgres through a local socket or TLS proxy"
    )]
    TlsRequired,
    /// The password is not UTF-8.
    #[error("the password in postgres.url is not valid UTF-8")]
    PasswordNotUtf8,
}

/// A parsed Postgres connection string.
///
/// `Display` and `Debug` never show the password.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    host: String,
    port: u16,
    user: String,
    password: String,
    dbname: String,
}

impl ConnInfo {
    /// Parses a `postgres://` URL or a `key=value` connection string.
    pub fn parse(url: &str) -> Result<Self, ConnInfoError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(ConnInfoError::Invalid)?;
        if config.get_ssl_mode() == SslMode::Require {
            return Err(ConnInfoError::TlsRequired);
        }
        let user = config.get_user().ok_or(ConnInfoError::NoUser)?.to_owned();
        let host = match config.get_hosts().first().ok_or(ConnInfoError::NoHost)? {
            Host::Tcp(h) => h.clone(),
            Host::Unix(path) => path.to_string_lossy().into_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
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
            host,
            port,
            user,
            password,
            dbname,
        })
    }

    /// Opens a SQL connection; its I/O runs on a spawned task.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres SQL connection closed");
            }
        });
        Ok(client)
    }

    /// The settings for a replication connection streaming `slot` through `publication`.
    pub fn replication_config(&self, slot: &str, publication: &str) -> ReplicationConfig {
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.dbname.clone(),
            slot,
            publication,
        )
        .with_port(self.port)
        .with_tls(TlsConfig::disabled())
        .with_application_name(format!("outboxd:{slot}"))
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

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
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
    fn never_displays_the_password() {
        let info =
            ConnInfo::parse("postgres://outboxd:s3cr3t-pw@db.internal:6543/app").expect("parses");
        for shown in [info.to_string(), format!("{info:?}")] {
            assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        }
        assert_eq!(info.to_string(), "postgres://outboxd@db.internal:6543/app");
        assert_eq!(info.password(), "s3cr3t-pw");
        let repl = info.replication_config("s", "p");
        assert_eq!((repl.host.as_str(), repl.port), ("db.internal", 6543));
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
    fn refuses_what_it_cannot_use() {
        assert!(matches!(
            ConnInfo::parse("postgres://host/db"),
            Err(ConnInfoError::NoUser)
        ));
        assert!(matches!(
            ConnInfo::parse("postgres://u@h/db?sslmode=require"),
            Err(ConnInfoError::TlsRequired)
        ));
        assert!(matches!(
            ConnInfo::parse("not a url ="),
            Err(ConnInfoError::Invalid(_))
        ));
    }
}
