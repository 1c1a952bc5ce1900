//! Raw libc calls. The only module that uses `libc` directly (as mio's `sys`).

use std::io;
use std::os::fd::RawFd;

/// Calls a libc function and turns a `-1` result into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the caller passes arguments valid for this libc function; the
        // result is checked for -1 below.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock behind `time.monotonic()`.
#[inline]
pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Seconds as `time.monotonic()` computes them (nanoseconds converted to double, divided by 1e9).
#[inline]
pub fn monotonic() -> f64 {
    monotonic_ns() as f64 / 1e9
}

/// Clock resolution of `CLOCK_MONOTONIC` in seconds (`time.get_clock_info('monotonic').resolution`).
pub fn monotonic_resolution() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match syscall!(clock_getres(libc::CLOCK_MONOTONIC, &mut ts)) {
        Ok(_) => ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9,
        Err(_) => 1e-9,
    }
}

/// Reads and discards everything a non-blocking fd holds, returning the bytes read.
pub fn drain(fd: RawFd, out: &mut Vec<u8>) -> io::Result<()> {
    let mut buf = [0u8; 256];
    loop {
        match syscall!(read(fd, buf.as_mut_ptr().cast(), buf.len())) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&buf[..n as usize]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether `fd` refers to an open file description.
pub fn fd_is_open(fd: RawFd) -> bool {
    syscall!(fcntl(fd, libc::F_GETFD)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_is_monotonic() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a);
        assert!(monotonic_resolution() > 0.0);
    }

    #[test]
    fn drain_reads_everything() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::io::Write;
        use std::os::fd::AsRawFd;
        b.set_nonblocking(true).unwrap();
        (&a).write_all(b"\x02\x0f").unwrap();
        let mut out = Vec::new();
        drain(b.as_raw_fd(), &mut out).unwrap();
        assert_eq!(out, b"\x02\x0f");
        assert!(fd_is_open(b.as_raw_fd()));
        assert!(!fd_is_open(-1));
    }
}
