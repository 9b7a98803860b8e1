//! Copying GPU buffers back to the host without blocking: a one-shot future completed by
//! `map_async`'s callback. Natively the device is polled to drive the callback; in the browser
//! the event loop does it while the future is pending.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

type Slot<T> = Arc<Mutex<(Option<T>, Option<Waker>)>>;

/// The receiving half of a one-shot channel.
pub struct OneShot<T> {
    slot: Slot<T>,
}

/// The sending half; callable once from any callback.
pub struct Sender<T> {
    slot: Slot<T>,
}

pub fn oneshot<T>() -> (Sender<T>, OneShot<T>) {
    let slot: Slot<T> = Arc::new(Mutex::new((None, None)));
    (Sender { slot: Arc::clone(&slot) }, OneShot { slot })
}

impl<T> Sender<T> {
    pub fn send(self, value: T) {
        let waker = {
            let mut s = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            s.0 = Some(value);
            s.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for OneShot<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Polls a future once with a no-op waker: `Some` when it was already complete. Used for
/// error-scope futures, which wgpu-core resolves immediately.
pub fn poll_now<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
