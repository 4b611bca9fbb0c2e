//! [`WakeGate`]: polls an HTTP/1.1 connection and what waits on it as one unit.
//!
//! hyper's client connection and the futures that wait on it (the response head, the
//! response body's channel) wake each other: a chunk read on the connection wakes the body,
//! polling the body tells the connection it wants more. Here the request's own task polls
//! both, in the same call (see `conns`), so each of those wake-ups only queued the task
//! again, to run the client connection, hyper's server loop and this body once more for
//! nothing: 2.1 task polls per SSE event, where one does (callgrind, `make
//! bench-instructions`). The gate hands its own waker to everything it polls. A wake-up
//! that comes while it is polling is noted and answered by polling again at once; one that
//! comes later (the socket turned readable, a timer fired) wakes the task.
//!
//! The gate also knows when polling again is pointless: hyper's server polls a body a
//! second time right after it answered pending (to be sure it may yield). If nothing woke
//! the gate since, everything behind it would answer pending again, so the gate answers
//! for them ([`Quiet`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
/// Polling, and something woke the gate meanwhile.
const WOKEN: u8 = 2;

/// Rounds of polling again after a wake-up during the poll. Two are the common case (the
/// body asked for more, the connection found nothing to read). The bound is for wake-ups
/// that mean "yield": tokio's budget running out wakes at once and returns `Pending`;
/// past the bound the task itself is woken, so it yields and comes back.
const ROUNDS: usize = 4;

pub(super) struct WakeGate {
    shared: Arc<Shared>,
    /// A waker for `shared`, made once: handing it out clones an `Arc`, no allocation.
    waker: Waker,
}

struct Shared {
    state: AtomicU8,
    /// Wake-ups so far (wrapping): a waiter that went pending notes the count, and while
    /// it stands still nothing it waits on has changed.
    wakes: AtomicU32,
    /// The task to wake when a wake-up comes while not polling.
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // The poll loop sees it and polls again.
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

impl Default for WakeGate {
    fn default() -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE),
            wakes: AtomicU32::new(0),
            task: AtomicWaker::new(),
        });
        Self {
            waker: Waker::from(shared.clone()),
            shared,
        }
    }
}

impl WakeGate {
    /// Drop the waker of the task that last polled through the gate (a request that is
    /// over). Until another task polls, wake-ups go nowhere: nobody waits.
    pub fn forget_task(&self) {
        drop(self.shared.task.take());
    }
}

/// One waiter's memory of the gate: the wake-up count when it last went pending with
/// nothing woken, if it did. A waiter (a response head, a response body) keeps its own, so
/// the next one on the connection starts afresh.
#[derive(Default)]
pub(super) struct Quiet(Option<u32>);

impl WakeGate {
    /// Run `f` with the gate's waker until it is ready, or pending with no wake-up during
    /// the call. A wake-up during a call that ends ready is dropped: whoever gets the
    /// result polls again for the next one (a body's next frame), which polls everything
    /// that was woken. If `quiet` says nothing woke the gate since `f` last went pending,
    /// `f` is not run at all.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        quiet: &mut Quiet,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.shared.task.register(cx.waker());
        if quiet.0 == Some(self.shared.wakes.load(Ordering::Acquire)) {
            return Poll::Pending;
        }
        let mut inner = Context::from_waker(&self.waker);
        for _ in 0..ROUNDS {
            // Read before polling: a wake-up from here on changes it.
            let wakes = self.shared.wakes.load(Ordering::Acquire);
            self.shared.state.store(POLLING, Ordering::Release);
            let out = f(&mut inner);
            let woken = self.shared.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
            if out.is_ready() {
                quiet.0 = None;
                return out;
            }
            if !woken {
                quiet.0 = Some(wakes);
                return out;
            }
        }
        quiet.0 = None;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the task's wake-ups.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn task() -> (Arc<Counter>, Waker) {
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn a_wake_up_during_the_poll_polls_again_instead_of_waking_the_task() {
        let gate = WakeGate::default();
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut calls = 0;
        // Like a body that asks the connection for more: wakes itself, then is ready.
        let out = gate.poll(&mut cx, &mut Quiet::default(), |cx| {
            calls += 1;
            if calls == 1 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(calls)
            }
        });
        assert_eq!(out, Poll::Ready(2));
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "the task was not woken");
    }

    #[test]
    fn a_wake_up_after_the_poll_wakes_the_task() {
        let gate = WakeGate::default();
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut kept = None;
        // Like a socket: keeps the waker and returns pending.
        let out: Poll<()> = gate.poll(&mut cx, &mut Quiet::default(), |cx| {
            kept = Some(cx.waker().clone());
            Poll::Pending
        });
        assert!(out.is_pending());
        let Some(kept) = kept else {
            panic!("the closure ran")
        };
        kept.wake_by_ref();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        // Polled again (and registered again), the next wake-up reaches the task too.
        let _ = gate.poll(&mut cx, &mut Quiet::default(), |_| Poll::<()>::Pending);
        kept.wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn endless_wake_ups_end_in_a_yield() {
        let gate = WakeGate::default();
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut calls = 0;
        // Like tokio's spent budget: wake at once, pending.
        let out: Poll<()> = gate.poll(&mut cx, &mut Quiet::default(), |cx| {
            calls += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(out.is_pending());
        assert_eq!(calls, ROUNDS);
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "the task yields and comes back"
        );
    }

    #[test]
    fn a_waiter_that_went_pending_is_not_polled_again_until_something_wakes_the_gate() {
        let gate = WakeGate::default();
        let (count, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut quiet = Quiet::default();
        let mut calls = 0;
        let mut kept = None;
        // Like a socket with nothing to read: keeps the waker, pending.
        let mut pending = |cx: &mut Context<'_>| {
            calls += 1;
            kept = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        assert!(gate.poll(&mut cx, &mut quiet, &mut pending).is_pending());
        assert!(gate.poll(&mut cx, &mut quiet, &mut pending).is_pending());
        // Another waiter on the same gate starts afresh.
        assert!(
            gate.poll(&mut cx, &mut Quiet::default(), &mut pending)
                .is_pending()
        );
        assert_eq!(
            calls, 2,
            "nothing woke the gate: its second poll was answered for it"
        );
        let Some(socket) = kept.take() else {
            panic!("the closure ran")
        };
        socket.wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        let mut polled_again = false;
        assert!(
            gate.poll(&mut cx, &mut quiet, |_| {
                polled_again = true;
                Poll::<()>::Pending
            })
            .is_pending()
        );
        assert!(polled_again, "woken: polled again");
    }

    #[test]
    fn a_forgotten_task_is_let_go_and_never_woken() {
        let gate = WakeGate::default();
        let (count, waker) = task();
        let pending = gate.poll(
            &mut Context::from_waker(&waker),
            &mut Quiet::default(),
            |_| Poll::<()>::Pending,
        );
        assert!(pending.is_pending());
        drop(waker);
        assert_eq!(
            Arc::strong_count(&count),
            2,
            "the gate holds the task's waker"
        );
        gate.forget_task();
        assert_eq!(Arc::strong_count(&count), 1, "and lets it go");
        gate.waker.wake_by_ref();
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
    }
}
