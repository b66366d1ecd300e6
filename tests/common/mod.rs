//! Shared test helpers: a real echo upstream, a real gateway on 127.0.0.1 port 0, real clients, real keys.
//!
//! - `upstream`: the echo upstream (and an https one on a private CA) the gateway forwards to.
//! - `config`: gateway configs, from the shared base and what a test adds.
//! - `gateway`: a running gateway in its own folder, its readiness and its metrics.
//! - `client`: clients for the gateway and the answers they collect.
//! - `keys`: keys, tokens and JWKs made here with real crypto, and a ready-made test issuer.
//! - `net`: raw sockets, for what a well-behaved client library cannot send, and addresses for odd peers.
//! - `mutate`: seeded mutations, for the randomised tests.
//! - `process`: the real binary as a child process, its log lines and exit code.
//! - `redis_server`: a real redis-server, killed and restarted by the test.
//! - `tools`: external programs (promtool, testssl.sh), skipped or required by PORTCULLIS_REQUIRE_ALL.
//!
//! Every test binary compiles all of this and uses some of it, hence the allowances.
#![allow(dead_code, unused_imports)]

mod client;
mod config;
mod gateway;
mod keys;
mod mutate;
mod net;
mod process;
mod redis_server;
mod tools;
mod upstream;

use std::future::Future;
use std::time::Duration;

pub use client::*;
pub use config::*;
pub use gateway::*;
pub use keys::*;
pub use mutate::*;
pub use net::*;
pub use portcullis::Config;
pub use process::*;
pub use redis_server::*;
pub use tools::*;
pub use upstream::*;

/// Upper bound for anything a test waits on: a hang becomes a failure, not a stuck suite.
pub const BOUND: Duration = Duration::from_secs(20);

/// The longest one test may run.
pub const TEST_BOUND: Duration = Duration::from_secs(120);

/// The longest one test may run in the suites that hash passwords or reload under load.
pub const LONG_TEST_BOUND: Duration = Duration::from_secs(180);

/// Runs a test body under [`TEST_BOUND`].
pub async fn bounded(f: impl Future<Output = ()>) {
    bounded_by(TEST_BOUND, f).await;
}

/// Runs a test body under `bound`.
pub async fn bounded_by(bound: Duration, f: impl Future<Output = ()>) {
    tokio::time::timeout(bound, f).await.expect("test exceeded its time bound");
}
