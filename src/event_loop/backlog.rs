//! Back-pressure for `call_soon_threadsafe` floods.
//!
//! A thread calling `call_soon_threadsafe` in a tight loop queues callbacks faster than
//! the loop runs them, and under the GIL the two take turns for a whole switch interval
//! (5 ms) each. The queue then grows by tens of thousands of handles per turn, without
//! bound: 10M calls from one thread peaked at ~400 MB. Every new handle is memory the
//! kernel has to fault in, and the queue outgrows the CPU's caches.
//!
//! So once a thread has posted `HIGH` callbacks this way since the loop's current batch
//! began, it lets the loop catch up: it releases the GIL and waits until that batch has
//! run. It waits while the loop makes progress (reported every `PROGRESS_EVERY`
//! callbacks run), `MAX_WAIT` at most: a loop that ran none of them for `STALL` (stuck
//! in a long callback) lets it go. A wait that ran out is not repeated until the batch
//! ends, so a stuck loop holds posters up by `STALL` once per batch. The count is per
//! thread: a thread posting a few callbacks (an executor finishing its jobs) never waits,
//! however long the queue is and whoever else floods it; the loop's own thread never
//! waits.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use pyo3::Python;

/// Callbacks posted from any thread since the current batch began, from which a poster
/// on another thread waits for the loop (~1.6 MB of handles; 8k to 64k measured alike).
pub(crate) const HIGH: usize = 16384;
/// How long a poster waits for the loop to run any callback before it goes on.
const STALL: Duration = Duration::from_millis(10);
/// The longest a poster waits for a batch to end.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// The loop reports progress to waiting posters every this many callbacks.
pub(crate) const PROGRESS_EVERY: usize = 256;

/// Waits that ended with the batch, and waits given up, in this process (for tests:
/// `_threadsafe_waits()`).
static WAITS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// `_threadsafe_waits()`: how many times a thread posting with `call_soon_threadsafe`
/// waited for a loop's batch to end, and how many of those waits it gave up.
#[pyo3::pyfunction]
pub fn _threadsafe_waits() -> (u64, u64) {
    (
        WAITS[0].load(Ordering::Relaxed),
        WAITS[1].load(Ordering::Relaxed),
    )
}

thread_local! {
    /// This thread's posts: (loop, batch, count), the loop's address and batch number.
    static POSTED: Cell<(usize, u64, usize)> = const { Cell::new((0, 0, 0)) };
}

/// Counts a post of this thread to `loop_id` during its batch `batch`: true once it is
/// the `HIGH`-th (or later) of that batch.
#[inline]
pub(crate) fn count_post(loop_id: usize, batch: u64) -> bool {
    POSTED.with(|c| {
        let (l, b, n) = c.get();
        let n = if (l, b) == (loop_id, batch) { n + 1 } else { 1 };
        c.set((loop_id, batch, n));
        n >= HIGH
    })
}

/// Where posters wait for the loop's batch to end. The loop's state holds it with the
/// number of posters waiting (changed with the GIL held, so the loop, holding it too,
/// sees a poster that is about to wait); a forked child gets a fresh one (a mutex
/// another thread held at the fork would stay locked there; until then, one made
/// before the fork is not used).
pub(crate) struct Backlog {
    /// `fork_generation()` when made.
    generation: u64,
    /// Batches ended while someone waited.
    ended: Mutex<u64>,
    cond: Condvar,
    /// Bumped every `PROGRESS_EVERY` callbacks the loop runs while someone waits.
    progress: AtomicU64,
}

impl Default for Backlog {
    fn default() -> Self {
        Self {
            generation: crate::sys::fork_generation(),
            ended: Mutex::default(),
            cond: Condvar::default(),
            progress: AtomicU64::default(),
        }
    }
}

impl Backlog {
    /// False in a forked child, for one made in its parent.
    #[inline]
    pub(crate) fn usable(&self) -> bool {
        self.generation == crate::sys::fork_generation()
    }

    /// A poster (GIL held, counted as waiting) that found `HIGH` callbacks posted in the
    /// current batch, with the loop running on another thread: waits, without the GIL,
    /// for the batch to end. False if it gave up (see the module).
    pub(crate) fn wait(&self, py: Python<'_>) -> bool {
        let Ok(start) = self.ended.lock().map(|e| *e) else {
            return false;
        };
        let ended = py.detach(|| {
            let deadline = Instant::now() + MAX_WAIT;
            let Ok(mut guard) = self.ended.lock() else {
                return false;
            };
            let mut seen = self.progress.load(Ordering::Relaxed);
            loop {
                let slice = STALL.min(deadline.saturating_duration_since(Instant::now()));
                guard = match self.cond.wait_timeout_while(guard, slice, |e| *e == start) {
                    Ok((g, _)) => g,
                    Err(_) => return false,
                };
                if *guard != start {
                    return true;
                }
                let now = self.progress.load(Ordering::Relaxed);
                if now == seen || Instant::now() >= deadline {
                    return false;
                }
                seen = now;
            }
        });
        WAITS[usize::from(!ended)].fetch_add(1, Ordering::Relaxed);
        ended
    }

    /// The loop (GIL held) ran `PROGRESS_EVERY` more callbacks while posters wait.
    pub(crate) fn progress(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// The loop (GIL held) ended a batch or stopped while posters wait: wakes them.
    pub(crate) fn batch_ended(&self) {
        if let Ok(mut e) = self.ended.lock() {
            *e += 1;
        }
        self.cond.notify_all();
    }
}
