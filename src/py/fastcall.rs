//! Vectorcall entry points for the loop's hottest methods.
//!
//! asyncio's Task and Future call `loop.call_soon(callback, arg, context=ctx)` for every
//! step and every done callback. These `METH_FASTCALL | METH_KEYWORDS` methods parse that
//! shape directly (about 60 instructions instead of the ~280 of the generic PyO3
//! trampoline, measured with callgrind) and hand over to the loop core.

use std::ffi::{CStr, c_char};

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

use crate::event_loop::LoopCore;
use crate::py::GilCell;

/// The arguments of `name(lead..., callback, *args, context=None)`.
pub struct SchedArgs<'py> {
    /// The positional parameters before `*args` (`delay`/`when`, then `callback`).
    pub lead: [Option<Bound<'py, PyAny>>; 2],
    pub args: Bound<'py, PyTuple>,
    pub context: Option<Bound<'py, PyAny>>,
}

impl<'py> SchedArgs<'py> {
    /// Positional parameter `i` (present: `parse` reports missing ones).
    pub fn lead(&self, i: usize) -> PyResult<Bound<'py, PyAny>> {
        self.lead[i]
            .clone()
            .ok_or_else(|| PyTypeError::new_err("missing required argument"))
    }

    /// `(callback, args, context)`, the callback being positional parameter `i`.
    #[allow(clippy::type_complexity)]
    pub fn callback_args(
        self,
        i: usize,
    ) -> PyResult<(
        Bound<'py, PyAny>,
        Bound<'py, PyTuple>,
        Option<Bound<'py, PyAny>>,
    )> {
        Ok((self.lead(i)?, self.args, self.context))
    }
}

/// Parses a vectorcall for a method whose named positional parameters are `names`
/// (one or two), followed by `*args` and the keyword-only `context=None`.
///
/// # Safety
/// `args` points to `nargs` + `len(kwnames)` live objects, as CPython passes them.
unsafe fn parse<'py>(
    py: Python<'py>,
    method: &str,
    names: &[&str],
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<SchedArgs<'py>> {
    let nargs = nargs as usize;
    // SAFETY: the caller guarantees `args[..nargs + nkw]` are live objects; `kwnames` is
    // NULL or a tuple of str.
    unsafe {
        let mut lead: [Option<Bound<'py, PyAny>>; 2] = [None, None];
        for (i, slot) in lead.iter_mut().enumerate().take(names.len().min(nargs)) {
            *slot = Some(Bound::from_borrowed_ptr(py, *args.add(i)));
        }
        let rest = crate::py::tuple_from(
            py,
            args.add(names.len().min(nargs)),
            nargs.saturating_sub(names.len()),
        )?;
        let mut context = None;
        if !kwnames.is_null() {
            let context_key = pyo3::intern!(py, "context").as_ptr();
            let nkw = ffi::PyTuple_GET_SIZE(kwnames) as usize;
            for k in 0..nkw {
                let key_ptr = ffi::PyTuple_GET_ITEM(kwnames, k as _);
                let value = Bound::from_borrowed_ptr(py, *args.add(nargs + k));
                // Keyword names from C callers (asyncio's Task and Future) are interned, so
                // the pointer test settles the common case.
                if key_ptr == context_key {
                    context = Some(value);
                    continue;
                }
                let key = Bound::from_borrowed_ptr(py, key_ptr).cast_into_unchecked::<PyString>();
                let key = key.to_str()?;
                if key == "context" {
                    context = Some(value);
                } else if let Some(i) = names.iter().position(|n| *n == key) {
                    if lead[i].is_some() {
                        return Err(PyTypeError::new_err(format!(
                            "{method}() got multiple values for argument '{key}'"
                        )));
                    }
                    lead[i] = Some(value);
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "{method}() got an unexpected keyword argument '{key}'"
                    )));
                }
            }
        }
        if lead[..names.len()].iter().any(Option::is_none) {
            return Err(missing_error(method, names, &lead));
        }
        Ok(SchedArgs {
            lead,
            args: rest,
            context,
        })
    }
}

