//! Handles as real `asyncio.Handle` / `asyncio.TimerHandle` instances, built and run from Rust.
//!
//! ferroloop's `Handle` and `TimerHandle` are native heap types whose bases are asyncio's
//! classes and which add no storage, so their instances have exactly asyncio's layout
//! (`isinstance(h, asyncio.Handle)` holds and every asyncio method works). The loop fills
//! asyncio's slots directly (found through the slots' member descriptors) instead of
//! calling `__init__`, runs handles by reading those slots, and recycles dead handles
//! through a small free list so scheduling a callback neither mallocs nor counts towards
//! a garbage-collector pass. `cancel`, `cancelled`, `get_context` and `when` are native;
//! everything else is asyncio's own code.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyTuple, PyType};

use super::GilCell;
use super::context::{self, RunContext};

/// asyncio's handle slots, in the order `Offsets::all` keeps them: the first
/// `HANDLE_SLOTS` belong to `asyncio.Handle`, the rest to `asyncio.TimerHandle`.
const SLOT_NAMES: [&str; 9] = [
    "_callback",
    "_args",
    "_cancelled",
    "_loop",
    "_source_traceback",
    "_repr",
    "_context",
    "_scheduled",
    "_when",
];
const CALLBACK: usize = 0;
const ARGS: usize = 1;
const CANCELLED: usize = 2;
const LOOP: usize = 3;
const SOURCE_TRACEBACK: usize = 4;
const REPR: usize = 5;
const CONTEXT: usize = 6;
const SCHEDULED: usize = 7;
const WHEN: usize = 8;

/// How many of `SLOT_NAMES` a plain (non-timer) handle has.
const HANDLE_SLOTS: usize = 7;

/// Which of the two types an instance is: index into free lists and slot tables.
const KIND_HANDLE: usize = 0;
const KIND_TIMER: usize = 1;

/// Byte offsets of asyncio's handle slots.
struct Offsets {
    /// Offset of each of `SLOT_NAMES`.
    all: [isize; 9],
    /// `__weakref__` slot (`tp_weaklistoffset`), 0 if none.
    weaklist: isize,
    /// Whether the weak-reference list can be read at `weaklist` to skip clearing an
    /// empty one: a positive offset (3.10, 3.11), or 3.12/3.13's managed slot in the
    /// pre-header (negative offset, read there by CPython's own
    /// `_PyObject_GET_WEAKREFS_LISTPTR`). Elsewhere `PyObject_ClearWeakRefs` is called.
    weaklist_readable: bool,
}

impl Offsets {
    /// The object slots of a handle of kind `kind`.
    #[inline(always)]
    fn slots(&self, kind: usize) -> &[isize] {
        if kind == KIND_TIMER {
            &self.all
        } else {
            &self.all[..HANDLE_SLOTS]
        }
    }

    #[inline(always)]
    fn of(&self, slot: usize) -> isize {
        self.all[slot]
    }
}

/// The handle classes and their layout, created when the extension module loads.
pub struct HandleTypes {
    handle: Py<PyType>,
    timer: Py<PyType>,
    off: Offsets,
    /// Bytes CPython keeps in front of an instance (the cycle collector's header and, from
    /// 3.11 / 3.12, the managed dict / weakref pre-header), when known: the loop then
    /// allocates handles itself (see `alloc_uncounted`). `None` on builds whose layout is
    /// not known to us.
    presize: Option<usize>,
}

/// The pre-header size of instances of `tp` (a GC type), as CPython's
/// `_PyType_PreHeaderSize` computes it on the versions whose layout we know.
fn gc_presize(py: Python<'_>, tp: *mut ffi::PyTypeObject) -> Option<usize> {
    // Free-threaded builds have no PyGC_Head (and count differently).
    if super::free_threaded(py) {
        return None;
    }
    let version = crate::py::version(py);
    // NOTE: checked on 3.10-3.13 (PYTHONMALLOC=debug stress runs). 3.14 moved the
    //       collector's bookkeeping; it keeps tp_alloc until checked there.
    if !((3, 10)..=(3, 13)).contains(&version) {
        return None;
    }
    // The flags of the type and its bases (a pre-header a base has, its subtypes have).
    let mut flags = 0;
    let mut t = tp;
    while !t.is_null() {
        // SAFETY: a live type and its live base chain.
        unsafe {
            flags |= (*t).tp_flags;
            t = (*t).tp_base;
        }
    }
    // Py_TPFLAGS_MANAGED_WEAKREF (3.12+) and Py_TPFLAGS_MANAGED_DICT (3.11+).
    const MANAGED_WEAKREF: std::ffi::c_ulong = 1 << 3;
    const MANAGED_DICT: std::ffi::c_ulong = 1 << 4;
    let pre_header_flags = match version {
        (3, 10) => 0,
        (3, 11) => MANAGED_DICT,
        _ => MANAGED_DICT | MANAGED_WEAKREF,
    };
    let gc_head = 2 * std::mem::size_of::<usize>();
    let pre_header = if flags & pre_header_flags != 0 {
        2 * std::mem::size_of::<*mut ffi::PyObject>()
    } else {
        0
    };
    Some(gc_head + pre_header)
}

/// A zeroed, untracked instance of `tp` (refcount 1, holding a type reference), allocated
/// as `PyType_GenericAlloc` lays it out but without registering it with the cycle
/// collector's allocation count: handles are untracked, yet each allocation would count
/// towards the next collection, so a burst of handles (100k tasks scheduling their first
/// step) set off collections that only promote unrelated young objects. NULL with
/// MemoryError set on failure.
///
/// # Safety
/// GIL held; `tp` is one of the handle types (no items) and `presize` its pre-header size.
unsafe fn alloc_uncounted(tp: *mut ffi::PyTypeObject, presize: usize) -> *mut ffi::PyObject {
    // SAFETY: see the function's contract; the block is zeroed (an all-zero GC header is
    // an untracked one) before the object header is initialised.
    unsafe {
        let size = (*tp).tp_basicsize as usize;
        let mem = ffi::PyObject_Malloc(presize + size).cast::<u8>();
        if mem.is_null() {
            return ffi::PyErr_NoMemory();
        }
        ptr::write_bytes(mem, 0, presize + size);
        ffi::PyObject_Init(mem.add(presize).cast(), tp)
    }
}

