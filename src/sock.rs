//! Socket operations. Mirrors asyncio.selector_events.BaseSelectorEventLoop.sock_*.
//!
//! As there, each operation is tried at once; if it would block, a callback is registered
//! as the socket's reader or writer and retried whenever the socket is ready, and a done
//! callback on the future unregisters it, so `remove_reader` / `add_reader` interact
//! with pending operations exactly as with asyncio's. Here the callbacks are native
//! objects, and receiving into bytes and sending from a buffer are direct system calls;
//! operations that carry addresses (accept, connect, recvfrom, sendto) call the socket
//! object's own method so addresses convert exactly as Python's.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

use pyo3::exceptions::{
    PyBlockingIOError, PyInterruptedError, PyKeyboardInterrupt, PyRuntimeError, PyStopIteration,
    PySystemExit, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::errors;
use crate::event_loop::LoopCore;
use crate::py::{ByteView, GilCell, import_attr};

/// Whether the operation waits for the socket to be readable or writable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Read,
    Write,
}

/// One socket operation and its progress.
pub(crate) enum Op {
    /// `recv(2)` of at most that many bytes into a new bytes object.
    Recv(usize),
    /// `sock.<method>(*args)`, waiting on the given side.
    Call(&'static str, Vec<Py<PyAny>>, Dir),
    /// Data and how much of it was sent already; `native`: `send(2)` on the descriptor
    /// (a plain `socket.socket`), else the socket's own `send` method, as asyncio calls it.
    SendAll {
        data: Py<PyAny>,
        pos: usize,
        native: bool,
        /// `data` is the operation's own memoryview of the caller's object.
        pinned: bool,
    },
    Accept,
    Connect(Py<PyAny>),
}

impl Op {
    pub fn dir(&self) -> Dir {
        match self {
            Op::SendAll { .. } | Op::Connect(_) => Dir::Write,
            Op::Call(_, _, dir) => *dir,
            Op::Recv(_) | Op::Accept => Dir::Read,
        }
    }

