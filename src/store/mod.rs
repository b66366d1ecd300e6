//! The shared store (Redis): state several replicas must agree on — shared rate limits, failed logins,
//! revocations.
//!
//! One round trip per decision: every operation is a single command or a Lua script run atomically by Redis,
//! sent over a few multiplexed connections (concurrent requests are pipelined on them, not queued behind each
//! other). The request path never waits longer than `timeout` for Redis, and never waits at all while the
//! circuit is open: after a few failures in a row the store is taken as down, callers fall back at once, and a
//! background task reconnects (re-asking the Sentinels for the primary) and closes the circuit when Redis answers.

mod gcra;
mod revocations;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;

pub use gcra::Gcra;
pub use revocations::{Revocation, RevocationStream, Revoked};

use crate::metrics::Metrics;

/// Failures in a row that open the circuit.
const OPEN_AFTER: u32 = 3;
/// How often a background task tries to reconnect while the circuit is open.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);
/// How often the store is pinged while it is up (`portcullis_store_up` follows it).
const PING_EVERY: Duration = Duration::from_secs(1);

/// Where the store is.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreTarget {
    /// `redis://` or `rediss://` URL (credentials and database in it, or from the settings).
    Url(String),
    /// A Sentinel-managed primary: asked of the sentinels on every (re)connect, so a failover is followed.
    Sentinel { sentinels: Vec<String>, master_name: String, db: i64 },
}

/// The checked `[store]`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSettings {
    pub target: StoreTarget,
    pub username: Option<String>,
    /// Read from `password_env` when the config is loaded.
    pub password: Option<String>,
    /// PEM CA certificates for `rediss://` (else the system roots).
    pub ca_file: Option<PathBuf>,
    /// TLS to the Sentinel-managed primary (a `rediss://` URL says so itself).
    pub tls: bool,
    /// The longest a request waits for one answer from Redis.
    pub timeout: Duration,
    /// Multiplexed connections (each carries many requests at once).
    pub pool_size: usize,
    /// Replicas sharing the store: a shared limit falls back to `rate / expected_replicas` on each.
    pub expected_replicas: u32,
}

impl std::fmt::Debug for StoreSettings {
    // Never the password, nor a URL that may carry one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match &self.target {
            StoreTarget::Url(u) => redacted_url(u),
            StoreTarget::Sentinel { sentinels, master_name, .. } => format!("sentinel {master_name} via {sentinels:?}"),
        };
        f.debug_struct("StoreSettings")
            .field("target", &target)
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .field("expected_replicas", &self.expected_replicas)
            .finish_non_exhaustive()
    }
}

/// A URL with any password replaced, for logs and messages.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Checks a store URL as the client will read it: the config refuses what could never connect.
pub fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!("{:?} must start with redis:// or rediss://", redacted_url(url)));
    }
    redis::Client::open(url).map(|_| ()).map_err(|e| format!("{:?}: {e}", redacted_url(url)))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is down (circuit open; reconnecting in the background)")]
    Unavailable,
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the store answered something unexpected: {0}")]
    Unexpected(String),
    #[error("store ca_file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the failure says the store itself is unreachable or broken (and so counts toward opening the
    /// circuit), rather than something wrong with one key or one answer (a wrong-type key, a script error), which
    /// must not take every shared limit down with it.
    fn is_store_failure(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Redis(e) => {
                e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.kind() == redis::ErrorKind::Parse
            }
            _ => false,
        }
    }

    fn result_label(&self) -> &'static str {
        match self {
            StoreError::Unavailable => "unavailable",
            StoreError::Timeout(_) => "timeout",
            _ => "error",
        }
    }
}

/// What a store call is for: the `op` label of its metrics.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    RateLimit,
    Login,
    Revoke,
    RevocationsLoad,
    Ping,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::RateLimit => "rate_limit",
            Op::Login => "login",
            Op::Revoke => "revoke",
            Op::RevocationsLoad => "revocations_load",
            Op::Ping => "ping",
        }
    }
}