static TYPES: OnceLock<HandleTypes> = OnceLock::new();

/// Dead handles kept for reuse, one list per kind.
struct FreeList([Vec<*mut ffi::PyObject>; 2]);
// SAFETY: the pointers are only touched with the GIL held (through `GilCell`).
unsafe impl Send for FreeList {}
static FREE: GilCell<FreeList> = GilCell::new(FreeList([Vec::new(), Vec::new()]));
/// Free-list capacity per kind while a loop is busy: bounds the memory kept (~100 bytes
/// a handle). A thread calling `call_soon_threadsafe` in a loop queues ~35k handles per
/// GIL switch interval; with 16k, half of them were malloc'd and freed again.
const FREE_MAX: usize = 65536;
/// What the free lists keep once a loop is idle (see `trim_free_lists`).
pub const FREE_IDLE: usize = 4096;

/// Releases free-listed handles beyond `keep` per kind: the loop calls this when
/// `run_forever` returns and after a poll that blocked for a long time, so memory kept
/// for a burst of callbacks is returned once the burst is over.
pub fn trim_free_lists(py: Python<'_>, keep: usize) {
    let Some(t) = TYPES.get() else { return };
    for kind in [KIND_HANDLE, KIND_TIMER] {
        while let Some(o) = FREE.with(py, |f| {
            let list = &mut f.0[kind];
            if list.len() > keep { list.pop() } else { None }
        }) {
            // SAFETY: a free-listed handle: dead (no references), untracked, holding no
            // type reference, allocated as `handle_dealloc` frees it. Its kept slots are
            // released first.
            unsafe {
                clear_slots(t, o, kind);
                match t.presize {
                    Some(pre) => ffi::PyObject_Free(o.cast::<u8>().sub(pre).cast()),
                    None => ffi::PyObject_GC_Del(o.cast()),
                }
            }
        }
        FREE.with(py, |f| {
            let list = &mut f.0[kind];
            if list.capacity() > 2 * keep.max(16) {
                list.shrink_to(keep);
            }
        });
    }
}

/// The handle classes; an error if module initialisation did not create them.
#[inline]
pub fn types() -> PyResult<&'static HandleTypes> {
    TYPES
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("ferroloop handle types are not initialised"))
}

pub(crate) fn slot_offset(cls: &Bound<'_, PyType>, name: &str) -> PyResult<isize> {
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

type NoArgs = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

/// A METH_NOARGS method; `doc` starts with its text signature (`name($self, /)`), which
/// `inspect.signature()` needs before Python 3.13.
fn method(name: &'static CStr, f: NoArgs, doc: &'static CStr) -> ffi::PyMethodDef {
    ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: ffi::PyMethodDefPointer { PyCFunction: f },
        ml_flags: ffi::METH_NOARGS,
        ml_doc: doc.as_ptr() as *const c_char,
    }
}

/// Creates `ferroloop.Handle(asyncio.Handle)` or `ferroloop.TimerHandle(asyncio.TimerHandle)`.
fn make_type(
    base: &Bound<'_, PyType>,
    name: &'static CStr,
    doc: &'static CStr,
    timer: bool,
) -> PyResult<Py<PyType>> {
    let py = base.py();
    let mut methods = vec![
        method(
            c"cancel",
            handle_cancel,
            c"cancel($self, /)\n--\n\nCancel the callback.",
        ),
        method(
            c"cancelled",
            handle_cancelled,
            c"cancelled($self, /)\n--\n\nWhether the callback was cancelled.",
        ),
        method(
            c"get_context",
            handle_get_context,
            c"get_context($self, /)\n--\n\nThe contextvars.Context the callback runs in.",
        ),
    ];
    if timer {
        methods.push(method(
            c"when",
            handle_when,
            c"when($self, /)\n--\n\nThe absolute time (loop clock) the callback is scheduled for.",
        ));
    }
    methods.push(ffi::PyMethodDef::zeroed());
    // NOTE: the spec, slots and method table are leaked: CPython keeps pointers into the
    //       method table for the lifetime of the type, which lives as long as the process.
    let methods: &'static mut [ffi::PyMethodDef] = Box::leak(methods.into_boxed_slice());
    let getset: &'static mut [ffi::PyGetSetDef] = Box::leak(Box::new([
        ffi::PyGetSetDef {
            name: c"_context".as_ptr(),
            get: Some(handle_context_get),
            set: Some(handle_context_set),
            doc: ptr::null(),
            closure: ptr::null_mut(),
        },
        ffi::PyGetSetDef {
            name: ptr::null(),
            get: None,
            set: None,
            doc: ptr::null(),
            closure: ptr::null_mut(),
        },
    ]));
    let slots: &'static mut [ffi::PyType_Slot] = Box::leak(Box::new([
        ffi::PyType_Slot {
            slot: ffi::Py_tp_dealloc,
            pfunc: handle_dealloc as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_traverse,
            pfunc: handle_traverse as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_clear,
            pfunc: handle_clear as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_methods,
            pfunc: methods.as_mut_ptr() as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_getset,
            pfunc: getset.as_mut_ptr() as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_doc,
            pfunc: doc.as_ptr() as *mut c_void,
        },
        ffi::PyType_Slot {
            slot: 0,
            pfunc: ptr::null_mut(),
        },
    ]));
    let spec: &'static mut ffi::PyType_Spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: name.as_ptr(),
        // SAFETY: reading the base's basic size; the new type adds no storage.
        basicsize: unsafe { (*base.as_type_ptr()).tp_basicsize } as c_int,
        itemsize: 0,
        // DEVIATION(asyncio): ferroloop.Handle / TimerHandle cannot be subclassed, so
        //   every instance has exactly this layout and can be recycled through the free
        //   list. asyncio.Handle itself stays subclassable; only the loop creates these.
        flags: (ffi::Py_TPFLAGS_DEFAULT | ffi::Py_TPFLAGS_HAVE_GC) as _,
        slots: slots.as_mut_ptr(),
    }));
    let bases = PyTuple::new(py, [base])?;
    // SAFETY: the spec and everything it points to are leaked ('static); a NULL return
    // means an exception is set, which `from_owned_ptr_or_err` fetches.
    let tp = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpecWithBases(spec, bases.as_ptr()))?
    };
    Ok(tp.cast_into::<PyType>()?.unbind())
}

