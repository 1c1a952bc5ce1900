//! Native transports: stream (TCP, Unix, pipes) and datagram. Mirrors
//! asyncio.selector_events' and unix_events' transport classes; the Python-visible
//! classes are wrappers deriving from asyncio's (see `py::transport_type`).

pub mod accept;
pub mod datagram;
pub mod flow;
pub mod stream;

use std::os::fd::RawFd;
use std::sync::OnceLock;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

use crate::errors;
use crate::event_loop::LoopCore;
use crate::py::import_attr;
use crate::py::transport_type::{self, MethodName, WrapperType, forward_methods};

forward_methods!(STREAM_METHODS:
    write, writelines, write_eof, can_write_eof, get_write_buffer_size,
    get_write_buffer_limits, set_write_buffer_limits, pause_reading, resume_reading,
    is_reading, close, abort, is_closing, get_protocol, set_protocol, _force_close,
    _fatal_error, _make_empty_waiter, _reset_empty_waiter,
);
forward_methods!(READ_PIPE_METHODS:
    pause_reading, resume_reading, is_reading, close, is_closing, get_protocol,
    set_protocol, _fatal_error, _force_close,
);
forward_methods!(WRITE_PIPE_METHODS:
    write, writelines, write_eof, can_write_eof, get_write_buffer_size,
    get_write_buffer_limits, set_write_buffer_limits, close, abort, is_closing,
    get_protocol, set_protocol, _fatal_error, _force_close,
);
forward_methods!(DATAGRAM_METHODS:
    sendto, abort, close, is_closing, get_protocol, set_protocol, get_write_buffer_size,
    get_write_buffer_limits, set_write_buffer_limits, pause_reading, resume_reading,
    is_reading, _force_close, _fatal_error,
);

/// asyncio's `_SelectorTransport.__del__` for a transport still holding `sock`: a
/// ResourceWarning "unclosed transport", then the socket is closed. At interpreter
/// shutdown, when `warnings` can no longer be imported (asyncio holds it from import
/// time), the warning is skipped and the socket still closed.
///
/// `detach` runs after the warning, before the socket (or the descriptor the caller owns)
/// is closed: the transport lets go of the descriptor number, as a transport the
/// warning's record resurrects must not go on using whatever reuses it (asyncio's gets
/// EBADF from its closed socket).
fn warn_unclosed(
    wrapper: &Bound<'_, PyAny>,
    sock: Option<&Bound<'_, PyAny>>,
    detach: impl FnOnce(),
) -> PyResult<()> {
    let py = wrapper.py();
    if let Ok(warn) = crate::py::import_attr!(py, "warnings", "warn") {
        let kw = pyo3::types::PyDict::new(py);
        kw.set_item("source", wrapper)?;
        let msg = format!("unclosed transport {}", wrapper.repr()?);
        let category = py.get_type::<pyo3::exceptions::PyResourceWarning>();
        warn.call((msg, category), Some(&kw))?;
    }
    detach();
    sock.map_or(Ok(()), |s| s.call_method0("close").map(drop))
}

/// Drops the loop's handles and registration for the descriptor `fd` a transport core
/// has just let go of (see `warn_unclosed`).
fn detach_fd(py: Python<'_>, fd: RawFd, lp: Option<Py<LoopCore>>) {
    if fd >= 0
        && let Some(lp) = lp
    {
        let _ = LoopCore::forget_fd(lp.bind(py), fd);
    }
}

/// The positional arguments of a `direct` call.
struct Args<'a> {
    py: Python<'a>,
    argv: &'a [*mut pyo3::ffi::PyObject],
}

impl<'a> Args<'a> {
    fn get(&self, i: usize) -> Option<Bound<'a, PyAny>> {
        // SAFETY: the vectorcall frame's arguments are live borrowed references.
        self.argv
            .get(i)
            .map(|&p| unsafe { Bound::from_borrowed_ptr(self.py, p) })
    }
}

