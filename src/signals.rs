//! Signal wake-ups and handlers. Mirrors asyncio.unix_events._UnixSelectorEventLoop's
//! add_signal_handler / remove_signal_handler / _handle_signal.
//!
//! Python's C-level signal handler writes the signal number to the fd given to
//! `signal.set_wakeup_fd`; ferroloop points that at a socket the reactor watches, so a
//! signal wakes a sleeping loop wherever it was delivered. The loop then schedules the
//! registered handles and runs Python-level handlers (`PyErr_CheckSignals`), which is
//! where Ctrl+C becomes `KeyboardInterrupt`.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyTuple};

use crate::event_loop::LoopCore;
use crate::py::handle::{OwnedHandle, types};
use crate::py::{self, import_attr};
use crate::reactor::{Registrar, SIGNAL_TOKEN};

/// The write ends of the wake-up sockets of this process's loops. Changed only with the
/// GIL held: Python forks holding the GIL, so a child never inherits it locked.
static WAKE_FDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn forget_wake_fd(fd: RawFd) {
    if let Ok(mut fds) = WAKE_FDS.lock() {
        fds.retain(|f| *f != fd);
    }
}

/// The wake-up socket pair and the registered handlers.
pub(crate) struct SignalState {
    /// Read end, watched by the reactor. `None` once the loop is closed.
    read: Option<UnixStream>,
    /// Write end, given to `signal.set_wakeup_fd`.
    write: Option<UnixStream>,
    handlers: HashMap<i32, OwnedHandle>,
    /// `set_wakeup_fd`'s previous value while `run_forever` has ours installed.
    saved_wakeup_fd: Option<i64>,
}

impl SignalState {
    pub fn new(registrar: &Registrar) -> io::Result<Self> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        registrar.register_token(read.as_raw_fd(), SIGNAL_TOKEN, true, false)?;
        if let Ok(mut fds) = WAKE_FDS.lock() {
            fds.push(write.as_raw_fd());
        }
        Ok(SignalState {
            read: Some(read),
            write: Some(write),
            handlers: HashMap::new(),
            saved_wakeup_fd: None,
        })
    }

    /// After `fork()`: a wake-up socket pair of this process's own, registered with
    /// `registrar` (the inherited pair is shared with the parent, whose loop would read
    /// this process's signals). Returns the old pair for the caller to drop, which closes
    /// only this process's copies. A closed loop keeps none.
    pub fn reopen(
        &mut self,
        registrar: &Registrar,
    ) -> io::Result<(Option<UnixStream>, Option<UnixStream>)> {
        if self.read.is_none() {
            return Ok((None, None));
        }
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        registrar.register_token(read.as_raw_fd(), SIGNAL_TOKEN, true, false)?;
        if let Some(w) = &self.write {
            forget_wake_fd(w.as_raw_fd());
        }
        if let Ok(mut fds) = WAKE_FDS.lock() {
            fds.push(write.as_raw_fd());
        }
        Ok((self.read.replace(read), self.write.replace(write)))
    }

    /// Whether this loop wants its wake-up fd installed now: it has signal handlers, or
    /// `run_forever` installed it for its duration.
    fn wants_wakeup_fd(&self) -> bool {
        !self.handlers.is_empty() || self.saved_wakeup_fd.is_some()
    }

    fn write_fd(&self) -> Option<RawFd> {
        self.write.as_ref().map(|w| w.as_raw_fd())
    }

    pub fn handles(&self) -> impl Iterator<Item = &OwnedHandle> {
        self.handlers.values()
    }

    pub fn take_handles(&mut self) -> HashMap<i32, OwnedHandle> {
        std::mem::take(&mut self.handlers)
    }

    /// Gives up the sockets (loop close); the caller drops them.
    pub fn close(&mut self) -> (Option<UnixStream>, Option<UnixStream>) {
        if let Some(w) = &self.write {
            forget_wake_fd(w.as_raw_fd());
        }
        (self.read.take(), self.write.take())
    }

    /// Reads the signal numbers Python wrote since the last call.
    fn drain(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(r) = &self.read {
            let _ = crate::sys::drain(r.as_raw_fd(), &mut out);
        }
        out
    }
}

