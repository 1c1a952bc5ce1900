//! A map keyed by file descriptor, stored densely.
//!
//! The kernel hands out the lowest free descriptor number, so a process's descriptors
//! are small and packed: a table indexed by the number costs one value per descriptor,
//! where a hash map costs the key, a control byte, and up to twice the entries in empty
//! buckets, and frees its old table (left resident) each time it doubles. With one entry
//! per connection in two of the loop's maps, that was ~150 B of the loop's memory per
//! idle connection.
//!
//! The table is split into pages of `PAGE` slots, allocated the first time one of their
//! descriptors is stored, so a single high descriptor (a `dup2` to 100000, say) costs one
//! page, not a table up to it. Negative keys, which no descriptor has, are kept aside in
//! a list, so the map still behaves as a map for any key.

use std::os::fd::RawFd;

/// Slots per page.
const PAGE: usize = 256;

pub(crate) struct FdMap<V> {
    pages: Vec<Option<Box<[Option<V>]>>>,
    /// Entries under negative keys.
    odd: Vec<(RawFd, V)>,
    len: usize,
}

impl<V> Default for FdMap<V> {
    fn default() -> Self {
        FdMap {
            pages: Vec::new(),
            odd: Vec::new(),
            len: 0,
        }
    }
}

/// Page and slot of a non-negative key.
#[inline]
fn split(fd: RawFd) -> Option<(usize, usize)> {
    let n = usize::try_from(fd).ok()?;
    Some((n / PAGE, n % PAGE))
}

impl<V> FdMap<V> {
    #[inline]
    pub fn get(&self, fd: &RawFd) -> Option<&V> {
        match split(*fd) {
            Some((p, i)) => self.pages.get(p)?.as_ref()?[i].as_ref(),
            None => self.odd.iter().find(|(k, _)| k == fd).map(|(_, v)| v),
        }
    }

    #[inline]
    pub fn get_mut(&mut self, fd: &RawFd) -> Option<&mut V> {
        match split(*fd) {
            Some((p, i)) => self.pages.get_mut(p)?.as_mut()?[i].as_mut(),
            None => self.odd.iter_mut().find(|(k, _)| k == fd).map(|(_, v)| v),
        }
    }

    pub fn contains_key(&self, fd: &RawFd) -> bool {
        self.get(fd).is_some()
    }

    /// The slot for a non-negative key, its page allocated if need be.
    fn slot(&mut self, p: usize, i: usize) -> &mut Option<V> {
        if self.pages.len() <= p {
            self.pages.resize_with(p + 1, || None);
        }
        let page = self.pages[p].get_or_insert_with(|| (0..PAGE).map(|_| None).collect());
        &mut page[i]
    }

    pub fn insert(&mut self, fd: RawFd, value: V) -> Option<V> {
        let old = match split(fd) {
            Some((p, i)) => self.slot(p, i).replace(value),
            None => match self.odd.iter_mut().find(|(k, _)| *k == fd) {
                Some((_, v)) => Some(std::mem::replace(v, value)),
                None => {
                    self.odd.push((fd, value));
                    None
                }
            },
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// The value under `fd`, inserted as `V::default()` if there is none.
    pub fn get_or_default(&mut self, fd: RawFd) -> &mut V
    where
        V: Default,
    {
        if !self.contains_key(&fd) {
            self.insert(fd, V::default());
        }
        self.get_mut(&fd).expect("just inserted")
    }

    pub fn remove(&mut self, fd: &RawFd) -> Option<V> {
        let old = match split(*fd) {
            Some((p, i)) => self.pages.get_mut(p)?.as_mut()?[i].take(),
            None => {
                let at = self.odd.iter().position(|(k, _)| k == fd)?;
                Some(self.odd.swap_remove(at).1)
            }
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (RawFd, &V)> {
        let dense = self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.iter().flat_map(move |slots| {
                slots.iter().enumerate().filter_map(move |(i, v)| {
                    // A page index times PAGE plus a slot fits: it came from a RawFd.
                    let fd = RawFd::try_from(p * PAGE + i).unwrap_or(RawFd::MAX);
                    v.as_ref().map(|v| (fd, v))
                })
            })
        });
        dense.chain(self.odd.iter().map(|(k, v)| (*k, v)))
    }

    pub fn keys(&self) -> impl Iterator<Item = RawFd> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map() {
        let mut m: FdMap<u32> = FdMap::default();
        assert!(m.is_empty());
        assert_eq!(m.insert(3, 30), None);
        assert_eq!(m.insert(3, 31), Some(30));
        assert_eq!(m.insert(100_000, 1), None);
        assert_eq!(m.insert(-1, 7), None);
        assert_eq!(m.insert(-1, 8), Some(7));
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(&3), Some(&31));
        assert_eq!(m.get(&4), None);
        assert_eq!(m.get(&99_999), None);
        assert_eq!(m.get(&1_000_000), None);
        assert_eq!(m.get(&-1), Some(&8));
        assert_eq!(m.get(&-2), None);
        *m.get_mut(&100_000).unwrap() += 1;
        let mut all: Vec<_> = m.iter().map(|(k, v)| (k, *v)).collect();
        all.sort_unstable();
        assert_eq!(all, [(-1, 8), (3, 31), (100_000, 2)]);
        assert_eq!(m.remove(&3), Some(31));
        assert_eq!(m.remove(&3), None);
        assert_eq!(m.remove(&-1), Some(8));
        assert_eq!(m.remove(&5_000_000), None);
        assert_eq!(m.len(), 1);
        *m.get_or_default(7) += 5;
        *m.get_or_default(7) += 5;
        assert_eq!(m.get(&7), Some(&10));
        assert_eq!(m.keys().collect::<Vec<_>>(), [7, 100_000]);
        assert_eq!(m.values().sum::<u32>(), 12);
        // Pages are allocated only for the descriptors used.
        assert_eq!(m.pages.iter().filter(|p| p.is_some()).count(), 2);
    }
}