/// The body of a hand-written wrapper method: with `nargs` positional arguments in
/// `accepted` and no keywords, `body(core, args)` runs on the wrapper's core without a
/// Python-level method call; anything else goes through the generic forwarder, which
/// reports errors as the core's method does.
///
/// # Safety
/// As a METH_FASTCALL|METH_KEYWORDS method of a wrapper type: `slf` is a wrapper
/// instance and `args` / `nargsf` / `kwnames` a valid vectorcall frame.
unsafe fn direct(
    slf: *mut pyo3::ffi::PyObject,
    name: &'static MethodName,
    args: *const *mut pyo3::ffi::PyObject,
    nargsf: pyo3::ffi::Py_ssize_t,
    kwnames: *mut pyo3::ffi::PyObject,
    accepted: std::ops::RangeInclusive<isize>,
    body: impl for<'py> FnOnce(&Bound<'py, PyAny>, Args<'py>) -> PyResult<Bound<'py, PyAny>>,
) -> *mut pyo3::ffi::PyObject {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let nargs = pyo3::ffi::PyVectorcall_NARGS(nargsf as usize);
        if !accepted.contains(&nargs) || !kwnames.is_null() {
            return transport_type::forward(slf, name, args, nargsf, kwnames);
        }
        let py = Python::assume_attached();
        crate::py::guard(py, || {
            let core = transport_type::core_of(py, slf)?;
            let result = body(
                &core,
                Args {
                    py,
                    argv: std::slice::from_raw_parts(args, nargs as usize),
                },
            )?;
            Ok(result.into_ptr())
        })
    }
}

/// Declares a hand-written wrapper method: a C entry point running `body(core, args)`
/// through `direct`, for the wrapper types whose core the body casts to.
macro_rules! direct_method {
    ($(#[$doc:meta])* $func:ident, $name:literal, $accepted:expr, $body:expr) => {
        transport_type::wrapper_method!($(#[$doc])* $func, |slf, args, nargsf, kwnames| {
            static NAME: MethodName = MethodName::new($name);
            direct(slf, &NAME, args, nargsf, kwnames, $accepted, $body)
        });
    };
}

direct_method!(
    /// `transport.write(data)` without the forwarder's method call: the hottest transport
    /// method (a Protocol's `data_received` usually ends in it).
    stream_write,
    "write",
    1..=1,
    |core, argv| {
        let data = argv.get(0).expect("one argument");
        stream::StreamCore::write(core.cast::<stream::StreamCore>()?, &data)?;
        Ok(core.py().None().into_bound(core.py()))
    }
);

direct_method!(
    /// `transport.sendto(data[, addr])` without the forwarder's method call (a
    /// DatagramProtocol's `datagram_received` usually ends in it).
    datagram_sendto,
    "sendto",
    1..=2,
    |core, argv| {
        let py = core.py();
        let core = core.cast::<datagram::DatagramCore>()?;
        let data = argv.get(0).expect("at least one argument");
        datagram::DatagramCore::sendto(core, &data, argv.get(1))?;
        Ok(py.None().into_bound(py))
    }
);

direct_method!(
    /// `transport.is_closing()` of a stream transport (TCP, Unix, pipes) without the
    /// forwarder's method call (`StreamWriter.drain()` asks it every time).
    stream_is_closing,
    "is_closing",
    0..=0,
    |core, _| {
        let py = core.py();
        let closing = core.cast::<stream::StreamCore>()?.get().is_closing(py);
        Ok(pyo3::types::PyBool::new(py, closing).to_owned().into_any())
    }
);

static DATAGRAM_DIRECT: &[transport_type::Forward] = &[transport_type::Forward {
    name: c"sendto",
    func: datagram_sendto,
}];

static STREAM_DIRECT: &[transport_type::Forward] = &[
    transport_type::Forward {
        name: c"write",
        func: stream_write,
    },
    transport_type::Forward {
        name: c"is_closing",
        func: stream_is_closing,
    },
];
static WRITE_PIPE_DIRECT: &[transport_type::Forward] = STREAM_DIRECT;
static READ_PIPE_DIRECT: &[transport_type::Forward] = &[transport_type::Forward {
    name: c"is_closing",
    func: stream_is_closing,
}];

/// The Python-visible transport classes.
pub struct Types {
    pub tcp: WrapperType,
    pub unix: WrapperType,
    pub read_pipe: WrapperType,
    pub write_pipe: WrapperType,
    pub udp: WrapperType,
}

static TYPES: OnceLock<Types> = OnceLock::new();

pub fn types() -> PyResult<&'static Types> {
    TYPES
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("ferroloop transport types are not initialised"))
}

