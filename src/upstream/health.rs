//! Target health: active checks (a GET on a path, every `interval`), passive ejection (a target with
//! `eject_after_errors` gateway failures in a row gets no new requests for `eject_for`), and the background task
//! of an upstream that runs the checks, expires ejections into the metrics and re-resolves names.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};

use super::{Target, Upstream};
use crate::body::Body;

/// An active check: what is asked, how often, and how many results in a row change a target's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCheck {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

/// `[upstreams.NAME.health]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub check: Option<ActiveCheck>,
    /// Consecutive gateway failures (connect, reset, timeout, 502/503/504) that eject a target; 0: never.
    pub eject_after_errors: u32,
    pub eject_for: Duration,
    /// At most this share of the targets is ejected at once.
    pub max_ejected_percent: u32,
}

impl Default for HealthSettings {
    fn default() -> HealthSettings {
        HealthSettings { check: None, eject_after_errors: 5, eject_for: Duration::from_secs(30), max_ejected_percent: 50 }
    }
}

/// One target's health, read by every request (`available`) and written by checks and failures.
#[derive(Debug)]
pub struct TargetHealth {
    /// The active checks' verdict (true until they say otherwise).
    checked_healthy: AtomicBool,
    /// Results in a row of the current kind: positive successes, negative failures.
    streak: AtomicU32,
    streak_ok: AtomicBool,
    /// Gateway failures in a row.
    errors: AtomicU32,
    /// Ejected until this time on the upstream's clock (ms); 0: not ejected.
    ejected_until: AtomicU64,
}