    fn refs(&self) -> Vec<&Py<PyAny>> {
        match self {
            Op::Call(_, args, _) => args.iter().collect(),
            Op::SendAll { data: x, .. } | Op::Connect(x) => vec![x],
            Op::Recv(_) | Op::Accept => Vec::new(),
        }
    }
}

/// What one try of an operation gave.
enum Attempt<'py> {
    WouldBlock,
    Done(Bound<'py, PyAny>),
}

/// Size up to which `recv` reuses a per-thread buffer; larger reads get their own.
const RECV_BUF_MAX: usize = 256 * 1024;

thread_local! {
    /// Receive buffer reused by `recv` (bytes are copied out of it).
    static RECV_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `recv(n)` into a new bytes object. A buffer that cannot be allocated is a
/// MemoryError, as `socket.recv` makes it.
fn recv_bytes(py: Python<'_>, fd: RawFd, n: usize) -> io::Result<Bound<'_, PyAny>> {
    if n == 0 {
        // As `socket.recv(0)`: no system call (which would wait for data), even on a
        // closed socket.
        return Ok(PyBytes::new(py, b"").into_any());
    }
    let read = |buf: &mut Vec<u8>| -> io::Result<Bound<'_, PyAny>> {
        if buf.len() < n {
            buf.try_reserve(n - buf.len())
                .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
            buf.resize(n, 0);
        }
        // EINTR is retried here, as `socket.recv` does (PEP 475): the operation waits
        // for edges, and no new one comes for data already queued.
        let len = loop {
            match crate::sys::recv(fd, &mut buf[..n]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        Ok(PyBytes::new(py, &buf[..len]).into_any())
    };
    if n <= RECV_BUF_MAX {
        RECV_BUF.with_borrow_mut(read)
    } else {
        read(&mut Vec::new())
    }
}

fn would_block(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyBlockingIOError>(py) || e.is_instance_of::<PyInterruptedError>(py)
}

fn io_attempt<'py>(py: Python<'py>, r: io::Result<Bound<'py, PyAny>>) -> PyResult<Attempt<'py>> {
    match r {
        Ok(v) => Ok(Attempt::Done(v)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(Attempt::WouldBlock)
        }
        // The buffer could not be allocated; a kernel ENOMEM (which std maps to the same
        // kind) is an OSError, as `socket.recv` raises it.
        Err(e) if e.kind() == io::ErrorKind::OutOfMemory && e.raw_os_error().is_none() => {
            Err(pyo3::exceptions::PyMemoryError::new_err(()))
        }
        Err(e) => Err(errors::from_io(py, e)),
    }
}

fn py_attempt<'py>(py: Python<'py>, r: PyResult<Bound<'py, PyAny>>) -> PyResult<Attempt<'py>> {
    match r {
        Ok(v) => Ok(Attempt::Done(v)),
        Err(e) if would_block(py, &e) => Ok(Attempt::WouldBlock),
        Err(e) => Err(e),
    }
}

/// Tries `op` once. `first`: the call from the `sock_*` method itself (connect starts
/// there; its retries only read the socket's pending error).
fn attempt<'py>(
    sock: &Bound<'py, PyAny>,
    fd: RawFd,
    op: &GilCell<Op>,
    first: bool,
) -> PyResult<Attempt<'py>> {
    let py = sock.py();
    enum Plan {
        Recv(usize),
        Method(&'static str, Vec<Py<PyAny>>),
        SendAll(Py<PyAny>, usize),
        SendCall(Py<PyAny>, usize),
        Accept,
        ConnectFirst(Py<PyAny>),
        ConnectCheck(Py<PyAny>),
    }
    let plan = op.with(py, |o| match o {
        Op::Recv(n) => Plan::Recv(*n),
        Op::Call(name, args, _) => {
            Plan::Method(name, args.iter().map(|a| a.clone_ref(py)).collect())
        }
        Op::SendAll {
            data,
            pos,
            native: true,
            ..
        } => Plan::SendAll(data.clone_ref(py), *pos),
        Op::SendAll { data, pos, .. } => Plan::SendCall(data.clone_ref(py), *pos),
        Op::Accept => Plan::Accept,
        Op::Connect(a) if first => Plan::ConnectFirst(a.clone_ref(py)),
        Op::Connect(a) => Plan::ConnectCheck(a.clone_ref(py)),
    });
    match plan {
        Plan::Recv(n) => io_attempt(py, recv_bytes(py, fd, n)),
        Plan::Method(name, args) => {
            let args = PyTuple::new(py, args)?;
            py_attempt(py, sock.call_method1(name, args))
        }
        Plan::SendAll(data, pos) => {
            let view = ByteView::new(data.bind(py))?;
            let mut sent = pos;
            if view.is_empty() {
                // asyncio still calls send(): a closed or unconnected socket fails.
                // SAFETY: a zero-length send reads nothing from the pointer.
                match unsafe { crate::sys::send(fd, view.as_ptr(), 0) } {
                    Err(e)
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                        ) =>
                    {
                        return Err(errors::from_io(py, e));
                    }
                    _ => {}
                }
            }
            while sent < view.len() {
                // SAFETY: `view` keeps the buffer exported and alive; `sent < len`.
                match unsafe { crate::sys::send(fd, view.as_ptr().add(sent), view.len() - sent) } {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(errors::from_io(py, e)),
                }
            }
            let total = view.len();
            drop(view);
            sent_so_far(py, &data, op, sent, total)
        }
        Plan::SendCall(data, pos) => {
            // asyncio's sock_sendall: `sock.send()` of what is left, again while it
            // takes something (asyncio's level-triggered writer calls it again at once;
            // this operation waits for an edge, which only a full socket gives).
            let d = data.bind(py);
            let total = ByteView::new(d)?.len();
            let mut sent = pos;
            loop {
                let arg = if sent == 0 {
                    d.clone()
                } else {
                    // Bytes from `sent` on, whatever the buffer's item format.
                    pyo3::types::PyMemoryView::from(d)?
                        .call_method1(pyo3::intern!(py, "cast"), ("B",))?
                        .get_item(pyo3::types::PySlice::new(py, sent as isize, isize::MAX, 1))?
                };
                match sock.call_method1(pyo3::intern!(py, "send"), (arg,)) {
                    Ok(n) => {
                        let n = n.extract::<usize>()?;
                        sent += n;
                        if n == 0 || sent >= total {
                            break;
                        }
                    }
                    Err(e) if would_block(py, &e) => break,
                    Err(e) => return Err(e),
                }
            }
            sent_so_far(py, &data, op, sent, total)
        }
        Plan::Accept => match sock.call_method0("accept") {
            Ok(pair) => {
                pair.get_item(0)?.call_method1("setblocking", (false,))?;
                Ok(Attempt::Done(pair))
            }
            Err(e) if would_block(py, &e) => Ok(Attempt::WouldBlock),
            Err(e) => Err(e),
        },
        Plan::ConnectFirst(addr) => match sock.call_method1("connect", (addr,)) {
            Ok(_) => Ok(Attempt::Done(py.None().into_bound(py))),
            Err(e) if would_block(py, &e) => Ok(Attempt::WouldBlock),
            Err(e) => Err(e),
        },
        Plan::ConnectCheck(addr) => match crate::sys::socket_error(fd) {
            Ok(0) => Ok(Attempt::Done(py.None().into_bound(py))),
            Ok(err) => Err(pyo3::exceptions::PyOSError::new_err((
                err,
                format!("Connect call failed {}", addr.bind(py).str()?),
            ))),
            Err(e) => io_attempt(py, Err(e)),
        },
    }
}

/// Records `sent` bytes of a `sendall` of `total` as sent. An unfinished one then holds
/// its data through a memoryview of its own, as asyncio does: a bytearray cannot be
/// resized under it (BufferError) while it waits, and the caller may release its own
/// memoryview.
fn sent_so_far<'py>(
    py: Python<'py>,
    data: &Py<PyAny>,
    op: &GilCell<Op>,
    sent: usize,
    total: usize,
) -> PyResult<Attempt<'py>> {
    let done = sent >= total;
    let already = op.with(py, |o| matches!(o, Op::SendAll { pinned: true, .. }));
    let view = if done || already {
        None
    } else {
        Some(
            pyo3::types::PyMemoryView::from(data.bind(py))?
                .into_any()
                .unbind(),
        )
    };
    op.with(py, |o| {
        if let Op::SendAll {
            data, pos, pinned, ..
        } = o
        {
            *pos = sent;
            if let Some(view) = view {
                *data = view;
                *pinned = true;
            }
        }
    });
    Ok(if done {
        Attempt::Done(py.None().into_bound(py))
    } else {
        Attempt::WouldBlock
    })
}

