//! Handles as real `asyncio.Handle` / `asyncio.TimerHandle` instances, built and run from Rust.
//!
//! ferroloop's `Handle` and `TimerHandle` are Python subclasses of asyncio's with
//! `__slots__ = ()`, so their instances have exactly asyncio's layout. The loop allocates
//! them with `tp_alloc` and fills asyncio's slots directly (found through the slots'
//! member descriptors), then runs them by reading those slots: no `__init__`, no
//! `Context.run` argument tuple. `cancel` is replaced by a C method for speed; every other
//! method is asyncio's own.

use std::ffi::c_char;
use std::ptr;
use std::sync::OnceLock;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyTuple, PyType};

/// Byte offsets of asyncio's handle slots.
struct Offsets {
    callback: isize,
    args: isize,
    cancelled: isize,
    loop_: isize,
    source_traceback: isize,
    repr: isize,
    context: isize,
    scheduled: isize,
    when: isize,
}

/// The handle classes and their layout, set once when `ferroloop` is imported.
pub struct HandleTypes {
    handle: Py<PyType>,
    timer: Py<PyType>,
    off: Offsets,
}

static TYPES: OnceLock<HandleTypes> = OnceLock::new();

/// The installed handle classes; an error before `ferroloop` has installed them.
#[inline]
pub fn types() -> PyResult<&'static HandleTypes> {
    TYPES
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("ferroloop handle types are not installed"))
}

fn slot_offset(cls: &Bound<'_, PyType>, name: &str) -> PyResult<isize> {
    let descr = cls.getattr(name)?;
    // SAFETY: `descr` is live; the type check comes first and only then is it read as a
    // member descriptor, whose `d_member` points to the static PyMemberDef of the slot
    // (on Python 3.10 pyo3 types the field as PyGetSetDef; the pointee is a PyMemberDef).
    unsafe {
        let tp = ptr::addr_of_mut!(ffi::PyMemberDescr_Type);
        if ffi::Py_TYPE(descr.as_ptr()) != tp {
            return Err(PyTypeError::new_err(format!(
                "{}.{name} is not a slot",
                cls.name()?
            )));
        }
        let member = (*(descr.as_ptr() as *mut ffi::PyMemberDescrObject)).d_member
            as *const ffi::PyMemberDef;
        if (*member).type_code != ffi::Py_T_OBJECT_EX {
            return Err(PyTypeError::new_err(format!(
                "{}.{name} has an unexpected slot type",
                cls.name()?
            )));
        }
        Ok((*member).offset)
    }
}

fn basicsize(cls: &Bound<'_, PyType>) -> isize {
    // SAFETY: a live type object; reading its basic size.
    unsafe { (*cls.as_type_ptr()).tp_basicsize }
}

/// Installs `handle_cls` / `timer_cls` (subclasses of asyncio's with no extra slots) as
/// the classes the loop instantiates, and gives both a native `cancel`.
pub fn install(handle_cls: &Bound<'_, PyType>, timer_cls: &Bound<'_, PyType>) -> PyResult<()> {
    let py = handle_cls.py();
    if TYPES.get().is_some() {
        return Ok(());
    }
    let events = py.import("asyncio.events")?;
    let base_handle = events.getattr("Handle")?.cast_into::<PyType>()?;
    let base_timer = events.getattr("TimerHandle")?.cast_into::<PyType>()?;
    if !handle_cls.is_subclass(&base_handle)? || !timer_cls.is_subclass(&base_timer)? {
        return Err(PyTypeError::new_err(
            "handle classes must subclass asyncio.Handle and asyncio.TimerHandle",
        ));
    }
    if basicsize(handle_cls) != basicsize(&base_handle)
        || basicsize(timer_cls) != basicsize(&base_timer)
    {
        return Err(PyTypeError::new_err(
            "handle classes must not add instance storage (use __slots__ = ())",
        ));
    }
    let off = Offsets {
        callback: slot_offset(&base_handle, "_callback")?,
        args: slot_offset(&base_handle, "_args")?,
        cancelled: slot_offset(&base_handle, "_cancelled")?,
        loop_: slot_offset(&base_handle, "_loop")?,
        source_traceback: slot_offset(&base_handle, "_source_traceback")?,
        repr: slot_offset(&base_handle, "_repr")?,
        context: slot_offset(&base_handle, "_context")?,
        scheduled: slot_offset(&base_timer, "_scheduled")?,
        when: slot_offset(&base_timer, "_when")?,
    };
    for cls in [handle_cls, timer_cls] {
        install_method(cls, c"cancel", handle_cancel, c"Cancel the callback.")?;
    }
    let _ = TYPES.set(HandleTypes {
        handle: handle_cls.clone().unbind(),
        timer: timer_cls.clone().unbind(),
        off,
    });
    Ok(())
}

type NoArgs = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

