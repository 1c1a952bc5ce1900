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

static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn count_fork_in_child() {
    // Only an atomic add: the child of a multi-threaded process may do little else here.
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Makes `fork_generation` count forks (once per process, at module import).
pub fn watch_forks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a child handler that only does an atomic add. A failure
        // (ENOMEM) leaves forks uncounted, which only loses the protection they give.
        unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
    });
}

/// How many `fork()`s lie between this process and the one that imported the module. State
/// that recorded another value was made by a parent process: its threads do not exist
/// here, and its epoll instance is shared with the parent.
#[inline]
pub fn fork_generation() -> u64 {
    FORKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock behind `time.monotonic()`.
#[inline]
pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux,
    // so the call cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
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

/// The address of an exported symbol of the running process (`dlsym(RTLD_DEFAULT, name)`),
/// or NULL: for CPython functions that are exported but not in its public headers, so a
/// Python that stops exporting one disables what uses it instead of failing the import.
pub fn process_symbol(name: &std::ffi::CStr) -> *mut std::ffi::c_void {
    // SAFETY: `name` is NUL-terminated; dlsym only reads it and the symbol tables.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
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
    }

    #[test]
    fn recv_batch_takes_what_is_queued_up_to_max() {
        use std::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let big = vec![7u8; 65507];
        let sizes: [&[u8]; 4] = [b"one", b"", &big, b"four"];
        for d in sizes {
            tx.send_to(d, rx.local_addr().unwrap()).unwrap();
        }
        let fd = rx.as_raw_fd();
        let mut batch = RecvBatch::new(3);
        assert_eq!(batch.recv(fd, 2).unwrap(), 2);
        let sender = match tx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => RawAddr::v4(*a.ip(), a.port()),
            _ => unreachable!(),
        };
        for (i, want) in sizes[..2].iter().enumerate() {
            let (data, from) = batch.get(i);
            assert_eq!(data, *want);
            assert!(from == sender);
        }
        assert_eq!(batch.recv(fd, 5).unwrap(), 2);
        assert_eq!(batch.get(0).0, &big[..]);
        assert_eq!(batch.get(1).0, b"four");
        let err = batch.recv(fd, 3).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn sendmmsg_sends_each_datagram_to_its_address_up_to_the_batch() {
        use std::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let raw = |s: &UdpSocket| match s.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => RawAddr::v4(*a.ip(), a.port()),
            _ => unreachable!(),
        };
        let (a1, a2) = (raw(&rx1), raw(&rx2));
        let msgs: [(&[u8], Option<&RawAddr>); 3] =
            [(b"one", Some(&a1)), (b"", Some(&a2)), (b"three", Some(&a1))];
        assert_eq!(sendmmsg(tx.as_raw_fd(), &msgs).unwrap(), 3);
        let mut buf = [0u8; 16];
        assert_eq!(rx1.recv(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"one");
        assert_eq!(rx1.recv(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"three");
        assert_eq!(rx2.recv(&mut buf).unwrap(), 0);
        // More than SEND_BATCH: only the first SEND_BATCH go in one call.
        let many = vec![(&b"x"[..], Some(&a2)); SEND_BATCH + 5];
        assert_eq!(sendmmsg(tx.as_raw_fd(), &many).unwrap(), SEND_BATCH);
        // Connected: no address.
        tx.connect(rx2.local_addr().unwrap()).unwrap();
        assert_eq!(sendmmsg(tx.as_raw_fd(), &[(b"peer", None)]).unwrap(), 1);
        rx2.set_nonblocking(true).unwrap();
        let mut n = 0;
        while let Ok(len) = rx2.recv(&mut buf) {
            n += 1;
            if len == 4 {
                assert_eq!(&buf[..4], b"peer");
            }
        }
        assert_eq!(n, SEND_BATCH + 1);
        // The first datagram's error: the broadcast address without SO_BROADCAST.
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let bcast = RawAddr::v4(std::net::Ipv4Addr::BROADCAST, 9);
        let err = sendmmsg(udp.as_raw_fd(), &[(b"x", Some(&bcast))]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }
}

/// A socket address as `getaddrinfo(3)` returns it, with the host already formatted by
/// `inet_ntop(3)` (as CPython's `makeipaddr` does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SockAddr {
    V4 {
        host: String,
        port: u16,
    },
    V6 {
        host: String,
        port: u16,
        flowinfo: u32,
        scope_id: u32,
    },
    /// AF_UNIX: the path up to its NUL (CPython decodes it with the file system
    /// encoding), or the name of an abstract-namespace socket (returned as bytes).
    UnixPath(Vec<u8>),
    UnixAbstract(Vec<u8>),
    /// Any other family: `(family, sa_data)` as CPython's generic `makesockaddr` case.
    Other {
        family: i32,
        data: Vec<u8>,
    },
}

/// One `struct addrinfo` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    pub family: i32,
    pub socktype: i32,
    pub protocol: i32,
    pub canonname: Option<Vec<u8>>,
    pub addr: SockAddr,
}

