//! The upstream side: an answer's head (`h1::answer::parse_head`) and the chunked body decoder.
//!
//! Head oracles, against httparse::Response on the same bytes: a complete answer has httparse's status (200-599;
//! a 1xx other than 101 is skipped as interim) and length; its framing is what RFC 9112 §6.3 gives for the fields
//! httparse read (no body for HEAD/204/304, chunked over Content-Length, else the one Content-Length, else to the
//! close), whatever the case or length of the names; the fields passed on are exactly httparse's minus the
//! hop-by-hop ones, the ones `Connection` names, Content-Length, X-Request-Id and the rules' removals; a reusable
//! connection had a clean framing. Partial leaves the buffer alone.
//! Chunked oracles: the body decodes the same whatever the read boundaries (whole, or a byte at a time); the data
//! is exactly the chunks' data (lengths consistent); no trailer that may not pass does.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::edge::headers_request::HOP_BY_HOP;
use portcullis::edge::headers_response::SecureHeaders;
use portcullis::fuzzing::{ChunkStep, ChunkedDecoder};
use portcullis::h1::answer::{parse_head, passes_as_trailer, Framing, Parsed};

fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

fn head(data: &[u8], head_request: bool, keep_all: bool) {
    let rules = if keep_all {
        let d = SecureHeaders::defaults();
        SecureHeaders::new(d.set().to_vec(), d.hsts().cloned(), Vec::new(), false)
    } else {
        SecureHeaders::defaults()
    };
    let mut buf = BytesMut::from(data);
    let ours = parse_head(&mut buf, head_request, &rules);
    let mut slots = vec![httparse::EMPTY_HEADER; 128];
    let mut reference = httparse::Response::new(&mut slots);
    let status = reference.parse(data);
    match ours {
        Err(_) => {}
        Ok(Parsed::Partial) => {
            assert!(matches!(status, Ok(httparse::Status::Partial)), "partial, but httparse says {status:?}");
            assert_eq!(&buf[..], data);
        }
        Ok(Parsed::Interim) => {
            let Ok(httparse::Status::Complete(len)) = status else { panic!("interim, but httparse says {status:?}") };
            let code = reference.code.unwrap();
            assert!((100..200).contains(&code) && code != 101, "interim {code}");
            assert_eq!(&buf[..], &data[len..]);
        }
        Ok(Parsed::Complete { status: got, mut headers, mut fields, framing, reusable }) => {
            let Ok(httparse::Status::Complete(len)) = status else { panic!("complete, but httparse says {status:?}") };
            assert_eq!(&buf[..], &data[len..], "the head is consumed, the body left");
            let code = reference.code.unwrap();
            assert_eq!(got.as_u16(), code);
            assert!((200..600).contains(&code), "status {code}");
            // Framing from httparse's fields.
            let mut lengths = Vec::new();
            let mut chunked = 0;
            let mut connection_tokens: Vec<Vec<u8>> = Vec::new();
            for h in reference.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    for t in tokens(h.value) {
                        assert!(!t.is_empty() && t.len() <= 19 && t.iter().all(u8::is_ascii_digit), "bad length {t:?} taken");
                        lengths.push(std::str::from_utf8(t).unwrap().parse::<u64>().unwrap());
                    }
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    assert!(h.value.trim_ascii().eq_ignore_ascii_case(b"chunked"), "coding {:?} taken", h.value);
                    chunked += 1;
                } else if h.name.eq_ignore_ascii_case("connection") {
                    connection_tokens.extend(tokens(h.value).map(|t| t.to_ascii_lowercase()));
                }
            }
            assert!(chunked <= 1, "chunked twice");
            lengths.dedup();
            assert!(lengths.len() <= 1, "differing lengths {lengths:?}");
            let bodiless = head_request || code == 204 || code == 304;
            let want = if bodiless {
                Framing::Length(0)
            } else if chunked == 1 {
                Framing::Chunked
            } else if let Some(&n) = lengths.first() {
                Framing::Length(n)
            } else {
                Framing::UntilClose
            };
            assert_eq!(framing, want);
            let close = reference.version != Some(1) || connection_tokens.iter().any(|t| t == b"close");
            if reusable {
                assert!(
                    !close && framing != Framing::UntilClose && !(chunked == 1 && !lengths.is_empty()),
                    "reused after a dirty exchange"
                );
            }
            // The fields passed on.
            let lists = connection_tokens.iter().any(|t| !t.is_empty() && t != b"close" && t != b"keep-alive");
            let removed: Vec<String> = rules.remove().iter().map(|n| n.as_str().to_string()).collect();
            let mut expected: Vec<(String, Vec<u8>)> = reference
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .filter(|(n, _)| {
                    !HOP_BY_HOP.contains(&n.as_str())
                        && n != "content-length"
                        && n != "x-request-id"
                        && !removed.contains(n)
                        && !(lists && connection_tokens.iter().any(|t| t == n.as_bytes()))
                })
                .collect();
            let dated = fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(b"date"));
            assert_eq!(fields.dated, dated);
            fields.move_into(&mut headers);
            let cl = headers.remove(http::header::CONTENT_LENGTH);
            if !lists {
                assert_eq!(
                    cl.map(|v| v.to_str().unwrap().parse::<u64>().unwrap()),
                    if chunked == 1 { None } else { lengths.first().copied() }
                );
            }
            let mut got: Vec<(String, Vec<u8>)> = headers.iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect();
            expected.retain(|(n, _)| n != "content-length");
            expected.sort();
            got.sort();
            assert_eq!(got, expected, "fields passed on");
        }
    }
}

