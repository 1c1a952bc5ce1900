//! Lazily copied contexts: what `call_soon(cb)` without `context=` captures.
//!
//! asyncio copies the caller's `contextvars.Context` for every callback scheduled without
//! an explicit context. A copy is a new `Context` object around the same immutable
//! variable mapping (a HAMT), so all a handle really needs is that mapping. On builds
//! whose layout this module recognises (checked when the extension loads), the loop
//! stores the caller's mapping in the handle's `_context` slot instead of a new
//! `Context`, and runs the callback in a `Context` the loop reuses, loaded with that
//! mapping ([`RunContext`]). Scheduling then allocates no `Context` and, from another
//! thread (`call_soon_threadsafe`), adds nothing for the cycle collector to count.
//!
//! The difference is not observable from Python:
//! - `handle.get_context()` and `handle._context` turn the mapping into a `Context` of
//!   its own on first use ([`materialize`]), which the handle then keeps and runs in.
//! - While a callback runs in the reused context, the handle's slot holds that context,
//!   so `get_context()` from inside the callback returns the context it runs in, as in
//!   asyncio. If that context was handed out, or if the callback changed a variable and
//!   something besides the loop still references the handle (a reader callback, a handle
//!   the caller kept), the handle keeps the context and the loop makes a new one.
//! - A callback that changed a variable in a handle nobody else references leaves its
//!   changes in a context that no one can reach, exactly like asyncio's discarded copy.
//!
//! Builds whose layout is not recognised copy the context as asyncio does.

use std::ffi::CStr;
use std::ptr;
use std::sync::OnceLock;

use pyo3::ffi;
use pyo3::prelude::*;

use super::GilCell;

/// Where the current context and a context's mapping live on this build.
struct Layout {
    /// Offset of `PyThreadState.context` (the thread's current context, or NULL).
    tstate_context: usize,
    /// Offset of `PyContext.ctx_vars` (the context's mapping).
    ctx_vars: usize,
    /// Offset of `PyContext.ctx_weakreflist`.
    ctx_weakreflist: usize,
    /// The mapping's type (`hamt`).
    hamt: *mut ffi::PyTypeObject,
}

// SAFETY: a type pointer of a static type and two offsets, written once at import.
unsafe impl Send for Layout {}
// SAFETY: as above; read-only after initialisation.
unsafe impl Sync for Layout {}

static LAYOUT: OnceLock<Option<Layout>> = OnceLock::new();

#[inline(always)]
fn layout() -> Option<&'static Layout> {
    LAYOUT.get().and_then(Option::as_ref)
}

/// Finds and checks the layout; called once when the extension module loads. Leaves the
/// lazy path off (contexts are copied) if anything does not look as expected.
pub fn init(py: Python<'_>) {
    LAYOUT.get_or_init(|| probe(py));
}