/// A failed resolution: a `getaddrinfo`/`getnameinfo` error code (`EAI_*`, with
/// `gai_strerror`'s text), or `EAI_SYSTEM`'s errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GaiError {
    Gai(i32, String),
    Os(i32),
    /// getnameinfo: the numeric host resolved to several addresses.
    Multiple,
    /// getnameinfo: an IPv4 address given with flowinfo/scope_id.
    Ipv4TupleLen,
}

fn gai_error(code: i32) -> GaiError {
    if code == libc::EAI_SYSTEM {
        return GaiError::Os(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        );
    }
    // SAFETY: gai_strerror returns a pointer to a static, NUL-terminated string.
    let msg = unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(code)) };
    GaiError::Gai(code, msg.to_string_lossy().into_owned())
}

unsafe extern "C" {
    // POSIX inet_ntop(3); the libc crate does not bind it.
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut libc::c_char,
        size: libc::socklen_t,
    ) -> *const libc::c_char;
}

fn ntop(family: i32, src: *const libc::c_void) -> String {
    let mut buf = [0 as libc::c_char; 64];
    // SAFETY: `src` points to an in_addr / in6_addr of `family`; `buf` is large enough
    // for INET6_ADDRSTRLEN and inet_ntop NUL-terminates on success.
    unsafe {
        if inet_ntop(family, src, buf.as_mut_ptr(), buf.len() as libc::socklen_t).is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// Converts a `sockaddr` as CPython's `makesockaddr` does for getaddrinfo results.
///
/// # Safety
/// `sa` points to a valid socket address of `len` bytes.
unsafe fn sockaddr_of(sa: *const libc::sockaddr, len: libc::socklen_t) -> SockAddr {
    // SAFETY: guaranteed by the caller; the family field selects the concrete type.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                let a = &*(sa as *const libc::sockaddr_in);
                SockAddr::V4 {
                    host: ntop(libc::AF_INET, (&a.sin_addr as *const libc::in_addr).cast()),
                    port: u16::from_be(a.sin_port),
                }
            }
            libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let a = &*(sa as *const libc::sockaddr_in6);
                SockAddr::V6 {
                    host: ntop(
                        libc::AF_INET6,
                        (&a.sin6_addr as *const libc::in6_addr).cast(),
                    ),
                    port: u16::from_be(a.sin6_port),
                    flowinfo: u32::from_be(a.sin6_flowinfo),
                    scope_id: a.sin6_scope_id,
                }
            }
            libc::AF_UNIX => {
                let a = &*(sa as *const libc::sockaddr_un);
                let off = std::mem::offset_of!(libc::sockaddr_un, sun_path);
                let n = (len as usize)
                    .saturating_sub(off)
                    .min(std::mem::size_of_val(&a.sun_path));
                let path: Vec<u8> = a.sun_path[..n].iter().map(|b| *b as u8).collect();
                if path.first() == Some(&0) {
                    SockAddr::UnixAbstract(path)
                } else {
                    let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
                    SockAddr::UnixPath(path[..end].to_vec())
                }
            }
            family => SockAddr::Other {
                family,
                data: (*sa).sa_data.iter().map(|b| *b as u8).collect(),
            },
        }
    }
}

/// RAII owner of a `getaddrinfo` result list.
struct AddrInfoList(*mut libc::addrinfo);

impl Drop for AddrInfoList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the list came from a successful getaddrinfo and is freed once.
            unsafe { libc::freeaddrinfo(self.0) };
        }
    }
}