/// The body's chunks as a plain reading finds them: (data, bytes used) up to the last chunk's size line.
fn reference_chunks(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n")?;
        let digits = b[..nl].iter().take_while(|c| c.is_ascii_hexdigit()).count();
        let size = u64::from_str_radix(std::str::from_utf8(&b[..digits]).ok()?, 16).ok()?;
        b = &b[nl + 2..];
        if size == 0 {
            return Some(out);
        }
        let size = usize::try_from(size).ok()?;
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Error,
    NeedMore(Vec<u8>),
    Done { data: Vec<u8>, trailers: Vec<(String, Vec<u8>)>, left: usize },
}

fn decode(body: &[u8], step: usize) -> Outcome {
    let mut dec = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    for piece in body.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Err(_) => return Outcome::Error,
                Ok(ChunkStep::NeedMore) => break,
                Ok(ChunkStep::Data(d)) => {
                    assert!(!d.is_empty(), "an empty data frame");
                    data.extend_from_slice(&d)
                }
                Ok(ChunkStep::Trailers(t)) => {
                    assert!(!t.is_empty());
                    let mut trailers = Vec::new();
                    for (n, v) in &t {
                        assert!(passes_as_trailer(n) && !HOP_BY_HOP.contains(&n.as_str()), "trailer {n} passed");
                        trailers.push((n.as_str().to_string(), v.as_bytes().to_vec()));
                    }
                    return Outcome::Done { data, trailers, left: buf.len() };
                }
                Ok(ChunkStep::End) => return Outcome::Done { data, trailers: Vec::new(), left: buf.len() },
            }
        }
    }
    Outcome::NeedMore(data)
}

fn chunked(body: &[u8]) {
    let whole = decode(body, body.len());
    let bytewise = decode(body, 1);
    match (&whole, &bytewise) {
        // Fed a byte at a time the body ends as soon as its last byte arrives: nothing is left over then.
        (Outcome::Done { data: a, trailers: ta, left }, Outcome::Done { data: b, trailers: tb, left: 0 }) => {
            assert_eq!((a, ta), (b, tb), "read boundaries changed the body");
            let _ = left;
            assert_eq!(Some(a), reference_chunks(body).as_ref(), "data differs from the chunks' data");
        }
        (Outcome::Error, Outcome::Error) => {}
        // A byte at a time an error can show before the whole input is there, and vice versa.
        (Outcome::NeedMore(a), Outcome::NeedMore(b)) => assert!(a == b || a.is_empty() || b.starts_with(a) || a.starts_with(b)),
        (Outcome::Error, Outcome::NeedMore(_)) | (Outcome::NeedMore(_), Outcome::Error) => {}
        (a, b) => panic!("whole: {a:?}\nbyte-wise: {b:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    if flags & 4 != 0 {
        chunked(rest);
    } else {
        head(rest, flags & 1 != 0, flags & 2 != 0);
    }
});