impl Drop for SignalState {
    fn drop(&mut self) {
        if let Some(w) = &self.write {
            forget_wake_fd(w.as_raw_fd());
        }
    }
}

/// `os.register_at_fork(after_in_child=...)`: a child made by `fork()` inherits the
/// wake-up fd, which may be a socket of one of its parent's loops, shared with the
/// parent: the child's signals would wake the parent's loop and run its handlers, and a
/// new loop in the child would not install its own. Python 3.12's asyncio resets the
/// wake-up fd in every child; ferroloop does so on every Python, when the fd is a
/// ferroloop loop's (another is put back, without its `warn_on_full_buffer` flag). The
/// parent's loops running in other threads are forgotten too (see `run::at_exit`).
#[pyfunction]
pub fn _after_fork_child(py: Python<'_>) {
    crate::event_loop::run::at_exit::forget_all();
    MAIN_IDENT.store(py::thread_ident(), Ordering::Relaxed);
    let ours = |fd: i64| {
        WAKE_FDS
            .try_lock()
            .is_ok_and(|fds| fds.iter().any(|f| *f as i64 == fd))
    };
    if let Ok(prev) = set_wakeup_fd(py, -1)
        && prev != -1
        && !ours(prev)
    {
        let _ = set_wakeup_fd(py, prev);
    }
}

#[pyfunction]
#[pyo3(signature = (_signum, _frame))]
/// Dummy Python-level handler: the wake-up fd carries the signal to the loop.
pub fn _sighandler_noop(_signum: &Bound<'_, PyAny>, _frame: &Bound<'_, PyAny>) {}

/// asyncio's `_check_signal`.
fn check_signal(sig: &Bound<'_, PyAny>) -> PyResult<i32> {
    let py = sig.py();
    if !sig.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "sig must be an int, not {}",
            sig.repr()?
        )));
    }
    let valid = import_attr!(py, "signal", "valid_signals")?.call0()?;
    if !valid.contains(sig)? {
        return Err(PyValueError::new_err(format!(
            "invalid signal number {sig}"
        )));
    }
    sig.extract()
}

fn set_wakeup_fd(py: Python<'_>, fd: i64) -> PyResult<i64> {
    import_attr!(py, "signal", "set_wakeup_fd")?
        .call1((fd,))?
        .extract()
}

/// `signal.set_wakeup_fd(-1)` as asyncio does when the last handler goes: failures logged.
fn clear_wakeup_fd(py: Python<'_>) -> PyResult<()> {
    if let Err(e) = set_wakeup_fd(py, -1) {
        if e.is_instance_of::<PyValueError>(py) || e.is_instance_of::<PyOSError>(py) {
            let logger = crate::py::asyncio_logger(py)?;
            logger.call_method1("info", ("set_wakeup_fd(-1) failed: %s", e.into_value(py)))?;
        } else {
            return Err(e);
        }
    }
    Ok(())
}

fn is_einval(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyOSError>(py)
        && e.value(py)
            .getattr("errno")
            .and_then(|v| v.extract::<i32>())
            .is_ok_and(|n| n == libc::EINVAL)
}

