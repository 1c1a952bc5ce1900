//! Threads that Python ends at exit while ferroloop's code is on their stack.
//!
//! On Python 3.10-3.13 a thread other than the main one that waits for the GIL once the
//! interpreter finalizes is ended with `pthread_exit`. glibc implements that as a forced
//! unwind of the thread's stack. A Rust frame on the way (ferroloop's code that called
//! into Python) aborts the process: the Python C API is declared as functions that never
//! unwind, so such a frame's unwind table does not cover the call it is in and the
//! unwinder gives up (`abort()` in `__pthread_unwind`), or a `catch_unwind` catches the
//! unwind ("FATAL: exception not rethrown"). A guard object dropped by the unwind cannot
//! help: the frames below it abort first (what an earlier `HangOnThreadExit` guard did
//! in optimized builds).
//!
//! What works for every frame: glibc's unwinder runs a thread's old-style cleanup
//! handlers (`_pthread_cleanup_push`) as soon as the unwind passes the frame their buffer
//! lives in, before any frame's own unwind code. A buffer that is not on the thread's
//! stack at all (this one is on the heap) counts as passed at the first frame. So a
//! thread that calls into ferroloop where that matters (it runs a loop, makes or closes
//! one, creates a task, or posts a callback from another thread) registers a handler
//! once, and the handler stops the thread for good, without the GIL, when finalization
//! ends it: what Python 3.14 does with such threads. A `pthread_exit` before the exit
//! handler ran (not Python's doing) goes on as before.
//!
//! The handler is registered on the thread's first such call and removed when the
//! thread ends normally. The functions are looked up at run time (`dlsym`), so a libc
//! without them (musl, which does not unwind at `pthread_exit`) simply has no handler.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::cell::Cell;
    use std::ffi::{c_int, c_void};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// glibc's `struct _pthread_cleanup_buffer`.
    #[repr(C)]
    struct CleanupBuffer {
        routine: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
        canceltype: c_int,
        prev: *mut CleanupBuffer,
    }

    type PushFn =
        unsafe extern "C" fn(*mut CleanupBuffer, unsafe extern "C" fn(*mut c_void), *mut c_void);
    type PopFn = unsafe extern "C" fn(*mut CleanupBuffer, c_int);

    fn functions() -> Option<(PushFn, PopFn)> {
        static FNS: OnceLock<Option<(PushFn, PopFn)>> = OnceLock::new();
        *FNS.get_or_init(|| {
            let lookup = |name: &std::ffi::CStr| {
                // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the
                // process's global symbols, where libc is.
                unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
            };
            let push = lookup(c"_pthread_cleanup_push");
            let pop = lookup(c"_pthread_cleanup_pop");
            if push.is_null() || pop.is_null() {
                return None;
            }
            // SAFETY: glibc's functions with these signatures (nptl/cleanup_compat.c).
            Some(unsafe {
                (
                    std::mem::transmute::<*mut c_void, PushFn>(push),
                    std::mem::transmute::<*mut c_void, PopFn>(pop),
                )
            })
        })
    }

    /// Runs first when glibc unwinds this thread for `pthread_exit` (see the module).
    unsafe extern "C" fn on_forced_exit(_arg: *mut c_void) {
        if crate::event_loop::run::at_exit::exiting() || tests_exiting() {
            // The interpreter is finalizing and ends this thread: stay here instead,
            // holding nothing (the GIL was not taken).
            loop {
                // SAFETY: no preconditions; returns only after a signal handler ran.
                unsafe { libc::pause() };
            }
        }
    }

    #[cfg(test)]
    pub static TESTS_EXITING: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    #[inline]
    fn tests_exiting() -> bool {
        #[cfg(test)]
        return TESTS_EXITING.load(std::sync::atomic::Ordering::SeqCst);
        #[cfg(not(test))]
        false
    }

    thread_local! {
        /// The calling thread's registered buffer: null before, `ENDED` once the thread's
        /// destructors removed it (a plain value, so checking it costs one TLS lookup).
        static BUFFER: Cell<*mut CleanupBuffer> = const { Cell::new(std::ptr::null_mut()) };
        /// Removes the registration when the thread ends normally (touched once, when
        /// registering, so that its destructor runs).
        static OWNER: Owner = const { Owner };
    }

    const ENDED: *mut CleanupBuffer = std::ptr::dangling_mut();

    struct Owner;

    impl Drop for Owner {
        fn drop(&mut self) {
            let _ = LAST.compare_exchange(me(), 0, Ordering::Relaxed, Ordering::Relaxed);
            let Ok(buf) = BUFFER.try_with(|b| b.replace(ENDED)) else {
                return;
            };
            if buf.is_null() || buf == ENDED {
                return;
            }
            if let Some((_, pop)) = functions() {
                // SAFETY: `buf` was pushed on this thread by `register_slow` and is still
                // registered (or was run and unlinked by a pthread_exit that went on, in
                // which case popping sets the same list head again).
                unsafe { pop(buf, 0) };
            }
            // SAFETY: allocated by `register_slow` with Box, unlinked above.
            drop(unsafe { Box::from_raw(buf) });
        }
    }

    /// The `pthread_self()` of a thread that registered and has not ended (or 0): one
    /// comparison answers for a thread that calls again and again (a posting thread).
    /// A thread's destructor clears it before its `pthread_t` can be reused.
    static LAST: AtomicUsize = AtomicUsize::new(0);

    fn me() -> usize {
        // SAFETY: no preconditions.
        unsafe { libc::pthread_self() as usize }
    }

    #[inline]
    pub fn register() {
        if LAST.load(Ordering::Relaxed) != me() {
            register_thread();
        }
    }

    #[inline(never)]
    fn register_thread() {
        let buf = BUFFER.with(Cell::get);
        if buf.is_null() {
            register_slow();
        } else if buf != ENDED {
            LAST.store(me(), Ordering::Relaxed);
        }
    }

    #[cold]
    fn register_slow() {
        let Some((push, _)) = functions() else {
            return;
        };
        if OWNER.try_with(|_| ()).is_err() {
            return; // the thread is ending
        }
        let buf = Box::into_raw(Box::new(CleanupBuffer {
            routine: on_forced_exit,
            arg: std::ptr::null_mut(),
            canceltype: 0,
            prev: std::ptr::null_mut(),
        }));
        // SAFETY: `buf` is a valid, heap-allocated buffer that outlives the
        // registration (freed only after it is popped, on this thread).
        unsafe { push(buf, on_forced_exit, std::ptr::null_mut()) };
        BUFFER.with(|b| b.set(buf));
        LAST.store(me(), Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn registered() -> bool {
        let buf = BUFFER.with(Cell::get);
        !buf.is_null() && buf != ENDED
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    #[inline]
    pub fn register() {}
}

/// Makes sure the calling thread stops, instead of unwinding, if Python ends it with
/// `pthread_exit` while the interpreter exits (see the module). Cheap after the first
/// call on a thread.
pub use imp::register;

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use std::time::Duration;

    #[inline(never)]
    fn may_panic(n: usize) -> usize {
        if std::hint::black_box(n) == usize::MAX {
            panic!("never");
        }
        n
    }

    /// A frame with unwind code (the String is dropped if `may_panic` unwinds) that has
    /// none for its `pthread_exit` call: libc declares it as Python's C API is declared,
    /// as a function that does not unwind.
    #[inline(never)]
    fn frame_with_cleanup(exit: bool) -> usize {
        let owned = String::from("dropped by an unwind");
        let n = may_panic(owned.len());
        if std::hint::black_box(exit) {
            // SAFETY: ends the thread (stopped by the registered handler).
            unsafe { libc::pthread_exit(std::ptr::null_mut()) };
        }
        n + owned.len()
    }

    #[test]
    fn a_registered_thread_ended_by_pthread_exit_at_exit_stops_there() {
        super::imp::TESTS_EXITING.store(true, std::sync::atomic::Ordering::SeqCst);
        let t = std::thread::spawn(|| {
            super::register();
            assert!(super::imp::registered());
            let _ = std::panic::catch_unwind(|| frame_with_cleanup(true));
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!t.is_finished(), "the thread ended instead of stopping");
    }

    #[test]
    fn the_registration_goes_when_the_thread_ends() {
        let t = std::thread::spawn(|| {
            super::register();
            super::register();
            assert!(super::imp::registered());
            frame_with_cleanup(false)
        });
        assert_eq!(t.join().unwrap(), 40);
    }
}
