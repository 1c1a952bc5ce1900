//! Write flow control. Mirrors asyncio.transports._FlowControlMixin.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::event_loop::LoopCore;

/// asyncio's default high-water mark (64 KiB); the low-water mark defaults to a quarter.
const DEFAULT_HIGH: i64 = 64 * 1024;

pub struct FlowControl {
    /// The marks as numbers the buffer size is compared with (exact for sizes below
    /// 2**53, as Python compares an int with a float).
    pub high: f64,
    pub low: f64,
    /// The marks as set (`set_write_buffer_limits` takes any numbers, as asyncio's):
    /// `(low, high)`, what `get_write_buffer_limits` returns; `None`: the defaults.
    pub given: Option<(Py<PyAny>, Py<PyAny>)>,
    /// `pause_writing()` was called and `resume_writing()` not yet.
    pub paused: bool,
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl {
            high: DEFAULT_HIGH as f64,
            low: (DEFAULT_HIGH / 4) as f64,
            given: None,
            paused: false,
        }
    }
}

impl FlowControl {
    /// `_maybe_pause_protocol`'s test: true when `pause_writing()` must be called now.
    pub fn should_pause(&mut self, size: usize) -> bool {
        if size as f64 <= self.high || self.paused {
            return false;
        }
        self.paused = true;
        true
    }

    /// `_maybe_resume_protocol`'s test: true when `resume_writing()` must be called now.
    pub fn should_resume(&mut self, size: usize) -> bool {
        if self.paused && size as f64 <= self.low {
            self.paused = false;
            return true;
        }
        false
    }

    /// `get_write_buffer_limits()`: `(low, high)`.
    pub fn get(&self, py: Python<'_>) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
        Ok(match &self.given {
            Some((low, high)) => (low.clone_ref(py), high.clone_ref(py)),
            None => (
                (DEFAULT_HIGH / 4).into_pyobject(py)?.into_any().unbind(),
                DEFAULT_HIGH.into_pyobject(py)?.into_any().unbind(),
            ),
        })
    }
}

/// `_set_write_buffer_limits(high, low)`: the defaults and the check asyncio applies,
/// with Python's arithmetic and comparisons (floats and big ints are taken).
pub fn limits(
    high: Option<&Bound<'_, PyAny>>,
    low: Option<&Bound<'_, PyAny>>,
    py: Python<'_>,
) -> PyResult<FlowControl> {
    let high = high.filter(|h| !h.is_none()).cloned();
    let low = low.filter(|l| !l.is_none()).cloned();
    let high = match (high, &low) {
        (Some(h), _) => h,
        (None, None) => DEFAULT_HIGH.into_pyobject(py)?.into_any(),
        (None, Some(l)) => l.mul(4)?,
    };
    let low = match low {
        Some(l) => l,
        None => high.floor_div(4)?,
    };
    let zero = 0i64.into_pyobject(py)?;
    if !(high.ge(&low)? && low.ge(&zero)?) {
        return Err(PyValueError::new_err(format!(
            "high ({}) must be >= low ({}) must be >= 0",
            high.repr()?,
            low.repr()?
        )));
    }
    Ok(FlowControl {
        high: as_threshold(&high)?,
        low: as_threshold(&low)?,
        given: Some((low.unbind(), high.unbind())),
        paused: false,
    })
}

/// A mark as a number to compare sizes with: ints beyond f64's range count as infinite.
fn as_threshold(mark: &Bound<'_, PyAny>) -> PyResult<f64> {
    match mark.extract::<f64>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(mark.py()) => {
            Ok(f64::INFINITY)
        }
        Err(e) => Err(e),
    }
}

/// Calls `protocol.pause_writing()` / `resume_writing()`; a failure goes to the loop's
/// exception handler (KeyboardInterrupt and SystemExit propagate), as asyncio does.
pub fn call_protocol_hook(
    py: Python<'_>,
    lp: Option<Bound<'_, LoopCore>>,
    protocol: &Bound<'_, PyAny>,
    transport: &Bound<'_, PyAny>,
    hook: &str,
) -> PyResult<()> {
    let Err(e) = protocol.call_method0(hook) else {
        return Ok(());
    };
    report_hook_error(py, lp, protocol, transport, hook, e)
}

/// What a protocol's `hook` raised goes to the loop's exception handler (as
/// "protocol.<hook>() failed"), except KeyboardInterrupt and SystemExit: returned.
pub fn report_hook_error(
    py: Python<'_>,
    lp: Option<Bound<'_, LoopCore>>,
    protocol: &Bound<'_, PyAny>,
    transport: &Bound<'_, PyAny>,
    hook: &str,
    e: PyErr,
) -> PyResult<()> {
    if e.is_instance_of::<PyKeyboardInterrupt>(py) || e.is_instance_of::<PySystemExit>(py) {
        return Err(e);
    }
    if let Some(lp) = lp {
        let ctx = PyDict::new(py);
        ctx.set_item("message", format!("protocol.{hook}() failed"))?;
        ctx.set_item("exception", e.value(py))?;
        ctx.set_item("transport", transport)?;
        ctx.set_item("protocol", protocol)?;
        crate::py::call_exception_handler_for(lp.as_any(), &ctx, e.value(py))?;
    }
    Ok(())
}
