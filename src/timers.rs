//! Timer queue. Mirrors asyncio.base_events.BaseEventLoop._scheduled (a heap with lazy cancel).
//!
//! A 4-ary min-heap: half the levels of a binary heap, and a node's children share one or
//! two cache lines, so popping from 100k timers touches about half as many lines. Each
//! entry keeps its deadline as an integer key whose order is `f64::total_cmp`'s, so a
//! comparison is two integer compares.

use std::mem::ManuallyDrop;
use std::ptr;

/// asyncio's `_MIN_SCHEDULED_TIMER_HANDLES`: below this many timers, cancelled ones are
/// only dropped when they reach the head of the queue.
pub const MIN_SCHEDULED_TIMER_HANDLES: usize = 100;
/// asyncio's `_MIN_CANCELLED_TIMER_HANDLES_FRACTION`.
pub const MIN_CANCELLED_TIMER_HANDLES_FRACTION: f64 = 0.5;

/// Children per node.
const ARITY: usize = 4;

/// `when` as an integer that sorts as `f64::total_cmp` sorts the floats (negative NaN,
/// -inf, ..., -0.0, 0.0, ..., inf, NaN).
#[inline]
fn key_of(when: f64) -> u64 {
    let b = when.to_bits();
    if b >> 63 == 1 { !b } else { b | (1 << 63) }
}

/// The inverse of `key_of`.
#[inline]
fn when_of(key: u64) -> f64 {
    f64::from_bits(if key >> 63 == 1 {
        key & !(1 << 63)
    } else {
        !key
    })
}

struct Entry<T> {
    key: u64,
    /// Ties go to the timer scheduled first (asyncio's heapq gives that order for equal
    /// `when`s in the common cases, and FIFO is what users expect).
    seq: u64,
    item: T,
}

impl<T> Entry<T> {
    #[inline]
    fn before(&self, other: &Self) -> bool {
        (self.key, self.seq) < (other.key, other.seq)
    }

    fn when(&self) -> f64 {
        when_of(self.key)
    }
}

/// A min-heap of timers keyed by deadline, cancelled entries removed lazily.
pub struct TimerQueue<T> {
    heap: Vec<Entry<T>>,
    seq: u64,
    /// Timers cancelled while still in the heap (asyncio's `_timer_cancelled_count`).
    cancelled: usize,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A slot of the heap whose entry was moved out (held in `elt`); dropping it writes the
/// entry back into the slot, so the vector is whole again whatever happens.
struct Hole<'a, T> {
    data: &'a mut [Entry<T>],
    elt: ManuallyDrop<Entry<T>>,
    pos: usize,
}

impl<'a, T> Hole<'a, T> {
    /// # Safety
    /// `pos < data.len()`.
    #[inline]
    unsafe fn new(data: &'a mut [Entry<T>], pos: usize) -> Self {
        debug_assert!(pos < data.len());
        // SAFETY: `pos` is in bounds; the slot is refilled when the hole drops.
        let elt = unsafe { ptr::read(data.as_ptr().add(pos)) };
        Hole {
            data,
            elt: ManuallyDrop::new(elt),
            pos,
        }
    }

    /// # Safety
    /// `index < data.len()` and `index != pos`.
    #[inline]
    unsafe fn get(&self, index: usize) -> &Entry<T> {
        debug_assert!(index != self.pos && index < self.data.len());
        // SAFETY: guaranteed by the caller.
        unsafe { self.data.get_unchecked(index) }
    }

    /// The index of the hole's smallest child, if it has any below `len`.
    ///
    /// # Safety
    /// `len <= data.len()`.
    #[inline]
    unsafe fn smallest_child(&self, len: usize) -> Option<usize> {
        let first = ARITY * self.pos + 1;
        if first >= len {
            return None;
        }
        let mut best = first;
        for c in first + 1..(first + ARITY).min(len) {
            // SAFETY: children are below `len` and after the hole.
            if unsafe { self.get(c).before(self.get(best)) } {
                best = c;
            }
        }
        Some(best)
    }

    /// Moves the entry at `index` into the hole, which moves to `index`.
    ///
    /// # Safety
    /// `index < data.len()` and `index != pos`.
    #[inline]
    unsafe fn move_to(&mut self, index: usize) {
        debug_assert!(index != self.pos && index < self.data.len());
        // SAFETY: both in bounds and distinct.
        unsafe {
            let base = self.data.as_mut_ptr();
            ptr::copy_nonoverlapping(base.add(index), base.add(self.pos), 1);
        }
        self.pos = index;
    }
}

impl<T> Drop for Hole<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `pos` is in bounds and its entry was moved out.
        unsafe {
            let pos = self.pos;
            ptr::copy_nonoverlapping(&*self.elt, self.data.get_unchecked_mut(pos), 1);
        }
    }
}

