//! Transports as real `asyncio.Transport` (and friends) instances.
//!
//! A transport's state and behaviour live in a Rust pyclass (its "core"); what protocols,
//! servers and user code hold is a thin native heap type whose base is asyncio's class
//! (`asyncio.Transport`, `asyncio.ReadTransport`, `asyncio.WriteTransport`,
//! `asyncio.DatagramTransport`), so `isinstance` checks and `get_extra_info` (which reads
//! asyncio's `_extra` slot) work. Its methods forward, by vectorcall, to the core's method
//! of the same name. Instances also have a `__dict__` and weak-reference support, as
//! asyncio's transports (plain Python classes) do.

use std::ffi::{CStr, c_int, c_void};
use std::ptr;

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple, PyType};

/// Storage the wrapper adds after its asyncio base: the core, `__dict__`, `__weakref__`.
#[repr(C)]
struct Tail {
    core: *mut ffi::PyObject,
    dict: *mut ffi::PyObject,
    weaklist: *mut ffi::PyObject,
}

/// One wrapper class: its type object and where its `Tail` starts.
pub struct WrapperType {
    tp: Py<PyType>,
    tail: isize,
}

/// A forwarded method: its Python name and the generated C entry point.
pub struct Forward {
    pub name: &'static CStr,
    pub func: ffi::PyCFunctionFastWithKeywords,
}

/// A method's name as an interned Python string, made on first use: the forwarder looks
/// the core's method up by it on every call.
pub struct MethodName {
    text: &'static str,
    cell: pyo3::sync::PyOnceLock<Py<PyString>>,
}

impl MethodName {
    pub const fn new(text: &'static str) -> Self {
        MethodName {
            text,
            cell: pyo3::sync::PyOnceLock::new(),
        }
    }

    fn get<'py>(&self, py: Python<'py>) -> &Bound<'py, PyString> {
        self.cell
            .get_or_init(py, || PyString::intern(py, self.text).unbind())
            .bind(py)
    }
}