/// Creates the handle types and records asyncio's slot layout. Called once from module
/// initialisation.
pub fn init(py: Python<'_>) -> PyResult<(Py<PyType>, Py<PyType>)> {
    if let Some(t) = TYPES.get() {
        return Ok((t.handle.clone_ref(py), t.timer.clone_ref(py)));
    }
    let events = py.import("asyncio.events")?;
    let base_handle = events.getattr("Handle")?.cast_into::<PyType>()?;
    let base_timer = events.getattr("TimerHandle")?.cast_into::<PyType>()?;
    // SAFETY: reading a live type's weak-reference slot offset.
    let weaklist = unsafe { (*base_handle.as_type_ptr()).tp_weaklistoffset };
    let mut all = [0isize; 9];
    for (i, name) in SLOT_NAMES.iter().enumerate() {
        let cls = if i < HANDLE_SLOTS {
            &base_handle
        } else {
            &base_timer
        };
        all[i] = slot_offset(cls, name)?;
    }
    let weaklist_readable = weaklist > 0
        || (weaklist < 0
            && !super::free_threaded(py)
            && ((3, 12)..=(3, 13)).contains(&crate::py::version(py)));
    let off = Offsets {
        all,
        weaklist,
        weaklist_readable,
    };
    let handle = make_type(
        &base_handle,
        c"ferroloop.Handle",
        c"A callback scheduled with call_soon() (an asyncio.Handle).",
        false,
    )?;
    let timer = make_type(
        &base_timer,
        c"ferroloop.TimerHandle",
        c"A callback scheduled with call_later() / call_at() (an asyncio.TimerHandle).",
        true,
    )?;
    let presize = gc_presize(py, handle.bind(py).as_type_ptr());
    if presize != gc_presize(py, timer.bind(py).as_type_ptr()) {
        return Err(PyRuntimeError::new_err(
            "ferroloop: Handle and TimerHandle have different layouts",
        ));
    }
    let _ = TYPES.set(HandleTypes {
        handle: handle.clone_ref(py),
        timer: timer.clone_ref(py),
        off,
        presize,
    });
    Ok((handle, timer))
}

