//! run_forever / stop / _run_once. Mirrors asyncio.base_events.BaseEventLoop._run_once:
//! "This is the only place where callbacks are actually *called*. All other places just
//! add them to ready."

use std::io;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use super::{LoopCore, MAXIMUM_SELECT_TIMEOUT, State, closed_error, exception_handler};
use crate::errors;
use crate::py::handle::{self, HandleTypes, OwnedHandle, Ready, types};
use crate::py::{self, import_attr};
use crate::reactor::{Readiness, SIGNAL_TOKEN, WAKER_TOKEN};
use crate::signals;

/// How long a poll may be skipped while callbacks are ready (see `run_once`).
const SKIP_POLL_NS: i64 = 250_000;
/// A poll that blocked this long means the loop was idle: handle free lists are trimmed.
const IDLE_NS: i64 = 1_000_000_000;

/// Runs iterations until `stop()`. The Python `run_forever` has already checked that the
/// loop may run and set the running loop and async-generator hooks.
pub(super) fn run_forever(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    core.check_closed(py)?;
    if core.is_running(py) {
        return Err(PyRuntimeError::new_err(
            "This event loop is already running",
        ));
    }
    LoopCore::rehome_if_forked(slf)?;
    py::shed_empty_instance_values(slf.as_any());
    let tid = py::thread_ident();
    let register = || {
        core.state
            .with(py, |s| s.registrar.as_ref().map(|r| r.waker()))
            .map(|waker| {
                let entry = at_exit::register(tid, waker);
                core.state.with(py, |s| s.exit_entry = Some(entry.clone()));
                entry
            })
    };
    // A daemon thread starting a loop once the exit handler has run pauses before
    // anything below calls Python code (a call from the exiting thread resumes it).
    let early_entry = if at_exit::stale_thread() {
        core.state.with(py, |s| s.thread_id = Some(tid));
        let entry = register();
        if let Some(e) = &entry {
            e.pause_if_exiting(py);
        }
        entry
    } else {
        None
    };
    core.state.with(py, |s| {
        s.thread_id = Some(tid);
        s.last_poll_ns = i64::MIN;
    });
    let mut result = signals::enter_run(slf);
    let exit_entry = match early_entry {
        Some(entry) => Some(entry),
        None => match signals::on_main_thread(py) {
            Ok(true) => None,
            Ok(false) => register(),
            Err(e) => {
                result = result.and(Err(e));
                None
            }
        },
    };
    let park = exit_entry.as_deref();
    if result.is_ok() {
        result = loop {
            // NOTE: a Rust panic must not leave the loop marked running with the signal
            //       wake-up fd installed: it becomes a PanicException after the clean-up.
            //       Python ending this thread at exit stops it first (py::thread_exit).
            let once =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_once(slf, park)))
                    .unwrap_or_else(|payload| Err(py::panic_error(payload)));
            if let Err(e) = once {
                break Err(e);
            }
            if core.state.with(py, |s| s.stopping) {
                break Ok(());
            }
        };
    }
    if let Some(entry) = &exit_entry {
        at_exit::unregister(entry);
        core.state.with(py, |s| s.exit_entry = None);
    }
    handle::trim_free_lists(py, handle::FREE_IDLE);
    // The bound `call_soon` is kept only while running: a stopped loop refers to itself
    // through nothing of ours.
    let bound = core.state.with(py, |s| {
        s.stopping = false;
        s.thread_id = None;
        // Outside run_forever every shared handle is tracked (see `OwnedHandle`).
        let io =
            s.io.values()
                .flat_map(|io| io.reader.iter().chain(io.writer.iter()));
        // (What a queued call holds are ordinary tracked objects.)
        let ready = s.ready.iter().filter_map(|item| match item {
            Ready::Handle(h) => Some(h),
            Ready::Call { .. } => None,
        });
        for h in ready
            .chain(s.timers.iter())
            .chain(io)
            .chain(s.signals.handles())
        {
            h.track_if_shared();
        }
        s.soon_bound.take()
    });
    drop(bound);
    // Posters waiting for this loop go on (a stopped loop is waited for by no one).
    core.batch_ended(py);
    let restored = signals::leave_run(slf);
    result.and(restored)
}