impl TargetHealth {
    pub fn new() -> TargetHealth {
        TargetHealth {
            checked_healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            streak_ok: AtomicBool::new(true),
            errors: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    /// Takes new requests: healthy by its checks and not ejected.
    pub fn available(&self, now_ms: u64) -> bool {
        self.checked_healthy.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now_ms
    }

    fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// Records one check result; returns the new verdict when it changed. Passing `healthy_after` checks in a row
    /// also ends an ejection: the target has shown it is back.
    fn checked(&self, ok: bool, check: &ActiveCheck, now_ms: u64) -> Option<bool> {
        let n = if self.streak_ok.swap(ok, Ordering::Relaxed) == ok {
            self.streak.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.streak.store(1, Ordering::Relaxed);
            1
        };
        let healthy = self.checked_healthy.load(Ordering::Relaxed);
        if ok && n >= check.healthy_after && self.ejected(now_ms) {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.checked_healthy.store(true, Ordering::Relaxed);
            return Some(true);
        }
        let flip = if ok { !healthy && n >= check.healthy_after } else { healthy && n >= check.unhealthy_after };
        if flip {
            self.checked_healthy.store(ok, Ordering::Relaxed);
            return Some(ok);
        }
        None
    }
}

impl Default for TargetHealth {
    fn default() -> Self {
        TargetHealth::new()
    }
}

impl Upstream {
    /// Passive health: records the outcome of one exchange with `t` (`failed`: no answer, or 502/503/504), and
    /// ejects the target after `eject_after_errors` failures in a row, unless `max_ejected_percent` are out already.
    pub(crate) fn observe(&self, t: &Target, failed: bool) {
        let h = &self.settings.health;
        if !failed {
            // A write only when there is something to reset: the common case reads one shared word.
            if t.health.errors.load(Ordering::Relaxed) != 0 {
                t.health.errors.store(0, Ordering::Relaxed);
            }
            return;
        }
        if h.eject_after_errors == 0 || t.health.errors.fetch_add(1, Ordering::Relaxed) + 1 < h.eject_after_errors {
            return;
        }
        t.health.errors.store(0, Ordering::Relaxed);
        let now = self.now_ms();
        let set = self.targets.load();
        let out = set.targets.iter().filter(|x| x.health.ejected(now)).count();
        let most = set.targets.len() * h.max_ejected_percent as usize / 100;
        if t.health.ejected(now) || out >= most {
            return;
        }
        let until = now.saturating_add(u64::try_from(h.eject_for.as_millis()).unwrap_or(u64::MAX)).max(1);
        let was = t.health.ejected_until.load(Ordering::Relaxed);
        // One failure ejects, not each of those that raced to it.
        if t.health.ejected_until.compare_exchange(was, until, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return;
        }
        // Its passing checks before this do not count towards its return.
        t.health.streak.store(0, Ordering::Relaxed);
        t.ejections.inc();
        t.healthy_gauge.set(0);
        tracing::warn!(upstream = %self.settings.name, target = %t.label, errors = h.eject_after_errors, eject_for = ?h.eject_for, "target ejected");
    }

    /// Brings each target's `portcullis_upstream_target_healthy` up to date (ejections end on their own).
    fn refresh_gauges(&self) {
        let now = self.now_ms();
        for t in &self.targets.load().targets {
            t.healthy_gauge.set(i64::from(t.health.available(now)));
        }
    }
}

/// An upstream needs its task when something can change without a request: checks, ejections of one of several
/// targets, re-resolution.
pub fn needs_task(up: &Upstream) -> bool {
    let s = &up.settings;
    s.health.check.is_some() || s.resolve_every.is_some() || (s.targets.len() > 1 && s.health.eject_after_errors > 0)
}

/// The upstream's background task: ends when the upstream is dropped (replaced by a reload, and its last request
/// done).
pub async fn run(up: Weak<Upstream>) {
    let Some(first) = up.upgrade() else { return };
    let check_every = first.settings.health.check.as_ref().map(|c| c.interval);
    let resolve_every = first.settings.resolve_every;
    let tick = [check_every, resolve_every, Some(Duration::from_secs(1))].into_iter().flatten().min().unwrap_or(Duration::from_secs(1));
    drop(first);
    let (mut next_check, mut next_resolve) = (Instant::now(), Instant::now());
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(up) = up.upgrade() else { return };
        let now = Instant::now();
        if let Some(every) = resolve_every.filter(|_| now >= next_resolve) {
            next_resolve = now.checked_add(every).unwrap_or(now + Duration::from_secs(86_400));
            super::resolve::refresh(&up).await;
        }
        if let Some(every) = check_every.filter(|_| now >= next_check) {
            next_check = now.checked_add(every).unwrap_or(now + Duration::from_secs(86_400));
            check_all(&up).await;
        }
        up.refresh_gauges();
    }
}

/// Checks every target at once; each result moves its target's streak.
async fn check_all(up: &Arc<Upstream>) {
    let Some(check) = up.settings.health.check.clone() else { return };
    let targets = up.targets.load().targets.clone();
    let mut checks = tokio::task::JoinSet::new();
    for t in targets {
        let (up, check) = (up.clone(), check.clone());
        checks.spawn(async move {
            let ok = probe(&up, &t, &check).await;
            if let Some(healthy) = t.health.checked(ok, &check, up.now_ms()) {
                if healthy {
                    tracing::info!(upstream = %up.settings.name, target = %t.label, "target healthy again");
                } else {
                    tracing::warn!(upstream = %up.settings.name, target = %t.label, "target failed its health checks");
                }
            }
        });
    }
    while checks.join_next().await.is_some() {}
}

/// One check: a GET of the path over the target's own pool; healthy is a 2xx within the timeout.
async fn probe(up: &Upstream, t: &Target, check: &ActiveCheck) -> bool {
    let uri =
        http::Uri::builder().scheme(up.settings.scheme.clone()).authority(t.connect.clone()).path_and_query(check.path.clone()).build();
    let Ok(uri) = uri else { return false };
    let mut req = Request::new(Body::empty());
    *req.uri_mut() = uri;
    if let Ok(host) = http::HeaderValue::from_str(t.host.as_str()) {
        req.headers_mut().insert(http::header::HOST, host);
    }
    req.headers_mut().insert(http::header::USER_AGENT, http::HeaderValue::from_static("portcullis-health-check"));
    if up.settings.protocol == super::Protocol::H2 {
        *req.version_mut() = http::Version::HTTP_2;
    }
    match tokio::time::timeout(check.timeout, t.client.request(req)).await {
        Ok(Ok(rsp)) => {
            let ok = StatusCode::is_success(&rsp.status());
            // Read to the end (bounded by the timeout) so the connection goes back to the pool.
            let _ = tokio::time::timeout(check.timeout, http_body_util::BodyExt::collect(rsp.into_body())).await;
            ok
        }
        _ => false,
    }
}
