//! The own HTTP/1.1 codec: the common case of an API request served without hyper, on both sides of the proxy.
//!
//! # The boundary
//! What this codec serves:
//! - **Client side** ([`server`]): a request head without a body and without an upgrade (most API traffic),
//!   parsed with httparse into an `http::Request<()>`, its values sharing the bytes read. [`server::Conn`] gives
//!   the server loop (in the `server` module) the steps of a connection: read a head, run the request while watching
//!   for the client to leave, write the answer (one write when it fits), and hand over.
//! - **Upstream side** ([`client`], [`answer`], [`pool`]): a bodiless request to a plain-http upstream, its answer
//!   parsed strictly (RFC 9112 §6.3 framing) and its body read from the socket only as the client takes it, on
//!   connections pooled per worker thread.
//!
//! What it hands to hyper, and when: a head that is malformed, too large or has too many fields, HTTP/1.0, any
//! `Content-Length`, `Transfer-Encoding`, `Expect` or `Upgrade`, CONNECT, and a target that is not origin-form.
//! The connection goes to hyper with the bytes already read ([`server::Ended::HandOver`]) and stays with it, so
//! hyper's answers to hostile heads (400, 431, the smuggling refusals) stay the only ones. Requests with a body,
//! upgrades and https upstreams take hyper's client (`upstream::forward` chooses).
//!
//! Which types cross: `http::Request<()>` in, an `http::Response<B>` for any `http_body::Body` out, with the
//! answer's [`Additions`](crate::edge::headers_response::Additions) written straight into the head; the
//! upstream's own fields travel as [`AnswerFields`](crate::edge::headers_response::AnswerFields) (an edge type
//! this codec fills and writes), the request's additions as
//! [`UpstreamFields`](crate::edge::headers_request::UpstreamFields). This module depends on `edge` for those
//! and on nothing else in the crate; the gateway core (`gateway`, `auth`, `router`, `edge`) names none of its
//! types. Timers: one [`deadline::Deadline`] per connection, so a request touches no timer.

pub mod answer;
pub mod client;
pub mod deadline;
pub mod pool;
pub mod server;