pub(crate) fn add_signal_handler<'py>(
    slf: &Bound<'py, LoopCore>,
    sig: &Bound<'py, PyAny>,
    callback: &Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    if py::is_coroutine_or_function(callback)? {
        return Err(PyTypeError::new_err(
            "coroutines cannot be used with add_signal_handler()",
        ));
    }
    let signum = check_signal(sig)?;
    if core.state.with(py, |s| s.closed) {
        return Err(PyRuntimeError::new_err("Event loop is closed"));
    }
    let wfd = core.state.with(py, |s| s.signals.write_fd()).unwrap_or(-1);
    if let Err(e) = set_wakeup_fd(py, wfd as i64) {
        if e.is_instance_of::<PyValueError>(py) || e.is_instance_of::<PyOSError>(py) {
            return Err(PyRuntimeError::new_err(e.value(py).str()?.to_string()));
        }
        return Err(e);
    }
    // Debug mode: where it was registered (asyncio's Handle is made in
    // `add_signal_handler`, a frame not here).
    let tb = if core.debug(py) {
        Some(crate::event_loop::extract_stack(py, 1)?)
    } else {
        None
    };
    let handle = types()?.new_handle(
        callback,
        args,
        slf.as_any(),
        py::copy_context(py)?,
        tb,
        None,
        !core.state.with(py, |s| s.thread_id.is_some()),
    )?;
    let item = OwnedHandle::new(&handle);
    let old = core
        .state
        .with(py, |s| s.signals.handlers.insert(signum, item));
    drop(old);
    let signal_mod = py.import("signal")?;
    let installed = signal_mod
        .call_method1("signal", (signum, wrap_noop(py)?))
        .and_then(|_| signal_mod.call_method1("siginterrupt", (signum, false)));
    if let Err(e) = installed {
        let (removed, empty) = core.state.with(py, |s| {
            let r = s.signals.handlers.remove(&signum);
            (r, s.signals.handlers.is_empty())
        });
        drop(removed);
        if empty {
            clear_wakeup_fd(py)?;
        }
        if is_einval(py, &e) {
            return Err(PyRuntimeError::new_err(format!(
                "sig {signum} cannot be caught"
            )));
        }
        return Err(e);
    }
    Ok(())
}

fn wrap_noop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    import_attr!(py, "ferroloop._ferroloop", "_sighandler_noop").cloned()
}

pub(crate) fn remove_signal_handler(
    slf: &Bound<'_, LoopCore>,
    sig: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    let py = slf.py();
    let core = slf.get();
    let signum = check_signal(sig)?;
    let removed = core.state.with(py, |s| s.signals.handlers.remove(&signum));
    let Some(removed) = removed else {
        return Ok(false);
    };
    drop(removed);
    let signal_mod = py.import("signal")?;
    let handler = if signum == libc::SIGINT {
        signal_mod.getattr("default_int_handler")?
    } else {
        signal_mod.getattr("SIG_DFL")?
    };
    if let Err(e) = signal_mod.call_method1("signal", (signum, handler)) {
        if is_einval(py, &e) {
            return Err(PyRuntimeError::new_err(format!(
                "sig {signum} cannot be caught"
            )));
        }
        return Err(e);
    }
    let (empty, restored_on_exit) = core.state.with(py, |s| {
        (
            s.signals.handlers.is_empty(),
            s.thread_id.is_some() && s.signals.saved_wakeup_fd.is_some(),
        )
    });
    // NOTE: while run_forever runs on the main thread with its own wake-up fd installed
    //       (Ctrl+C must wake the poll), it restores the previous one on exit.
    if empty && !restored_on_exit {
        clear_wakeup_fd(py)?;
    }
    Ok(true)
}

/// On close: remove every handler (asyncio skips that, with a ResourceWarning, while the
/// interpreter is finalizing).
pub(crate) fn remove_all(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    let sigs: Vec<i32> = slf
        .get()
        .state
        .with(py, |s| s.signals.handlers.keys().copied().collect());
    if sigs.is_empty() {
        return Ok(());
    }
    let finalizing = import_attr!(py, "sys", "is_finalizing")?
        .call0()?
        .is_truthy()?;
    if finalizing {
        let warn = import_attr!(py, "warnings", "warn")?;
        let msg = format!(
            "Closing the loop {} on interpreter shutdown stage, skipping signal handlers removal",
            slf.repr()?
        );
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("source", slf)?;
        warn.call(
            (msg, py.get_type::<pyo3::exceptions::PyResourceWarning>()),
            Some(&kwargs),
        )?;
        let taken = slf.get().state.with(py, |s| s.signals.take_handles());
        drop(taken);
        return Ok(());
    }
    for sig in sigs {
        remove_signal_handler(slf, &sig.into_pyobject(py)?.into_any())?;
    }
    Ok(())
}

pub(crate) fn on_main_thread(py: Python<'_>) -> PyResult<bool> {
    let mut main = MAIN_IDENT.load(Ordering::Relaxed);
    if main == 0 {
        let thread = import_attr!(py, "threading", "main_thread")?.call0()?;
        let ident: Option<u64> = thread.getattr("ident")?.extract()?;
        main = ident.unwrap_or(0);
        MAIN_IDENT.store(main, Ordering::Relaxed);
    }
    Ok(main == py::thread_ident())
}

