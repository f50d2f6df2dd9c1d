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
//! Unix socket in a private directory ([`relay`]), which the client connects to without TLS:
//!
//! ```text
//! pgwire-replication ──plain──▶ /tmp/outboxd-…/.s.PGSQL.5432 ──relay──▶ TLS ──▶ Postgres
//! ```
//!
//! A handshake that fails is explained by [`advice`], which names the setting to change.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgwire_replication::PgWireError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

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

    /// Connects to `host:port` and negotiates TLS as `sslmode` says, as libpq does: an
    /// SSLRequest, then the handshake; under `prefer`, a server that declines leaves a plain
    /// connection, ready for the startup message.
    pub async fn connect(&self, host: &str, port: u16) -> Result<PgStream, PgWireError> {
        let io = |e: std::io::Error| PgWireError::Io(Arc::new(e));
        let mut tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {host}:{port} timed out"),
                ))
            })?
            .map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        let Some(config) = self.rustls() else {
            return Ok(PgStream::Plain(tcp));
        };
        // SSLRequest: length 8, code 80877103.
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(io)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io)?;
        if answer[0] != b'S' {
            return if self.mode == SslMode::Prefer {
                Ok(PgStream::Plain(tcp))
            } else {
                Err(PgWireError::Tls(
                    "server does not support TLS (SSLRequest rejected)".into(),
                ))
            };
        }
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| PgWireError::Tls(format!("{host:?} is not a valid TLS server name")))?;
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| PgWireError::Tls(format!("TLS handshake failed: {e}")))?;
        Ok(PgStream::Tls(Box::new(tls)))
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

/// How long the TCP connection of the replication session may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the relay waits for the replication client to connect.
const RELAY_ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to Postgres after the TLS negotiation.
#[derive(Debug)]
pub enum PgStream {
    /// Not encrypted (`prefer`, and the server offered no TLS).
    Plain(TcpStream),
    /// Encrypted.
    Tls(Box<TlsStream<TcpStream>>),
}

/// Serves `stream` to one client of a Unix socket in a new private directory (mode 0700):
/// returns the directory, which holds `.s.PGSQL.<port>` as libpq and pgwire-replication name
/// sockets. The socket and its directory are removed once the client is connected (or after
/// a timeout); the relay ends when either side closes.
pub fn relay(stream: PgStream, port: u16) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static RELAYS: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "outboxd-{}-{}-{:08x}",
        std::process::id(),
        RELAYS.fetch_add(1, Ordering::Relaxed),
        rand_u32()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    };
    let cleanup = dir.clone();
    tokio::spawn(async move {
        let accepted = tokio::time::timeout(RELAY_ACCEPT_TIMEOUT, listener.accept()).await;
        drop(listener);
        let _ = std::fs::remove_file(cleanup.join(format!(".s.PGSQL.{port}")));
        let _ = std::fs::remove_dir(&cleanup);
        let Ok(Ok((mut client, _))) = accepted else {
            return;
        };
        // The WAL flows from the server: a larger buffer that way, fewer wakeups per byte.
        let (up, down) = (8 * 1024, 128 * 1024);
        let result = match stream {
            PgStream::Plain(mut s) => {
                tokio::io::copy_bidirectional_with_sizes(&mut client, &mut s, up, down).await
            }
            PgStream::Tls(mut s) => {
                tokio::io::copy_bidirectional_with_sizes(&mut client, &mut *s, up, down).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "replication relay ended");
        }
    });
    Ok(dir)
}

/// A little randomness for the relay directory's name (its mode, not its name, keeps others
/// out).
fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
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
            "The server's certificate is not signed by a CA in {roots}: set sslrootcert to the \
             CA that signed it (managed services publish theirs), or check that outboxd \
             reaches the server you mean"
        ));
    }
    if error.contains("not valid for name") || error.contains("NotValidForName") {
        // rustls: `… is only valid for DnsName("a") or IpAddress(…)`: the quoted names.
        let presented = error
            .split_once("is only valid for ")
            .map(|(_, names)| {
                let quoted: Vec<&str> = names.split('"').skip(1).step_by(2).collect();
                if quoted.is_empty() {
                    String::new()
                } else {
                    format!(" (it names {})", quoted.join(", "))
                }
            })
            .unwrap_or_default();
        return Some(format!(
            "The server's certificate does not cover the host {host:?}{presented}: connect by a \
             name the certificate lists, or use sslmode=verify-ca to check the chain only"
        ));
    }
    if error.contains("certificate expired") || error.contains("Expired") {
        return Some(format!(
            "The server's certificate has expired (checked against {roots}): renew the server's \
             certificate; outboxd does not connect to a server whose certificate it cannot trust"
        ));
    }
    if error.contains("not valid yet") || error.contains("NotValidYet") {
        return Some(
            "The server's certificate is not valid yet: check the clocks of this host and of \
             the server"
                .to_owned(),
        );
    }
    if error.contains("no encryption") {
        return Some(format!(
            "The server accepts only TLS connections from here (pg_hba.conf hostssl), and \
             sslmode={} sent none: set sslmode=verify-full with sslrootcert (or require)",
            tls.requested
        ));
    }
    if error.contains("server does not support TLS")
        || error.contains("server does not support SSL")
        || error.contains("SSLRequest rejected")
    {
        return Some(format!(
            "The server does not offer TLS, and sslmode={} needs it: turn on ssl in \
             postgresql.conf, or connect with sslmode=prefer",
            tls.requested
        ));
    }
    if error.contains("certificate") && (error.contains("client") || error.contains("sslcert")) {
        return Some(
            "The server wants a client certificate it trusts: set sslcert and sslkey to a \
             certificate signed by the server's ssl_ca_file whose CN is the role name"
                .to_owned(),
        );
    }
    if error.contains("invalid peer certificate") || error.contains("TLS handshake failed") {
        return Some(format!(
            "The TLS handshake failed with sslmode={}: check sslrootcert, sslcert and sslkey",
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
                "does not cover the host \"db\" (it names localhost)",
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
                "does not offer TLS",
            ),
        ];
        for (error, expected) in cases {
            let text = advice(error, &tls, "db").unwrap_or_default();
            assert!(text.contains(expected), "{error}: {text}");
        }
        assert_eq!(advice("password authentication failed", &tls, "db"), None);
    }
}
