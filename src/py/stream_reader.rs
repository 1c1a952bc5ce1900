//! `asyncio.streams.StreamReaderProtocol.data_received` and `StreamReader.feed_data` done
//! natively for the stdlib's own, unmodified classes.
//!
//! A stream transport whose protocol is asyncio's `StreamReaderProtocol` (what
//! `asyncio.start_server` and `open_connection` make) hands every read to
//! `data_received`, which runs four Python frames (`data_received`, the `_stream_reader`
//! property, `feed_data`, `_wakeup_waiter`) to append the bytes to the reader's
//! `bytearray` and wake the task waiting in `read()`. [`data_received`] does the same
//! steps, in the same order, on the same attributes, with the same calls to the waiter
//! and the transport, without those frames.
//!
//! It stands in only where running the Python code could not differ:
//! - the protocol and the reader are exact instances of the two stdlib classes, whose
//!   methods are asyncio.streams' own and name the attributes, locals and constant this
//!   mirrors (checked once, at import: a Python whose streams code names others never
//!   takes this path);
//! - the methods the instances would run are those functions: nothing replaced them on
//!   the class or the instance (`mock.patch.object` included), checked on every call;
//! - no `sys.settrace` / `sys.setprofile` function is set, whose events would show the
//!   frames (a debugger's breakpoint in `feed_data`). A hook set from C without a Python
//!   object (yappi) is not seen, and its profile shows the time in the transport.
//!
//! Anything else is left to Python. Exceptions propagate exactly where the Python code
//! would raise them, so the transport reports them as a failing `data_received`.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::PyNotImplementedError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyString, PyTuple, PyType};

use super::import_attr;

/// `int _PyObject_GetMethod(PyObject *obj, PyObject *name, PyObject **method)`: what
/// `obj.name(...)` calls. 1 with the plain function found on the type when no instance
/// attribute shadows it; 0 with the attribute otherwise (NULL and an exception if none).
type GetMethod =
    unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject, *mut *mut ffi::PyObject) -> i32;

/// The stdlib objects stood in for, compared by identity at every call.
struct Stdlib {
    protocol_type: Py<PyType>,
    reader_type: Py<PyType>,
    data_received: Py<PyAny>,
    stream_reader: Py<PyAny>,
    feed_data: Py<PyAny>,
    wakeup_waiter: Py<PyAny>,
    get_method: GetMethod,
}

/// What each mirrored function's code object names, as on CPython 3.10-3.13: a Python
/// whose streams code differs (other names, locals or constants) keeps running its own.
const MIRRORED: [(&str, &str, &[&str], &[&str]); 4] = [
    (
        "StreamReaderProtocol",
        "data_received",
        &["_stream_reader", "feed_data"],
        &["self", "data", "reader"],
    ),
    (
        "StreamReaderProtocol",
        "_stream_reader",
        &["_stream_reader_wr"],
        &["self"],
    ),
    (
        "StreamReader",
        "feed_data",
        &[
            "_eof",
            "_buffer",
            "extend",
            "_wakeup_waiter",
            "_transport",
            "_paused",
            "len",
            "_limit",
            "pause_reading",
            "NotImplementedError",
        ],
        &["self", "data"],
    ),
    (
        "StreamReader",
        "_wakeup_waiter",
        &["_waiter", "cancelled", "set_result"],
        &["self", "waiter"],
    ),
];

fn names_are(code: &Bound<'_, PyAny>, attr: &str, want: &[&str]) -> PyResult<bool> {
    let got = code.getattr(attr)?;
    let got = got.cast::<PyTuple>()?;
    if got.len() != want.len() {
        return Ok(false);
    }
    for (g, w) in got.iter().zip(want) {
        if g.cast::<PyString>()?.to_cow()? != *w {
            return Ok(false);
        }
    }
    Ok(true)
}

