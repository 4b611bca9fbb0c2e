//! The snapshot service: sidecars hold `GET /v1/snapshots` open and receive their
//! namespace's snapshot as newline-delimited JSON, first the current one, then each new
//! version the moment it is published (Envoy's xDS model, minus the gRPC).
//!
//! Identity: the sidecar sends its pod's projected ServiceAccount token (a dedicated
//! audience); a TokenReview proves it, and the namespace comes from the token, never from
//! the request, so a sidecar can only ever receive its own namespace's providers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use provider_proxy_api::WireSnapshot;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::hub::SnapshotHub;
use crate::metrics::ControllerMetrics;

/// Header a sidecar sends with the version it already runs, to skip a redundant push.
pub const VERSION_HEADER: &str = "x-provider-proxy-version";
/// How often an idle stream carries a blank keep-alive line.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Who a token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("token not accepted: {0}")]
    Rejected(String),
    #[error("token is not for audience {0:?}")]
    WrongAudience(String),
    #[error("token does not belong to a ServiceAccount")]
    NotServiceAccount,
    #[error("token review failed: {0}")]
    Review(String),
}

impl AuthError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Missing | Self::Rejected(_) | Self::WrongAudience(_) => StatusCode::UNAUTHORIZED,
            Self::NotServiceAccount => StatusCode::FORBIDDEN,
            Self::Review(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    fn label(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Rejected(_) => "rejected_token",
            Self::WrongAudience(_) => "wrong_audience",
            Self::NotServiceAccount => "not_service_account",
            Self::Review(_) => "review_failed",
        }
    }
}

/// Checks tokens with TokenReviews.
#[derive(Clone)]
pub struct Authenticator {
    pub client: Client,
    pub audience: String,
}

impl Authenticator {
    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status.error.unwrap_or_else(|| "unauthenticated".into()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == &self.audience)
        {
            return Err(AuthError::WrongAudience(self.audience.clone()));
        }
        let user = status.user.unwrap_or_default();
        caller_of(&user.username.unwrap_or_default(), user.extra.as_ref())
    }
}

/// `system:serviceaccount:NS:NAME` → the caller; anything else is refused.
pub fn caller_of(
    username: &str,
    extra: Option<&std::collections::BTreeMap<String, Vec<String>>>,
) -> Result<Caller, AuthError> {
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or(AuthError::NotServiceAccount)?;
    let (ns, sa) = rest.split_once(':').ok_or(AuthError::NotServiceAccount)?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return Err(AuthError::NotServiceAccount);
    }
    let pod = extra
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
        .and_then(|v| v.first())
        .cloned();
    Ok(Caller {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
        pod,
    })
}

pub struct PushService {
    /// Snapshots are served only once the controller's initial state is complete.
    pub complete: tokio::sync::watch::Receiver<bool>,
    pub hub: Arc<SnapshotHub>,
    pub auth: Authenticator,
    pub metrics: Arc<ControllerMetrics>,
}

impl PushService {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&http::Method::GET, "/v1/snapshots") => {}
            (_, "/healthz") => return text(StatusCode::OK, "ok\n"),
            _ => return text(StatusCode::NOT_FOUND, "not found\n"),
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let caller = match token {
            None => Err(AuthError::Missing),
            Some(t) => self.auth.authenticate(t).await,
        };
        let caller = match caller {
            Ok(c) => c,
            Err(e) => {
                self.metrics
                    .push_rejections
                    .with_label_values(&[e.label()])
                    .inc();
                // The token itself is never logged.
                tracing::warn!(error = %e, "snapshot stream refused");
                return text(e.status(), &format!("{e}\n"));
            }
        };
        // A namespace in the query must match the token's; it can only narrow, never widen.
        if let Some(q) = req.uri().query()
            && let Some(ns) = q.split('&').find_map(|kv| kv.strip_prefix("namespace="))
            && ns != caller.namespace
        {
            self.metrics
                .push_rejections
                .with_label_values(&["namespace_mismatch"])
                .inc();
            tracing::warn!(token_namespace = %caller.namespace, requested = %ns, "snapshot stream refused: namespace mismatch");
            return text(
                StatusCode::FORBIDDEN,
                "a sidecar receives only its own namespace's config\n",
            );
        }
        let have: u64 = req
            .headers()
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tracing::info!(
            namespace = %caller.namespace,
            service_account = %caller.service_account,
            pod = caller.pod.as_deref().unwrap_or("-"),
            running_version = have,
            "sidecar connected"
        );
        let rx = self.hub.subscribe(&caller.namespace);
        let gauge = self
            .metrics
            .sidecars
            .with_label_values(&[&caller.namespace]);
        gauge.inc();
        let state = StreamState {
            complete: self.complete.clone(),
            hub: self.hub.clone(),
            rx,
            sent: have,
            caller,
            metrics: self.metrics.clone(),
            _connected: Connected(gauge),
            first: true,
        };
        let body = StreamBody::new(stream::unfold(state, next_frame));
        let mut resp = Response::new(BodyExt::boxed_unsync(body));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/x-ndjson"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        resp
    }
}

