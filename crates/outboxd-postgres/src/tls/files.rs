//! The files TLS reads: the trusted root certificates ([`Roots`]: a file, or the operating
//! system's bundle), and the client certificate and its key, all PEM.
//!
//! Guarantees: a file that cannot be read, is not PEM or holds nothing usable is a
//! [`TlsConfigError::File`] naming the connection-string key and the path, with the reason;
//! a key's bytes never reach a message. The system bundle is `$SSL_CERT_FILE`, else the
//! first of [`SYSTEM_BUNDLES`] that exists.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsConfigError;

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

/// Where operating systems keep their CA bundle (the first that exists is taken).
pub(super) const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The operating system's CA bundle: `$SSL_CERT_FILE`, else the first of [`SYSTEM_BUNDLES`]
/// that exists.
pub(super) fn system_bundle() -> Result<PathBuf, TlsConfigError> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(TlsConfigError::NoSystemBundle)
}

/// The root certificates of a PEM file (`sslrootcert`); at least one.
pub(super) fn load_roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
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

/// The client certificate chain of a PEM file (`sslcert`); at least one certificate.
pub(super) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error("sslcert", path, pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("sslcert", path, pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(file_error("sslcert", path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The client's private key of a PEM file (`sslkey`).
pub(super) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    // The key's bytes never reach a message: only the reason.
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        file_error(
            "sslkey",
            path,
            match e {
                pem::Error::NoItemsFound => {
                    "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned()
                }
                other => pem_reason(&other),
            },
        )
    })
}

fn file_error(key: &'static str, path: &Path, why: impl fmt::Display) -> TlsConfigError {
    TlsConfigError::File {
        key,
        path: path.to_owned(),
        why: why.to_string(),
    }
}

fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(io) => io.to_string(),
        pem::Error::NoItemsFound => "holds no PEM item".to_owned(),
        _ => "is not a valid PEM file".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::tls::{PgTls, TlsParams};

    fn params(mode: &str, root: &str) -> TlsParams {
        TlsParams {
            sslmode: Some(mode.to_owned()),
            sslrootcert: Some(root.to_owned()),
            ..TlsParams::default()
        }
    }

    #[test]
    fn unreadable_root_files_are_named() {
        let err = PgTls::resolve(&params("verify-full", "/nonexistent/ca.pem"), None)
            .expect_err("missing file");
        let text = err.to_string();
        assert!(
            text.contains("sslrootcert=/nonexistent/ca.pem") && text.contains("No such file"),
            "{text}"
        );
        let not_pem = std::env::temp_dir().join(format!("outboxd-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "hello").expect("write");
        let err = PgTls::resolve(&params("require", &not_pem.to_string_lossy()), None)
            .expect_err("not PEM");
        let _ = std::fs::remove_file(&not_pem);
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
