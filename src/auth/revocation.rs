//! Revoked tokens: by `jti`, or every token of a subject issued before a cut-off ("log out everywhere").
//!
//! The request path reads an immutable snapshot (one atomic load, and nothing at all while nothing is revoked), so
//! the check costs a cached-token request nothing measurable and takes no lock; writers rebuild the snapshot.
//! Entries come from this replica (the RFC 7009 endpoint, the admin listener) and, with a `[store]`, from Redis:
//! loaded whole on start, then each new one through pub/sub, with the store's version polled every second as the
//! fallback for a missed message. The set outlives reloads (the gateway hands it on), not restarts without a store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::Value;

use super::Principal;
use crate::store::{Revocation, Revoked, Store};

/// How often the store's version is compared with what this replica has (the bound on a missed message).
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The follower's tick: how soon a first load is retried, and a reload after a message out of sequence is done.
const TICK: Duration = Duration::from_millis(100);

/// What the request path reads.
#[derive(Default)]
struct Snapshot {
    /// `jti` -> forgotten after (unix seconds).
    jtis: HashMap<String, u64>,
    /// subject -> (issuer id or any, cut-off, forgotten after).
    subjects: HashMap<String, Vec<(Option<String>, u64, u64)>>,
}

/// Entries by where they came from (the store's and this replica's own).
#[derive(Default)]
struct Entries {
    local: HashMap<Revocation, u64>,
    shared: HashMap<Revocation, u64>,
    shared_version: u64,
}

/// The revocations this replica enforces.
#[derive(Default)]
pub struct Revocations {
    /// The store's revocations were loaded whole at least once (readiness waits for it).
    loaded: AtomicBool,
    any: AtomicBool,
    snapshot: ArcSwap<Snapshot>,
    entries: Mutex<Entries>,
}

impl Revocations {
    /// Refuses a revoked token (cached or not): its `jti` is revoked, or its subject was cut off after it was
    /// issued. A token without `iat` cannot show it came after a cut-off, so a cut-off refuses it.
    pub fn is_revoked(&self, p: &Principal, now: u64) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let s = self.snapshot.load();
        if !s.jtis.is_empty() {
            if let Some(jti) = p.claims.get("jti").and_then(Value::as_str) {
                if s.jtis.get(jti).is_some_and(|until| now < *until) {
                    return true;
                }
            }
        }
        if let Some(cuts) = s.subjects.get(&p.subject) {
            let iat = p.claims.get("iat").and_then(Value::as_u64).unwrap_or(0);
            return cuts
                .iter()
                .any(|(issuer, before, until)| issuer.as_ref().is_none_or(|i| *i == p.issuer_id) && iat < *before && now < *until);
        }
        false
    }

    /// Adds an entry made on this replica.
    pub fn add_local(&self, r: Revoked) {
        self.write(|e| merge(&mut e.local, r));
    }

    /// Adds an entry heard from the store, with the store version it made. Returns false when the version is not
    /// the next one: an entry before it was missed (or nothing was loaded yet), and a full load must follow. The
    /// entry holds either way (refusing more is safe); the version only moves in sequence.
    pub fn add_shared(&self, version: u64, r: Revoked) -> bool {
        let mut in_sequence = false;
        self.write(|e| {
            merge(&mut e.shared, r);
            if version == e.shared_version + 1 && self.loaded() {
                e.shared_version = version;
                in_sequence = true;
            }
        });
        in_sequence
    }

    /// Takes a full load from the store. Entries are merged, never dropped: nothing is ever un-revoked, each entry
    /// goes when its `until` passes, and a store that lost its state (a Redis restarted without persistence, its
    /// version back at 0) must not make this replica forget what it refuses.
    pub fn load_shared(&self, version: u64, all: Vec<Revoked>) {
        self.write(|e| {
            for r in all {
                merge(&mut e.shared, r);
            }
            e.shared_version = version;
        });
        self.loaded.store(true, Ordering::Relaxed);
    }

    /// Whether the store's revocations have been loaded whole (always false without a store).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// The store version the shared entries are at.
    pub fn shared_version(&self) -> u64 {
        self.entries.lock().map_or(0, |e| e.shared_version)
    }

    /// Forgets entries whose tokens have all expired.
    pub fn prune(&self, now: u64) {
        let stale = |m: &HashMap<Revocation, u64>| m.values().any(|until| *until <= now);
        let any_stale = self.entries.lock().is_ok_and(|e| stale(&e.local) || stale(&e.shared));
        if any_stale {
            self.write(|e| {
                e.local.retain(|_, until| *until > now);
                e.shared.retain(|_, until| *until > now);
            });
        }
    }

    /// Entries held now (`portcullis_revocations_active`).
    pub fn active(&self) -> usize {
        let s = self.snapshot.load();
        s.jtis.len() + s.subjects.values().map(Vec::len).sum::<usize>()
    }

    fn write(&self, f: impl FnOnce(&mut Entries)) {
        let Ok(mut e) = self.entries.lock() else { return };
        f(&mut e);
        let mut s = Snapshot::default();
        for (what, until) in e.local.iter().chain(e.shared.iter()) {
            match what {
                Revocation::Jti { jti } => {
                    let u = s.jtis.entry(jti.clone()).or_default();
                    *u = (*u).max(*until);
                }
                Revocation::Subject { issuer, sub, before } => {
                    s.subjects.entry(sub.clone()).or_default().push((issuer.clone(), *before, *until));
                }
            }
        }
        self.any.store(!s.jtis.is_empty() || !s.subjects.is_empty(), Ordering::Relaxed);
        self.snapshot.store(Arc::new(s));
    }
}