/// Decrements the connected-sidecars gauge when the stream ends.
struct Connected(prometheus::IntGauge);
impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct StreamState {
    complete: tokio::sync::watch::Receiver<bool>,
    hub: Arc<SnapshotHub>,
    rx: tokio::sync::watch::Receiver<Arc<provider_proxy_api::Snapshot>>,
    sent: u64,
    caller: Caller,
    metrics: Arc<ControllerMetrics>,
    _connected: Connected,
    first: bool,
}

async fn next_frame(
    mut st: StreamState,
) -> Option<(Result<Frame<Bytes>, Infallible>, StreamState)> {
    loop {
        if !*st.complete.borrow() {
            // Hold the sidecar on its last good snapshot until ours is whole.
            let waited = tokio::time::timeout(HEARTBEAT, st.complete.wait_for(|c| *c))
                .await
                .map(|r| r.is_ok());
            match waited {
                Err(_) => return Some((Ok(Frame::data(Bytes::from_static(b"\n"))), st)),
                Ok(false) => return None,
                Ok(true) => {}
            }
        }
        if st.first {
            st.first = false;
            st.rx.mark_changed();
        }
        match tokio::time::timeout(HEARTBEAT, st.rx.changed()).await {
            Err(_) => return Some((Ok(Frame::data(Bytes::from_static(b"\n"))), st)),
            Ok(Err(_)) => return None,
            Ok(Ok(())) => {}
        }
        let snap = st.rx.borrow_and_update().clone();
        if snap.version <= st.sent && snap.version != 0 {
            continue;
        }
        if snap.version == 0 {
            // Nothing reconciled in this namespace yet: an empty but valid snapshot tells
            // the sidecar it is connected and there are no providers.
            if st.sent != 0 {
                continue;
            }
        }
        st.sent = snap.version.max(1);
        let mut line = WireSnapshot::from_snapshot(&st.caller.namespace, &snap).to_json();
        line.push('\n');
        if let Some(at) = st.hub.published_at(&st.caller.namespace, snap.version) {
            st.metrics
                .push_latency
                .with_label_values(&[] as &[&str])
                .observe(at.elapsed().as_secs_f64());
        }
        st.metrics
            .pushes
            .with_label_values(&[&st.caller.namespace])
            .inc();
        tracing::info!(
            namespace = %st.caller.namespace,
            pod = st.caller.pod.as_deref().unwrap_or("-"),
            version = snap.version,
            providers = snap.providers.len(),
            "snapshot pushed"
        );
        return Some((Ok(Frame::data(Bytes::from(line))), st));
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())).boxed_unsync());
    *r.status_mut() = status;
    r
}

/// Serve until `shutdown` resolves; TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    service: Arc<PushService>,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = service_fn(move |req| {
        let svc = service.clone();
        async move { Ok::<_, Infallible>(svc.handle(req).await) }
    });
    // Streams never end by themselves: at shutdown they are cut after a short grace.
    provider_proxy_dataplane::server::serve(
        listener,
        handler,
        tls,
        shutdown,
        Duration::from_secs(1),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_accounts_and_their_namespace() {
        let c = caller_of("system:serviceaccount:ai:app", None).unwrap();
        assert_eq!(c.namespace, "ai");
        assert_eq!(c.service_account, "app");
        for bad in [
            "alice",
            "system:serviceaccount:",
            "system:serviceaccount:ai",
            "system:serviceaccount::app",
            "system:serviceaccount:ai:",
            "system:serviceaccount:ai:app:extra",
            "system:node:worker-1",
        ] {
            assert_eq!(
                caller_of(bad, None),
                Err(AuthError::NotServiceAccount),
                "{bad}"
            );
        }
    }
}