fn raw_getaddrinfo(
    host: Option<&std::ffi::CStr>,
    port: Option<&std::ffi::CStr>,
    family: i32,
    socktype: i32,
    protocol: i32,
    flags: i32,
) -> Result<AddrInfoList, GaiError> {
    // SAFETY: an all-zero addrinfo is a valid "no hints" value; the fields are set below.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = family;
    hints.ai_socktype = socktype;
    hints.ai_protocol = protocol;
    hints.ai_flags = flags;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: host/port are NULL or NUL-terminated; `res` receives a list we own.
    let code = unsafe {
        libc::getaddrinfo(
            host.map_or(std::ptr::null(), |h| h.as_ptr()),
            port.map_or(std::ptr::null(), |p| p.as_ptr()),
            &hints,
            &mut res,
        )
    };
    if code != 0 {
        return Err(gai_error(code));
    }
    Ok(AddrInfoList(res))
}

/// `getaddrinfo(3)`, blocking. Mirrors CPython's `socket.getaddrinfo` result list.
pub fn getaddrinfo(
    host: Option<&std::ffi::CStr>,
    port: Option<&std::ffi::CStr>,
    family: i32,
    socktype: i32,
    protocol: i32,
    flags: i32,
) -> Result<Vec<AddrInfo>, GaiError> {
    let list = raw_getaddrinfo(host, port, family, socktype, protocol, flags)?;
    let mut out = Vec::new();
    let mut p = list.0;
    while !p.is_null() {
        // SAFETY: `p` walks the list owned by `list`, valid until it is dropped.
        unsafe {
            let ai = &*p;
            out.push(AddrInfo {
                family: ai.ai_family,
                socktype: ai.ai_socktype,
                protocol: ai.ai_protocol,
                canonname: (!ai.ai_canonname.is_null()).then(|| {
                    std::ffi::CStr::from_ptr(ai.ai_canonname)
                        .to_bytes()
                        .to_vec()
                }),
                addr: sockaddr_of(ai.ai_addr, ai.ai_addrlen),
            });
            p = ai.ai_next;
        }
    }
    Ok(out)
}

/// `getnameinfo(3)` of a numeric host and port, blocking. Mirrors CPython's
/// `socket.getnameinfo` once its arguments are parsed: `ipv4_tuple` says whether the
/// caller's sockaddr tuple had exactly two items.
pub fn getnameinfo(
    host: &std::ffi::CStr,
    port: i32,
    flowinfo: u32,
    scope_id: u32,
    ipv4_tuple: bool,
    flags: i32,
) -> Result<(String, String), GaiError> {
    let port = std::ffi::CString::new(port.to_string()).unwrap_or_default();
    let list = raw_getaddrinfo(
        Some(host),
        Some(&port),
        libc::AF_UNSPEC,
        libc::SOCK_DGRAM,
        0,
        libc::AI_NUMERICHOST,
    )?;
    // SAFETY: a successful getaddrinfo returns at least one entry, owned by `list`.
    let ai = unsafe { &mut *list.0 };
    if !ai.ai_next.is_null() {
        return Err(GaiError::Multiple);
    }
    match ai.ai_family {
        libc::AF_INET if !ipv4_tuple => return Err(GaiError::Ipv4TupleLen),
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 entry's address is a sockaddr_in6.
            let sa6 = unsafe { &mut *(ai.ai_addr as *mut libc::sockaddr_in6) };
            sa6.sin6_flowinfo = flowinfo.to_be();
            sa6.sin6_scope_id = scope_id;
        }
        _ => {}
    }
    let mut hbuf = [0 as libc::c_char; 1025];
    let mut pbuf = [0 as libc::c_char; 32];
    // SAFETY: the address comes from the list above; the buffers' sizes are passed.
    let code = unsafe {
        libc::getnameinfo(
            ai.ai_addr,
            ai.ai_addrlen,
            hbuf.as_mut_ptr(),
            hbuf.len() as libc::socklen_t,
            pbuf.as_mut_ptr(),
            pbuf.len() as libc::socklen_t,
            flags,
        )
    };
    if code != 0 {
        return Err(gai_error(code));
    }
    // SAFETY: getnameinfo NUL-terminates both buffers on success.
    let (h, p) = unsafe {
        (
            std::ffi::CStr::from_ptr(hbuf.as_ptr()),
            std::ffi::CStr::from_ptr(pbuf.as_ptr()),
        )
    };
    Ok((
        h.to_string_lossy().into_owned(),
        p.to_string_lossy().into_owned(),
    ))
}

