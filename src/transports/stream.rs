//! Stream transports. Mirrors asyncio.selector_events._SelectorSocketTransport (TCP and
//! Unix sockets) and unix_events._UnixReadPipeTransport / _UnixWritePipeTransport.
//!
//! One core type serves the three kinds; the Python-visible classes are the wrapper types
//! of `py::transport_type` (`TCPTransport`, `UnixTransport`, `ReadPipeTransport`,
//! `WritePipeTransport`). Reads and writes are `read(2)` / `write(2)` / `writev(2)` on the
//! descriptor, which serve sockets, pipes and ttys alike, driven by edge-triggered
//! registrations: the loop re-arms a descriptor only when a read filled the whole buffer.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PySystemExit, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use super::flow::{FlowControl, call_protocol_hook};
use crate::errors;
use crate::event_loop::LoopCore;
use crate::py::{self, ByteView, GilCell, WritableView, import_attr};

/// asyncio's `max_size`: the most one read asks for.
pub const MAX_SIZE: usize = 256 * 1024;

/// asyncio's `constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES`.
pub const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;

/// The read buffer shared by every stream transport of the process (the data is copied
/// into a `bytes` object before any Python code runs, as uvloop does with libuv's buffer).
static READ_BUF: GilCell<Vec<u8>> = GilCell::new(Vec::new());

/// Borrows the shared read buffer (`MAX_SIZE` bytes). A re-entrant user (there is none
/// today: no Python code runs while it is out) would get a fresh one.
/// Reads of at least this size make a transport read straight into `bytes` objects.
const DIRECT_READ_MIN: usize = 16 * 1024;
/// The largest `bytes` allocated ahead of a read: below glibc's default mmap threshold
/// (128 KiB), so it comes from the heap rather than a fresh mapping.
const DIRECT_READ_MAX: usize = 120 * 1024;

unsafe extern "C" {
    /// CPython's in-place resize of a `bytes` only its caller references (public since
    /// 2.x, deprecated only by 3.15's PyBytesWriter; pyo3-ffi keeps it crate-private).
    fn _PyBytes_Resize(bytes: *mut *mut pyo3::ffi::PyObject, size: pyo3::ffi::Py_ssize_t) -> i32;
}

/// The last large read's `bytes` when its protocol kept no reference to it: the next
/// large read (on any transport of any loop; the GIL guards it) goes into it, whose
/// memory is still in cache, instead of a new allocation. One object in the process at
/// most, so idle transports hold nothing.
static SPARE: GilCell<Option<Py<PyBytes>>> = GilCell::new(None);

/// The last small read's `bytes` when its protocol kept no reference to it, with the size
/// of its allocation (its length may be less): the next small read whose data fits is
/// copied into it instead of a new object. A `bytes` of 1 KiB is above glibc's
/// per-thread cache (1,032 bytes), so each new one cost a trip through `malloc` and
/// `free` (~560 instructions of the ~2,800 per request of a 1 KiB Protocol echo).
static SPARE_SMALL: GilCell<Option<(Py<PyBytes>, usize)>> = GilCell::new(None);

/// Data read, as `bytes`, and the size of its allocation (see `recycle_read`).
type ReadBytes<'py> = (Bound<'py, PyBytes>, usize);

/// Offers data a protocol was given back for reuse by the next read (kept only when
/// referenced by nobody else). `cap`: the size of its allocation.
fn recycle_read(py: Python<'_>, data: Bound<'_, PyBytes>, cap: usize) {
    // SAFETY: reading the size and reference count of a live object, GIL held.
    let (refs, size) = unsafe {
        (
            pyo3::ffi::Py_REFCNT(data.as_ptr()),
            pyo3::ffi::Py_SIZE(data.as_ptr()) as usize,
        )
    };
    if refs != 1 || !data.is_exact_instance_of::<PyBytes>() {
        return;
    }
    let old = if size >= DIRECT_READ_MIN {
        SPARE.with(py, |s| s.replace(data.unbind()))
    } else {
        SPARE_SMALL
            .with(py, |s| s.replace((data.unbind(), cap.max(size))))
            .map(|(o, _)| o)
    };
    drop(old);
}

/// `data[..n]` as `bytes`: in the small spare if it is free and fits without wasting more
/// than half of it, else in a new object. Returns the object and its allocation size.
fn small_bytes<'py>(py: Python<'py>, data: &[u8]) -> PyResult<ReadBytes<'py>> {
    let n = data.len();
    if let Some((obj, cap)) = SPARE_SMALL.with(py, |s| s.take()) {
        // SAFETY: the spare is an exact `bytes` of `cap` allocated bytes (plus the
        // terminating NUL) that only we reference (checked when it was kept, and nothing
        // could take a reference since; checked again here). Its length is set to `n` and
        // its NUL and hash are renewed before anyone sees it. GIL held.
        unsafe {
            let p = obj.as_ptr();
            if pyo3::ffi::Py_REFCNT(p) == 1 && n <= cap && cap <= 2 * n {
                let dst = pyo3::ffi::PyBytes_AsString(p).cast::<u8>();
                std::ptr::copy_nonoverlapping(data.as_ptr(), dst, n);
                *dst.add(n) = 0;
                (*p.cast::<pyo3::ffi::PyVarObject>()).ob_size = n as pyo3::ffi::Py_ssize_t;
                #[allow(deprecated)]
                {
                    (*p.cast::<pyo3::ffi::PyBytesObject>()).ob_shash = -1;
                }
                return Ok((obj.into_bound(py), cap));
            }
        }
        // Too small or too large for this read: kept for a later one.
        let other = SPARE_SMALL.with(py, |s| s.replace((obj, cap)));
        drop(other);
    }
    Ok((PyBytes::new(py, data), n))
}

pub fn take_read_buf(py: Python<'_>) -> Vec<u8> {
    let buf = READ_BUF.with(py, std::mem::take);
    if buf.len() < MAX_SIZE {
        vec![0u8; MAX_SIZE]
    } else {
        buf
    }
}

/// Returns the buffer `take_read_buf` lent.
pub fn give_read_buf(py: Python<'_>, buf: Vec<u8>) {
    READ_BUF.with(py, |b| {
        if b.is_empty() {
            *b = buf;
        }
    });
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Socket,
    ReadPipe,
    WritePipe,
}

/// Queued outgoing data: `bytes` objects are kept by reference (immutable), anything else
/// is copied when queued, as asyncio requires of `write`.
enum Data {
    Shared(Py<PyBytes>),
    Owned(Vec<u8>),
}

struct Chunk {
    data: Data,
    /// Bytes of `data` already sent.
    off: usize,
}

impl Chunk {
    fn bytes<'a>(&'a self, py: Python<'a>) -> &'a [u8] {
        let all = match &self.data {
            Data::Shared(b) => b.as_bytes(py),
            Data::Owned(v) => v.as_slice(),
        };
        &all[self.off..]
    }
}

#[derive(Default)]
struct WriteBuf {
    chunks: VecDeque<Chunk>,
    size: usize,
}

impl WriteBuf {
    fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Queues the part of `data` from `off` on.
    fn push(&mut self, data: &Bound<'_, PyAny>, view: &ByteView, off: usize) {
        let len = view.len() - off;
        let chunk = match data.cast::<PyBytes>() {
            Ok(b) if data.is_exact_instance_of::<PyBytes>() => Chunk {
                data: Data::Shared(b.clone().unbind()),
                off,
            },
            _ => {
                // SAFETY: the view covers `view.len()` readable bytes and `off <= len`.
                let s = unsafe { std::slice::from_raw_parts(view.as_ptr().add(off), len) };
                Chunk {
                    data: Data::Owned(s.to_vec()),
                    off: 0,
                }
            }
        };
        self.size += len;
        self.chunks.push_back(chunk);
    }