/// Creates the transport classes; called once from module initialisation.
pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    transport_type::init(py)?;
    if TYPES.get().is_none() {
        let t = py.import("asyncio.transports")?;
        let base = |name: &str| -> PyResult<Bound<'_, PyType>> {
            Ok(t.getattr(name)?.cast_into::<PyType>()?)
        };
        let types = Types {
            tcp: transport_type::make_type(
                &[base("Transport")?],
                c"ferroloop.TCPTransport",
                c"A TCP connection (an asyncio.Transport).",
                STREAM_METHODS,
                STREAM_DIRECT,
                true,
            )?,
            unix: transport_type::make_type(
                &[base("Transport")?],
                c"ferroloop.UnixTransport",
                c"A Unix stream socket connection (an asyncio.Transport).",
                STREAM_METHODS,
                STREAM_DIRECT,
                true,
            )?,
            read_pipe: transport_type::make_type(
                &[base("ReadTransport")?],
                c"ferroloop.ReadPipeTransport",
                c"The read end of a pipe (an asyncio.ReadTransport).",
                READ_PIPE_METHODS,
                READ_PIPE_DIRECT,
                false,
            )?,
            // An asyncio.Transport, as asyncio's own write pipe transport (through its
            // _FlowControlMixin): the read half's methods raise NotImplementedError.
            write_pipe: transport_type::make_type(
                &[base("Transport")?],
                c"ferroloop.WritePipeTransport",
                c"The write end of a pipe (an asyncio.Transport).",
                WRITE_PIPE_METHODS,
                WRITE_PIPE_DIRECT,
                false,
            )?,
            udp: transport_type::make_type(
                &[base("Transport")?, base("DatagramTransport")?],
                c"ferroloop.UDPTransport",
                c"A datagram socket (an asyncio.DatagramTransport).",
                DATAGRAM_METHODS,
                DATAGRAM_DIRECT,
                false,
            )?,
        };
        let _ = TYPES.set(types);
    }
    let t = types()?;
    // What asyncio's sendfile() and start_tls() look for on a transport class.
    let native = py
        .import("asyncio.constants")?
        .getattr("_SendfileMode")?
        .getattr("TRY_NATIVE")?;
    for w in [&t.tcp, &t.unix] {
        w.type_object(py).setattr("_sendfile_compatible", &native)?;
        w.type_object(py).setattr("_start_tls_compatible", true)?;
    }
    m.add("TCPTransport", t.tcp.type_object(py))?;
    m.add("UnixTransport", t.unix.type_object(py))?;
    m.add("ReadPipeTransport", t.read_pipe.type_object(py))?;
    m.add("WritePipeTransport", t.write_pipe.type_object(py))?;
    m.add("UDPTransport", t.udp.type_object(py))?;
    Ok(())
}

/// A native transport's wrapper as the loop's `_transports` entry for its descriptor.
///
/// asyncio keeps weak references there (a WeakValueDictionary). ferroloop keeps the bare
/// pointer, which saves a weak-reference object per connection, and keeps it valid by
/// this invariant: while the entry exists, the transport's core holds the wrapper (its
/// `wrapper` field) and still has its loop and descriptor. Every path that lets go of
/// those first removes the entry: losing the connection (`_call_connection_lost`), closing
/// a datagram transport, abandoning a half-built transport, and the collector clearing
/// either the core (`__clear__`) or the wrapper (`wrapper_cleared`), whichever it reaches
/// first. A loop that is closed or cleared drops all its entries.
///
/// DEVIATION(asyncio): the collector clears weak references (and runs their callbacks)
///   before it finalizes anything, so on asyncio a transport being collected has left
///   `_transports` by then; here it leaves at its `__del__`, just after. Only a weak
///   reference callback on the transport itself can tell: `add_reader` on its descriptor
///   from there still raises RuntimeError.
#[derive(Clone, Copy)]
pub(crate) struct TransportRef(std::ptr::NonNull<pyo3::ffi::PyObject>);

