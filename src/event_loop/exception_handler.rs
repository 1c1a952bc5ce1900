//! Callback errors. Mirrors asyncio.events.Handle._run's except clause; the exception
//! handler itself (`call_exception_handler`, `default_exception_handler`) lives in the
//! Python layer, as it does in asyncio.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::LoopCore;
use crate::py::handle::types;
use crate::py::import_attr;

/// Reports an exception raised by a callback to the loop's exception handler with
/// asyncio's context keys. `KeyboardInterrupt` and `SystemExit` propagate instead.
pub(super) fn callback_error(
    slf: &Bound<'_, LoopCore>,
    h: &Bound<'_, PyAny>,
    err: PyErr,
) -> PyResult<()> {
    let py = slf.py();
    if err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py) {
        return Err(err);
    }
    let t = types()?;
    let (cb, args) = (t.callback(h), t.args(h));
    let source = format_callback_source(slf, &cb, &args)?;
    let context = PyDict::new(py);
    context.set_item("message", format!("Exception in callback {source}"))?;
    let exc = err.into_value(py).into_bound(py);
    context.set_item("exception", &exc)?;
    context.set_item("handle", h)?;
    let tb = t.source_traceback(h);
    if tb.is_truthy()? {
        context.set_item("source_traceback", tb)?;
    }
    crate::py::call_exception_handler_for(slf.as_any(), &context, &exc)
}

/// `format_helpers._format_callback_source(cb, args)`, passing `debug=` where the running
/// Python's asyncio takes it (3.13+ shortens reprs outside debug mode).
fn format_callback_source(
    slf: &Bound<'_, LoopCore>,
    cb: &Bound<'_, PyAny>,
    args: &Bound<'_, PyAny>,
) -> PyResult<String> {
    let py = slf.py();
    static TAKES_DEBUG: pyo3::sync::PyOnceLock<bool> = pyo3::sync::PyOnceLock::new();
    let fmt = import_attr!(py, "asyncio.format_helpers", "_format_callback_source")?;
    let takes_debug = *TAKES_DEBUG.get_or_try_init(py, || -> PyResult<bool> {
        let sig = py.import("inspect")?.call_method1("signature", (fmt,))?;
        sig.getattr("parameters")?.contains("debug")
    })?;
    let source = if takes_debug {
        let kwargs = PyDict::new(py);
        kwargs.set_item("debug", slf.get().debug(py))?;
        fmt.call((cb, args), Some(&kwargs))?
    } else {
        fmt.call1((cb, args))?
    };
    Ok(source.str()?.to_string())
}
