//! What the multi-threaded CPU backends share: raw call structs handed to worker threads, and
//! splitting a call's rows over threads.

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

/// Elements of work below which [`for_each_range`] stays on the calling thread.
const WORK_PER_THREAD: usize = 1 << 15;

/// How many threads `items` items of `work_per_item` elements each deserve (at least one).
pub(crate) fn threads_for(items: usize, work_per_item: usize) -> usize {
    let by_work = items.saturating_mul(work_per_item.max(1)) / WORK_PER_THREAD;
    std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(by_work)
        .min(items)
        .max(1)
}

/// Runs `f` over contiguous ranges covering `0..items` (each item `work_per_item` elements of
/// work), on as many threads as the work deserves (one, for small calls).
pub(crate) fn for_each_range(
    items: usize,
    work_per_item: usize,
    f: impl Fn(std::ops::Range<usize>) + Sync,
) {
    let threads = threads_for(items, work_per_item);
    if threads == 1 {
        f(0..items);
        return;
    }
    let per = items.div_ceil(threads);
    std::thread::scope(|scope| {
        for start in (0..items).step_by(per) {
            let f = &f;
            scope.spawn(move || f(start..(start + per).min(items)));
        }
    });
}

/// [`for_each_range`] over the items of `out`, one output value per item, where each worker also
/// needs `scratch` f64 values of working memory: `f(start, chunk, scratch)` gets contiguous
/// chunks of `out` (`start` the index of `chunk[0]`), on as many threads as the work deserves
/// (one, for small calls). The workers' memory is allocated on the calling thread before any
/// starts, so where the host refuses it the call returns
/// [`crate::error::ErrorKind::OutOfMemory`] (naming `what`) having done nothing.
pub(crate) fn for_each_chunk_with_scratch<T: Send>(
    out: &mut [T],
    work_per_item: usize,
    scratch: usize,
    what: &str,
    f: impl Fn(usize, &mut [T], &mut [f64]) + Sync,
) -> crate::error::Result<()> {
    let items = out.len();
    let threads = threads_for(items, work_per_item);
    let mut memory = crate::host_alloc::filled(threads.saturating_mul(scratch), 0.0, what)?;
    if threads == 1 {
        f(0, out, &mut memory);
        return Ok(());
    }
    let per = items.div_ceil(threads);
    // At most `threads` chunks, each with the next `scratch` values (none when it is 0).
    let mut rest = memory.as_mut_slice();
    std::thread::scope(|scope| {
        for (i, chunk) in out.chunks_mut(per).enumerate() {
            let (mine, next) = std::mem::take(&mut rest).split_at_mut(scratch);
            rest = next;
            let f = &f;
            scope.spawn(move || f(i * per, chunk, mine));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item is visited once with its start index, each worker gets `scratch` values (or
    /// none), however many threads the host has.
    #[test]
    fn chunks_with_scratch_cover_every_item() {
        for scratch in [0usize, 3] {
            for items in [1usize, 2, 7, 64] {
                let mut out = vec![usize::MAX; items];
                for_each_chunk_with_scratch(&mut out, 1 << 20, scratch, "a test", |start, c, m| {
                    assert_eq!(m.len(), scratch);
                    m.fill(1.0);
                    for (i, x) in c.iter_mut().enumerate() {
                        *x = start + i;
                    }
                })
                .unwrap();
                assert_eq!(out, (0..items).collect::<Vec<_>>(), "scratch {scratch}");
            }
        }
    }
}
