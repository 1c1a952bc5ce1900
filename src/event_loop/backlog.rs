//! Back-pressure for `call_soon_threadsafe` floods.
//!
//! A thread calling `call_soon_threadsafe` in a tight loop queues callbacks faster than
//! the loop runs them, and under the GIL the two take turns for a whole switch interval
//! (5 ms) each. The queue then grows by tens of thousands of handles per turn, without
//! bound: 10M calls from one thread peaked at ~400 MB. Every new handle is memory the
//! kernel has to fault in, and the queue outgrows the CPU's caches.
//!
//! So once `HIGH` callbacks have been posted this way since the loop's current batch
//! began, a poster on another thread lets the loop catch up: it releases the GIL and
//! waits until that batch has run, or for `WAIT` at most. A wait that runs out is not
//! repeated until the batch ends, so a loop stuck in a long callback holds a poster up
//! by `WAIT` at most once per batch. Posting a few callbacks from other threads (an
//! executor finishing its jobs) never waits, however long the queue is.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use pyo3::Python;

/// Callbacks posted from any thread since the current batch began, from which a poster
/// on another thread waits for the loop (~1.6 MB of handles; 8k to 64k measured alike).
pub(crate) const HIGH: usize = 16384;
/// The longest a poster waits for a batch to end.
const WAIT: Duration = Duration::from_millis(10);

/// Where posters wait for the loop's batch to end. The loop's state holds it with the
/// number of posters waiting (changed with the GIL held, so the loop, holding it too,
/// sees a poster that is about to wait); a forked child gets a fresh one (a mutex
/// another thread held at the fork would stay locked there).
#[derive(Default)]
pub(crate) struct Backlog {
    /// Batches ended while someone waited.
    ended: Mutex<u64>,
    cond: Condvar,
}

impl Backlog {
    /// A poster (GIL held, counted as waiting) that found `HIGH` callbacks posted in the
    /// current batch, with the loop running on another thread: waits, without the GIL,
    /// for the batch to end. False if it waited `WAIT` in vain.
    pub(crate) fn wait(&self, py: Python<'_>) -> bool {
        let Ok(start) = self.ended.lock().map(|e| *e) else {
            return false;
        };
        py.detach(|| {
            self.ended.lock().is_ok_and(|guard| {
                self.cond
                    .wait_timeout_while(guard, WAIT, |e| *e == start)
                    .is_ok_and(|(_, res)| !res.timed_out())
            })
        })
    }

    /// The loop (GIL held) ended a batch or stopped while posters wait: wakes them.
    pub(crate) fn batch_ended(&self) {
        if let Ok(mut e) = self.ended.lock() {
            *e += 1;
        }
        self.cond.notify_all();
    }
}
