//! Operator tools beside the gateway: `explain` and policy tests, the demo, and the container health check.

pub mod demo;
pub mod explain;
pub mod healthcheck;
