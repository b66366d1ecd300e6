//! gRPC over the gateway: recognising a gRPC request, its deadline (`grpc-timeout`), and the gRPC status an HTTP
//! refusal stands for. The answers themselves are made in `error.rs`, with every other answer.

use std::time::Duration;

use http::header::{HeaderMap, CONTENT_TYPE};
use http::StatusCode;

/// True for `application/grpc` and its `+proto`, `+json`… forms (and gRPC-Web, which carries status the same way).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/grpc")
    })
}

/// The client's deadline: `grpc-timeout` is 1 to 8 digits and a unit (H, M, S, m, u, n). None when absent or
/// malformed (the upstream's own timeout then applies).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status code a gateway answer of `status` stands for.
pub fn code_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 | 411 | 414 | 431 => 3, // INVALID_ARGUMENT
        401 => 16,                  // UNAUTHENTICATED
        403 => 7,                   // PERMISSION_DENIED
        404 | 405 | 501 => 12,      // UNIMPLEMENTED
        408 | 504 => 4,             // DEADLINE_EXCEEDED
        413 | 429 => 8,             // RESOURCE_EXHAUSTED
        502 | 503 => 14,            // UNAVAILABLE
        _ => 13,                    // INTERNAL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, http::HeaderValue::from_static(value));
        h
    }

    #[test]
    fn grpc_timeouts_parse_every_unit_and_refuse_the_rest() {
        let t = |v| grpc_timeout(&headers("grpc-timeout", v));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        assert!(is_grpc(&headers("content-type", "application/grpc")));
        assert!(is_grpc(&headers("content-type", "application/grpc+proto")));
        assert!(is_grpc(&headers("content-type", "Application/GRPC-web")));
        assert!(!is_grpc(&headers("content-type", "application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn refusals_map_to_the_grpc_codes_clients_expect() {
        let c = |s: u16| code_for(StatusCode::from_u16(s).unwrap());
        assert_eq!((c(401), c(403), c(429), c(502), c(503), c(504)), (16, 7, 8, 14, 14, 4));
    }
}
