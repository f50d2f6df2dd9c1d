//! Test certificates: a CA made per test, server certificates it signs (valid, expired), a
//! client certificate, and a second CA that signed none of them. PEM files in a directory of
//! the test's own, keys mode 0600 and owned by the server's user where the server needs that.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, date_time_ymd,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
}

/// Everything a TLS test needs, written under one directory.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// The CA that signed the certificates below.
    pub ca: PathBuf,
    /// A CA that signed nothing here (the wrong CA).
    pub other_ca: PathBuf,
    /// A server certificate for `DNS:localhost` only (no IP address: connecting to
    /// 127.0.0.1 under verify-full must fail on the name).
    pub server: CertFiles,
    /// The same name, expired since 2021.
    pub expired: CertFiles,
    /// A client certificate with CN `outboxd` (Postgres maps the CN to the role).
    pub client: CertFiles,
}

impl TestPki {
    /// Makes the CA and certificates in `dir`.
    pub fn create(dir: &Path) -> TestPki {
        fs::create_dir_all(dir).expect("pki dir");
        let ca = new_ca("outboxd test CA");
        let other = new_ca("some other CA");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).expect("write pem");
            path
        };
        let leaf = |name: &str, sans: &[&str], cn: &str, client: bool, expired: bool| {
            let key = KeyPair::generate().expect("key");
            let mut params =
                CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                    .expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages.push(if client {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            });
            if expired {
                params.not_before = date_time_ymd(2020, 1, 1);
                params.not_after = date_time_ymd(2021, 1, 1);
            }
            let cert = params.signed_by(&key, &ca).expect("sign");
            let cert_path = write(&format!("{name}.crt"), &cert.pem());
            let key_path = write(&format!("{name}.key"), &key.serialize_pem());
            fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod");
            CertFiles {
                cert: cert_path,
                key: key_path,
            }
        };
        TestPki {
            dir: dir.to_owned(),
            ca: write("ca.crt", &ca.pem()),
            other_ca: write("other-ca.crt", &other.pem()),
            server: leaf("server", &["localhost"], "localhost", false, false),
            expired: leaf("expired", &["localhost"], "localhost", false, true),
            client: leaf("client", &[], "outboxd", true, false),
        }
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
}