/// CPython's message for missing positional arguments.
#[cold]
fn missing_error(method: &str, names: &[&str], lead: &[Option<Bound<'_, PyAny>>]) -> PyErr {
    let missing: Vec<String> = names
        .iter()
        .zip(lead.iter())
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| format!("'{n}'"))
        .collect();
    let s = if missing.len() == 1 { "" } else { "s" };
    PyTypeError::new_err(format!(
        "{method}() missing {} required positional argument{s}: {}",
        missing.len(),
        missing.join(" and ")
    ))
}

type Impl = for<'py> fn(&Bound<'py, LoopCore>, SchedArgs<'py>) -> PyResult<Bound<'py, PyAny>>;

/// Shared body of the entry points: parse, dispatch, convert the result.
///
/// # Safety
/// Called by CPython as a vectorcall method of `LoopCore` (GIL held).
unsafe fn entry(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
    method: &str,
    names: &[&str],
    f: Impl,
) -> *mut ffi::PyObject {
    // SAFETY: see the function's contract; the method descriptor has checked that `slf`
    // is a LoopCore instance.
    unsafe {
        let py = Python::assume_attached();
        crate::py::guard(py, || {
            // The method descriptor has already checked that `slf` is a LoopCore.
            let slf = Bound::from_borrowed_ptr(py, slf).cast_into_unchecked::<LoopCore>();
            let slf = &slf;
            let parsed = parse(py, method, names, args, nargs, kwnames)?;
            f(slf, parsed).map(Bound::into_ptr)
        })
    }
}

macro_rules! entry_point {
    ($fn_name:ident, $method:literal, [$($param:literal),+], $impl:path) => {
        unsafe extern "C" fn $fn_name(
            slf: *mut ffi::PyObject,
            args: *const *mut ffi::PyObject,
            nargs: ffi::Py_ssize_t,
            kwnames: *mut ffi::PyObject,
        ) -> *mut ffi::PyObject {
            // SAFETY: installed as a METH_FASTCALL | METH_KEYWORDS method of LoopCore.
            unsafe { entry(slf, args, nargs, kwnames, $method, &[$($param),+], $impl) }
        }
    };
}

/// The last keyword-name tuple found to be `("context",)`, kept alive (so its address
/// cannot be reused by another tuple). asyncio's Task and Future pass the same tuple,
/// whose string is not interned, on every call.
struct KwNames(*mut ffi::PyObject);
// SAFETY: only touched with the GIL held (through `GilCell`).
unsafe impl Send for KwNames {}
static CONTEXT_KWNAMES: GilCell<KwNames> = GilCell::new(KwNames(std::ptr::null_mut()));

/// Whether the keyword names `kwnames` (a tuple of str) are exactly `("context",)`.
///
/// # Safety
/// GIL held; `kwnames` is a live tuple of str.
#[inline(always)]
unsafe fn is_context_only(py: Python<'_>, kwnames: *mut ffi::PyObject) -> bool {
    if CONTEXT_KWNAMES.with(py, |k| k.0 == kwnames) {
        return true;
    }
    // SAFETY: see the contract.
    unsafe {
        if ffi::PyTuple_GET_SIZE(kwnames) != 1 {
            return false;
        }
        let key = ffi::PyTuple_GET_ITEM(kwnames, 0);
        if key != pyo3::intern!(py, "context").as_ptr()
            && ffi::PyUnicode_CompareWithASCIIString(key, c"context".as_ptr()) != 0
        {
            return false;
        }
        ffi::Py_INCREF(kwnames);
        let old = CONTEXT_KWNAMES.with(py, |k| std::mem::replace(&mut k.0, kwnames));
        ffi::Py_XDECREF(old);
        true
    }
}

/// The keyword-name tuple `("context",)` asyncio's C module passes to `loop.call_soon`
/// from its Task and Future, and nowhere else (`call_soon` in `_asynciomodule.c`, which
/// drops the handle it gets back: see `Ready`). Found once by `find_c_future_kwnames`;
/// a strong reference, so the address never names another tuple. NULL if not found: the
/// C module was imported afresh since (a new module has a new tuple) or the probe failed,
/// and such calls get handles as any other.
struct CFutureKwNames(*mut ffi::PyObject);
// SAFETY: only touched with the GIL held (through `GilCell`).
unsafe impl Send for CFutureKwNames {}
static C_FUTURE_KWNAMES: GilCell<CFutureKwNames> =
    GilCell::new(CFutureKwNames(std::ptr::null_mut()));

