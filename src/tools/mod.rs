//! Operator tools beside the gateway: `explain` and policy tests, and the demo.

pub mod demo;
pub mod explain;