fn probe(py: Python<'_>) -> Option<Layout> {
    // NOTE: the layouts were read for CPython 3.10-3.14 (non-free-threaded); anything
    //       else copies. The probe below also checks them at run time.
    if !((3, 10)..=(3, 14)).contains(&super::version(py)) || super::free_threaded(py) {
        return None;
    }
    let ctx_vars = std::mem::size_of::<ffi::PyObject>() + std::mem::size_of::<usize>();
    let ctx_weakreflist = ctx_vars + std::mem::size_of::<usize>();
    // SAFETY: GIL held. Two fresh contexts are entered and exited on this thread, in
    // order. The scan reads pointer-sized words of this thread's PyThreadState from its
    // start and stops at the first word equal to the context just entered, which is the
    // `context` field (it holds exactly that pointer), so it reads within the struct.
    unsafe {
        let a = ffi::PyContext_New();
        let b = ffi::PyContext_New();
        let found = (|| {
            if a.is_null() || b.is_null() {
                return None;
            }
            let hamt_of = |c: *mut ffi::PyObject| {
                *(c as *const u8).add(ctx_vars).cast::<*mut ffi::PyObject>()
            };
            let (va, vb) = (hamt_of(a), hamt_of(b));
            if va.is_null() || vb.is_null() {
                return None;
            }
            let hamt = ffi::Py_TYPE(va);
            if ffi::Py_TYPE(vb) != hamt || CStr::from_ptr((*hamt).tp_name) != c"hamt" {
                return None;
            }
            // The weak-reference list: NULL, set by a weak reference, NULL again.
            let weaklist = |c: *mut ffi::PyObject| {
                *(c as *const u8)
                    .add(ctx_weakreflist)
                    .cast::<*mut ffi::PyObject>()
            };
            if !weaklist(a).is_null() {
                return None;
            }
            let w = ffi::PyWeakref_NewRef(a, ptr::null_mut());
            if w.is_null() {
                return None;
            }
            let referenced = !weaklist(a).is_null();
            ffi::Py_DECREF(w);
            if !referenced || !weaklist(a).is_null() {
                return None;
            }
            if ffi::PyContext_Enter(a) < 0 {
                return None;
            }
            let ts = ffi::PyThreadState_Get() as *const u8;
            let word = |off: usize| *ts.add(off).cast::<*mut ffi::PyObject>();
            const MAX_SCAN: usize = 1024;
            let off = (0..MAX_SCAN)
                .step_by(std::mem::size_of::<usize>())
                .find(|&off| word(off) == a);
            let mut ok = off.is_some();
            if let Some(off) = off
                && ffi::PyContext_Enter(b) == 0
            {
                ok &= word(off) == b;
                ok &= ffi::PyContext_Exit(b) == 0 && word(off) == a;
            } else {
                ok = false;
            }
            ok &= ffi::PyContext_Exit(a) == 0;
            off.filter(|_| ok).map(|off| Layout {
                tstate_context: off,
                ctx_vars,
                ctx_weakreflist,
                hamt,
            })
        })();
        ffi::Py_XDECREF(a);
        ffi::Py_XDECREF(b);
        if found.is_none() {
            ffi::PyErr_Clear();
        }
        found
    }
}

/// The mapping slot of context `ctx`.
///
/// # Safety
/// `ctx` is a live `contextvars.Context`; the layout was verified.
#[inline(always)]
unsafe fn vars_slot(l: &Layout, ctx: *mut ffi::PyObject) -> *mut *mut ffi::PyObject {
    // SAFETY: see the contract.
    unsafe { (ctx as *mut u8).add(l.ctx_vars).cast() }
}

/// What a callback scheduled now without `context=` runs in: the current context's
/// mapping where the lazy path is on (see the module notes), else a copy of the current
/// context (`contextvars.copy_context()`).
#[inline]
pub fn capture(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    if let Some(l) = layout() {
        // SAFETY: GIL held, so this thread's state is current; its `context` field is
        // NULL or a live context whose mapping is a live object, taken with a new
        // reference.
        unsafe {
            let ts = ffi::PyThreadState_Get() as *const u8;
            let cur = *ts.add(l.tstate_context).cast::<*mut ffi::PyObject>();
            if !cur.is_null() {
                let vars = *vars_slot(l, cur);
                ffi::Py_INCREF(vars);
                return Ok(Bound::from_owned_ptr(py, vars));
            }
        }
    }
    super::copy_context(py)
}

/// Whether `obj` is a captured mapping rather than a context.
///
/// # Safety
/// `obj` is a live object.
#[inline(always)]
pub unsafe fn is_lazy(obj: *mut ffi::PyObject) -> bool {
    // SAFETY: see the contract; reading its type.
    layout().is_some_and(|l| unsafe { ffi::Py_TYPE(obj) } == l.hamt)
}

/// NULL with a RuntimeError set: a mapping reached code that needs the lazy path, which
/// is off (cannot happen: mappings are only captured while it is on).
#[cold]
fn lazy_off() -> *mut ffi::PyObject {
    // SAFETY: called with the GIL held (from GIL-holding callers only).
    unsafe {
        ffi::PyErr_SetString(
            ffi::PyExc_RuntimeError,
            c"ferroloop: lazy contexts are off".as_ptr(),
        );
    }
    ptr::null_mut()
}

