//! The event loop core. Mirrors asyncio.base_events.BaseEventLoop with the selector loop
//! (selector_events.BaseSelectorEventLoop) and the Unix signal handling of unix_events.
//!
//! `LoopCore` holds all loop state; the Python `ferroloop.Loop` class combines it with
//! `asyncio.AbstractEventLoop` and adds the cold, coroutine-shaped methods.

pub(crate) mod backlog;
mod exception_handler;
mod fdmap;
pub(crate) mod run;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{
    PyAttributeError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::dns;
use crate::errors;
use crate::py::context::RunContext;
use crate::py::fastcall::SchedArgs;
use crate::py::handle::{self, OwnedHandle, Ready, types};
use crate::py::{self, GilCell, import_attr};
use crate::reactor::{Poller, Registrar};
use crate::ready::ReadyQueue;
use crate::signals::SignalState;
use crate::sock;
use crate::timers::TimerQueue;

/// asyncio's `MAXIMUM_SELECT_TIMEOUT`: 24 hours.
const MAXIMUM_SELECT_TIMEOUT: f64 = 24.0 * 3600.0;

/// Hashes a file descriptor (or another small integer key) as itself: the loop's maps
/// are looked up on every I/O event and are keyed by distinct small integers, so
/// SipHash's flood resistance buys nothing there.
#[derive(Default)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        // Spread the bits (Fibonacci hashing): hashbrown uses the top bits as tags.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_i32(&mut self, n: i32) {
        self.0 = u64::from(n as u32);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(crate) use fdmap::FdMap;
/// A set of file descriptors.
pub(crate) type FdSet = HashSet<RawFd, BuildHasherDefault<IntHasher>>;

/// The reader and writer handles registered for one file descriptor.
#[derive(Default)]
pub(crate) struct IoHandles {
    pub reader: Option<OwnedHandle>,
    pub writer: Option<OwnedHandle>,
    /// The reader / writer was registered edge-triggered (by a native transport or a
    /// sock_* operation): its events are not re-armed after dispatch; the owner asks for
    /// the reader to run again (`LoopCore::redispatch`) when it stops short of draining
    /// the descriptor.
    pub edge_r: bool,
    pub edge_w: bool,
    /// The file object (not a plain int) last given to `add_reader` / `add_writer` for
    /// this descriptor: `remove_*` finds the registration by it once the object is
    /// closed and its `fileno()` is -1, as the selectors module does. Dropped outside
    /// `GilCell::with` (a strong reference can run a finaliser).
    pub fileobj: Option<FileObj>,
}

/// A file object given to `add_reader` / `add_writer`: weakly when it supports weak
/// references (a socket), otherwise strongly, as the selectors module keeps it.
pub(crate) enum FileObj {
    Weak(Py<pyo3::types::PyWeakrefReference>),
    Strong(Py<PyAny>),
}

impl FileObj {
    fn new(obj: &Bound<'_, PyAny>) -> Self {
        match pyo3::types::PyWeakrefReference::new(obj) {
            Ok(w) => FileObj::Weak(w.unbind()),
            Err(_) => FileObj::Strong(obj.clone().unbind()),
        }
    }

    /// Whether this is `obj`. Runs no Python code: a live referent had a reference
    /// before the one `upgrade` takes, so dropping that one frees nothing.
    fn is(&self, obj: &Bound<'_, PyAny>) -> bool {
        match self {
            FileObj::Weak(w) => w.bind(obj.py()).upgrade().is_some_and(|o| o.is(obj)),
            FileObj::Strong(o) => o.as_ptr() == obj.as_ptr(),
        }
    }
}

impl IoHandles {
    /// Some handle wants level-triggered events (re-armed after each dispatch).
    pub fn level(&self) -> bool {
        (self.reader.is_some() && !self.edge_r) || (self.writer.is_some() && !self.edge_w)
    }
}

/// What the epoll registration of a descriptor watches, and for which socket object.
pub(crate) struct Armed {
    pub read: bool,
    pub write: bool,
    /// A weak reference to the socket a sock_* operation registered the descriptor for.
    /// While that object is alive and still has this descriptor, the registration is
    /// its own (the kernel drops a registration only when the file is closed).
    pub owner: Option<Py<pyo3::types::PyWeakrefReference>>,
}

/// Everything the loop mutates. Owned by whichever thread holds the GIL (see `GilCell`).
pub(crate) struct State {
    pub ready: ReadyQueue<Ready>,
    pub timers: TimerQueue<OwnedHandle>,
    pub stopping: bool,
    pub closed: bool,
    /// `threading.get_ident()` of the thread running the loop, if it is running.
    pub thread_id: Option<u64>,
    pub debug: bool,
    pub slow_callback_duration: f64,
    /// The object last assigned to `slow_callback_duration` (an int stays an int, as an
    /// attribute of asyncio's loop would); None while it is the default 0.1.
    pub slow_callback_obj: Option<Py<PyAny>>,
    /// Whether `self.time()` may not be ferroloop's clock (see `refresh_clock`): then
    /// `call_later` reads it, as asyncio's does.
    pub foreign_clock: bool,
    pub task_factory: Option<Py<PyAny>>,
    /// `{"loop": <this loop>}`, the keyword arguments `create_future` / `create_task` give
    /// asyncio's Future and Task (made at first use; a cycle the collector sees).
    pub loop_kwargs: Option<Py<PyDict>>,
    /// `self.call_soon` bound once while the loop runs (see `py::fastcall::SoonDescr`).
    pub soon_bound: Option<Py<PyAny>>,
    /// While running off the main thread: how the exit handler pauses it (`run::at_exit`).
    pub exit_entry: Option<std::sync::Arc<run::at_exit::Entry>>,
    /// add_reader / add_writer registrations, by fd.
    pub io: FdMap<IoHandles>,
    /// Descriptors still registered with the reactor after their last handle went:
    /// adding a handle again re-arms them instead of registering anew.
    pub idle_fds: FdSet,
    /// The interest of the epoll registrations sock_* operations made, and the socket
    /// object each was made for (see `LoopCore::add_io_fd_owned`).
    pub armed: FdMap<Armed>,
    /// Descriptors whose events were dispatched since the last poll: re-armed right
    /// before the next poll if they still have handles (see `run_once`).
    pub rearm: FdSet,
    /// Edge-triggered descriptors a transport left readable on purpose (it stopped at
    /// its per-event budget): their readers run again at the next iteration without a
    /// system call (see `LoopCore::redispatch`).
    pub redispatch: Vec<RawFd>,
    pub signals: SignalState,
    /// The handle being run, in debug mode (for the default exception handler).
    pub current_handle: Option<OwnedHandle>,
    /// `None` once the loop is closed.
    pub registrar: Option<Registrar>,
    /// True while the loop thread is blocked in poll with the GIL released: a
    /// cross-thread `call_soon_threadsafe` must then wake it.
    pub polling: bool,
    /// The number of the current batch (threads count their posts per batch), and
    /// whether a poster waited for it in vain (see `backlog`).
    pub batch: u64,
    pub gave_up: bool,
    /// Posters waiting in `backlog` for the current batch to end.
    pub waiters: usize,
    pub backlog: Arc<backlog::Backlog>,
    /// A wake-up was sent and not yet consumed (coalesces wake-ups).
    pub wake_pending: bool,
    /// `monotonic_ns()` after the last poll; `i64::MIN` forces the next poll.
    pub last_poll_ns: i64,
    /// Where resolver threads deliver getaddrinfo/getnameinfo answers.
    pub dns_inbox: Arc<dns::Inbox>,
    /// Futures of resolutions in flight, by request id.
    pub dns_pending: HashMap<u64, Py<PyAny>, BuildHasherDefault<IntHasher>>,
    pub dns_next: u64,
    /// The native transports (borrowed, see `TransportRef`), by descriptor, until their
    /// connection is lost (asyncio's `_transports`): `add_reader` & co. refuse their descriptors
    /// unless they are closing. Also how a server finds its clients.
    pub transports: FdMap<crate::transports::TransportRef>,
    /// Descriptors of stream transports lent to `sock_sendfile` (between
    /// `_make_empty_waiter` and `_reset_empty_waiter`): not refused.
    pub lent_fds: FdSet,
}

#[pyclass(
    subclass,
    weakref,
    frozen,
    name = "LoopCore",
    module = "ferroloop._ferroloop"
)]
pub struct LoopCore {
    pub(crate) state: GilCell<State>,
    /// The blocking half of the reactor. Only the thread running the loop locks it, for
    /// the duration of one poll (the GIL is released meanwhile); `close` takes it.
    pub(crate) poller: Mutex<Option<Poller>>,
    /// `time.get_clock_info('monotonic').resolution`.
    clock_resolution: f64,
    /// The context callbacks with a captured mapping run in (see `py::context`).
    pub(crate) run_ctx: RunContext,
}

/// How a scheduling method reports itself in debug mode, as asyncio's does.
#[derive(Clone, Copy)]
struct Api {
    /// The name in `_check_callback`'s messages.
    name: &'static str,
    /// Whether `_check_thread` applies.
    check_thread: bool,
    /// asyncio's own frames it trims from a handle's `_source_traceback`.
    dropped_frames: usize,
}

const CALL_SOON: Api = Api {
    name: "call_soon",
    check_thread: true,
    dropped_frames: 2,
};
const CALL_SOON_THREADSAFE: Api = Api {
    name: "call_soon_threadsafe",
    check_thread: false,
    dropped_frames: 2,
};
// NOTE: asyncio's call_later delegates to call_at, so its messages name call_at.
const CALL_LATER: Api = Api {
    name: "call_at",
    check_thread: true,
    dropped_frames: 3,
};
const CALL_AT: Api = Api {
    name: "call_at",
    check_thread: true,
    dropped_frames: 2,
};

