//! Write flow control. Mirrors asyncio.transports._FlowControlMixin.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::event_loop::LoopCore;

/// asyncio's default high-water mark (64 KiB); the low-water mark defaults to a quarter.
const DEFAULT_HIGH: i64 = 64 * 1024;

pub struct FlowControl {
    pub high: i64,
    pub low: i64,
    /// `pause_writing()` was called and `resume_writing()` not yet.
    pub paused: bool,
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl {
            high: DEFAULT_HIGH,
            low: DEFAULT_HIGH / 4,
            paused: false,
        }
    }
}

impl FlowControl {
    /// `_maybe_pause_protocol`'s test: true when `pause_writing()` must be called now.
    pub fn should_pause(&mut self, size: usize) -> bool {
        if size as i64 <= self.high || self.paused {
            return false;
        }
        self.paused = true;
        true
    }

    /// `_maybe_resume_protocol`'s test: true when `resume_writing()` must be called now.
    pub fn should_resume(&mut self, size: usize) -> bool {
        if self.paused && size as i64 <= self.low {
            self.paused = false;
            return true;
        }
        false
    }
}

/// `_set_write_buffer_limits(high, low)`: the defaults and the check asyncio applies.
pub fn limits(
    high: Option<&Bound<'_, PyAny>>,
    low: Option<&Bound<'_, PyAny>>,
) -> PyResult<(i64, i64)> {
    let high: Option<i64> = high
        .filter(|h| !h.is_none())
        .map(|h| h.extract())
        .transpose()?;
    let low: Option<i64> = low
        .filter(|l| !l.is_none())
        .map(|l| l.extract())
        .transpose()?;
    let high = match (high, low) {
        (Some(h), _) => h,
        (None, None) => DEFAULT_HIGH,
        (None, Some(l)) => 4 * l,
    };
    let low = low.unwrap_or(high.div_euclid(4)); // Python's floor division
    if !(high >= low && low >= 0) {
        return Err(PyValueError::new_err(format!(
            "high ({high}) must be >= low ({low}) must be >= 0"
        )));
    }
    Ok((high, low))
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
    // Python code inside a pyo3 method (write() pausing the protocol): see HangOnThreadExit.
    let Err(e) = crate::py::hang_on_thread_exit(|| protocol.call_method0(hook)) else {
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