/// The probe's stand-in for `loop.call_soon`: keeps the keyword names of the call a C
/// future makes for its done callback, `call_soon(callback, future, context=ctx)`.
unsafe extern "C" fn probe_call_soon(
    _slf: *mut ffi::PyObject,
    _args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython as a METH_FASTCALL | METH_KEYWORDS function, GIL held;
    // `kwnames` is NULL or a tuple of str.
    unsafe {
        let py = Python::assume_attached();
        if nargs == 2 && !kwnames.is_null() && ffi::PyTuple_GET_SIZE(kwnames) == 1 {
            ffi::Py_INCREF(kwnames);
            let old = C_FUTURE_KWNAMES.with(py, |k| std::mem::replace(&mut k.0, kwnames));
            ffi::Py_XDECREF(old);
        }
        ffi::Py_INCREF(ffi::Py_None());
        ffi::Py_None()
    }
}

/// Has a C `asyncio.Future` schedule a done callback on a stand-in loop, to learn the
/// keyword-name tuple its module passes (see `C_FUTURE_KWNAMES`). Left unset when
/// `asyncio.Future` is not the C one.
pub fn find_c_future_kwnames(py: Python<'_>) -> PyResult<()> {
    let future_cls = py.import("asyncio")?.getattr("Future")?;
    if future_cls.getattr("__module__")?.extract::<String>()? != "_asyncio" {
        return Ok(());
    }
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: c"call_soon".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: probe_call_soon,
        },
        ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
        ml_doc: std::ptr::null(),
    }));
    // SAFETY: `def` is leaked, so it outlives the function object; NULL is turned into
    // the pending exception.
    let call_soon = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyCFunction_NewEx(def, std::ptr::null_mut(), std::ptr::null_mut()),
        )?
    };
    let builtins = py.import("builtins")?;
    let falsy = builtins.getattr("bool")?; // bool() is False: get_debug() and the callback
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("get_debug", &falsy)?;
    kwargs.set_item("call_soon", call_soon)?;
    let stand_in = py
        .import("types")?
        .getattr("SimpleNamespace")?
        .call((), Some(&kwargs))?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("loop", stand_in)?;
    let fut = future_cls.call((), Some(&kwargs))?;
    let ctx = py.import("contextvars")?.call_method0("copy_context")?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("context", ctx)?;
    fut.call_method("add_done_callback", (&falsy,), Some(&kwargs))?;
    fut.call_method1("set_result", (py.None(),))?;
    Ok(())
}

/// `call_soon` / `call_soon_threadsafe`: the two shapes asyncio uses (`call_soon(cb,
/// *args)` and Task / Future's `call_soon(cb, arg, context=ctx)`) go straight to
/// `LoopCore::call_soon_fast`; anything else, and debug mode or a closed loop, takes the
/// general path.
///
/// # Safety
/// Called by CPython as a vectorcall method of `LoopCore` (GIL held).
#[inline(always)]
unsafe fn soon_entry(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
    threadsafe: bool,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_FASTCALL | METH_KEYWORDS method of LoopCore, which the
    // method descriptor has checked `slf` to be; `args[..nargs + len(kwnames)]` are live.
    unsafe {
        let py = Python::assume_attached();
        let context = if kwnames.is_null() {
            Some(std::ptr::null_mut())
        } else if is_context_only(py, kwnames) {
            Some(*args.add(nargs as usize))
        } else {
            None
        };
        let from_c_future = !kwnames.is_null() && C_FUTURE_KWNAMES.with(py, |k| k.0 == kwnames);
        crate::py::guard(py, || {
            let core = Bound::from_borrowed_ptr(py, slf).cast_into_unchecked::<LoopCore>();
            if let (Some(context), true) = (context, nargs >= 1)
                && let Some(h) = LoopCore::call_soon_fast(
                    &core,
                    *args,
                    args.add(1),
                    nargs as usize - 1,
                    context,
                    threadsafe,
                    from_c_future,
                )?
            {
                return Ok(h.into_ptr());
            }
            if threadsafe {
                let parsed = parse(
                    py,
                    "call_soon_threadsafe",
                    &["callback"],
                    args,
                    nargs,
                    kwnames,
                )?;
                LoopCore::call_soon_threadsafe_impl(&core, parsed).map(Bound::into_ptr)
            } else {
                let parsed = parse(py, "call_soon", &["callback"], args, nargs, kwnames)?;
                LoopCore::call_soon_impl(&core, parsed).map(Bound::into_ptr)
            }
        })
    }
}