fn closed_error() -> PyErr {
    PyRuntimeError::new_err("Event loop is closed")
}

impl LoopCore {
    #[inline]
    pub(crate) fn debug(&self, py: Python<'_>) -> bool {
        self.state.with(py, |s| s.debug)
    }

    /// asyncio's `_timer_handle_cancelled`: counts cancelled timers still in the heap.
    /// Only ferroloop's timer handles are read natively; anything else is asked for its
    /// `_scheduled` attribute, as asyncio does.
    pub(crate) fn timer_handle_cancelled(&self, h: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = h.py();
        let t = types()?;
        let scheduled = if t.is_timer(h) {
            t.is_scheduled(h)
        } else {
            h.getattr(pyo3::intern!(py, "_scheduled"))?.is_truthy()?
        };
        if scheduled {
            self.state.with(py, |s| s.timers.note_cancelled());
        }
        Ok(())
    }

    #[inline]
    fn check_closed(&self, py: Python<'_>) -> PyResult<()> {
        if self.state.with(py, |s| s.closed) {
            return Err(closed_error());
        }
        Ok(())
    }

    /// asyncio's `_check_thread` (debug mode only).
    fn check_thread(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(tid) = self.state.with(py, |s| s.thread_id)
            && tid != py::thread_ident()
        {
            return Err(PyRuntimeError::new_err(
                "Non-thread-safe operation invoked on an event loop other than the current one",
            ));
        }
        Ok(())
    }

    /// The checks `call_soon` & co. make: closed loop always; thread and callback in debug mode.
    /// Returns the creation traceback to store in debug mode.
    #[inline]
    fn check_call<'py>(
        &self,
        py: Python<'py>,
        callback: &Bound<'py, PyAny>,
        api: Api,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (closed, debug) = self.state.with(py, |s| (s.closed, s.debug));
        if closed {
            return Err(closed_error());
        }
        if !debug {
            return Ok(None);
        }
        // Debug mode runs Python code here, on whichever thread called.
        py::thread_exit::register();
        if api.check_thread {
            self.check_thread(py)?;
        }
        check_callback(callback, api.name)?;
        Ok(Some(extract_stack(py, api.dropped_frames)?))
    }

    #[inline]
    fn new_handle<'py>(
        slf: &Bound<'py, Self>,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        context: Option<Bound<'py, PyAny>>,
        source_traceback: Option<Bound<'py, PyAny>>,
        when: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let context = match context {
            Some(c) if !c.is_none() => c,
            _ => py::context::capture(py)?,
        };
        let track = !slf.get().is_running(py);
        types()?.new_handle(
            callback,
            args,
            slf.as_any(),
            context,
            source_traceback,
            when,
            track,
        )
    }

    /// Schedules a timer handle at `when` (seconds on the loop clock).
    fn schedule_timer<'py>(
        slf: &Bound<'py, Self>,
        when: f64,
        when_obj: Bound<'py, PyAny>,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        context: Option<Bound<'py, PyAny>>,
        api: Api,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let core = slf.get();
        let tb = core.check_call(py, callback, api)?;
        let handle = Self::new_handle(slf, callback, args, context, tb, Some(when_obj))?;
        types()?.set_scheduled(&handle, true);
        let item = OwnedHandle::new(&handle);
        core.state.with(py, |s| s.timers.push(when, item));
        Ok(handle)
    }
}

/// asyncio's `_check_callback`.
fn check_callback(callback: &Bound<'_, PyAny>, method: &str) -> PyResult<()> {
    if py::is_coroutine_or_function(callback)? {
        return Err(PyTypeError::new_err(format!(
            "coroutines cannot be used with {method}()"
        )));
    }
    if !py::is_callable(callback) {
        return Err(PyTypeError::new_err(format!(
            "a callable object was expected by {method}(), got {}",
            callback.repr()?
        )));
    }
    Ok(())
}

/// `format_helpers.extract_stack()` of the calling Python frame (debug mode).
///
/// asyncio extracts `DEBUG_STACK_DEPTH` frames starting inside its own methods and then
/// drops those `dropped_frames` internal frames; ferroloop's methods have no Python frames,
/// so it extracts that many fewer, giving the same list.
pub(crate) fn extract_stack(py: Python<'_>, dropped_frames: usize) -> PyResult<Bound<'_, PyAny>> {
    let getframe = import_attr!(py, "sys", "_getframe")?;
    let extract = import_attr!(py, "asyncio.format_helpers", "extract_stack")?;
    let depth: usize = import_attr!(py, "asyncio.constants", "DEBUG_STACK_DEPTH")?.extract()?;
    extract.call1((getframe.call1((0,))?, depth.saturating_sub(dropped_frames)))
}

/// The integer behind a file object, as asyncio's `_ensure_fd_no_transport` and
/// `selectors._fileobj_to_fd` find it: an int, or `int(fileobj.fileno())`.
fn fileobj_to_int<'py>(fileobj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = fileobj.py();
    if fileobj.is_instance_of::<PyInt>() {
        return Ok(fileobj.clone());
    }
    let res = fileobj
        .call_method0(pyo3::intern!(py, "fileno"))
        .and_then(|f| py.get_type::<PyInt>().call1((f,)));
    match res {
        Ok(fd) => Ok(fd),
        Err(e)
            if e.is_instance_of::<PyAttributeError>(py)
                || e.is_instance_of::<PyTypeError>(py)
                || e.is_instance_of::<PyValueError>(py) =>
        {
            Err(PyValueError::new_err(format!(
                "Invalid file object: {}",
                fileobj.repr()?
            )))
        }
        Err(e) => Err(e),
    }
}

/// A descriptor number as the selector sees it.
enum FdNum {
    Fd(RawFd),
    /// Larger than a C int: epoll cannot take it (asyncio raises OverflowError on add).
    TooLarge,
}

/// asyncio's ValueError for negative descriptors; C-int range otherwise.
fn classify_fd(n: &Bound<'_, PyAny>) -> PyResult<FdNum> {
    if n.lt(0)? {
        return Err(PyValueError::new_err(format!(
            "Invalid file descriptor: {n}"
        )));
    }
    Ok(match n.extract::<i32>() {
        Ok(fd) => FdNum::Fd(fd),
        Err(_) => FdNum::TooLarge,
    })
}

/// Calls a custom task factory. Python 3.14 passes every keyword argument through; older
/// Pythons call `factory(loop, coro)` (adding `context=` only when one is given) and
/// apply `name` with `set_name`, so factories written for them keep working. Keyword
/// arguments those Pythons did not have (`eager_start`, ...) are passed through.
fn call_task_factory<'py>(
    slf: &Bound<'py, LoopCore>,
    factory: &Bound<'py, PyAny>,
    coro: &Bound<'py, PyAny>,
    kwargs: Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    if py::version(py) >= (3, 14) {
        return factory.call((slf, coro), Some(&kwargs));
    }
    let name = kwargs.get_item("name")?;
    if name.is_some() {
        kwargs.del_item("name")?;
    }
    if kwargs.get_item("context")?.is_some_and(|c| c.is_none()) {
        kwargs.del_item("context")?;
    }
    let kwargs = (!kwargs.is_empty()).then_some(kwargs);
    let task = factory.call((slf, coro), kwargs.as_ref())?;
    if let Some(name) = name.filter(|n| !n.is_none()) {
        // Before 3.13 asyncio tolerates a task without set_name() (a DeprecationWarning
        // on 3.11/3.12), through this helper; 3.13 calls the method.
        match import_attr!(py, "asyncio.tasks", "_set_task_name") {
            Ok(set_task_name) => set_task_name.call1((&task, name))?,
            Err(_) => task.call_method1("set_name", (name,))?,
        };
    }
    Ok(task)
}

