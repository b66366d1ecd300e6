use super::path::{is_segment_delimiter, is_unreserved};
use super::*;
use crate::auth::authz::Policy;
use std::borrow::Cow;

fn table(paths: &[(&str, Option<&[&str]>)], ci: bool) -> RouteTable {
    let routes = paths
        .iter()
        .enumerate()
        .map(|(i, (p, m))| {
            let methods = m.map(|m| m.iter().map(|s| Method::from_bytes(s.as_bytes()).unwrap()).collect());
            Route::new(i, format!("r{i}"), PathPattern::parse(p).unwrap(), methods, "u".into(), None, Policy::public(), ci)
        })
        .collect();
    RouteTable::new(routes, ci)
}

#[test]
fn route_literals_match_their_encoded_forms() {
    let t = table(&[("/v1/items:purge", None), ("/café/*", None), ("/users/@me", None), ("/*", None)], false);
    let route = |p: &str| t.match_route(&Method::GET, &normalize_path(p).unwrap()).unwrap().route.index;
    for p in ["/v1/items:purge", "/v1/items%3Apurge", "/v1/items%3apurge", "/v1/%69tems%3Apurge"] {
        assert_eq!(route(p), 0, "{p}");
    }
    for p in ["/caf%C3%A9/x", "/caf%c3%a9/x", "/caf%C3%A9"] {
        assert_eq!(route(p), 1, "{p}");
    }
    assert_eq!(route("/users/%40me"), 2);
    // The forwarded path is the form the route matched.
    assert_eq!(normalize_path("/v1/items%3apurge%2b%3b").unwrap(), "/v1/items:purge+%3B");
    assert_eq!(route("/v1/items%3Bpurge"), 3, "an encoded ';' is data, not ':'");
    for bad in ["/a;b", "/a?b", "/a#b", "/a\tb"] {
        assert!(PathPattern::parse(bad).is_err(), "{bad} could never match a request");
    }
    // Raw UTF-8 and raw characters a URI may not hold are encoded like the literal: one path, one route.
    assert_eq!(normalize_path("/caf\u{e9}/x").unwrap(), "/caf%C3%A9/x");
    assert_eq!(route("/caf\u{e9}/x"), 1);
    let t2 = table(&[("/a[0]", None), ("/my files/*", None), ("/*", None)], false);
    let route2 = |p: &str| t2.match_route(&Method::GET, &normalize_path(p).unwrap()).unwrap().route.index;
    assert_eq!(route2("/a[0]"), 0);
    assert_eq!(route2("/a%5b0%5D"), 0);
    assert_eq!(route2("/my%20files/x"), 1);
    assert_eq!(normalize_path("/a|b^c").unwrap(), "/a%7Cb%5Ec");
}

#[test]
fn a_trailing_slash_meets_the_same_route() {
    let t = table(&[("/users/{id}", None), ("/x/", None), ("/admin", None), ("/*", None)], false);
    for (p, want) in [("/users/alice/", 0), ("/users/alice", 0), ("/x", 1), ("/x/", 1), ("/admin/", 2), ("/admin/.", 2), ("/y/", 3)] {
        let path = normalize_path(p).unwrap();
        assert_eq!(t.match_route(&Method::GET, &path).unwrap().route.index, want, "{p}");
    }
}

#[test]
fn a_broader_later_route_never_takes_a_method_a_route_refused() {
    let t = table(
        &[
            ("/reports/*", Some(&["GET"])),
            ("/reports/special", Some(&["DELETE"])),
            ("/items", Some(&["GET"])),
            ("/items", Some(&["POST"])),
            ("/*", None),
        ],
        false,
    );
    let m = |s: &str| Method::from_bytes(s.as_bytes()).unwrap();
    match t.match_route(&m("DELETE"), "/reports/q3") {
        Err(RouteError::MethodNotAllowed { allow }) => assert_eq!(allow, "GET"),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.match_route(&m("DELETE"), "/reports/special").unwrap().route.index, 1, "a narrower route may");
    assert_eq!(t.match_route(&m("POST"), "/items").unwrap().route.index, 3, "the same path's other route may");
    match t.match_route(&m("DELETE"), "/items") {
        Err(RouteError::MethodNotAllowed { allow }) => assert_eq!(allow, "GET, POST"),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.match_route(&m("DELETE"), "/other").unwrap().route.index, 4);
    let traced: Vec<_> = t.trace(&m("DELETE"), "/reports/q3").iter().map(|(r, p, m)| (r.index, *p, *m)).collect();
    assert_eq!(traced.last(), Some(&(4, false, true)), "explain shows the catch-all as not taking it: {traced:?}");
}

