//! What the multi-threaded CPU backends share: raw call structs handed to worker threads.

/// A value of raw pointers (a validated raw call) shared with worker threads.
pub(crate) struct Shared<T>(T);

// SAFETY: `Shared::new`'s contract: the workers read the shared inputs and each writes only
// output elements no other worker touches.
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Wraps `value` for the worker threads.
    ///
    /// # Safety
    /// The threads that use it must only read the memory its pointers share, and each may only
    /// write output elements that no other thread reads or writes while they run.
    pub(crate) unsafe fn new(value: T) -> Self {
        Shared(value)
    }

    /// The wrapped value (a method, so closures capture the whole `Shared`, not its field).
    pub(crate) fn get(&self) -> &T {
        &self.0
    }
}