/// Declares `unsafe extern "C" fn $func(slf, args, nargsf, kwnames)`, a
/// METH_FASTCALL|METH_KEYWORDS method of the wrapper types, whose body runs in an
/// `unsafe` block with the four arguments under the names given.
macro_rules! wrapper_method {
    ($(#[$doc:meta])* $func:ident, |$slf:ident, $args:ident, $nargsf:ident, $kwnames:ident| { $($body:tt)* }) => {
        $(#[$doc])*
        unsafe extern "C" fn $func(
            $slf: *mut pyo3::ffi::PyObject,
            $args: *const *mut pyo3::ffi::PyObject,
            $nargsf: pyo3::ffi::Py_ssize_t,
            $kwnames: *mut pyo3::ffi::PyObject,
        ) -> *mut pyo3::ffi::PyObject {
            // SAFETY: installed as a METH_FASTCALL|METH_KEYWORDS method of the wrapper
            // types the body is written for, so CPython passes one of them and a valid
            // vectorcall frame.
            unsafe { $($body)* }
        }
    };
}
pub(crate) use wrapper_method;

/// Declares C entry points that forward a wrapper method to its core, and the table
/// listing them.
macro_rules! forward_methods {
    ($table:ident: $($name:ident),* $(,)?) => {
        pub static $table: &[$crate::py::transport_type::Forward] = &[
            $({
                $crate::py::transport_type::wrapper_method!($name, |slf, args, nargsf, kwnames| {
                    static NAME: $crate::py::transport_type::MethodName =
                        $crate::py::transport_type::MethodName::new(stringify!($name));
                    $crate::py::transport_type::forward(slf, &NAME, args, nargsf, kwnames)
                });
                $crate::py::transport_type::Forward {
                    name: match std::ffi::CStr::from_bytes_with_nul(
                        concat!(stringify!($name), "\0").as_bytes(),
                    ) {
                        Ok(s) => s,
                        Err(_) => panic!("method name"),
                    },
                    func: $name,
                }
            }),*
        ];
    };
}
pub(crate) use forward_methods;

/// The signature (asyncio's parameter names, for `inspect.signature`) and summary of a
/// public transport method.
fn method_doc(name: &CStr) -> Option<&'static CStr> {
    const DOCS: &[(&CStr, &CStr)] = &[
        (c"write", c"write($self, data)\n--\n\nWrite some data bytes to the transport."),
        (c"writelines", c"writelines($self, list_of_data)\n--\n\nWrite a list (or any iterable) of data bytes to the transport."),
        (c"write_eof", c"write_eof($self)\n--\n\nClose the write end after flushing buffered data."),
        (c"can_write_eof", c"can_write_eof($self)\n--\n\nReturn True if this transport supports write_eof()."),
        (c"get_write_buffer_size", c"get_write_buffer_size($self)\n--\n\nReturn the current size of the write buffer."),
        (c"get_write_buffer_limits", c"get_write_buffer_limits($self)\n--\n\nReturn (low, high): the write flow control marks."),
        (c"set_write_buffer_limits", c"set_write_buffer_limits($self, high=None, low=None)\n--\n\nSet the high- and low-water limits for write flow control."),
        (c"pause_reading", c"pause_reading($self)\n--\n\nPause the receiving end."),
        (c"resume_reading", c"resume_reading($self)\n--\n\nResume the receiving end."),
        (c"is_reading", c"is_reading($self)\n--\n\nReturn True if the transport is receiving."),
        (c"close", c"close($self)\n--\n\nClose the transport (buffered data is flushed first)."),
        (c"abort", c"abort($self)\n--\n\nClose the transport immediately (buffered data is lost)."),
        (c"is_closing", c"is_closing($self)\n--\n\nReturn True if the transport is closing or closed."),
        (c"get_protocol", c"get_protocol($self)\n--\n\nReturn the current protocol."),
        (c"set_protocol", c"set_protocol($self, protocol)\n--\n\nSet a new protocol."),
        (c"sendto", c"sendto($self, data, addr=None)\n--\n\nSend data to addr (the connected peer if None)."),
    ];
    DOCS.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

/// Byte offset of the tail: right after the base's own storage, pointer-aligned.
fn tail_offset(base: &Bound<'_, PyType>) -> isize {
    // SAFETY: reading a live type object's basic size.
    let size = unsafe { (*base.as_type_ptr()).tp_basicsize };
    let align = std::mem::align_of::<*mut ffi::PyObject>() as isize;
    (size + align - 1) / align * align
}

/// Creates a wrapper class `name` with bases `bases` (asyncio classes sharing
/// `BaseTransport`'s layout; the first one's size is used) forwarding `methods` to the core.
/// With `lazy_extra`, `get_extra_info` and `_extra` also ask the core (`_lazy_extra`) for
/// entries it has not put in `_extra` yet (see `lazy_get_extra_info`).
pub fn make_type(
    bases: &[Bound<'_, PyType>],
    name: &'static CStr,
    doc: &'static CStr,
    methods: &'static [Forward],
    direct: &[Forward],
    lazy_extra: bool,
) -> PyResult<WrapperType> {
    let base = &bases[0];
    let py = base.py();
    let tail = tail_offset(base);
    // A `direct` entry replaces the forwarder of the same name: a hand-written entry point
    // that calls the core's Rust method without a Python-level method call.
    let pick = |m: &Forward| -> ffi::PyCFunctionFastWithKeywords {
        direct
            .iter()
            .find(|d| d.name == m.name)
            .map_or(m.func, |d| d.func)
    };
    let mut defs: Vec<ffi::PyMethodDef> = methods
        .iter()
        .map(|m| ffi::PyMethodDef {
            ml_name: m.name.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFastWithKeywords: pick(m),
            },
            ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
            ml_doc: method_doc(m.name).map_or(ptr::null(), CStr::as_ptr),
        })
        .collect();
    if lazy_extra {
        defs.push(ffi::PyMethodDef {
            ml_name: c"get_extra_info".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFastWithKeywords: lazy_get_extra_info,
            },
            ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
            ml_doc: c"get_extra_info($self, name, default=None)\n--\n\nGet optional transport information.".as_ptr(),
        });
    }
    defs.push(ffi::PyMethodDef::zeroed());
    // NOTE: everything handed to PyType_FromSpecWithBases is leaked: CPython keeps
    //       pointers into the method and member tables for the life of the type (the
    //       process), and the types are created once, at module initialisation.
    let defs: &'static mut [ffi::PyMethodDef] = Box::leak(defs.into_boxed_slice());
    let member = |name: &'static CStr, off: isize| ffi::PyMemberDef {
        name: name.as_ptr(),
        type_code: ffi::Py_T_PYSSIZET,
        offset: off,
        flags: ffi::Py_READONLY,
        doc: ptr::null(),
    };
    let members: &'static mut [ffi::PyMemberDef] = Box::leak(Box::new([
        member(
            c"__dictoffset__",
            tail + std::mem::offset_of!(Tail, dict) as isize,
        ),
        member(
            c"__weaklistoffset__",
            tail + std::mem::offset_of!(Tail, weaklist) as isize,
        ),
        ffi::PyMemberDef {
            name: ptr::null(),
            type_code: 0,
            offset: 0,
            flags: 0,
            doc: ptr::null(),
        },
    ]));
    let mut getset = vec![ffi::PyGetSetDef {
        name: c"__dict__".as_ptr(),
        get: Some(ffi::PyObject_GenericGetDict),
        set: Some(ffi::PyObject_GenericSetDict),
        doc: ptr::null(),
        closure: ptr::null_mut(),
    }];
    if lazy_extra {
        getset.push(ffi::PyGetSetDef {
            name: c"_extra".as_ptr(),
            get: Some(lazy_extra_get),
            set: Some(lazy_extra_set),
            doc: ptr::null(),
            closure: ptr::null_mut(),
        });
    }
    getset.push(ffi::PyGetSetDef {
        name: ptr::null(),
        get: None,
        set: None,
        doc: ptr::null(),
        closure: ptr::null_mut(),
    });
    let getset: &'static mut [ffi::PyGetSetDef] = Box::leak(getset.into_boxed_slice());
    let slot = |slot: c_int, pfunc: *mut c_void| ffi::PyType_Slot { slot, pfunc };
    let slots: &'static mut [ffi::PyType_Slot] = Box::leak(Box::new([
        slot(ffi::Py_tp_dealloc, wrapper_dealloc as *mut c_void),
        slot(ffi::Py_tp_traverse, wrapper_traverse as *mut c_void),
        slot(ffi::Py_tp_clear, wrapper_clear as *mut c_void),
        slot(ffi::Py_tp_finalize, wrapper_finalize as *mut c_void),
        slot(ffi::Py_tp_repr, wrapper_repr as *mut c_void),
        slot(ffi::Py_tp_methods, defs.as_mut_ptr() as *mut c_void),
        slot(ffi::Py_tp_members, members.as_mut_ptr() as *mut c_void),
        slot(ffi::Py_tp_getset, getset.as_mut_ptr() as *mut c_void),
        slot(ffi::Py_tp_doc, doc.as_ptr() as *mut c_void),
        slot(0, ptr::null_mut()),
    ]));
    let spec: &'static mut ffi::PyType_Spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: name.as_ptr(),
        basicsize: (tail + std::mem::size_of::<Tail>() as isize) as c_int,
        itemsize: 0,
        // Only the loop creates transports (Py_TPFLAGS_DISALLOW_INSTANTIATION), so every
        // instance has a core. Not subclassable: the layout is fixed.
        flags: (ffi::Py_TPFLAGS_DEFAULT
            | ffi::Py_TPFLAGS_HAVE_GC
            | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION) as _,
        slots: slots.as_mut_ptr(),
    }));
    let bases = PyTuple::new(py, bases)?;
    // SAFETY: the spec and everything it points to are 'static (leaked above); NULL means
    // an exception is set.
    let tp = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpecWithBases(spec, bases.as_ptr()))?
    };
    Ok(WrapperType {
        tp: tp.cast_into::<PyType>()?.unbind(),
        tail,
    })
}

