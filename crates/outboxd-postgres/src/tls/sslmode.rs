//! `sslmode` and the other TLS keys of a connection string, resolved as libpq resolves them.
//!
//! [`PgTls::resolve`] turns the keys as written ([`TlsParams`]) into the settings both
//! connections use. It guarantees libpq's defaults and refusals:
//! - no `sslmode` means `prefer`, or `verify-full` with `sslrootcert=system`;
//! - `require` with root certificates (given, or `~/.postgresql/root.crt`) is `verify-ca`;
//! - a mode that verifies without root certificates, `sslrootcert=system` with a mode weaker
//!   than `verify-full`, and `sslcert` without `sslkey` (or the reverse) are errors;
//! - the client certificate defaults to `~/.postgresql/postgresql.crt` and `.key` when both
//!   exist;
//! - `disable` reads no file and builds no TLS configuration.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files::{Roots, system_bundle};
use super::{PgTls, TlsConfigError, verifier};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, unverified; plain otherwise.
    Prefer,
    /// Always TLS, certificate not verified.
    Require,
    /// Always TLS, chain verified against the root certificates.
    VerifyCa,
    /// Always TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's names. `allow` is taken as `prefer`: both accept a plain connection.
    pub fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate chain is verified.
    pub fn verifies(self) -> bool {
        self >= SslMode::VerifyCa
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS keys of a connection string, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// `sslmode`.
    pub sslmode: Option<String>,
    /// `sslrootcert`.
    pub sslrootcert: Option<String>,
    /// `sslcert`.
    pub sslcert: Option<String>,
    /// `sslkey`.
    pub sslkey: Option<String>,
}

impl PgTls {
    /// Resolves the keys of a connection string, with libpq's defaults, and loads the files
    /// they name.
    pub fn resolve(params: &TlsParams, home: Option<&Path>) -> Result<PgTls, TlsConfigError> {
        let system = params.sslrootcert.as_deref() == Some("system");
        let requested = match params.sslmode.as_deref() {
            Some(m) => SslMode::parse(m).ok_or_else(|| TlsConfigError::BadMode(m.to_owned()))?,
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if requested == SslMode::Disable {
            return Ok(PgTls::disabled());
        }
        let default_file = |name: &str| {
            home.map(|h| h.join(".postgresql").join(name))
                .filter(|p| p.is_file())
        };
        let roots = match params.sslrootcert.as_deref() {
            Some("system") => {
                if requested != SslMode::VerifyFull {
                    return Err(TlsConfigError::WeakModeWithSystem(requested));
                }
                Some(Roots::System(system_bundle()?))
            }
            Some(file) => Some(Roots::File(PathBuf::from(file))),
            None => default_file("root.crt").map(Roots::File),
        };
        // libpq: with a root certificate at hand, `require` verifies the chain.
        let mode = match (requested, &roots) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, None) if m.verifies() => return Err(TlsConfigError::NoRoots(m)),
            (m, _) => m,
        };
        let roots = roots.filter(|_| mode.verifies());
        let client_cert = match (&params.sslcert, &params.sslkey) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => default_file("postgresql.crt").zip(default_file("postgresql.key")),
            _ => return Err(TlsConfigError::HalfClientCert),
        };
        let mut tls = PgTls {
            mode,
            requested,
            roots,
            client_cert,
            rustls: None,
        };
        tls.rustls = Some(Arc::new(verifier::client_config(&tls)?));
        Ok(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: Option<&str>, root: Option<&str>) -> TlsParams {
        TlsParams {
            sslmode: mode.map(str::to_owned),
            sslrootcert: root.map(str::to_owned),
            ..TlsParams::default()
        }
    }

    #[test]
    fn modes_follow_libpq() {
        let resolve = |m, r| PgTls::resolve(&params(m, r), None);
        assert_eq!(resolve(None, None).expect("prefer").mode, SslMode::Prefer);
        let tls = resolve(Some("disable"), None).expect("disable");
        assert_eq!(tls.mode, SslMode::Disable);
        assert!(tls.rustls().is_none());
        let tls = resolve(Some("require"), None).expect("require");
        assert_eq!((tls.mode, tls.roots.is_none()), (SslMode::Require, true));
        assert!(matches!(
            resolve(Some("verify-full"), None),
            Err(TlsConfigError::NoRoots(SslMode::VerifyFull))
        ));
        assert!(matches!(
            resolve(Some("verify-ca"), None),
            Err(TlsConfigError::NoRoots(SslMode::VerifyCa))
        ));
        assert!(matches!(
            resolve(Some("required"), None),
            Err(TlsConfigError::BadMode(_))
        ));
        assert!(matches!(
            resolve(Some("require"), Some("system")),
            Err(TlsConfigError::WeakModeWithSystem(SslMode::Require))
        ));
        assert!(matches!(
            PgTls::resolve(
                &TlsParams {
                    sslcert: Some("/c.pem".into()),
                    ..TlsParams::default()
                },
                None
            ),
            Err(TlsConfigError::HalfClientCert)
        ));
    }

    #[test]
    fn system_roots_default_to_verify_full() {
        if system_bundle().is_err() {
            return; // no CA bundle on this machine: nothing to resolve
        }
        let tls = PgTls::resolve(&params(None, Some("system")), None).expect("system");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert!(matches!(tls.roots, Some(Roots::System(_))));
        assert!(tls.verification().contains("the system's roots"));
    }
}
