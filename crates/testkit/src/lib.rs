//! Test support for provider-proxy.
//!
//! This crate is a **dev-dependency only**: it is used by the other crates'
//! tests and by the end-to-end test crate, never by the shipped binary.
//!
//! - [`certs`]: a throwaway PKI (CA + leaf for `localhost`, `127.0.0.1`, `::1`)
//!   and rustls configs built on the ring provider.
//! - [`upstream`]: an in-process AI-provider stand-in (hyper 1, h1 + h2,
//!   plain or TLS) with request recording and streaming/stalling endpoints.
//! - [`proxies`]: guards around *real* proxy processes (Squid, Dante,
//!   microsocks) on loopback, each in its own temp dir and process group.
//! - [`fault`]: small in-process proxies that misbehave on purpose (or speak
//!   SOCKS4a, which nothing packaged does).
//! - [`client`]: tiny hyper/rustls client helpers for tests.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod certs;
pub mod client;
pub mod fault;
pub mod process;
pub mod proxies;
pub mod upstream;

mod util;

pub use certs::TestPki;
pub use fault::{Behavior, FaultProxy, closed_port};
pub use process::{ChildGuard, StderrTail};
pub use proxies::{Dante, DanteOptions, Microsocks, Squid, SquidOptions};
pub use upstream::{RecordedRequest, Upstream, UpstreamOptions};
pub use util::free_port;