/// The tail of a wrapper instance.
///
/// # Safety
/// `obj` is a live instance of a wrapper type whose tail starts at `tail`.
#[inline(always)]
unsafe fn tail_of(obj: *mut ffi::PyObject, tail: isize) -> *mut Tail {
    // SAFETY: guaranteed by the caller.
    unsafe { (obj as *mut u8).offset(tail) as *mut Tail }
}

/// The tail offset of `obj`'s type, which must be one of ours.
///
/// # Safety
/// `obj` is a live instance of a wrapper type; GIL held.
unsafe fn tail_for(obj: *mut ffi::PyObject) -> isize {
    // NOTE: every wrapper's tail follows its base's storage, so the offset is recomputed
    //       from the type: the instance's basic size minus the tail's size.
    // SAFETY: guaranteed by the caller.
    unsafe { (*ffi::Py_TYPE(obj)).tp_basicsize - std::mem::size_of::<Tail>() as isize }
}

impl WrapperType {
    /// A new wrapper around `core`, with asyncio's `_extra` set to `extra` (left empty
    /// for a transport whose `get_extra_info` fills it on demand).
    pub fn wrap<'py>(
        &self,
        core: &Bound<'py, PyAny>,
        extra: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = core.py();
        // SAFETY: tp_alloc (PyType_GenericAlloc) returns a zeroed instance, already tracked
        // by the collector (or NULL with an exception); NULL fields are skipped by
        // traverse, and the fields are filled before any Python code can run.
        let obj = unsafe {
            let tp = self.tp.as_ptr() as *mut ffi::PyTypeObject;
            let alloc = (*tp).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc);
            let obj = alloc(tp, 0);
            if obj.is_null() {
                return Err(PyErr::fetch(py));
            }
            (*tail_of(obj, self.tail)).core = core.clone().into_ptr();
            // Python 3.11 specialises `transport.write(...)` and every other method load
            // on an instance with a dict slot only once the dict exists
            // (LOAD_METHOD_WITH_DICT); with the slot empty the load stays generic and
            // binds a method object per call. 3.12+ specialise the empty slot, and stop
            // specialising once a dict exists, so the dict is made on 3.11 only.
            if super::version(py) == (3, 11) {
                let dict = ffi::PyDict_New();
                if dict.is_null() {
                    ffi::Py_DECREF(obj);
                    return Err(PyErr::fetch(py));
                }
                (*tail_of(obj, self.tail)).dict = dict;
            }
            if let Some(extra) = extra {
                *extra_slot(obj) = extra.clone().into_ptr();
            }
            Bound::from_owned_ptr(py, obj)
        };
        Ok(obj)
    }

    pub fn type_object<'py>(&self, py: Python<'py>) -> &Bound<'py, PyType> {
        self.tp.bind(py)
    }
}

