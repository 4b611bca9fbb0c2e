//! The operator: watches ProviderProxies (and the Secrets they name), validates and
//! resolves them with the API crate's pure functions, probes them with the data plane's
//! connectors, writes status with server-side apply, and pushes per-namespace snapshots
//! to authenticated sidecars.

pub mod hub;
pub mod leader;
pub mod metrics;
pub mod push;
pub mod reconcile;
pub mod run;
pub mod status;

pub use hub::SnapshotHub;
pub use run::{ControllerSettings, RunningController, start};