/// The reader/writer callback of a pending operation (asyncio's `_sock_recv` & co.).
#[pyclass(frozen, module = "ferroloop._ferroloop", name = "_SockOp")]
pub struct SockOp {
    fut: Py<PyAny>,
    sock: Py<PyAny>,
    fd: RawFd,
    op: GilCell<Op>,
    /// The future's done callback that unregisters the operation; set once registered.
    done: GilCell<Option<Py<SockDone>>>,
}

impl SockOp {
    /// Completes the operation: it unregisters itself at once (what its done callback
    /// would do at the next iteration, as asyncio's `_sock_read_done`), withdraws that
    /// callback, then sets the future's outcome, so completion schedules the waiting
    /// task's wake-up alone.
    fn finish(
        &self,
        py: Python<'_>,
        fut: &Bound<'_, PyAny>,
        method: &Bound<'_, pyo3::types::PyString>,
        value: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        if let Some(done) = self.done.with(py, |d| d.take()) {
            let done = done.into_bound(py);
            fut.call_method1(pyo3::intern!(py, "remove_done_callback"), (&done,))?;
            done.get().unregister(py)?;
        }
        fut.call_method1(method, (value,)).map(drop)
    }
}

#[pymethods]
impl SockOp {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let fut = self.fut.bind(py);
        if fut.call_method0(pyo3::intern!(py, "done"))?.is_truthy()? {
            return Ok(());
        }
        match attempt(self.sock.bind(py), self.fd, &self.op, false) {
            Ok(Attempt::WouldBlock) => Ok(()),
            Ok(Attempt::Done(v)) => self.finish(py, fut, pyo3::intern!(py, "set_result"), v),
            Err(e)
                if e.is_instance_of::<PyKeyboardInterrupt>(py)
                    || e.is_instance_of::<PySystemExit>(py) =>
            {
                Err(e)
            }
            Err(e) => {
                let exc = e.into_value(py).into_bound(py).into_any();
                self.finish(py, fut, pyo3::intern!(py, "set_exception"), exc)
            }
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.fut)?;
        visit.call(&self.sock)?;
        // SAFETY: the collector runs with the GIL held, never inside `GilCell::with`.
        visit.call(unsafe { self.done.get_unchecked() })?;
        // SAFETY: the collector runs with the GIL held, never inside `GilCell::with`.
        for r in unsafe { self.op.get_unchecked() }.refs() {
            visit.call(r)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        // SAFETY: called by the collector with the GIL held, outside any `with`.
        let py = unsafe { Python::assume_attached() };
        let done = self.done.with(py, |d| d.take());
        drop(done);
    }
}