unsafe extern "C" fn call_soon(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_FASTCALL | METH_KEYWORDS method of LoopCore.
    unsafe { soon_entry(slf, args, nargs, kwnames, false) }
}

unsafe extern "C" fn call_soon_threadsafe(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_FASTCALL | METH_KEYWORDS method of LoopCore.
    unsafe { soon_entry(slf, args, nargs, kwnames, true) }
}
entry_point!(
    call_later,
    "call_later",
    ["delay", "callback"],
    LoopCore::call_later_impl
);
entry_point!(
    call_at,
    "call_at",
    ["when", "callback"],
    LoopCore::call_at_impl
);

/// `LoopCore.create_task(coro, **kwargs)`: called once per task, from Python code, as
/// `loop.create_task(coro)` nearly always. A vectorcall method takes that call without
/// the argument tuple a PyO3 method with `**kwargs` has CPython build (~5% of the
/// instructions ferroloop spends on a task in `gather`, measured with callgrind).
unsafe extern "C" fn create_task(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    const METHOD: &str = "LoopCore.create_task";
    // SAFETY: installed as a METH_FASTCALL | METH_KEYWORDS method of LoopCore, which the
    // method descriptor has checked `slf` to be; `args[..nargs + len(kwnames)]` are live
    // and `kwnames` is NULL or a tuple of str.
    unsafe {
        let py = Python::assume_attached();
        crate::py::guard(py, || {
            let slf = Bound::from_borrowed_ptr(py, slf).cast_into_unchecked::<LoopCore>();
            let nargs = nargs as usize;
            if nargs > 1 {
                return Err(PyTypeError::new_err(format!(
                    "{METHOD}() takes 1 positional arguments but {nargs} were given"
                )));
            }
            let mut coro = (nargs == 1).then(|| Bound::from_borrowed_ptr(py, *args));
            let mut kwargs = None;
            if !kwnames.is_null() && ffi::PyTuple_GET_SIZE(kwnames) > 0 {
                let dict = PyDict::new(py);
                for k in 0..ffi::PyTuple_GET_SIZE(kwnames) as usize {
                    let key = Bound::from_borrowed_ptr(py, ffi::PyTuple_GET_ITEM(kwnames, k as _));
                    let value = Bound::from_borrowed_ptr(py, *args.add(nargs + k));
                    if key.cast::<PyString>()?.to_str()? == "coro" {
                        if coro.is_some() {
                            return Err(PyTypeError::new_err(format!(
                                "{METHOD}() got multiple values for argument 'coro'"
                            )));
                        }
                        coro = Some(value);
                    } else {
                        dict.set_item(key, value)?;
                    }
                }
                kwargs = Some(dict);
            }
            let coro = coro.ok_or_else(|| {
                PyTypeError::new_err(format!(
                    "{METHOD}() missing 1 required positional argument: 'coro'"
                ))
            })?;
            crate::event_loop::create_task(&slf, &coro, kwargs).map(Bound::into_ptr)
        })
    }
}

/// A METH_NOARGS method of `LoopCore`: `f(loop)` inside `guard`.
///
/// # Safety
/// Called by CPython as a METH_NOARGS method of `LoopCore` (GIL held; the method
/// descriptor has checked `slf` to be a LoopCore).
#[inline(always)]
unsafe fn noargs_entry(
    slf: *mut ffi::PyObject,
    f: impl FnOnce(&Bound<'_, LoopCore>) -> PyResult<*mut ffi::PyObject>,
) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let py = Python::assume_attached();
        crate::py::guard(py, || {
            f(Bound::from_borrowed_ptr(py, slf).cast_unchecked::<LoopCore>())
        })
    }
}

