//! TLS to Postgres, with libpq's meaning of `sslmode`, on both connections.
//!
//! | `sslmode`     | encrypted            | server certificate checked          |
//! |---------------|----------------------|-------------------------------------|
//! | `disable`     | never                | -                                   |
//! | `prefer`      | if the server offers | no                                  |
//! | `require`     | always               | no (chain, if `sslrootcert` is set) |
//! | `verify-ca`   | always               | chain against `sslrootcert`         |
//! | `verify-full` | always               | chain and host name                 |
//!
//! As in libpq, `require` with a root certificate given (or `~/.postgresql/root.crt`
//! present) verifies the chain like `verify-ca`; `sslrootcert=system` takes the operating
//! system's CA bundle and needs `verify-full` (the default with it); `sslcert`/`sslkey`
//! (default `~/.postgresql/postgresql.crt`/`.key` when both exist) present a client
//! certificate. Unix-domain sockets never use TLS.
//!
//! The SQL connection (tokio-postgres) and the replication connection (pgwire-replication)
//! use one rustls configuration ([`PgTls`]), with the `ring` provider, so they verify alike.
//! pgwire-replication opens its own socket and its own TLS, whose `verify-ca` refuses a host
//! name mismatch with current rustls; so outboxd negotiates TLS for the replication connection
//! itself ([`PgTls::connect`]) and hands the replication client the decrypted end through a
//! Unix socket in a private directory ([`relay()`]), which the client connects to without TLS:
//!
//! ```text
//! pgwire-replication ──plain──▶ /tmp/outboxd-…/.s.PGSQL.5432 ──relay──▶ TLS ──▶ Postgres
//! ```
//!
//! A handshake that fails is explained by [`advice()`], which names the setting to change.
//!
//! What this module guarantees:
//! - a mode that verifies (`verify-ca`, `verify-full`, `require` with roots) never connects
//!   without the server's chain checked against the roots, and `verify-full` checks the host
//!   name; a mode that does not verify still checks that the server holds the key of the
//!   certificate it shows;
//! - the files TLS will use are read by [`PgTls::resolve`], so a wrong path or a file
//!   without PEM is an error before any connection, naming the key and the file, never the
//!   file's content (root certificates are read only by a mode that verifies);
//! - both connections verify with the same configuration.
//!
//! Its parts, each with its own contract:
//! - `sslmode`: [`SslMode`], [`TlsParams`] and [`PgTls::resolve`], libpq's defaults;
//! - `files`: [`Roots`] and the PEM files (root certificates, client certificate and key);
//! - `verifier`: the rustls configuration and its certificate verifiers;
//! - `relay`: the replication connection, [`PgTls::connect`], [`PgStream`] and [`relay()`];
//! - `advice`: what a failed handshake means, in [`advice()`].

mod advice;
mod files;
mod relay;
mod sslmode;
mod verifier;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;

pub use advice::advice;
pub use files::Roots;
pub use relay::{PgStream, relay};
pub use sslmode::{SslMode, TlsParams};

/// A TLS setting outboxd cannot use.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// `sslmode` has a value libpq does not know.
    #[error(
        "postgres.url: sslmode={0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
    )]
    BadMode(String),
    /// Verification asked for, and no root certificates.
    #[error(
        "postgres.url: sslmode={0} verifies the server's certificate but no root certificate is \
         given: add sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate; \
         your provider publishes it), or sslrootcert=system for the operating system's roots"
    )]
    NoRoots(SslMode),
    /// `sslrootcert=system` with a mode weaker than `verify-full` (libpq refuses it too).
    #[error(
        "postgres.url: sslrootcert=system needs sslmode=verify-full (the default with it), not \
         sslmode={0}"
    )]
    WeakModeWithSystem(SslMode),
    /// No system CA bundle was found.
    #[error(
        "postgres.url: sslrootcert=system, but no CA bundle was found (looked at $SSL_CERT_FILE \
         and {}): install the ca-certificates package, or name the file with sslrootcert=FILE",
        files::SYSTEM_BUNDLES.join(", ")
    )]
    NoSystemBundle,
    /// Only one of `sslcert` and `sslkey`.
    #[error("postgres.url: sslcert and sslkey go together: give both, or neither")]
    HalfClientCert,
    /// A certificate or key file that cannot be read or holds nothing usable.
    #[error("postgres.url: {key}={}: {why}", .path.display())]
    File {
        /// The connection-string key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("postgres.url: the TLS settings cannot be used: {0}")]
    Rustls(#[source] rustls::Error),
}

/// The TLS settings of one Postgres server, ready for both connections.
#[derive(Clone)]
pub struct PgTls {
    /// The effective mode (`require` with roots is `verify-ca`).
    pub mode: SslMode,
    /// The mode as written (or the default).
    pub requested: SslMode,
    /// The trusted roots, when the chain is verified.
    pub roots: Option<Roots>,
    /// The client certificate and key, when one is presented.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The rustls configuration of the SQL connection (`None` when TLS is off).
    rustls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .field("client_cert", &self.client_cert.as_ref().map(|(c, _)| c))
            .finish_non_exhaustive()
    }
}

impl PgTls {
    /// No TLS (Unix-domain sockets).
    pub fn disabled() -> PgTls {
        PgTls {
            mode: SslMode::Disable,
            requested: SslMode::Disable,
            roots: None,
            client_cert: None,
            rustls: None,
        }
    }

    /// The rustls configuration for tokio-postgres, or `None` when TLS is off.
    pub fn rustls(&self) -> Option<Arc<ClientConfig>> {
        self.rustls.clone()
    }

    /// What the server's certificate is checked against, for `check` and logs.
    pub fn verification(&self) -> String {
        match (self.mode, &self.roots) {
            (SslMode::VerifyFull, Some(r)) => {
                format!("certificate verified against {r}, host name checked")
            }
            (SslMode::VerifyCa, Some(r)) => {
                format!("certificate chain verified against {r}, host name not checked (verify-ca)")
            }
            (m, _) => format!("certificate not verified (sslmode={m})"),
        }
    }
}
