//! A handle that keeps a listener registered until it is cancelled or dropped.

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