/// Whether `host` is a numeric IPv4/IPv6 address (no name service needed).
pub fn is_numeric_host(host: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(host) else {
        return false;
    };
    // `%scope` suffixes need if_nametoindex: leave those to the resolver threads.
    s.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod resolver_tests {
    use super::*;

    #[test]
    fn numeric_getaddrinfo() {
        let host = std::ffi::CString::new("::1").unwrap();
        let port = std::ffi::CString::new("80").unwrap();
        let res = getaddrinfo(Some(&host), Some(&port), 0, libc::SOCK_STREAM, 0, 0).unwrap();
        assert_eq!(res[0].family, libc::AF_INET6);
        assert_eq!(
            res[0].addr,
            SockAddr::V6 {
                host: "::1".into(),
                port: 80,
                flowinfo: 0,
                scope_id: 0
            }
        );
        assert!(is_numeric_host(b"127.0.0.1") && !is_numeric_host(b"localhost"));
    }

    #[test]
    fn unresolvable_name_is_a_gai_error() {
        let host = std::ffi::CString::new("name.invalid").unwrap();
        let err = getaddrinfo(Some(&host), None, 0, 0, 0, libc::AI_NUMERICHOST).unwrap_err();
        assert!(matches!(err, GaiError::Gai(code, _) if code == libc::EAI_NONAME));
    }

    #[test]
    fn numeric_getnameinfo() {
        let host = std::ffi::CString::new("127.0.0.1").unwrap();
        let flags = libc::NI_NUMERICHOST | libc::NI_NUMERICSERV;
        let (h, p) = getnameinfo(&host, 8080, 0, 0, true, flags).unwrap();
        assert_eq!((h.as_str(), p.as_str()), ("127.0.0.1", "8080"));
        assert_eq!(
            getnameinfo(&host, 1, 0, 0, false, flags).unwrap_err(),
            GaiError::Ipv4TupleLen
        );
    }
}

/// `recv(2)` that never blocks (`MSG_DONTWAIT`: the GIL is held; a socket left in
/// blocking mode waits on the reactor instead of stalling the interpreter).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    syscall!(recv(
        fd,
        buf.as_mut_ptr().cast(),
        buf.len(),
        libc::MSG_DONTWAIT
    ))
    .map(|n| n as usize)
}

/// `send(2)` that never blocks (see `recv`). CPython ignores SIGPIPE, so no
/// `MSG_NOSIGNAL`, as Python's `socket.send`.
///
/// # Safety
/// `ptr` points to `len` readable bytes.
pub unsafe fn send(fd: RawFd, ptr: *const u8, len: usize) -> io::Result<usize> {
    syscall!(send(fd, ptr.cast(), len, libc::MSG_DONTWAIT)).map(|n| n as usize)
}

/// `getsockopt(fd, SOL_SOCKET, SO_ERROR)`: the pending error of a socket.
pub fn socket_error(fd: RawFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    syscall!(getsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_ERROR,
        (&mut err as *mut libc::c_int).cast(),
        &mut len
    ))?;
    Ok(err)
}

/// `read(2)` into `len` bytes at `ptr`, or `recv(2)` if `sock` (a socket: the kernel's
/// socket calls skip the file layer's checks, ~75 ns less per call on loopback TCP).
///
/// # Safety
/// `ptr` points to `len` writable bytes.
pub unsafe fn read(fd: RawFd, ptr: *mut u8, len: usize, sock: bool) -> io::Result<usize> {
    if sock {
        syscall!(recv(fd, ptr.cast(), len, 0)).map(|n| n as usize)
    } else {
        syscall!(read(fd, ptr.cast(), len)).map(|n| n as usize)
    }
}

/// `readv(2)` (`recvmsg(2)` if `sock`) into `alen` bytes at `a`, then `blen` bytes at `b`.
///
/// # Safety
/// `a` and `b` point to `alen` and `blen` writable bytes.
pub unsafe fn read2(
    fd: RawFd,
    a: *mut u8,
    alen: usize,
    b: *mut u8,
    blen: usize,
    sock: bool,
) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: a.cast(),
            iov_len: alen,
        },
        libc::iovec {
            iov_base: b.cast(),
            iov_len: blen,
        },
    ];
    if sock {
        // SAFETY: a zeroed msghdr (no address, no control data) is valid; it points to
        // `iov`, which outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        syscall!(recvmsg(fd, &mut msg, 0)).map(|n| n as usize)
    } else {
        syscall!(readv(fd, iov.as_ptr(), 2)).map(|n| n as usize)
    }
}

