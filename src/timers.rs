//! Timer queue. Mirrors asyncio.base_events.BaseEventLoop._scheduled (a heap with lazy cancel).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// asyncio's `_MIN_SCHEDULED_TIMER_HANDLES`: below this many timers, cancelled ones are
/// only dropped when they reach the head of the queue.
pub const MIN_SCHEDULED_TIMER_HANDLES: usize = 100;
/// asyncio's `_MIN_CANCELLED_TIMER_HANDLES_FRACTION`.
pub const MIN_CANCELLED_TIMER_HANDLES_FRACTION: f64 = 0.5;

struct Entry<T> {
    when: f64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // NOTE: reversed so std's max-heap pops the earliest deadline; ties go to the
    //       timer scheduled first (asyncio's heapq gives that order for equal `when`s
    //       in the common cases, and FIFO is what users expect).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .when
            .total_cmp(&self.when)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// A min-heap of timers keyed by deadline, cancelled entries removed lazily.
pub struct TimerQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
    /// Timers cancelled while still in the heap (asyncio's `_timer_cancelled_count`).
    cancelled: usize,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerQueue<T> {
    pub fn new() -> Self {
        TimerQueue {
            heap: BinaryHeap::new(),
            seq: 0,
            cancelled: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn push(&mut self, when: f64, item: T) {
        self.seq += 1;
        self.heap.push(Entry {
            when,
            seq: self.seq,
            item,
        });
    }

    /// The item `pop` would return next, whatever its deadline.
    pub fn head(&self) -> Option<&T> {
        self.heap.peek().map(|e| &e.item)
    }

    /// The earliest deadline and its item.
    pub fn peek(&self) -> Option<(f64, &T)> {
        self.heap.peek().map(|e| (e.when, &e.item))
    }

    pub fn pop(&mut self) -> Option<(f64, T)> {
        self.heap.pop().map(|e| (e.when, e.item))
    }

    /// Pops the head unless its deadline is at or after `end` (asyncio's test: a NaN
    /// deadline at the head is due. NaN sorts after every number here, so it comes due
    /// once the timers before it have.)
    pub fn pop_due(&mut self, end: f64) -> Option<T> {
        match self.heap.peek() {
            Some(e)
                if !matches!(
                    e.when.partial_cmp(&end),
                    Some(Ordering::Greater | Ordering::Equal)
                ) =>
            {
                self.heap.pop().map(|e| e.item)
            }
            _ => None,
        }
    }

    /// Records that a timer still in the queue was cancelled.
    pub fn note_cancelled(&mut self) {
        self.cancelled += 1;
    }

    pub fn cancelled_count(&self) -> usize {
        self.cancelled
    }

    /// asyncio's clean-up at the top of `_run_once`: when more than half of a large queue
    /// is cancelled, rebuild it without them; otherwise drop cancelled timers from the
    /// head. Returns the removed items so the caller can release them outside any borrow.
    pub fn purge_cancelled(&mut self, is_cancelled: impl Fn(&T) -> bool, removed: &mut Vec<T>) {
        let count = self.heap.len();
        if count > MIN_SCHEDULED_TIMER_HANDLES
            && self.cancelled as f64 / count as f64 > MIN_CANCELLED_TIMER_HANDLES_FRACTION
        {
            let entries = std::mem::take(&mut self.heap).into_vec();
            let mut kept = Vec::with_capacity(count - self.cancelled.min(count));
            for e in entries {
                if is_cancelled(&e.item) {
                    removed.push(e.item);
                } else {
                    kept.push(e);
                }
            }
            self.heap = BinaryHeap::from(kept);
            self.cancelled = 0;
        } else {
            while let Some(e) = self.heap.peek() {
                if !is_cancelled(&e.item) {
                    break;
                }
                self.cancelled = self.cancelled.saturating_sub(1);
                if let Some(e) = self.heap.pop() {
                    removed.push(e.item);
                }
            }
        }
    }

    /// Removes everything (loop close).
    pub fn drain(&mut self) -> Vec<T> {
        self.cancelled = 0;
        std::mem::take(&mut self.heap)
            .into_vec()
            .into_iter()
            .map(|e| e.item)
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.heap.iter().map(|e| &e.item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn pops_in_deadline_then_fifo_order() {
        let mut q = TimerQueue::new();
        q.push(2.0, "c");
        q.push(1.0, "a");
        q.push(1.0, "b");
        q.push(-1.0, "neg");
        assert_eq!(q.pop_due(1.5), Some("neg"));
        assert_eq!(q.pop_due(1.5), Some("a"));
        assert_eq!(q.pop_due(1.5), Some("b"));
        assert_eq!(q.pop_due(1.5), None);
        assert_eq!(q.peek().map(|(w, _)| w), Some(2.0));
        assert_eq!(q.pop(), Some((2.0, "c")));
        assert!(q.is_empty());
    }

    #[test]
    fn small_queue_drops_cancelled_only_at_head() {
        let cancelled: Vec<Cell<bool>> = (0..10).map(|_| Cell::new(false)).collect();
        let mut q = TimerQueue::new();
        for i in 0..10 {
            q.push(i as f64, i);
        }
        for i in [0usize, 1, 5] {
            cancelled[i].set(true);
            q.note_cancelled();
        }
        let mut removed = Vec::new();
        q.purge_cancelled(|i| cancelled[*i].get(), &mut removed);
        assert_eq!(removed, vec![0, 1]);
        assert_eq!(q.len(), 8);
        assert_eq!(q.cancelled_count(), 1);
    }

    #[test]
    fn large_queue_is_compacted_when_mostly_cancelled() {
        let n = 1000;
        let mut q = TimerQueue::new();
        for i in 0..n {
            q.push((n - i) as f64, i);
        }
        for _ in 0..600 {
            q.note_cancelled();
        }
        let mut removed = Vec::new();
        q.purge_cancelled(|i| *i < 600, &mut removed);
        assert_eq!(removed.len(), 600);
        assert_eq!(q.len(), 400);
        assert_eq!(q.cancelled_count(), 0);
        let mut last = f64::NEG_INFINITY;
        while let Some((w, i)) = q.pop() {
            assert!(w >= last);
            assert!(i >= 600);
            last = w;
        }
    }

    #[test]
    fn nan_deadline_is_due_at_once() {
        let mut q = TimerQueue::new();
        q.push(f64::NAN, "nan");
        assert_eq!(q.pop_due(0.0), Some("nan"));
    }

    #[test]
    fn drain_empties() {
        let mut q = TimerQueue::new();
        q.push(1.0, 1);
        q.note_cancelled();
        assert_eq!(q.drain(), vec![1]);
        assert!(q.is_empty());
        assert_eq!(q.cancelled_count(), 0);
    }
}