/// The core behind a wrapper instance.
///
/// # Safety
/// `slf` is a live instance of a wrapper type; GIL held.
pub unsafe fn core_of(py: Python<'_>, slf: *mut ffi::PyObject) -> PyResult<Bound<'_, PyAny>> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let core = (*tail_of(slf, tail_for(slf))).core;
        if core.is_null() {
            return Err(PyRuntimeError::new_err("the transport has been cleared"));
        }
        Ok(Bound::from_borrowed_ptr(py, core))
    }
}

/// Forwards `wrapper.name(*args, **kwargs)` to `core.name(*args, **kwargs)`.
///
/// # Safety
/// Called by CPython as a METH_FASTCALL|METH_KEYWORDS method of a wrapper type.
pub unsafe fn forward(
    slf: *mut ffi::PyObject,
    name: &'static MethodName,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: see the function's contract: `args` holds `nargs` positional arguments
    // followed by one value per keyword name.
    unsafe {
        let py = Python::assume_attached();
        super::guard(py, || {
            let core = core_of(py, slf)?;
            let nargs = ffi::PyVectorcall_NARGS(nargsf as usize);
            let nkw = if kwnames.is_null() {
                0
            } else {
                ffi::PyTuple_GET_SIZE(kwnames)
            };
            let total = (nargs + nkw) as usize;
            let mut stack: [*mut ffi::PyObject; 8] = [ptr::null_mut(); 8];
            let mut heap: Vec<*mut ffi::PyObject>;
            let frame: &mut [*mut ffi::PyObject] = if total < stack.len() {
                &mut stack[..total + 1]
            } else {
                heap = vec![ptr::null_mut(); total + 1];
                &mut heap[..]
            };
            frame[0] = core.as_ptr();
            for i in 0..total {
                frame[i + 1] = *args.add(i);
            }
            let name = name.get(py);
            let r = ffi::PyObject_VectorcallMethod(
                name.as_ptr(),
                frame.as_ptr(),
                nargs as usize + 1,
                kwnames,
            );
            if r.is_null() {
                Err(PyErr::fetch(py))
            } else {
                Ok(r)
            }
        })
    }
}