#[pymethods]
impl LoopCore {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let py = _args.py();
        run::at_exit::park_if_stale_thread(py);
        let (poller, registrar) = Poller::new().map_err(|e| errors::from_io(py, e))?;
        let signals = SignalState::new(&registrar).map_err(|e| errors::from_io(py, e))?;
        let dns_inbox = dns::Inbox::new(&registrar.waker());
        Ok(LoopCore {
            state: GilCell::new(State {
                ready: ReadyQueue::new(),
                timers: TimerQueue::new(),
                stopping: false,
                closed: false,
                thread_id: None,
                debug: false,
                slow_callback_duration: 0.1,
                slow_callback_obj: None,
                foreign_clock: false,
                task_factory: None,
                loop_kwargs: None,
                soon_bound: None,
                exit_entry: None,
                io: FdMap::default(),
                idle_fds: FdSet::default(),
                armed: FdMap::default(),
                rearm: FdSet::default(),
                redispatch: Vec::new(),
                signals,
                current_handle: None,
                registrar: Some(registrar),
                polling: false,
                batch: 0,
                gave_up: false,
                waiters: 0,
                backlog: Arc::default(),
                wake_pending: false,
                last_poll_ns: i64::MIN,
                dns_inbox,
                dns_pending: HashMap::default(),
                dns_next: 0,
                transports: FdMap::default(),
                lent_fds: FdSet::default(),
            }),
            poller: Mutex::new(Some(poller)),
            clock_resolution: crate::sys::monotonic_resolution(),
            run_ctx: RunContext::default(),
        })
    }

    #[getter]
    fn _clock_resolution(&self) -> f64 {
        self.clock_resolution
    }

    /// Called by `Loop.__setattr__` / `__delattr__` for `time`: `call_later` checks the
    /// clock from now on (until an iteration finds it is ferroloop's again).
    fn _clock_maybe_replaced(&self, py: Python<'_>) {
        self.state.with(py, |s| s.foreign_clock = true);
    }

    fn _timer_handle_cancelled(&self, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        self.timer_handle_cancelled(handle)
    }

    /// Runs callbacks until `stop()`; the Python `run_forever` wraps it with the
    /// running-loop and async-generator bookkeeping.
    fn _run_forever_core(slf: &Bound<'_, Self>) -> PyResult<()> {
        run::run_forever(slf)
    }

    fn stop(&self, py: Python<'_>) {
        self.state.with(py, |s| {
            s.stopping = true;
            // A loop paused at interpreter exit (see `run::at_exit`) runs on to stop.
            if let Some(entry) = &s.exit_entry {
                entry.resume_to_stop();
            }
        });
    }

    fn _check_closed(&self, py: Python<'_>) -> PyResult<()> {
        self.check_closed(py)
    }

    #[getter]
    fn _thread_id(&self, py: Python<'_>) -> Option<u64> {
        self.state.with(py, |s| s.thread_id)
    }

    #[getter]
    fn _stopping(&self, py: Python<'_>) -> bool {
        self.state.with(py, |s| s.stopping)
    }

    #[getter]
    fn _current_handle(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.state.with(py, |s| {
            s.current_handle
                .as_ref()
                .map(|h| h.bind(py).clone().unbind())
        })
    }

    /// Releases the reactor, the queues and the signal handlers. The Python `close`
    /// adds the executor shutdown.
    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        run::at_exit::park_if_stale_thread(py);
        let core = slf.get();
        let (running, closed) = core.state.with(py, |s| (s.thread_id.is_some(), s.closed));
        if running {
            return Err(PyRuntimeError::new_err("Cannot close a running event loop"));
        }
        if closed {
            return Ok(());
        }
        let (ready, timers, io, factory, registrar, dns_pending, transports, inbox) =
            core.state.with(py, |s| {
                s.closed = true;
                (
                    s.ready.drain(),
                    s.timers.drain(),
                    std::mem::take(&mut s.io),
                    s.task_factory.take(),
                    s.registrar.take(),
                    std::mem::take(&mut s.dns_pending),
                    (
                        std::mem::take(&mut s.transports),
                        std::mem::take(&mut s.armed),
                        s.loop_kwargs.take(),
                    ),
                    s.dns_inbox.clone(),
                )
            });
        // NOTE: as asyncio's close: queued callbacks and timers are dropped (timers keep
        //       `_scheduled`, reader/writer handles are not cancelled), and nothing below
        //       can stop the clean-up half-way.
        if let Some(r) = &registrar {
            for fd in io.keys() {
                let _ = r.deregister(fd);
            }
        }
        let poller = core.poller.lock().map(|mut p| p.take()).unwrap_or(None);
        let signals = core.state.with(py, |s| s.signals.close());
        core.run_ctx.clear(py);
        drop((
            ready,
            timers,
            io,
            factory,
            registrar,
            poller,
            signals,
            dns_pending,
            transports,
        ));
        // A resolver thread delivering an answer right now holds the waker: wait for it
        // to let go, so that the waker's descriptor is closed when this returns.
        inbox.quiesce();
        // As asyncio's unix loop: handlers are removed once the loop itself is closed, so
        // a failure here (e.g. closing from another thread) leaves a closed loop.
        crate::signals::remove_all(slf)
    }

    /// Any value, as asyncio (which stores it as given) and uvloop (which takes its
    /// truth value) accept: `set_debug(0)` is common in tests.
    fn set_debug(slf: &Bound<'_, Self>, enabled: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let enabled = enabled.is_truthy()?;
        let running = slf.get().state.with(py, |s| {
            s.debug = enabled;
            s.thread_id.is_some()
        });
        if running {
            let cb = slf.getattr("_set_coroutine_origin_tracking")?;
            let args = SchedArgs {
                lead: [Some(cb), None],
                args: PyTuple::new(py, [enabled])?,
                context: None,
            };
            Self::call_soon_threadsafe_impl(slf, args)?;
        }
        Ok(())
    }

    #[getter]
    fn get_slow_callback_duration(&self, py: Python<'_>) -> Py<PyAny> {
        let (seconds, obj) = self.state.with(py, |s| {
            (
                s.slow_callback_duration,
                s.slow_callback_obj.as_ref().map(|o| o.clone_ref(py)),
            )
        });
        obj.unwrap_or_else(|| PyFloat::new(py, seconds).into_any().unbind())
    }

    #[setter]
    fn set_slow_callback_duration(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        // NOTE: asyncio stores any object and fails at the first comparison in debug
        //       mode; a value that is not a real number is refused here instead.
        let seconds: f64 = value.extract()?;
        let py = value.py();
        let old = self.state.with(py, |s| {
            s.slow_callback_duration = seconds;
            s.slow_callback_obj.replace(value.clone().unbind())
        });
        drop(old);
        Ok(())
    }

    // ---- futures and tasks -------------------------------------------------------------

    fn set_task_factory(&self, py: Python<'_>, factory: Py<PyAny>) -> PyResult<()> {
        let factory = if factory.is_none(py) {
            None
        } else {
            if !py::is_callable(factory.bind(py)) {
                return Err(PyTypeError::new_err(
                    "task factory must be a callable or None",
                ));
            }
            Some(factory)
        };
        let old = self
            .state
            .with(py, |s| std::mem::replace(&mut s.task_factory, factory));
        drop(old);
        Ok(())
    }

    fn get_task_factory(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.state
            .with(py, |s| s.task_factory.as_ref().map(|f| f.clone_ref(py)))
    }

    // ---- file descriptors --------------------------------------------------------------

    #[pyo3(signature = (fd, callback, *args))]
    fn add_reader<'py>(
        slf: &Bound<'py, Self>,
        fd: &Bound<'py, PyAny>,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
    ) -> PyResult<()> {
        Self::check_no_transport(slf, fd)?;
        Self::add_io_handle(slf, fd, callback, args, true).map(drop)
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn add_writer<'py>(
        slf: &Bound<'py, Self>,
        fd: &Bound<'py, PyAny>,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
    ) -> PyResult<()> {
        Self::check_no_transport(slf, fd)?;
        Self::add_io_handle(slf, fd, callback, args, false).map(drop)
    }

    fn _ensure_fd_no_transport(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<()> {
        let n = fileobj_to_int(fd)?;
        if let Ok(FdNum::Fd(n)) = classify_fd(&n) {
            slf.get().ensure_fd_no_transport(slf.py(), n)?;
        }
        Ok(())
    }

    // ---- transports --------------------------------------------------------------------

    /// The open connections `server` accepted (`Server.close_clients()` & co.).
    fn _server_clients<'py>(
        slf: &Bound<'py, Self>,
        server: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        crate::transports::server_clients(slf, server)
    }

    /// Whether `transport` is a native TCP / Unix stream transport (whose server finds it
    /// with `_server_clients`).
    #[staticmethod]
    fn _is_native_stream(transport: &Bound<'_, PyAny>) -> PyResult<bool> {
        crate::transports::is_stream_socket_transport(transport)
    }

    #[pyo3(signature = (sock, protocol, waiter=None, *, extra=None, server=None))]
    fn _make_socket_transport<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        protocol: &Bound<'py, PyAny>,
        waiter: Option<&Bound<'py, PyAny>>,
        extra: Option<&Bound<'py, PyAny>>,
        server: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed(slf.py())?;
        crate::transports::make_socket_transport(slf, sock, protocol, waiter, extra, server)
    }

    #[pyo3(signature = (pipe, protocol, waiter=None, extra=None))]
    fn _make_read_pipe_transport<'py>(
        slf: &Bound<'py, Self>,
        pipe: &Bound<'py, PyAny>,
        protocol: &Bound<'py, PyAny>,
        waiter: Option<&Bound<'py, PyAny>>,
        extra: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed(slf.py())?;
        crate::transports::make_pipe_transport(slf, pipe, protocol, waiter, extra, true)
    }

    #[pyo3(signature = (pipe, protocol, waiter=None, extra=None))]
    fn _make_write_pipe_transport<'py>(
        slf: &Bound<'py, Self>,
        pipe: &Bound<'py, PyAny>,
        protocol: &Bound<'py, PyAny>,
        waiter: Option<&Bound<'py, PyAny>>,
        extra: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed(slf.py())?;
        crate::transports::make_pipe_transport(slf, pipe, protocol, waiter, extra, false)
    }

    #[pyo3(signature = (sock, protocol, address=None, waiter=None, extra=None))]
    fn _make_datagram_transport<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        protocol: &Bound<'py, PyAny>,
        address: Option<&Bound<'py, PyAny>>,
        waiter: Option<&Bound<'py, PyAny>>,
        extra: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().check_closed(slf.py())?;
        crate::transports::make_datagram_transport(slf, sock, protocol, address, waiter, extra)
    }

    fn remove_reader(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        Self::check_no_transport(slf, fd)?;
        Self::remove_io(slf, fd, true)
    }

    fn remove_writer(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        Self::check_no_transport(slf, fd)?;
        Self::remove_io(slf, fd, false)
    }

    // ---- signals -----------------------------------------------------------------------

    #[pyo3(signature = (sig, callback, *args))]
    fn add_signal_handler<'py>(
        slf: &Bound<'py, Self>,
        sig: &Bound<'py, PyAny>,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
    ) -> PyResult<()> {
        crate::signals::add_signal_handler(slf, sig, callback, args)
    }

    fn remove_signal_handler(slf: &Bound<'_, Self>, sig: &Bound<'_, PyAny>) -> PyResult<bool> {
        crate::signals::remove_signal_handler(slf, sig)
    }

    // ---- sockets: each returns a native coroutine (see `sock::SockOperation`) ----------

    fn sock_recv(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        n: &Bound<'_, PyAny>,
    ) -> PyResult<sock::SockOperation> {
        let op = match sock::recv_size(n) {
            Ok(Some(n)) if sock::is_plain_socket(sock) => sock::Op::Recv(n),
            // Unusual sizes: `sock.recv(n)` itself raises or handles them.
            _ => sock::call_op("recv", &[n], sock::Dir::Read),
        };
        Ok(sock::SockOperation::new(slf, sock, "sock_recv", op))
    }

    fn sock_recv_into(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
    ) -> sock::SockOperation {
        let op = sock::call_op("recv_into", &[buf], sock::Dir::Read);
        sock::SockOperation::new(slf, sock, "sock_recv_into", op)
    }

    fn sock_recvfrom(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        bufsize: &Bound<'_, PyAny>,
    ) -> sock::SockOperation {
        let op = sock::call_op("recvfrom", &[bufsize], sock::Dir::Read);
        sock::SockOperation::new(slf, sock, "sock_recvfrom", op)
    }

    #[pyo3(signature = (sock, buf, nbytes=None), text_signature = "($self, sock, buf, nbytes=0)")]
    fn sock_recvfrom_into(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
        nbytes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<sock::SockOperation> {
        // asyncio: `if not nbytes: nbytes = len(buf)`; the socket checks the rest.
        let nbytes = if let Some(n) = nbytes.filter(|n| n.is_truthy().unwrap_or(true)) {
            n.clone()
        } else {
            buf.len()?.into_pyobject(slf.py())?.into_any()
        };
        let op = sock::call_op("recvfrom_into", &[buf, &nbytes], sock::Dir::Read);
        Ok(sock::SockOperation::new(
            slf,
            sock,
            "sock_recvfrom_into",
            op,
        ))
    }

    fn sock_sendall(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
    ) -> sock::SockOperation {
        let op = sock::Op::SendAll {
            data: data.clone().unbind(),
            pos: 0,
            native: sock::is_plain_socket(sock),
            pinned: false,
        };
        sock::SockOperation::new(slf, sock, "sock_sendall", op)
    }

    fn sock_sendto(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
        address: &Bound<'_, PyAny>,
    ) -> sock::SockOperation {
        let op = sock::call_op("sendto", &[data, address], sock::Dir::Write);
        sock::SockOperation::new(slf, sock, "sock_sendto", op)
    }

    fn sock_accept(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>) -> sock::SockOperation {
        sock::SockOperation::new(slf, sock, "sock_accept", sock::Op::Accept)
    }

    /// Connects to an already resolved address (the Python `sock_connect` resolves).
    fn _sock_connect(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        address: &Bound<'_, PyAny>,
    ) -> sock::SockOperation {
        let op = sock::Op::Connect(address.clone().unbind());
        sock::SockOperation::new(slf, sock, "sock_connect", op)
    }

    // ---- name resolution ---------------------------------------------------------------

    /// `socket.getaddrinfo(...)`'s result for numeric hosts, or a future resolved by a
    /// resolver thread. The Python `getaddrinfo` coroutine awaits the latter.
    #[pyo3(signature = (host, port, family=0, r#type=0, proto=0, flags=0))]
    fn _getaddrinfo<'py>(
        slf: &Bound<'py, Self>,
        host: &Bound<'py, PyAny>,
        port: &Bound<'py, PyAny>,
        family: i32,
        r#type: i32,
        proto: i32,
        flags: i32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed(py)?;
        match dns::addrinfo_request(host, port, family, r#type, proto, flags)? {
            Some((request, inline)) => Self::resolve(slf, request, inline),
            None => import_attr!(py, "socket", "getaddrinfo")?
                .call1((host, port, family, r#type, proto, flags)),
        }
    }

    /// `socket.getnameinfo(...)`'s result, or a future (see `_getaddrinfo`).
    #[pyo3(signature = (sockaddr, flags=0))]
    fn _getnameinfo<'py>(
        slf: &Bound<'py, Self>,
        sockaddr: &Bound<'py, PyAny>,
        flags: i32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed(py)?;
        match dns::nameinfo_request(sockaddr, flags)? {
            Some((request, inline)) => Self::resolve(slf, request, inline),
            None => import_attr!(py, "socket", "getnameinfo")?.call1((sockaddr, flags)),
        }
    }

    // ---- garbage collector -------------------------------------------------------------

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // SAFETY: the collector runs with the GIL held and never inside `GilCell::with`.
        let s = unsafe { self.state.get_unchecked() };
        let Ok(t) = types() else { return Ok(()) };
        // NOTE: a running loop is reachable (the frame running it refers to it), and so
        //       is everything its queues hold. Not visiting referents only makes them
        //       look externally referenced, which is then true anyway: the collector
        //       reaches the same verdicts without visiting every queued handle and timer
        //       in each full collection (100k handles in `gather`).
        if s.thread_id.is_some() {
            visit.call(&s.task_factory)?;
            visit.call(&s.slow_callback_obj)?;
            visit.call(&s.loop_kwargs)?;
            visit.call(&s.soon_bound)?;
            // SAFETY: as above.
            return unsafe { self.run_ctx.traverse(|p| visit.call(p)) };
        }
        for item in s.ready.iter() {
            t.traverse_ready(item, |p| visit.call(p))?;
        }
        let handles = s
            .timers
            .iter()
            .chain(
                s.io.values()
                    .flat_map(|io| io.reader.iter().chain(io.writer.iter())),
            )
            .chain(s.signals.handles())
            .chain(s.current_handle.iter());
        for h in handles {
            t.traverse_owned(h, |p| visit.call(p))?;
        }
        for f in s.dns_pending.values() {
            visit.call(f)?;
        }
        visit.call(&s.task_factory)?;
        visit.call(&s.slow_callback_obj)?;
        visit.call(&s.loop_kwargs)?;
        visit.call(&s.soon_bound)?;
        // SAFETY: as above.
        unsafe { self.run_ctx.traverse(|p| visit.call(p)) }
    }

    fn __clear__(&self) {
        // SAFETY: called by the collector with the GIL held, outside any `with`.
        let py = unsafe { Python::assume_attached() };
        let taken = self.state.with(py, |s| {
            (
                s.ready.drain(),
                s.timers.drain(),
                std::mem::take(&mut s.io),
                s.signals.take_handles(),
                s.task_factory.take(),
                s.current_handle.take(),
                std::mem::take(&mut s.dns_pending),
                std::mem::take(&mut s.transports),
                std::mem::take(&mut s.armed),
                s.loop_kwargs.take(),
                s.soon_bound.take(),
                s.slow_callback_obj.take(),
            )
        });
        drop(taken);
        self.run_ctx.clear(py);
    }
}