fn load(py: Python<'_>) -> PyResult<Option<Stdlib>> {
    let get_method = crate::sys::process_symbol(c"_PyObject_GetMethod");
    if get_method.is_null() {
        return Ok(None);
    }
    let streams = py.import("asyncio.streams")?;
    for (class, name, names, varnames) in MIRRORED {
        // `_stream_reader` is a property: its getter's code.
        let attr = streams.getattr(class)?.getattr(name)?;
        let func = match attr.getattr("fget") {
            Ok(fget) => fget,
            Err(_) => attr,
        };
        let qualname = func.getattr("__qualname__")?;
        if func.getattr("__module__")?.ne("asyncio.streams")?
            || qualname.ne(format!("{class}.{name}"))?
        {
            return Ok(None);
        }
        let code = func.getattr("__code__")?;
        if !names_are(&code, "co_names", names)? || !names_are(&code, "co_varnames", varnames)? {
            return Ok(None);
        }
    }
    // feed_data's one number: the pause threshold is twice the limit.
    let consts = streams
        .getattr("StreamReader")?
        .getattr("feed_data")?
        .getattr("__code__")?
        .getattr("co_consts")?;
    if !consts.contains(2)? {
        return Ok(None);
    }
    let protocol_type = streams
        .getattr("StreamReaderProtocol")?
        .cast_into::<PyType>()?;
    let reader_type = streams.getattr("StreamReader")?.cast_into::<PyType>()?;
    // SAFETY: the symbol is CPython's `_PyObject_GetMethod`, exported with this signature
    // by every CPython 3.10-3.13 (checked above to be present).
    let get_method = unsafe { std::mem::transmute::<*mut c_void, GetMethod>(get_method) };
    Ok(Some(Stdlib {
        data_received: protocol_type.getattr("data_received")?.unbind(),
        stream_reader: protocol_type.getattr("_stream_reader")?.unbind(),
        feed_data: reader_type.getattr("feed_data")?.unbind(),
        wakeup_waiter: reader_type.getattr("_wakeup_waiter")?.unbind(),
        protocol_type: protocol_type.unbind(),
        reader_type: reader_type.unbind(),
        get_method,
    }))
}

static STDLIB: PyOnceLock<Option<Stdlib>> = PyOnceLock::new();

fn stdlib(py: Python<'_>) -> Option<&Stdlib> {
    // A failure to load (asyncio.streams broken or replaced) only turns the path off.
    STDLIB.get_or_init(py, || load(py).unwrap_or(None)).as_ref()
}

/// Captures the stdlib functions at import, before a test or an application could have
/// patched one of them (which would turn the path off for good).
pub fn init(py: Python<'_>) {
    stdlib(py);
}

impl Stdlib {
    /// Whether `obj.name(...)` would call `func` itself: `obj`'s class (one of the two
    /// stdlib classes) has the generic attribute lookup and `func` under that name, and
    /// no instance attribute shadows it. Runs no Python code: a replaced
    /// `__getattribute__`, or a descriptor in the function's place, is only compared.
    #[inline]
    fn runs(
        &self,
        obj: &Bound<'_, PyAny>,
        name: &Bound<'_, PyString>,
        func: &Py<PyAny>,
    ) -> PyResult<bool> {
        let py = obj.py();
        // SAFETY: GIL held; `obj`, its type and `name` are live. `_PyType_Lookup`'s
        // borrowed result is only compared. With the function found on the type,
        // `_PyObject_GetMethod` only looks in the instance's attributes and gives a new
        // reference in `meth`, or NULL with an exception set.
        unsafe {
            let tp = ffi::Py_TYPE(obj.as_ptr());
            let generic = (*tp).tp_getattro.is_some_and(|f| {
                std::ptr::fn_addr_eq(f, ffi::PyObject_GenericGetAttr as ffi::getattrofunc)
            });
            if !generic || _PyType_Lookup(tp, name.as_ptr()) != func.as_ptr() {
                return Ok(false);
            }
            let mut meth: *mut ffi::PyObject = std::ptr::null_mut();
            let unbound = (self.get_method)(obj.as_ptr(), name.as_ptr(), &mut meth);
            if meth.is_null() {
                return Err(PyErr::fetch(py));
            }
            let same = unbound == 1 && meth == func.as_ptr();
            ffi::Py_DECREF(meth);
            Ok(same)
        }
    }
}

unsafe extern "C" {
    /// CPython's type attribute lookup along the MRO (borrowed result or NULL, no
    /// exception set); private but exported by every CPython this supports.
    fn _PyType_Lookup(tp: *mut ffi::PyTypeObject, name: *mut ffi::PyObject) -> *mut ffi::PyObject;
}