unsafe extern "C" fn wrapper_repr(slf: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: installed as tp_repr of the wrapper types.
    unsafe {
        let py = Python::assume_attached();
        super::guard(py, || {
            let core = core_of(py, slf)?;
            let tp = Bound::from_borrowed_ptr(py, ffi::Py_TYPE(slf) as *mut ffi::PyObject)
                .cast_into::<PyType>()?;
            let name = tp.name()?;
            Ok(core
                .call_method1(pyo3::intern!(py, "_repr"), (name,))?
                .into_ptr())
        })
    }
}

/// `__del__`: asyncio's transports warn about (and close) a socket or pipe that was never
/// closed. The core does that; an error is reported as unraisable, as `__del__`'s are.
unsafe extern "C" fn wrapper_finalize(slf: *mut ffi::PyObject) {
    // SAFETY: installed as tp_finalize; CPython calls it with the GIL held on a live
    // instance. The pending exception is saved and restored with the raw API (PyO3's
    // `PyErr::take` would turn a pending PanicException back into a panic, and nothing may
    // unwind out of this function: panics are caught).
    unsafe {
        let py = Python::assume_attached();
        let (mut t, mut v, mut tb) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
        ffi::PyErr_Fetch(&mut t, &mut v, &mut tb);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Ok(core) = core_of(py, slf) {
                let wrapper = Bound::from_borrowed_ptr(py, slf);
                let r = ffi::PyObject_CallMethodOneArg(
                    core.as_ptr(),
                    pyo3::intern!(py, "_finalize").as_ptr(),
                    wrapper.as_ptr(),
                );
                if r.is_null() {
                    ffi::PyErr_WriteUnraisable(core.as_ptr());
                } else {
                    ffi::Py_DECREF(r);
                }
            }
        }));
        ffi::PyErr_Restore(t, v, tb);
    }
}

unsafe extern "C" fn wrapper_traverse(
    slf: *mut ffi::PyObject,
    visit: ffi::visitproc,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: called by the collector on a live wrapper instance: the tail and the base's
    // `_extra` slot. (The base's own tp_traverse, CPython's subtype_traverse, must not be
    // called: it starts from the instance's type, which would recurse into this one.)
    unsafe {
        let t = tail_of(slf, tail_for(slf));
        for p in [(*t).core, (*t).dict] {
            if !p.is_null() {
                let r = visit(p, arg);
                if r != 0 {
                    return r;
                }
            }
        }
        let extra = *extra_slot(slf);
        if !extra.is_null() {
            let r = visit(extra, arg);
            if r != 0 {
                return r;
            }
        }
        visit(ffi::Py_TYPE(slf) as *mut ffi::PyObject, arg)
    }
}

/// Drops the tail's references and the base's `_extra` slot.
///
/// # Safety
/// `slf` is a live wrapper instance; GIL held.
unsafe fn clear(slf: *mut ffi::PyObject) {
    // SAFETY: see above; each field is set to NULL before its old value is released.
    unsafe {
        let t = tail_of(slf, tail_for(slf));
        for p in [
            ptr::addr_of_mut!((*t).core),
            ptr::addr_of_mut!((*t).dict),
            extra_slot(slf),
        ] {
            let old = *p;
            if !old.is_null() {
                *p = ptr::null_mut();
                ffi::Py_DECREF(old);
            }
        }
    }
}

