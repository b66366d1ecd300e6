//! Entry points for the fuzz targets in `fuzz/` (see "Fuzzing" in docs/security.md), not an API: each is a thin
//! wrapper that calls one parser private to its module, unchanged. Nothing in the crate calls these.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request};
use jsonwebtoken::Algorithm;

use crate::auth::jwks::{JwkKey, JwksError, KeySet};
use crate::auth::JwksSettings;
use crate::config::{Config, ConfigError};
use crate::h1::client::H1Error;
use crate::token_endpoint::TokenError;

/// What the client side's HTTP/1 codec made of the bytes at the front of its read buffer.
#[allow(clippy::large_enum_variant)] // one per fuzz input, taken apart at once
pub enum RequestHead {
    /// Served by the own codec: the request, what it asked of the connection, and how many bytes its head took.
    Ours { request: Request<()>, close: bool, head: bool, trailers: bool, consumed: usize },
    /// More bytes needed.
    Partial,
    /// hyper takes the connection.
    HandOver,
}

/// `h1::server::parse` on `bytes` (as one read buffer): the outcome and the buffer it leaves.
pub fn parse_request_head(bytes: &[u8], max_head: usize) -> (RequestHead, Vec<u8>) {
    let mut buf = BytesMut::from(bytes);
    let outcome = match crate::h1::server::parse(&mut buf, max_head) {
        crate::h1::server::Parsed::Request(request, meta) => {
            RequestHead::Ours { request, close: meta.close, head: meta.head, trailers: meta.trailers, consumed: bytes.len() - buf.len() }
        }
        crate::h1::server::Parsed::Partial => RequestHead::Partial,
        crate::h1::server::Parsed::HandOver => RequestHead::HandOver,
    };
    (outcome, buf.to_vec())
}

/// One step of the upstream side's chunked decoder.
pub enum ChunkStep {
    NeedMore,
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

/// The upstream side's `Transfer-Encoding: chunked` decoder (`h1::answer`).
#[derive(Default)]
pub struct ChunkedDecoder(crate::h1::answer::ChunkedDecoder);

impl ChunkedDecoder {
    /// Decodes what `buf` holds, taking the bytes it uses.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<ChunkStep, H1Error> {
        use crate::h1::answer::Step;
        Ok(match self.0.decode(buf)? {
            Step::NeedMore => ChunkStep::NeedMore,
            Step::Data(d) => ChunkStep::Data(d),
            Step::Trailers(t) => ChunkStep::Trailers(t),
            Step::End => ChunkStep::End,
        })
    }
}

/// The strict JSON reading of a JWT header or payload segment (`auth::verify`).
pub fn decode_jwt_segment(seg: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    crate::auth::verify::decode_json(seg)
}

fn fetch_client() -> &'static crate::auth::jwks::FetchClient {
    static CLIENT: OnceLock<crate::auth::jwks::FetchClient> = OnceLock::new();
    // Fuzz harness only, never on the request path: without a client the harness cannot run at all.
    CLIENT.get_or_init(|| crate::auth::jwks::fetch_client(None).expect("a fetch client with the system roots"))
    // ok: fuzz setup
}

/// The keys a JWKS document yields for an issuer allowing `algorithms`: those with a kid, and those without.
pub fn jwks_keys(doc: &serde_json::Value, algorithms: &[Algorithm]) -> (HashMap<String, Arc<JwkKey>>, Vec<Arc<JwkKey>>) {
    let settings = JwksSettings {
        source: crate::auth::JwksSource::Url(http::Uri::from_static("https://idp.invalid/jwks")),
        refresh: std::time::Duration::from_secs(300),
        refetch_cooldown: std::time::Duration::from_secs(30),
        timeout: std::time::Duration::from_secs(5),
        ca_file: None,
    };
    let set = KeySet::new("fuzz".into(), "https://idp.invalid".into(), settings, algorithms.to_vec(), fetch_client());
    set.parse_keys(doc)
}

/// The `jwks_uri` an OIDC discovery document names for `issuer`.
pub fn discovered_jwks_uri(doc: &serde_json::Value, issuer: &str) -> Result<http::Uri, JwksError> {
    crate::auth::jwks::discovered_jwks_uri(doc, issuer)
}

/// The `max-age` of a JWKS answer's `Cache-Control`.
pub fn jwks_max_age(cache_control: &str) -> Option<std::time::Duration> {
    crate::auth::jwks::parse_max_age(cache_control)
}

/// The token endpoint's form parser.
pub fn parse_token_form(body: &[u8]) -> Result<HashMap<String, String>, TokenError> {
    crate::token_endpoint::parse_form(body)
}

/// The token endpoint's HTTP Basic client credentials.
pub fn parse_token_basic(v: &HeaderValue) -> Result<(String, String), TokenError> {
    crate::token_endpoint::parse_basic(v)
}

/// The token endpoint's `scope` parameter.
pub fn requested_scopes(scope: &str) -> Result<Vec<&str>, TokenError> {
    crate::token_endpoint::requested_scopes(scope)
}

/// Validates config text as `portcullis check` does: nothing is written (no key or certificate is generated).
pub fn check_config_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
    Config::parse(path, text, false)
}