/// The same entry twice keeps the later time it may be forgotten.
fn merge(m: &mut HashMap<Revocation, u64>, r: Revoked) {
    let u = m.entry(r.what).or_default();
    *u = (*u).max(r.until);
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Keeps `revocations` in step with the store (if any) until either is gone: subscribes, loads everything, applies
/// each message, and every second compares versions (a full load when they differ) and prunes. Until the first
/// full load it tries every tick (100 ms): a replica that has not loaded the store's revocations is not ready.
/// `report` gets the count held after each change.
pub async fn follow(store: Option<Weak<Store>>, revocations: Weak<Revocations>, report: impl Fn(usize) + Send + 'static) {
    let mut messages: Option<crate::store::RevocationStream> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    // A message out of sequence: some entries may be missing here, load them all at the next tick.
    let mut reload = false;
    loop {
        let next = async {
            match messages.as_mut() {
                Some(m) => futures_util::StreamExt::next(m).await.map(Some),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = next => {
                let Some(r) = revocations.upgrade() else { return };
                match msg {
                    Some(Some(Some((version, entry)))) => reload |= !r.add_shared(version, entry),
                    Some(Some(None)) => tracing::warn!("store: ignored a revocation message that does not parse"),
                    _ => messages = None,
                }
                report(r.active());
            }
            _ = tick.tick() => {
                ticks += 1;
                let Some(r) = revocations.upgrade() else { return };
                let every_second = ticks % (POLL_EVERY.as_millis() / TICK.as_millis()) as u64 == 0;
                if every_second {
                    r.prune(unix_now());
                    report(r.active());
                }
                let store = match &store {
                    None => continue,
                    Some(s) => match s.upgrade() {
                        Some(s) => s,
                        None => return,
                    },
                };
                if !store.is_up() {
                    messages = None;
                    continue;
                }
                if messages.is_none() {
                    // Subscribed first, then loaded: an entry made in between arrives by message, not lost.
                    messages = store.subscribe_revocations().await.ok();
                    reload = true;
                } else if every_second || !r.loaded() {
                    // The fallback for a lost message: the store's version says whether anything is missing here.
                    match store.revocations_version().await {
                        Ok(v) => reload |= v != r.shared_version() || !r.loaded(),
                        Err(_) => continue,
                    }
                }
                if reload {
                    if let Ok((v, all)) = store.revocations().await {
                        r.load_shared(v, all);
                        reload = false;
                        report(r.active());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn principal(issuer: &str, sub: &str, claims: Value) -> Principal {
        let Value::Object(claims) = claims else { unreachable!() };
        Principal {
            issuer_id: issuer.into(),
            subject: sub.into(),
            roles: vec![],
            scopes: vec![],
            claims: Arc::new(claims),
            expires_at: 2_000,
            identity_values: Default::default(),
            key_generation: None,
        }
    }

    #[test]
    fn a_jti_or_a_subject_cut_off_revokes_until_it_is_forgotten() {
        let r = Revocations::default();
        let old = principal("a", "bob", json!({"jti": "t1", "iat": 100}));
        let new = principal("a", "bob", json!({"jti": "t2", "iat": 300}));
        let no_iat = principal("a", "bob", json!({}));
        assert!(!r.is_revoked(&old, 150));
        r.add_local(Revoked { what: Revocation::Jti { jti: "t1".into() }, until: 1_000 });
        assert!(r.is_revoked(&old, 150) && !r.is_revoked(&new, 150));
        assert!(!r.is_revoked(&old, 1_000), "forgotten once the tokens it covers have expired");
        r.load_shared(0, vec![]);
        assert!(r.add_shared(
            1,
            Revoked { what: Revocation::Subject { issuer: Some("a".into()), sub: "bob".into(), before: 200 }, until: 1_000 }
        ));
        assert!(!r.add_shared(3, Revoked { what: Revocation::Jti { jti: "t9".into() }, until: 1_000 }), "version 2 was missed");
        assert_eq!(r.shared_version(), 1);
        assert!(r.is_revoked(&no_iat, 250), "no iat: cannot show it came after the cut-off");
        assert!(!r.is_revoked(&new, 250) && !r.is_revoked(&principal("b", "bob", json!({"iat": 100})), 250));
        assert_eq!(r.active(), 3);
        // A store that lost its state (an empty load, version back to 1): what is held is kept.
        r.load_shared(1, vec![]);
        assert_eq!((r.active(), r.shared_version()), (3, 1));
        r.prune(1_000);
        assert_eq!(r.active(), 0, "every entry goes when its until passes");
        assert!(!r.is_revoked(&old, 150));
    }
}
