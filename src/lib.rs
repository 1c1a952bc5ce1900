//! ferroloop: an asyncio event loop in Rust. Module list and Python exports only.

pub mod dns;
pub mod errors;
pub mod event_loop;
pub mod handles;
pub mod py;
pub mod reactor;
pub mod ready;
pub mod signals;
pub mod sock;
pub mod sys;
pub mod timers;
pub mod transports;

use pyo3::prelude::*;

#[pymodule]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Python 3.12+ refuses to load the module in a sub-interpreter (pyo3 declares no
    // support). 3.10 and 3.11 would run this again there, and the module's static caches
    // (types, imported functions) would mix the interpreters' objects: refuse as well.
    // SAFETY: plain reads of interpreter pointers, GIL held.
    if unsafe { pyo3::ffi::PyInterpreterState_Get() != pyo3::ffi::PyInterpreterState_Main() } {
        return Err(pyo3::exceptions::PyImportError::new_err(
            "ferroloop does not support loading in sub-interpreters",
        ));
    }
    sys::watch_forks();
    m.add_class::<event_loop::LoopCore>()?;
    py::fastcall::install(&m.py().get_type::<event_loop::LoopCore>())?;
    // Without it, asyncio's C futures get handles for their done callbacks (slower only).
    if let Err(e) = py::fastcall::find_c_future_kwnames(m.py()) {
        drop(e);
    }
    py::context::init(m.py());
    let (handle, timer) = py::handle::init(m.py())?;
    m.add("Handle", handle)?;
    m.add("TimerHandle", timer)?;
    m.add_function(wrap_pyfunction!(signals::_sighandler_noop, m)?)?;
    m.add_function(wrap_pyfunction!(signals::_after_fork_child, m)?)?;
    // Learns the main thread's identity now, while importing.
    signals::on_main_thread(m.py())?;
    m.add_function(wrap_pyfunction!(
        event_loop::run::at_exit::_stop_loop_threads,
        m
    )?)?;
    m.add_function(wrap_pyfunction!(event_loop::backlog::_threadsafe_waits, m)?)?;
    m.add_function(wrap_pyfunction!(
        py::stream_reader::_streams_fed_natively,
        m
    )?)?;
    py::stream_reader::init(m.py());
    m.add_class::<sock::SockOperation>()?;
    sock::install(&m.py().get_type::<sock::SockOperation>());
    m.add_class::<transports::stream::StreamCore>()?;
    transports::stream::install(&m.py().get_type::<transports::stream::StreamCore>());
    m.add_class::<transports::datagram::DatagramCore>()?;
    m.add_class::<transports::accept::Acceptor>()?;
    transports::init(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
