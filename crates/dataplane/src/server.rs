//! The data port and the admin port: accept loops on hyper, with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{ConfigStore, describe};
use crate::forward::Forwarder;

/// Serve `forwarder` on `listener` until `shutdown` resolves, then let open connections
/// finish for up to `grace`.
pub async fn serve_data(
    listener: TcpListener,
    forwarder: Arc<Forwarder>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let svc = move |req: Request<Incoming>| {
        let f = forwarder.clone();
        async move { Ok::<_, Infallible>(f.handle(req).await) }
    };
    accept_loop(listener, service_fn(svc), shutdown, grace).await;
}

/// `/metrics`, `/healthz`, `/readyz`, `/config` (providers with masked proxies).
pub async fn serve_admin(
    listener: TcpListener,
    config: Arc<ConfigStore>,
    shutdown: impl Future<Output = ()>,
) {
    let svc = move |req: Request<Incoming>| {
        let config = config.clone();
        async move { Ok::<_, Infallible>(admin(&req, &config)) }
    };
    accept_loop(listener, service_fn(svc), shutdown, Duration::from_secs(1)).await;
}

fn admin(req: &Request<Incoming>, config: &ConfigStore) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            config.metrics().render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let snap = config.snapshot();
            if config.is_loaded() {
                (
                    StatusCode::OK,
                    "text/plain",
                    format!(
                        "ready: config version {}, {} providers\n",
                        snap.version,
                        snap.providers.len()
                    ),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no config loaded yet\n".to_owned(),
                )
            }
        }
        "/config" => (
            StatusCode::OK,
            "application/json",
            describe(&config.snapshot()).to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

async fn accept_loop<S, B>(
    listener: TcpListener,
    svc: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc.clone())
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {} s; closing them",
            grace.as_secs()
        );
    }
}

/// Bind, with an error that names the address.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} for the {what} port: {e}"))
}