/// The connected store: a few multiplexed connections, the circuit, and the task that keeps them.
pub struct Store {
    pub settings: StoreSettings,
    /// None until connected, and again while the circuit is open.
    conns: ArcSwapOption<Vec<MultiplexedConnection>>,
    /// The client of the primary connected to last (subscriptions open their own connection from it).
    client: ArcSwapOption<redis::Client>,
    next: AtomicUsize,
    failures: AtomicU32,
    up: AtomicBool,
    metrics: Arc<Metrics>,
    keeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Ok(Some(task)) = self.keeper.get_mut().map(Option::take) {
            task.abort();
        }
    }
}

impl Store {
    /// Starts connecting in the background and returns at once: a gateway starts (and serves, by its fallbacks)
    /// with Redis down. Must run inside a tokio runtime.
    pub fn start(settings: StoreSettings, metrics: Arc<Metrics>) -> Arc<Store> {
        let store = Arc::new(Store::unconnected(settings, metrics));
        let task = tokio::spawn(keep(Arc::downgrade(&store)));
        if let Ok(mut k) = store.keeper.lock() {
            *k = Some(task);
        }
        store
    }

    /// Connects now, once, without a keeper (the `revoke` command, which may reach a remote Redis: it waits
    /// seconds, not the request path's `timeout`).
    pub async fn connect_once(mut settings: StoreSettings) -> Result<Arc<Store>, StoreError> {
        settings.timeout = settings.timeout.max(Duration::from_secs(5));
        let store = Arc::new(Store::unconnected(settings, Arc::new(Metrics::new())));
        store.connect().await?;
        Ok(store)
    }

    fn unconnected(settings: StoreSettings, metrics: Arc<Metrics>) -> Store {
        metrics.store_up.set(0);
        Store {
            settings,
            conns: ArcSwapOption::empty(),
            client: ArcSwapOption::empty(),
            next: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            up: AtomicBool::new(false),
            metrics,
            keeper: std::sync::Mutex::new(None),
        }
    }

