//! Body wrappers on the forwarding path.
//!
//! - [`OnceBody`]: the client's request body, handed to the first attempt lazily. If that
//!   attempt fails before polling it (the connection never got established), the body is
//!   still in its slot and a fallback attempt may take it; once polled, it is gone, which is
//!   exactly the rule "fall back only before any request byte went out".
//! - [`ObservedBody`]: the upstream's response body on its way to the client: enforces the
//!   body timeout (longest silence between chunks), counts bytes, and runs a completion
//!   hook once (the request log line and metrics), whether the body ended, failed or the
//!   client went away.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::ErrorClass;
use crate::pool::{BoxError, UpstreamBody};

/// The shared slot a request body waits in until an attempt takes it.
#[derive(Clone)]
pub struct BodySlot {
    shared: Arc<Slot>,
}

/// One allocation per request for both.
struct Slot {
    body: Mutex<Option<Incoming>>,
    sent: AtomicU64,
}

impl Slot {
    fn take(&self) -> Option<Incoming> {
        self.body.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl BodySlot {
    pub fn new(body: Incoming) -> Self {
        Self {
            shared: Arc::new(Slot {
                body: Mutex::new(Some(body)),
                sent: AtomicU64::new(0),
            }),
        }
    }

    /// A body for one attempt. It takes the request body on first poll.
    pub fn attempt(&self) -> OnceBody {
        let body = self.shared.body.lock().unwrap_or_else(|p| p.into_inner());
        let (hint, end) = match body.as_ref() {
            Some(b) => (b.size_hint(), b.is_end_stream()),
            None => (SizeHint::with_exact(0), true),
        };
        drop(body);
        OnceBody {
            state: State::Waiting,
            hint,
            end,
            shared: self.shared.clone(),
        }
    }

    /// Whether no attempt has polled the body yet: only then may another attempt be made.
    pub fn untouched(&self) -> bool {
        self.shared
            .body
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }
}

enum State {
    Waiting,
    Taken(Incoming),
    Gone,
}

pub struct OnceBody {
    state: State,
    hint: SizeHint,
    end: bool,
    shared: Arc<Slot>,
}

impl Body for OnceBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let State::Waiting = this.state {
            this.state = match this.shared.take() {
                Some(b) => State::Taken(b),
                None => State::Gone,
            };
        }
        match &mut this.state {
            State::Taken(b) => match ready!(Pin::new(b).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        this.shared
                            .sent
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
                None => Poll::Ready(None),
            },
            State::Gone => Poll::Ready(Some(Err(
                "request body already consumed by an earlier attempt".into(),
            ))),
            State::Waiting => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Taken(b) => b.is_end_stream(),
            _ => self.end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Taken(b) => b.size_hint(),
            _ => self.hint,
        }
    }
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    Failed(ErrorClass),
    /// The client went away before the end; the upstream request was cancelled.
    ClientGone,
}

/// Runs once when a response body is over, with how it ended and the bytes it carried.
pub trait Finish: Send + Unpin + 'static {
    fn finish(self, outcome: Outcome, bytes: u64);
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StreamError(pub String);

pub struct ObservedBody<F: Finish> {
    inner: UpstreamBody,
    body_timeout: Duration,
    /// Fires at most `body_timeout` after `last_chunk`. Re-armed only when it fires early,
    /// not on every chunk: a streaming answer sends thousands of small chunks. Made on the
    /// first wait only: a short answer usually arrives with its headers and never waits.
    silence: Option<Pin<Box<Sleep>>>,
    /// When the last chunk came, or, before any, the first wait began (the clock is not
    /// read for a body that never waits, nor for its last chunk).
    last_chunk: Option<Instant>,
    bytes: u64,
    on_finish: Option<F>,
}

impl<F: Finish> ObservedBody<F> {
    pub fn new(inner: UpstreamBody, body_timeout: Duration, on_finish: F) -> Self {
        Self {
            inner,
            body_timeout,
            silence: None,
            last_chunk: None,
            bytes: 0,
            on_finish: Some(on_finish),
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(f) = self.on_finish.take() {
            f.finish(outcome, self.bytes);
        }
    }
}

impl<F: Finish> Body for ObservedBody<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    // The last chunk: finish now, before the client sees it, so the
                    // upstream connection is idle again when its next request arrives.
                    this.finish(Outcome::Complete);
                } else {
                    this.last_chunk = Some(Instant::now());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let class = if e.is_timeout() {
                    ErrorClass::BodyTimeout
                } else {
                    ErrorClass::UpstreamReset
                };
                this.finish(Outcome::Failed(class));
                Poll::Ready(Some(Err(Box::new(StreamError(format!(
                    "upstream body failed: {e}"
                ))))))
            }
            Poll::Ready(None) => {
                this.finish(Outcome::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let last_chunk = *this.last_chunk.get_or_insert_with(Instant::now);
                let silence = this.silence.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(last_chunk + this.body_timeout))
                });
                loop {
                    ready!(silence.as_mut().poll(cx));
                    let deadline = this.last_chunk.unwrap_or(last_chunk) + this.body_timeout;
                    if deadline <= Instant::now() {
                        break;
                    }
                    silence.as_mut().reset(deadline);
                }
                this.finish(Outcome::Failed(ErrorClass::BodyTimeout));
                Poll::Ready(Some(Err(Box::new(StreamError(format!(
                    "upstream sent nothing for {} ms (body timeout)",
                    this.body_timeout.as_millis()
                ))))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: Finish> Drop for ObservedBody<F> {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.finish(Outcome::Complete);
        } else {
            self.finish(Outcome::ClientGone);
        }
    }
}