#[test]
fn lowercase_methods_are_refused_not_routed() {
    let t = table(&[("/items", Some(&["DELETE"])), ("/*", None)], false);
    for m in ["delete", "Delete", "trace", "connect", "get"] {
        let r = t.match_route(&Method::from_bytes(m.as_bytes()).unwrap(), "/items");
        assert!(matches!(r, Err(RouteError::LowercaseMethod(_))), "{m}: {r:?}");
    }
    assert_eq!(t.match_route(&Method::from_bytes(b"PROPFIND").unwrap(), "/x").unwrap().route.index, 1);
}

#[test]
fn connect_never_and_trace_only_where_listed() {
    let t = table(&[("/echo", Some(&["TRACE"])), ("/*", None)], false);
    assert_eq!(t.match_route(&Method::TRACE, "/echo").unwrap().route.index, 0);
    assert!(matches!(t.match_route(&Method::TRACE, "/x"), Err(RouteError::NotImplemented(_))));
    assert!(matches!(t.match_route(&Method::CONNECT, "/x"), Err(RouteError::NotImplemented(_))));
    assert_eq!(t.match_route(&Method::PATCH, "/x").unwrap().route.index, 1);
}

#[test]
fn normalises_bypass_attempts_to_one_form() {
    for p in
        ["/admin/x", "//admin/x", "/./admin/x", "/public/../admin/x", "/%61dmin/x", "/admin//x", "/a/b/../../admin/x", "/%2e%2e/admin/x"]
    {
        assert_eq!(normalize_path(p).unwrap(), "/admin/x", "{p}");
    }
    assert_eq!(normalize_path("/../..").unwrap(), "/");
    assert_eq!(normalize_path("/a/b/..").unwrap(), "/a/");
    assert_eq!(normalize_path("/a%20b").unwrap(), "/a%20b");
    assert_eq!(normalize_path("/a%7eb%3f").unwrap(), "/a~b%3F");
}

#[test]
fn refuses_ambiguous_bytes() {
    for p in ["/admin%2fx", "/admin%2Fx", "/admin%5cx", "/a\\b", "/a%00", "/a%0d%0a", "/a%zz", "/a%4", "/public/..;/admin", "/admin;x"] {
        assert!(normalize_path(p).is_err(), "{p}");
    }
    assert!(normalize_path("admin").is_err());
}

#[test]
fn first_match_wins_and_prefix_includes_base() {
    let t = table(&[("/admin/*", None), ("/users/{id}", None), ("/", None), ("/*", None)], false);
    let m = |p: &str| t.match_route(&Method::GET, p).unwrap().route.name.clone();
    assert_eq!(m("/admin"), "r0");
    assert_eq!(m("/admin/"), "r0");
    assert_eq!(m("/admin/a/b"), "r0");
    assert_eq!(m("/adminx"), "r3");
    assert_eq!(m("/users/alice"), "r1");
    assert_eq!(m("/users/alice/x"), "r3");
    assert_eq!(m("/"), "r2");
    let rm = t.match_route(&Method::GET, "/users/al%20ice").unwrap();
    assert_eq!(rm.param("id"), Some("al ice"));
    // Two different invalid byte sequences must not both become U+FFFD and match one claim value.
    for p in ["/users/%FF", "/users/%FE"] {
        assert!(matches!(t.match_route(&Method::GET, p), Err(RouteError::NotUtf8)), "{p}");
    }
    assert_eq!(t.match_route(&Method::GET, "/users/%C3%A9").unwrap().param("id"), Some("é"));
}

