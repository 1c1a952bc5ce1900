//! CPython glue. The only place raw `pyo3::ffi` is used.

pub mod context;
pub mod fastcall;
pub mod handle;
pub mod stream_reader;
pub mod thread_exit;
pub mod transport_type;

use std::cell::UnsafeCell;

use pyo3::prelude::*;

// NOTE: the extension module is declared `gil_used` (PyO3's default), so importing it on
//       a free-threaded build turns the GIL back on; `GilCell` relies on that.

/// A value that only the thread holding the GIL may touch.
///
/// Loop state is mutated by Python-visible methods that may be called from any thread
/// (`call_soon_threadsafe`, `is_running`, ...), always with the GIL held: the GIL is the
/// lock, as it is for asyncio's own deque. Closures passed to [`GilCell::with`] must do
/// pure Rust work only: no Python calls, no Python allocation, and no dropping of Python
/// references (return them instead), so no other thread and no re-entrant call can run
/// while the borrow is alive.
pub struct GilCell<T>(UnsafeCell<T>);

// SAFETY: access requires a `Python` token (the GIL is held; on free-threaded builds the
// module re-enables the GIL, see the note above) and the closure contract above rules out re-entrancy, so at most one
// `&mut T` exists at a time, on whichever thread holds the GIL. `T: Send` because that
// thread may differ between calls.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    pub const fn new(value: T) -> Self {
        GilCell(UnsafeCell::new(value))
    }

    /// Runs `f` with exclusive access. See the type's contract on what `f` may do.
    #[inline(always)]
    pub fn with<R>(&self, _py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: the GIL is held (token) and `f` cannot re-enter (contract above).
        f(unsafe { &mut *self.0.get() })
    }

    /// Shared access for the cycle collector's `__traverse__`, which runs with the GIL
    /// held but without a token.
    ///
    /// # Safety
    /// The caller must hold the GIL and must not be inside [`GilCell::with`]; the garbage
    /// collector only runs from Python allocations, which `with` closures never make.
    pub unsafe fn get_unchecked(&self) -> &T {
        // SAFETY: guaranteed by the caller (see above).
        unsafe { &*self.0.get() }
    }
}

/// `PyErr_CheckSignals`: runs pending Python-level signal handlers (on the main thread)
/// and returns the exception one of them raised (KeyboardInterrupt for Ctrl+C).
#[inline(always)]
pub fn check_signals(py: Python<'_>) -> PyResult<()> {
    // SAFETY: called with the GIL held (token).
    if unsafe { pyo3::ffi::PyErr_CheckSignals() } < 0 {
        return Err(PyErr::fetch(py));
    }
    Ok(())
}

/// `threading.get_ident()` of the calling thread.
#[inline]
pub fn thread_ident() -> u64 {
    // SAFETY: no preconditions; returns the current thread's identifier.
    unsafe { pyo3::ffi::PyThread_get_thread_ident() as u64 }
}

/// `contextvars.copy_context()`.
#[inline]
pub fn copy_context(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    // SAFETY: GIL held; a NULL return means an exception is set and is fetched.
    unsafe {
        let ctx = pyo3::ffi::PyContext_CopyCurrent();
        Bound::from_owned_ptr_or_err(py, ctx)
    }
}

/// A tuple of the `n` objects at `items` (new references); the empty tuple for none.
///
/// # Safety
/// `items[..n]` are live objects.
#[inline]
pub unsafe fn tuple_from<'py>(
    py: Python<'py>,
    items: *const *mut pyo3::ffi::PyObject,
    n: usize,
) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
    use pyo3::ffi;
    // SAFETY: see the contract; a new tuple's items are filled before it is used.
    unsafe {
        let t = Bound::from_owned_ptr_or_err(py, ffi::PyTuple_New(n as ffi::Py_ssize_t))?;
        for i in 0..n {
            let item = *items.add(i);
            ffi::Py_INCREF(item);
            ffi::PyTuple_SET_ITEM(t.as_ptr(), i as ffi::Py_ssize_t, item);
        }
        Ok(t.cast_into_unchecked())
    }
}

/// `callable(obj)`.
#[inline]
pub fn is_callable(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: `obj` is a live object and the GIL is held (it is bound).
    unsafe { pyo3::ffi::PyCallable_Check(obj.as_ptr()) != 0 }
}

/// A module attribute imported once and cached: `import_attr!(py, "asyncio.events", "Handle")`.
macro_rules! import_attr {
    ($py:expr, $module:literal, $attr:literal) => {{
        static CELL: pyo3::sync::PyOnceLock<pyo3::Py<pyo3::PyAny>> = pyo3::sync::PyOnceLock::new();
        CELL.get_or_try_init($py, || -> pyo3::PyResult<pyo3::Py<pyo3::PyAny>> {
            Ok($py.import($module)?.getattr($attr)?.unbind())
        })
        .map(|o| o.bind($py))
    }};
}
pub(crate) use import_attr;

