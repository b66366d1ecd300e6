use super::headers_request::*;
use super::headers_response::*;
use crate::auth::Principal;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// A header map from pairs, repeated names appended.
fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn the_fast_name_parse_agrees_with_the_full_one() {
    let names = [
        "date",
        "etag",
        "host",
        "vary",
        "accept",
        "cookie",
        "origin",
        "server",
        "expires",
        "location",
        "connection",
        "set-cookie",
        "user-agent",
        "content-type",
        "accept-ranges",
        "authorization",
        "cache-control",
        "last-modified",
        "content-length",
        "accept-encoding",
        "accept-language",
        "content-encoding",
        "content-language",
        "content-location",
        "transfer-encoding",
        "keep-alive",
        "x-request-id",
        "a",
        "",
    ];
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for n in names {
        cases.push(n.as_bytes().to_vec());
        cases.push(n.to_ascii_uppercase().into_bytes());
        // Mixed case, and near misses of the same length and first letter.
        cases.push(n.bytes().enumerate().map(|(i, b)| if i % 2 == 0 { b.to_ascii_uppercase() } else { b }).collect());
        for bad in [b'x', b' ', b':', 0, 0xc3] {
            if let Some(last) = n.len().checked_sub(1) {
                let mut c = n.as_bytes().to_vec();
                c[last] = bad;
                cases.push(c);
            }
        }
    }
    for c in cases {
        match (parse_name(&c), HeaderName::from_bytes(&c)) {
            (Ok(fast), Ok(full)) => assert_eq!(fast, full, "{:?}", String::from_utf8_lossy(&c)),
            (Err(_), Err(_)) => {}
            (fast, full) => panic!("{:?}: fast {fast:?}, full {full:?}", String::from_utf8_lossy(&c)),
        }
    }
}

#[test]
fn secure_header_lines_are_the_fields_an_answer_lacks_in_order() {
    // Every combination of upstream-set secure headers, with and without TLS (HSTS).
    let s = SecureHeaders::defaults();
    for present in 0u32..(1 << s.set().len()) {
        for tls in [false, true] {
            let mut h = HeaderMap::new();
            for (i, (n, _)) in s.set().iter().enumerate() {
                if present & (1 << i) != 0 {
                    h.insert(n.clone(), HeaderValue::from_static("upstream"));
                }
            }
            h.insert("content-type", HeaderValue::from_static("application/json"));
            let add = prepare_answer(&mut h, &mut AnswerFields::default(), &s, tls, false);
            let mut expected = Vec::new();
            for (n, v) in add.fields() {
                expected.extend_from_slice(format!("{}: {}\r\n", n, v.to_str().unwrap()).as_bytes());
            }
            let mut lines = Vec::new();
            add.write_lines(&mut lines);
            assert_eq!(String::from_utf8(lines).unwrap(), String::from_utf8(expected).unwrap(), "present {present:b}, tls {tls}");
        }
    }
    // No secure headers configured at all: nothing written (HSTS over TLS aside).
    let none = SecureHeaders::new(Vec::new(), None, Vec::new(), false);
    let mut lines = Vec::new();
    prepare_answer(&mut HeaderMap::new(), &mut AnswerFields::default(), &none, true, true).write_lines(&mut lines);
    assert!(lines.is_empty());
}

/// An upstream answer readied for the client, its fields either in its map (hyper's answers) or passed as
/// lines of its head (the lean client's), then everything in one map to compare.
fn readied(upstream: &[(&'static str, &'static str)], in_head: bool, s: &SecureHeaders, tls: bool, generated: bool) -> HeaderMap {
    let (mut h, mut passed) =
        if in_head { (HeaderMap::new(), AnswerFields::from_pairs(upstream)) } else { (map(upstream), AnswerFields::default()) };
    let add = prepare_answer(&mut h, &mut passed, s, tls, generated);
    passed.move_into(&mut h);
    // Appended, as a codec writes them: a secure header the answer had would show twice.
    for (n, v) in add.fields() {
        h.append(n.clone(), v.clone());
    }
    h
}

#[test]
fn secure_headers_keep_the_upstreams_own_unless_generated_and_removed_names_go() {
    let d = SecureHeaders::defaults();
    // A name both removed and set: the configured value wins over the upstream's.
    let remove = [d.remove(), &[header::X_FRAME_OPTIONS]].concat();
    let s = SecureHeaders::new(d.set().to_vec(), d.hsts().cloned(), remove, false);
    let upstream =
        [("Server", "nginx"), ("X-Content-Type-Options", "upstream"), ("x-frame-options", "SAMEORIGIN"), ("X-Request-ID", "theirs")];
    for in_head in [false, true] {
        let h = readied(&upstream, in_head, &s, false, false);
        assert!(!h.contains_key("server"), "in head: {in_head}");
        assert!(!h.contains_key("x-request-id"));
        assert_eq!(h["x-content-type-options"], "upstream");
        assert_eq!(h.get_all("x-frame-options").iter().collect::<Vec<_>>(), ["DENY"]);
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert!(!h.contains_key("strict-transport-security"), "no HSTS without TLS");
        let h = readied(&upstream, in_head, &s, true, true);
        assert_eq!(h.get_all("x-content-type-options").iter().collect::<Vec<_>>(), ["nosniff"]);
        assert_eq!(h["strict-transport-security"], "max-age=63072000; includeSubDomains");
        let h = readied(&[("Strict-Transport-Security", "max-age=1")], in_head, &s, true, false);
        assert_eq!(h.get_all("strict-transport-security").iter().collect::<Vec<_>>(), ["max-age=1"]);
        let forced = SecureHeaders::new(d.set().to_vec(), d.hsts().cloned(), d.remove().to_vec(), true);
        let h = readied(&[("Strict-Transport-Security", "max-age=1"), ("X-Frame-Options", "SAMEORIGIN")], in_head, &forced, true, false);
        assert_eq!(h.get_all("strict-transport-security").iter().collect::<Vec<_>>(), ["max-age=63072000; includeSubDomains"]);
        assert_eq!(h.get_all("x-frame-options").iter().collect::<Vec<_>>(), ["DENY"]);
    }
}

