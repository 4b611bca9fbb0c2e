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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::jiff::Timestamp;
    use provider_proxy_api::{Manifests, Timeouts};
    use provider_proxy_dataplane::ErrorClass;

    use super::*;

    fn provider(url: Option<&str>) -> Provider {
        let proxy = url
            .map(|u| format!("  proxy: {{url: \"{u}\"}}\n"))
            .unwrap_or_default();
        let mut m = Manifests::default();
        m.parse_yaml(
            "t",
            &format!("apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: a, namespace: ns}}\nspec:\n  upstream: https://api.example\n{proxy}"),
        )
        .unwrap();
        (*m.build_snapshot(1, &Timeouts::default()).providers["a"]).clone()
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn issue(reason: Reason) -> FieldIssue {
        FieldIssue {
            path: "spec.x".into(),
            reason,
            message: "is wrong".into(),
        }
    }

    fn outcome(success: bool) -> ProbeOutcome {
        ProbeOutcome {
            success,
            http_status: success.then_some(200),
            latency: Duration::from_millis(41),
            used_proxy: success,
            proxy: Some("http://u:***@p:1".into()),
            error: (!success).then_some(ErrorClass::ProxyAuth),
            message: (!success).then(|| "proxy answered CONNECT with 407".into()),
        }
    }

    #[test]
    fn every_invalid_spec_reason_becomes_ready_false() {
        for reason in [
            Reason::InvalidUpstream,
            Reason::InvalidProxyUrl,
            Reason::SecretNotFound,
            Reason::SecretKeyMissing,
            Reason::CredentialsConflict,
            Reason::InvalidCaBundle,
            Reason::InvalidTimeout,
            Reason::InvalidProbe,
        ] {
            let s = build_status(
                Some(3),
                &Err(vec![issue(reason), issue(Reason::InvalidTimeout)]),
                None,
                None,
                None,
                &at(10),
                None,
            );
            let c = &s.conditions[0];
            assert_eq!(
                (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
                (READY, "False", reason.as_str())
            );
            assert_eq!(c.message, "spec.x: is wrong; spec.x: is wrong");
            assert_eq!(s.observed_generation, Some(3));
            assert_eq!(c.observed_generation, Some(3));
        }
    }

    #[test]
    fn probe_results_decide_ready() {
        let ok = Ok(provider(Some("http://p:1")));
        let s = build_status(
            Some(1),
            &ok,
            Some(&outcome(true)),
            Some("t1"),
            None,
            &at(10),
            Some("http://p:1".into()),
        );
        assert_eq!(
            (
                s.conditions[0].status.as_str(),
                s.conditions[0].reason.as_str()
            ),
            ("True", "Ready")
        );
        let probe = s.last_probe.as_ref().unwrap();
        assert_eq!(
            (
                probe.success,
                probe.http_status,
                probe.latency_ms,
                probe.used_proxy
            ),
            (true, Some(200), 41, true)
        );
        assert_eq!(probe.summary.as_deref(), Some("200 in 41ms via proxy"));

        let s = build_status(
            Some(1),
            &ok,
            Some(&outcome(false)),
            Some("t2"),
            None,
            &at(10),
            None,
        );
        let c = &s.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ProbeFailed")
        );
        assert!(
            c.message
                .contains("through the proxy failed (proxy_auth): proxy answered CONNECT with 407"),
            "{}",
            c.message
        );
        assert_eq!(s.last_probe.unwrap().error.as_deref(), Some("proxy_auth"));

        let s = build_status(Some(1), &ok, None, None, None, &at(10), None);
        assert_eq!(
            (
                s.conditions[0].status.as_str(),
                s.conditions[0].reason.as_str()
            ),
            ("True", "Resolved")
        );
    }

    #[test]
    fn credentials_in_url_is_a_warning_condition() {
        let p = provider(Some("http://alice:hunter2@p:1"));
        let s = build_status(
            Some(1),
            &Ok(p),
            Some(&outcome(true)),
            Some("t"),
            None,
            &at(10),
            None,
        );
        assert_eq!(s.conditions.len(), 2);
        let w = &s.conditions[1];
        assert_eq!(
            (w.type_.as_str(), w.status.as_str(), w.reason.as_str()),
            (WARNING, "True", "CredentialsInUrl")
        );
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
    }

    #[test]
    fn transition_time_moves_only_on_a_status_flip() {
        let ok = Ok(provider(None));
        let first = build_status(
            Some(1),
            &ok,
            Some(&outcome(true)),
            Some("t1"),
            None,
            &at(10),
            None,
        );
        let again = build_status(
            Some(1),
            &ok,
            Some(&outcome(true)),
            Some("t2"),
            Some(&first),
            &at(20),
            None,
        );
        assert_eq!(again.conditions[0].last_transition_time, at(10));
        let failed = build_status(
            Some(1),
            &ok,
            Some(&outcome(false)),
            Some("t3"),
            Some(&again),
            &at(30),
            None,
        );
        assert_eq!(failed.conditions[0].last_transition_time, at(30));
        assert_eq!(
            ready_of(Some(&failed)),
            Some(("False".into(), "ProbeFailed".into()))
        );
        // No new probe: the previous lastProbe stays.
        let kept = build_status(Some(2), &ok, None, None, Some(&failed), &at(40), None);
        assert_eq!(kept.last_probe, failed.last_probe);
    }
}
