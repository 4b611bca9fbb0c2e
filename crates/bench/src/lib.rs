//! The provider-proxy benchmark (`make bench`): real nginx, Squid and Dante on loopback,
//! a Rust load generator, and tables of req/s, ratios to the floor, latency, CPU per
//! request and peak RSS. See the README's "Benchmark" section.
//!
//! Not part of the shipped binary; CI compiles it and runs the micro-benchmarks
//! (`benches/hot.rs`) in test mode.

pub mod instructions;
pub mod load;
pub mod procs;
pub mod report;
pub mod run;
pub mod setup;
pub mod sse;