// SAFETY: only dereferenced with the GIL held (the loop's state is behind a `GilCell`).
unsafe impl Send for TransportRef {}

impl TransportRef {
    /// Whether this entry is `wrapper`.
    fn is(self, wrapper: *mut pyo3::ffi::PyObject) -> bool {
        self.0.as_ptr() == wrapper
    }

    /// The wrapper, unless the collector has already cleared it (it then counts as gone,
    /// as a weak reference would be by then).
    pub(crate) fn get(self, py: Python<'_>) -> Option<Bound<'_, PyAny>> {
        // SAFETY: the entry's invariant (see the type) keeps the wrapper alive; GIL held.
        unsafe {
            let w = Bound::from_borrowed_ptr(py, self.0.as_ptr());
            transport_type::core_of(py, w.as_ptr()).is_ok().then_some(w)
        }
    }
}

/// Records `wrapper` as the transport owning `fd` (asyncio's `_transports`: the loop does
/// not keep a transport alive). The caller's core already holds `wrapper`, its loop and
/// `fd` (see `TransportRef`).
pub(crate) fn register_transport(
    lp: &Bound<'_, LoopCore>,
    fd: RawFd,
    wrapper: &Bound<'_, PyAny>,
) -> PyResult<()> {
    // A socket closed before its transport was made has no descriptor to claim (and
    // none of the paths that remove entries would look under -1).
    if fd < 0 {
        return Ok(());
    }
    let py = lp.py();
    let entry = TransportRef(std::ptr::NonNull::new(wrapper.as_ptr()).expect("live object"));
    lp.get().state.with(py, |s| s.transports.insert(fd, entry));
    Ok(())
}

/// The collector is clearing `wrapper`, whose core is `core`: its `_transports` entry goes
/// first, as the core may be freed with the wrapper's reference to it.
pub(crate) fn wrapper_cleared(
    py: Python<'_>,
    core: *mut pyo3::ffi::PyObject,
    wrapper: *mut pyo3::ffi::PyObject,
) {
    // SAFETY: `core` is the live core the wrapper still references; GIL held.
    let core = unsafe { Bound::from_borrowed_ptr(py, core) };
    let reg = if let Ok(c) = core.cast::<stream::StreamCore>() {
        c.get().registration(py)
    } else if let Ok(c) = core.cast::<datagram::DatagramCore>() {
        c.get().registration(py)
    } else {
        None
    };
    if let Some((lp, fd)) = reg {
        forget_transport(lp.bind(py), fd, wrapper);
    }
}

/// The stream transports accepted by `server` whose connection is not lost yet (for
/// `Server.close_clients()` / `abort_clients()`), in no particular order.
pub(crate) fn server_clients<'py>(
    lp: &Bound<'py, LoopCore>,
    server: &Bound<'py, PyAny>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let py = lp.py();
    let t = types()?;
    let entries: Vec<TransportRef> = lp
        .get()
        .state
        .with(py, |s| s.transports.values().copied().collect());
    // Strong references first: nothing below may then free a wrapper an entry points to.
    let live: Vec<Bound<'py, PyAny>> = entries.into_iter().filter_map(|e| e.get(py)).collect();
    let mut out = Vec::new();
    for tr in live {
        let tp = tr.get_type();
        if !tp.is(t.tcp.type_object(py)) && !tp.is(t.unix.type_object(py)) {
            continue;
        }
        // SAFETY: `tr` is a live instance of a wrapper type.
        let core = unsafe { transport_type::core_of(py, tr.as_ptr())? };
        let Ok(core) = core.cast::<stream::StreamCore>() else {
            continue;
        };
        if core
            .get()
            .server_of(py)
            .is_some_and(|s| s.as_ptr() == server.as_ptr())
        {
            out.push(tr);
        }
    }
    Ok(out)
}

