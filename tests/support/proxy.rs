//! A TCP proxy the test controls, to cut the network between outboxd and a server.
//!
//! `cut()` closes every proxied connection and stops listening (new connections are
//! refused); `restore()` listens again on the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A proxy from a local port to `target`.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding a free local port to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> Proxy {
        let mut p = Proxy {
            port: super::free_port(),
            target: SocketAddr::from(([127, 0, 0, 1], target_port)),
            tasks: Arc::new(Mutex::new(Vec::new())),
            acceptor: None,
        };
        p.restore();
        p
    }

    /// Listens (again) and forwards.
    pub fn restore(&mut self) {
        assert!(self.acceptor.is_none(), "proxy already listening");
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], self.port)))
            .expect("bind the proxy port");
        let listener = socket.listen(64).expect("listen");
        let (target, tasks) = (self.target, self.tasks.clone());
        self.acceptor = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().expect("lock").push(task);
            }
        }));
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&mut self) {
        if let Some(a) = self.acceptor.take() {
            a.abort();
        }
        for task in self.tasks.lock().expect("lock").drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
