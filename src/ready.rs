//! Ready queue. Mirrors asyncio.base_events.BaseEventLoop._ready (a FIFO of handles).

use std::collections::VecDeque;

/// FIFO of callbacks ready to run in the next iteration.
///
/// Cross-thread pushes (`call_soon_threadsafe`) happen with the GIL held, exactly as
/// asyncio appends to its deque, so the queue itself needs no lock.
pub struct ReadyQueue<T> {
    queue: VecDeque<T>,
}

impl<T> Default for ReadyQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> ReadyQueue<T> {
    pub fn new() -> Self {
        ReadyQueue {
            queue: VecDeque::with_capacity(256),
        }
    }

    #[inline]
    pub fn push(&mut self, item: T) {
        self.queue.push_back(item);
    }

    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        self.queue.pop_front()
    }

    /// Removes the most recently pushed item (eager task start takes back its first step).
    pub fn pop_last(&mut self) -> Option<T> {
        self.queue.pop_back()
    }

    /// The item `pop` returns next.
    #[inline]
    pub fn front(&self) -> Option<&T> {
        self.queue.front()
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn drain(&mut self) -> Vec<T> {
        self.queue.drain(..).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.queue.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo() {
        let mut q = ReadyQueue::new();
        q.push(1);
        q.push(2);
        q.push(3);
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop_last(), Some(3));
        assert_eq!(q.drain(), vec![2]);
        assert!(q.is_empty());
    }
}
