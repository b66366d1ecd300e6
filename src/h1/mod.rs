//! The own HTTP/1.1 codec (boundary documented below).

pub mod answer;
pub mod client;
pub mod deadline;
pub mod pool;
pub mod server;