fn install_method(
    cls: &Bound<'_, PyType>,
    name: &'static std::ffi::CStr,
    f: NoArgs,
    doc: &'static std::ffi::CStr,
) -> PyResult<()> {
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: ffi::PyMethodDefPointer { PyCFunction: f },
        ml_flags: ffi::METH_NOARGS,
        ml_doc: doc.as_ptr() as *const c_char,
    }));
    // SAFETY: `def` is leaked, so it outlives the descriptor; `cls` is a live type.
    // NULL / -1 returns are turned into the pending exception.
    unsafe {
        let descr =
            Bound::from_owned_ptr_or_err(cls.py(), ffi::PyDescr_NewMethod(cls.as_type_ptr(), def))?;
        if ffi::PyObject_SetAttrString(cls.as_ptr(), name.as_ptr(), descr.as_ptr()) < 0 {
            return Err(PyErr::fetch(cls.py()));
        }
    }
    Ok(())
}

/// Native `Handle.cancel` / `TimerHandle.cancel`: asyncio's semantics.
unsafe extern "C" fn handle_cancel(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython with the GIL held; `slf` is an instance of one of the
    // installed classes (the method descriptor checks the type).
    unsafe {
        let py = Python::assume_attached();
        let slf = Bound::from_borrowed_ptr(py, slf);
        match crate::handles::cancel(&slf) {
            Ok(()) => {
                let none = ffi::Py_None();
                ffi::Py_IncRef(none);
                none
            }
            Err(e) => {
                e.restore(py);
                ptr::null_mut()
            }
        }
    }
}

#[inline(always)]
unsafe fn slot_ptr(obj: *mut ffi::PyObject, off: isize) -> *mut *mut ffi::PyObject {
    // SAFETY: the caller guarantees `obj` has asyncio's handle layout and `off` is one of
    // its slot offsets.
    unsafe { (obj as *mut u8).offset(off) as *mut *mut ffi::PyObject }
}