    /// Drops `n` sent bytes; the chunks released are returned (dropped by the caller
    /// outside any `GilCell` borrow).
    fn consume(&mut self, mut n: usize, done: &mut Vec<Chunk>) {
        self.size -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let left = front.len_left();
            if n >= left {
                n -= left;
                done.extend(self.chunks.pop_front());
            } else {
                front.off += n;
                n = 0;
            }
        }
    }

    fn clear(&mut self) -> VecDeque<Chunk> {
        self.size = 0;
        std::mem::take(&mut self.chunks)
    }
}

impl Chunk {
    fn len_left(&self) -> usize {
        let total = match &self.data {
            // SAFETY: reading a bytes object's size needs no GIL-protected state beyond
            // the object being alive, which the chunk guarantees.
            Data::Shared(b) => unsafe { pyo3::ffi::PyBytes_Size(b.as_ptr()) as usize },
            Data::Owned(v) => v.len(),
        };
        total - self.off
    }
}

/// Everything a stream transport mutates; see `GilCell` for the access rules.
struct St {
    kind: Kind,
    fd: RawFd,
    /// The descriptor `repr()` shows: `fd`'s first value, kept once the transport is
    /// closed (asyncio's `_sock_fd` / `_fileno`).
    repr_fd: RawFd,
    /// Edge-triggered registrations: everything except a read pipe that is a character
    /// device (a tty's read() returns one line at a time however much is buffered, so it
    /// stays level-triggered, as asyncio's).
    edge: bool,
    /// asyncio clears `_loop` when the connection is lost.
    loop_: Option<Py<LoopCore>>,
    /// The Python-visible transport; released when the connection is lost.
    wrapper: Option<Py<PyAny>>,
    /// The socket or pipe object; closed and released when the connection is lost.
    sock: Option<Py<PyAny>>,
    /// The descriptor itself, for a connection accepted natively: no socket object
    /// exists until `get_extra_info("socket")` asks for one (which then takes it over).
    own: Option<OwnedFd>,
    /// An accepted connection's addresses, converted when `get_extra_info` asks.
    addrs: Option<crate::sys::PackedAddrs>,
    protocol: Option<Py<PyAny>>,
    /// The protocol is an `asyncio.BufferedProtocol`.
    buffered: bool,
    /// A decaying maximum of recent read sizes: from DIRECT_READ_MIN on, reads go
    /// straight into a `bytes` of about that size (see `read_bytes`).
    read_hint: u32,
    protocol_connected: bool,
    server: Option<Py<PyAny>>,
    buf: WriteBuf,
    conn_lost: u32,
    closing: bool,
    paused: bool,
    eof: bool,
    empty_waiter: Option<Py<PyAny>>,
    flow: FlowControl,
}

#[pyclass(frozen, name = "_StreamCore", module = "ferroloop._ferroloop")]
pub struct StreamCore {
    st: GilCell<St>,
}

fn is_fatal_passthrough(e: &PyErr, py: Python<'_>) -> bool {
    e.is_instance_of::<PyKeyboardInterrupt>(py) || e.is_instance_of::<PySystemExit>(py)
}

impl StreamCore {
    /// Undoes a transport that failed to be built (`make`): it leaves the loop's
    /// transports and its server's clients, releases its file (a natively accepted
    /// descriptor is closed; a socket or pipe object is left to the caller) and breaks
    /// its cycle with the wrapper, so nothing keeps claiming the descriptor.
    fn abandon(&self, py: Python<'_>, fd: RawFd, wrapper: *mut pyo3::ffi::PyObject) {
        let (lp, server, own, sock, w, protocol) = self.with(py, |s| {
            s.closing = true;
            s.conn_lost = s.conn_lost.max(1);
            s.fd = -1;
            (
                s.loop_.take(),
                s.server.take(),
                s.own.take(),
                s.sock.take(),
                s.wrapper.take(),
                s.protocol.take(),
            )
        });
        if let Some(lp) = &lp {
            super::forget_transport(lp.bind(py), fd, wrapper);
            // Best effort, as below: a reader the build had started goes too.
            if fd >= 0 {
                let _ = LoopCore::forget_fd(lp.bind(py), fd);
            }
        }
        if let (Some(server), Some(w)) = (&server, &w) {
            // Best effort: the build's own error is what the caller reports.
            let _ = server.call_method1(py, pyo3::intern!(py, "_detach"), (w,));
        }
        drop((lp, server, own, sock, w, protocol));
    }

    /// The loop and descriptor its `_transports` entry (if any) is under: None once the
    /// connection is lost or the core cleared.
    pub(crate) fn registration(&self, py: Python<'_>) -> Option<(Py<LoopCore>, RawFd)> {
        self.with(py, |s| {
            let lp = s.loop_.as_ref().filter(|_| s.fd >= 0)?;
            Some((lp.clone_ref(py), s.fd))
        })
    }

    /// The transport (`wrapper`) is garbage: the loop forgets it, its `_transports` entry
    /// and the descriptor it lent to `sock_sendfile`, if any.
    fn forget_in_loop(&self, py: Python<'_>, wrapper: *mut pyo3::ffi::PyObject) {
        let lent = self.with(py, |s| s.empty_waiter.is_some());
        if let Some((lp, fd)) = self.registration(py) {
            super::forget_transport(lp.bind(py), fd, wrapper);
            if lent {
                lp.get().state.with(py, |s| s.lent_fds.remove(&fd));
            }
        }
    }

    /// The server this transport was accepted by (None once its connection is lost).
    pub(crate) fn server_of(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.with(py, |s| s.server.as_ref().map(|v| v.clone_ref(py)))
    }

    /// The transport's socket object, made (non-blocking, owning the descriptor from then
    /// on) the first time it is needed for a natively accepted connection. None once the
    /// connection is closed.
    fn socket_object<'py>(slf: &Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = slf.py();
        let core = slf.get();
        let (sock, own) = core.with(py, |s| {
            (s.sock.as_ref().map(|s| s.clone_ref(py)), s.own.take())
        });
        if let Some(sock) = sock {
            return Ok(Some(sock.into_bound(py)));
        }
        let Some(own) = own else { return Ok(None) };
        let fd = own.into_raw_fd();
        let kw = PyDict::new(py);
        kw.set_item("fileno", fd)?;
        match import_attr!(py, "socket", "socket").and_then(|cls| cls.call((), Some(&kw))) {
            Ok(sock) => {
                let made = sock.call_method1("setblocking", (false,));
                core.with(py, |s| s.sock = Some(sock.clone().unbind()));
                made?;
                Ok(Some(sock))
            }
            Err(e) => {
                use std::os::fd::FromRawFd;
                // SAFETY: the socket object was not made, so the descriptor is still ours.
                let own = unsafe { OwnedFd::from_raw_fd(fd) };
                core.with(py, |s| s.own = Some(own));
                Err(e)
            }
        }
    }
}

impl St {
    /// The transport still has its socket or pipe (not yet closed).
    fn has_file(&self) -> bool {
        self.sock.is_some() || self.own.is_some()
    }
}