impl LoopCore {
    // Installed on the type by `py::fastcall::install` as METH_NOARGS methods, without
    // PyO3's trampoline (see there).

    /// The loop clock: `time.monotonic()` (the function itself when it was replaced, as
    /// mocking tools do: asyncio's `time()` calls it).
    pub(crate) fn time(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match clock::replaced_monotonic(py)? {
            Some(f) => Ok(f.call0()?.unbind()),
            None => Ok(PyFloat::new(py, crate::sys::monotonic())
                .into_any()
                .unbind()),
        }
    }

    pub(crate) fn is_running(&self, py: Python<'_>) -> bool {
        self.state.with(py, |s| s.thread_id.is_some())
    }

    pub(crate) fn is_closed(&self, py: Python<'_>) -> bool {
        self.state.with(py, |s| s.closed)
    }

    pub(crate) fn get_debug(&self, py: Python<'_>) -> bool {
        self.debug(py)
    }

    pub(crate) fn create_future<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let future = import_attr!(py, "asyncio.futures", "Future")?;
        Self::new_with_loop(slf, future, &PyTuple::empty(py))
    }

    /// `cls(*args, loop=self)`. For a class whose metaclass is `type` (asyncio's Future
    /// and Task), what calling it does, `tp_new` then `tp_init`, is done here with a
    /// keyword dict the loop keeps: calling the type builds a new dict of the keywords
    /// every time (~260 instructions and a collector-counted object per future or task).
    // NOTE: leaving `loop=` out when this loop is the running one (the C Future then
    //       takes the running loop itself) saves the keyword parsing, ~150 instructions,
    //       but on 3.10 / 3.11 the C running-loop lookup calls getpid(), a system call,
    //       every time: future_chain fell from 2.1M to 1.1M futures/s (tried, reverted).
    fn new_with_loop<'py>(
        slf: &Bound<'py, Self>,
        cls: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        // Futures run Python code in debug mode (their creation stack), on any thread.
        py::thread_exit::register();
        // The dict is reachable through gc.get_referents(loop): used only while it still
        // is exactly {"loop": self}.
        let key = pyo3::intern!(py, "loop");
        let kwargs = slf
            .get()
            .state
            .with(py, |s| s.loop_kwargs.as_ref().map(|d| d.clone_ref(py)))
            .map(|d| d.into_bound(py))
            // SAFETY: reading a live dict's size and its only item (borrowed), GIL held.
            // Its key is compared by identity with the interned "loop" it was made with:
            // cheaper than a lookup, and any other key means the dict was changed.
            .filter(|d| unsafe {
                let (mut pos, mut k, mut v) = (0, std::ptr::null_mut(), std::ptr::null_mut());
                pyo3::ffi::PyDict_Size(d.as_ptr()) == 1
                    && pyo3::ffi::PyDict_Next(d.as_ptr(), &mut pos, &mut k, &mut v) != 0
                    && k == key.as_ptr()
                    && v == slf.as_ptr()
            });
        let kwargs = match kwargs {
            Some(d) => d,
            None => {
                let d = PyDict::new(py);
                d.set_item(key, slf)?;
                let old = slf
                    .get()
                    .state
                    .with(py, |s| s.loop_kwargs.replace(d.clone().unbind()));
                drop(old);
                d
            }
        };
        // SAFETY: `cls` is checked to be a class made by `type` itself, so calling it is
        // type_call: tp_new(cls, args, kwargs), and tp_init on the result if it is an
        // instance of `cls`. Both get borrowed, live arguments and return a new
        // reference / 0, or NULL / -1 with an exception set. The dict is not changed by
        // either (argument parsing only reads it) and stays referenced during the calls.
        unsafe {
            use pyo3::ffi;
            let tp = cls.as_ptr().cast::<ffi::PyTypeObject>();
            let plain_class =
                ffi::Py_TYPE(cls.as_ptr()) == std::ptr::addr_of_mut!(ffi::PyType_Type);
            let Some(new) = (*tp).tp_new.filter(|_| plain_class) else {
                return cls.call(args, Some(&kwargs.copy()?));
            };
            let obj = Bound::from_owned_ptr_or_err(py, new(tp, args.as_ptr(), kwargs.as_ptr()))?;
            if ffi::PyObject_TypeCheck(obj.as_ptr(), tp) == 0 {
                return Ok(obj);
            }
            if let Some(init) = (*ffi::Py_TYPE(obj.as_ptr())).tp_init
                && init(obj.as_ptr(), args.as_ptr(), kwargs.as_ptr()) < 0
            {
                return Err(PyErr::fetch(py));
            }
            Ok(obj)
        }
    }

    /// Resolves inline (numeric input) or on a resolver thread, returning a future then.
    fn resolve<'py>(
        slf: &Bound<'py, Self>,
        request: dns::Request,
        inline: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        if inline {
            return dns::to_python(py, request.resolve());
        }
        let fut = Self::create_future(slf)?;
        // A lookup whose future is cancelled before a resolver thread starts it is not
        // run: a burst of timed-out lookups of a slow name must not hold up later ones.
        let withdrawn = Arc::new(AtomicBool::new(false));
        let flag = withdrawn.clone();
        let on_done = pyo3::types::PyCFunction::new_closure(
            py,
            None,
            None,
            move |args: &Bound<'_, PyTuple>, _kwargs| -> PyResult<()> {
                let fut = args.get_item(0)?;
                if fut
                    .call_method0(pyo3::intern!(args.py(), "cancelled"))?
                    .is_truthy()?
                {
                    flag.store(true, Ordering::Release);
                }
                Ok(())
            },
        )?;
        fut.call_method1(pyo3::intern!(py, "add_done_callback"), (on_done,))?;
        let item = fut.clone().unbind();
        let (id, inbox, previous) = slf.get().state.with(py, |s| {
            s.dns_next += 1;
            let previous = s.dns_pending.insert(s.dns_next, item);
            (s.dns_next, s.dns_inbox.clone(), previous)
        });
        drop(previous); // ids are unique: always None
        if dns::submit(request, inbox, id, withdrawn).is_err() {
            let item = slf.get().state.with(py, |s| s.dns_pending.remove(&id));
            drop(item);
            // No resolver thread could start: asyncio's executor raises this then.
            return Err(PyRuntimeError::new_err("can't start new thread"));
        }
        Ok(fut)
    }

    /// Resolves the futures of resolutions that finished (called by the run loop).
    pub(crate) fn dispatch_resolutions(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let answers = core.state.with(py, |s| s.dns_inbox.take());
        // Every future is completed even if one completion fails; the first error is
        // raised afterwards.
        let mut first_error = None;
        for (id, answer) in answers {
            let Some(fut) = core.state.with(py, |s| s.dns_pending.remove(&id)) else {
                continue;
            };
            let fut = fut.into_bound(py);
            let done = (|| -> PyResult<()> {
                if fut
                    .call_method0(pyo3::intern!(py, "cancelled"))?
                    .is_truthy()?
                {
                    return Ok(());
                }
                match dns::to_python(py, answer) {
                    Ok(v) => fut.call_method1(pyo3::intern!(py, "set_result"), (v,))?,
                    Err(e) => {
                        fut.call_method1(pyo3::intern!(py, "set_exception"), (e.into_value(py),))?
                    }
                };
                Ok(())
            })();
            if let Err(e) = done {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A plain handle for `call_soon` / `call_soon_threadsafe`, after their checks.
    fn soon_handle<'py>(
        slf: &Bound<'py, Self>,
        a: SchedArgs<'py>,
        api: Api,
    ) -> PyResult<(Bound<'py, PyAny>, OwnedHandle)> {
        let (callback, args, context) = a.callback_args(0)?;
        let tb = slf.get().check_call(slf.py(), &callback, api)?;
        let handle = Self::new_handle(slf, &callback, args, context, tb, None)?;
        let item = OwnedHandle::new(&handle);
        Ok((handle, item))
    }

    /// `call_soon` / `call_soon_threadsafe` on an open loop outside debug mode, where
    /// asyncio only checks that the loop is open: `callback(*args[..n])` in `context`
    /// (NULL or None: the current one). `None` when the general path must run.
    /// `from_c_future`: the call comes from asyncio's C Task / Future, which drop the
    /// handle unseen (see `Ready`).
    ///
    /// # Safety
    /// GIL held; `callback`, `args[..n]` and `context` (unless NULL) are live objects.
    #[inline]
    pub(crate) unsafe fn call_soon_fast<'py>(
        slf: &Bound<'py, Self>,
        callback: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        n: usize,
        context: *mut ffi::PyObject,
        threadsafe: bool,
        from_c_future: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = slf.py();
        let core = slf.get();
        let (open, running) = core
            .state
            .with(py, |s| (!s.closed && !s.debug, s.thread_id.is_some()));
        if !open {
            return Ok(None);
        }
        // SAFETY: guaranteed by the caller; borrowed pointers become new references.
        unsafe {
            if !threadsafe
                && !context.is_null()
                && ffi::PyContext_CheckExact(context) != 0
                && ((n == 0 && handle::is_task_step(callback)) || (n == 1 && from_c_future))
            {
                // A C task's step or a C future's done callback: queued without a handle
                // (see `Ready`).
                let item = Ready::Call {
                    callback: Bound::from_borrowed_ptr(py, callback).unbind(),
                    arg: (n == 1).then(|| Bound::from_borrowed_ptr(py, *args).unbind()),
                    context: Bound::from_borrowed_ptr(py, context).unbind(),
                };
                core.state.with(py, |s| s.ready.push(item));
                return Ok(Some(py.None().into_bound(py)));
            }
            let args = py::tuple_from(py, args, n)?;
            let context = if context.is_null() || context == ffi::Py_None() {
                py::context::capture(py)?
            } else {
                Bound::from_borrowed_ptr(py, context)
            };
            let callback = Bound::from_borrowed_ptr(py, callback);
            let handle = types()?.new_handle(
                &callback,
                args,
                slf.as_any(),
                context,
                None,
                None,
                !running,
            )?;
            let item = OwnedHandle::new(&handle);
            if threadsafe {
                core.push_threadsafe(py, item)?;
            } else {
                core.state.with(py, |s| s.ready.push(item.into()));
            }
            Ok(Some(handle))
        }
    }

    /// Wakes the posters waiting for the current batch to end (see `backlog`).
    #[inline]
    pub(crate) fn batch_ended(&self, py: Python<'_>) {
        if let Some(gate) = self.state.with(py, |s| {
            (s.waiters > 0 && s.backlog.usable()).then(|| s.backlog.clone())
        }) {
            gate.batch_ended();
        }
    }

    /// Tells the posters waiting for the current batch that the loop is running it.
    #[inline]
    pub(crate) fn batch_progress(&self, py: Python<'_>) {
        if let Some(gate) = self.state.with(py, |s| {
            (s.waiters > 0 && s.backlog.usable()).then(|| s.backlog.clone())
        }) {
            gate.progress();
        }
    }

    /// Queues `item` from any thread, waking the loop if it is blocked in a poll.
    fn push_threadsafe(&self, py: Python<'_>, item: OwnedHandle) -> PyResult<()> {
        // NOTE: the push happens under the GIL, as asyncio appends to its deque; the
        //       loop sets `polling` under the GIL right before it releases it to block,
        //       so a push that sees `polling == false` is seen by the loop before it
        //       blocks. One wake-up is sent per poll at most.
        let (wake, gate) = self.state.with(py, |s| {
            s.ready.push(item.into());
            if let Some(entry) = &s.exit_entry {
                entry.resume();
            }
            let gate = if let Some(t) = s.thread_id
                && backlog::count_post(std::ptr::from_ref(self) as usize, s.batch)
                && !s.gave_up
                && t != py::thread_ident()
                && s.backlog.usable()
            {
                s.waiters += 1;
                Some(s.backlog.clone())
            } else {
                None
            };
            let wake = if s.polling && !s.wake_pending {
                s.wake_pending = true;
                s.registrar.as_ref().map(|r| r.wake())
            } else {
                None
            };
            (wake, gate)
        });
        // DEVIATION(asyncio): a thread that has posted `backlog::HIGH` callbacks since the
        //   loop's current batch began waits (100 ms at most) for that batch to end,
        //   instead of growing the queue without bound (see `backlog`).
        if let Some(gate) = gate {
            // Finalization may end this thread while it waits (see thread_exit).
            py::thread_exit::register();
            let ended = gate.wait(py);
            self.state.with(py, |s| {
                s.waiters = s.waiters.saturating_sub(1);
                // A loop stuck in a callback: no more waits until its batch ends.
                s.gave_up |= !ended;
            });
        }
        if let Some(Err(e)) = wake {
            return Err(errors::from_io(py, e));
        }
        Ok(())
    }

    /// `call_soon(callback, *args, context=None)` (entry point in `py::fastcall`).
    pub(crate) fn call_soon_impl<'py>(
        slf: &Bound<'py, Self>,
        a: SchedArgs<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (handle, item) = Self::soon_handle(slf, a, CALL_SOON)?;
        slf.get()
            .state
            .with(slf.py(), |s| s.ready.push(item.into()));
        Ok(handle)
    }

    /// `call_soon_threadsafe(callback, *args, context=None)`.
    pub(crate) fn call_soon_threadsafe_impl<'py>(
        slf: &Bound<'py, Self>,
        a: SchedArgs<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (handle, item) = Self::soon_handle(slf, a, CALL_SOON_THREADSAFE)?;
        slf.get().push_threadsafe(slf.py(), item)?;
        Ok(handle)
    }

    /// `call_later(delay, callback, *args, context=None)`.
    pub(crate) fn call_later_impl<'py>(
        slf: &Bound<'py, Self>,
        a: SchedArgs<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let delay = a.lead(0)?;
        let delay = &delay;
        let (callback, args, context) = a.callback_args(1)?;
        if delay.is_none() {
            return Err(PyTypeError::new_err("delay must not be None"));
        }
        let py = slf.py();
        if clock::overrides(slf, pyo3::intern!(py, "call_at"))? {
            // A subclass's call_at sees every timer, as asyncio's call_later goes
            // through `self.call_at(self.time() + delay, ...)`.
            let when = slf.call_method0(pyo3::intern!(py, "time"))?.add(delay)?;
            let mut all = vec![when, callback.into_any()];
            all.extend(args.iter());
            let kwargs = PyDict::new(py);
            if let Some(c) = context {
                kwargs.set_item("context", c)?;
            }
            return slf.call_method(
                pyo3::intern!(py, "call_at"),
                PyTuple::new(py, all)?,
                Some(&kwargs),
            );
        }
        // A replaced clock (`refresh_clock`): `when` is on it, as asyncio's
        // `self.time() + delay`.
        let foreign = if slf.get().state.with(py, |s| s.foreign_clock) {
            clock::foreign_now(slf)?
        } else {
            None
        };
        let base = foreign.unwrap_or_else(crate::sys::monotonic);
        // NOTE: asyncio computes `self.time() + delay`; floats and ints take the fast path,
        //       anything else goes through Python's `+` for identical results and errors.
        let when =
            if delay.is_exact_instance_of::<PyFloat>() || delay.is_exact_instance_of::<PyInt>() {
                base + delay.extract::<f64>()?
            } else {
                PyFloat::new(py, base).add(delay)?.extract::<f64>()?
            };
        let when_obj = PyFloat::new(py, when).into_any();
        Self::schedule_timer(slf, when, when_obj, &callback, args, context, CALL_LATER)
    }

    /// asyncio reads `self.time()` for every `call_later` and, while timers are queued,
    /// in every iteration; ferroloop reads its own clock unless `time` may be replaced
    /// (`clock::may_be_foreign`, checked each iteration and when `time` is assigned on
    /// the loop). Returns that clock's time if it is foreign and timers are queued: the
    /// run loop then tests deadlines against it and sleeps until the first one by it,
    /// as asyncio does (deadlines are kept as given, on whichever clock they were).
    pub(crate) fn refresh_clock(slf: &Bound<'_, Self>) -> PyResult<Option<f64>> {
        let py = slf.py();
        let maybe = clock::may_be_foreign(slf)?;
        let timers = slf.get().state.with(py, |s| {
            s.foreign_clock = maybe;
            !s.timers.is_empty()
        });
        if maybe && timers {
            clock::foreign_now(slf)
        } else {
            Ok(None)
        }
    }

    /// `call_at(when, callback, *args, context=None)`.
    pub(crate) fn call_at_impl<'py>(
        slf: &Bound<'py, Self>,
        a: SchedArgs<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let when = a.lead(0)?;
        let when = &when;
        let (callback, args, context) = a.callback_args(1)?;
        if when.is_none() {
            return Err(PyTypeError::new_err("when cannot be None"));
        }
        // NOTE: `when` is on `self.time()`'s clock, whatever it is; the run loop tests
        //       it against that clock (`refresh_clock`), as asyncio does.
        let w: f64 = when.extract()?;
        Self::schedule_timer(slf, w, when.clone(), &callback, args, context, CALL_AT)
    }

    /// asyncio's `_add_reader` / `_add_writer`: registers `callback(*args)` for `fd` and
    /// returns its handle, cancelling the one it replaces.
    pub(crate) fn add_io_handle<'py>(
        slf: &Bound<'py, Self>,
        fd: &Bound<'py, PyAny>,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        read: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        // Replacing a handle cancels it: Python code in debug mode (its repr).
        py::thread_exit::register();
        let n = fileobj_to_int(fd)?;
        slf.get().check_closed(py)?;
        let FdNum::Fd(n) = classify_fd(&n)? else {
            return Err(PyOverflowError::new_err(
                "Python int too large to convert to C int",
            ));
        };
        let handle = Self::add_io_fd(slf, n, callback, args, read, false)?;
        if !fd.is_instance_of::<PyInt>() {
            let new = FileObj::new(fd);
            // Whichever object is left over (the one replaced, or `new` if the entry is
            // gone) is dropped after the state is released.
            let left = slf.get().state.with(py, |s| match s.io.get_mut(&n) {
                Some(e) => e.fileobj.replace(new),
                None => Some(new),
            });
            drop(left);
        }
        Ok(handle)
    }

    /// The descriptor registered with the file object `fileobj` (see
    /// `IoHandles::fileobj`).
    fn fd_of_fileobj(&self, fileobj: &Bound<'_, PyAny>) -> Option<RawFd> {
        let py = fileobj.py();
        self.state.with(py, |s| {
            s.io.iter()
                .find_map(|(fd, e)| e.fileobj.as_ref()?.is(fileobj).then_some(fd))
        })
    }

    /// Registers `callback(*args)` for `fd` and returns its handle, cancelling the one it
    /// replaces. `edge`: see `IoHandles::edge_r`.
    pub(crate) fn add_io_fd<'py>(
        slf: &Bound<'py, Self>,
        fd: RawFd,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        read: bool,
        edge: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::add_io_fd_owned(slf, fd, callback, args, read, edge, None, false)
    }

    /// The reader of a stream socket transport (`callback()`, edge-triggered), whose
    /// registration also watches the socket for writability from the start, as mio-based
    /// servers (tokio's, the benchmarks' native one) register sockets. Writable events
    /// without a writer handle are ignored, as they are once a transport's writer is gone.
    ///
    /// NOTE: on a Unix socket such an event comes each time the peer has read what was
    ///       sent (TCP reports writability only after a full buffer). On this KVM guest
    ///       (cpuidle `haltpoll`, guest polling off) that wake-up comes shortly before a
    ///       request-response peer's next request, and a CPU that idled since the
    ///       response was sent wakes far more slowly: a 100 KiB Unix echo went from
    ///       ~15k to ~23k requests/s (the native server registered for reading only
    ///       drops from ~24k to ~15.6k). See benchmarks/README.md.
    pub(crate) fn add_stream_reader<'py>(
        slf: &Bound<'py, Self>,
        fd: RawFd,
        callback: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = PyTuple::empty(slf.py());
        Self::add_io_fd_owned(slf, fd, callback, args, true, true, None, true)
    }

    /// `add_io_fd` for a sock_* operation on `owner` (the socket object whose
    /// `fileno()` is `fd`). The operation tried its system call just before, so readiness
    /// that arrived while the descriptor was idle is not lost with an edge-triggered
    /// registration: when the registration already watches the direction and was made
    /// for this same (live) socket object, no `epoll_ctl` is needed.
    ///
    /// DEVIATION(asyncio): descriptor tricks behind the socket object's back, such as
    ///   `os.dup2(other, sock.fileno())` while the socket is open, replace the file the
    ///   registration was for without the loop noticing; a later sock_* wait on that
    ///   socket object is then not woken. Detecting it would cost an `fstat` per wait,
    ///   as much as the `epoll_ctl` this saves.
    ///
    /// `watch_write`: a reader whose registration watches writability too (see
    /// `add_stream_reader`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_io_fd_owned<'py>(
        slf: &Bound<'py, Self>,
        fd: RawFd,
        callback: &Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
        read: bool,
        edge: bool,
        owner: Option<&Bound<'py, PyAny>>,
        watch_write: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let core = slf.get();
        core.check_closed(py)?;
        Self::rehome_if_forked(slf)?;
        // Debug mode: where it was registered, as asyncio's Handle records it from inside
        // `_add_reader` (its two frames, `add_reader` and `_add_reader`, are not here).
        let tb = if core.debug(py) {
            Some(extract_stack(py, 2)?)
        } else {
            None
        };
        let handle = Self::new_handle(slf, callback, args, None, tb, None)?;
        let item = OwnedHandle::new(&handle);
        // NOTE: made here, outside the state borrow (it allocates). CPython hands out the
        //       object's one callback-less weak reference, so the same live socket always
        //       gives the same reference object.
        let owner_ref = owner.and_then(|o| {
            pyo3::types::PyWeakrefReference::new(o)
                .ok()
                .map(|w| w.unbind())
        });
        let res = core.state.with(py, |s| {
            let Some(reg) = s.registrar.as_ref() else {
                return Err((None, item, None));
            };
            let entry = s.io.get(&fd);
            let (had_r, had_w) =
                entry.map_or((false, false), |e| (e.reader.is_some(), e.writer.is_some()));
            let (want_r, want_w) = if read {
                (true, had_w || watch_write)
            } else {
                (had_r, true)
            };
            let known = entry.is_some() || s.idle_fds.remove(&fd);
            let own = known
                && owner_ref.as_ref().is_some_and(|o| {
                    s.armed.get(&fd).is_some_and(|a| {
                        (a.read || !want_r)
                            && (a.write || !want_w)
                            && a.owner.as_ref().is_some_and(|w| w.as_ptr() == o.as_ptr())
                    })
                });
            let r = if own {
                Ok(())
            } else if known {
                // Re-arming also reports readiness that arrived while idle. ENOENT: the
                // fd was closed (and maybe reused) since: register it afresh.
                match reg.modify(fd, want_r, want_w) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        reg.register(fd, want_r, want_w)
                    }
                    other => other,
                }
            } else {
                match reg.register(fd, want_r, want_w) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        reg.modify(fd, want_r, want_w)
                    }
                    other => other,
                }
            };
            if let Err(e) = r {
                return Err((Some(e), item, s.armed.remove(&fd)));
            }
            // Only a sock_* registration can be reused (`own`), so only those are
            // recorded: an entry without an owner would never match (and would cost
            // every transport a map entry).
            let displaced = if own {
                None
            } else if owner_ref.is_some() {
                s.armed.insert(
                    fd,
                    Armed {
                        read: want_r,
                        write: want_w,
                        owner: owner_ref,
                    },
                )
            } else {
                s.armed.remove(&fd)
            };
            let e = s.io.get_or_default(fd);
            if read {
                e.edge_r = edge;
            } else {
                e.edge_w = edge;
            }
            // The re-arm above covers this descriptor until its next event (without one,
            // a pending re-arm for a level-triggered handle on the fd must stay).
            if !own {
                s.rearm.remove(&fd);
            }
            let slot = if read { &mut e.reader } else { &mut e.writer };
            Ok((slot.replace(item), displaced))
        });
        match res {
            Ok((old, displaced)) => {
                drop(displaced);
                if let Some(old) = old {
                    crate::handles::cancel(old.bind(py))?;
                }
            }
            Err((None, _item, _)) => return Err(closed_error()),
            Err((Some(e), _item, _)) => return Err(errors::from_io(py, e)),
        }
        Ok(handle)
    }

    /// `_ensure_fd_no_transport` for the public fd methods (any file object).
    fn check_no_transport(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        if slf.get().state.with(py, |s| s.transports.is_empty()) {
            return Ok(());
        }
        let n = fileobj_to_int(fd)?;
        // A negative number (a closed socket's -1) names no transport.
        if let Ok(FdNum::Fd(n)) = classify_fd(&n) {
            slf.get().ensure_fd_no_transport(py, n)?;
        }
        Ok(())
    }

    /// Whether `fd` has a reader / writer handle (for transport reprs).
    pub(crate) fn io_registered(&self, py: Python<'_>, fd: RawFd) -> (bool, bool) {
        self.state.with(py, |s| {
            s.io.get(&fd)
                .map_or((false, false), |e| (e.reader.is_some(), e.writer.is_some()))
        })
    }

    /// A child made by `fork()` shares the loop's epoll instance, its cross-thread waker
    /// and its signal wake-up socket with the parent. Edge-triggered events on a shared
    /// instance go to whichever process polls first, so a child that runs the loop (or
    /// starts watching a descriptor) first gets its own, as libuv's `uv_loop_fork` does:
    /// a new epoll instance and waker, every watched descriptor registered with it, a new
    /// signal socket. The parent's loop is not touched; the inherited copies are closed
    /// here, which leaves the parent's registrations alone.
    pub(crate) fn rehome_if_forked(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        if !core
            .state
            .with(py, |s| s.registrar.as_ref().is_some_and(|r| r.is_stale()))
        {
            return Ok(());
        }
        let (poller, registrar) = Poller::new().map_err(|e| errors::from_io(py, e))?;
        let old_poller = {
            let mut guard = core
                .poller
                .lock()
                .map_err(|_| PyRuntimeError::new_err("event loop poller is poisoned"))?;
            guard.replace(poller)
        };
        let old = core.state.with(py, |s| {
            let waker = registrar.waker();
            let old_registrar = s.registrar.replace(registrar);
            let reg = s.registrar.as_ref().expect("just set");
            // NOTE: a descriptor closed behind the loop's back fails to register here;
            //       as after a failed re-arm, that surfaces at its next add or remove.
            for (fd, e) in s.io.iter() {
                let _ = reg.register(fd, e.reader.is_some(), e.writer.is_some());
            }
            // Registrations without handles were the shared instance's only.
            s.idle_fds.clear();
            // The parent's posters are not here (see `backlog::Backlog`).
            s.waiters = 0;
            s.backlog = Arc::default();
            s.rearm.clear();
            let armed = std::mem::take(&mut s.armed);
            let sockets = s.signals.reopen(reg);
            // Resolver threads are the parent's (see `dns`): the child's answers come
            // through an inbox that wakes its own poll.
            let inbox = std::mem::replace(&mut s.dns_inbox, dns::Inbox::new(&waker));
            (old_registrar, armed, sockets, inbox)
        });
        let (old_registrar, armed, sockets, inbox) = old;
        drop((old_poller, old_registrar, armed, inbox));
        drop(sockets.map_err(|e| errors::from_io(py, e))?);
        crate::signals::after_rehome(slf)
    }

    /// A native transport is about to close `fd`: drop its handles and its epoll
    /// registration (a duplicate of the descriptor elsewhere, e.g. in a forked child,
    /// would otherwise keep reporting events under a number that may be reused).
    pub(crate) fn forget_fd(slf: &Bound<'_, Self>, fd: RawFd) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (entry, armed) = core.state.with(py, |s| {
            let entry = s.io.remove(&fd);
            let known = entry.is_some() | s.idle_fds.remove(&fd);
            s.rearm.remove(&fd);
            s.redispatch.retain(|&f| f != fd);
            if known && let Some(reg) = s.registrar.as_ref() {
                let _ = reg.deregister(fd);
            }
            s.lent_fds.remove(&fd);
            (entry, s.armed.remove(&fd))
        });
        drop(armed);
        if let Some(e) = entry {
            for h in e.reader.iter().chain(e.writer.iter()) {
                crate::handles::cancel(h.bind(py))?;
            }
        }
        Ok(())
    }

    /// Runs `fd`'s reader again at the next iteration, as if epoll had reported it
    /// readable: for an edge-triggered transport that stopped reading with data left
    /// (cheaper than re-arming, which costs an `epoll_ctl`). The next poll does not block.
    pub(crate) fn redispatch(&self, py: Python<'_>, fd: RawFd) {
        self.state.with(py, |s| {
            if s.io.get(&fd).is_some_and(|e| e.reader.is_some()) && !s.redispatch.contains(&fd) {
                s.redispatch.push(fd);
            }
        });
    }

    /// Re-arms `fd` before the next poll, as for a level-triggered handle: epoll reports
    /// it again if it is still ready. For an edge-triggered transport whose callback
    /// stopped early, as asyncio's level-triggered one does (one `epoll_ctl`).
    pub(crate) fn rearm(&self, py: Python<'_>, fd: RawFd) {
        self.state.with(py, |s| {
            if s.io.get(&fd).is_some() {
                s.rearm.insert(fd);
            }
        });
    }

    /// asyncio's `_ensure_fd_no_transport`.
    pub(crate) fn ensure_fd_no_transport(&self, py: Python<'_>, fd: RawFd) -> PyResult<()> {
        let entry = self.state.with(py, |s| {
            if s.lent_fds.contains(&fd) {
                None
            } else {
                s.transports.get(&fd).copied()
            }
        });
        // Not a weak reference as asyncio's, but a transport the collector is clearing no
        // longer claims its descriptor either.
        let tr = entry.and_then(|t| t.get(py));
        if let Some(tr) = tr
            && !tr
                .call_method0(pyo3::intern!(py, "is_closing"))?
                .is_truthy()?
        {
            return Err(PyRuntimeError::new_err(format!(
                "File descriptor {fd} is used by transport {}",
                tr.repr()?
            )));
        }
        Ok(())
    }

    /// Removes `fd`'s reader or writer handle; whether there was one.
    pub(crate) fn remove_io_fd(slf: &Bound<'_, Self>, fd: RawFd, read: bool) -> PyResult<bool> {
        let py = slf.py();
        py::thread_exit::register();
        let core = slf.get();
        if core.state.with(py, |s| s.closed) {
            return Ok(false);
        }
        let (old, gone) = core.state.with(py, |s| {
            let Some(entry) = s.io.get_mut(&fd) else {
                return (None, None);
            };
            let old = if read {
                entry.reader.take()
            } else {
                entry.writer.take()
            };
            let mut gone = None;
            if entry.reader.is_none() && entry.writer.is_none() {
                gone = s.io.remove(&fd);
                s.idle_fds.insert(fd);
            }
            (old, gone)
        });
        drop(gone);
        match old {
            Some(old) => {
                crate::handles::cancel(old.bind(py))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn remove_io(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>, read: bool) -> PyResult<bool> {
        let n = fileobj_to_int(fd)?;
        if slf.get().state.with(slf.py(), |s| s.closed) {
            return Ok(false);
        }
        let fd = match classify_fd(&n) {
            Ok(FdNum::Fd(n)) => n,
            Ok(FdNum::TooLarge) => return Ok(false),
            // A closed socket's fileno() is -1: its registration is found by the object.
            // DEVIATION(asyncio): once another object has registered the same number
            //   (the descriptor was reused), the closed object names nothing here and
            //   this raises; the selectors module keeps the first object of a key and
            //   would remove the new object's callback instead.
            Err(e) if fd.is_instance_of::<PyInt>() => return Err(e),
            Err(e) => slf.get().fd_of_fileobj(fd).ok_or(e)?,
        };
        // NOTE: removing a handle makes no system call: the registration keeps its
        //       interest until the next re-arm, and an fd left without handles stays
        //       registered (idle) so the next add is one re-arm, not register + remove +
        //       register: a pending sock_recv costs one epoll_ctl instead of three. Events
        //       for directions without a handle are ignored.
        Self::remove_io_fd(slf, fd, read)
    }
}

/// `create_task(coro, *, name=None, context=None, eager_start=None, **kwargs)` with
/// Python 3.14 semantics: keyword arguments reach the task factory unchanged. Called
/// through the vectorcall entry point `py::fastcall::create_task`.
pub(crate) fn create_task<'py>(
    slf: &Bound<'py, LoopCore>,
    coro: &Bound<'py, PyAny>,
    kwargs: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    // Runs Python code (the task's registration, an eager first step, a factory).
    run::at_exit::park_if_stale_thread(py);
    let core = slf.get();
    core.check_closed(py)?;
    let factory = core
        .state
        .with(py, |s| s.task_factory.as_ref().map(|f| f.clone_ref(py)));
    let task_cls = import_attr!(py, "asyncio.tasks", "Task")?;
    if factory.is_none() && kwargs.as_ref().is_none_or(|k| k.is_empty()) {
        return LoopCore::new_with_loop(slf, task_cls, &PyTuple::new(py, [coro])?);
    }
    let kwargs = kwargs.unwrap_or_else(|| PyDict::new(py));
    if let Some(f) = factory {
        return call_task_factory(slf, &f.into_bound(py), coro, kwargs);
    }
    // NOTE: Python 3.12 added Task(eager_start=). On older Pythons the loop emulates it:
    //       Task.__init__ schedules exactly one step with call_soon; the loop takes that
    //       handle back and runs it now, with the current task swapped out, as 3.12's
    //       Task.__eager_start does.
    // NOTE: Python 3.10's Task has no `context` parameter and keeps the context it
    //       copies out of reach, so a task cannot be made to run in a given context
    //       (a copy would hide the task's changes from it): a clear error instead.
    let context_key = pyo3::intern!(py, "context");
    if py::version(py) < (3, 11)
        && let Some(c) = kwargs.get_item(context_key)?
    {
        if !c.is_none() {
            return Err(PyTypeError::new_err(
                "create_task(context=...) needs Python 3.11 or later: asyncio.Task has \
                 no context parameter on this Python",
            ));
        }
        kwargs.del_item(context_key)?; // context=None: the same as leaving it out
    }
    let mut emulate_eager = false;
    let eager_key = pyo3::intern!(py, "eager_start");
    if !kwargs.is_empty()
        && py::version(py) < (3, 12)
        && let Some(eager) = kwargs.get_item(eager_key)?
    {
        kwargs.del_item(eager_key)?;
        emulate_eager = eager.is_truthy()? && core.is_running(py);
    }
    kwargs.set_item(pyo3::intern!(py, "loop"), slf)?;
    if !emulate_eager {
        return task_cls.call((coro,), Some(&kwargs));
    }
    let before = core.state.with(py, |s| s.ready.len());
    let task = task_cls.call((coro,), Some(&kwargs))?;
    let step = core.state.with(py, |s| {
        if s.ready.len() == before + 1 {
            s.ready.pop_last()
        } else {
            None
        }
    });
    if let Some(step) = step {
        run::run_eager_step(slf, &step.into_handle(slf.as_any())?)?;
    }
    Ok(task)
}

/// Clocks and methods of the application's: a loop subclass (or instance) with its own
/// `time` or `call_at`, or a replaced `time.monotonic`. asyncio's loop goes through them
/// (`call_at` compares with `self.time()`, `call_later` calls `self.call_at`); ferroloop's
/// own methods are used directly unless they were overridden.
mod clock {
    use std::sync::OnceLock;

    use pyo3::ffi;
    use pyo3::prelude::*;
    use pyo3::types::PyString;

    use super::LoopCore;

    unsafe extern "C" {
        /// CPython's type attribute lookup along the MRO (borrowed result or NULL, no
        /// exception set); private but exported by every CPython this supports.
        fn _PyType_Lookup(
            tp: *mut ffi::PyTypeObject,
            name: *mut ffi::PyObject,
        ) -> *mut ffi::PyObject;
    }

    /// Whether `name` on `slf`'s class is not LoopCore's own (a subclass overrides it).
    pub(super) fn overrides(
        slf: &Bound<'_, LoopCore>,
        name: &Bound<'_, PyString>,
    ) -> PyResult<bool> {
        let py = slf.py();
        let base = py.get_type::<LoopCore>();
        // SAFETY: GIL held; both types and the name are live; the results are borrowed
        // and only compared.
        unsafe {
            let tp = ffi::Py_TYPE(slf.as_ptr());
            if tp == base.as_type_ptr() {
                return Ok(false);
            }
            Ok(_PyType_Lookup(tp, name.as_ptr())
                != _PyType_Lookup(base.as_type_ptr(), name.as_ptr()))
        }
    }

    /// The method definition behind LoopCore's `time`.
    fn native_time(py: Python<'_>) -> PyResult<usize> {
        static DEF: OnceLock<usize> = OnceLock::new();
        if let Some(d) = DEF.get() {
            return Ok(*d);
        }
        let descr = py.get_type::<LoopCore>().getattr("time")?;
        // SAFETY: LoopCore's `time` is a method descriptor (a pymethod), GIL held.
        let def = unsafe {
            if ffi::Py_TYPE(descr.as_ptr()) != std::ptr::addr_of_mut!(ffi::PyMethodDescr_Type) {
                return Ok(0);
            }
            (*descr.as_ptr().cast::<ffi::PyMethodDescrObject>()).d_method as usize
        };
        Ok(*DEF.get_or_init(|| def))
    }

    /// `time.monotonic` when it is no longer the function it was at import.
    pub(super) fn replaced_monotonic(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
        static TIME: pyo3::sync::PyOnceLock<(Py<PyModule>, Py<PyAny>)> =
            pyo3::sync::PyOnceLock::new();
        let (module, original) = TIME.get_or_try_init(py, || -> PyResult<_> {
            let m = py.import("time")?;
            let f = m.getattr("monotonic")?.unbind();
            Ok((m.unbind(), f))
        })?;
        let current = module.bind(py).getattr(pyo3::intern!(py, "monotonic"))?;
        Ok((!current.is(original.bind(py))).then_some(current))
    }

    /// Whether `self.time()` may be another clock than ferroloop's, checked without
    /// calling anything: an instance attribute `time` (`mock.patch.object(loop, "time")`),
    /// a subclass's `time`, or a replaced `time.monotonic`.
    pub(super) fn may_be_foreign(slf: &Bound<'_, LoopCore>) -> PyResult<bool> {
        let py = slf.py();
        let name = pyo3::intern!(py, "time");
        if overrides(slf, name)? {
            return Ok(true);
        }
        // The class's `time` is LoopCore's method descriptor, so the generic lookup
        // returns the instance dict's `time` if there is one and a bound method of ours
        // otherwise, running no Python code. Unlike `PyObject_GenericGetDict` it leaves
        // a loop without instance attributes without a dict, so every other method
        // lookup on the loop keeps skipping it.
        // SAFETY: GIL held; a new reference or NULL with an exception.
        let t = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyObject_GenericGetAttr(slf.as_ptr(), name.as_ptr()),
            )?
        };
        Ok(!is_native_time(slf, &t)? || replaced_monotonic(py)?.is_some())
    }

    /// Whether `t` is LoopCore's `time` bound to `slf`.
    fn is_native_time(slf: &Bound<'_, LoopCore>, t: &Bound<'_, PyAny>) -> PyResult<bool> {
        // SAFETY: `t` is live; a PyCFunction's fields are read only after its type check.
        unsafe {
            let p = t.as_ptr();
            Ok(ffi::PyCFunction_Check(p) != 0 && {
                let f = p.cast::<ffi::PyCFunctionObject>();
                (*f).m_self == slf.as_ptr() && (*f).m_ml as usize == native_time(slf.py())?
            })
        }
    }

    /// `self.time()` when that is not ferroloop's clock (see the module note).
    pub(super) fn foreign_now(slf: &Bound<'_, LoopCore>) -> PyResult<Option<f64>> {
        let py = slf.py();
        let t = slf.getattr(pyo3::intern!(py, "time"))?;
        if is_native_time(slf, &t)? && replaced_monotonic(py)?.is_none() {
            return Ok(None);
        }
        Ok(Some(t.call0()?.extract()?))
    }
}
