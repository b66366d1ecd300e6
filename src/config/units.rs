//! Values with their own syntax: durations ("250ms", "30s", "5m") and sizes ("64KiB", "10MiB").

use std::time::Duration;

use serde::Deserialize;

/// A duration written as a string with a unit: `ms`, `s`, `m`, `h`, `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(DurationValue).map_err(serde::de::Error::custom)
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid duration {s:?}: expected a whole number and a unit, like \"250ms\", \"30s\", \"5m\", \"1h\"");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs).ok_or_else(bad);
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" | "min" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(bad()),
    }
}

/// Writes a duration as the config spells it: a whole number in the largest unit that holds it exactly (`"250ms"`,
/// `"30s"`, `"5m"`), so that [`parse_duration`] reads back the same value.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        // Finer than the config can say; durations come from the config or its defaults, so this is not reached.
        return format!("{}ns", d.as_nanos());
    }
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    let unit = [(86_400, "d"), (3600, "h"), (60, "m")].into_iter().find(|(k, _)| s != 0 && s % k == 0);
    let (n, unit) = unit.map_or((s, "s"), |(k, u)| (s / k, u));
    format!("{n}{unit}")
}

/// A byte size: a whole number of bytes, or a string like `"64KiB"`, `"10MiB"`, `"1GiB"`, `"512B"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeValue(pub u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(SizeValue(n)),
            Raw::S(s) => parse_size(&s).map(SizeValue).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"512B"`, `"64KiB"`, `"10MiB"`, `"1GiB"` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid size {s:?}: expected a number and a unit, like \"64KiB\" or \"10MiB\"");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let k: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(k).ok_or_else(bad)
}
