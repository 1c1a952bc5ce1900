//! I/O reactor. Mirrors selectors.EpollSelector as BaseSelectorEventLoop drives it, on mio.
//!
//! mio is edge-triggered; asyncio's `add_reader`/`add_writer` are level-triggered. Before
//! each poll the loop re-arms (`Registrar::modify`) every descriptor whose event it
//! dispatched since the last poll and that still has a handle: `EPOLL_CTL_MOD` re-queues
//! the descriptor if it is still ready, and `epoll_wait` checks readiness again before
//! reporting it, so a callback that drained the fd is not called spuriously. The result is
//! the level-triggered behaviour of asyncio's selector, without a system call for
//! one-shot waits (a pending `sock_recv`) that are gone by the next poll.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};

/// Token of the cross-thread waker (`call_soon_threadsafe`).
pub const WAKER_TOKEN: usize = usize::MAX;
/// Token of the signal wake-up socket (`signal.set_wakeup_fd`).
pub const SIGNAL_TOKEN: usize = usize::MAX - 1;

/// Capacity of the event buffer per poll; more ready descriptors are reported next time.
const EVENTS_CAPACITY: usize = 1024;

/// What one poll reported for one token. Errors and hang-ups count as both readable and
/// writable, as `selectors.EpollSelector` maps `EPOLLERR`/`EPOLLHUP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub token: usize,
    pub readable: bool,
    pub writable: bool,
    /// The peer closed its side or the descriptor has an error: a condition that stays,
    /// so an edge-triggered reader that stops short of it must be told again.
    pub sticky: bool,
}

/// The blocking half: owned by the thread running the loop, used with the GIL released.
pub struct Poller {
    poll: Poll,
    events: Events,
}

/// The registering half: usable from any thread (epoll_ctl and eventfd writes are
/// thread-safe system calls).
pub struct Registrar {
    registry: Registry,
    waker: Arc<Waker>,
    /// `sys::fork_generation()` when the epoll instance was made.
    generation: u64,
}

fn interest(readable: bool, writable: bool) -> Option<Interest> {
    match (readable, writable) {
        (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
        (true, false) => Some(Interest::READABLE),
        (false, true) => Some(Interest::WRITABLE),
        (false, false) => None,
    }
}

impl Poller {
    pub fn new() -> io::Result<(Poller, Registrar)> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = Arc::new(Waker::new(poll.registry(), Token(WAKER_TOKEN))?);
        Ok((
            Poller {
                poll,
                events: Events::with_capacity(EVENTS_CAPACITY),
            },
            Registrar {
                registry,
                waker,
                generation: crate::sys::fork_generation(),
            },
        ))
    }

    /// Blocks for at most `timeout` (forever with `None`). `ErrorKind::Interrupted` means
    /// a signal arrived.
    pub fn poll(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.poll.poll(&mut self.events, timeout)
    }

    /// Appends what the last poll reported.
    pub fn collect(&self, out: &mut Vec<Readiness>) {
        for ev in self.events.iter() {
            let err = ev.is_error();
            out.push(Readiness {
                token: ev.token().0,
                readable: ev.is_readable() || ev.is_read_closed() || err,
                writable: ev.is_writable() || ev.is_write_closed() || err,
                sticky: ev.is_read_closed() || ev.is_write_closed() || err,
            });
        }
    }
}

impl Registrar {
    /// Starts watching `fd` (the token is the fd itself).
    pub fn register(&self, fd: RawFd, readable: bool, writable: bool) -> io::Result<()> {
        self.register_token(fd, fd as usize, readable, writable)
    }

    pub fn register_token(
        &self,
        fd: RawFd,
        token: usize,
        readable: bool,
        writable: bool,
    ) -> io::Result<()> {
        match interest(readable, writable) {
            Some(i) => self.registry.register(&mut SourceFd(&fd), Token(token), i),
            None => Ok(()),
        }
    }

    /// Changes what `fd` is watched for; both false stops watching it.
    pub fn modify(&self, fd: RawFd, readable: bool, writable: bool) -> io::Result<()> {
        match interest(readable, writable) {
            Some(i) => self
                .registry
                .reregister(&mut SourceFd(&fd), Token(fd as usize), i),
            None => self.deregister(fd),
        }
    }

    pub fn deregister(&self, fd: RawFd) -> io::Result<()> {
        // DEVIATION(asyncio): a child made by fork() shares the epoll instance with its
        //   parent, and the descriptors it inherited are the parent's too: removing one (a
        //   transport or the loop closed or collected in the child, even at its exit)
        //   would stop the parent's loop hearing from it. asyncio's selector removes them.
        //   A child that uses the loop first gives it an epoll instance of its own
        //   (`LoopCore::rehome_if_forked`); one that only closes things ends up here.
        if self.is_stale() {
            return Ok(());
        }
        self.registry.deregister(&mut SourceFd(&fd))
    }

    /// Whether this registrar was made before a `fork()`: its epoll instance and waker
    /// are then shared with the parent process (see `LoopCore::rehome_if_forked`).
    #[inline]
    pub fn is_stale(&self) -> bool {
        crate::sys::fork_generation() != self.generation
    }

    /// The waker, for threads that deliver work to the loop without the GIL.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Wakes a blocked `Poller::poll` from any thread.
    pub fn wake(&self) -> io::Result<()> {
        self.waker.wake()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn poll_once(p: &mut Poller, ms: u64) -> Vec<Readiness> {
        p.poll(Some(Duration::from_millis(ms))).unwrap();
        let mut v = Vec::new();
        p.collect(&mut v);
        v
    }

    #[test]
    fn rearm_gives_level_triggered_reads() {
        let (mut p, r) = Poller::new().unwrap();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let fd = b.as_raw_fd();
        r.register(fd, true, false).unwrap();
        assert!(poll_once(&mut p, 0).is_empty());
        a.write_all(b"xy").unwrap();
        let ev = poll_once(&mut p, 100);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].readable && ev[0].token == fd as usize);
        // Not drained: edge-triggered would stay silent; re-arming reports it again.
        r.modify(fd, true, false).unwrap();
        assert_eq!(poll_once(&mut p, 100).len(), 1);
        // Drained after re-arming: epoll re-checks and reports nothing.
        r.modify(fd, true, false).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b.read(&mut buf).unwrap(), 2);
        assert!(poll_once(&mut p, 0).is_empty());
        r.deregister(fd).unwrap();
    }

    #[test]
    fn waker_wakes_from_another_thread() {
        let (mut p, r) = Poller::new().unwrap();
        let r = Arc::new(r);
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            r2.wake().unwrap();
        });
        let ev = poll_once(&mut p, 5000);
        t.join().unwrap();
        assert_eq!(ev[0].token, WAKER_TOKEN);
    }

    #[test]
    fn bad_fd_is_an_error_with_errno() {
        let (_p, r) = Poller::new().unwrap();
        let err = r.register(1_000_000, true, false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
