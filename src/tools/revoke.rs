//! `portcullis revoke`: revokes a token by `jti`, or every token of a subject issued before a time.
//!
//! With a `[store]`, the entry goes to Redis and every replica hears of it within a second. Without one, it goes
//! to the running gateway's admin listener (`[listen] admin`, with the `[admin]` token when set), which holds it
//! for as long as it runs, reloads included.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{parse_duration, Config};
use crate::store::{Revocation, Revoked, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("{0}")]
    Time(String),
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    #[error("no [store] and no `listen.admin` in the config: nowhere to send the revocation")]
    Nowhere,
    #[error("the admin listener at {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin listener answered: {0}")]
    Refused(String),
}

/// Reads a time: `now`, unix seconds, or RFC 3339 (`2026-12-05T10:00:00Z`, or with an offset); with
/// `from_now`, also a duration from now (`24h`, `+30m`), as `--until` takes (never `--before`, where "1h" could
/// be read as an hour ago).
pub fn parse_time(s: &str, now: u64, from_now: bool) -> Result<u64, RevokeError> {
    let s = s.trim();
    let bad = || {
        let also = if from_now { ", or a duration from now like 24h" } else { "" };
        RevokeError::Time(format!("{s:?}: expected now, unix seconds or an RFC 3339 time{also}"))
    };
    if s == "now" {
        return Ok(now);
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| bad());
    }
    if from_now {
        if let Ok(d) = parse_duration(s.trim_start_matches('+')) {
            return Ok(now.saturating_add(d.as_secs()));
        }
    }
    rfc3339(s).ok_or_else(bad)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` to unix seconds.
fn rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse::<u32>().ok().map(i64::from) };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = rest[1..].split_once(':')?;
            let (oh, om) = (oh.parse::<u8>().ok().filter(|h| *h < 24)?, om.parse::<u8>().ok().filter(|m| *m < 60)?);
            sign * (i64::from(oh) * 3600 + i64::from(om) * 60)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec - offset).ok()
}

/// How long after `from` a token issued then may still be accepted: the longest `max_lifetime` of the configured
/// issuers, with their leeway twice (an `iat` a little in the future, an `exp` a little in the past). An entry is
/// kept that long, then forgotten.
pub fn default_until(config: &Config, from: u64) -> u64 {
    let longest = config.issuers.iter().map(|i| i.max_lifetime.saturating_add(i.leeway.saturating_mul(2))).max().unwrap_or(30 * 86_400);
    from.saturating_add(longest)
}

/// Sends the revocation where the config says; returns where it went.
pub async fn revoke(config: &Config, entry: Revoked) -> Result<String, RevokeError> {
    if let Some(settings) = &config.store {
        let store = Store::connect_once(settings.clone()).await?;
        let version = store.revoke(&entry).await?;
        return Ok(format!("store (revocation version {version})"));
    }
    let addr = config.listen.admin.ok_or(RevokeError::Nowhere)?;
    let body = serde_json::json!({"entry": entry.what, "until": entry.until}).to_string();
    let auth = config.admin_token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "POST /revocations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| RevokeError::Admin { addr, source: std::io::ErrorKind::TimedOut.into() })?
        .map_err(|source| RevokeError::Admin { addr, source })?;
    let text = String::from_utf8_lossy(&answer);
    match text.split(' ').nth(1) {
        Some("200") => Ok(format!("the gateway at {addr} (this replica only: no [store])")),
        _ => Err(RevokeError::Refused(text.lines().next().unwrap_or("no answer").to_string())),
    }
}

/// The entry for `--jti` or `--sub` with `--before`.
pub fn entry(config: &Config, what: Revocation, until: Option<&str>, now: u64) -> Result<Revoked, RevokeError> {
    let from = match &what {
        Revocation::Jti { .. } => now,
        Revocation::Subject { before, .. } => *before,
    };
    let until = match until {
        Some(u) => parse_time(u, now, true)?,
        None => default_until(config, from),
    };
    Ok(Revoked { what, until })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_documented_form() {
        assert_eq!(parse_time("now", 1000, false).unwrap(), 1000);
        assert_eq!(parse_time("1700000000", 0, false).unwrap(), 1_700_000_000);
        assert_eq!(parse_time("24h", 1000, true).unwrap(), 1000 + 86_400);
        assert_eq!(parse_time("+30m", 1000, true).unwrap(), 1000 + 1800);
        assert!(parse_time("1h", 1000, false).is_err(), "--before takes no duration");
        assert_eq!(parse_time("2023-11-14T22:13:20Z", 0, false).unwrap(), 1_700_000_000);
        assert_eq!(parse_time("2023-11-14T23:13:20.5+01:00", 0, false).unwrap(), 1_700_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:00Z", 5, false).unwrap(), 0);
        for bad in
            ["", "yesterday", "2023-13-01T00:00:00Z", "2023-11-14T22:13:20", "-5", "2023-11-14T-1:13:20Z", "2023-11-14T22:13:20+-1:00"]
        {
            assert!(parse_time(bad, 0, true).is_err(), "{bad}");
        }
    }
}
