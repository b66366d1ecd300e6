//! `[store]`: checked into the store's settings (the URL parsed as the client will, the password read).

use std::time::Duration;

use toml::Spanned;

use crate::edge::ratelimit::{LimitStore, OnStoreError};
use crate::store::{check_url, StoreSettings, StoreTarget};

use super::file::*;
use super::*;

impl Validator<'_> {
    pub(super) fn store(&mut self, s: Spanned<StoreFile>) -> Option<StoreSettings> {
        let span = s.span();
        let s = s.into_inner();
        let before = self.problem_count();
        let target = match (&s.url, &s.sentinels) {
            (Some(url), None) => {
                if let Err(e) = check_url(url.get_ref()) {
                    self.error(url.span(), format!("[store] url {e}"));
                }
                for (key, set) in [("master_name", s.master_name.is_some()), ("database", s.database.is_some()), ("tls", s.tls)] {
                    if set {
                        self.error(span.clone(), format!("[store] {key} is for `sentinels`; a url names its own"));
                    }
                }
                Some(StoreTarget::Url(url.get_ref().clone()))
            }
            (None, Some(sentinels)) => {
                for a in sentinels.get_ref() {
                    if a.rsplit_once(':').and_then(|(h, p)| (!h.is_empty()).then_some(p)).and_then(|p| p.parse::<u16>().ok()).is_none() {
                        self.error(sentinels.span(), format!("[store] sentinel {a:?} must be HOST:PORT"));
                    }
                }
                if sentinels.get_ref().is_empty() {
                    self.error(sentinels.span(), "[store] sentinels must name at least one sentinel");
                }
                match &s.master_name {
                    Some(m) if !m.get_ref().is_empty() => Some(StoreTarget::Sentinel {
                        sentinels: sentinels.get_ref().clone(),
                        master_name: m.get_ref().clone(),
                        db: s.database.unwrap_or(0),
                    }),
                    _ => {
                        self.error(span.clone(), "[store] sentinels needs master_name (the primary's name the sentinels monitor)");
                        None
                    }
                }
            }
            (Some(url), Some(_)) => {
                self.error(url.span(), "[store] takes `url` or `sentinels`, not both");
                None
            }
            (None, None) => {
                self.error(span.clone(), "[store] needs `url` (redis:// or rediss://) or `sentinels` with `master_name`");
                None
            }
        };
        let password = match &s.password_env {
            None => None,
            Some(var) => match std::env::var(var.get_ref()) {
                Ok(p) if !p.is_empty() => Some(p),
                _ => {
                    self.error(var.span(), format!("[store] password_env: environment variable {} is not set", var.get_ref()));
                    None
                }
            },
        };
        let tls = match &s.url {
            Some(u) => u.get_ref().starts_with("rediss://"),
            None => s.tls,
        };
        if let Some(p) = s.ca_file.as_ref().filter(|_| !tls) {
            self.error(p.span(), "[store] ca_file is for TLS: a rediss:// url, or `tls = true` with sentinels");
        }
        let ca_file = s.ca_file.as_ref().map(|p| {
            let path = self.resolve(p.get_ref());
            if let Err(e) = std::fs::read(&path) {
                self.error(p.span(), format!("[store] ca_file {}: {e}", path.display()));
            }
            path
        });
        let timeout = s.timeout.as_ref().map_or(Duration::from_millis(50), |t| t.get_ref().0);
        if let Some(t) = s.timeout.as_ref().filter(|t| t.get_ref().0.is_zero()) {
            self.error(t.span(), "[store] timeout must be more than 0");
        }
        let pool_size = s.pool_size.as_ref().map_or(2, |n| *n.get_ref());
        if let Some(n) = s.pool_size.as_ref().filter(|n| !(1..=64).contains(n.get_ref())) {
            self.error(n.span(), "[store] pool_size must be from 1 to 64");
        }
        let expected_replicas = s.expected_replicas.as_ref().map_or(1, |n| *n.get_ref());
        if let Some(n) = s.expected_replicas.as_ref().filter(|n| *n.get_ref() == 0) {
            self.error(n.span(), "[store] expected_replicas must be at least 1");
        }
        if self.problem_count() > before {
            return None;
        }
        Some(StoreSettings {
            target: target?,
            username: s.username,
            password,
            ca_file,
            tls: s.tls,
            timeout,
            pool_size,
            expected_replicas: expected_replicas.max(1),
        })
    }

    /// Where a limit counts: `shared` needs a `[store]` (unless `[store]` itself failed, reported already).
    pub(super) fn limit_store(
        &mut self,
        store: Option<&Spanned<LimitStoreFile>>,
        on_error_file: Option<&Spanned<OnStoreErrorFile>>,
    ) -> LimitStore {
        let on_error = match on_error_file.map(|o| *o.get_ref()) {
            None | Some(OnStoreErrorFile::Local) => OnStoreError::Local,
            Some(OnStoreErrorFile::Allow) => OnStoreError::Allow,
            Some(OnStoreErrorFile::Deny) => OnStoreError::Deny,
        };
        match store {
            Some(s) if *s.get_ref() == LimitStoreFile::Shared => match self.store_replicas {
                Some(replicas) => LimitStore::Shared { on_error, replicas },
                None => {
                    if !self.store_failed {
                        self.error(s.span(), "store = \"shared\" needs a [store] section");
                    }
                    LimitStore::Local
                }
            },
            _ => {
                if let Some(o) = on_error_file {
                    self.error(o.span(), "on_store_error is for a limit with store = \"shared\"");
                }
                LimitStore::Local
            }
        }
    }
}
