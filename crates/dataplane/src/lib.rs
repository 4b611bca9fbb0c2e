//! The data plane: the forwarding sidecar. It is handed [`Snapshot`]s (from files or the
//! controller) and knows nothing of Kubernetes clients.
//!
//! request → [`workers`] (one event loop per core) → [`server`] → [`forward`] (route by
//! `/<provider>/`, [`route`] table of the snapshot in force) → [`pool`] (agent per path)
//! → [`connector`] (direct | HTTP CONNECT | HTTPS proxy | SOCKS5 | SOCKS4) → upstream.
//!
//! [`Snapshot`]: provider_proxy_api::Snapshot

pub mod body;
pub mod config;
pub mod connector;
pub mod error;
pub mod forward;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod route;
pub mod server;
pub mod sidecar;
pub mod snapshot_client;
pub mod tls;
pub mod workers;

pub use config::{ConfigStore, FileLoader};
pub use error::{ConnectError, ErrorClass};
pub use forward::{Forwarder, ROUTE_HEADER};
pub use pool::{AgentPool, PoolSettings};
pub use route::Route;
pub use sidecar::{Running, Sidecar, SidecarSettings};
pub use tls::TrustRoots;
