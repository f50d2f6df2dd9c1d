//! The replication connection's TLS: negotiated by outboxd ([`PgTls::connect`]) and served,
//! decrypted, to pgwire-replication over a Unix socket ([`relay()`]).
//!
//! Guarantees:
//! - [`PgTls::connect`] negotiates as libpq does: an SSLRequest, then the handshake with the
//!   same rustls configuration as the SQL connection; a server that declines TLS is an error
//!   unless the mode is `prefer`, which goes on in plain;
//! - the relay's socket lives in a new directory of mode 0700, serves one client, and is
//!   removed with its directory once that client is connected or after
//!   [`RELAY_ACCEPT_TIMEOUT`]; the relay ends when either side closes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgwire_replication::PgWireError;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{PgTls, SslMode};

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

impl PgTls {
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
    tokio::spawn(serve_one(listener, dir.clone(), socket, stream));
    Ok(dir)
}

/// Accepts one client on `listener`, removes `socket` and `dir`, then copies bytes between
/// the client and `stream` until either side closes.
async fn serve_one(listener: UnixListener, dir: PathBuf, socket: PathBuf, stream: PgStream) {
    let accepted = tokio::time::timeout(RELAY_ACCEPT_TIMEOUT, listener.accept()).await;
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir(&dir);
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
