//! Path normalisation (`router::normalize_path`) and route matching (`RouteTable::match_route`) on the shipped
//! gateway.toml's routes, as written and with `[routing] case_insensitive = true`.
//!
//! Oracles: normalising is idempotent, and a path left unchanged is not copied; a normal path starts
//! with `/`, holds no `//`, `/./`, `/../`, no trailing `/.` or `/..`, no raw control byte, backslash, `;` or
//! non-ASCII, and only upper-case escapes of bytes that must stay escaped (never `/`, `\`, a control byte, an
//! unreserved character or a segment delimiter), so decoding it once leaves nothing for an upstream to resolve (no
//! new `/`, no dot-segment); matching agrees with `trace` (what `portcullis explain` shows) on the route chosen,
//! a lowercase method is always refused, and the path a route forwards (after `strip_prefix`) is itself normal.
#![no_main]

use std::borrow::Cow;
use std::sync::OnceLock;

use http::Method;
use libfuzzer_sys::fuzz_target;
use portcullis::router::{normalize_path, RouteError, RouteTable};

fn tables() -> &'static [RouteTable; 2] {
    static TABLES: OnceLock<[RouteTable; 2]> = OnceLock::new();
    TABLES.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.toml");
        let text = std::fs::read_to_string(&path).expect("the shipped gateway.toml");
        let load = |text: &str| portcullis::fuzzing::check_config_text(&path, text).expect("the shipped config checks").routes;
        let insensitive = text.replacen("# [routing]\n# case_insensitive = false", "[routing]\ncase_insensitive = true", 1);
        assert_ne!(insensitive, text, "the shipped gateway.toml still has its [routing] comment");
        [load(&text), load(&insensitive)]
    })
}

const METHODS: [&str; 10] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "get"];

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn check_normal(p: &str) {
    let b = p.as_bytes();
    assert!(p.starts_with('/'), "{p:?}");
    for bad in ["//", "/./", "/../"] {
        assert!(!p.contains(bad), "{p:?} holds {bad}");
    }
    assert!(!p.ends_with("/.") && !p.ends_with("/.."), "{p:?}");
    let mut once = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        assert!(c >= 0x20 && c != 0x7f && c < 0x80 && c != b'\\' && c != b';', "{p:?} holds byte {c:#x}");
        assert!(!b" \"<>[]^`{|}".contains(&c), "{p:?} holds {:?} raw", c as char);
        if c == b'%' {
            let (h, l) = (b[i + 1], b[i + 2]);
            assert!(h.is_ascii_hexdigit() && l.is_ascii_hexdigit() && !h.is_ascii_lowercase() && !l.is_ascii_lowercase(), "{p:?}");
            let v = hex(h).unwrap() * 16 + hex(l).unwrap();
            assert!(v != b'/' && v != b'\\' && v >= 0x20 && v != 0x7f, "{p:?} escapes {v:#x}");
            assert!(!(v.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,=".contains(&v)), "{p:?} leaves {:?} escaped", v as char);
            once.push(v);
            i += 3;
        } else {
            once.push(c);
            i += 1;
        }
    }
    // Decoded once, as an upstream would: the same segments, none of them a dot-segment.
    assert_eq!(once.iter().filter(|&&c| c == b'/').count(), b.iter().filter(|&&c| c == b'/').count());
    for seg in once[1..].split(|&c| c == b'/') {
        assert!(seg != b"." && seg != b"..", "{p:?} decodes to a dot-segment");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let Ok(raw) = std::str::from_utf8(rest) else { return };
    let Ok(norm) = normalize_path(raw) else { return };
    check_normal(&norm);
    match normalize_path(&norm) {
        Ok(again) => assert_eq!(again, norm, "not idempotent on {raw:?}"),
        other => panic!("{raw:?} normalised to {norm:?}, and that to {other:?}"),
    }
    if matches!(norm, Cow::Borrowed(_)) {
        assert_eq!(&*norm, raw);
    }

    let table = &tables()[usize::from(pick & 1)];
    let method: Method = METHODS[usize::from(pick >> 1) % METHODS.len()].parse().unwrap();
    let found = table.match_route(&method, &norm);
    if method.as_str() == "get" {
        assert!(matches!(found, Err(RouteError::LowercaseMethod(_))));
        return;
    }
    let trace = table.trace(&method, &norm);
    let traced = trace.last().filter(|(_, path_ok, method_ok)| *path_ok && *method_ok).map(|(r, ..)| r.index);
    match &found {
        Ok(m) => {
            assert_eq!(traced, Some(m.route.index), "match_route and trace choose differently for {method} {norm:?}");
            let forwarded = m.route.upstream_path(&norm);
            match normalize_path(forwarded) {
                Ok(f) if f == forwarded => {}
                other => panic!("route {} forwards {forwarded:?} (from {norm:?}), normalised {other:?}", m.route.name),
            }
        }
        // Refusals of the matched route's path (its parameters, or an escape a second decoding would resolve):
        // `explain` shows the route `trace` found, then this refusal.
        Err(RouteError::NotUtf8 | RouteError::DoubleEncoded) => {}
        Err(e) => assert_eq!(traced, None, "trace matched where match_route said {e}"),
    }
});