/// The done callback that unregisters a pending operation (asyncio's `_sock_read_done`
/// / `_sock_write_done`).
#[pyclass(frozen, module = "ferroloop._ferroloop", name = "_SockDone")]
pub struct SockDone {
    loop_: Py<LoopCore>,
    fd: RawFd,
    handle: Py<PyAny>,
    dir: Dir,
}

#[pymethods]
impl SockDone {
    fn __call__(&self, py: Python<'_>, _fut: &Bound<'_, PyAny>) -> PyResult<()> {
        self.unregister(py)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.handle)
    }
}

impl SockDone {
    fn unregister(&self, py: Python<'_>) -> PyResult<()> {
        let t = crate::py::handle::types()?;
        if t.is_cancelled(self.handle.bind(py)) {
            return Ok(());
        }
        // The registration is the operation's own (its handle is still the fd's): drop
        // it as `remove_reader` / `remove_writer` would, without the method call.
        LoopCore::remove_io_fd(self.loop_.bind(py), self.fd, self.dir == Dir::Read)?;
        Ok(())
    }
}

/// asyncio's `_check_ssl_socket` and the debug-mode blocking-socket check.
fn check_socket(slf: &Bound<'_, LoopCore>, sock: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    // A plain `socket.socket` (the usual case) cannot be an SSLSocket, a subclass.
    let plain = import_attr!(py, "socket", "socket").is_ok_and(|t| sock.get_type().is(t));
    if !plain
        && let Ok(ssl_socket) = import_attr!(py, "ssl", "SSLSocket")
        && sock.is_instance(ssl_socket)?
    {
        return Err(PyTypeError::new_err("Socket cannot be of type SSLSocket"));
    }
    if slf.get().debug(py) {
        let timeout = sock.call_method0("gettimeout")?;
        if timeout.is_none() || timeout.extract::<f64>()? != 0.0 {
            return Err(PyValueError::new_err("the socket must be non-blocking"));
        }
    }
    Ok(())
}

/// Runs `op` on `sock`: its result if it completes at once, else a future completed by
/// a reader/writer callback.
/// What starting an operation gave: its result, or the future a reader/writer callback
/// will complete.
pub(crate) enum Outcome<'py> {
    Ready(Bound<'py, PyAny>),
    Pending(Bound<'py, PyAny>),
}

pub(crate) fn run<'py>(
    slf: &Bound<'py, LoopCore>,
    sock: &Bound<'py, PyAny>,
    op: Op,
) -> PyResult<Outcome<'py>> {
    let py = slf.py();
    check_socket(slf, sock)?;
    let fd_obj = sock.call_method0(pyo3::intern!(py, "fileno"))?;
    let fd: RawFd = fd_obj.extract()?;
    let dir = op.dir();
    let op = GilCell::new(op);
    if let Attempt::Done(v) = attempt(sock, fd, &op, true)? {
        return Ok(Outcome::Ready(v));
    }
    slf.get().ensure_fd_no_transport(py, fd)?;
    let fut = LoopCore::create_future(slf)?;
    let callback = Bound::new(
        py,
        SockOp {
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            fd,
            op,
            done: GilCell::new(None),
        },
    )?;
    // The operation's callback always makes the system call (or finds its future done
    // and is then unregistered), so it needs no re-arm after an event: edge-triggered.
    // Not for another kind of socket object, whose own methods may say "would block"
    // while the kernel's buffer is not empty (or not full): no new edge would come, so
    // it is watched level-triggered, as asyncio watches every socket.
    let handle = if fd >= 0 {
        LoopCore::add_io_fd_owned(
            slf,
            fd,
            callback.as_any(),
            PyTuple::empty(py),
            dir == Dir::Read,
            is_plain_socket(sock),
            Some(sock),
            false,
        )?
    } else {
        LoopCore::add_io_handle(
            slf,
            &fd_obj,
            callback.as_any(),
            PyTuple::empty(py),
            dir == Dir::Read,
        )?
    };
    let done = Bound::new(
        py,
        SockDone {
            loop_: slf.clone().unbind(),
            fd,
            handle: handle.unbind(),
            dir,
        },
    )?;
    fut.call_method1(pyo3::intern!(py, "add_done_callback"), (&done,))?;
    let done = done.unbind();
    callback.get().done.with(py, |d| *d = Some(done));
    Ok(Outcome::Pending(fut))
}

/// `sock.<method>(*args)` as an operation waiting on `dir`.
pub(crate) fn call_op(method: &'static str, args: &[&Bound<'_, PyAny>], dir: Dir) -> Op {
    Op::Call(
        method,
        args.iter().map(|a| (*a).clone().unbind()).collect(),
        dir,
    )
}

