//! End-to-end tests: the sidecar in-process, real Squid / Dante / microsocks and in-repo
//! fault proxies on loopback, a TLS upstream stand-in speaking h1 and h2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod controller;
mod dataplane;
mod faults;
mod helm;
mod hygiene;
mod observability;
mod pool;
mod reliability;
mod soak;