/// A new reference to `True` or `False`.
fn bool_ptr(b: bool) -> *mut ffi::PyObject {
    // SAFETY: the bool singletons live as long as the interpreter; a new reference is
    // returned.
    unsafe {
        let p = if b { ffi::Py_True() } else { ffi::Py_False() };
        ffi::Py_INCREF(p);
        p
    }
}

unsafe extern "C" fn create_future(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of LoopCore.
    unsafe { noargs_entry(slf, |lp| LoopCore::create_future(lp).map(Bound::into_ptr)) }
}

unsafe extern "C" fn get_debug(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of LoopCore.
    unsafe { noargs_entry(slf, |lp| Ok(bool_ptr(lp.get().get_debug(lp.py())))) }
}

unsafe extern "C" fn time(slf: *mut ffi::PyObject, _: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of LoopCore.
    unsafe { noargs_entry(slf, |lp| lp.get().time(lp.py()).map(Py::into_ptr)) }
}

unsafe extern "C" fn is_running(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of LoopCore.
    unsafe { noargs_entry(slf, |lp| Ok(bool_ptr(lp.get().is_running(lp.py())))) }
}

unsafe extern "C" fn is_closed(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: installed as a METH_NOARGS method of LoopCore.
    unsafe { noargs_entry(slf, |lp| Ok(bool_ptr(lp.get().is_closed(lp.py())))) }
}

type NoArgs = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

type FastWithKeywords = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

/// Installs the vectorcall methods on the `LoopCore` type.
pub fn install(cls: &Bound<'_, PyType>) -> PyResult<()> {
    let methods: [(&'static CStr, FastWithKeywords, &'static CStr); 5] = [
        (
            c"call_soon",
            call_soon,
            c"call_soon($self, callback, *args, context=None)\n--\n\nArrange for a callback to be called as soon as possible.",
        ),
        (
            c"call_soon_threadsafe",
            call_soon_threadsafe,
            c"call_soon_threadsafe($self, callback, *args, context=None)\n--\n\nLike call_soon(), but thread-safe.",
        ),
        (
            c"call_later",
            call_later,
            c"call_later($self, delay, callback, *args, context=None)\n--\n\nArrange for a callback to be called after delay seconds.",
        ),
        (
            c"create_task",
            create_task,
            c"create_task($self, coro, **kwargs)\n--\n\n`create_task(coro, *, name=None, context=None, eager_start=None, **kwargs)` with\nPython 3.14 semantics: keyword arguments reach the task factory unchanged.",
        ),
        (
            c"call_at",
            call_at,
            c"call_at($self, when, callback, *args, context=None)\n--\n\nArrange for a callback to be called at absolute loop time when.",
        ),
    ];
    // Called by asyncio's Future for every future and task (get_debug), by streams and
    // protocols for every wait (create_future) and by timeouts (time): PyO3's trampoline
    // cost ~35 instructions a call more than these (callgrind, 3.11: future_chain 6,231
    // -> 6,160 instructions per future, gather 18,707 -> 18,670 per task).
    let noargs: [(&'static CStr, NoArgs, &'static CStr); 5] = [
        (
            c"create_future",
            create_future,
            c"create_future($self, /)\n--\n\nCreate a Future object attached to the loop.",
        ),
        (
            c"get_debug",
            get_debug,
            c"get_debug($self, /)\n--\n\nWhether the loop is in debug mode.",
        ),
        (
            c"time",
            time,
            c"time($self, /)\n--\n\nThe loop clock: `time.monotonic()` (the function itself when it was\nreplaced, as mocking tools do: asyncio's `time()` calls it).",
        ),
        (
            c"is_running",
            is_running,
            c"is_running($self, /)\n--\n\nWhether the loop is running.",
        ),
        (
            c"is_closed",
            is_closed,
            c"is_closed($self, /)\n--\n\nWhether the loop was closed.",
        ),
    ];
    let defs = methods
        .into_iter()
        .map(|(name, f, doc)| {
            let def = ffi::PyMethodDef {
                ml_name: name.as_ptr(),
                ml_meth: ffi::PyMethodDefPointer {
                    PyCFunctionFastWithKeywords: f,
                },
                ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
                ml_doc: doc.as_ptr() as *const c_char,
            };
            (name, def)
        })
        .chain(noargs.into_iter().map(|(name, f, doc)| {
            let def = ffi::PyMethodDef {
                ml_name: name.as_ptr(),
                ml_meth: ffi::PyMethodDefPointer { PyCFunction: f },
                ml_flags: ffi::METH_NOARGS,
                ml_doc: doc.as_ptr() as *const c_char,
            };
            (name, def)
        }));
    for (name, def) in defs {
        let def = Box::leak(Box::new(def));
        // SAFETY: `def` is leaked, so it outlives the descriptor; `cls` is a live type.
        // NULL / -1 returns are turned into the pending exception.
        unsafe {
            let mut descr = Bound::from_owned_ptr_or_err(
                cls.py(),
                ffi::PyDescr_NewMethod(cls.as_type_ptr(), def),
            )?;
            // 3.10 / 3.11's Task and Future look `call_soon` up (binding it); from 3.12
            // they call it through PyObject_VectorcallMethod, which reaches the
            // descriptor's vectorcall, whose type check is cheaper than the plain one's.
            if name == c"call_soon" {
                descr = soon_descriptor(cls.py(), cls, descr, def)?.into_bound(cls.py());
            }
            if ffi::PyObject_SetAttrString(cls.as_ptr(), name.as_ptr(), descr.as_ptr()) < 0 {
                return Err(PyErr::fetch(cls.py()));
            }
        }
    }
    Ok(())
}

