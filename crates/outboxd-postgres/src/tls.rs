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
//! are built from one [`PgTls`], so they agree; both run on rustls with the `ring` provider.
//! A handshake that fails is explained by [`advice`], which names the setting to change.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

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

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file named by `sslrootcert` (or libpq's default `~/.postgresql/root.crt`).
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's bundle, found at this path.
    System(PathBuf),
}

impl Roots {
    /// The PEM file.
    pub fn path(&self) -> &Path {
        match self {
            Roots::File(p) | Roots::System(p) => p,
        }
    }
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Roots::File(p) => write!(f, "{}", p.display()),
            Roots::System(p) => write!(f, "the system's roots ({})", p.display()),
        }
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
        SYSTEM_BUNDLES.join(", ")
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

/// Where operating systems keep their CA bundle (the first that exists is taken).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

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
        tls.rustls = Some(Arc::new(tls.client_config()?));
        Ok(tls)
    }

    /// The rustls configuration for tokio-postgres, or `None` when TLS is off.
    pub fn rustls(&self) -> Option<Arc<ClientConfig>> {
        self.rustls.clone()
    }

    fn client_config(&self) -> Result<ClientConfig, TlsConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsConfigError::Rustls)?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.roots {
            Some(roots) => {
                let store = Arc::new(load_roots(roots.path())?);
                let webpki = WebPkiServerVerifier::builder_with_provider(store, provider.clone())
                    .build()
                    .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
                if self.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
            None => Arc::new(Unverified(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client_cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(TlsConfigError::Rustls),
            None => Ok(builder.with_no_client_auth()),
        }
    }

    /// The settings for pgwire-replication, which opens the replication connection itself.
    /// `host` is the server's name or address.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        let root = self.roots.as_ref().map(|r| r.path().to_owned());
        let config = match self.mode {
            SslMode::Disable => return TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::default()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(root),
            // pgwire-replication refuses verify-full for an address unless the name to check
            // is given: the address itself is that name (checked against the IP SANs).
            SslMode::VerifyFull => TlsConfig::verify_full(root).with_sni_hostname(host),
        };
        match &self.client_cert {
            Some((cert, key)) => config.with_client_cert(cert, key),
            None => config,
        }
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

fn system_bundle() -> Result<PathBuf, TlsConfigError> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(TlsConfigError::NoSystemBundle)
}

fn file_error(key: &'static str, path: &Path, why: impl fmt::Display) -> TlsConfigError {
    TlsConfigError::File {
        key,
        path: path.to_owned(),
        why: why.to_string(),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error("sslrootcert", path, pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("sslrootcert", path, pem_reason(&e)))?;
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(file_error(
            "sslrootcert",
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(store)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error("sslcert", path, pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("sslcert", path, pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(file_error("sslcert", path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    // The key's bytes never reach a message: only the reason.
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        file_error(
            "sslkey",
            path,
            match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned()
                }
                other => pem_reason(&other),
            },
        )
    })
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "holds no PEM item".to_owned(),
        _ => "is not a valid PEM file".to_owned(),
    }
}

/// Verifies the chain and ignores the host name (`verify-ca`).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Trusts any certificate (`prefer`, `require` without roots), but still checks that the
/// server holds the key of the certificate it shows.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What to do about a failed connection whose message (`error`, with its causes) shows a TLS
/// problem; `None` when it shows none. `host` is the server as configured.
pub fn advice(error: &str, tls: &PgTls, host: &str) -> Option<String> {
    let roots = tls
        .roots
        .as_ref()
        .map_or_else(|| "sslrootcert".to_owned(), ToString::to_string);
    if error.contains("UnknownIssuer") || error.contains("unknown issuer") {
        return Some(format!(
            "the server's certificate is not signed by a CA in {roots}: set sslrootcert to the \
             CA that signed it (managed services publish theirs), or check that outboxd \
             reaches the server you mean"
        ));
    }
    if error.contains("not valid for name") || error.contains("NotValidForName") {
        let presented = error
            .split_once("is only valid for ")
            .map(|(_, names)| format!(" (it names {})", names.trim_end_matches(')')))
            .unwrap_or_default();
        return Some(format!(
            "the server's certificate does not cover the host {host:?}{presented}: connect by a \
             name the certificate lists, or use sslmode=verify-ca to check the chain only"
        ));
    }
    if error.contains("certificate expired") || error.contains("Expired") {
        return Some(format!(
            "the server's certificate has expired (checked against {roots}): renew the server's \
             certificate; outboxd does not connect to a server whose certificate it cannot trust"
        ));
    }
    if error.contains("not valid yet") || error.contains("NotValidYet") {
        return Some(
            "the server's certificate is not valid yet: check the clocks of this host and of \
             the server"
                .to_owned(),
        );
    }
    if error.contains("no encryption") {
        return Some(format!(
            "the server accepts only TLS connections from here (pg_hba.conf hostssl), and \
             sslmode={} sent none: set sslmode=verify-full with sslrootcert (or require)",
            tls.requested
        ));
    }
    if error.contains("server does not support TLS")
        || error.contains("server does not support SSL")
        || error.contains("SSLRequest rejected")
    {
        return Some(format!(
            "sslmode={} needs TLS, and the server does not offer it: turn on ssl in \
             postgresql.conf, or connect with sslmode=prefer",
            tls.requested
        ));
    }
    if error.contains("certificate") && (error.contains("client") || error.contains("sslcert")) {
        return Some(
            "the server wants a client certificate it trusts: set sslcert and sslkey to a \
             certificate signed by the server's ssl_ca_file whose CN is the role name"
                .to_owned(),
        );
    }
    if error.contains("invalid peer certificate") || error.contains("TLS handshake failed") {
        return Some(format!(
            "the TLS handshake failed with sslmode={}: check sslrootcert, sslcert and sslkey",
            tls.mode
        ));
    }
    None
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

    #[test]
    fn unreadable_root_files_are_named() {
        let err = PgTls::resolve(
            &params(Some("verify-full"), Some("/nonexistent/ca.pem")),
            None,
        )
        .expect_err("missing file");
        let text = err.to_string();
        assert!(
            text.contains("sslrootcert=/nonexistent/ca.pem") && text.contains("No such file"),
            "{text}"
        );
        let not_pem = std::env::temp_dir().join(format!("outboxd-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "hello").expect("write");
        let err = PgTls::resolve(
            &params(Some("require"), Some(&not_pem.to_string_lossy())),
            None,
        )
        .expect_err("not PEM");
        let _ = std::fs::remove_file(&not_pem);
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn advice_names_what_to_change() {
        let tls = PgTls::disabled();
        let cases = [
            (
                "invalid peer certificate: UnknownIssuer",
                "not signed by a CA",
            ),
            (
                "invalid peer certificate: certificate not valid for name \"db\"; certificate is only valid for DnsName(\"localhost\")",
                "does not cover the host \"db\" (it names DnsName(\"localhost\"",
            ),
            (
                "invalid peer certificate: certificate expired: verification time 1 (UNIX), but certificate is not valid after 0 (1 seconds ago)",
                "has expired",
            ),
            (
                "no pg_hba.conf entry for host \"127.0.0.1\", user \"outboxd\", database \"app\", no encryption",
                "accepts only TLS",
            ),
            (
                "TLS error: server does not support TLS (SSLRequest rejected)",
                "does not offer it",
            ),
        ];
        for (error, expected) in cases {
            let text = advice(error, &tls, "db").unwrap_or_default();
            assert!(text.contains(expected), "{error}: {text}");
        }
        assert_eq!(advice("password authentication failed", &tls, "db"), None);
    }
}
