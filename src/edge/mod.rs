//! The edge of the request path: who the client is, rate limits, request and response header rules, CORS.

pub mod cors;
pub mod headers;
pub mod ratelimit;