/// `LoopCore.call_soon` as a method descriptor that binds cheaply.
///
/// Python code calls it unbound, as any method (`Py_TPFLAGS_METHOD_DESCRIPTOR`: the
/// interpreter passes the loop as the first argument to `vectorcall`). C code that looks
/// the attribute up, as 3.10 / 3.11's Task and Future do for every step and done
/// callback, gets a bound method; while the loop runs that is one object kept by the
/// loop instead of a new one per lookup (~220 instructions of a ~5,500-instruction task
/// switch: `asyncio.sleep(0)` switching went from 2.05M to 2.2M/s). Everything else
/// (`__name__`, `__doc__`, `repr`, ...) is the plain method descriptor's.
#[repr(C)]
struct SoonDescr {
    ob_base: ffi::PyObject,
    vectorcall: Option<ffi::vectorcallfunc>,
    /// The ordinary method descriptor (owns nothing else; kept for its attributes).
    plain: *mut ffi::PyObject,
    def: *mut ffi::PyMethodDef,
    owner: *mut ffi::PyTypeObject,
    /// The last type found to be a subtype of `owner` (a strong reference, or NULL) and
    /// its `tp_version_tag` then. The same type with the same non-zero tag skips the MRO
    /// walk of `PyType_IsSubtype` on the next call: from 3.11 CPython sets a type's tag
    /// to 0 when the type changes (`__bases__` included) and later gives it a new one.
    /// The reference keeps the type from being freed, so the pointer cannot come to
    /// name another type (tags alone can repeat: 3.12 counts them per interpreter); it
    /// keeps at most one loop class alive past its time.
    ok_type: *mut ffi::PyTypeObject,
    ok_tag: std::ffi::c_uint,
    /// Whether the cache is used (Python 3.11+; 3.10 does not reset a changed type's tag).
    tag_cache: bool,
}

/// `descriptor 'call_soon' for '<owner>' objects doesn't apply to a 'X' object`, as
/// CPython's method descriptors word it.
unsafe fn soon_descr_check(d: *mut SoonDescr, obj: *mut ffi::PyObject) -> bool {
    // SAFETY: `d` is a live SoonDescr and `obj` a live object (GIL held).
    unsafe {
        let tp = ffi::Py_TYPE(obj);
        let tag = (*tp).tp_version_tag;
        if tp == (*d).ok_type && tag != 0 && tag == (*d).ok_tag {
            return true;
        }
        if ffi::PyObject_TypeCheck(obj, (*d).owner) != 0 {
            if (*d).tag_cache && tag != 0 {
                ffi::Py_INCREF(tp.cast());
                let old = std::mem::replace(&mut (*d).ok_type, tp);
                (*d).ok_tag = tag;
                // Last: freeing the old type can run code that calls back in here.
                ffi::Py_XDECREF(old.cast());
            }
            return true;
        }
        let py = Python::assume_attached();
        let tp_name =
            |t: *mut ffi::PyTypeObject| std::ffi::CStr::from_ptr((*t).tp_name).to_string_lossy();
        PyTypeError::new_err(format!(
            "descriptor 'call_soon' for '{}' objects doesn't apply to a '{}' object",
            tp_name((*d).owner),
            tp_name(tp)
        ))
        .restore(py);
        false
    }
}