/// `write(2)` of `len` bytes at `ptr`, or `send(2)` if `sock` (see `read`). CPython
/// ignores SIGPIPE, so a closed peer is an `EPIPE` error, as with `os.write` and
/// `socket.send`.
///
/// # Safety
/// `ptr` points to `len` readable bytes.
pub unsafe fn write(fd: RawFd, ptr: *const u8, len: usize, sock: bool) -> io::Result<usize> {
    if sock {
        syscall!(send(fd, ptr.cast(), len, 0)).map(|n| n as usize)
    } else {
        syscall!(write(fd, ptr.cast(), len)).map(|n| n as usize)
    }
}

/// Most buffers one `writev` call takes (Linux's `IOV_MAX` is 1024).
pub const WRITEV_MAX: usize = 64;

/// `writev(2)` (`sendmsg(2)` if `sock`) of up to `WRITEV_MAX` buffers given as
/// (pointer, length).
///
/// # Safety
/// Every pointer points to its length of readable bytes.
pub unsafe fn writev(fd: RawFd, bufs: &[(*const u8, usize)], sock: bool) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; WRITEV_MAX];
    let n = bufs.len().min(WRITEV_MAX);
    for (v, &(p, len)) in iov.iter_mut().zip(bufs) {
        v.iov_base = p as *mut libc::c_void;
        v.iov_len = len;
    }
    if sock {
        // SAFETY: as in `read2`.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n as _;
        syscall!(sendmsg(fd, &msg, 0)).map(|n| n as usize)
    } else {
        syscall!(writev(fd, iov.as_ptr(), n as libc::c_int)).map(|n| n as usize)
    }
}

/// `shutdown(fd, SHUT_WR)`.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    syscall!(shutdown(fd, libc::SHUT_WR)).map(drop)
}

/// What kind of file `fd` is, from `fstat(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Fifo,
    Socket,
    CharDevice,
    Other,
}

pub fn file_kind(fd: RawFd) -> io::Result<FileKind> {
    // SAFETY: a zeroed stat is a valid out-parameter that fstat fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(fstat(fd, &mut st))?;
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDevice,
        _ => FileKind::Other,
    })
}