/// A new `Context` holding the mapping `vars` (a copy of the context it was captured
/// from). New reference, or NULL with an exception set.
///
/// # Safety
/// GIL held; `vars` is a live mapping (`is_lazy`).
pub unsafe fn materialize(vars: *mut ffi::PyObject) -> *mut ffi::PyObject {
    let Some(l) = layout() else {
        return lazy_off();
    };
    // SAFETY: a new, unentered context; its mapping slot is replaced by another mapping
    // (new reference stored before the old one is released).
    unsafe {
        let ctx = ffi::PyContext_New();
        if !ctx.is_null() {
            set_vars(l, ctx, vars);
        }
        ctx
    }
}

/// Whether something besides its `owners` references can reach `ctx`: another
/// reference, or a weak reference.
///
/// # Safety
/// `ctx` is a live context; the layout was verified.
#[inline(always)]
unsafe fn shared(l: &Layout, ctx: *mut ffi::PyObject, owners: ffi::Py_ssize_t) -> bool {
    // SAFETY: see the contract.
    unsafe {
        ffi::Py_REFCNT(ctx) != owners
            || !(*(ctx as *const u8)
                .add(l.ctx_weakreflist)
                .cast::<*mut ffi::PyObject>())
            .is_null()
    }
}

/// `ctx.ctx_vars = vars` (no-op if already so).
///
/// # Safety
/// GIL held; `ctx` a live, unentered context; `vars` a live mapping.
#[inline(always)]
unsafe fn set_vars(l: &Layout, ctx: *mut ffi::PyObject, vars: *mut ffi::PyObject) {
    // SAFETY: see the contract.
    unsafe {
        let slot = vars_slot(l, ctx);
        let old = *slot;
        if old != vars {
            ffi::Py_INCREF(vars);
            *slot = vars;
            ffi::Py_DECREF(old);
        }
    }
}

/// The context a loop reuses to run callbacks whose handle holds a captured mapping.
pub struct RunContext(GilCell<Reusable>);

struct Reusable {
    /// The reusable context (our reference): NULL until first needed, and while in use
    /// (a nested run makes its own).
    spare: *mut ffi::PyObject,
    /// The last context a handle getter returned (see `handed_out`); not a reference.
    handed: *mut ffi::PyObject,
}
// SAFETY: only touched with the GIL held (through `GilCell`).
unsafe impl Send for Reusable {}

impl Default for RunContext {
    fn default() -> Self {
        RunContext(GilCell::new(Reusable {
            spare: ptr::null_mut(),
            handed: ptr::null_mut(),
        }))
    }
}

impl Drop for RunContext {
    fn drop(&mut self) {
        // NOTE: dropped with its loop, by the loop's tp_dealloc (GIL held).
        let c = std::mem::replace(&mut self.0.0.get_mut().spare, ptr::null_mut());
        // SAFETY: our own reference, possibly NULL; GIL held (see above).
        unsafe { ffi::Py_XDECREF(c) };
    }
}

impl RunContext {
    /// Releases the reusable context (loop close, the collector's tp_clear).
    pub fn clear(&self, py: Python<'_>) {
        let c = self
            .0
            .with(py, |r| std::mem::replace(&mut r.spare, ptr::null_mut()));
        // SAFETY: GIL held; our own reference, possibly NULL.
        unsafe { ffi::Py_XDECREF(c) };
    }

