//! The edge of the request path: who the client is, rate limits, request and response header rules, CORS, and
//! the original request of a forward-auth decision.

pub mod client_addr;
pub mod client_cert;
pub mod cors;
pub mod forward_auth;
pub mod headers_request;
pub mod headers_response;
pub mod ratelimit;

#[cfg(test)]
mod tests;