    /// True while the circuit is closed (Redis answered lately).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Builds a client for the primary: the URL's, or the one the sentinels name now.
    async fn client(&self) -> Result<redis::Client, StoreError> {
        let s = &self.settings;
        let certs = match &s.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| StoreError::CaFile { path: path.clone(), source })?),
            None => None,
        };
        match &s.target {
            StoreTarget::Url(url) => {
                let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
                let mut redis_info = info.redis_settings().clone();
                if let Some(u) = &s.username {
                    redis_info = redis_info.set_username(u);
                }
                if let Some(p) = &s.password {
                    redis_info = redis_info.set_password(p);
                }
                info = info.set_redis_settings(redis_info);
                match certs {
                    Some(root) => {
                        Ok(redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(root) })?)
                    }
                    None => Ok(redis::Client::open(info)?),
                }
            }
            StoreTarget::Sentinel { sentinels, master_name, db } => {
                let mut builder = redis::sentinel::SentinelClientBuilder::new(
                    sentinels.iter().filter_map(|a| {
                        let (host, port) = a.rsplit_once(':')?;
                        Some(redis::ConnectionAddr::Tcp(host.trim_matches(['[', ']']).to_string(), port.parse().ok()?))
                    }),
                    master_name.clone(),
                    redis::sentinel::SentinelServerType::Master,
                )?
                .set_client_to_redis_db(*db);
                if let Some(u) = &s.username {
                    builder = builder.set_client_to_redis_username(u);
                }
                if let Some(p) = &s.password {
                    builder = builder.set_client_to_redis_password(p);
                }
                if s.tls {
                    builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
                }
                if let Some(root) = certs {
                    builder = builder.set_client_to_redis_certificates(redis::TlsCertificates { client_tls: None, root_cert: Some(root) });
                }
                let mut sentinel = builder.build()?;
                Ok(sentinel.async_get_client().await?)
            }
        }
    }

    /// Opens `pool_size` connections and checks them with a PING; on success the circuit closes.
    async fn connect(&self) -> Result<(), StoreError> {
        let bound = self.settings.timeout.max(Duration::from_secs(1));
        let attempt = async {
            let client = self.client().await?;
            let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(bound)).set_response_timeout(Some(bound));
            let mut conns = Vec::with_capacity(self.settings.pool_size);
            for _ in 0..self.settings.pool_size.max(1) {
                let mut c = client.get_multiplexed_async_connection_with_config(&config).await?;
                let _: String = redis::cmd("PING").query_async(&mut c).await?;
                conns.push(c);
            }
            Ok::<_, StoreError>((client, conns))
        };
        let (client, conns) = tokio::time::timeout(bound * 2, attempt).await.map_err(|_| StoreError::Timeout(bound * 2))??;
        self.client.store(Some(Arc::new(client)));
        self.conns.store(Some(Arc::new(conns)));
        self.failures.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(store = ?self.settings, "store connected");
        }
        self.metrics.store_up.set(1);
        Ok(())
    }

    /// Runs one operation on a connection, bounded by `timeout`, counted and timed; failures count toward
    /// opening the circuit.
    pub(crate) async fn call<T, F, Fut>(&self, op: Op, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let result = match self.connection() {
            None => Err(StoreError::Unavailable),
            Some(conn) => {
                let started = Instant::now();
                let r = match tokio::time::timeout(self.settings.timeout, f(conn)).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout(self.settings.timeout)),
                };
                self.metrics.store_duration.with_label_values(&[op.label()]).observe(started.elapsed().as_secs_f64());
                r
            }
        };
        let label = match &result {
            Ok(_) => {
                self.failures.store(0, Ordering::Relaxed);
                "ok"
            }
            Err(e) => {
                if e.is_store_failure() {
                    self.failed(e);
                }
                e.result_label()
            }
        };
        self.metrics.store_requests.with_label_values(&[op.label(), label]).inc();
        result
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        if !self.is_up() {
            return None;
        }
        let conns = self.conns.load();
        let conns = conns.as_ref()?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % conns.len().max(1);
        conns.get(i).cloned()
    }

    /// Counts a failure; enough in a row open the circuit (callers fall back at once until the keeper reconnects).
    fn failed(&self, e: &StoreError) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= OPEN_AFTER && self.up.swap(false, Ordering::Relaxed) {
            self.conns.store(None);
            self.metrics.store_up.set(0);
            tracing::warn!(error = %e, failures = n, "store down: circuit open, falling back until it answers again");
        }
    }

    /// A new connection for a subscription, from the primary connected to last.
    pub(crate) async fn pubsub(&self) -> Result<redis::aio::PubSub, StoreError> {
        let client = self.client.load_full().ok_or(StoreError::Unavailable)?;
        let bound = self.settings.timeout.max(Duration::from_secs(1));
        Ok(tokio::time::timeout(bound, client.get_async_pubsub()).await.map_err(|_| StoreError::Timeout(bound))??)
    }

    /// The bound on setting up a subscription (a Redis that accepts and then hangs must not stall its follower).
    pub(crate) fn setup_bound(&self) -> Duration {
        self.settings.timeout.max(Duration::from_secs(1))
    }
}

/// Keeps the store connected: pings it while up, reconnects while down. Holds only a weak reference, so it ends
/// with the store.
async fn keep(store: Weak<Store>) {
    let mut reported = false;
    loop {
        let Some(s) = store.upgrade() else { return };
        let wait = if s.is_up() {
            let _ = s.call(Op::Ping, |mut c| async move { Ok(redis::cmd("PING").query_async::<String>(&mut c).await?) }).await;
            PING_EVERY
        } else {
            match s.connect().await {
                Ok(()) => reported = false,
                Err(e) if !reported => {
                    tracing::warn!(error = %e, store = ?s.settings, "store unreachable: shared state falls back until it answers");
                    reported = true;
                }
                Err(_) => {}
            }
            RECONNECT_EVERY
        };
        drop(s);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("rediss://cache.example:6380").is_ok());
        assert!(check_url("http://127.0.0.1:6379").is_err());
        assert!(check_url("redis://127.0.0.1:notaport").is_err());
        let e = check_url("redis://u:hunter2@127.0.0.1:notaport").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(redacted_url("redis://u:hunter2@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redacted_url("redis://h:1/0"), "redis://h:1/0");
    }
}
