//! Raw sockets, for what a well-behaved client library cannot send, and addresses for peers that are not there or
//! not yet there.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Sends raw bytes over plain TCP to `addr` and reads until the peer closes or `wait` passes.
/// Returns what was read and whether the peer closed the connection.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_until_closed(&mut s, wait).await
}

/// Like [`raw_exchange`], but a write the server refuses (it answered and closed early) is not a failure: what
/// was read is still returned. Returns the bytes read and whether the server closed the connection.
pub async fn raw_lenient(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    read_until_closed(&mut s, wait).await
}

/// Reads until the peer closes or `wait` passes; returns what was read and whether the peer closed.
async fn read_until_closed(s: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// An address on 127.0.0.1 that refuses every connection for as long as the returned socket lives: the socket
/// holds the port (bound, so no one else can take it meanwhile) but never listens. For an upstream that is down.
pub fn refusing_addr() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A TCP relay on a port of its own (bound at port 0 and held), forwarding every connection to the address given
/// to [`Relay::forward_to`]: an address to write into a server's config before that server has started and
/// reported the port it bound.
pub struct Relay {
    pub addr: SocketAddr,
    target: Arc<OnceLock<SocketAddr>>,
}

impl Relay {
    pub async fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: Arc<OnceLock<SocketAddr>> = Arc::default();
        let to = target.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *to.get().expect("the relay forwards nowhere yet");
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { addr, target }
    }

    /// Sets where connections go (once).
    pub fn forward_to(&self, to: SocketAddr) {
        self.target.set(to).expect("the relay already forwards elsewhere");
    }
}

/// Waits until connecting to `addr` is refused: its listener has closed. (A connection the kernel accepted just
/// before the listener closed may still succeed; it is dropped and the next attempt made.)
pub async fn until_refused(addr: SocketAddr) {
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // Reset: the listener closed during this very handshake; the next attempt tells.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect to {addr}: unexpected error {e}"),
            Ok(s) => drop(s),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