/// Runs `f` on a method's `self`, turning its result or error into a C return value.
///
/// # Safety
/// Must be called by CPython as a method of one of the handle types (GIL held, `slf`
/// an instance of that type).
unsafe fn with_handle(
    slf: *mut ffi::PyObject,
    f: impl FnOnce(&HandleTypes, &Bound<'_, PyAny>) -> PyResult<Py<PyAny>>,
) -> *mut ffi::PyObject {
    // SAFETY: see the function's contract.
    unsafe {
        let py = Python::assume_attached();
        let slf = Bound::from_borrowed_ptr(py, slf);
        super::guard(py, || types().and_then(|t| f(t, &slf)).map(Py::into_ptr))
    }
}

/// Native `Handle.cancel` / `TimerHandle.cancel`: asyncio's semantics.
unsafe extern "C" fn handle_cancel(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of the handle types.
    unsafe {
        with_handle(slf, |_, h| {
            crate::handles::cancel(h)?;
            Ok(h.py().None())
        })
    }
}

unsafe extern "C" fn handle_cancelled(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of the handle types.
    unsafe {
        with_handle(slf, |t, h| {
            Ok(pyo3::types::PyBool::new(h.py(), t.is_cancelled(h))
                .to_owned()
                .into_any()
                .unbind())
        })
    }
}

unsafe extern "C" fn handle_get_context(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of the handle types.
    unsafe {
        with_handle(slf, |t, h| {
            t.context_for_caller(h)?;
            Ok(t.get_bound(h, t.off.of(CONTEXT)).unbind())
        })
    }
}

/// `handle._context` on ferroloop's handles (shadowing asyncio's slot descriptor, same
/// slot): a captured mapping reads as the handle's own `Context`.
unsafe extern "C" fn handle_context_get(
    slf: *mut ffi::PyObject,
    _closure: *mut c_void,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a getter of the handle types.
    unsafe {
        with_handle(slf, |t, h| {
            let p = t.context_for_caller(h)?;
            if p.is_null() {
                return Err(pyo3::exceptions::PyAttributeError::new_err("_context"));
            }
            Ok(Bound::from_borrowed_ptr(h.py(), p).unbind())
        })
    }
}

unsafe extern "C" fn handle_context_set(
    slf: *mut ffi::PyObject,
    value: *mut ffi::PyObject,
    _closure: *mut c_void,
) -> c_int {
    // SAFETY: installed as a setter of the handle types (GIL held, `slf` an instance);
    // `value` is NULL for `del`. The new reference is stored before the old one goes.
    unsafe {
        let Some(t) = TYPES.get() else {
            ffi::PyErr_SetString(
                ffi::PyExc_RuntimeError,
                c"ferroloop handle types are not initialised".as_ptr(),
            );
            return -1;
        };
        let p = slot_ptr(slf, t.off.of(CONTEXT));
        let old = *p;
        if value.is_null() && old.is_null() {
            ffi::PyErr_SetString(ffi::PyExc_AttributeError, c"_context".as_ptr());
            return -1;
        }
        ffi::Py_XINCREF(value);
        *p = value;
        ffi::Py_XDECREF(old);
        0
    }
}

unsafe extern "C" fn handle_when(
    slf: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of the timer handle type only.
    unsafe { with_handle(slf, |t, h| Ok(t.get_bound(h, t.off.of(WHEN)).unbind())) }
}

/// The kind of an instance of one of our types, `None` for any other type.
#[inline(always)]
fn kind_of(t: &HandleTypes, tp: *mut ffi::PyTypeObject) -> Option<usize> {
    if tp == t.handle.as_ptr() as *mut ffi::PyTypeObject {
        Some(KIND_HANDLE)
    } else if tp == t.timer.as_ptr() as *mut ffi::PyTypeObject {
        Some(KIND_TIMER)
    } else {
        None
    }
}

#[inline(always)]
unsafe fn slot_ptr(obj: *mut ffi::PyObject, off: isize) -> *mut *mut ffi::PyObject {
    // SAFETY: the caller guarantees `obj` has asyncio's handle layout and `off` is one of
    // its slot offsets.
    unsafe { (obj as *mut u8).offset(off) as *mut *mut ffi::PyObject }
}

unsafe extern "C" fn handle_traverse(
    slf: *mut ffi::PyObject,
    visit: ffi::visitproc,
    arg: *mut c_void,
) -> c_int {
    let Some(t) = TYPES.get() else { return 0 };
    // SAFETY: called by the collector on a live instance of one of the handle types;
    // every visited pointer is a slot of that layout (NULL slots are skipped). Heap-type
    // instances also visit their type.
    unsafe {
        let kind = kind_of(t, ffi::Py_TYPE(slf)).unwrap_or(KIND_HANDLE);
        for &off in t.off.slots(kind) {
            let p = *slot_ptr(slf, off);
            if !p.is_null() {
                let r = visit(p, arg);
                if r != 0 {
                    return r;
                }
            }
        }
        visit(ffi::Py_TYPE(slf) as *mut ffi::PyObject, arg)
    }
}

/// Releases every object slot (tp_clear and dealloc).
///
/// # Safety
/// `slf` is a live instance of kind `kind`; GIL held.
#[inline(always)]
unsafe fn clear_slots(t: &HandleTypes, slf: *mut ffi::PyObject, kind: usize) {
    // SAFETY: guaranteed by the caller; each slot is set to NULL before its old value is
    // released, so re-entrant code never sees a dangling slot.
    unsafe {
        for &off in t.off.slots(kind) {
            let p = slot_ptr(slf, off);
            let old = *p;
            if !old.is_null() {
                *p = ptr::null_mut();
                ffi::Py_DECREF(old);
            }
        }
    }
}

/// Readies a dead handle for the free list: slots that a new handle almost always sets
/// to the same singleton (`_cancelled` False, `_source_traceback` and `_repr` None) keep
/// or get it, the others are released. On 3.10 / 3.11, where singletons are refcounted,
/// this saves six reference count writes per handle; with `call_soon_threadsafe` those
/// writes bounced the singletons' cache lines between the producing and the running
/// thread. Written out slot by slot (no loop over the table): this runs once per
/// callback, and the unrolled form is ~40 instructions shorter.
///
/// # Safety
/// As `clear_slots`.
#[inline(always)]
unsafe fn clear_slots_for_reuse(t: &HandleTypes, slf: *mut ffi::PyObject, kind: usize) {
    // SAFETY: as `clear_slots`; each slot gets its new value before its old one is
    // released.
    unsafe {
        let release = |slot: usize| {
            let p = slot_ptr(slf, t.off.of(slot));
            let old = *p;
            *p = ptr::null_mut();
            ffi::Py_XDECREF(old);
        };
        let keep = |slot: usize, value: *mut ffi::PyObject| {
            let p = slot_ptr(slf, t.off.of(slot));
            let old = *p;
            if old != value {
                ffi::Py_INCREF(value);
                *p = value;
                ffi::Py_XDECREF(old);
            }
        };
        release(CALLBACK);
        release(ARGS);
        release(LOOP);
        release(CONTEXT);
        keep(CANCELLED, ffi::Py_False());
        keep(SOURCE_TRACEBACK, ffi::Py_None());
        keep(REPR, ffi::Py_None());
        if kind == KIND_TIMER {
            release(SCHEDULED);
            release(WHEN);
        }
    }
}
// The function above names every slot: a new one must be added there too.
const _: () = assert!(SLOT_NAMES.len() == 9 && HANDLE_SLOTS == 7);

unsafe extern "C" fn handle_clear(slf: *mut ffi::PyObject) -> c_int {
    if let Some(t) = TYPES.get() {
        // SAFETY: called by the collector on a live instance with the GIL held.
        unsafe {
            let kind = kind_of(t, ffi::Py_TYPE(slf)).unwrap_or(KIND_HANDLE);
            clear_slots(t, slf, kind);
        }
    }
    0
}

unsafe extern "C" fn handle_dealloc(slf: *mut ffi::PyObject) {
    // SAFETY: called by CPython when the refcount of an instance of one of the handle
    // types drops to zero, with the GIL held. The sequence mirrors subtype_dealloc:
    // untrack, clear weak references, release the slots, then free the memory (or keep
    // it, untracked, on the free list) and drop the instance's reference to its heap type.
    unsafe {
        let tp = ffi::Py_TYPE(slf);
        ffi::PyObject_GC_UnTrack(slf.cast());
        let Some(t) = TYPES.get() else {
            ffi::PyObject_GC_Del(slf.cast());
            ffi::Py_DECREF(tp.cast());
            return;
        };
        // NOTE: from Python 3.12 a `__weakref__` slot lives in the object's pre-header
        //       (negative offset). Where the list can be read (see `Offsets`), an empty
        //       one skips the call.
        let has_weakrefs = if t.off.weaklist_readable {
            !(*slot_ptr(slf, t.off.weaklist)).is_null()
        } else {
            t.off.weaklist != 0
        };
        if has_weakrefs {
            ffi::PyObject_ClearWeakRefs(slf);
        }
        let kind = kind_of(t, tp).unwrap_or(KIND_HANDLE);
        let py = Python::assume_attached();
        let kept = FREE.with(py, |f| f.0[kind].len() < FREE_MAX);
        if kept {
            // Released before the push: a finaliser run by the release may take handles
            // from the list (and may push a few past FREE_MAX, which is harmless).
            clear_slots_for_reuse(t, slf, kind);
            FREE.with(py, |f| f.0[kind].push(slf));
        } else {
            clear_slots(t, slf, kind);
            match t.presize {
                // The block `alloc_uncounted` (or tp_alloc, same layout) made; untracked above.
                Some(pre) => ffi::PyObject_Free(slf.cast::<u8>().sub(pre).cast()),
                None => ffi::PyObject_GC_Del(slf.cast()),
            }
        }
        ffi::Py_DECREF(tp.cast());
    }
}

impl HandleTypes {
    /// Allocates a handle (a timer handle when `when` is given) with asyncio's slots set
    /// as `Handle.__init__` / `TimerHandle.__init__` would set them. `track`: whether the
    /// handle starts tracked by the cycle collector (see the note below).
    #[inline]
    #[allow(clippy::too_many_arguments)] // asyncio's slots, one argument each
    pub fn new_handle<'py>(
        &self,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        loop_: &Bound<'py, PyAny>,
        context: Bound<'py, PyAny>,
        source_traceback: Option<Bound<'py, PyAny>>,
        when: Option<Bound<'py, PyAny>>,
        track: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = callback.py();
        let kind = if when.is_some() {
            KIND_TIMER
        } else {
            KIND_HANDLE
        };
        let tp = if kind == KIND_TIMER {
            self.timer.as_ptr()
        } else {
            self.handle.as_ptr()
        } as *mut ffi::PyTypeObject;
        let recycled = FREE.with(py, |f| f.0[kind].pop());
        // SAFETY: `tp` is one of the handle types. A recycled instance is untracked with
        // every slot NULL except those `clear_slots_for_reuse` fills; `PyObject_Init`
        // gives it refcount 1 and a type reference. Otherwise tp_alloc returns a zeroed,
        // tracked instance or NULL with an exception set. Every slot written is a slot of
        // that layout, receiving a new reference; a filled one is released after.
        unsafe {
            let raw = match (recycled, self.presize) {
                (Some(o), _) => ffi::PyObject_Init(o, tp),
                (None, Some(pre)) => alloc_uncounted(tp, pre),
                (None, None) => (*tp).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc)(tp, 0),
            };
            let obj = Bound::from_owned_ptr_or_err(py, raw)?;
            let o = obj.as_ptr();
            let none = ffi::Py_None();
            *slot_ptr(o, self.off.of(CALLBACK)) = callback.clone().into_ptr();
            *slot_ptr(o, self.off.of(ARGS)) = args.into_ptr();
            *slot_ptr(o, self.off.of(LOOP)) = loop_.clone().into_ptr();
            *slot_ptr(o, self.off.of(CONTEXT)) = context.into_ptr();
            if recycled.is_none() {
                *slot_ptr(o, self.off.of(CANCELLED)) = new_ref(ffi::Py_False());
                *slot_ptr(o, self.off.of(SOURCE_TRACEBACK)) = new_ref(none);
                *slot_ptr(o, self.off.of(REPR)) = new_ref(none);
            }
            if let Some(tb) = source_traceback {
                let p = slot_ptr(o, self.off.of(SOURCE_TRACEBACK));
                let old = std::mem::replace(&mut *p, tb.into_ptr());
                ffi::Py_XDECREF(old);
            }
            if let Some(when) = when {
                *slot_ptr(o, self.off.of(WHEN)) = when.into_ptr();
                *slot_ptr(o, self.off.of(SCHEDULED)) = new_ref(ffi::Py_False());
            }
            // NOTE: handles created while the loop runs stay untracked by the cycle
            //       collector while the loop owns them: the loop visits what they reference
            //       on their behalf (`traverse_owned`), and one still referenced elsewhere
            //       when the loop lets go of it, or when run_forever returns, is tracked
            //       then (`OwnedHandle`). A queued handle is reachable from the loop, and a
            //       running loop is never garbage, so no collectable cycle is missed.
            //       Short-lived handles thus never enter a collection: tracked, they cost
            //       2806 instead of 2271 instructions per call_soon callback (callgrind,
            //       benchmark loop included; rloop: 2252), and timers ~25% of call_later's
            //       throughput (benchmarks/run.py --no-gc).
            let tracked = recycled.is_none() && self.presize.is_none();
            match (tracked, track) {
                (true, false) => ffi::PyObject_GC_UnTrack(o.cast()),
                (false, true) => ffi::PyObject_GC_Track(o.cast()),
                _ => {}
            }
            Ok(obj)
        }
    }

    /// What `get_context()` / `_context` return: the slot's value (borrowed), a captured
    /// mapping first replaced by a `Context` of its own. The loop is told, in case that
    /// is the context the callback is running in right now (`RunContext::handed_out`).
    fn context_for_caller(&self, h: &Bound<'_, PyAny>) -> PyResult<*mut ffi::PyObject> {
        let p = self.materialize_slot(h)?;
        if !p.is_null()
            && let Ok(core) = self.loop_(h).cast_into::<crate::event_loop::LoopCore>()
        {
            core.get().run_ctx.handed_out(h.py(), p);
        }
        Ok(p)
    }

    /// Replaces a captured mapping in `h`'s context slot by a `Context` of its own and
    /// returns the slot's (borrowed) value.
    fn materialize_slot(&self, h: &Bound<'_, PyAny>) -> PyResult<*mut ffi::PyObject> {
        // SAFETY: see `get`; a mapping is replaced by a new context holding it, the new
        // reference stored before the old one is released.
        unsafe {
            let p = slot_ptr(h.as_ptr(), self.off.of(CONTEXT));
            let old = *p;
            if !old.is_null() && context::is_lazy(old) {
                let ctx = context::materialize(old);
                if ctx.is_null() {
                    return Err(PyErr::fetch(h.py()));
                }
                *p = ctx;
                ffi::Py_DECREF(old);
            }
            Ok(*p)
        }
    }

    #[inline(always)]
    fn get(&self, h: &Bound<'_, PyAny>, off: isize) -> *mut ffi::PyObject {
        // SAFETY: every handle reaching here is an instance of one of the handle types
        // (created by `new_handle`, or `self` of one of their methods), so `off` is a
        // valid slot offset. Slots may be NULL only if user code deleted them.
        unsafe { *slot_ptr(h.as_ptr(), off) }
    }

    #[inline(always)]
    pub(crate) fn get_bound<'py>(&self, h: &Bound<'py, PyAny>, off: isize) -> Bound<'py, PyAny> {
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
        self.get(h, self.off.of(CANCELLED)) == unsafe { ffi::Py_True() }
    }

    /// Whether `h` is one of ferroloop's timer handles (so its timer slots can be read).
    pub fn is_timer(&self, h: &Bound<'_, PyAny>) -> bool {
        kind_of(self, h.get_type().as_type_ptr()) == Some(KIND_TIMER)
    }

    #[inline(always)]
    pub fn is_scheduled(&self, h: &Bound<'_, PyAny>) -> bool {
        // SAFETY: comparing a pointer against the True singleton.
        self.get(h, self.off.of(SCHEDULED)) == unsafe { ffi::Py_True() }
    }

    #[inline(always)]
    pub fn set_scheduled(&self, h: &Bound<'_, PyAny>, scheduled: bool) {
        // SAFETY: the bool singletons are live; `set` takes its own reference.
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
        self.set(h, self.off.of(SCHEDULED), &v);
    }

    /// `handle._cancelled = True`.
    pub fn set_cancelled(&self, h: &Bound<'_, PyAny>) {
        // SAFETY: the True singleton is live; `set` takes its own reference.
        let t = unsafe { Bound::from_borrowed_ptr(h.py(), ffi::Py_True()) };
        self.set(h, self.off.of(CANCELLED), &t);
    }

    /// `handle._repr = value` (debug-mode cancel keeps the repr of the live callback).
    pub fn set_repr(&self, h: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) {
        self.set(h, self.off.of(REPR), value);
    }

    /// `handle._callback = None; handle._args = None`.
    pub fn clear_callback(&self, h: &Bound<'_, PyAny>) {
        let none = h.py().None().into_bound(h.py());
        self.set(h, self.off.of(CALLBACK), &none);
        self.set(h, self.off.of(ARGS), &none);
    }

    pub fn callback<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.of(CALLBACK))
    }
    pub fn args<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.of(ARGS))
    }
    pub fn loop_<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.of(LOOP))
    }
    pub fn source_traceback<'py>(&self, h: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.get_bound(h, self.off.of(SOURCE_TRACEBACK))
    }

    /// Runs the handle's callback in its context: `context.run(callback, *args)`.
    ///
    /// `rc`: the loop's reusable context, for a handle holding a captured mapping (see
    /// `py::context`); without it such a handle gets a context of its own first.
    #[inline]
    pub fn call(&self, h: &Bound<'_, PyAny>, rc: Option<&RunContext>) -> PyResult<()> {
        let py = h.py();
        let (cb, args, mut ctx) = (
            self.get(h, self.off.of(CALLBACK)),
            self.get(h, self.off.of(ARGS)),
            self.get(h, self.off.of(CONTEXT)),
        );
        if cb.is_null() || args.is_null() || ctx.is_null() {
            return Err(PyRuntimeError::new_err("handle is missing its callback"));
        }
        // SAFETY: GIL held. Strong references are taken for the duration of the call
        // because the callback may cancel its own handle, which clears the slots. Every
        // NULL return is paired with the pending exception fetched below.
        unsafe {
            let lazy = context::is_lazy(ctx);
            if lazy && (rc.is_none() || ffi::PyTuple_CheckExact(args) == 0) {
                ctx = self.materialize_slot(h)?;
            }
            if let (true, Some(rc)) = (context::is_lazy(ctx), rc) {
                // The slot's reference to the mapping stands in for ours (`run` settles it).
                ffi::Py_INCREF(cb);
                ffi::Py_INCREF(args);
                let slot = slot_ptr(h.as_ptr(), self.off.of(CONTEXT));
                let res = rc.run(py, h.as_ptr(), slot, ctx, cb, args);
                ffi::Py_DECREF(cb);
                ffi::Py_DECREF(args);
                if res.is_null() {
                    return Err(PyErr::fetch(py));
                }
                ffi::Py_DECREF(res);
                return Ok(());
            }
            ffi::Py_INCREF(cb);
            ffi::Py_INCREF(args);
            ffi::Py_INCREF(ctx);
            let res = if ffi::PyContext_CheckExact(ctx) == 0 || ffi::PyTuple_CheckExact(args) == 0 {
                // Not a Context (asyncio stores what it is given): `context.run(cb, *args)`
                // exactly as asyncio spells it, errors included.
                call_context_run(py, ctx, cb, args)
            } else if ffi::PyContext_Enter(ctx) < 0 {
                ptr::null_mut()
            } else {
                let n = ffi::PyTuple_GET_SIZE(args);
                let items = ptr::addr_of_mut!((*(args as *mut ffi::PyTupleObject)).ob_item)
                    as *const *mut ffi::PyObject;
                let r = if n == 0 {
                    call_no_args(cb, args)
                } else {
                    ffi::PyObject_Vectorcall(cb, items, n as usize, ptr::null_mut())
                };
                exit_context(ctx, r)
            };
            ffi::Py_DECREF(cb);
            ffi::Py_DECREF(args);
            ffi::Py_DECREF(ctx);
            if res.is_null() {
                return Err(PyErr::fetch(py));
            }
            ffi::Py_DECREF(res);
        }
        Ok(())
    }
}