/// Where a `SockOperation` is.
enum CoroState {
    /// Not started: the checks and the first try happen at the first `send`, as in the
    /// body of asyncio's `async def sock_*`.
    Start(Op),
    /// Suspended on the future a reader/writer callback completes.
    Waiting(Py<PyAny>),
    Done,
}

// DEVIATION(asyncio): asyncio's sock_* are `async def` coroutines; these are native
//   coroutine objects (no "never awaited" warning, not an `inspect` coroutine function).
/// The awaitable `loop.sock_*()` returns: a native coroutine (registered as a
/// `collections.abc.Coroutine`, so `create_task` takes it) that runs the operation at
/// its first step. A socket that is already ready completes within that step; otherwise
/// it yields the operation's future, as `await future` does.
#[pyclass(frozen, module = "ferroloop._ferroloop", name = "_SockOperation")]
pub struct SockOperation {
    loop_: Py<LoopCore>,
    sock: Py<PyAny>,
    name: &'static str,
    state: GilCell<CoroState>,
}

impl SockOperation {
    pub(crate) fn new(
        slf: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        name: &'static str,
        op: Op,
    ) -> Self {
        SockOperation {
            loop_: slf.clone().unbind(),
            sock: sock.clone().unbind(),
            name,
            state: GilCell::new(CoroState::Start(op)),
        }
    }

    fn step(&self, py: Python<'_>) -> PyResult<Step> {
        let state = self
            .state
            .with(py, |s| std::mem::replace(s, CoroState::Done));
        let value = match state {
            CoroState::Start(op) => match run(self.loop_.bind(py), self.sock.bind(py), op)? {
                Outcome::Ready(v) => v,
                Outcome::Pending(fut) => {
                    fut.setattr(pyo3::intern!(py, "_asyncio_future_blocking"), true)?;
                    let item = fut.clone().unbind();
                    self.state.with(py, |s| *s = CoroState::Waiting(item));
                    return Ok(Step::Yield(fut.unbind()));
                }
            },
            CoroState::Waiting(fut) => {
                let f = fut.bind(py);
                if !f.call_method0(pyo3::intern!(py, "done"))?.is_truthy()? {
                    // Still waiting: whoever resumed it too early does not end it.
                    self.state
                        .with(py, |s| *s = CoroState::Waiting(fut.clone_ref(py)));
                    return Err(PyRuntimeError::new_err("await wasn't used with future"));
                }
                f.call_method0(pyo3::intern!(py, "result"))?
            }
            CoroState::Done => {
                return Err(PyRuntimeError::new_err(
                    "cannot reuse already awaited coroutine",
                ));
            }
        };
        Ok(Step::Return(value.unbind()))
    }

    /// `step` as a `__next__` / `send` result: a return is `StopIteration(value)`.
    fn step_py(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.step(py)? {
            Step::Yield(fut) => Ok(fut),
            Step::Return(v) => Err(PyStopIteration::new_err((v,))),
        }
    }
}

/// What one step of a `SockOperation` gave.
enum Step {
    /// The future to wait on (`yield`).
    Yield(Py<PyAny>),
    /// The operation's result (`return`).
    Return(Py<PyAny>),
}

/// `tp_iternext` of `SockOperation`, installed over pyo3's: an `await` resumes the
/// operation through this slot (`send(None)`), and a result is returned by setting
/// StopIteration's value directly, as CPython's own generators do, instead of creating
/// the exception object first (on Python 3.12+ CPython creates it anyway).
unsafe extern "C" fn sock_operation_iternext(
    slf: *mut pyo3::ffi::PyObject,
) -> *mut pyo3::ffi::PyObject {
    // SAFETY: installed as the slot of the SockOperation type only, so `slf` is a live
    // SockOperation; the GIL is held in a slot call.
    unsafe {
        let py = Python::assume_attached();
        crate::py::guard(py, || {
            let obj = Bound::from_borrowed_ptr(py, slf);
            let op = obj.cast::<SockOperation>()?;
            match op.get().step(py)? {
                Step::Yield(fut) => Ok(fut.into_ptr()),
                Step::Return(v) => {
                    let v = v.into_bound(py);
                    let exc = pyo3::ffi::PyExc_StopIteration;
                    // A tuple or an exception as the value must be wrapped, or they
                    // would become the exception's arguments / the exception itself.
                    if v.is_instance_of::<PyTuple>()
                        || pyo3::ffi::PyExceptionInstance_Check(v.as_ptr()) != 0
                    {
                        let args = PyTuple::new(py, [&v])?;
                        pyo3::ffi::PyErr_SetObject(exc, args.as_ptr());
                    } else {
                        pyo3::ffi::PyErr_SetObject(exc, v.as_ptr());
                    }
                    Ok(std::ptr::null_mut())
                }
            }
        })
    }
}

