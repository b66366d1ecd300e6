//! Idle keep-alive connections to one plain-http upstream, for the lean HTTP/1.1 exchange in `h1_client`.
//!
//! The pool is sharded by worker thread: a request takes and returns connections on its own thread's shard, so
//! the shard's lock is uncontended (it is shared only with the reaper, every few seconds). Connections are
//! reused newest first; one that idled past `idle_timeout`, was closed by the upstream, or has unexpected bytes
//! waiting is dropped rather than handed out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::h1::deadline::Deadline;

/// One connection to the upstream with its read buffer (allocated by an exchange's first read, let go when the
/// connection returns to the pool: an idle connection holds no read buffer).
#[derive(Debug)]
pub struct Conn {
    pub io: TcpStream,
    pub buf: BytesMut,
    /// The request head is encoded here; kept to reuse its allocation.
    pub head: Vec<u8>,
    /// The current exchange's response deadline; its timer lives as long as the connection.
    pub deadline: Deadline,
}

impl Conn {
    /// Wraps a new connection. Must run inside tokio (the deadline's timer).
    pub fn new(io: TcpStream) -> Conn {
        let deadline = Deadline::new(tokio::time::Instant::now());
        Conn { io, buf: BytesMut::new(), head: Vec::with_capacity(512), deadline }
    }

    /// True unless the upstream has closed the connection or sent bytes nobody asked for. The socket itself is
    /// asked (a non-blocking peek, one system call per reuse) every time: tokio's reactor records readiness only
    /// when it polls (when a worker parks, or every few dozen task polls), so under load or with pipelined
    /// requests a connection is taken again before it has looked. Stray bytes that form a whole answer (an
    /// upstream writing a body after a HEAD, 204 or 304 answer, or past its Content-Length) would then be read as
    /// the next request's answer, and every answer after it on that connection would go to the wrong client.
    /// Bytes that arrive after this look are indistinguishable from the answer and are an upstream's own race.
    fn is_quiet_now(&self) -> bool {
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(&self.io).peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// How much a read asks for at a time.
pub const READ_CHUNK: usize = 16 * 1024;

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

pub struct Pool {
    shards: Box<[Mutex<Vec<Idle>>]>,
    max_idle_per_shard: usize,
    idle_timeout: Duration,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl Pool {
    /// Returns a pool and starts its reaper, which ends when the pool is dropped. Must run inside tokio.
    pub fn new(idle_timeout: Duration, max_idle: usize) -> Arc<Pool> {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(1, 64);
        let pool = Arc::new(Pool {
            shards: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            max_idle_per_shard: max_idle.div_ceil(shards).max(1),
            idle_timeout,
        });
        tokio::spawn(reap_until_dropped(Arc::downgrade(&pool), idle_timeout / 4));
        pool
    }

    fn shard(&self) -> &Mutex<Vec<Idle>> {
        let i = SHARD.with(|s| *s) % self.shards.len();
        &self.shards[i]
    }

    /// Takes the most recently used connection that is still good, if any.
    pub fn take(&self, now: Instant) -> Option<Box<Conn>> {
        let mut idle = self.shard().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(i) = idle.pop() {
            if now.saturating_duration_since(i.since) < self.idle_timeout && i.conn.is_quiet_now() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Returns a connection whose last exchange ended cleanly. Its read buffer is let go: a pool of idle
    /// connections after a burst would otherwise hold 16 KiB each until they time out.
    pub fn put(&self, mut conn: Box<Conn>) {
        if !conn.buf.is_empty() {
            return;
        }
        conn.buf = BytesMut::new();
        let mut idle = self.shard().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.max_idle_per_shard {
            idle.push(Idle { conn, since: Instant::now() });
        }
    }

    /// Drops connections that idled too long or that the upstream closed, so they do not linger in CLOSE_WAIT.
    fn reap(&self) {
        for shard in self.shards.iter() {
            let mut idle = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            idle.retain(|i| i.since.elapsed() < self.idle_timeout && i.conn.is_quiet_now());
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |v| v.len())).sum()
    }
}

async fn reap_until_dropped(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.reap(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (Box<Conn>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (Box::new(Conn::new(c)), s)
    }

    #[tokio::test]
    async fn closed_connections_and_unasked_bytes_are_not_reused() {
        let pool = Pool::new(Duration::from_secs(60), 8);
        let (a, a_peer) = pair().await;
        let (b, mut b_peer) = pair().await;
        // The upstream closes one and sends garbage on the other: neither may be handed out.
        drop(a_peer);
        b_peer.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        a.io.readable().await.unwrap();
        b.io.readable().await.unwrap();
        pool.put(a);
        pool.put(b);
        assert_eq!(pool.idle_count(), 2);
        assert!(pool.take(Instant::now()).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn the_reaper_asks_the_socket_itself() {
        let pool = Pool::new(Duration::from_secs(60), 8);
        let (a, mut a_peer) = pair().await;
        // No await between the upstream's write and the reap: tokio's reactor has recorded nothing yet, so
        // only asking the socket itself can see the stray bytes.
        a_peer.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        for _ in 0..1000 {
            if socket2::SockRef::from(&a.io).peek(&mut probe).is_ok() {
                break;
            }
            std::thread::yield_now();
        }
        pool.put(a);
        pool.reap();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_with_a_stray_answer_waiting_is_not_taken() {
        let pool = Pool::new(Duration::from_secs(60), 8);
        let (a, mut a_peer) = pair().await;
        pool.put(a);
        // A whole answer nobody asked for, written after the connection went idle; no await between it and the
        // take, so tokio's reactor has recorded nothing (as under load, or for a pipelined request).
        a_peer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nSMUGGL").await.unwrap();
        let idle = pool.shard().lock().unwrap();
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        for _ in 0..1000 {
            if socket2::SockRef::from(&idle[0].conn.io).peek(&mut probe).is_ok() {
                break;
            }
            std::thread::yield_now();
        }
        drop(idle);
        assert!(pool.take(Instant::now()).is_none(), "a stray answer would be taken for the next request's");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn the_reaper_drops_connections_the_upstream_closed() {
        let pool = Pool::new(Duration::from_secs(60), 8);
        let (a, a_peer) = pair().await;
        drop(a_peer);
        a.io.readable().await.unwrap();
        pool.put(a);
        pool.reap();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_quiet_connection_comes_back_and_the_cap_holds() {
        let pool = Pool::new(Duration::from_secs(60), 1);
        let (a, _a_peer) = pair().await;
        let (b, _b_peer) = pair().await;
        pool.put(a);
        pool.put(b);
        assert_eq!(pool.idle_count(), pool.max_idle_per_shard.min(2));
        assert!(pool.take(Instant::now()).is_some());
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer() {
        let pool = Pool::new(Duration::from_secs(60), 8);
        let (mut a, _peer) = pair().await;
        a.buf.reserve(READ_CHUNK);
        pool.put(a);
        let back = pool.take(Instant::now()).unwrap();
        assert_eq!(back.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn stale_connections_are_not_reused() {
        let pool = Pool::new(Duration::from_millis(1), 8);
        let (a, _peer) = pair().await;
        pool.put(a);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(pool.take(Instant::now()).is_none());
    }
}