/// The loop's `_transports` entry for `slf` goes before its core may (see
/// `transports::TransportRef`).
///
/// # Safety
/// `slf` is a live wrapper instance; GIL held, outside any `GilCell::with`.
unsafe fn unregister(slf: *mut ffi::PyObject) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let core = (*tail_of(slf, tail_for(slf))).core;
        if !core.is_null() {
            crate::transports::wrapper_cleared(Python::assume_attached(), core, slf);
        }
    }
}

unsafe extern "C" fn wrapper_clear(slf: *mut ffi::PyObject) -> c_int {
    // SAFETY: called by the collector on a live instance with the GIL held.
    unsafe {
        unregister(slf);
        clear(slf);
    }
    0
}

unsafe extern "C" fn wrapper_dealloc(slf: *mut ffi::PyObject) {
    // SAFETY: called by CPython when an instance's refcount drops to zero (GIL held). As
    // subtype_dealloc: run the finalizer (it may resurrect), untrack, clear weak
    // references, release the references, free, and drop the reference to the heap type.
    unsafe {
        let tp = ffi::Py_TYPE(slf);
        if ffi::PyObject_CallFinalizerFromDealloc(slf) < 0 {
            return; // resurrected
        }
        ffi::PyObject_GC_UnTrack(slf.cast());
        let t = tail_of(slf, tail_for(slf));
        if !(*t).weaklist.is_null() {
            ffi::PyObject_ClearWeakRefs(slf);
        }
        // Normally a no-op: the core let go of the wrapper after removing its entry.
        unregister(slf);
        clear(slf);
        let free = (*tp).tp_free.unwrap_or(ffi::PyObject_GC_Del);
        free(slf.cast());
        ffi::Py_DECREF(tp.cast());
    }
}

/// The `_extra` dict of a lazy-extra wrapper, created empty if it has none yet.
///
/// # Safety
/// `slf` is a live wrapper instance; GIL held.
unsafe fn extra_dict(py: Python<'_>, slf: *mut ffi::PyObject) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let slot = extra_slot(slf);
        if (*slot).is_null() {
            *slot = pyo3::types::PyDict::new(py).into_ptr();
        }
        Ok(*slot)
    }
}

/// `name` from `_extra`, or else from the core's `_lazy_extra(name)` (a 1-tuple with the
/// value, or None when the core has nothing by that name), which is then kept in `_extra`.
///
/// # Safety
/// `slf` is a live lazy-extra wrapper instance; GIL held.
unsafe fn lazy_lookup<'py>(
    py: Python<'py>,
    slf: *mut ffi::PyObject,
    name: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    // As asyncio's `self._extra.get(name, default)`: an unhashable name is a TypeError,
    // also while `_extra` does not exist yet.
    name.hash()?;
    // SAFETY: guaranteed by the caller; the dict lookup returns a borrowed reference.
    unsafe {
        let d = *extra_slot(slf);
        if !d.is_null() {
            let v = ffi::PyDict_GetItemWithError(d, name.as_ptr());
            if !v.is_null() {
                return Ok(Some(Bound::from_borrowed_ptr(py, v)));
            }
            if !ffi::PyErr_Occurred().is_null() {
                return Err(PyErr::fetch(py));
            }
        }
        let core = core_of(py, slf)?;
        let found = core.call_method1(pyo3::intern!(py, "_lazy_extra"), (name,))?;
        if found.is_none() {
            return Ok(None);
        }
        let value = found.get_item(0)?;
        let d = extra_dict(py, slf)?;
        if ffi::PyDict_SetItem(d, name.as_ptr(), value.as_ptr()) < 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(Some(value))
    }
}