impl StreamCore {
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut St) -> R) -> R {
        self.st.with(py, f)
    }

    fn loop_<'py>(&self, py: Python<'py>) -> Option<Bound<'py, LoopCore>> {
        self.with(py, |s| s.loop_.as_ref().map(|l| l.clone_ref(py)))
            .map(|l| l.into_bound(py))
    }

    fn wrapper<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.with(py, |s| s.wrapper.as_ref().map(|w| w.clone_ref(py)))
            .map_or_else(|| py.None().into_bound(py), |w| w.into_bound(py))
    }

    fn protocol<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.with(py, |s| s.protocol.as_ref().map(|p| p.clone_ref(py)))
            .map_or_else(|| py.None().into_bound(py), |p| p.into_bound(py))
    }

    fn fd(&self, py: Python<'_>) -> RawFd {
        self.with(py, |s| s.fd)
    }

    /// Registers `method` of this core as the reader or writer callback of its fd. The
    /// reader, `_read_ready`, is the core itself (it is callable): no bound method object
    /// per connection.
    fn add_io(slf: &Bound<'_, Self>, method: &str, read: bool) -> PyResult<()> {
        let py = slf.py();
        let Some(lp) = slf.get().loop_(py) else {
            return Ok(());
        };
        let cb = if method == "_read_ready" {
            slf.clone().into_any()
        } else {
            slf.getattr(method)?
        };
        let (fd, edge, kind) = slf.get().with(py, |s| (s.fd, s.edge, s.kind));
        if fd < 0 {
            return Ok(());
        }
        if read && edge && kind == Kind::Socket {
            return LoopCore::add_stream_reader(&lp, fd, &cb).map(drop);
        }
        LoopCore::add_io_fd(&lp, fd, &cb, PyTuple::empty(py), read, edge).map(drop)
    }

    fn remove_io(&self, py: Python<'_>, read: bool) -> PyResult<()> {
        let fd = self.fd(py);
        if let Some(lp) = self.loop_(py)
            && fd >= 0
        {
            LoopCore::remove_io_fd(&lp, fd, read)?;
        }
        Ok(())
    }

    fn call_soon(&self, py: Python<'_>, args: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        if let Some(lp) = self.loop_(py) {
            lp.call_method1(pyo3::intern!(py, "call_soon"), PyTuple::new(py, args)?)?;
        }
        Ok(())
    }

    fn debug(&self, py: Python<'_>) -> bool {
        self.loop_(py).is_some_and(|l| l.get().debug(py))
    }

    /// Marks the transport closing (it stays in the loop's `_transports`, as asyncio's,
    /// which no longer claims a closing transport's descriptor).
    fn set_closing(&self, py: Python<'_>) {
        self.with(py, |s| s.closing = true);
    }

    /// `transport._fatal_error(exc, message)`.
    fn fatal_error(slf: &Bound<'_, Self>, exc: PyErr, message: &str) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let kind = core.with(py, |s| s.kind);
        let quiet = if kind == Kind::ReadPipe {
            exc.value(py)
                .getattr(pyo3::intern!(py, "errno"))
                .ok()
                .and_then(|e| e.extract::<i32>().ok())
                == Some(crate::sys::EIO)
        } else {
            exc.is_instance_of::<pyo3::exceptions::PyOSError>(py)
        };
        let wrapper = core.wrapper(py);
        if quiet {
            if core.debug(py) {
                let logger = py::asyncio_logger(py)?;
                let kw = PyDict::new(py);
                kw.set_item("exc_info", exc.value(py))?;
                logger.call_method("debug", ("%r: %s", &wrapper, message), Some(&kw))?;
            }
        } else if let Some(lp) = core.loop_(py) {
            let ctx = PyDict::new(py);
            ctx.set_item("message", message)?;
            ctx.set_item("exception", exc.value(py))?;
            ctx.set_item("transport", &wrapper)?;
            ctx.set_item("protocol", core.protocol(py))?;
            py::call_exception_handler_for(lp.as_any(), &ctx, exc.value(py))?;
        }
        match kind {
            Kind::Socket => Self::force_close(slf, Some(exc.into_value(py).into_any())),
            Kind::ReadPipe | Kind::WritePipe => {
                Self::close_pipe(slf, Some(exc.into_value(py).into_any()))
            }
        }
    }

    /// Socket `_force_close(exc)`.
    fn force_close(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (lost, had_buf, closing) =
            core.with(py, |s| (s.conn_lost, !s.buf.is_empty(), s.closing));
        if lost > 0 {
            return Ok(());
        }
        if had_buf {
            let old = core.with(py, |s| s.buf.clear());
            drop(old);
            core.remove_io(py, false)?;
        }
        if !closing {
            core.set_closing(py);
            core.remove_io(py, true)?;
        }
        core.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
        let exc = exc.unwrap_or_else(|| py.None());
        Self::schedule_connection_lost(slf, exc.into_bound(py))
    }

    /// Schedules `_call_connection_lost(exc)` (named after the transport's class).
    fn schedule_connection_lost(slf: &Bound<'_, Self>, exc: Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let callback =
            super::connection_lost_callback(slf.as_any(), &slf.get().wrapper(py), "_StreamCore")?;
        slf.get().call_soon(py, vec![callback, exc])
    }

    /// Pipe `_close(exc)`.
    fn close_pipe(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        core.set_closing(py);
        if core.with(py, |s| s.kind) == Kind::WritePipe {
            let had_buf = core.with(py, |s| !s.buf.is_empty());
            if had_buf {
                core.remove_io(py, false)?;
            }
            let old = core.with(py, |s| s.buf.clear());
            drop(old);
        }
        core.remove_io(py, true)?;
        let exc = exc.unwrap_or_else(|| py.None());
        Self::schedule_connection_lost(slf, exc.into_bound(py))
    }

    fn maybe_pause_protocol(&self, py: Python<'_>) -> PyResult<()> {
        let pause = self.with(py, |s| s.flow.should_pause(s.buf.size));
        if pause {
            call_protocol_hook(
                py,
                self.loop_(py),
                &self.protocol(py),
                &self.wrapper(py),
                "pause_writing",
            )?;
        }
        Ok(())
    }

    fn maybe_resume_protocol(&self, py: Python<'_>) -> PyResult<()> {
        let resume = self.with(py, |s| s.flow.should_resume(s.buf.size));
        if resume {
            call_protocol_hook(
                py,
                self.loop_(py),
                &self.protocol(py),
                &self.wrapper(py),
                "resume_writing",
            )?;
        }
        Ok(())
    }

    /// Writes as much of the queue as the descriptor takes. `Ok(true)`: the queue is empty.
    fn flush(&self, py: Python<'_>) -> io::Result<bool> {
        let (fd, sock) = self.with(py, |s| (s.fd, s.kind == Kind::Socket));
        if fd < 0 {
            return Ok(true);
        }
        let mut done: Vec<Chunk> = Vec::new();
        let res = loop {
            let mut bufs: Vec<(*const u8, usize)> = Vec::new();
            let total = self.with(py, |s| {
                let mut total = 0;
                for c in s.buf.chunks.iter().take(crate::sys::WRITEV_MAX) {
                    let b = c.bytes(py);
                    bufs.push((b.as_ptr(), b.len()));
                    total += b.len();
                }
                total
            });
            if total == 0 {
                break Ok(true);
            }
            // SAFETY: every (pointer, length) points into a chunk the queue keeps alive;
            // no Python code runs until the call returns.
            let r = unsafe {
                if bufs.len() == 1 {
                    crate::sys::write(fd, bufs[0].0, bufs[0].1, sock)
                } else {
                    crate::sys::writev(fd, &bufs, sock)
                }
            };
            match r {
                Ok(n) => {
                    let empty = self.with(py, |s| {
                        s.buf.consume(n, &mut done);
                        s.buf.is_empty()
                    });
                    if empty {
                        break Ok(true);
                    }
                    if n < total {
                        // The kernel buffer is full: the next writable edge resumes.
                        break Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) => break Err(e),
            }
        };
        drop(done);
        res
    }

    /// The loop ran `_read_ready` and read `n` of the `asked` bytes: if the descriptor
    /// may hold more, the reader runs again at the next iteration.
    fn again_if_full(&self, py: Python<'_>, n: usize, asked: usize) {
        if n == asked
            && let Some(lp) = self.loop_(py)
        {
            lp.get().redispatch(py, self.fd(py));
        }
    }

    /// Reads up to MAX_SIZE bytes and returns them as `bytes` (or the error).
    ///
    /// Small reads go to the shared buffer and are copied into a new `bytes`. Once a
    /// transport's reads are large (DIRECT_READ_MIN), each read goes straight into a
    /// `bytes` of the expected size, with the shared buffer behind it for any excess, and
    /// the object is shrunk to what came: no copy of the data, which was half of the
    /// user time of a 100 KiB echo.
    fn read_bytes<'py>(&self, py: Python<'py>) -> PyResult<Option<ReadBytes<'py>>> {
        let (fd, hint, sock) =
            self.with(py, |s| (s.fd, s.read_hint as usize, s.kind == Kind::Socket));
        let mut buf = take_read_buf(py);
        let res = if hint >= DIRECT_READ_MIN {
            self.read_direct(py, fd, sock, hint.min(DIRECT_READ_MAX), &mut buf)
        } else {
            loop {
                // SAFETY: `buf` has MAX_SIZE initialised bytes.
                match unsafe { crate::sys::read(fd, buf.as_mut_ptr(), MAX_SIZE, sock) } {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                    Err(e) => break Err(errors::from_io(py, e)),
                    Ok(n) => break small_bytes(py, &buf[..n]).map(|got| Some((n, got))),
                }
            }
        };
        give_read_buf(py, buf);
        let (n, data) = match res {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.with(py, |s| {
            let decayed = s.read_hint - s.read_hint / 4;
            s.read_hint = decayed.max(n.min(MAX_SIZE) as u32);
        });
        self.again_if_full(py, n, MAX_SIZE);
        Ok(Some(data))
    }

    /// One `readv` into the spare `bytes` (or a new one of `expect` bytes) followed by
    /// the shared buffer.
    fn read_direct<'py>(
        &self,
        py: Python<'py>,
        fd: RawFd,
        sock: bool,
        expect: usize,
        buf: &mut [u8],
    ) -> PyResult<Option<(usize, ReadBytes<'py>)>> {
        // SAFETY: PyBytes_FromStringAndSize(NULL, n) makes an uninitialised bytes object
        // that only we reference. Its first `expect` bytes and `buf`'s first
        // `MAX_SIZE - expect` are writable. Before the object is shared it is resized to
        // the `n` bytes read and any part of them that went to `buf` is appended, so no
        // uninitialised byte is visible. GIL held.
        unsafe {
            // The spare if it is at least as large: only we reference it (checked when it
            // was kept, and nothing could take a reference since).
            let (mut obj, expect) = match SPARE.with(py, |s| s.take()) {
                Some(b)
                    if pyo3::ffi::Py_REFCNT(b.as_ptr()) == 1
                        && (expect..=MAX_SIZE)
                            .contains(&(pyo3::ffi::Py_SIZE(b.as_ptr()) as usize)) =>
                {
                    let size = pyo3::ffi::Py_SIZE(b.as_ptr()) as usize;
                    (b.into_ptr(), size)
                }
                other => {
                    drop(other);
                    let obj = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), expect as _);
                    if obj.is_null() {
                        return Err(PyErr::fetch(py)); // MemoryError
                    }
                    (obj, expect)
                }
            };
            let dst = pyo3::ffi::PyBytes_AsString(obj).cast::<u8>();
            let res = loop {
                match crate::sys::read2(fd, dst, expect, buf.as_mut_ptr(), MAX_SIZE - expect, sock)
                {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let n = match res {
                Ok(n) => n,
                Err(e) => {
                    pyo3::ffi::Py_DECREF(obj);
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(None),
                        _ => Err(errors::from_io(py, e)),
                    };
                }
            };
            if n != expect {
                // Shrink, or grow (often in place) and append what went to the buffer.
                if _PyBytes_Resize(&mut obj, n as _) < 0 {
                    // `obj` was freed and set to NULL; the error is MemoryError.
                    return Err(PyErr::fetch(py));
                }
                if n > expect {
                    let at = pyo3::ffi::PyBytes_AsString(obj).cast::<u8>().add(expect);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), at, n - expect);
                }
            } else {
                // A reused spare's cached hash is stale (a resize resets it).
                #[allow(deprecated)]
                {
                    (*obj.cast::<pyo3::ffi::PyBytesObject>()).ob_shash = -1;
                }
            }
            Ok(Some((
                n,
                (Bound::from_owned_ptr(py, obj).cast_into_unchecked(), n),
            )))
        }
    }

    fn read_ready_data(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let kind = core.with(py, |s| s.kind);
        let data = match core.read_bytes(py) {
            Ok(None) => return Ok(()),
            Err(e) => {
                let msg = if kind == Kind::Socket {
                    "Fatal read error on socket transport"
                } else {
                    "Fatal read error on pipe transport"
                };
                return Self::fatal_error(slf, e, msg);
            }
            Ok(Some(d)) => d,
        };
        let (data, cap) = data;
        if data.as_bytes().is_empty() {
            return Self::on_eof(slf);
        }
        let proto = core.protocol(py);
        let res = match py::stream_reader::data_received(&proto, &data) {
            Some(res) => res,
            None => proto
                .call_method1(pyo3::intern!(py, "data_received"), (&data,))
                .map(drop),
        };
        recycle_read(py, data, cap);
        if let Err(e) = res {
            if kind != Kind::Socket || is_fatal_passthrough(&e, py) {
                return Err(e);
            }
            return Self::fatal_error(slf, e, "Fatal error: protocol.data_received() call failed.");
        }
        Ok(())
    }

    fn read_ready_buffered(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let proto = core.protocol(py);
        let got = proto
            .call_method1(pyo3::intern!(py, "get_buffer"), (-1,))
            .and_then(|buf| {
                if buf.len()? == 0 {
                    return Err(PyRuntimeError::new_err(
                        "get_buffer() returned an empty buffer",
                    ));
                }
                Ok(buf)
            });
        let buf = match got {
            Ok(v) => v,
            Err(e) if is_fatal_passthrough(&e, py) => return Err(e),
            Err(e) => {
                return Self::fatal_error(
                    slf,
                    e,
                    "Fatal error: protocol.get_buffer() call failed.",
                );
            }
        };
        let mut view = match WritableView::new(&buf) {
            Ok(v) => v,
            Err(_) => {
                // What asyncio's `sock.recv_into(buf)` raises for it: a read error.
                let e = PyTypeError::new_err(format!(
                    "recv_into() argument 1 must be read-write bytes-like object, not {}",
                    buf.get_type().name()?
                ));
                return Self::fatal_error(slf, e, "Fatal read error on socket transport");
            }
        };
        let (fd, sock) = core.with(py, |s| (s.fd, s.kind == Kind::Socket));
        let asked = view.len();
        let res = loop {
            // SAFETY: the view is a writable buffer of `asked` bytes, held until dropped.
            match unsafe { crate::sys::read(fd, view.as_mut_ptr(), asked, sock) } {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        drop(view);
        drop(buf);
        let n = match res {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => {
                return Self::fatal_error(
                    slf,
                    errors::from_io(py, e),
                    "Fatal read error on socket transport",
                );
            }
            Ok(n) => n,
        };
        if n == 0 {
            return Self::on_eof(slf);
        }
        core.again_if_full(py, n, asked);
        if let Err(e) = proto.call_method1(pyo3::intern!(py, "buffer_updated"), (n,)) {
            if is_fatal_passthrough(&e, py) {
                return Err(e);
            }
            return Self::fatal_error(
                slf,
                e,
                "Fatal error: protocol.buffer_updated() call failed.",
            );
        }
        Ok(())
    }

    fn on_eof(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let kind = core.with(py, |s| s.kind);
        let wrapper = core.wrapper(py);
        if kind != Kind::Socket {
            // _UnixReadPipeTransport: EOF closes the transport.
            if core.debug(py) {
                py::asyncio_logger(py)?
                    .call_method1("info", ("%r was closed by peer", &wrapper))?;
            }
            core.set_closing(py);
            core.remove_io(py, true)?;
            let proto = core.protocol(py);
            core.call_soon(py, vec![proto.getattr("eof_received")?])?;
            return Self::schedule_connection_lost(slf, py.None().into_bound(py));
        }
        if core.debug(py) {
            py::asyncio_logger(py)?.call_method1("debug", ("%r received EOF", &wrapper))?;
        }
        let keep_open = match core
            .protocol(py)
            .call_method0(pyo3::intern!(py, "eof_received"))
            .and_then(|r| r.is_truthy())
        {
            Ok(k) => k,
            Err(e) if is_fatal_passthrough(&e, py) => return Err(e),
            Err(e) => {
                return Self::fatal_error(
                    slf,
                    e,
                    "Fatal error: protocol.eof_received() call failed.",
                );
            }
        };
        if keep_open {
            core.remove_io(py, true)
        } else {
            Self::close(slf)
        }
    }

    fn check_data(data: &Bound<'_, PyAny>) -> PyResult<()> {
        let ok = data.is_instance_of::<PyBytes>()
            || data.is_instance_of::<pyo3::types::PyByteArray>()
            || data.is_instance_of::<pyo3::types::PyMemoryView>();
        if !ok {
            return Err(PyTypeError::new_err(format!(
                "data argument must be a bytes-like object, not {}",
                data.get_type().name()?.repr()?
            )));
        }
        Ok(())
    }

    /// A write that found the transport dead: counted, and logged past the threshold.
    /// A write with the connection not lost but no descriptor: the transport was made on
    /// a socket closed meanwhile, or its `__del__` closed it and the warning's record
    /// brought it back. asyncio's write then fails with EBADF on the closed socket: a
    /// fatal error, so the protocol gets `connection_lost(OSError(EBADF))`.
    fn no_descriptor(slf: &Bound<'_, Self>) -> PyResult<()> {
        let kind = slf.get().with(slf.py(), |s| s.kind);
        let msg = if kind == Kind::Socket {
            "Fatal write error on socket transport"
        } else {
            "Fatal write error on pipe transport"
        };
        let e = io::Error::from_raw_os_error(libc::EBADF);
        Self::fatal_error(slf, errors::from_io(slf.py(), e), msg)
    }

    fn write_after_loss(&self, py: Python<'_>) -> PyResult<()> {
        let (n, kind) = self.with(py, |s| (s.conn_lost, s.kind));
        if n >= LOG_THRESHOLD_FOR_CONNLOST_WRITES {
            let msg = if kind == Kind::Socket {
                "socket.send() raised exception."
            } else {
                "pipe closed by peer or os.write(pipe, data) raised exception."
            };
            py::asyncio_logger(py)?.call_method1("warning", (msg,))?;
        }
        self.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
        Ok(())
    }
}

#[pymethods]
impl StreamCore {
    fn _start_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let reading = slf.get().with(py, |s| !s.paused && !s.closing);
        if reading {
            Self::add_io(slf, "_read_ready", true)?;
        }
        Ok(())
    }

    /// A write pipe watches its descriptor for readability: the peer closed.
    fn _start_watching(slf: &Bound<'_, Self>) -> PyResult<()> {
        if slf.get().with(slf.py(), |s| s.closing) {
            return Ok(());
        }
        Self::add_io(slf, "_read_ready", true)
    }

    /// The reader callback: `_read_ready()`.
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::_read_ready(slf)
    }

    /// What a handle's repr shows for the reader callback (the core itself), as
    /// asyncio's shows its bound method: `TCPTransport._read_ready`.
    #[getter]
    fn __qualname__(&self, py: Python<'_>) -> PyResult<String> {
        super::method_qualname(&self.wrapper(py), "_StreamCore", "_read_ready")
    }

    fn _read_ready(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (lost, kind, buffered, fd) = core.with(py, |s| (s.conn_lost, s.kind, s.buffered, s.fd));
        if fd < 0 {
            return Ok(());
        }
        if kind == Kind::WritePipe {
            // Readable write pipe: the reader went away.
            if core.debug(py) {
                py::asyncio_logger(py)?
                    .call_method1("info", ("%r was closed by peer", core.wrapper(py)))?;
            }
            let had_buf = core.with(py, |s| !s.buf.is_empty());
            let exc = if had_buf {
                Some(
                    pyo3::exceptions::PyBrokenPipeError::new_err(())
                        .into_value(py)
                        .into_any(),
                )
            } else {
                None
            };
            return Self::close_pipe(slf, exc);
        }
        if lost > 0 {
            return Ok(());
        }
        if buffered && kind == Kind::Socket {
            Self::read_ready_buffered(slf)
        } else {
            Self::read_ready_data(slf)
        }
    }

    fn _write_ready(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (lost, kind, fd) = core.with(py, |s| (s.conn_lost, s.kind, s.fd));
        if (lost > 0 && kind == Kind::Socket) || fd < 0 {
            return Ok(());
        }
        match core.flush(py) {
            // As asyncio's socket transport: the protocol may resume as soon as the
            // buffer is below the low-water mark (pipes resume once it is empty).
            Ok(false) if kind == Kind::Socket => core.maybe_resume_protocol(py),
            Ok(false) => Ok(()),
            Err(e) => {
                let old = core.with(py, |s| {
                    if kind == Kind::WritePipe {
                        s.conn_lost = s.conn_lost.saturating_add(1);
                    }
                    s.buf.clear()
                });
                drop(old);
                core.remove_io(py, false)?;
                let exc = errors::from_io(py, e);
                let waiter_exc = exc.clone_ref(py);
                let msg = if kind == Kind::Socket {
                    "Fatal write error on socket transport"
                } else {
                    "Fatal write error on pipe transport"
                };
                Self::fatal_error(slf, exc, msg)?;
                let waiter = core.with(py, |s| s.empty_waiter.as_ref().map(|w| w.clone_ref(py)));
                if let Some(w) = waiter {
                    w.call_method1(py, "set_exception", (waiter_exc.into_value(py),))?;
                }
                Ok(())
            }
            Ok(true) => {
                if kind == Kind::WritePipe {
                    core.remove_io(py, false)?;
                    core.maybe_resume_protocol(py)?;
                    if core.with(py, |s| s.closing) {
                        core.remove_io(py, true)?;
                        Self::_call_connection_lost(slf, py.None().into_bound(py))?;
                    }
                    return Ok(());
                }
                core.maybe_resume_protocol(py)?;
                if !core.with(py, |s| s.buf.is_empty()) {
                    return Ok(()); // resume_writing() wrote more
                }
                core.remove_io(py, false)?;
                let waiter = core.with(py, |s| s.empty_waiter.as_ref().map(|w| w.clone_ref(py)));
                if let Some(w) = waiter {
                    w.call_method1(py, "set_result", (py.None(),))?;
                }
                let (closing, eof) = core.with(py, |s| (s.closing, s.eof));
                if closing {
                    Self::_call_connection_lost(slf, py.None().into_bound(py))?;
                } else if eof {
                    crate::sys::shutdown_write(core.fd(py)).map_err(|e| errors::from_io(py, e))?;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn write(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        Self::check_data(data)?;
        let (kind, eof, sendfile, lost, closing) = core.with(py, |s| {
            (
                s.kind,
                s.eof,
                s.empty_waiter.is_some(),
                s.conn_lost,
                s.closing,
            )
        });
        if kind == Kind::Socket {
            if eof {
                return Err(PyRuntimeError::new_err(
                    "Cannot call write() after write_eof()",
                ));
            }
            if sendfile {
                return Err(PyRuntimeError::new_err(
                    "unable to write; sendfile is in progress",
                ));
            }
        }
        let view = ByteView::new(data)?;
        if view.is_empty() {
            return Ok(());
        }
        if lost > 0 || (kind == Kind::WritePipe && closing) {
            return core.write_after_loss(py);
        }
        if core.fd(py) < 0 {
            return Self::no_descriptor(slf);
        }
        let mut off = 0;
        if core.with(py, |s| s.buf.is_empty()) {
            let fd = core.fd(py);
            let res = loop {
                // SAFETY: the view covers `view.len()` readable bytes until dropped.
                match unsafe {
                    crate::sys::write(fd, view.as_ptr(), view.len(), kind == Kind::Socket)
                } {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            match res {
                Ok(n) if n == view.len() => return Ok(()),
                Ok(n) => off = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    let msg = if kind == Kind::Socket {
                        "Fatal write error on socket transport"
                    } else {
                        core.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
                        "Fatal write error on pipe transport"
                    };
                    return Self::fatal_error(slf, errors::from_io(py, e), msg);
                }
            }
            Self::add_io(slf, "_write_ready", false)?;
        }
        core.with(py, |s| s.buf.push(data, &view, off));
        core.maybe_pause_protocol(py)
    }

    fn writelines(slf: &Bound<'_, Self>, list_of_data: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let items: Vec<Bound<'_, PyAny>> = list_of_data.try_iter()?.collect::<PyResult<_>>()?;
        let (kind, eof, sendfile) = core.with(py, |s| (s.kind, s.eof, s.empty_waiter.is_some()));
        if kind == Kind::Socket {
            // Before 3.12 asyncio's writelines() is write(b''.join(...)): its messages.
            let joined = py::version(py) < (3, 12);
            if eof {
                return Err(PyRuntimeError::new_err(if joined {
                    "Cannot call write() after write_eof()"
                } else {
                    "Cannot call writelines() after write_eof()"
                }));
            }
            if sendfile {
                return Err(PyRuntimeError::new_err(if joined {
                    "unable to write; sendfile is in progress"
                } else {
                    "unable to writelines; sendfile is in progress"
                }));
            }
        }
        // NOTE: one vectored write for the lot when the queue is empty, instead of
        //       asyncio's b''.join() copy (3.11) or memoryview list (3.12).
        if items.is_empty() {
            return Ok(());
        }
        // Any object with the buffer protocol, as asyncio's `b''.join(list_of_data)` (3.11,
        // pipes) or `memoryview(data)` per item (3.12+ sockets) takes, with their errors.
        for (i, d) in items.iter().enumerate() {
            // SAFETY: GIL held; a type check only.
            if unsafe { pyo3::ffi::PyObject_CheckBuffer(d.as_ptr()) } == 0 {
                let name = d.get_type().name()?;
                return Err(PyTypeError::new_err(
                    if kind == Kind::Socket && py::version(py) >= (3, 12) {
                        format!("memoryview: a bytes-like object is required, not '{name}'")
                    } else {
                        format!("sequence item {i}: expected a bytes-like object, {name} found")
                    },
                ));
            }
        }
        let lost = core.with(py, |s| s.conn_lost);
        if lost > 0 || (kind == Kind::WritePipe && core.with(py, |s| s.closing)) {
            return core.write_after_loss(py);
        }
        if core.fd(py) < 0 {
            return Self::no_descriptor(slf);
        }
        let was_empty = core.with(py, |s| s.buf.is_empty());
        // Every item's buffer first: a bad one rejects the whole call, as asyncio's join.
        let views = items
            .iter()
            .map(ByteView::new)
            .collect::<PyResult<Vec<_>>>()?;
        for (d, view) in items.iter().zip(&views) {
            if !view.is_empty() {
                core.with(py, |s| s.buf.push(d, view, 0));
            }
        }
        drop(views);
        if !was_empty {
            return core.maybe_pause_protocol(py);
        }
        match core.flush(py) {
            Ok(true) => Ok(()),
            Ok(false) => {
                Self::add_io(slf, "_write_ready", false)?;
                core.maybe_pause_protocol(py)
            }
            Err(e) => {
                let old = core.with(py, |s| s.buf.clear());
                drop(old);
                let msg = if kind == Kind::Socket {
                    "Fatal write error on socket transport"
                } else {
                    core.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
                    "Fatal write error on pipe transport"
                };
                Self::fatal_error(slf, errors::from_io(py, e), msg)
            }
        }
    }

    fn write_eof(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (kind, closing, eof, empty) =
            core.with(py, |s| (s.kind, s.closing, s.eof, s.buf.is_empty()));
        if kind == Kind::WritePipe {
            if closing {
                return Ok(());
            }
            core.set_closing(py);
            if empty {
                core.remove_io(py, true)?;
                Self::schedule_connection_lost(slf, py.None().into_bound(py))?;
            }
            return Ok(());
        }
        if closing || eof {
            return Ok(());
        }
        core.with(py, |s| s.eof = true);
        if empty {
            crate::sys::shutdown_write(core.fd(py)).map_err(|e| errors::from_io(py, e))?;
        }
        Ok(())
    }

    fn can_write_eof(&self) -> bool {
        true
    }

    fn get_write_buffer_size(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.buf.size)
    }

    fn get_write_buffer_limits(&self, py: Python<'_>) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
        self.with(py, |s| s.flow.get(py))
    }

    #[pyo3(signature = (high=None, low=None))]
    fn set_write_buffer_limits(
        &self,
        py: Python<'_>,
        high: Option<&Bound<'_, PyAny>>,
        low: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let limits = super::flow::limits(high, low, py)?;
        let old = self.with(py, |s| {
            let paused = s.flow.paused;
            std::mem::replace(&mut s.flow, super::flow::FlowControl { paused, ..limits })
        });
        drop(old);
        self.maybe_pause_protocol(py)
    }

    fn is_reading(&self, py: Python<'_>) -> bool {
        self.with(py, |s| !s.paused && !s.closing)
    }

    fn pause_reading(&self, py: Python<'_>) -> PyResult<()> {
        if !self.is_reading(py) {
            return Ok(());
        }
        self.with(py, |s| s.paused = true);
        self.remove_io(py, true)?;
        if self.debug(py) {
            py::asyncio_logger(py)?
                .call_method1("debug", ("%r pauses reading", self.wrapper(py)))?;
        }
        Ok(())
    }

    fn resume_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (closing, paused) = core.with(py, |s| (s.closing, s.paused));
        if closing || !paused {
            return Ok(());
        }
        core.with(py, |s| s.paused = false);
        Self::add_io(slf, "_read_ready", true)?;
        if core.debug(py) {
            py::asyncio_logger(py)?
                .call_method1("debug", ("%r resumes reading", core.wrapper(py)))?;
        }
        Ok(())
    }

    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (kind, closing, has_sock) = core.with(py, |s| (s.kind, s.closing, s.has_file()));
        match kind {
            Kind::ReadPipe => {
                if !closing {
                    Self::close_pipe(slf, None)?;
                }
                Ok(())
            }
            Kind::WritePipe => {
                if has_sock && !closing {
                    Self::write_eof(slf)?;
                }
                Ok(())
            }
            Kind::Socket => {
                if closing {
                    return Ok(());
                }
                core.set_closing(py);
                core.remove_io(py, true)?;
                if core.with(py, |s| s.buf.is_empty()) {
                    core.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
                    core.remove_io(py, false)?;
                    Self::schedule_connection_lost(slf, py.None().into_bound(py))?;
                }
                Ok(())
            }
        }
    }

    fn abort(slf: &Bound<'_, Self>) -> PyResult<()> {
        match slf.get().with(slf.py(), |s| s.kind) {
            Kind::Socket => Self::force_close(slf, None),
            _ => Self::close_pipe(slf, None),
        }
    }

    #[pyo3(signature = (exc=None))]
    fn _force_close(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let exc = exc.filter(|e| !e.is_none(slf.py()));
        match slf.get().with(slf.py(), |s| s.kind) {
            Kind::Socket => Self::force_close(slf, exc),
            _ => Self::close_pipe(slf, exc),
        }
    }

    #[pyo3(signature = (exc, message="Fatal error on transport"))]
    fn _fatal_error(slf: &Bound<'_, Self>, exc: &Bound<'_, PyAny>, message: &str) -> PyResult<()> {
        Self::fatal_error(slf, PyErr::from_value(exc.clone()), message)
    }

    pub(crate) fn is_closing(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.closing)
    }

    fn get_protocol(&self, py: Python<'_>) -> Py<PyAny> {
        self.protocol(py).unbind()
    }

    fn set_protocol(&self, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = protocol.py();
        let buffered_cls = import_attr!(py, "asyncio.protocols", "BufferedProtocol")?;
        let buffered = protocol.is_instance(buffered_cls)?;
        let old = self.with(py, |s| {
            s.buffered = buffered;
            s.protocol_connected = true;
            s.protocol.replace(protocol.clone().unbind())
        });
        drop(old);
        Ok(())
    }

    fn _make_empty_waiter(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if self.with(py, |s| s.empty_waiter.is_some()) {
            return Err(PyRuntimeError::new_err("Empty waiter is already set"));
        }
        let Some(lp) = self.loop_(py) else {
            return Err(PyRuntimeError::new_err("the transport is closed"));
        };
        let fut = LoopCore::create_future(&lp)?;
        let (old, fd) = self.with(py, |s| (s.empty_waiter.replace(fut.clone().unbind()), s.fd));
        drop(old);
        // As asyncio's selector loop during sendfile: the transport's descriptor is
        // lent to sock_sendfile (add_writer) until `_reset_empty_waiter`.
        if fd >= 0 {
            lp.get().state.with(py, |s| s.lent_fds.insert(fd));
        }
        if self.with(py, |s| s.buf.is_empty()) {
            fut.call_method1("set_result", (py.None(),))?;
        }
        Ok(fut.unbind())
    }

    fn _reset_empty_waiter(&self, py: Python<'_>) -> PyResult<()> {
        let (old, fd) = self.with(py, |s| (s.empty_waiter.take(), s.fd));
        drop(old);
        if let Some(lp) = self.loop_(py) {
            lp.get().state.with(py, |s| s.lent_fds.remove(&fd));
        }
        Ok(())
    }

    fn _call_connection_lost(slf: &Bound<'_, Self>, exc: Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (kind, connected) = core.with(py, |s| (s.kind, s.protocol_connected));
        let proto = core.protocol(py);
        let res = if (kind != Kind::Socket || connected) && !proto.is_none() {
            proto
                .call_method1(pyo3::intern!(py, "connection_lost"), (&exc,))
                .map(drop)
        } else {
            Ok(())
        };
        let (sock, protocol, lp, server, wrapper, fd) = core.with(py, |s| {
            // From here on the descriptor is not ours: nothing may read or write it (its
            // number can be reused as soon as the socket closes), and later writes are
            // dropped as writes to a lost connection. (A pipe drops them for being
            // closing; as asyncio's, it does not count the loss itself as a lost write,
            // which would bring the "pipe closed by peer" warnings one write earlier.)
            if s.kind == Kind::Socket {
                s.conn_lost = s.conn_lost.max(1);
            }
            s.closing = true;
            let fd = std::mem::replace(&mut s.fd, -1);
            let old = s.buf.clear();
            (
                (s.sock.take(), s.own.take()),
                s.protocol.take(),
                s.loop_.take(),
                s.server.take(),
                s.wrapper.take(),
                (fd, old),
            )
        });
        let (fd, old_buf) = fd;
        drop(old_buf);
        if let Some(lp) = &lp
            && fd >= 0
        {
            if let Some(w) = &wrapper {
                super::forget_transport(lp.bind(py), fd, w.as_ptr());
            }
            LoopCore::forget_fd(lp.bind(py), fd)?;
        }
        let (sock, own) = sock;
        drop(own); // closes a natively accepted descriptor
        let closed = match &sock {
            Some(sock) => sock.call_method0(py, pyo3::intern!(py, "close")).map(drop),
            None => Ok(()),
        };
        drop((sock, protocol, lp));
        let detached = match (&server, &wrapper) {
            (Some(server), Some(w)) => server
                .call_method1(py, pyo3::intern!(py, "_detach"), (w,))
                .map(drop),
            _ => Ok(()),
        };
        drop(server);
        res?;
        closed?;
        detached?;
        if kind == Kind::Socket {
            let waiter = core.with(py, |s| s.empty_waiter.as_ref().map(|w| w.clone_ref(py)));
            if let Some(w) = waiter {
                let e =
                    pyo3::exceptions::PyConnectionError::new_err("Connection is closed by peer");
                w.call_method1(py, "set_exception", (e.into_value(py),))?;
            }
        }
        drop(wrapper);
        Ok(())
    }

    /// An `extra` entry of a natively accepted connection, made when first asked for:
    /// `(value,)`, or None for a name this transport has no lazy entry for.
    ///
    /// DEVIATION(asyncio): `socket` of a connection closed before anyone asked for its
    ///   socket is None (asyncio's transport keeps the closed socket object; this one
    ///   never made it). `sockname` and `peername` are recorded at accept time, as asyncio
    ///   records them.
    fn _lazy_extra<'py>(
        slf: &Bound<'py, Self>,
        name: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let py = slf.py();
        let core = slf.get();
        if core.with(py, |s| s.addrs.is_none()) {
            return Ok(None);
        }
        let Ok(name) = name.cast::<pyo3::types::PyString>() else {
            return Ok(None);
        };
        let value = match name.to_str()? {
            "peername" => {
                let a = core.with(py, |s| s.addrs.as_ref().map(|a| a.peer()));
                match a {
                    Some(a) => crate::dns::sockaddr(py, &a)?,
                    None => py.None().into_bound(py),
                }
            }
            "sockname" => {
                let a = core.with(py, |s| s.addrs.as_ref().and_then(|a| a.local()));
                match a {
                    Some(a) => crate::dns::sockaddr(py, &a)?,
                    None => py.None().into_bound(py),
                }
            }
            "socket" => match Self::socket_object(slf)? {
                Some(sock) => {
                    import_attr!(py, "asyncio.trsock", "TransportSocket")?.call1((sock,))?
                }
                None => py.None().into_bound(py),
            },
            _ => return Ok(None),
        };
        Ok(Some(PyTuple::new(py, [value])?))
    }

    /// The names `_lazy_extra` answers.
    fn _lazy_extra_names(&self, py: Python<'_>) -> Vec<&'static str> {
        if self.with(py, |s| s.addrs.is_some()) {
            vec!["socket", "sockname", "peername"]
        } else {
            Vec::new()
        }
    }

    /// `repr()` of the wrapper, named `name`.
    fn _repr(&self, py: Python<'_>, name: String) -> PyResult<String> {
        let (kind, fd, shown, has_sock, closing, size) = self.with(py, |s| {
            (s.kind, s.fd, s.repr_fd, s.has_file(), s.closing, s.buf.size)
        });
        let mut info = vec![name];
        if !has_sock {
            info.push("closed".into());
        } else if closing {
            info.push("closing".into());
        }
        info.push(format!("fd={shown}"));
        let open = self.loop_(py).filter(|lp| !lp.get().is_closed(py));
        if kind != Kind::Socket && open.is_none() {
            // asyncio's pipe transports without a selector to ask.
            info.push(if has_sock { "open" } else { "closed" }.into());
        }
        if let Some(lp) = open {
            let (r, w) = lp.get().io_registered(py, fd);
            let state = |b: bool| if b { "polling" } else { "idle" };
            match kind {
                Kind::Socket => {
                    info.push(format!("read={}", state(r)));
                    info.push(format!("write=<{}, bufsize={size}>", state(w)));
                }
                Kind::ReadPipe => info.push(state(r).into()),
                Kind::WritePipe => {
                    info.push(state(w).into());
                    info.push(format!("bufsize={size}"));
                }
            }
        }
        Ok(format!("<{}>", info.join(" ")))
    }

    /// The wrapper's `__del__`: warn about and close a socket or pipe never closed.
    fn _finalize(&self, py: Python<'_>, wrapper: &Bound<'_, PyAny>) -> PyResult<()> {
        // Garbage from here on (as asyncio's weak reference, cleared before `__del__`),
        // even if the warning's record resurrects it.
        self.forget_in_loop(py, wrapper.as_ptr());
        let (sock, own, server) = self.with(py, |s| {
            let own = s.own.is_some();
            let server = if s.sock.is_some() || own {
                s.server.take()
            } else {
                None
            };
            (s.sock.as_ref().map(|s| s.clone_ref(py)), own, server)
        });
        let detach = || {
            let (fd, lp) = self.with(py, |s| {
                (
                    std::mem::replace(&mut s.fd, -1),
                    s.loop_.as_ref().map(|l| l.clone_ref(py)),
                )
            });
            super::detach_fd(py, fd, lp);
        };
        // The descriptor it owns (a natively accepted connection) is closed after the
        // warning, whose repr still shows it open, as asyncio's does.
        let warned = match (&sock, own) {
            (Some(sock), _) => super::warn_unclosed(wrapper, Some(sock.bind(py)), detach),
            (None, true) => super::warn_unclosed(wrapper, None, detach),
            (None, false) => Ok(()),
        };
        let own = self.with(py, |s| s.own.take());
        drop(own);
        // Its server counts it as a client until told otherwise.
        if let Some(server) = server {
            server.call_method1(py, pyo3::intern!(py, "_detach"), (wrapper,))?;
        }
        warned
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // SAFETY: the collector runs with the GIL held and never inside `GilCell::with`.
        let s = unsafe { self.st.get_unchecked() };
        visit.call(&s.loop_)?;
        visit.call(&s.wrapper)?;
        visit.call(&s.sock)?;
        visit.call(&s.protocol)?;
        visit.call(&s.server)?;
        visit.call(&s.empty_waiter)?;
        for c in &s.buf.chunks {
            if let Data::Shared(b) = &c.data {
                visit.call(b)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        // SAFETY: called by the collector with the GIL held, outside any `with`.
        let py = unsafe { Python::assume_attached() };
        // The loop's entry for the wrapper goes before the reference keeping it alive.
        if let Some(w) = self.with(py, |s| s.wrapper.as_ref().map(|w| w.as_ptr())) {
            self.forget_in_loop(py, w);
        }
        let taken = self.with(py, |s| {
            (
                s.loop_.take(),
                s.wrapper.take(),
                s.sock.take(),
                s.own.take(),
                s.protocol.take(),
                s.server.take(),
                s.empty_waiter.take(),
                s.buf.clear(),
            )
        });
        drop(taken);
    }
}

/// What a stream transport reads and writes.
pub enum File<'a, 'py> {
    /// A socket, pipe or tty file object (asyncio's `_sock` / `_pipe`).
    Object(&'a Bound<'py, PyAny>),
    /// A connection accepted natively: the descriptor and its addresses; the socket
    /// object and the `extra` entries are made only if asked for.
    Accepted(OwnedFd, crate::sys::PackedAddrs),
}

/// `core()`: the reader callback, `_read_ready()`, installed as the type's raw `tp_call`
/// (pyo3's generated one parses arguments: ~100 instructions per event).
unsafe extern "C" fn stream_core_call(
    slf: *mut pyo3::ffi::PyObject,
    args: *mut pyo3::ffi::PyObject,
    kwargs: *mut pyo3::ffi::PyObject,
) -> *mut pyo3::ffi::PyObject {
    // SAFETY: installed as tp_call of `_StreamCore`: CPython passes an instance, an args
    // tuple and a kwargs dict or NULL, with the GIL held.
    unsafe {
        let py = Python::assume_attached();
        py::guard(py, || {
            if pyo3::ffi::PyTuple_GET_SIZE(args) != 0
                || (!kwargs.is_null() && pyo3::ffi::PyDict_Size(kwargs) != 0)
            {
                return Err(PyTypeError::new_err("_read_ready() takes no arguments"));
            }
            let core = Bound::from_borrowed_ptr(py, slf).cast_into::<StreamCore>()?;
            StreamCore::_read_ready(&core)?;
            Ok(pyo3::ffi::Py_NewRef(pyo3::ffi::Py_None()))
        })
    }
}

/// Installs the raw `tp_call` of `_StreamCore`; called once at module initialisation.
pub fn install(ty: &Bound<'_, pyo3::types::PyType>) {
    // SAFETY: a heap type created by pyo3 at module initialisation, before any instance
    // exists; slots of heap types may be replaced, followed by PyType_Modified.
    unsafe {
        let t = ty.as_type_ptr();
        (*t).tp_call = Some(stream_core_call);
        pyo3::ffi::PyType_Modified(t);
    }
}

/// Builds a stream transport for `file` as asyncio's selector loop does, scheduling
/// `connection_made`, the first read and the waiter in asyncio's order. `extra` is None
/// only for an accepted connection (`get_extra_info` then fills it on demand).
#[allow(clippy::too_many_arguments)]
pub fn make<'py>(
    lp: &Bound<'py, LoopCore>,
    kind: Kind,
    wrapper_type: &crate::py::transport_type::WrapperType,
    file: File<'_, 'py>,
    fd: RawFd,
    protocol: &Bound<'py, PyAny>,
    waiter: Option<&Bound<'py, PyAny>>,
    extra: Option<&Bound<'py, PyDict>>,
    server: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = lp.py();
    let edge = kind != Kind::ReadPipe
        || matches!(
            crate::sys::file_kind(fd).map_err(|e| errors::from_io(py, e))?,
            crate::sys::FileKind::Fifo | crate::sys::FileKind::Socket
        );
    let accepted = matches!(file, File::Accepted(..));
    let (sock, own, addrs) = match file {
        File::Object(obj) => (Some(obj.clone().unbind()), None, None),
        File::Accepted(own, addrs) => (None, Some(own), Some(addrs)),
    };
    let core = Bound::new(
        py,
        StreamCore {
            st: GilCell::new(St {
                kind,
                fd,
                repr_fd: fd,
                edge,
                loop_: Some(lp.clone().unbind()),
                wrapper: None,
                sock,
                own,
                addrs,
                protocol: None,
                buffered: false,
                read_hint: 0,
                protocol_connected: false,
                // Set once the server has counted it (`_attach` succeeded).
                server: None,
                buf: WriteBuf::default(),
                conn_lost: 0,
                closing: false,
                paused: false,
                eof: false,
                empty_waiter: None,
                flow: FlowControl::default(),
            }),
        },
    )?;
    let wrapper = wrapper_type.wrap(core.as_any(), extra.map(|e| e.as_any()))?;
    let w = wrapper.clone().unbind();
    core.get().with(py, |s| s.wrapper = Some(w));
    let call_soon = |args: Vec<Bound<'py, PyAny>>| -> PyResult<()> {
        lp.call_method1(pyo3::intern!(py, "call_soon"), PyTuple::new(py, args)?)
            .map(drop)
    };
    let built = (|| -> PyResult<()> {
        core.get().set_protocol(protocol)?;
        if kind == Kind::Socket {
            if let Some(server) = server {
                server.call_method1(pyo3::intern!(py, "_attach"), (&wrapper,))?;
                let s2 = server.clone().unbind();
                core.get().with(py, |s| s.server = Some(s2));
            }
            super::register_transport(lp, fd, &wrapper)?;
        }
        call_soon(vec![protocol.getattr("connection_made")?, wrapper.clone()])
    })();
    if let Err(e) = built {
        core.get().abandon(py, fd, wrapper.as_ptr());
        return Err(e);
    }
    // The rest of the build: undone the same way if it fails (the caller then closes or
    // keeps the socket, whose number must not stay claimed or watched).
    let started = (|| -> PyResult<()> {
        match kind {
            // An accepted connection starts reading at once instead of in a callback after
            // connection_made (one handle fewer per connection); its first data_received
            // still comes after connection_made, which is queued first, and the reader's
            // context is the same copy as asyncio's (made after the protocol factory ran).
            // Failing to watch it is the transport's fatal error (connection_lost follows),
            // as asyncio's failing _start_reading callback would be reported.
            Kind::Socket if accepted => {
                if let Err(e) = StreamCore::_start_reading(&core) {
                    StreamCore::fatal_error(&core, e, "Fatal error on transport")?;
                }
            }
            Kind::Socket | Kind::ReadPipe => call_soon(vec![core.getattr("_start_reading")?])?,
            Kind::WritePipe => {
                let k = crate::sys::file_kind(fd).map_err(|e| errors::from_io(py, e))?;
                if matches!(k, crate::sys::FileKind::Socket | crate::sys::FileKind::Fifo) {
                    call_soon(vec![core.getattr("_start_watching")?])?;
                }
            }
        }
        if let Some(waiter) = waiter
            && !waiter.is_none()
        {
            let set = import_attr!(py, "asyncio.futures", "_set_result_unless_cancelled")?;
            call_soon(vec![set.clone(), waiter.clone(), py.None().into_bound(py)])?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        core.get().abandon(py, fd, wrapper.as_ptr());
        return Err(e);
    }
    Ok(wrapper)
}