/// One iteration: purge cancelled timers, poll, queue I/O and due timers, run the batch.
/// `park`: this loop runs off the main thread (see `at_exit`).
fn run_once(slf: &Bound<'_, LoopCore>, park: Option<&at_exit::Entry>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    let t = types()?;

    let mut removed: Vec<OwnedHandle> = Vec::new();
    core.state.with(py, |s| {
        s.timers
            .purge_cancelled(|h| t.is_cancelled(h.bind(py)), &mut removed)
    });
    for h in &removed {
        t.set_scheduled(h.bind(py), false);
    }
    drop(removed);

    // Some(now) if `self.time()` is another clock (see `refresh_clock`).
    let foreign_now = LoopCore::refresh_clock(slf)?;
    let (timeout, skip_poll, forked) = core.state.with(py, |s| {
        let timeout = if !s.ready.is_empty() || s.stopping || !s.redispatch.is_empty() {
            Some(0.0)
        } else {
            s.timers.peek().map(|(when, _)| {
                select_timeout(when - foreign_now.unwrap_or_else(crate::sys::monotonic))
            })
        };
        // DEVIATION(asyncio): with callbacks ready, a non-blocking poll costs a system call
        //   per iteration (a one-future-at-a-time chain of 100k futures made 200k
        //   epoll_wait calls; 568 with the skip). While no descriptor has a reader or
        //   writer, it is skipped if the last poll is under SKIP_POLL_NS old; only signal
        //   delivery can wait that long. With descriptors watched, every iteration polls,
        //   as asyncio's does, so I/O callbacks interleave with ready callbacks exactly as
        //   they do there. The first iteration of run_forever and a stopping iteration
        //   always poll.
        let skip = !s.ready.is_empty()
            && !s.stopping
            && s.io.is_empty()
            && crate::sys::monotonic_ns().saturating_sub(s.last_poll_ns) < SKIP_POLL_NS;
        let forked = s.registrar.as_ref().is_some_and(|r| r.is_stale());
        if !skip
            && !forked
            && let Some(reg) = s.registrar.as_ref()
        {
            // Level-triggered semantics: descriptors dispatched since the last poll are
            // re-armed now if they still have handles, so epoll reports them again while
            // they stay ready (see the reactor's module note). A failure (fd closed behind
            // the loop's back) surfaces as with asyncio: on the next add/remove of that fd.
            for fd in s.rearm.drain() {
                if let Some(e) = s.io.get(&fd) {
                    let (r, w) = (e.reader.is_some(), e.writer.is_some());
                    let ok = reg.modify(fd, r, w).is_ok();
                    if let Some(a) = s.armed.get_mut(&fd) {
                        // A failed re-arm leaves an interest nobody knows: not reusable.
                        (a.read, a.write) = if ok { (r, w) } else { (false, false) };
                    }
                }
            }
        }
        s.polling = timeout != Some(0.0);
        (timeout, skip, forked)
    });
    if forked {
        // A callback forked and this is the child, still running the loop.
        LoopCore::rehome_if_forked(slf)?;
    }

    let mut events: Vec<Readiness> = Vec::new();
    let polled = if skip_poll {
        Ok(false)
    } else {
        let mut guard = core
            .poller
            .lock()
            .map_err(|_| PyRuntimeError::new_err("event loop poller is poisoned"))?;
        match guard.as_mut() {
            None => Err(None),
            Some(poller) => {
                let res = match timeout {
                    // NOTE: a zero-timeout poll cannot block, so it keeps the GIL: releasing
                    //       and re-taking it would cost more than the syscall.
                    Some(0.0) => poller.poll(Some(Duration::ZERO)),
                    other => {
                        let d = other.map(Duration::from_secs_f64);
                        let t0 = crate::sys::monotonic_ns();
                        let res = py.detach(|| poller.poll(d));
                        if crate::sys::monotonic_ns() - t0 >= IDLE_NS {
                            handle::trim_free_lists(py, handle::FREE_IDLE);
                        }
                        res
                    }
                };
                match res {
                    Ok(()) => {
                        poller.collect(&mut events);
                        Ok(false)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                    Err(e) => Err(Some(e)),
                }
            }
        }
    };
    if let Some(entry) = park {
        entry.pause_if_exiting(py);
    }
    if !skip_poll {
        let now = crate::sys::monotonic_ns();
        core.state.with(py, |s| {
            s.polling = false;
            s.wake_pending = false;
            s.last_poll_ns = now;
        });
    }
    let interrupted = match polled {
        Ok(i) => i,
        Err(None) => return Err(closed_error()),
        Err(Some(e)) => return Err(errors::from_io(py, e)),
    };
    if interrupted {
        // A signal arrived during the poll: run Python-level handlers (Ctrl+C raises here).
        py::check_signals(py)?;
    }

    let mut signalled = false;
    let mut released = Released::default();
    for ev in &events {
        match ev.token {
            WAKER_TOKEN => {}
            SIGNAL_TOKEN => signalled = true,
            fd => core
                .state
                .with(py, |s| process_io(py, s, t, fd as i32, ev, &mut released)),
        }
    }
    let again = core.state.with(py, |s| std::mem::take(&mut s.redispatch));
    for fd in again {
        if events.iter().any(|e| e.token == fd as usize && e.readable) {
            continue; // epoll reported it anyway
        }
        let ev = Readiness {
            token: fd as usize,
            readable: true,
            writable: false,
            sticky: false,
        };
        core.state
            .with(py, |s| process_io(py, s, t, fd, &ev, &mut released));
    }
    for h in &released.handles {
        crate::handles::cancel(h.bind(py))?;
    }
    drop(released);
    if signalled {
        signals::dispatch(slf)?;
    }
    LoopCore::dispatch_resolutions(slf)?;

    // asyncio reads its clock again after the poll.
    let now = match foreign_now {
        Some(_) => LoopCore::refresh_clock(slf)?,
        None => None,
    };
    let end = now.unwrap_or_else(crate::sys::monotonic) + core.clock_resolution;
    while let Some(h) = core.state.with(py, |s| {
        let h = s.timers.pop_due(end);
        if h.is_some()
            && let Some(next) = s.timers.head()
        {
            next.prefetch();
        }
        h
    }) {
        t.set_scheduled(h.bind(py), false);
        core.state.with(py, |s| s.ready.push(h.into()));
    }

    let ntodo = core.state.with(py, |s| {
        s.batch = s.batch.wrapping_add(1);
        s.gave_up = false;
        s.ready.len()
    });
    for i in 1..=ntodo {
        if i % super::backlog::PROGRESS_EVERY == 0 {
            core.batch_progress(py);
        }
        // NOTE: Python-level signal handlers run here, between callbacks, as they run in
        //       asyncio's `_run_once` (Python code): the exception one raises (a test
        //       timeout's, not only KeyboardInterrupt) leaves `run_forever` instead of
        //       surfacing inside the next callback, whose error handling would log it and
        //       go on. Checked before the pop, so no handle is lost.
        py::check_signals(py)?;
        let Some(item) = core.state.with(py, |s| {
            let h = s.ready.pop();
            if let Some(next) = s.ready.front() {
                next.prefetch();
            }
            h
        }) else {
            break;
        };
        if let Some(entry) = park {
            entry.pause_if_exiting(py);
        }
        let h = match item {
            Ready::Handle(h) => h,
            Ready::Call {
                callback,
                arg,
                context,
            } if !core.debug(py) => {
                // Bound: released with a plain decref at the end of the arm (dropping a
                // `Py` first asks a thread-local whether the GIL is held: ~20
                // instructions a task step).
                let (callback, arg, context) = (
                    callback.into_bound(py),
                    arg.map(|a| a.into_bound(py)),
                    context.into_bound(py),
                );
                // SAFETY: GIL held; a call is only queued with an exact Context.
                if let Err(e) = unsafe { handle::run_call(py, &callback, arg.as_ref(), &context) } {
                    let h = Ready::Call {
                        callback: callback.unbind(),
                        arg: arg.map(Bound::unbind),
                        context: context.unbind(),
                    }
                    .into_handle(slf.as_any())?;
                    exception_handler::callback_error(slf, &h, e)?;
                }
                continue;
            }
            // Debug mode, switched on since it was queued: run as a handle.
            step => OwnedHandle::new(&step.into_handle(slf.as_any())?),
        };
        let hb = h.bind(py);
        if t.is_cancelled(hb) {
            continue;
        }
        let res = if core.debug(py) {
            run_debug(slf, t, hb)
        } else {
            match t.call(hb, Some(&core.run_ctx)) {
                Err(e) => exception_handler::callback_error(slf, hb, e),
                ok => ok,
            }
        };
        res?;
    }
    core.batch_ended(py);
    Ok(())
}

/// `min(max(0, delta), MAXIMUM_SELECT_TIMEOUT)` as asyncio computes it: NaN gives 0.
fn select_timeout(delta: f64) -> f64 {
    if delta > MAXIMUM_SELECT_TIMEOUT {
        MAXIMUM_SELECT_TIMEOUT
    } else if delta > 0.0 {
        delta
    } else {
        0.0
    }
}

/// What `process_io` takes out of the state, for the caller to release after it: the
/// cancelled handles it unregistered and the file objects of the entries it removed.
#[derive(Default)]
struct Released {
    handles: Vec<OwnedHandle>,
    fileobjs: Vec<super::FileObj>,
}

/// asyncio's `_process_events` for one descriptor, plus the re-arm that gives mio's
/// edge-triggered registrations level-triggered behaviour. Cancelled handles found here
/// are unregistered and handed back in `released`.
fn process_io(
    py: Python<'_>,
    s: &mut State,
    t: &HandleTypes,
    fd: i32,
    ev: &Readiness,
    released: &mut Released,
) {
    let Some(entry) = s.io.get_mut(&fd) else {
        return;
    };
    for (ready, slot) in [
        (ev.readable, &mut entry.reader),
        (ev.writable, &mut entry.writer),
    ] {
        let Some(h) = slot.as_ref().filter(|_| ready) else {
            continue;
        };
        if t.is_cancelled(h.bind(py)) {
            released.handles.extend(slot.take());
        } else {
            s.ready.push(h.queue_ref(py).into());
        }
    }
    if entry.reader.is_none() && entry.writer.is_none() {
        released
            .fileobjs
            .extend(s.io.remove(&fd).and_then(|e| e.fileobj));
        s.idle_fds.insert(fd);
    } else if entry.level() || ev.sticky {
        // NOTE: an edge-triggered transport reads once per event; when the event also
        //       carries an end-of-stream or error, that condition produced no edge of its
        //       own after the data, so the descriptor is re-armed (level semantics) until
        //       the transport has seen it.
        s.rearm.insert(fd);
    }
}

/// Debug-mode run of one handle: `_current_handle` and the slow-callback warning.
fn run_debug(slf: &Bound<'_, LoopCore>, t: &HandleTypes, h: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    let item = OwnedHandle::new(h);
    let prev = core.state.with(py, |s| s.current_handle.replace(item));
    drop(prev);
    let t0 = crate::sys::monotonic();
    // NOTE: as asyncio times `handle._run()`, the exception handler's time counts and a
    //       failing callback can be slow too; KeyboardInterrupt/SystemExit skip the check.
    let res = match t.call(h, Some(&core.run_ctx)) {
        Ok(()) => Ok(()),
        Err(e) => exception_handler::callback_error(slf, h, e),
    };
    let dt = crate::sys::monotonic() - t0;
    let prev = core.state.with(py, |s| s.current_handle.take());
    drop(prev);
    res?;
    if dt >= core.state.with(py, |s| s.slow_callback_duration) {
        let format_handle = import_attr!(py, "asyncio.base_events", "_format_handle")?;
        let logger = crate::py::asyncio_logger(py)?;
        logger.call_method1(
            "warning",
            (
                "Executing %s took %.3f seconds",
                format_handle.call1((h,))?,
                dt,
            ),
        )?;
    }
    Ok(())
}

/// Runs a task's first step now (eager start emulation), with the caller's current
/// task swapped out as Python 3.12's `Task.__eager_start` does.
pub(super) fn run_eager_step(slf: &Bound<'_, LoopCore>, step: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let t = types()?;
    let current_task = import_attr!(py, "asyncio.tasks", "current_task")?;
    let enter = import_attr!(py, "asyncio.tasks", "_enter_task")?;
    let leave = import_attr!(py, "asyncio.tasks", "_leave_task")?;
    let cur = current_task.call1((slf,))?;
    if !cur.is_none() {
        leave.call1((slf, &cur))?;
    }
    let res = if t.is_cancelled(step) {
        Ok(())
    } else {
        match t.call(step, Some(&slf.get().run_ctx)) {
            Ok(()) => Ok(()),
            Err(e) => exception_handler::callback_error(slf, step, e),
        }
    };
    if !cur.is_none() {
        enter.call1((slf, &cur))?;
    }
    res
}

/// Loops running off the main thread when the interpreter exits.
///
/// On Python 3.10-3.13, once the interpreter finalizes, a thread other than the main one
/// that takes the GIL is ended with `pthread_exit`. A loop running in a daemon thread
/// (`Thread(target=loop.run_forever, daemon=True)`) that is busy then is usually in the
/// middle of Python code called from Rust, and unwinding Rust frames there aborts the
/// process (`py::thread_exit` stops the thread before any unwinding instead). A loop waiting in its poll is safe: pyo3 blocks a thread that would re-take the
/// GIL during finalization. So ferroloop's `atexit` handler, which runs before
/// finalization, asks every such loop to pause at its next callback, without the GIL, and
/// waits a little for it. `atexit` handlers that run after ferroloop's (registered before
/// it was imported) may still use such a loop: a cross-thread call (`call_soon_threadsafe`,
/// which `run_coroutine_threadsafe` uses) from the exiting thread, or from a thread started
/// since, resumes a paused loop for good, and so does `stop()`. Threads that were already
/// running when the handler ran (daemon threads, which finalization is about to end) do
/// not resume a loop by calling into it, and a loop they start from then on pauses too: a
/// daemon thread feeding a loop, or one running `asyncio.run()` again and again, would
/// otherwise be in Python code called from Rust when finalization ends it.
// DEVIATION(asyncio): asyncio's loop in a daemon thread runs on until finalization ends
//   the thread; ferroloop's pauses when its atexit handler runs until the exiting thread
//   (or a thread started since) calls into it, or `stop()` is called.
pub(crate) mod at_exit {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use pyo3::prelude::*;

    /// How long the handler waits for the loops to pause (a callback that blocks longer
    /// keeps its thread running into finalization).
    const WAIT: Duration = Duration::from_millis(250);

    static EXITING: AtomicBool = AtomicBool::new(false);
    /// Changed with the GIL held (a fork never copies it locked).
    static RUNNING: Mutex<Vec<Arc<Entry>>> = Mutex::new(Vec::new());
    /// The kernel thread ids (`gettid`) of the threads other than the exiting one that
    /// were alive when the exit handler ran, and the exiting thread's: set before
    /// `EXITING`, with the GIL held.
    static BEFORE_EXIT: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());
    static EXIT_TID: AtomicI32 = AtomicI32::new(0);
    /// Threads whose loop was resumed (see `Entry::resume`): they may go on calling into
    /// ferroloop after their loop stops.
    static RESUMED_TIDS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

    fn gettid() -> libc::pid_t {
        // SAFETY: no preconditions.
        unsafe { libc::gettid() }
    }

    /// Whether the calling thread was running already when the exit handler ran (and is
    /// not the thread that runs the exit handlers).
    fn from_before_exit() -> bool {
        let me = gettid();
        me != EXIT_TID.load(Ordering::SeqCst)
            && BEFORE_EXIT.lock().map(|t| t.contains(&me)).unwrap_or(false)
    }

    /// The process's threads, from /proc/self/task.
    fn threads() -> Vec<libc::pid_t> {
        std::fs::read_dir("/proc/self/task")
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub struct Entry {
        thread: u64,
        /// The loop thread's kernel id.
        tid: libc::pid_t,
        waker: Arc<mio::Waker>,
        paused: AtomicBool,
        resumed: AtomicBool,
        lock: Mutex<()>,
        cond: Condvar,
    }

    pub fn register(thread: u64, waker: Arc<mio::Waker>) -> Arc<Entry> {
        crate::py::thread_exit::register();
        // A loop that starts running once the exit handler has run is not paused if its
        // thread is new (an atexit handler's): a cross-thread call made before this
        // registration could not have resumed it. A thread that ran before the handler
        // (a daemon thread starting loop after loop) pauses as any.
        let late = EXITING.load(Ordering::SeqCst) && !from_before_exit();
        let entry = Arc::new(Entry {
            thread,
            tid: gettid(),
            waker,
            paused: AtomicBool::new(false),
            resumed: AtomicBool::new(late),
            lock: Mutex::new(()),
            cond: Condvar::new(),
        });
        if let Ok(mut all) = RUNNING.lock() {
            all.push(entry.clone());
        }
        entry
    }

    /// Whether ferroloop's exit handler has run (the interpreter is exiting).
    #[inline]
    pub fn exiting() -> bool {
        EXITING.load(Ordering::Relaxed)
    }

    /// In a child made by fork(): the parent's loops do not run here.
    pub fn forget_all() {
        if let Ok(mut all) = RUNNING.try_lock() {
            all.clear();
        }
    }

    pub fn unregister(entry: &Arc<Entry>) {
        if let Ok(mut all) = RUNNING.lock() {
            all.retain(|e| !Arc::ptr_eq(e, entry));
        }
    }

    impl Entry {
        /// Pauses this loop's thread, without the GIL, once the interpreter exits.
        #[inline]
        pub fn pause_if_exiting(&self, py: Python<'_>) {
            if EXITING.load(Ordering::Relaxed) && !self.resumed.load(Ordering::Relaxed) {
                self.pause(py)
            }
        }

        #[cold]
        fn pause(&self, py: Python<'_>) {
            py.detach(|| {
                let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.paused.store(true, Ordering::Release);
                while !self.resumed.load(Ordering::Acquire) {
                    guard = self.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
            });
            // Resumed: the GIL is back (once finalization began, pyo3 blocks this
            // thread for good instead of taking it).
        }

        /// A cross-thread call arrived: run on as usual from now on, unless it came from
        /// a thread that was running before the exit handler (see the module's notes).
        pub fn resume(&self) {
            if !EXITING.load(Ordering::Relaxed) || self.resumed.load(Ordering::Relaxed) {
                return;
            }
            if from_before_exit() {
                return;
            }
            self.resume_now();
        }

        /// `stop()` was called from another thread: the loop runs on to stop, whoever
        /// asked (from its own thread it is not paused, and stops anyway).
        pub fn resume_to_stop(&self) {
            if EXITING.load(Ordering::Relaxed)
                && !self.resumed.load(Ordering::Relaxed)
                && crate::py::thread_ident() != self.thread
            {
                self.resume_now();
            }
        }

        fn resume_now(&self) {
            if let Ok(mut tids) = RESUMED_TIDS.lock() {
                tids.push(self.tid);
            }
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.resumed.store(true, Ordering::Release);
            self.cond.notify_all();
        }
    }

    /// Called where a thread enters ferroloop to make or run a loop, or a task (the
    /// steps of `asyncio.run()` outside a running loop, which call Python code): once the
    /// exit handler has run, a thread that was already running then (a daemon thread,
    /// see the module's notes) and whose loop was not resumed stops here for good,
    /// without the GIL, instead of being in Python code called from Rust when
    /// finalization ends it.
    #[inline]
    pub fn park_if_stale_thread(py: Python<'_>) {
        crate::py::thread_exit::register();
        if EXITING.load(Ordering::Relaxed) {
            park_if_stale_slow(py);
        }
    }

    /// Whether the calling thread was running when the exit handler ran (the handler
    /// has run) and no loop of its was resumed since.
    pub fn stale_thread() -> bool {
        EXITING.load(Ordering::SeqCst)
            && from_before_exit()
            && !RESUMED_TIDS
                .lock()
                .map(|t| t.contains(&gettid()))
                .unwrap_or(true)
    }

    #[cold]
    fn park_if_stale_slow(py: Python<'_>) {
        if !stale_thread() {
            return;
        }
        py.detach(|| {
            loop {
                std::thread::park();
            }
        });
    }

    /// The `atexit` handler (registered by the package on import).
    #[pyfunction]
    pub fn _stop_loop_threads(py: Python<'_>) {
        let tid = gettid();
        if let Ok(mut before) = BEFORE_EXIT.lock() {
            *before = threads().into_iter().filter(|&t| t != tid).collect();
        }
        EXIT_TID.store(tid, Ordering::SeqCst);
        EXITING.store(true, Ordering::SeqCst);
        let me = crate::py::thread_ident();
        let others: Vec<Arc<Entry>> = match RUNNING.lock() {
            Ok(all) => all.iter().filter(|e| e.thread != me).cloned().collect(),
            Err(_) => return,
        };
        if others.is_empty() {
            return;
        }
        for e in &others {
            let _ = e.waker.wake();
        }
        py.detach(|| {
            let deadline = Instant::now() + WAIT;
            while others
                .iter()
                .any(|e| !e.paused.load(Ordering::Acquire) && !e.resumed.load(Ordering::Acquire))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
}
