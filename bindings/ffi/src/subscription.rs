//! A handle that keeps a listener registered until it is cancelled or dropped.
//!
//! A listener that stops because the app let go of its subscription (a garbage-collected
//! Kotlin or Python object, a Swift value out of scope) is a common, silent bug: the drop of
//! a subscription still active logs a warning, which reaches the app's `setLogger`.

use parking_lot::Mutex;

/// Keeps a watch, change listener or status listener alive. `cancel()` (or dropping the
/// handle: `close()` in Kotlin, going out of scope in Swift and Python) unregisters it.
/// Keep a reference for as long as you want callbacks.
#[derive(uniffi::Object)]
pub struct Subscription {
    inner: Mutex<Option<Box<dyn Send>>>,
}

impl Subscription {
    pub(crate) fn new(inner: impl Send + 'static) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Subscription {
            inner: Mutex::new(Some(Box::new(inner))),
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.inner.get_mut().is_some() {
            tracing::warn!(
                "a live subscription was dropped without cancel(): its listener stops; keep a \
                 reference to the Subscription for as long as callbacks are wanted"
            );
        }
    }
}

#[uniffi::export]
impl Subscription {
    /// Stops callbacks now. Cancelling twice does nothing.
    pub fn cancel(&self) {
        drop(self.inner.lock().take());
    }

    /// True until cancelled.
    pub fn is_active(&self) -> bool {
        self.inner.lock().is_some()
    }
}