#[test]
fn method_mismatch_is_405_and_no_match_404() {
    let t = table(&[("/items", Some(&["POST"])), ("/items", Some(&["PUT"]))], false);
    assert!(t.match_route(&Method::POST, "/items").is_ok());
    match t.match_route(&Method::GET, "/items") {
        Err(RouteError::MethodNotAllowed { allow }) => assert_eq!(allow, "POST, PUT"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(t.match_route(&Method::GET, "/nope"), Err(RouteError::NotFound)));
}

#[test]
fn case_insensitive_is_opt_in() {
    let t = table(&[("/admin/*", None)], false);
    assert!(t.match_route(&Method::GET, "/ADMIN/x").is_err());
    let t = table(&[("/admin/*", None)], true);
    assert!(t.match_route(&Method::GET, "/ADMIN/x").is_ok());
}

#[test]
fn shadowing_is_detected() {
    let t = table(&[("/*", None), ("/admin", Some(&["GET"]))], false);
    assert!(t.routes()[0].shadows(&t.routes()[1], false));
    let t = table(&[("/admin", Some(&["GET"])), ("/*", None)], false);
    assert!(!t.routes()[0].shadows(&t.routes()[1], false));
    // With case-insensitive matching, /Admin/* takes every request /admin/x would.
    let t = table(&[("/Admin/*", None), ("/admin/x", None)], true);
    assert!(t.routes()[0].shadows(&t.routes()[1], true));
    assert!(!t.routes()[0].shadows(&t.routes()[1], false));
}

#[test]
fn strip_prefix_on_segment_boundary() {
    let mut r =
        Route::new(0, "r".into(), PathPattern::parse("/api/*").unwrap(), None, "u".into(), Some("/api".into()), Policy::public(), false);
    assert_eq!(r.upstream_path("/api/x"), "/x");
    assert_eq!(r.upstream_path("/api"), "/");
    assert_eq!(r.upstream_path("/apix"), "/apix");
    r.strip_prefix = None;
    assert_eq!(r.upstream_path("/api/x"), "/api/x");
}

#[test]
fn normalising_is_idempotent_and_leaves_no_dot_empty_or_decodable_segments() {
    // Seeded random paths over the characters normalisation treats specially: whatever it accepts, it returns
    // in a form it returns unchanged, so the path the policy saw is the path forwarded, and re-reading it
    // (an upstream decoding once more) finds nothing left to resolve.
    const PIECES: [&str; 22] =
        ["/", "/", "a", "B", ".", "..", "%2e", "%2E", "%2f", "%25", "%41", "%3a", "%3A", "%7e", "%", "%zz", ";", "\\", "é", " ", "~", ":"];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut raw = String::from("/");
        for _ in 0..next(9) {
            raw.push_str(PIECES[next(PIECES.len())]);
        }
        let Ok(once) = normalize_path(&raw) else { continue };
        accepted += 1;
        let once = once.into_owned();
        assert_eq!(normalize_path(&once).ok().map(Cow::into_owned), Some(once.clone()), "{raw:?} -> {once:?}");
        assert!(once.starts_with('/') && !once.contains("//"), "{raw:?} -> {once:?}");
        assert!(once.split('/').all(|seg| seg != "." && seg != ".."), "{raw:?} -> {once:?}");
        // What escapes are left decode to nothing a router resolves: no slash, dot, unreserved or delimiter.
        for esc in once.split('%').skip(1) {
            let v = u8::from_str_radix(&esc[..2], 16).expect("a whole escape");
            assert!(!is_unreserved(v) && !is_segment_delimiter(v) && v != b'/', "{raw:?} -> {once:?}");
            assert!(esc[..2].bytes().all(|b| !b.is_ascii_lowercase()), "upper-case escapes: {once:?}");
        }
    }
    assert!(accepted > 5_000, "only {accepted} paths were accepted: the generator tests little");
}

#[test]
fn escapes_a_second_decoding_would_resolve_are_found_in_every_spelling() {
    for p in [
        "/a/%252e%252e/b",
        "/a/%252E",
        "/a/%25252f",
        "/a/%2525252F",
        "/a/%255c",
        "/a/%253B",
        "/a/%253b",
        "/a/..%3B/b",
        "/a/..%3b",
        "/a/.%3B",
        "/%252e",
    ] {
        assert!(decodes_again(p), "{p}");
    }
    for p in ["/a/b", "/a/100%25", "/a/%25ab", "/a/%2525", "/a/items%3Bv=1", "/a/...%3B", "/a/x..%3B", "/a/%2B"] {
        assert!(!decodes_again(p), "{p}");
    }
}
