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
    let fmt = import_attr!(py, "asyncio.format_helpers", "_format_callback_source")?;
    let source = match fmt.call1((&cb, &args)) {
        Ok(s) => s.str()?.to_string(),
        Err(_) => cb.repr()?.to_string(),
    };
    let context = PyDict::new(py);
    context.set_item("message", format!("Exception in callback {source}"))?;
    context.set_item("exception", err.into_value(py))?;
    context.set_item("handle", h)?;
    let tb = t.source_traceback(h);
    if tb.is_truthy()? {
        context.set_item("source_traceback", tb)?;
    }
    slf.call_method1(pyo3::intern!(py, "call_exception_handler"), (context,))?;
    Ok(())
}