/// Whether `obj` is one of the native stream socket transports (TCP, Unix).
pub(crate) fn is_stream_socket_transport(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = obj.py();
    let t = types()?;
    let tp = obj.get_type();
    Ok(tp.is(t.tcp.type_object(py)) || tp.is(t.unix.type_object(py)))
}

/// Removes `wrapper` from the loop's `_transports` if it is still the entry for `fd`.
pub(crate) fn forget_transport(
    lp: &Bound<'_, LoopCore>,
    fd: RawFd,
    wrapper: *mut pyo3::ffi::PyObject,
) {
    let py = lp.py();
    lp.get().state.with(py, |s| {
        if s.transports.get(&fd).is_some_and(|t| t.is(wrapper)) {
            s.transports.remove(&fd);
        }
    });
}

/// `extra` as asyncio's transports fill it: a new dict unless one is given.
fn extra_dict<'py>(
    py: Python<'py>,
    extra: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    match extra.filter(|e| !e.is_none()) {
        Some(e) => Ok(e.clone().cast_into::<PyDict>()?),
        None => Ok(PyDict::new(py)),
    }
}

/// `_SelectorTransport.__init__`'s extra info: socket, sockname, peername.
fn socket_extra(sock: &Bound<'_, PyAny>, extra: &Bound<'_, PyDict>) -> PyResult<()> {
    let py = sock.py();
    let trsock = import_attr!(py, "asyncio.trsock", "TransportSocket")?;
    extra.set_item("socket", trsock.call1((sock,))?)?;
    let oserror = |e: &PyErr| e.is_instance_of::<pyo3::exceptions::PyOSError>(py);
    match sock.call_method0("getsockname") {
        Ok(n) => extra.set_item("sockname", n)?,
        Err(e) if oserror(&e) => extra.set_item("sockname", py.None())?,
        Err(e) => return Err(e),
    }
    if !extra.contains("peername")? {
        match sock.call_method0("getpeername") {
            Ok(n) => extra.set_item("peername", n)?,
            Err(e) if oserror(&e) => extra.set_item("peername", py.None())?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fileno(obj: &Bound<'_, PyAny>) -> PyResult<RawFd> {
    obj.call_method0("fileno")?.extract()
}

/// `loop._make_socket_transport(sock, protocol, waiter=None, *, extra=None, server=None)`.
pub fn make_socket_transport<'py>(
    lp: &Bound<'py, LoopCore>,
    sock: &Bound<'py, PyAny>,
    protocol: &Bound<'py, PyAny>,
    waiter: Option<&Bound<'py, PyAny>>,
    extra: Option<&Bound<'py, PyAny>>,
    server: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = lp.py();
    let t = types()?;
    let extra = extra_dict(py, extra)?;
    socket_extra(sock, &extra)?;
    let fd = fileno(sock)?;
    let family: i32 = sock.getattr("family")?.extract()?;
    let wrapper_type = if family == crate::sys::AF_UNIX {
        &t.unix
    } else {
        &t.tcp
    };
    import_attr!(py, "asyncio.base_events", "_set_nodelay")?.call1((sock,))?;
    let server = server.filter(|s| !s.is_none());
    stream::make(
        lp,
        stream::Kind::Socket,
        wrapper_type,
        stream::File::Object(sock),
        fd,
        protocol,
        waiter,
        Some(&extra),
        server,
    )
}

/// `loop._make_read_pipe_transport` / `_make_write_pipe_transport(pipe, protocol,
/// waiter=None, extra=None)`, with asyncio's checks on the kind of file.
pub fn make_pipe_transport<'py>(
    lp: &Bound<'py, LoopCore>,
    pipe: &Bound<'py, PyAny>,
    protocol: &Bound<'py, PyAny>,
    waiter: Option<&Bound<'py, PyAny>>,
    extra: Option<&Bound<'py, PyAny>>,
    read: bool,
) -> PyResult<Bound<'py, PyAny>> {
    use crate::sys::FileKind;
    let py = lp.py();
    let t = types()?;
    let extra = extra_dict(py, extra)?;
    extra.set_item("pipe", pipe)?;
    let fd = fileno(pipe)?;
    let kind = crate::sys::file_kind(fd).map_err(|e| errors::from_io(py, e))?;
    if read {
        if !matches!(
            kind,
            FileKind::Fifo | FileKind::Socket | FileKind::CharDevice
        ) {
            return Err(PyValueError::new_err(
                "Pipe transport is for pipes/sockets only.",
            ));
        }
    } else if !matches!(
        kind,
        FileKind::Fifo | FileKind::Socket | FileKind::CharDevice
    ) {
        return Err(PyValueError::new_err(
            "Pipe transport is only for pipes, sockets and character devices",
        ));
    }
    crate::sys::set_nonblocking(fd).map_err(|e| errors::from_io(py, e))?;
    let (k, wt) = if read {
        (stream::Kind::ReadPipe, &t.read_pipe)
    } else {
        (stream::Kind::WritePipe, &t.write_pipe)
    };
    stream::make(
        lp,
        k,
        wt,
        stream::File::Object(pipe),
        fd,
        protocol,
        waiter,
        Some(&extra),
        None,
    )
}