/// asyncio's logger, looked up at each use as asyncio's own code does (`base_events.logger`
/// is what tests and applications patch).
/// `loop.call_exception_handler(context)` with `exc` as the exception being handled
/// (`sys.exc_info()`), as asyncio calls it from the `except` block that caught `exc`: a
/// custom handler's `logger.exception()` or `traceback.print_exc()` shows it, and an
/// error the handler raises has it as its `__context__`.
pub fn call_exception_handler_for(
    lp: &Bound<'_, PyAny>,
    context: &Bound<'_, pyo3::types::PyDict>,
    exc: &Bound<'_, pyo3::exceptions::PyBaseException>,
) -> PyResult<()> {
    let py = lp.py();
    // SAFETY: GIL held. PyErr_GetExcInfo returns new references (or NULL) that
    // PyErr_SetExcInfo steals back when they are restored; the exception's type and
    // traceback are new references PyErr_SetExcInfo steals (3.11+ uses the value alone).
    unsafe {
        use pyo3::ffi;
        let (mut t, mut v, mut tb) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        ffi::PyErr_GetExcInfo(&mut t, &mut v, &mut tb);
        let value = exc.as_ptr();
        ffi::PyErr_SetExcInfo(
            ffi::Py_NewRef(ffi::Py_TYPE(value).cast()),
            ffi::Py_NewRef(value),
            ffi::PyException_GetTraceback(value),
        );
        let r = lp.call_method1(pyo3::intern!(py, "call_exception_handler"), (context,));
        ffi::PyErr_SetExcInfo(t, v, tb);
        r.map(drop)
    }
}

pub fn asyncio_logger(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    import_attr!(py, "asyncio", "base_events")?.getattr("logger")
}

/// The running interpreter's `(major, minor)`, read once (`Python::version_info` parses
/// the version string on every call).
pub fn version(py: Python<'_>) -> (u8, u8) {
    static VERSION: std::sync::OnceLock<(u8, u8)> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let v = py.version_info();
        (v.major, v.minor)
    })
}

/// Python 3.11 gives a new instance of a class with a managed dict (the loop:
/// `asyncio.AbstractEventLoop` has no `__slots__`) an array of inline attribute values,
/// and every attribute lookup on the instance that the class does not answer with a data
/// descriptor probes it, C Task's `loop.call_soon` for every step among them. An instance
/// without values and without a dict skips that probe, the state of any instance whose
/// type allocated it without `object.__new__`, and 3.11 still specialises method loads
/// on it (LOAD_METHOD_WITH_VALUES checks only that there is no dict). If `obj` has no
/// instance attributes, this puts it in that state: `_PyObject_GetDictPtr` (documented C
/// API) turns the values into a dict, which is released if it is empty. An attribute set
/// later makes a dict as usual. callgrind, 3.11: 5,080 -> 5,008 instructions per
/// sleep(0) switch, 19,145 -> 18,800 per gathered task. Not done elsewhere: 3.10 has no
/// inline values, 3.12 stops specialising Python code's method loads on an instance
/// without them, and 3.13 embeds them in the object.
pub fn shed_empty_instance_values(obj: &Bound<'_, PyAny>) {
    unsafe extern "C" {
        fn _PyObject_GetDictPtr(obj: *mut pyo3::ffi::PyObject) -> *mut *mut pyo3::ffi::PyObject;
    }
    /// `Py_TPFLAGS_MANAGED_DICT` on 3.11.
    const MANAGED_DICT: std::os::raw::c_ulong = 1 << 4;
    if version(obj.py()) != (3, 11) {
        return;
    }
    // SAFETY: GIL held. `_PyObject_GetDictPtr` returns the address of the instance's
    // dict slot (NULL, without an exception, if it has none or materializing failed);
    // a dict found there is owned by the slot, and an empty one is released and the
    // slot cleared, as CPython clears it for an instance with no attributes.
    unsafe {
        use pyo3::ffi;
        let tp = ffi::Py_TYPE(obj.as_ptr());
        if (*tp).tp_flags & MANAGED_DICT == 0 {
            return;
        }
        let slot = _PyObject_GetDictPtr(obj.as_ptr());
        if slot.is_null() {
            return;
        }
        let dict = *slot;
        if !dict.is_null() && ffi::PyDict_Check(dict) != 0 && ffi::PyDict_Size(dict) == 0 {
            *slot = std::ptr::null_mut();
            ffi::Py_DECREF(dict);
        }
    }
}

/// Whether this is a free-threaded build (`Py_GIL_DISABLED`); true if unknown.
pub fn free_threaded(py: Python<'_>) -> bool {
    py.import("sysconfig")
        .and_then(|m| m.call_method1("get_config_var", ("Py_GIL_DISABLED",)))
        .and_then(|v| v.is_truthy())
        .unwrap_or(true)
}

/// A read-only, C-contiguous byte view of any buffer-protocol object (`PyBUF_SIMPLE`,
/// what `socket.send` asks for); released on drop.
///
/// An exact `bytes` object is viewed directly (it is immutable and its storage is
/// inline): no `Py_buffer` is allocated. The heap-allocated `Py_buffer` of the general
/// case is a small malloc chunk whose free makes glibc consolidate its fast bins at the
/// next large allocation, which showed up as ~5% of a UDP echo's user time.
pub struct ByteView {
    inner: ViewInner,
}

