//! A real `redis-server` on a free loopback port with its own temporary folder: started, killed and restarted by
//! the test, stopped when dropped. Without `redis-server` the test is skipped (Debian package `redis-server`),
//! unless PORTCULLIS_REQUIRE_ALL=1.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, require_tool, BOUND};

pub struct RedisServer {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers PING; None (the test is skipped) without `redis-server`.
    pub async fn start() -> Option<RedisServer> {
        let bin = require_tool(&["redis-server"], "redis-server")?;
        let mut r = RedisServer { port: free_port(), bin, dir: tempfile::tempdir().unwrap(), child: None };
        r.restart().await;
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it at once (SIGKILL: no goodbye to its clients, as a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same port, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + BOUND;
        loop {
            if let Ok(mut c) = self.connection().await {
                if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not answer on port {}", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A connection of the test's own, to look at and change what the gateways keep there.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?.get_multiplexed_async_connection().await
    }

    /// The keys matching `pattern`.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.connection().await.expect("redis connection");
        redis::cmd("KEYS").arg(pattern).query_async(&mut c).await.expect("KEYS")
    }
}

/// A Sentinel (`redis-server --sentinel`) monitoring `primary` as `mymaster`, on its own free port.
pub struct Sentinel {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    /// Starts one and waits until it names the primary.
    pub async fn start(primary: &RedisServer) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(&conf, format!("port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 1\n", primary.port)).unwrap();
        let child = Command::new(&primary.bin)
            .arg(&conf)
            .arg("--sentinel")
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel starts");
        let s = Sentinel { port, child, _dir: dir };
        let deadline = Instant::now() + BOUND;
        loop {
            let named = async {
                let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))?.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg("mymaster").query_async::<Vec<String>>(&mut c).await
            };
            if named.await.is_ok_and(|a| a.get(1) == Some(&primary.port.to_string())) {
                return s;
            }
            assert!(Instant::now() < deadline, "the sentinel on port {port} did not name the primary");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
