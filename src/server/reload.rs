//! Hot reload: on SIGHUP or when gateway.toml (or a file it names) changes, load and validate the whole new
//! config off the hot path and swap it in atomically; on any error keep the old one.
//!
//! Requests in flight hold an `Arc` of the Gateway they started with and finish under it. Listener addresses and
//! TLS settings other than the certificate need a restart: that is logged, never half-applied.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;
use crate::server::Shared;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS certificate: {0}")]
    Tls(#[from] crate::server::tls::TlsError),
    #[error("building the new gateway: {0}")]
    Build(#[from] crate::gateway::BuildError),
    #[error("the config loader task failed")]
    Task,
    #[error("issuer {issuer:?} had keys, and its new key source gave none: {source}")]
    Jwks { issuer: String, source: crate::auth::jwks::JwksError },
}

/// Loads the config file again and swaps it in if it validates. Counts the outcome either way.
pub async fn reload(shared: &Shared) -> Result<(), ReloadError> {
    // One at a time (SIGHUP and the file watcher may both fire): a slower reload of older content must never
    // be stored after a newer one.
    let _one = shared.reloading.lock().await;
    let result = try_reload(shared).await;
    let m = &shared.metrics;
    match &result {
        Ok(()) => {
            m.config_reloads.with_label_values(&["ok"]).inc();
            m.config_last_reload_successful.set(1);
            m.config_last_reload_success
                .set(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64));
            tracing::info!("configuration reloaded");
        }
        Err(e) => {
            m.config_reloads.with_label_values(&["error"]).inc();
            m.config_last_reload_successful.set(0);
            tracing::error!("reload failed, keeping the running configuration:\n{e}");
        }
    }
    result
}

async fn try_reload(shared: &Shared) -> Result<(), ReloadError> {
    let old = shared.gateway.load_full();
    let path = old.config.path.clone();
    let config = tokio::task::spawn_blocking(move || Config::load(&path)).await.map_err(|_| ReloadError::Task)??;
    let started = &shared.started;
    let (o, n) = (&started.listen, &config.listen);
    if o.https != n.https || o.http != n.http || o.admin != n.admin {
        tracing::warn!("listen addresses changed: this needs a restart; keeping the current listeners");
    }
    let (o, n) = (&started.limits, &config.limits);
    if o.max_connections != n.max_connections
        || o.max_header_bytes != n.max_header_bytes
        || o.idle != n.idle
        || o.drain_timeout != n.drain_timeout
        || o.max_concurrent_streams != n.max_concurrent_streams
    {
        tracing::warn!(
            "limits.max_connections, max_header_bytes, idle_timeout, max_concurrent_streams and drain_timeout changed: they apply at start, \
             restart to change them (the rest of the configuration is reloaded)"
        );
    }
    if started.worker_threads != config.worker_threads {
        tracing::warn!("server.worker_threads changed: this needs a restart");
    }
    let mut new_key = None;
    if let (Some(_), Some(tls)) = (&shared.tls, &config.tls) {
        new_key = Some(crate::server::tls::load_certified_key(tls)?);
        if started.tls.as_ref().is_some_and(|t| {
            t.min_version != tls.min_version || t.handshake_timeout != tls.handshake_timeout || t.session_tickets != tls.session_tickets
        }) {
            tracing::warn!("tls.min_version, tls.handshake_timeout or tls.session_tickets changed: this needs a restart");
        }
    }
    let gateway = Gateway::new(Arc::new(config), shared.metrics.clone(), Some(&old), &shared.resolver)?;
    // A validating config must not take a working gateway to refusing every user of an issuer: keys from a
    // changed source are fetched before the swap, and if they cannot be, the running config stays.
    gateway.fetch_keys_lost_since(&old).await.map_err(|(issuer, source)| ReloadError::Jwks { issuer, source })?;
    // Only once everything has loaded: a reload that fails at any step must not leave a new certificate
    // serving beside the old config (never half-applied).
    if let (Some(resolver), Some(key)) = (&shared.tls, new_key) {
        resolver.set(key);
    }
    if let (Some(v), Some(tls)) = (&shared.client_verifier, &gateway.config.tls) {
        // A CRL or CA file that no longer loads keeps the verifier in force, said loudly.
        if let Err(e) = v.reload(tls) {
            tracing::error!(error = %e, "client certificate CAs or CRL not reloaded; the previous ones stay in force");
        }
    }
    let gateway = Arc::new(gateway);
    shared.gateway.store(gateway.clone());
    // Committed: the series of targets (and upstreams) the new config no longer has go now, not before.
    old.forget_upstream_metrics_missing_from(&gateway);
    Ok(())
}

/// The files a config depends on: itself, users and clients files, TLS pair, public keys.
fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.path.clone()];
    if let Some(t) = &config.tls {
        files.push(t.cert.clone());
        files.push(t.key.clone());
    }
    if let Some(te) = &config.token_endpoint {
        files.extend(te.users_file.iter().cloned());
        files.extend(te.clients_file.iter().cloned());
    }
    files.extend(config.watch_files.iter().cloned());
    files
}

fn fingerprint(files: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        // Contents, not mtimes: two writes within one timestamp tick must still be seen.
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

/// Polls the config and the files it names; a change (settled for one poll) triggers a reload.
pub async fn watch(shared: Arc<Shared>, every: Duration) {
    let mut files = watched_files(&shared.gateway.load().config);
    let mut seen = fingerprint(&files);
    let mut pending: Option<u64> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let list = files.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&list)).await else { continue };
        if now == seen {
            pending = None;
            continue;
        }
        // Debounce: an editor writing in several steps is read once it has stopped changing.
        if pending != Some(now) {
            pending = Some(now);
            continue;
        }
        pending = None;
        let _ = reload(&shared).await;
        // What triggered this reload is what was seen: a write during the reload is seen on the next tick.
        let now_files = watched_files(&shared.gateway.load().config);
        seen = if now_files == files { now } else { fingerprint(&now_files) };
        files = now_files;
    }
}

/// Returns true if `path` exists; a config built from text has nothing on disk to watch.
pub fn watchable(path: &Path) -> bool {
    path.is_file()
}