    /// Visits the reusable context (the loop's tp_traverse): the variables a callback
    /// captured may refer back to the loop.
    ///
    /// # Safety
    /// As `GilCell::get_unchecked` (called from tp_traverse).
    pub unsafe fn traverse<E>(
        &self,
        mut visit: impl FnMut(&Py<PyAny>) -> Result<(), E>,
    ) -> Result<(), E> {
        // SAFETY: see the contract. `Py<PyAny>` is a transparent non-null object pointer,
        // so the non-NULL field is viewed as one; nothing is dropped through the view.
        unsafe {
            let r = self.0.get_unchecked();
            if r.spare.is_null() {
                return Ok(());
            }
            visit(&*(ptr::addr_of!(r.spare) as *const Py<PyAny>))
        }
    }

    /// Notes that a handle's `get_context()` / `_context` returned `ctx`: if that is the
    /// context a callback is running in, the handle keeps it (it was handed out).
    pub fn handed_out(&self, py: Python<'_>, ctx: *mut ffi::PyObject) {
        self.0.with(py, |r| r.handed = ctx);
    }

    /// Calls `cb(*args)` for handle `h`, whose context slot `slot` holds the mapping
    /// `vars`, in the reusable context loaded with `vars` (see the module notes). Returns
    /// the call's result (new reference) or NULL with an exception set.
    ///
    /// # Safety
    /// GIL held; `h` is a live handle and `slot` its context slot, holding `vars` (a
    /// mapping, `is_lazy`); `cb` and the tuple `args` are live for the call.
    pub unsafe fn run(
        &self,
        py: Python<'_>,
        h: *mut ffi::PyObject,
        slot: *mut *mut ffi::PyObject,
        vars: *mut ffi::PyObject,
        cb: *mut ffi::PyObject,
        args: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject {
        let Some(l) = layout() else {
            return lazy_off();
        };
        let mut r = self
            .0
            .with(py, |c| std::mem::replace(&mut c.spare, ptr::null_mut()));
        // SAFETY: guaranteed by the caller. Reference accounting: `r` is ours (one
        // reference); the slot's reference to `vars` becomes ours while the slot holds
        // its own reference to `r`, and both are settled after the call.
        unsafe {
            // A context is tracked by the collector, so code can still reach the spare
            // (`gc.get_objects()`), keep it or even enter it: then it is not reused.
            if !r.is_null() && shared(l, r, 1) {
                ffi::Py_DECREF(r);
                r = ptr::null_mut();
            }
            if r.is_null() {
                r = ffi::PyContext_New();
                if r.is_null() {
                    return ptr::null_mut();
                }
            }
            set_vars(l, r, vars);
            ffi::Py_INCREF(r);
            *slot = r;
            let res = if ffi::PyContext_Enter(r) < 0 {
                ptr::null_mut()
            } else {
                let n = ffi::PyTuple_GET_SIZE(args) as usize;
                let items = ptr::addr_of_mut!((*(args as *mut ffi::PyTupleObject)).ob_item)
                    as *const *mut ffi::PyObject;
                let res = ffi::PyObject_Vectorcall(cb, items, n, ptr::null_mut());
                super::handle::exit_context(r, res)
            };
            // Handed out (read through the handle during the call, referenced or weakly
            // referenced from elsewhere, or the slot replaced): the handle keeps what its
            // slot holds and the loop lets go of `r`.
            let handed = self
                .0
                .with(py, |c| std::mem::replace(&mut c.handed, ptr::null_mut()));
            let escaped = handed == r || *slot != r || shared(l, r, 2);
            // A variable changed while the handle is referenced elsewhere: it keeps the
            // changed context, as asyncio's handle keeps its copy.
            let keep = escaped || (*vars_slot(l, r) != vars && ffi::Py_REFCNT(h) > 1);
            if keep {
                ffi::Py_DECREF(vars);
                ffi::Py_DECREF(r);
            } else {
                *slot = vars;
                // What the callback set goes now, as with asyncio's discarded copy.
                set_vars(l, r, vars);
                ffi::Py_DECREF(r);
                let spare = self.0.with(py, |c| {
                    if c.spare.is_null() {
                        c.spare = r;
                        ptr::null_mut()
                    } else {
                        r
                    }
                });
                ffi::Py_XDECREF(spare);
            }
            res
        }
    }
}
