//! The SSE upstream (`provider-proxy-bench sse-upstream`): nginx cannot pace events, so this
//! small hyper server answers every request with `text/event-stream`: `events` events, the
//! first at once with the headers, then one every `interval`, on an absolute schedule (no
//! drift), over TLS with HTTP/1.1 and HTTP/2 (ALPN). It runs as its own process so that its
//! CPU is accounted apart from the load generator's, and it exits when its stdin closes
//! (the bench died).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// Events per stream and their spacing, as the issue asks.
pub const EVENTS: u32 = 20;
pub const INTERVAL: Duration = Duration::from_millis(5);

/// One SSE event, shaped like Anthropic's `content_block_delta`, carrying its sequence number.
pub fn event(seq: u32) -> Bytes {
    Bytes::from(format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"seq\":{seq},\"delta\":{{\"type\":\"text_delta\",\"text\":\"token {seq} of the benchmark stream\"}}}}\n\n"
    ))
}

/// The paced event stream.
pub(crate) struct SseBody {
    next: u32,
    total: u32,
    start: Instant,
    interval: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl SseBody {
    pub(crate) fn new(total: u32, interval: Duration) -> Self {
        let start = Instant::now();
        Self {
            next: 0,
            total,
            start,
            interval,
            sleep: Box::pin(tokio::time::sleep_until(start)),
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.next >= self.total {
            return Poll::Ready(None);
        }
        if self.next > 0 {
            ready!(self.sleep.as_mut().poll(cx));
        }
        let seq = self.next;
        self.next += 1;
        let at = self.start + self.interval * self.next;
        self.sleep.as_mut().reset(at);
        Poll::Ready(Some(Ok(Frame::data(event(seq)))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<SseBody>, Infallible> {
    // Read the request body whole, as a real upstream would before answering.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(SseBody::new(EVENTS, INTERVAL));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    Ok(resp)
}

fn tls_config(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{cert}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// `sse-upstream --listen ADDR --cert PEM --key PEM`
pub fn main(args: &[String]) -> Result<(), String> {
    let mut listen = None;
    let mut cert = None;
    let mut key = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--listen" => {
                listen = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("--listen {v}: {e}"))?,
                )
            }
            "--cert" => cert = Some(v.clone()),
            "--key" => key = Some(v.clone()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let (Some(listen), Some(cert), Some(key)) = (listen, cert, key) else {
        return Err("usage: sse-upstream --listen ADDR --cert PEM --key PEM".into());
    };
    let acceptor = TlsAcceptor::from(tls_config(&cert, &key)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        // Exit when the bench goes away (stdin is its pipe).
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 64];
            while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
            let _ = gone_tx.send(());
        });
        let parent_gone = async move {
            let _ = gone_rx.await;
        };
        tokio::pin!(parent_gone);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Like the nginx upstream (http2_max_concurrent_streams 1024): 256 streams fit on
        // one h2 connection, so the h2 row measures the forwarder, not a stream limit.
        builder.http2().max_concurrent_streams(1024);
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = &mut parent_gone => return Ok(()),
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = builder
                    .serve_connection(TokioIo::new(tls), service_fn(handle))
                    .await;
            });
        }
    })
}