/// `get_extra_info(name, default=None)` of a lazy-extra wrapper.
unsafe extern "C" fn lazy_get_extra_info(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_FASTCALL|METH_KEYWORDS method of a lazy-extra wrapper
    // type: `slf` is an instance and `args` holds the positional then keyword values.
    unsafe {
        let py = Python::assume_attached();
        super::guard(py, || {
            let nargs = ffi::PyVectorcall_NARGS(nargsf as usize) as usize;
            let nkw = if kwnames.is_null() {
                0
            } else {
                ffi::PyTuple_GET_SIZE(kwnames) as usize
            };
            let argv = std::slice::from_raw_parts(args, nargs + nkw);
            let mut params: [Option<Bound<'_, PyAny>>; 2] = [None, None];
            if nargs > 2 {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "get_extra_info() takes from 2 to 3 positional arguments but {} were given",
                    nargs + 1
                )));
            }
            for (i, p) in argv[..nargs].iter().enumerate() {
                params[i] = Some(Bound::from_borrowed_ptr(py, *p));
            }
            for (k, p) in argv[nargs..].iter().enumerate() {
                let key = Bound::from_borrowed_ptr(py, ffi::PyTuple_GET_ITEM(kwnames, k as _));
                let key: String = key.extract()?;
                let i = match key.as_str() {
                    "name" => 0,
                    "default" => 1,
                    other => {
                        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                            "get_extra_info() got an unexpected keyword argument '{other}'"
                        )));
                    }
                };
                if params[i].is_some() {
                    return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                        "get_extra_info() got multiple values for argument '{key}'"
                    )));
                }
                params[i] = Some(Bound::from_borrowed_ptr(py, *p));
            }
            let [name, default] = params;
            let Some(name) = name else {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "get_extra_info() missing 1 required positional argument: 'name'",
                ));
            };
            let value = lazy_lookup(py, slf, &name)?;
            Ok(value
                .or(default)
                .unwrap_or_else(|| py.None().into_bound(py))
                .into_ptr())
        })
    }
}

/// `_extra` of a lazy-extra wrapper: the whole dict, every entry the core knows filled in.
unsafe extern "C" fn lazy_extra_get(
    slf: *mut ffi::PyObject,
    _closure: *mut c_void,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a getter of a lazy-extra wrapper type.
    unsafe {
        let py = Python::assume_attached();
        super::guard(py, || {
            let core = core_of(py, slf)?;
            let names = core.call_method0(pyo3::intern!(py, "_lazy_extra_names"))?;
            for name in names.try_iter()? {
                lazy_lookup(py, slf, &name?)?;
            }
            let d = extra_dict(py, slf)?;
            Ok(ffi::Py_NewRef(d))
        })
    }
}

/// Assigning (or deleting) `_extra` of a lazy-extra wrapper, as the slot allows.
unsafe extern "C" fn lazy_extra_set(
    slf: *mut ffi::PyObject,
    value: *mut ffi::PyObject,
    _closure: *mut c_void,
) -> c_int {
    // SAFETY: installed as a setter of a lazy-extra wrapper type; GIL held.
    unsafe {
        let slot = extra_slot(slf);
        let old = *slot;
        *slot = if value.is_null() {
            ptr::null_mut()
        } else {
            ffi::Py_NewRef(value)
        };
        if !old.is_null() {
            ffi::Py_DECREF(old);
        }
        0
    }
}

/// Offset of asyncio's `BaseTransport._extra` slot, found once.
static EXTRA_OFFSET: std::sync::OnceLock<isize> = std::sync::OnceLock::new();

/// Records where `BaseTransport` keeps `_extra`. Called at module initialisation, before
/// any wrapper type is created.
pub fn init(py: Python<'_>) -> PyResult<()> {
    let base = py
        .import("asyncio.transports")?
        .getattr("BaseTransport")?
        .cast_into::<PyType>()?;
    let off = super::handle::slot_offset(&base, "_extra")?;
    let _ = EXTRA_OFFSET.set(off);
    Ok(())
}

/// The `_extra` slot of a wrapper instance.
///
/// # Safety
/// `obj` is a live wrapper instance (whose bases all derive from BaseTransport) and
/// `init` has run (wrapper types exist only after it).
#[inline(always)]
unsafe fn extra_slot(obj: *mut ffi::PyObject) -> *mut *mut ffi::PyObject {
    let off = EXTRA_OFFSET.get().copied().unwrap_or(0);
    debug_assert!(off > 0);
    // SAFETY: guaranteed by the caller.
    unsafe { (obj as *mut u8).offset(off) as *mut *mut ffi::PyObject }
}