unsafe extern "C" fn soon_descr_get(
    descr: *mut ffi::PyObject,
    obj: *mut ffi::PyObject,
    _owner: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: called by CPython with the GIL held on our descriptor; `obj` is NULL (class
    // access) or a live object. A cached bound method is a live object the loop owns.
    unsafe {
        let d = descr.cast::<SoonDescr>();
        if obj.is_null() {
            ffi::Py_INCREF(descr);
            return descr;
        }
        if !soon_descr_check(d, obj) {
            return std::ptr::null_mut();
        }
        let py = Python::assume_attached();
        let core = Bound::from_borrowed_ptr(py, obj).cast_into_unchecked::<LoopCore>();
        let cached = core.get().state.with(py, |s| {
            s.soon_bound.as_ref().map(|b| b.clone_ref(py).into_ptr())
        });
        if let Some(b) = cached {
            return b;
        }
        let b = ffi::PyCMethod_New((*d).def, obj, std::ptr::null_mut(), std::ptr::null_mut());
        if !b.is_null() && core.get().is_running(py) {
            // Kept until run_forever returns (see `run::run_forever`).
            let keep = Bound::from_borrowed_ptr(py, b).unbind();
            let old = core.get().state.with(py, |s| s.soon_bound.replace(keep));
            drop(old);
        }
        b
    }
}

unsafe extern "C" fn soon_descr_vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython's vectorcall protocol: `args[..nargs + len(kwnames)]` are live; the
    // first is `self`, checked to be a LoopCore before `call_soon` sees it.
    unsafe {
        let nargs = ffi::PyVectorcall_NARGS(nargsf);
        let d = callable.cast::<SoonDescr>();
        if nargs < 1 {
            PyTypeError::new_err("unbound method LoopCore.call_soon() needs an argument")
                .restore(Python::assume_attached());
            return std::ptr::null_mut();
        }
        if !soon_descr_check(d, *args) {
            return std::ptr::null_mut();
        }
        call_soon(*args, args.add(1), nargs - 1, kwnames)
    }
}

unsafe extern "C" fn soon_descr_repr(descr: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: `descr` is a live SoonDescr whose `plain` lives as long as it.
    unsafe { ffi::PyObject_Repr((*descr.cast::<SoonDescr>()).plain) }
}

/// Pickles as the plain descriptor does (`getattr(LoopCore, 'call_soon')`).
unsafe extern "C" fn soon_descr_reduce(
    descr: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: `descr` is a live SoonDescr whose `plain` lives as long as it.
    unsafe {
        ffi::PyObject_CallMethod(
            (*descr.cast::<SoonDescr>()).plain,
            c"__reduce__".as_ptr(),
            std::ptr::null(),
        )
    }
}

unsafe extern "C" fn soon_descr_attr(
    descr: *mut ffi::PyObject,
    name: *mut std::ffi::c_void,
) -> *mut ffi::PyObject {
    // SAFETY: `name` is one of the NUL-terminated names in SOON_GETSET; `plain` is live.
    unsafe {
        ffi::PyObject_GetAttrString((*descr.cast::<SoonDescr>()).plain, name.cast::<c_char>())
    }
}