enum ViewInner {
    /// A strong reference keeps the bytes (and so `ptr`) alive.
    Bytes {
        _owner: Py<PyAny>,
        ptr: *const u8,
        len: usize,
    },
    Buffer(Box<pyo3::ffi::Py_buffer>),
}

impl ByteView {
    /// Fails with the object's own TypeError ("a bytes-like object is required, ...").
    pub fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        // SAFETY: GIL held (bound object). For exact bytes the pointer and size come from
        // the object we keep a reference to. Otherwise a zeroed Py_buffer is a valid
        // out-parameter; on success CPython fills it and we release it exactly once in
        // Drop.
        unsafe {
            if pyo3::ffi::PyBytes_CheckExact(obj.as_ptr()) != 0 {
                let ptr = pyo3::ffi::PyBytes_AsString(obj.as_ptr()) as *const u8;
                let len = pyo3::ffi::PyBytes_Size(obj.as_ptr()) as usize;
                return Ok(ByteView {
                    inner: ViewInner::Bytes {
                        _owner: obj.clone().unbind(),
                        ptr,
                        len,
                    },
                });
            }
            let mut view: Box<pyo3::ffi::Py_buffer> = Box::new(std::mem::zeroed());
            if pyo3::ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, pyo3::ffi::PyBUF_SIMPLE) < 0
            {
                return Err(PyErr::fetch(obj.py()));
            }
            Ok(ByteView {
                inner: ViewInner::Buffer(view),
            })
        }
    }

    pub fn len(&self) -> usize {
        match &self.inner {
            ViewInner::Bytes { len, .. } => *len,
            ViewInner::Buffer(view) => view.len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        match &self.inner {
            ViewInner::Bytes { ptr, .. } => *ptr,
            ViewInner::Buffer(view) => view.buf as *const u8,
        }
    }
}

impl Drop for ByteView {
    fn drop(&mut self) {
        if let ViewInner::Buffer(view) = &mut self.inner {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer; views are
            // only created and dropped with the GIL held.
            unsafe { pyo3::ffi::PyBuffer_Release(&mut **view) };
        }
    }
}

/// A writable, C-contiguous byte view (`PyBUF_WRITABLE`, what `socket.recv_into` asks
/// for); released on drop.
pub struct WritableView {
    view: Box<pyo3::ffi::Py_buffer>,
}

impl WritableView {
    pub fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        // SAFETY: as ByteView::new, with a writable request.
        unsafe {
            let mut view: Box<pyo3::ffi::Py_buffer> = Box::new(std::mem::zeroed());
            if pyo3::ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, pyo3::ffi::PyBUF_WRITABLE)
                < 0
            {
                return Err(PyErr::fetch(obj.py()));
            }
            Ok(WritableView { view })
        }
    }

    pub fn len(&self) -> usize {
        self.view.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.view.buf as *mut u8
    }
}

impl Drop for WritableView {
    fn drop(&mut self) {
        // SAFETY: filled by a successful PyObject_GetBuffer; released once, GIL held.
        unsafe { pyo3::ffi::PyBuffer_Release(&mut *self.view) };
    }
}

/// Runs the body of a hand-written C entry point: a Rust panic becomes a Python
/// `PanicException` instead of unwinding into C (which would abort the process), and an
/// error is restored as the pending exception with a NULL return.
pub fn guard(
    py: Python<'_>,
    f: impl FnOnce() -> PyResult<*mut pyo3::ffi::PyObject>,
) -> *mut pyo3::ffi::PyObject {
    // Any of these may be called from a thread that finalization ends (see thread_exit).
    thread_exit::register();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(panic_error(payload)));
    match res {
        Ok(p) => p,
        Err(e) => {
            e.restore(py);
            std::ptr::null_mut()
        }
    }
}

/// A caught Rust panic as a Python `PanicException` carrying the panic message.
pub fn panic_error(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "Rust panic in the event loop".to_string());
    pyo3::panic::PanicException::new_err(msg)
}

/// asyncio's "coroutines cannot be used" test: `iscoroutine(obj) or
/// iscoroutinefunction(obj)`.
pub fn is_coroutine_or_function(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = obj.py();
    let iscoro = import_attr!(py, "asyncio.coroutines", "iscoroutine")?;
    Ok(
        iscoro.call1((obj,))?.is_truthy()?
            || iscoroutinefunction(py)?.call1((obj,))?.is_truthy()?,
    )
}

/// `asyncio.coroutines.iscoroutinefunction` without the deprecation warning Python 3.14
/// attaches to it (3.14's asyncio uses the private `_iscoroutinefunction`).
fn iscoroutinefunction(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static CELL: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    CELL.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        let m = py.import("asyncio.coroutines")?;
        Ok(match m.getattr("_iscoroutinefunction") {
            Ok(f) => f.unbind(),
            Err(_) => m.getattr("iscoroutinefunction")?.unbind(),
        })
    })
    .map(|o| o.bind(py))
}
