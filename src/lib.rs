//! ferroloop: an asyncio event loop in Rust. Module list and Python exports only.

pub mod errors;
pub mod event_loop;
pub mod handles;
pub mod py;
pub mod reactor;
pub mod ready;
pub mod signals;
pub mod sys;
pub mod timers;

use pyo3::prelude::*;
use pyo3::types::PyType;

/// Registers ferroloop's `Handle` / `TimerHandle` classes (asyncio subclasses defined in
/// the Python layer) as the ones the loop instantiates.
#[pyfunction]
fn _install_handle_types(handle: &Bound<'_, PyType>, timer: &Bound<'_, PyType>) -> PyResult<()> {
    py::handle::install(handle, timer)
}

#[pymodule]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<event_loop::LoopCore>()?;
    m.add_function(wrap_pyfunction!(_install_handle_types, m)?)?;
    m.add_function(wrap_pyfunction!(signals::_sighandler_noop, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