/// `cb()`, calling `tp_call` directly when `cb`'s type has no vectorcall (asyncio's C
/// `TaskStepMethWrapper`, the callback of every task step, is one): this skips
/// `_PyObject_MakeTpCall`'s bookkeeping (~30 instructions a task step). The result is
/// checked as `_Py_CheckFunctionResult` checks it. The recursion guard is left out: the
/// loop calls this at a shallow depth, and whatever the callback runs checks its own.
///
/// # Safety
/// GIL held; `cb` is a live object, `empty` a live empty tuple.
#[inline(always)]
unsafe fn call_no_args(cb: *mut ffi::PyObject, empty: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let tp = ffi::Py_TYPE(cb);
        let call = match (*tp).tp_call {
            Some(call) if ffi::PyType_HasFeature(tp, ffi::Py_TPFLAGS_HAVE_VECTORCALL) == 0 => call,
            _ => return ffi::PyObject_Vectorcall(cb, ptr::null(), 0, ptr::null_mut()),
        };
        let r = call(cb, empty, ptr::null_mut());
        let raised = !ffi::PyErr_Occurred().is_null();
        if r.is_null() != raised {
            return bad_call_result(cb, r);
        }
        r
    }
}

/// The `SystemError` CPython raises for a call that returned NULL without an exception,
/// or a result with one set (`_Py_CheckFunctionResult`).
#[cold]
unsafe fn bad_call_result(cb: *mut ffi::PyObject, r: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: GIL held; `cb` is live and `r` NULL or a new reference.
    unsafe {
        let py = Python::assume_attached();
        // The pending exception (if any) is taken before anything else runs.
        let cause = (!r.is_null()).then(|| PyErr::fetch(py));
        let what = Bound::from_borrowed_ptr(py, cb)
            .repr()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "<callback>".into());
        let err = if r.is_null() {
            PyErr::new::<pyo3::exceptions::PySystemError, _>(format!(
                "{what} returned NULL without setting an exception"
            ))
        } else {
            ffi::Py_DECREF(r);
            let e = PyErr::new::<pyo3::exceptions::PySystemError, _>(format!(
                "{what} returned a result with an exception set"
            ));
            e.set_cause(py, cause);
            e
        };
        err.restore(py);
        ptr::null_mut()
    }
}