/// Whether a trace or profile function (a debugger, a profiler) would see the frames.
/// A hook installed from C without a Python object (yappi's) is not seen here.
fn traced(py: Python<'_>) -> PyResult<bool> {
    let gettrace = import_attr!(py, "sys", "gettrace")?;
    let getprofile = import_attr!(py, "sys", "getprofile")?;
    Ok(!gettrace.call0()?.is_none() || !getprofile.call0()?.is_none())
}

/// `protocol.data_received(data)` for an unmodified `asyncio.StreamReaderProtocol`, or
/// `None` when the Python method has to run (see the module comment).
// DEVIATION(asyncio): the four Python functions do not run, so a sys.monitoring tool
//       (3.12+) sees no events from them and a traceback raised inside has no
//       streams.py frames; trace and profile functions turn this path off.
#[inline]
pub fn data_received(
    protocol: &Bound<'_, PyAny>,
    data: &Bound<'_, PyBytes>,
) -> Option<PyResult<()>> {
    let py = protocol.py();
    let s = stdlib(py)?;
    if !protocol.get_type().is(s.protocol_type.bind(py)) {
        return None;
    }
    match s.runs(
        protocol,
        pyo3::intern!(py, "data_received"),
        &s.data_received,
    ) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => return Some(Err(e)),
    }
    match traced(py) {
        Ok(false) => {}
        Ok(true) => return None,
        Err(e) => return Some(Err(e)),
    }
    // SAFETY: GIL held; the type and the interned names are live; the borrowed results
    // are only compared. The property is the stdlib's, and no class attribute named
    // `_stream_reader_wr` exists: the instance's is the one the property reads (twice
    // in Python; once here, which nothing can tell apart).
    let class_ok = unsafe {
        let tp = s.protocol_type.bind(py).as_type_ptr();
        _PyType_Lookup(tp, pyo3::intern!(py, "_stream_reader").as_ptr()) == s.stream_reader.as_ptr()
            && _PyType_Lookup(tp, pyo3::intern!(py, "_stream_reader_wr").as_ptr()).is_null()
    };
    if !class_ok {
        return None;
    }
    Some(protocol_data_received(s, protocol, data))
}

/// The body of `StreamReaderProtocol.data_received` and its `_stream_reader` property.
fn protocol_data_received(
    s: &Stdlib,
    protocol: &Bound<'_, PyAny>,
    data: &Bound<'_, PyBytes>,
) -> PyResult<()> {
    let py = protocol.py();
    let wr = protocol.getattr(pyo3::intern!(py, "_stream_reader_wr"))?;
    if wr.is_none() {
        return Ok(());
    }
    // SAFETY: GIL held; PyWeakref_CheckRefExact only reads the type.
    let reader = if unsafe { ffi::PyWeakref_CheckRefExact(wr.as_ptr()) } != 0 {
        let mut obj: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: `wr` is a live weak reference; `obj` receives a new reference, or NULL
        // for a dead referent (0) or an error (-1, exception set).
        match unsafe { ffi::compat::PyWeakref_GetRef(wr.as_ptr(), &mut obj) } {
            -1 => return Err(PyErr::fetch(py)),
            // SAFETY: a new reference, owned from here.
            _ if !obj.is_null() => unsafe { Bound::from_owned_ptr(py, obj) },
            _ => return Ok(()),
        }
    } else {
        wr.call0()?
    };
    if reader.is_none() {
        return Ok(());
    }
    let feed_data = pyo3::intern!(py, "feed_data");
    if !reader.get_type().is(s.reader_type.bind(py)) || !s.runs(&reader, feed_data, &s.feed_data)? {
        return reader.call_method1(feed_data, (data,)).map(drop);
    }
    // `assert not self._eof`: the Python method raises it, with its frame in the
    // traceback. (Under -O the assertion is compiled out, `_eof` is not among
    // feed_data's names, and this path is never taken.)
    if reader.getattr(pyo3::intern!(py, "_eof"))?.is_truthy()? {
        return reader.call_method1(feed_data, (data,)).map(drop);
    }
    feed_data_body(s, &reader, data)
}

/// Reads fed to a `StreamReader` here instead of by its Python methods, in this process.
static FED: AtomicU64 = AtomicU64::new(0);

/// `_streams_fed_natively()`: how many reads this process fed to asyncio's
/// `StreamReader`s without running `StreamReaderProtocol.data_received` (for tests).
#[pyo3::pyfunction]
pub fn _streams_fed_natively() -> u64 {
    FED.load(Ordering::Relaxed)
}