/// Makes the `call_soon` descriptor around the plain method descriptor `plain` of `owner`.
fn soon_descriptor(
    py: Python<'_>,
    owner: &Bound<'_, PyType>,
    plain: Bound<'_, PyAny>,
    def: *mut ffi::PyMethodDef,
) -> PyResult<Py<PyAny>> {
    static GETSET_NAMES: [&CStr; 5] = [
        c"__name__",
        c"__qualname__",
        c"__doc__",
        c"__text_signature__",
        c"__objclass__",
    ];
    let getset: &'static mut [ffi::PyGetSetDef] = Box::leak(
        GETSET_NAMES
            .iter()
            .map(|n| ffi::PyGetSetDef {
                name: n.as_ptr(),
                get: Some(soon_descr_attr),
                set: None,
                doc: std::ptr::null(),
                closure: n.as_ptr() as *mut std::ffi::c_void,
            })
            .chain(std::iter::once(ffi::PyGetSetDef {
                name: std::ptr::null(),
                get: None,
                set: None,
                doc: std::ptr::null(),
                closure: std::ptr::null_mut(),
            }))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let members: &'static mut [ffi::PyMemberDef] = Box::leak(Box::new([
        ffi::PyMemberDef {
            name: c"__vectorcalloffset__".as_ptr(),
            type_code: ffi::Py_T_PYSSIZET,
            offset: std::mem::offset_of!(SoonDescr, vectorcall) as ffi::Py_ssize_t,
            flags: ffi::Py_READONLY,
            doc: std::ptr::null(),
        },
        ffi::PyMemberDef {
            name: std::ptr::null(),
            type_code: 0,
            offset: 0,
            flags: 0,
            doc: std::ptr::null(),
        },
    ]));
    let methods: &'static mut [ffi::PyMethodDef] = Box::leak(Box::new([
        ffi::PyMethodDef {
            ml_name: c"__reduce__".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunction: soon_descr_reduce,
            },
            ml_flags: ffi::METH_NOARGS,
            ml_doc: std::ptr::null(),
        },
        ffi::PyMethodDef::zeroed(),
    ]));
    let slots: &'static mut [ffi::PyType_Slot] = Box::leak(Box::new([
        ffi::PyType_Slot {
            slot: ffi::Py_tp_methods,
            pfunc: methods.as_mut_ptr().cast(),
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_descr_get,
            pfunc: soon_descr_get as *mut std::ffi::c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_call,
            pfunc: ffi::PyVectorcall_Call as *mut std::ffi::c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_repr,
            pfunc: soon_descr_repr as *mut std::ffi::c_void,
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_getset,
            pfunc: getset.as_mut_ptr().cast(),
        },
        ffi::PyType_Slot {
            slot: ffi::Py_tp_members,
            pfunc: members.as_mut_ptr().cast(),
        },
        ffi::PyType_Slot {
            slot: 0,
            pfunc: std::ptr::null_mut(),
        },
    ]));
    let spec: &'static mut ffi::PyType_Spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: c"ferroloop._ferroloop.loop_method".as_ptr(),
        basicsize: std::mem::size_of::<SoonDescr>() as _,
        itemsize: 0,
        // Immutable and not instantiable from Python: an instance made by anything but
        // `soon_descriptor` would have NULL fields.
        flags: (ffi::Py_TPFLAGS_DEFAULT
            | ffi::Py_TPFLAGS_METHOD_DESCRIPTOR
            | ffi::Py_TPFLAGS_HAVE_VECTORCALL
            | ffi::Py_TPFLAGS_IMMUTABLETYPE
            | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION) as _,
        slots: slots.as_mut_ptr(),
    }));
    // SAFETY: the spec and everything it points to are leaked ('static). The new object
    // is allocated by the type's tp_alloc (zeroed) and every field is set before it is
    // shared; it is never deallocated (it lives in LoopCore's type dict), so `plain`'s
    // reference, moved in here, is never released.
    unsafe {
        let tp = ffi::PyType_FromSpec(spec);
        if tp.is_null() {
            return Err(PyErr::fetch(py));
        }
        let tpo = tp.cast::<ffi::PyTypeObject>();
        let obj = (*tpo).tp_alloc.expect("heap types have tp_alloc")(tpo, 0);
        ffi::Py_DECREF(tp); // the instance holds its own reference to its heap type
        if obj.is_null() {
            return Err(PyErr::fetch(py));
        }
        let d = obj.cast::<SoonDescr>();
        (*d).vectorcall = Some(soon_descr_vectorcall);
        (*d).plain = plain.into_ptr();
        (*d).def = def;
        (*d).owner = owner.as_type_ptr();
        (*d).ok_type = std::ptr::null_mut();
        (*d).ok_tag = 0;
        (*d).tag_cache = crate::py::version(py) >= (3, 11);
        Ok(Bound::from_owned_ptr(py, obj).unbind())
    }
}
