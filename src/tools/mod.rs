//! Operator tools beside the gateway: `explain` and policy tests, the demo, the container health check, and
//! `revoke`.

pub mod demo;
pub mod explain;
pub mod healthcheck;
pub mod revoke;
