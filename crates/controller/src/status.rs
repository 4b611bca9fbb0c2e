//! Pure: from what reconcile found (resolution, probe) to the `status` we write. Tested
//! without a cluster; the reconciler only applies what this returns.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use provider_proxy_api::crd::{ProbeResult, ProviderProxyStatus};
use provider_proxy_api::{FieldIssue, Provider, Reason};
use provider_proxy_dataplane::probe::ProbeOutcome;

pub const READY: &str = "Ready";
pub const WARNING: &str = "Warning";

/// What the `Ready` condition says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

/// Ready unless the spec is invalid or the last probe failed.
pub fn verdict(
    resolution: &Result<Provider, Vec<FieldIssue>>,
    probe: Option<&ProbeOutcome>,
) -> Verdict {
    match resolution {
        Err(issues) => {
            let reason = issues.first().map_or(Reason::InvalidUpstream, |i| i.reason);
            Verdict {
                ready: false,
                reason: reason.as_str().to_owned(),
                message: issues
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        }
        Ok(p) => match probe {
            Some(o) if !o.success => Verdict {
                ready: false,
                reason: "ProbeFailed".into(),
                message: format!(
                    "connection test {} failed ({}): {}",
                    if p.proxy.is_some() {
                        "through the proxy"
                    } else {
                        "to the upstream"
                    },
                    o.error.map_or("unknown", |e| e.as_str()),
                    o.message.as_deref().unwrap_or("no detail")
                ),
            },
            Some(o) => Verdict {
                ready: true,
                reason: "Ready".into(),
                message: format!("{} answered {}", p.upstream, o.summary()),
            },
            None => Verdict {
                ready: true,
                reason: "Resolved".into(),
                message: "configuration is valid; not probed yet".into(),
            },
        },
    }
}

/// The full status. `previous` keeps `lastTransitionTime` when a condition's status did
/// not change, so a periodic probe does not look like a flap.
pub fn build_status(
    generation: Option<i64>,
    resolution: &Result<Provider, Vec<FieldIssue>>,
    probe: Option<&ProbeOutcome>,
    probe_time: Option<&str>,
    previous: Option<&ProviderProxyStatus>,
    now: &Time,
    masked_proxy: Option<String>,
) -> ProviderProxyStatus {
    let v = verdict(resolution, probe);
    let mut conditions = vec![condition(
        READY, v.ready, &v.reason, &v.message, generation, previous, now,
    )];
    if let Ok(p) = resolution
        && let Some(w) = p.warnings.first()
    {
        let message = p
            .warnings
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        conditions.push(condition(
            WARNING,
            true,
            w.reason.as_str(),
            &message,
            generation,
            previous,
            now,
        ));
    }
    let last_probe = match (probe, probe_time) {
        (Some(o), Some(t)) => Some(ProbeResult {
            time: t.to_owned(),
            success: o.success,
            http_status: o.http_status,
            latency_ms: o.latency.as_millis() as u64,
            used_proxy: o.used_proxy,
            proxy: o.proxy.clone(),
            error: o.error.map(|e| e.as_str().to_owned()),
            summary: Some(o.summary()),
        }),
        _ => previous.and_then(|p| p.last_probe.clone()),
    };
    ProviderProxyStatus {
        observed_generation: generation,
        conditions,
        proxy: masked_proxy,
        last_probe,
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: Option<&ProviderProxyStatus>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        // Conditions cap messages at 32 KiB; ours are short, but never trust that.
        message: message.chars().take(4096).collect(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Ready's status and reason, to detect transitions worth an Event.
pub fn ready_of(status: Option<&ProviderProxyStatus>) -> Option<(String, String)> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| (c.status.clone(), c.reason.clone()))
}
