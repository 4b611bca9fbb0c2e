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
    let listener =
        std::net::TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    start_workers(listener, acceptor)?;
    // Exit when the bench goes away (stdin is its pipe); the workers go with the process.
    use std::io::Read;
    let mut buf = [0u8; 64];
    while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    Ok(())
}

/// Threads of the SSE upstream.
const WORKERS: usize = 2;

/// Serve `listener` on [`WORKERS`] threads. Like the load generator and the sidecar: a
/// single-threaded runtime per core, each accepting on the shared socket and serving its
/// connections start to end, so an event is a timer and a write on one thread. The
/// upstream shares the two cores with what it serves; on a work-stealing runtime it spent
/// them waking its other thread (serving the sidecar's two h2 connections at 256 streams
/// it took 36 % of a core, 16–18 % now; HTTP/1.1 streams cost the same either way).
fn start_workers(listener: std::net::TcpListener, acceptor: TlsAcceptor) -> Result<(), String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    for worker in 0..WORKERS {
        let listener = listener.try_clone().map_err(|e| format!("listener: {e}"))?;
        let acceptor = acceptor.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        std::thread::Builder::new()
            .name(format!("sse-upstream-{worker}"))
            .spawn(move || rt.block_on(serve(listener, acceptor)))
            .map_err(|e| format!("worker thread: {e}"))?;
    }
    Ok(())
}

/// Accept on `listener` and serve every connection on this thread's runtime.
async fn serve(listener: std::net::TcpListener, acceptor: TlsAcceptor) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sse-upstream: listener: {e}");
            return;
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Like the nginx upstream (http2_max_concurrent_streams 1024): 256 streams fit on one h2
    // connection, so the h2 row measures the forwarder, not a stream limit.
    builder.http2().max_concurrent_streams(1024);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{self, Expect, RequestTemplate, SseCheck, Target, Via};
    use http_body_util::Full;
    use provider_proxy_testkit::TestPki;
    use rustls::pki_types::ServerName;

    /// The upstream as `main` runs it, on an ephemeral port.
    fn start(pki: &TestPki, dir: &std::path::Path) -> SocketAddr {
        let (_, cert, key) = pki.write_to(dir);
        let acceptor =
            TlsAcceptor::from(tls_config(cert.to_str().unwrap(), key.to_str().unwrap()).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        start_workers(listener, acceptor).unwrap();
        addr
    }

    #[tokio::test]
    async fn serves_whole_paced_streams_over_http1_and_many_over_one_h2_connection() {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let addr = start(&pki, dir.path());
        let name = ServerName::try_from("localhost").unwrap();

        // HTTP/1.1, through the load generator: 4 connections, whole streams in order,
        // each at least the schedule long (19 intervals after the first event).
        let target = Arc::new(Target {
            connect: addr,
            via: Via::Direct,
            upstream: addr,
            tls: Some((pki.rustls_client_config(&[b"http/1.1"]), name.clone())),
            path: http::Uri::from_static("/v1/messages"),
            host: header::HeaderValue::from_static("localhost"),
        });
        let start_at = Instant::now();
        let end = start_at + Duration::from_millis(450);
        let r = load::run(
            target,
            Arc::new(RequestTemplate::new(true)),
            Expect::Sse { events: EVENTS },
            4,
            Duration::ZERO,
            start_at,
            end,
        )
        .await;
        assert_eq!(r.errors, 0, "{:?}", r.error_kinds);
        assert!(r.ok >= 4, "{} streams", r.ok);
        let schedule = (INTERVAL * (EVENTS - 1)).as_micros() as u32;
        assert!(
            r.latency_us.iter().all(|&l| l >= schedule),
            "{:?}",
            r.latency_us
        );

        // h2: 32 streams at once on one connection, each whole and in order.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki.rustls_client_config(&[b"h2"]))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let mut sender = sender.clone();
            streams.spawn(async move {
                let req = Request::post("https://localhost/v1/messages")
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap();
                let mut body = sender.send_request(req).await.unwrap().into_body();
                let mut check = SseCheck::new(EVENTS);
                while let Some(f) = body.frame().await {
                    if let Some(d) = f.unwrap().data_ref() {
                        check.feed(d)?;
                    }
                }
                check.finish()
            });
        }
        let mut whole = 0;
        while let Some(r) = streams.join_next().await {
            r.unwrap().unwrap();
            whole += 1;
        }
        assert_eq!(whole, 32);
    }
}