/// Puts `fd` in non-blocking mode (`os.set_blocking(fd, False)`).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let flags = syscall!(fcntl(fd, libc::F_GETFL))?;
    if flags & libc::O_NONBLOCK == 0 {
        syscall!(fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// `AF_UNIX`, for choosing a transport class.
pub const AF_UNIX: i32 = libc::AF_UNIX;
/// `EIO`: what reading a pty whose other side closed reports.
pub const EIO: i32 = libc::EIO;

/// `recvfrom(2)` into `buf` without blocking; the sender's address converted as CPython's
/// `makesockaddr` does for AF_INET / AF_INET6 (`SockAddr::Other` for anything else).
pub fn recvfrom(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, RawAddr)> {
    let mut addr = RawAddr::empty();
    addr.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let n = syscall!(recvfrom(
        fd,
        buf.as_mut_ptr().cast(),
        buf.len(),
        libc::MSG_DONTWAIT,
        (&mut addr.ss as *mut libc::sockaddr_storage).cast(),
        &mut addr.len
    ))?;
    Ok((n as usize, addr))
}

/// Bytes per datagram in a `RecvBatch`: the largest UDP payload over IPv4 or IPv6
/// (65,507 / 65,527 bytes) fits, so nothing is truncated on an AF_INET/AF_INET6 socket.
pub const DGRAM_SLOT: usize = 64 * 1024;

/// Room for up to `len()` datagrams and their senders, received with one `recvmmsg(2)`.
///
/// The memory is one zeroed allocation the kernel writes into; a page of it becomes
/// resident only when a datagram lands there.
pub struct RecvBatch {
    data: Vec<u8>,
    addrs: Vec<RawAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs` / `hdrs` point into the batch's own heap buffers,
// which move with it; nothing else shares them.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(slots: usize) -> Box<Self> {
        let mut b = Box::new(RecvBatch {
            data: vec![0u8; slots * DGRAM_SLOT],
            addrs: vec![RawAddr::empty(); slots],
            iovs: Vec::with_capacity(slots),
            // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths).
            hdrs: (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect(),
        });
        let base = b.data.as_mut_ptr();
        for i in 0..slots {
            b.iovs.push(libc::iovec {
                // SAFETY: slot `i` starts inside `data` (slots * DGRAM_SLOT bytes).
                iov_base: unsafe { base.add(i * DGRAM_SLOT) }.cast(),
                iov_len: DGRAM_SLOT,
            });
        }
        let addrs = b.addrs.as_mut_ptr();
        let iovs = b.iovs.as_mut_ptr();
        for (i, h) in b.hdrs.iter_mut().enumerate() {
            // SAFETY: `i` < slots, the length of `addrs` and `iovs`.
            unsafe {
                h.msg_hdr.msg_name = std::ptr::addr_of_mut!((*addrs.add(i)).ss).cast();
                h.msg_hdr.msg_iov = iovs.add(i);
            }
            h.msg_hdr.msg_iovlen = 1;
        }
        b
    }

    /// `recvmmsg(2)` of up to `max` datagrams without blocking: how many arrived (at
    /// least one), or the error (`WouldBlock` when none was queued).
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let n = max.min(self.hdrs.len());
        for h in &mut self.hdrs[..n] {
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        let got = syscall!(recvmmsg(
            fd,
            self.hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut()
        ))?;
        Ok(got as usize)
    }

    /// Datagram `i` of the last `recv` (which returned more than `i`) and its sender.
    pub fn get(&self, i: usize) -> (&[u8], RawAddr) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(DGRAM_SLOT);
        let mut addr = self.addrs[i];
        addr.len = h.msg_hdr.msg_namelen;
        (&self.data[i * DGRAM_SLOT..i * DGRAM_SLOT + len], addr)
    }
}

/// A socket address in the kernel's binary form, as `recvfrom(2)` fills it and
/// `sendto(2)` takes it.
#[derive(Clone, Copy)]
pub struct RawAddr {
    ss: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    fn empty() -> Self {
        RawAddr {
            // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
            ss: unsafe { std::mem::zeroed() },
            len: 0,
        }
    }

    /// The meaningful bytes (`len` of them).
    pub fn bytes(&self) -> &[u8] {
        let len = (self.len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: `ss` is plain data of at least `len` bytes.
        unsafe {
            std::slice::from_raw_parts((&self.ss as *const libc::sockaddr_storage).cast(), len)
        }
    }

    pub fn v4(ip: std::net::Ipv4Addr, port: u16) -> Self {
        let mut a = Self::empty();
        // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
        let sin =
            unsafe { &mut *(&mut a.ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
        sin.sin_addr.s_addr = u32::from(ip).to_be();
        a.len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        a
    }

    pub fn v6(ip: std::net::Ipv6Addr, port: u16, flowinfo: u32, scope_id: u32) -> Self {
        let mut a = Self::empty();
        // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
        let sin6 = unsafe {
            &mut *(&mut a.ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
        };
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = port.to_be();
        sin6.sin6_flowinfo = flowinfo.to_be();
        sin6.sin6_addr.s6_addr = ip.octets();
        sin6.sin6_scope_id = scope_id;
        a.len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        a
    }

    /// The address as CPython's `makesockaddr` converts it.
    pub fn to_sockaddr(&self) -> SockAddr {
        // SAFETY: the storage holds `len` bytes of a socket address (zeroed past them).
        unsafe { sockaddr_of((&self.ss as *const libc::sockaddr_storage).cast(), self.len) }
    }
}

impl PartialEq for RawAddr {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

/// `sendto(2)` of `data` to `addr`, never blocking (no `MSG_NOSIGNAL`, as `send`).
pub fn sendto(fd: RawFd, data: &[u8], addr: &RawAddr) -> io::Result<usize> {
    let n = syscall!(sendto(
        fd,
        data.as_ptr().cast(),
        data.len(),
        libc::MSG_DONTWAIT,
        (&addr.ss as *const libc::sockaddr_storage).cast(),
        addr.len
    ))?;
    Ok(n as usize)
}

/// Most datagrams one `sendmmsg` call takes.
pub const SEND_BATCH: usize = 32;

/// `sendmmsg(2)` of the first `SEND_BATCH` (at most) of `msgs`, each datagram to its
/// address (`None`: the connected peer), never blocking: how many were sent (at least
/// one), or the first datagram's error.
pub fn sendmmsg(fd: RawFd, msgs: &[(&[u8], Option<&RawAddr>)]) -> io::Result<usize> {
    let n = msgs.len().min(SEND_BATCH);
    // SAFETY: an all-zero iovec is a valid value (null pointer, zero length).
    let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths).
    let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let iov_base = iovs.as_mut_ptr();
    for (i, (data, addr)) in msgs[..n].iter().enumerate() {
        // SAFETY: `i` < n <= SEND_BATCH, inside `iovs`.
        let iov = unsafe { &mut *iov_base.add(i) };
        iov.iov_base = data.as_ptr().cast_mut().cast();
        iov.iov_len = data.len();
        let h = &mut hdrs[i].msg_hdr;
        h.msg_iov = iov;
        h.msg_iovlen = 1;
        if let Some(a) = addr {
            // The kernel only reads the name (sendmmsg takes it as non-const).
            h.msg_name = (&a.ss as *const libc::sockaddr_storage).cast_mut().cast();
            h.msg_namelen = a.len;
        }
    }
    // The iovecs and names point into `msgs` and `iovs`, alive for the call.
    let got = syscall!(sendmmsg(
        fd,
        hdrs.as_mut_ptr(),
        n as libc::c_uint,
        libc::MSG_DONTWAIT
    ))?;
    Ok(got as usize)
}

/// `accept4(2)` on a listening socket: the new connection, non-blocking and
/// close-on-exec, and the peer's address.
pub fn accept(fd: RawFd) -> io::Result<(std::os::fd::OwnedFd, RawAddr)> {
    use std::os::fd::FromRawFd;
    let mut addr = RawAddr::empty();
    addr.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let conn = syscall!(accept4(
        fd,
        (&mut addr.ss as *mut libc::sockaddr_storage).cast(),
        &mut addr.len,
        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC
    ))?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok((unsafe { std::os::fd::OwnedFd::from_raw_fd(conn) }, addr))
}

/// `getsockname(2)`.
pub fn getsockname(fd: RawFd) -> io::Result<RawAddr> {
    let mut addr = RawAddr::empty();
    addr.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    syscall!(getsockname(
        fd,
        (&mut addr.ss as *mut libc::sockaddr_storage).cast(),
        &mut addr.len
    ))?;
    Ok(addr)
}

/// `setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, 1)`.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    syscall!(setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t
    ))
    .map(drop)
}

/// A connection's two socket addresses (the peer's, and the local one if known) in one
/// allocation of as few bytes as they need, for transports that convert them only when
/// asked: `[peer length][peer sockaddr][local sockaddr, if any]`.
pub struct PackedAddrs(Box<[u8]>);

impl PackedAddrs {
    pub fn new(peer: &RawAddr, local: Option<&RawAddr>) -> Self {
        let p = peer.bytes();
        let l = local.map_or(&[][..], |l| l.bytes());
        let mut v = Vec::with_capacity(1 + p.len() + l.len());
        v.push(p.len() as u8); // a sockaddr_storage is 128 bytes
        v.extend_from_slice(p);
        v.extend_from_slice(l);
        PackedAddrs(v.into_boxed_slice())
    }

    fn unpack(bytes: &[u8]) -> SockAddr {
        let mut a = RawAddr::empty();
        let n = bytes
            .len()
            .min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: `n` bytes fit in the zeroed storage.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut a.ss as *mut libc::sockaddr_storage).cast::<u8>(),
                n,
            );
        }
        a.len = n as libc::socklen_t;
        a.to_sockaddr()
    }

    /// The peer's address, as CPython's `makesockaddr` converts it.
    pub fn peer(&self) -> SockAddr {
        let n = self.0[0] as usize;
        Self::unpack(&self.0[1..1 + n])
    }

    /// The local address, if `getsockname` succeeded.
    pub fn local(&self) -> Option<SockAddr> {
        let rest = &self.0[1 + self.0[0] as usize..];
        (!rest.is_empty()).then(|| Self::unpack(rest))
    }
}

/// `AF_INET` / `AF_INET6`: the families whose addresses `recvfrom` converts.
pub fn is_inet(family: i32) -> bool {
    family == libc::AF_INET || family == libc::AF_INET6
}