/// Installs the `tp_iternext` above on the SockOperation type.
pub fn install(ty: &Bound<'_, pyo3::types::PyType>) {
    // SAFETY: a heap type created by pyo3 at module initialisation, before any instance
    // exists; slots of heap types may be replaced, followed by PyType_Modified.
    unsafe {
        let t = ty.as_type_ptr();
        (*t).tp_iternext = Some(sock_operation_iternext);
        pyo3::ffi::PyType_Modified(t);
    }
}

#[pymethods]
impl SockOperation {
    /// As a coroutine's: a second `await` while the first waits is refused (which
    /// leaves the first one waiting).
    fn __await__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let waiting = slf
            .get()
            .state
            .with(slf.py(), |s| matches!(s, CoroState::Waiting(_)));
        if waiting {
            return Err(PyRuntimeError::new_err(
                "coroutine is being awaited already",
            ));
        }
        Ok(slf)
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.step_py(py)
    }

    #[pyo3(signature = (value))]
    fn send(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        if !value.is_none() && self.state.with(py, |s| matches!(s, CoroState::Start(_))) {
            return Err(PyTypeError::new_err(
                "can't send non-None value to a just-started coroutine",
            ));
        }
        self.step_py(py)
    }

    /// Raises the exception at the suspension point (Task cancellation), ending the
    /// operation; its future was cancelled by the task.
    #[pyo3(signature = (typ, val=None, tb=None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let state = self
            .state
            .with(py, |s| std::mem::replace(s, CoroState::Done));
        drop(state);
        let base = py.get_type::<pyo3::exceptions::PyBaseException>();
        let exc = if typ.is_instance(&base)? {
            typ.clone()
        } else if let Some(v) = val.filter(|v| v.is_instance(typ).unwrap_or(false)) {
            v.clone()
        } else {
            match val.filter(|v| !v.is_none()) {
                Some(v) => typ.call1((v,))?,
                None => typ.call0()?,
            }
        };
        if let Some(tb) = tb.filter(|t| !t.is_none()) {
            exc.call_method1("with_traceback", (tb,))?;
        }
        Err(PyErr::from_value(exc))
    }

    /// Ends the operation; a pending one is cancelled, which unregisters it. On a closed
    /// loop (which unregistered everything) it just ends, as a coroutine's `close()`
    /// does: cancelling would schedule callbacks there and raise.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let state = self
            .state
            .with(py, |s| std::mem::replace(s, CoroState::Done));
        if let CoroState::Waiting(fut) = state
            && !self.loop_.get().is_closed(py)
        {
            fut.bind(py).call_method0("cancel")?;
        }
        Ok(())
    }

    #[getter]
    fn __name__(&self) -> &'static str {
        self.name
    }

    #[getter]
    fn __qualname__(&self) -> String {
        format!("Loop.{}", self.name)
    }

    fn __repr__(&self) -> String {
        format!("<ferroloop sock operation Loop.{}>", self.name)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.sock)?;
        // SAFETY: the collector runs with the GIL held, never inside `GilCell::with`.
        match unsafe { self.state.get_unchecked() } {
            CoroState::Start(op) => {
                for r in op.refs() {
                    visit.call(r)?;
                }
            }
            CoroState::Waiting(fut) => visit.call(fut)?,
            CoroState::Done => {}
        }
        Ok(())
    }
}

/// Whether `sock` is a plain `socket.socket`, whose `recv` / `send` the native paths
/// replace; a subclass's (or another object's) own methods are called instead.
pub(crate) fn is_plain_socket(sock: &Bound<'_, PyAny>) -> bool {
    import_attr!(sock.py(), "socket", "socket").is_ok_and(|t| sock.get_type().is(t))
}

/// `sock.recv(n)`'s argument checks, for the native path.
pub(crate) fn recv_size(n: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    if !n.is_exact_instance_of::<PyInt>() {
        return Ok(None);
    }
    let n: isize = n.extract()?;
    if n < 0 {
        return Err(PyValueError::new_err("negative buffersize in recv"));
    }
    Ok(Some(n as usize))
}