/// `StreamReader.feed_data` after its assertion.
fn feed_data_body(
    s: &Stdlib,
    reader: &Bound<'_, PyAny>,
    data: &Bound<'_, PyBytes>,
) -> PyResult<()> {
    let py = reader.py();
    FED.fetch_add(1, Ordering::Relaxed);
    if data.as_bytes().is_empty() {
        return Ok(());
    }
    let buffer_name = pyo3::intern!(py, "_buffer");
    let buffer = reader.getattr(buffer_name)?;
    extend(&buffer, data)?;
    // self._wakeup_waiter()
    let wakeup = pyo3::intern!(py, "_wakeup_waiter");
    if s.runs(reader, wakeup, &s.wakeup_waiter)? {
        let waiter_name = pyo3::intern!(py, "_waiter");
        let waiter = reader.getattr(waiter_name)?;
        if !waiter.is_none() {
            reader.setattr(waiter_name, py.None())?;
            if !waiter
                .call_method0(pyo3::intern!(py, "cancelled"))?
                .is_truthy()?
            {
                waiter.call_method1(pyo3::intern!(py, "set_result"), (py.None(),))?;
            }
        }
    } else {
        reader.call_method0(wakeup)?;
    }
    // if (self._transport is not None and not self._paused and
    //         len(self._buffer) > 2 * self._limit):
    let transport_name = pyo3::intern!(py, "_transport");
    let transport = reader.getattr(transport_name)?;
    if transport.is_none() || reader.getattr(pyo3::intern!(py, "_paused"))?.is_truthy()? {
        return Ok(());
    }
    let len = reader.getattr(buffer_name)?.len()?;
    let limit = reader.getattr(pyo3::intern!(py, "_limit"))?;
    // An exact int compares as a number (its extraction runs no `__index__`); anything
    // else as Python computes `len(...) > 2 * limit`.
    let small = if limit.is_exact_instance_of::<pyo3::types::PyInt>() {
        limit.extract::<i64>().ok()
    } else {
        None
    };
    let over = match small {
        Some(l) => len as i128 > 2 * l as i128,
        None => len
            .into_pyobject(py)?
            .gt(2i64.into_pyobject(py)?.mul(&limit)?)?,
    };
    if !over {
        return Ok(());
    }
    // `self._transport.pause_reading()` reads the attribute again.
    let transport = reader.getattr(transport_name)?;
    match transport.call_method0(pyo3::intern!(py, "pause_reading")) {
        Ok(_) => reader.setattr(pyo3::intern!(py, "_paused"), true),
        // The transport can't be paused: forget it, as asyncio does.
        Err(e) if e.is_instance_of::<PyNotImplementedError>(py) => {
            reader.setattr(transport_name, py.None())
        }
        Err(e) => Err(e),
    }
}

/// `buffer.extend(data)`: a `bytearray` grown in place (the same growth and the same
/// `BufferError` while a view of it is exported), anything else through its method.
fn extend(buffer: &Bound<'_, PyAny>, data: &Bound<'_, PyBytes>) -> PyResult<()> {
    let py = buffer.py();
    // SAFETY: GIL held; PyByteArray_CheckExact only reads the type.
    if unsafe { ffi::PyByteArray_CheckExact(buffer.as_ptr()) } == 0 {
        return buffer
            .call_method1(pyo3::intern!(py, "extend"), (data,))
            .map(drop);
    }
    let bytes = data.as_bytes();
    // SAFETY: `buffer` is an exact bytearray. PyByteArray_Resize grows it to hold the
    // old size plus `bytes` (or fails with an exception set and leaves it unchanged);
    // the new tail is then written from `bytes`, which cannot overlap it.
    unsafe {
        let old = ffi::PyByteArray_Size(buffer.as_ptr());
        let Some(new) = old.checked_add(bytes.len() as ffi::Py_ssize_t) else {
            return Err(pyo3::exceptions::PyMemoryError::new_err(()));
        };
        if ffi::PyByteArray_Resize(buffer.as_ptr(), new) < 0 {
            return Err(PyErr::fetch(py));
        }
        let dst = ffi::PyByteArray_AsString(buffer.as_ptr())
            .cast::<u8>()
            .add(old as usize);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
    }
    Ok(())
}
