//! The client side's HTTP/1 request head parser and its hand-over decision (`h1::server::parse`).
//!
//! Oracles: a head the own codec serves ("ours") is one httparse accepts whole from the same bytes, as HTTP/1.1,
//! with the same method, target (less a `#` fragment, which hyper drops too), length and header fields (names and values, in order per name); it never carries
//! framing or an upgrade of its own (Content-Length, Transfer-Encoding, Upgrade, Expect), is never CONNECT and its
//! target is origin-form; no strict prefix of it is ours; a head longer than the size limit is never ours.
//! Whatever is not ours is left in the buffer byte for byte, for hyper.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use portcullis::fuzzing::{parse_request_head, RequestHead};

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

fuzz_target!(|data: &[u8]| {
    let (outcome, left) = parse_request_head(data, 1 << 20);
    let RequestHead::Ours { request, close, head, trailers, consumed } = outcome else {
        assert_eq!(left, data, "bytes not served here go to hyper whole");
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut reference = httparse::Request::new(&mut slots);
        if let Ok(httparse::Status::Partial) = reference.parse(data) {
            assert!(matches!(outcome, RequestHead::Partial), "httparse waits for more, the codec did not");
        }
        return;
    };
    assert_eq!(&left[..], &data[consumed..], "pipelined bytes stay buffered");

    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut reference = httparse::Request::new(&mut slots);
    let len = match reference.parse(data) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("ours, but httparse says {other:?}"),
    };
    assert_eq!(len, consumed, "head length");
    assert_eq!(reference.version, Some(1), "only HTTP/1.1 is ours");
    let method = reference.method.unwrap();
    let path = reference.path.unwrap();
    assert_eq!(request.method().as_str(), method);
    assert_ne!(method, "CONNECT");
    assert!(path.starts_with('/'), "only origin-form targets are ours: {path:?}");
    // A fragment is no part of a request target; `http::Uri` drops it, as hyper's server does, so neither the
    // routing nor the upstream sees it.
    let target = path.split('#').next().unwrap();
    assert_eq!(request.uri().path_and_query().map(|p| p.as_str()), Some(target), "target");
    assert_eq!(request.version(), http::Version::HTTP_11);
    assert_eq!(head, method == "HEAD");

    let mut expected: BTreeMap<String, Vec<&[u8]>> = BTreeMap::new();
    let (mut close_asked, mut te_trailers) = (false, false);
    for h in reference.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        assert!(
            !matches!(name.as_str(), "content-length" | "transfer-encoding" | "upgrade" | "expect"),
            "a head with {name} is hyper's to frame"
        );
        close_asked |= name == "connection" && has_token(h.value, b"close");
        te_trailers |= name == "te" && has_token(h.value, b"trailers");
        expected.entry(name).or_default().push(h.value);
    }
    let mut got: BTreeMap<String, Vec<&[u8]>> = BTreeMap::new();
    for name in request.headers().keys() {
        got.insert(name.as_str().to_string(), request.headers().get_all(name).iter().map(|v| v.as_bytes()).collect());
    }
    assert_eq!(got, expected, "header fields");
    assert_eq!((close, trailers), (close_asked, te_trailers));

    // A strict prefix is never a head of its own; a tighter size limit sends the same head to hyper.
    if consumed > 0 {
        let (prefix, _) = parse_request_head(&data[..consumed - 1], 1 << 20);
        assert!(!matches!(prefix, RequestHead::Ours { .. }), "a strict prefix of a head was served");
    }
    let (limited, left) = parse_request_head(data, consumed - 1);
    assert!(matches!(limited, RequestHead::HandOver), "a head over the limit must go to hyper (431)");
    assert_eq!(left, data);
});