impl HandleTypes {
    /// Allocates a handle (a timer handle when `when` is given) with asyncio's slots set
    /// as `Handle.__init__` / `TimerHandle.__init__` would set them.
    #[inline]
    pub fn new_handle<'py>(
        &self,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        loop_: &Bound<'py, PyAny>,
        context: Bound<'py, PyAny>,
        source_traceback: Option<Bound<'py, PyAny>>,
        when: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = callback.py();
        let tp = if when.is_some() {
            self.timer.as_ptr()
        } else {
            self.handle.as_ptr()
        } as *mut ffi::PyTypeObject;
        // SAFETY: `tp` is one of the installed heap types, whose tp_alloc returns a zeroed,
        // GC-tracked instance or NULL with an exception set. Every slot written is a slot
        // of that layout, each NULL before, and each receives a new reference.
        unsafe {
            let alloc = (*tp).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc);
            let obj = Bound::from_owned_ptr_or_err(py, alloc(tp, 0))?;
            let o = obj.as_ptr();
            let none = ffi::Py_None();
            *slot_ptr(o, self.off.callback) = callback.clone().into_ptr();
            *slot_ptr(o, self.off.args) = args.into_ptr();
            *slot_ptr(o, self.off.cancelled) = new_ref(ffi::Py_False());
            *slot_ptr(o, self.off.loop_) = loop_.clone().into_ptr();
            *slot_ptr(o, self.off.source_traceback) = match source_traceback {
                Some(tb) => tb.into_ptr(),
                None => new_ref(none),
            };
            *slot_ptr(o, self.off.repr) = new_ref(none);
            *slot_ptr(o, self.off.context) = context.into_ptr();
            if let Some(when) = when {
                *slot_ptr(o, self.off.when) = when.into_ptr();
                *slot_ptr(o, self.off.scheduled) = new_ref(ffi::Py_False());
            }
            Ok(obj)
        }
    }

    #[inline(always)]
    fn get(&self, h: &Bound<'_, PyAny>, off: isize) -> *mut ffi::PyObject {
        // SAFETY: every handle reaching here was created by `new_handle` (or is an
        // instance of an installed class, checked by the method descriptor), so `off` is
        // a valid slot offset. Slots may be NULL only if user code deleted them.
        unsafe { *slot_ptr(h.as_ptr(), off) }
    }

    #[inline(always)]
    fn get_bound<'py>(&self, h: &Bound<'py, PyAny>, off: isize) -> Bound<'py, PyAny> {
        let p = self.get(h, off);
        if p.is_null() {
            h.py().None().into_bound(h.py())
        } else {
            // SAFETY: a live object referenced by the slot; a new reference is taken.
            unsafe { Bound::from_borrowed_ptr(h.py(), p) }
        }
    }

    fn set(&self, h: &Bound<'_, PyAny>, off: isize, value: &Bound<'_, PyAny>) {
        // SAFETY: see `get`; the new value is stored before the old one is released, so
        // a finaliser triggered by the release sees a consistent handle.
        unsafe {
            let p = slot_ptr(h.as_ptr(), off);
            let old = *p;
            *p = value.clone().into_ptr();
            ffi::Py_XDECREF(old);
        }
    }

    /// `handle._cancelled`, read without a Python call.
    #[inline(always)]
    pub fn is_cancelled(&self, h: &Bound<'_, PyAny>) -> bool {
        // SAFETY: comparing a pointer against the True singleton.
        self.get(h, self.off.cancelled) == unsafe { ffi::Py_True() }
    }

    pub fn is_timer(&self, h: &Bound<'_, PyAny>) -> bool {
        h.is_instance(self.timer.bind(h.py())).unwrap_or(false)
    }

    #[inline(always)]
    pub fn is_scheduled(&self, h: &Bound<'_, PyAny>) -> bool {
        // SAFETY: comparing a pointer against the True singleton.
        self.get(h, self.off.scheduled) == unsafe { ffi::Py_True() }
    }

    #[inline(always)]
    pub fn set_scheduled(&self, h: &Bound<'_, PyAny>, scheduled: bool) {
        // SAFETY: the bool singletons are immortal or long-lived; `set` takes its own ref.
        let v = unsafe {
            Bound::from_borrowed_ptr(
                h.py(),
                if scheduled {
                    ffi::Py_True()
                } else {
                    ffi::Py_False()
                },
            )
        };
        self.set(h, self.off.scheduled, &v);
    }

    /// `handle._cancelled = True`.
    pub fn set_cancelled(&self, h: &Bound<'_, PyAny>) {
        // SAFETY: the True singleton is live; `set` takes its own reference.
        let t = unsafe { Bound::from_borrowed_ptr(h.py(), ffi::Py_True()) };
        self.set(h, self.off.cancelled, &t);
    }

    /// `handle._repr = value` (debug-mode cancel keeps the repr of the live callback).
    pub fn set_repr(&self, h: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) {
        self.set(h, self.off.repr, value);
    }

    /// `handle._callback = None; handle._args = None`.
    pub fn clear_callback(&self, h: &Bound<'_, PyAny>) {
        let none = h.py().None().into_bound(h.py());
        self.set(h, self.off.callback, &none);
        self.set(h, self.off.args, &none);
    }

    pub fn callback<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.callback)
    }
    pub fn args<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.args)
    }
    pub fn loop_<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.loop_)
    }
    pub fn source_traceback<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.source_traceback)
    }

    /// Runs the handle's callback in its context: `context.run(callback, *args)`.
    #[inline]
    pub fn call(&self, h: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = h.py();
        let (cb, args, ctx) = (
            self.get(h, self.off.callback),
            self.get(h, self.off.args),
            self.get(h, self.off.context),
        );
        if cb.is_null() || args.is_null() || ctx.is_null() {
            return Err(PyRuntimeError::new_err("handle is missing its callback"));
        }
        // SAFETY: GIL held. Strong references are taken for the duration of the call
        // because the callback may cancel its own handle, which clears the slots. Every
        // NULL return is paired with the pending exception fetched below.
        unsafe {
            ffi::Py_IncRef(cb);
            ffi::Py_IncRef(args);
            ffi::Py_IncRef(ctx);
            let res = if ffi::PyContext_Enter(ctx) < 0 {
                ptr::null_mut()
            } else {
                let r = if ffi::PyTuple_CheckExact(args) != 0 {
                    let n = ffi::PyTuple_GET_SIZE(args);
                    let items = ptr::addr_of_mut!((*(args as *mut ffi::PyTupleObject)).ob_item)
                        as *const *mut ffi::PyObject;
                    ffi::PyObject_Vectorcall(cb, items, n as usize, ptr::null_mut())
                } else {
                    ffi::PyObject_Call(cb, args, ptr::null_mut())
                };
                exit_context(ctx, r)
            };
            ffi::Py_DecRef(cb);
            ffi::Py_DecRef(args);
            ffi::Py_DecRef(ctx);
            if res.is_null() {
                return Err(PyErr::fetch(py));
            }
            ffi::Py_DecRef(res);
        }
        Ok(())
    }
}

/// Leaves `ctx` as `Context.run` does: an exit failure replaces the call's result.
unsafe fn exit_context(ctx: *mut ffi::PyObject, r: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: `ctx` was entered by the caller on this thread; GIL held. Exiting a context
    // that this thread entered leaves a pending exception untouched.
    unsafe {
        if ffi::PyContext_Exit(ctx) < 0 {
            ffi::Py_XDECREF(r);
            return ptr::null_mut();
        }
    }
    r
}

#[inline(always)]
unsafe fn new_ref(p: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: `p` is a live object (a singleton here).
    unsafe { ffi::Py_IncRef(p) };
    p
}