#[test]
fn hop_by_hop_headers_go() {
    let mut h = map(&[
        ("connection", "x-secret, keep-alive"),
        ("x-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers, gzip"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "x"),
        ("x-keep", "1"),
    ]);
    assert!(strip_hop_by_hop(&mut h, false));
    assert_eq!(h.len(), 1);
    assert!(h.contains_key("x-keep"));
}

#[test]
fn every_connection_value_is_honoured_and_upgrades_keep_their_upgrade() {
    let mut h = map(&[("connection", "x-one"), ("connection", "X-Two, not a name"), ("x-one", "1"), ("x-two", "2"), ("x-keep", "1")]);
    assert!(!strip_hop_by_hop(&mut h, false));
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);

    let mut h = map(&[("connection", "Upgrade, x-secret"), ("upgrade", "websocket"), ("x-secret", "1")]);
    strip_hop_by_hop(&mut h, true);
    assert_eq!((h["connection"].to_str().unwrap(), h["upgrade"].to_str().unwrap()), ("upgrade", "websocket"));
    assert!(!h.contains_key("x-secret"));
}

#[test]
fn a_connection_value_with_obs_text_still_names_its_fields() {
    // Found by fuzzing (fuzz target h1_answer): the listed names were read only from a visible-ASCII value, so one
    // byte of obs-text anywhere in it let every field it names through.
    let mut h = map(&[("x-secret", "1"), ("x-other", "2"), ("x-keep", "1")]);
    h.append(header::CONNECTION, HeaderValue::from_bytes(b"x-secret, cl\xffose ,X-Other").unwrap());
    strip_hop_by_hop(&mut h, false);
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
}

#[test]
fn identity_headers_go_in_either_spelling() {
    let mut h = map(&[("x-auth-subject", "admin"), ("x_auth_roles", "admin"), ("x-auth-other", "kept")]);
    strip_forged(&mut h, &IdentitySettings::default());
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-auth-other"]);
}

#[test]
fn list_claims_with_a_comma_in_an_item_cannot_be_forwarded_and_say_so() {
    let claims = serde_json::json!({"groups": ["a", "b,c"], "teams": ["x", "y"]});
    let p = Principal {
        issuer_id: "i".into(),
        subject: "s".into(),
        roles: vec!["user,admin".into()],
        scopes: vec!["read".into(), "write".into()],
        claims: std::sync::Arc::new(claims.as_object().unwrap().clone()),
        expires_at: 0,
        identity_values: Default::default(),
        key_generation: None,
    };
    assert!(render_claim(&p, "roles").is_err());
    assert!(render_claim(&p, "groups").is_err());
    assert_eq!(render_claim(&p, "scope").unwrap().unwrap(), "read,write");
    assert_eq!(render_claim(&p, "teams").unwrap().unwrap(), "x,y");
    assert_eq!(render_claim(&p, "absent"), Ok(None));
}

#[test]
fn request_ids_are_unique_hex() {
    let a = new_request_id();
    let b = new_request_id();
    assert_ne!(a, b);
    assert_eq!(a.len(), 32);
}

#[test]
fn untrusted_forwarding_headers_are_replaced() {
    let sent = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-host", "evil"),
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-request-id", "forged"),
        ("expect", "100-continue"),
        ("x-kept", "1"),
    ];
    let ip = HeaderValue::from_static("192.0.2.9");
    let fwd = Forwarding { peer: "192.0.2.9:1".parse().unwrap(), peer_ip: &ip, tls: true, from_trusted_proxy: false };
    let rid = new_request_id();
    let mut h = map(&sent);
    let add = prepare_upstream(&mut h, &fwd, None, &rid, None, &IdentitySettings::default(), false);
    // Nothing the gateway sets is left in the map: a codec writing the additions after it sends each once.
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    let added: Vec<(&str, &str)> = add.fields().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
    assert_eq!(added, [("x-forwarded-for", "192.0.2.9"), ("x-forwarded-proto", "https"), ("x-request-id", rid.to_str().unwrap())]);
    add.insert_into(&mut h);
    assert_eq!(h["x-forwarded-for"], "192.0.2.9");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert!(!h.contains_key("x-real-ip") && !h.contains_key("forwarded") && !h.contains_key("x-forwarded-host"));

    let host = HeaderValue::from_static("api.example");
    let mut h = map(&sent);
    prepare_upstream(&mut h, &fwd, Some(&host), &rid, None, &IdentitySettings::default(), false).insert_into(&mut h);
    assert_eq!(h["x-forwarded-host"], "api.example");
    assert_eq!(h["x-request-id"], rid);
}