/// `loop._make_datagram_transport(sock, protocol, address=None, waiter=None, extra=None)`.
pub fn make_datagram_transport<'py>(
    lp: &Bound<'py, LoopCore>,
    sock: &Bound<'py, PyAny>,
    protocol: &Bound<'py, PyAny>,
    address: Option<&Bound<'py, PyAny>>,
    waiter: Option<&Bound<'py, PyAny>>,
    extra: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = lp.py();
    let t = types()?;
    let extra = extra_dict(py, extra)?;
    socket_extra(sock, &extra)?;
    let fd = fileno(sock)?;
    datagram::make(lp, &t.udp, sock, fd, protocol, address, waiter, &extra)
}

/// The callback that delivers a transport's `connection_lost`: asyncio schedules the
/// transport's bound `_call_connection_lost`, which handle reprs and the exception
/// handler's "Exception in callback ..." show as `_SelectorSocketTransport._call_...`.
/// This shows the transport's class (`TCPTransport._call_connection_lost`), not the
/// internal core whose method it calls.
#[pyclass(frozen, name = "_CallConnectionLost", module = "ferroloop._ferroloop")]
pub(crate) struct CallConnectionLost {
    method: Py<PyAny>,
    qualname: String,
}

#[pymethods]
impl CallConnectionLost {
    fn __call__(&self, py: Python<'_>, exc: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.method.bind(py).call1((exc,)).map(Bound::unbind)
    }

    #[getter]
    fn __qualname__(&self) -> &str {
        &self.qualname
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.method)
    }
}

/// `Class.method` for a transport core's `method`: the class of its `wrapper` (the
/// transport the user sees), or `fallback` once there is none.
pub(crate) fn method_qualname(
    wrapper: &Bound<'_, PyAny>,
    fallback: &str,
    method: &str,
) -> PyResult<String> {
    if wrapper.is_none() {
        Ok(format!("{fallback}.{method}"))
    } else {
        Ok(format!("{}.{method}", wrapper.get_type().name()?))
    }
}

/// `core._call_connection_lost`, named after `wrapper`'s class (`fallback` without one).
pub(crate) fn connection_lost_callback<'py>(
    core: &Bound<'py, PyAny>,
    wrapper: &Bound<'py, PyAny>,
    fallback: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let callback = CallConnectionLost {
        method: core
            .getattr(pyo3::intern!(core.py(), "_call_connection_lost"))?
            .unbind(),
        qualname: method_qualname(wrapper, fallback, "_call_connection_lost")?,
    };
    Ok(Bound::new(core.py(), callback)?.into_any())
}
