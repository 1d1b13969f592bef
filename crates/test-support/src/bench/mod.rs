//! What the benchmarks share: command-line sections, the operation mix, a raw HTTP client,
//! memory figures from /proc.

pub mod args;
pub mod builds;
pub mod http;
pub mod mix;
pub mod no_writes;
pub mod procfs;
pub mod stats;
pub mod watchdog;