impl<T> TimerQueue<T> {
    pub fn new() -> Self {
        TimerQueue {
            heap: Vec::new(),
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
            key: key_of(when),
            seq: self.seq,
            item,
        });
        let last = self.heap.len() - 1;
        // SAFETY: `last` is in bounds.
        unsafe { self.sift_up(last) };
    }

    /// # Safety
    /// `pos < len`.
    unsafe fn sift_up(&mut self, pos: usize) {
        // SAFETY: `pos` is in bounds; every parent index is below it.
        unsafe {
            let mut hole = Hole::new(&mut self.heap, pos);
            while hole.pos > 0 {
                let parent = (hole.pos - 1) / ARITY;
                if !hole.elt.before(hole.get(parent)) {
                    break;
                }
                hole.move_to(parent);
            }
        }
    }

    /// Restores the heap below `pos` (heapify).
    ///
    /// # Safety
    /// `pos < len`.
    unsafe fn sift_down(&mut self, pos: usize) {
        let len = self.heap.len();
        // SAFETY: `pos` is in bounds; children are checked against `len`.
        unsafe {
            let mut hole = Hole::new(&mut self.heap, pos);
            while let Some(best) = hole.smallest_child(len) {
                if !hole.get(best).before(&hole.elt) {
                    break;
                }
                hole.move_to(best);
            }
        }
    }

    /// Removes the head: the hole left at the root goes down along the smallest children
    /// to a leaf, and the last entry, moved there, goes back up (it usually belongs near
    /// the bottom, so this saves a comparison per level).
    fn pop_entry(&mut self) -> Option<Entry<T>> {
        let mut last = self.heap.pop()?;
        let len = self.heap.len();
        if len == 0 {
            return Some(last);
        }
        std::mem::swap(&mut last, &mut self.heap[0]);
        // SAFETY: the heap is not empty; children are checked against `len`.
        unsafe {
            let mut hole = Hole::new(&mut self.heap, 0);
            while let Some(best) = hole.smallest_child(len) {
                hole.move_to(best);
            }
            let pos = hole.pos;
            drop(hole);
            self.sift_up(pos);
        }
        Some(last)
    }

    /// The item `pop` would return next, whatever its deadline.
    pub fn head(&self) -> Option<&T> {
        self.heap.first().map(|e| &e.item)
    }

    /// The earliest deadline and its item.
    pub fn peek(&self) -> Option<(f64, &T)> {
        self.heap.first().map(|e| (e.when(), &e.item))
    }

    pub fn pop(&mut self) -> Option<(f64, T)> {
        self.pop_entry().map(|e| (e.when(), e.item))
    }

    /// Pops the head unless its deadline is at or after `end` (asyncio's test: a NaN
    /// deadline at the head is due. NaN sorts after every number here, so it comes due
    /// once the timers before it have.)
    pub fn pop_due(&mut self, end: f64) -> Option<T> {
        let when = self.heap.first()?.when();
        if matches!(
            when.partial_cmp(&end),
            Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
        ) {
            return None;
        }
        self.pop_entry().map(|e| e.item)
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
            let entries = std::mem::take(&mut self.heap);
            let mut kept = Vec::with_capacity(count - self.cancelled.min(count));
            for e in entries {
                if is_cancelled(&e.item) {
                    removed.push(e.item);
                } else {
                    kept.push(e);
                }
            }
            self.heap = kept;
            let n = self.heap.len();
            if n > 1 {
                for i in (0..=(n - 2) / ARITY).rev() {
                    // SAFETY: `i` is a parent index, below `n`.
                    unsafe { self.sift_down(i) };
                }
            }
            self.cancelled = 0;
        } else {
            while let Some(e) = self.heap.first() {
                if !is_cancelled(&e.item) {
                    break;
                }
                self.cancelled = self.cancelled.saturating_sub(1);
                if let Some(e) = self.pop_entry() {
                    removed.push(e.item);
                }
            }
        }
    }

    /// Removes everything (loop close).
    pub fn drain(&mut self) -> Vec<T> {
        self.cancelled = 0;
        std::mem::take(&mut self.heap)
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
    fn keys_sort_as_total_cmp_and_round_trip() {
        let vals = [
            f64::NEG_INFINITY,
            -1e300,
            -1.5,
            -0.0,
            0.0,
            1e-300,
            2.5,
            f64::INFINITY,
            f64::NAN,
            -f64::NAN,
        ];
        for a in vals {
            assert_eq!(when_of(key_of(a)).to_bits(), a.to_bits());
            for b in vals {
                assert_eq!(key_of(a).cmp(&key_of(b)), a.total_cmp(&b), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn random_pushes_pops_and_purges_match_a_sorted_reference() {
        // xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut q = TimerQueue::new();
        let mut model: Vec<(f64, u64)> = Vec::new(); // (when, id), id = push order
        let cancelled: std::rc::Rc<std::cell::RefCell<std::collections::HashSet<u64>>> =
            Default::default();
        let mut id = 0u64;
        for round in 0..2000 {
            for _ in 0..(next() % 40) {
                // Few distinct deadlines, so ties (FIFO among equals) are common.
                let when = match next() % 10 {
                    0 => -1.0,
                    1 => f64::NAN,
                    _ => (next() % 50) as f64 / 4.0,
                };
                id += 1;
                q.push(when, id);
                model.push((when, id));
            }
            for _ in 0..(next() % 5) {
                if let Some(&(_, victim)) = model.get((next() as usize) % model.len().max(1))
                    && cancelled.borrow_mut().insert(victim)
                {
                    q.note_cancelled();
                }
            }
            if round % 7 == 0 {
                let c = cancelled.clone();
                let mut removed = Vec::new();
                q.purge_cancelled(|i| c.borrow().contains(i), &mut removed);
                for r in removed {
                    model.retain(|&(_, i)| i != r);
                }
            }
            model.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            assert_eq!(q.len(), model.len());
            let end = (next() % 50) as f64 / 4.0;
            while let Some(item) = q.pop_due(end) {
                let (when, want) = model.remove(0);
                assert_eq!(item, want);
                assert!(when < end || when.is_nan(), "{when} popped at {end}");
            }
            if let Some((when, &item)) = q.peek() {
                assert_eq!((when.to_bits(), item), (model[0].0.to_bits(), model[0].1));
            }
        }
        let mut rest = Vec::new();
        while let Some((w, i)) = q.pop() {
            rest.push((w.to_bits(), i));
        }
        let want: Vec<_> = model.iter().map(|&(w, i)| (w.to_bits(), i)).collect();
        assert_eq!(rest, want);
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
