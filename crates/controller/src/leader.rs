//! Leader election with a coordination.k8s.io Lease: one writer among replicas.
//!
//! Optimistic concurrency on the Lease's resourceVersion decides races; a replica that
//! cannot renew within the lease duration steps down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

pub struct LeaderElection {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaderElection {
    /// Run forever, keeping `flag` true exactly while we hold the lease.
    pub async fn run(self, flag: Arc<AtomicBool>, on_change: impl Fn(bool) + Send + 'static) {
        let mut tick = tokio::time::interval(self.renew_every);
        loop {
            tick.tick().await;
            let held = match self.try_acquire_or_renew().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "lease renewal failed");
                    false
                }
            };
            if flag.swap(held, Ordering::AcqRel) != held {
                tracing::info!(lease = %self.name, identity = %self.identity, leader = held, "leadership changed");
                on_change(held);
            }
        }
    }

    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.lease_duration.as_secs() as i32;
        let spec = |transitions: Option<i32>, acquire: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: acquire,
            renew_time: Some(MicroTime(now)),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        };
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec(Some(0), Some(MicroTime(now)))),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let current = lease.spec.clone().unwrap_or_default();
                let mine = current.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = match (&current.renew_time, current.lease_duration_seconds) {
                    (Some(MicroTime(t)), Some(d)) => now.as_second() > t.as_second() + i64::from(d),
                    _ => true,
                };
                if !mine && !expired {
                    return Ok(false);
                }
                let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
                let acquire = if mine {
                    current.acquire_time
                } else {
                    Some(MicroTime(now))
                };
                lease.spec = Some(spec(Some(transitions), acquire));
                // replace carries our resourceVersion: a concurrent winner makes this 409.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

pub fn lease_api(client: Client, namespace: &str) -> Api<Lease> {
    Api::namespaced(client, namespace)
}