/// `ctx.run(cb, *args)` through Python attribute lookup (the slow, general path).
///
/// # Safety
/// GIL held; the three pointers are live objects.
unsafe fn call_context_run(
    py: Python<'_>,
    ctx: *mut ffi::PyObject,
    cb: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller; borrowed views only.
    let (ctx, cb, args) = unsafe {
        (
            Bound::from_borrowed_ptr(py, ctx),
            Bound::from_borrowed_ptr(py, cb),
            Bound::from_borrowed_ptr(py, args),
        )
    };
    let res = (|| -> PyResult<Bound<'_, PyAny>> {
        let mut all = vec![cb];
        all.extend(args.try_iter()?.collect::<PyResult<Vec<_>>>()?);
        ctx.getattr("run")?.call1(PyTuple::new(py, all)?)
    })();
    match res {
        Ok(r) => r.into_ptr(),
        Err(e) => {
            e.restore(py);
            ptr::null_mut()
        }
    }
}

/// Leaves `ctx` as `Context.run` does: an exit failure replaces the call's result.
pub(crate) unsafe fn exit_context(
    ctx: *mut ffi::PyObject,
    r: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
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
    unsafe { ffi::Py_INCREF(p) };
    p
}

/// What the ready queue holds: a handle, or a call from asyncio's C `Task` / `Future`
/// queued without one.
///
/// asyncio's C `Task` and `Future` schedule each task step as `loop.call_soon(
/// TaskStepMethWrapper, context=task_context)` and each done callback as `loop.call_soon(
/// callback, future, context=ctx)`, and drop the handle they get back unseen (`call_soon`
/// in `_asynciomodule.c`, 3.10-3.14); no Python code can hold such a handle. Outside debug
/// mode ferroloop queues the callback, its argument and the context themselves and returns
/// None to them: no handle (nor argument tuple, for a done callback) is made, recycled or
/// run (~200 instructions of a ~5,300-instruction `await asyncio.sleep(0)`). A handle is
/// made after all where one is observable: for the exception handler when the callback
/// raises, and in debug mode.
pub enum Ready {
    Handle(OwnedHandle),
    /// `callback()` (a task step) or `callback(arg)` (a done callback) in `context`, an
    /// exact `contextvars.Context`.
    Call {
        callback: Py<PyAny>,
        arg: Option<Py<PyAny>>,
        context: Py<PyAny>,
    },
}