/// `threading.main_thread().ident`, once known (0 before): kept here so that
/// `run_forever` on another thread calls no Python code before it can pause at exit
/// (see `run::at_exit`). A forked child's main thread is the one that forked.
static MAIN_IDENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `run_forever` entry: on the main thread, route signal wake-ups to this loop.
// DEVIATION(asyncio): asyncio sets the wake-up fd only in add_signal_handler. ferroloop also
//   installs it for the duration of run_forever (when no other wake-up fd is set), so a
//   Ctrl+C delivered to another thread still wakes the poll, as uvloop does.
pub(crate) fn enter_run(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    if !on_main_thread(py)? {
        return Ok(());
    }
    let Some(wfd) = slf.get().state.with(py, |s| s.signals.write_fd()) else {
        return Ok(());
    };
    match set_wakeup_fd(py, wfd as i64) {
        Ok(prev) if prev != -1 && prev != wfd as i64 => {
            // NOTE: another wake-up fd is installed (another loop's signal handlers, or the
            //       application's): keep it, so its signals still reach it. Ctrl+C still
            //       interrupts this loop's poll through EINTR on the main thread.
            set_wakeup_fd(py, prev)?;
            Ok(())
        }
        Ok(prev) => {
            slf.get()
                .state
                .with(py, |s| s.signals.saved_wakeup_fd = Some(prev));
            Ok(())
        }
        // Not the main interpreter, or signals unavailable: run without wake-ups.
        Err(e) if e.is_instance_of::<PyValueError>(py) => Ok(()),
        Err(e) => Err(e),
    }
}

/// After the loop got a new wake-up socket in a forked child (`LoopCore::rehome_if_forked`):
/// installs it where the old one was wanted. The child's copy of the old one was dropped
/// at the fork (`_after_fork_child`); a wake-up fd installed since is left in place.
pub(crate) fn after_rehome(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    let (wants, wfd) = slf
        .get()
        .state
        .with(py, |s| (s.signals.wants_wakeup_fd(), s.signals.write_fd()));
    let Some(wfd) = wfd.filter(|_| wants) else {
        return Ok(());
    };
    if !on_main_thread(py)? {
        return Ok(());
    }
    match set_wakeup_fd(py, wfd as i64) {
        Ok(prev) if prev != -1 => set_wakeup_fd(py, prev).map(drop),
        Ok(_) => Ok(()),
        Err(e) if e.is_instance_of::<PyValueError>(py) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `run_forever` exit: put back the previous wake-up fd unless handlers still need ours.
pub(crate) fn leave_run(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    let (saved, keep, ours) = slf.get().state.with(py, |s| {
        (
            s.signals.saved_wakeup_fd.take(),
            !s.signals.handlers.is_empty(),
            s.signals.write_fd(),
        )
    });
    let Some(prev) = saved else {
        return Ok(());
    };
    if keep {
        return Ok(());
    }
    let ours = ours.map(|f| f as i64);
    let restore = if Some(prev) == ours { -1 } else { prev };
    let current = set_wakeup_fd(py, restore)?;
    if current != restore && Some(current) != ours {
        // Installed while this loop ran (another loop's signal handlers, the
        // application's): it stays.
        set_wakeup_fd(py, current)?;
    }
    Ok(())
}

/// The wake-up socket was readable: schedule the handlers of the signals that arrived
/// (asyncio's `_handle_signal`), then run Python-level handlers.
pub(crate) fn dispatch(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    let t = types()?;
    let data = core.state.with(py, |s| s.signals.drain());
    for signum in data {
        if signum == 0 {
            continue;
        }
        let signum = signum as i32;
        let handle = core.state.with(py, |s| {
            s.signals.handlers.get(&signum).map(|h| h.clone_ref(py))
        });
        let Some(handle) = handle else { continue };
        if t.is_cancelled(handle.bind(py)) {
            drop(handle);
            remove_signal_handler(slf, &signum.into_pyobject(py)?.into_any())?;
        } else {
            core.state.with(py, |s| s.ready.push(handle.into()));
        }
    }
    py::check_signals(py)
}
