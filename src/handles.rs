//! Handle / TimerHandle behaviour. Mirrors asyncio.events.Handle and asyncio.events.TimerHandle.

use pyo3::prelude::*;

use crate::event_loop::LoopCore;
use crate::py::handle::types;

/// `TimerHandle.cancel()` / `Handle.cancel()` with asyncio's order of effects: a scheduled
/// timer is reported to its loop, then the handle is marked cancelled, its repr is frozen
/// in debug mode, and its callback and arguments are released.
pub fn cancel(h: &Bound<'_, PyAny>) -> PyResult<()> {
    let t = types()?;
    if t.is_cancelled(h) {
        return Ok(());
    }
    // Debug mode runs Python code below (the repr), and letting go of the callback can;
    // handles are cancelled from any thread.
    crate::py::thread_exit::register();
    let loop_ = t.loop_(h);
    let core = loop_.cast::<LoopCore>().ok();
    if t.is_timer(h) {
        match core {
            Some(c) => c.get().timer_handle_cancelled(h)?,
            None => {
                loop_.call_method1("_timer_handle_cancelled", (h,))?;
            }
        }
        if t.is_cancelled(h) {
            return Ok(());
        }
    }
    t.set_cancelled(h);
    let debug = match core {
        Some(c) => c.get().debug(h.py()),
        None => loop_.call_method0("get_debug")?.is_truthy()?,
    };
    if debug {
        let r = h.repr()?;
        t.set_repr(h, r.as_any());
    }
    t.clear_callback(h);
    Ok(())
}