// The queue holds one of these per callback: a third pointer would cost a threadsafe
// producer's backlog 8 more bytes per call (see benchmarks/README.md).
const _: () = assert!(std::mem::size_of::<Ready>() == 24);

impl From<OwnedHandle> for Ready {
    #[inline(always)]
    fn from(h: OwnedHandle) -> Self {
        Ready::Handle(h)
    }
}

impl Ready {
    #[inline(always)]
    pub fn prefetch(&self) {
        if let Ready::Handle(h) = self {
            h.prefetch();
        }
    }

    /// The handle for this item, made now for a task step (see the type).
    pub fn into_handle<'py>(self, lp: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = lp.py();
        match self {
            Ready::Handle(h) => Ok(h.bind(py).clone()),
            Ready::Call {
                callback,
                arg,
                context,
            } => types()?.new_handle(
                callback.bind(py),
                match arg {
                    None => PyTuple::empty(py),
                    Some(a) => PyTuple::new(py, [a])?,
                },
                lp,
                context.into_bound(py),
                None,
                None,
                true,
            ),
        }
    }
}

/// The type of asyncio's C task-step callback (`TaskStepMethWrapper`), once seen; a
/// strong reference is kept so the address never names another type.
static STEP_TYPE: std::sync::atomic::AtomicPtr<ffi::PyTypeObject> =
    std::sync::atomic::AtomicPtr::new(ptr::null_mut());

/// Whether `cb` is asyncio's C task-step callback.
///
/// # Safety
/// GIL held; `cb` is a live object.
#[inline(always)]
pub unsafe fn is_task_step(cb: *mut ffi::PyObject) -> bool {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let tp = ffi::Py_TYPE(cb);
        tp == STEP_TYPE.load(std::sync::atomic::Ordering::Relaxed) || is_task_step_slow(tp)
    }
}

