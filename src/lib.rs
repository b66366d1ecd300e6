//! Portcullis: a reverse-proxy authentication gateway.
//!
//! A request goes top to bottom through: accept, connection limits and TLS ([`server`]) -> HTTP/1.1 ([`h1`], or
//! hyper for bodies, upgrades and HTTP/2) -> [`gateway::Gateway::handle`], which runs the stages: route match
//! ([`router`]) -> authenticate and authorize ([`auth`]) -> rate limit and header rules ([`edge`]) -> forward
//! to a target of the route's upstream ([`upstream`]) -> response headers ([`edge`]) -> metrics and access log ([`metrics`], [`logging`]). The token
//! endpoint is [`token_endpoint`]; [`config`] turns `gateway.toml` into the stages' settings; errors become answers
//! in [`error`] only. Dependencies run one way: `server` -> `gateway` -> stages -> `h1` -> `edge`, never back.

#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod config;
pub mod edge;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod h1;
pub mod logging;
pub mod metrics;
pub mod router;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls_client;
pub mod token_endpoint;
pub mod tools;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Semaphore};

pub use config::Config;
pub use gateway::Gateway;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS: {0}")]
    Tls(#[from] server::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] gateway::BuildError),
}

/// A started gateway: the addresses it bound and a handle to stop it.
pub struct RunningGateway {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The forward-auth decisions listener (`[listen] decisions`).
    pub decisions: Option<SocketAddr>,
    shared: Arc<server::Shared>,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl RunningGateway {
    /// Begins a graceful shutdown: the public listeners close at once, `readyz` turns 503, in-flight requests
    /// finish. The admin listener keeps serving until the drain has ended.
    pub fn begin_shutdown(&self) {
        self.shared.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
    }

    /// Waits until every connection has drained (or `drain_timeout` passed).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Shuts down gracefully and waits for the drain.
    pub async fn stop(self) {
        self.begin_shutdown();
        self.wait().await;
    }

    /// Loads the config file again and swaps it in if valid (what SIGHUP does).
    pub async fn reload(&self) -> Result<(), server::reload::ReloadError> {
        server::reload::reload(&self.shared).await
    }

    /// Returns the state shared with the connections (current gateway, drain flag).
    pub fn shared(&self) -> &Arc<server::Shared> {
        &self.shared
    }
}

/// Starts a gateway from a checked config: generates the self-signed pair if asked, binds every listener, and
/// serves until [`RunningGateway::stop`]. Must be called inside a tokio runtime.
pub async fn start(config: Config) -> Result<RunningGateway, StartError> {
    start_with(config, upstream::resolve::system()).await
}

/// [`start`] with another resolver for upstream host names than the system's (tests change its answers).
pub async fn start_with(config: Config, names: upstream::Resolver) -> Result<RunningGateway, StartError> {
    let config = Arc::new(config);
    let mut acceptor = None;
    let mut resolver = None;
    let mut client_verifier = None;
    if let Some(t) = &config.tls {
        server::tls::ensure_self_signed(t)?;
        let r = Arc::new(server::tls::CertResolver::new(server::tls::load_certified_key(t)?));
        client_verifier = server::tls::ClientVerifier::new(t)?;
        let server_config = server::tls::server_config(t, r.clone(), client_verifier.clone())?;
        acceptor = Some((tokio_rustls::TlsAcceptor::from(server_config), t.handshake_timeout));
        resolver = Some(r);
    }
    let bind = |addr: SocketAddr| async move { server::bind(addr).await.map_err(|source| StartError::Bind { addr, source }) };
    let https = match (config.listen.https, &acceptor) {
        (Some(a), Some(_)) => Some(bind(a).await?),
        _ => None,
    };
    let http = match config.listen.http {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let admin = match config.listen.admin {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let decisions = match config.listen.decisions {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let local = |l: &Option<tokio::net::TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (https_addr, http_addr, admin_addr, decisions_addr) = (local(&https), local(&http), local(&admin), local(&decisions));

    let metrics = Arc::new(metrics::Metrics::new());
    let gateway = Gateway::new(config.clone(), metrics.clone(), None, &names)?;
    metrics.config_reloads.with_label_values(&["ok"]).inc();
    metrics.config_last_reload_success.set(unix_now());
    metrics.config_last_reload_successful.set(1);
    let shared = Arc::new(server::Shared {
        gateway: ArcSwap::from_pointee(gateway),
        metrics,
        draining: AtomicBool::new(false),
        tls: resolver,
        client_verifier,
        reloading: Default::default(),
        per_client: Default::default(),
        protocol_errors_unreported: Default::default(),
        protocol_errors_reported_at: Default::default(),
        started: config.clone(),
        resolver: names,
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let builder = Arc::new(server::http_builder(&config.limits));
    let connections = Arc::new(Semaphore::new(config.limits.max_connections));
    let mut loops = Vec::new();
    for (label, listener, tls) in [("https", https, acceptor), ("http", http, None), ("decisions", decisions, None)] {
        if let Some(l) = listener {
            loops.push(tokio::spawn(server::accept_loop(
                label,
                l,
                tls,
                shared.clone(),
                connections.clone(),
                builder.clone(),
                graceful.clone(),
                shutdown_rx.clone(),
            )));
        }
    }
    if server::reload::watchable(&config.path) {
        let (shared, mut stop) = (shared.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = server::reload::watch(shared, std::time::Duration::from_millis(250)) => {},
                _ = stop.changed() => {},
            }
        });
    }
    // The admin listener stops after the drain, not with the public ones: probes are answered throughout it.
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let admin_task = admin.map(|l| tokio::spawn(server::admin_loop(l, shared.clone(), admin_stop_rx)));
    let drain_timeout = config.limits.drain_timeout;
    let done = tokio::spawn(async move {
        for l in loops {
            let _ = l.await;
        }
        // Every accept loop has ended, so this is the last reference and every connection is being watched.
        match Arc::try_unwrap(graceful) {
            Ok(g) => {
                if tokio::time::timeout(drain_timeout, g.shutdown()).await.is_err() {
                    tracing::warn!(?drain_timeout, "drain timeout passed with connections still open");
                }
            }
            Err(_) => {
                tracing::warn!("graceful shutdown handle still shared; not waiting for drain")
            }
        }
        let _ = admin_stop.send(true);
        if let Some(a) = admin_task {
            let _ = a.await;
        }
    });
    Ok(RunningGateway {
        https: https_addr,
        http: http_addr,
        admin: admin_addr,
        decisions: decisions_addr,
        shared,
        shutdown: shutdown_tx,
        done,
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