/// A type not seen before: asyncio's wrapper has `tp_call`, no vectorcall and that name
/// (`_asyncio.TaskStepMethWrapper` from 3.12; each fresh import of `_asyncio` makes new
/// types there, so the cache follows).
#[cold]
#[inline(never)]
unsafe fn is_task_step_slow(tp: *mut ffi::PyTypeObject) -> bool {
    // SAFETY: GIL held (caller); `tp` is a live type.
    unsafe {
        if (*tp).tp_call.is_none()
            || ffi::PyType_HasFeature(tp, ffi::Py_TPFLAGS_HAVE_VECTORCALL) != 0
            || !matches!(
                CStr::from_ptr((*tp).tp_name).to_bytes(),
                b"TaskStepMethWrapper" | b"_asyncio.TaskStepMethWrapper"
            )
        {
            return false;
        }
        ffi::Py_INCREF(tp.cast());
        STEP_TYPE.store(tp, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

/// Runs a queued call (see `Ready::Call`): `callback()` or `callback(arg)` in `context`,
/// as a handle would run it.
///
/// # Safety
/// GIL held; `context` is an exact `contextvars.Context`.
#[inline]
pub unsafe fn run_call(
    py: Python<'_>,
    callback: &Bound<'_, PyAny>,
    arg: Option<&Bound<'_, PyAny>>,
    context: &Bound<'_, PyAny>,
) -> PyResult<()> {
    // SAFETY: guaranteed by the caller; the item owns the references for the call.
    unsafe {
        let ctx = context.as_ptr();
        if ffi::PyContext_Enter(ctx) < 0 {
            return Err(PyErr::fetch(py));
        }
        let r = match arg {
            None => call_no_args(callback.as_ptr(), PyTuple::empty(py).as_ptr()),
            Some(a) => {
                // A spare slot in front lets a bound method put its `self` there.
                let mut stack = [ptr::null_mut(), a.as_ptr()];
                ffi::PyObject_Vectorcall(
                    callback.as_ptr(),
                    stack.as_mut_ptr().add(1),
                    1 | ffi::PY_VECTORCALL_ARGUMENTS_OFFSET,
                    ptr::null_mut(),
                )
            }
        };
        let r = exit_context(ctx, r);
        if r.is_null() {
            return Err(PyErr::fetch(py));
        }
        ffi::Py_DECREF(r);
    }
    Ok(())
}

/// A reference to a handle held by one of the loop's queues (ready queue, timer heap,
/// reader/writer and signal tables).
///
/// Handles the loop creates while it runs are not tracked by the cycle collector (see
/// `new_handle`). While the loop is the only owner of an untracked handle, `HandleTypes::traverse_owned` reports the handle's
/// references as the loop's own; when the loop lets go of a handle that something else
/// still references, dropping the `OwnedHandle` starts tracking it, so cycles through it
/// are collected from then on; `run_forever` does the same for every handle the loop
/// holds when it returns, so outside `run_forever` a shared handle is always tracked. Must be dropped
/// with the GIL held (every loop method holds it).
pub struct OwnedHandle {
    /// Released by `Drop` with a plain decref: dropping a `Py` first asks a
    /// thread-local whether the GIL is held (~20 instructions a callback).
    handle: std::mem::ManuallyDrop<Py<PyAny>>,
    /// Whether dropping this reference may start tracking the handle. False for the
    /// ready-queue copy of a reader/writer handle, which the loop still owns elsewhere.
    track_on_drop: bool,
}

impl OwnedHandle {
    #[inline]
    pub fn new(h: &Bound<'_, PyAny>) -> Self {
        OwnedHandle {
            handle: std::mem::ManuallyDrop::new(h.clone().unbind()),
            track_on_drop: true,
        }
    }

    #[inline(always)]
    pub fn bind<'a, 'py>(&'a self, py: Python<'py>) -> &'a Bound<'py, PyAny> {
        self.handle.bind(py)
    }

    /// Asks the CPU to bring the handle's object into cache: the loop is about to read
    /// its slots. Timer handles come due in deadline order, scattered over memory, and
    /// a cache miss per handle was the largest cost of expiring 100k timers (`perf`).
    #[inline(always)]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.handle.as_ptr().cast::<i8>();
            // SAFETY: a prefetch is only a hint; it never faults, even for an invalid
            // address, and the object (header and slots, two cache lines) is live.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
            }
        }
    }

    #[inline]
    pub fn clone_ref(&self, py: Python<'_>) -> Self {
        OwnedHandle {
            handle: std::mem::ManuallyDrop::new(self.handle.clone_ref(py)),
            track_on_drop: true,
        }
    }

    /// Another reference for a queue, for a handle that stays registered with the loop
    /// (reader/writer handles queued on readiness): dropping it never tracks the handle.
    #[inline]
    pub fn queue_ref(&self, py: Python<'_>) -> Self {
        OwnedHandle {
            handle: std::mem::ManuallyDrop::new(self.handle.clone_ref(py)),
            track_on_drop: false,
        }
    }

    /// Starts tracking the handle if something besides the loop references it.
    #[inline]
    pub fn track_if_shared(&self) {
        let p = self.handle.as_ptr();
        // SAFETY: called with the GIL held (type contract) on a live object; tracking an
        // untracked GC object runs no Python code.
        unsafe {
            if ffi::Py_REFCNT(p) > 1 && ffi::PyObject_GC_IsTracked(p) == 0 {
                ffi::PyObject_GC_Track(p.cast());
            }
        }
    }
}

impl Drop for OwnedHandle {
    #[inline]
    fn drop(&mut self) {
        if self.track_on_drop {
            self.track_if_shared();
        }
        // SAFETY: dropped with the GIL held (type contract); this is the reference the
        // handle field owns, released once.
        unsafe { ffi::Py_DECREF(self.handle.as_ptr()) };
    }
}

impl HandleTypes {
    /// [`HandleTypes::traverse_owned`] for a ready-queue item.
    pub fn traverse_ready<E>(
        &self,
        item: &Ready,
        mut visit: impl FnMut(&Py<PyAny>) -> Result<(), E>,
    ) -> Result<(), E> {
        match item {
            Ready::Handle(h) => self.traverse_owned(h, visit),
            Ready::Call {
                callback,
                arg,
                context,
            } => {
                visit(callback)?;
                if let Some(a) = arg {
                    visit(a)?;
                }
                visit(context)
            }
        }
    }
}

impl HandleTypes {
    /// Cycle-collector support for the loop's `__traverse__`: visits a loop-owned handle's
    /// references on its behalf while the loop is its only owner and it is untracked;
    /// otherwise visits the handle itself.
    pub fn traverse_owned<E>(
        &self,
        h: &OwnedHandle,
        mut visit: impl FnMut(&Py<PyAny>) -> Result<(), E>,
    ) -> Result<(), E> {
        let p = h.handle.as_ptr();
        // SAFETY: called from tp_traverse with the GIL held; `p` is a live instance of
        // one of the handle types. `Py<PyAny>` is a transparent non-null object pointer,
        // so a non-NULL slot (or the `ob_type` field) can be viewed as one; nothing is
        // dropped through these views.
        unsafe {
            if ffi::Py_REFCNT(p) != 1 || ffi::PyObject_GC_IsTracked(p) != 0 {
                return visit(&h.handle);
            }
            // NOTE: only the slots that can hold container objects: `_cancelled`,
            //       `_scheduled`, `_repr` and `_when` hold bools, str, None and numbers.
            //       Not visiting a referent only keeps it alive (it looks externally
            //       referenced), so this is safe either way. So are the skips below,
            //       which matter because a full collection visits every queued handle
            //       twice (100k tasks' first steps in `gather`): None and an empty
            //       tuple (`args` of a task step) hold nothing, and the handle's type
            //       lives as long as the module (`TYPES`), so it is not visited either.
            let none = ffi::Py_None();
            for slot in [CALLBACK, ARGS, LOOP, SOURCE_TRACEBACK, CONTEXT] {
                let slot = slot_ptr(p, self.off.of(slot));
                let o = *slot;
                if o.is_null()
                    || o == none
                    || (ffi::PyTuple_CheckExact(o) != 0 && ffi::PyTuple_GET_SIZE(o) == 0)
                {
                    continue;
                }
                visit(&*(slot as *const Py<PyAny>))?;
            }
            Ok(())
        }
    }
}
