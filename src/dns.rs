//! Name resolution. Mirrors BaseEventLoop.getaddrinfo / getnameinfo, which run
//! `socket.getaddrinfo` / `socket.getnameinfo` in the default executor.
//!
//! ferroloop parses the arguments on the loop thread exactly as the socket module does,
//! answers numeric hosts there at once (no name service involved), and sends everything
//! else to its own resolver threads, which call `getaddrinfo(3)` / `getnameinfo(3)`
//! without the GIL and never touch Python: answers come back through the loop's `Inbox`
//! and the reactor's waker, and the loop thread turns them into the socket module's
//! result tuples and exceptions.

use std::collections::VecDeque;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use pyo3::exceptions::{PyOSError, PyOverflowError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyList, PyString, PyTuple};

use crate::py::import_attr;
use crate::sys::{self, AddrInfo, GaiError, SockAddr};

/// Resolver threads at most, for the whole process. A lookup of a name whose servers do
/// not answer holds a thread for the resolver's whole timeout (seconds), and the pool is
/// shared by every loop: with libuv's 4 threads, four such lookups on one loop held up
/// every other loop's. asyncio's default executor has up to 32 threads per loop.
const MAX_THREADS: usize = 32;
/// A resolver thread with nothing to do for this long ends (the pool starts threads
/// again as lookups come).
const IDLE_EXIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A resolution to run off the loop thread.
pub(crate) enum Request {
    AddrInfo {
        host: Option<CString>,
        port: Option<CString>,
        family: i32,
        socktype: i32,
        proto: i32,
        flags: i32,
    },
    NameInfo {
        host: CString,
        port: i32,
        flowinfo: u32,
        scope_id: u32,
        ipv4_tuple: bool,
        flags: i32,
    },
}

/// A finished resolution.
pub(crate) enum Answer {
    AddrInfo(Result<Vec<AddrInfo>, GaiError>),
    NameInfo(Result<(String, String), GaiError>),
    /// Not run: its future was cancelled while it waited for a resolver thread (as
    /// asyncio's executor drops a cancelled work item that has not started).
    Withdrawn,
}

impl Request {
    /// Runs the blocking resolution (any thread, no GIL needed).
    pub fn resolve(self) -> Answer {
        match self {
            Request::AddrInfo {
                host,
                port,
                family,
                socktype,
                proto,
                flags,
            } => Answer::AddrInfo(sys::getaddrinfo(
                host.as_deref(),
                port.as_deref(),
                family,
                socktype,
                proto,
                flags,
            )),
            Request::NameInfo {
                host,
                port,
                flowinfo,
                scope_id,
                ipv4_tuple,
                flags,
            } => Answer::NameInfo(sys::getnameinfo(
                &host, port, flowinfo, scope_id, ipv4_tuple, flags,
            )),
        }
    }
}

/// Answers for one loop, written by resolver threads and drained by the loop thread.
pub(crate) struct Inbox {
    answers: Mutex<Vec<(u64, Answer)>>,
    /// Set with every delivery; lets the loop skip the lock when nothing arrived.
    pending: AtomicBool,
    /// Weak, so closing the loop closes the waker's eventfd even while a resolution
    /// is still running.
    waker: Weak<mio::Waker>,
    /// The fork generation it was made in: a child made by `fork()` may have inherited
    /// `answers` locked by a resolver thread that only exists in the parent.
    generation: u64,
}

impl Inbox {
    pub fn new(waker: &Arc<mio::Waker>) -> Arc<Self> {
        Arc::new(Inbox {
            answers: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            waker: Arc::downgrade(waker),
            generation: sys::fork_generation(),
        })
    }

    fn deliver(&self, id: u64, answer: Answer) {
        // NOTE: the waker is used and released under the lock, so that `quiesce` can
        //       wait for a delivery in flight: a loop's `close()` then returns with its
        //       waker's descriptor closed, not closed later by this thread.
        let mut answers = self.answers.lock();
        if let Ok(a) = answers.as_mut() {
            a.push((id, answer));
        }
        self.pending.store(true, Ordering::Release);
        if let Some(waker) = self.waker.upgrade() {
            let _ = waker.wake();
        }
        drop(answers);
    }

    /// Waits for a delivery in flight (see `deliver`); once the loop has dropped its own
    /// references to the waker, no resolver thread holds one after this returns.
    pub fn quiesce(&self) {
        // A parent's inbox in a forked child: its resolver threads are not here (and the
        // lock may be held by one of them forever).
        if self.generation == sys::fork_generation() {
            drop(self.answers.lock());
        }
    }

    /// The answers delivered since the last call.
    pub fn take(&self) -> Vec<(u64, Answer)> {
        if !self.pending.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        self.answers
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default()
    }
}

struct Job {
    request: Request,
    inbox: Arc<Inbox>,
    id: u64,
    /// Set by the loop thread when the lookup's future is cancelled.
    withdrawn: Arc<AtomicBool>,
}

/// The resolver threads, shared by every loop of the process.
///
/// A child made by `fork()` has none of its parent's threads, and may have inherited
/// `jobs` locked by one of them: each pool records the fork generation it was made in,
/// and a process that finds its parent's pool makes one of its own (the old one, a copy
/// made by `fork`, is left alone: its jobs belong to the parent's loops).
struct Pool {
    generation: u64,
    jobs: Mutex<VecDeque<Job>>,
    cond: Condvar,
    threads: AtomicUsize,
    idle: AtomicUsize,
}

/// The current process's pool: null, or made by `Box::into_raw` and never freed.
static POOL: AtomicPtr<Pool> = AtomicPtr::new(std::ptr::null_mut());

fn pool() -> &'static Pool {
    let generation = sys::fork_generation();
    loop {
        let current = POOL.load(Ordering::Acquire);
        // SAFETY: a non-null POOL points to a pool that is never freed.
        if let Some(pool) = unsafe { current.as_ref() }
            && pool.generation == generation
        {
            return pool;
        }
        let fresh = Box::into_raw(Box::new(Pool {
            generation,
            jobs: Mutex::new(VecDeque::new()),
            cond: Condvar::new(),
            threads: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
        }));
        match POOL.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: just installed; from now on never freed.
            Ok(_) => return unsafe { &*fresh },
            // Another thread of this process installed one first: use that.
            // SAFETY: `fresh` was never shared.
            Err(_) => drop(unsafe { Box::from_raw(fresh) }),
        }
    }
}

fn worker(pool: &'static Pool) {
    loop {
        let job = {
            let Ok(mut jobs) = pool.jobs.lock() else {
                return;
            };
            loop {
                if let Some(job) = jobs.pop_front() {
                    break job;
                }
                pool.idle.fetch_add(1, Ordering::AcqRel);
                let (guard, wait) = match pool.cond.wait_timeout(jobs, IDLE_EXIT) {
                    Ok(r) => r,
                    Err(_) => return,
                };
                jobs = guard;
                pool.idle.fetch_sub(1, Ordering::AcqRel);
                if wait.timed_out() && jobs.is_empty() {
                    // Counted out under the lock: `submit` (which queues under it too)
                    // then starts a new thread if none is left.
                    pool.threads.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            }
        };
        // A withdrawn job is still answered, so that the loop forgets its future.
        let answer = if job.withdrawn.load(Ordering::Acquire) {
            Answer::Withdrawn
        } else {
            job.request.resolve()
        };
        job.inbox.deliver(job.id, answer);
    }
}

/// Queues a resolution; its answer reaches `inbox` under `id`. Once `withdrawn` is set,
/// a resolver thread that has not started it answers `Answer::Withdrawn` instead.
pub(crate) fn submit(
    request: Request,
    inbox: Arc<Inbox>,
    id: u64,
    withdrawn: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let pool = pool();
    if let Ok(mut jobs) = pool.jobs.lock() {
        jobs.push_back(Job {
            request,
            inbox,
            id,
            withdrawn,
        });
    }
    let threads = pool.threads.load(Ordering::Acquire);
    if pool.idle.load(Ordering::Acquire) == 0 && threads < MAX_THREADS {
        pool.threads.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("ferroloop-resolver".into())
            .spawn(move || worker(pool));
        if let Err(e) = spawned {
            pool.threads.fetch_sub(1, Ordering::AcqRel);
            if threads == 0 {
                return Err(e);
            }
        }
    }
    pool.cond.notify_one();
    Ok(())
}

/// The bytes of a C string argument, cut at the first NUL as C sees it.
fn c_string(bytes: &[u8]) -> CString {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).unwrap_or_default()
}

/// Parses `socket.getaddrinfo`'s arguments as the socket module does. `Ok(None)` means
/// the host or port has a type the module rejects: the caller lets `socket.getaddrinfo`
/// raise its own error (it does so before any lookup).
pub(crate) fn addrinfo_request(
    host: &Bound<'_, PyAny>,
    port: &Bound<'_, PyAny>,
    family: i32,
    socktype: i32,
    proto: i32,
    flags: i32,
) -> PyResult<Option<(Request, bool)>> {
    let py = host.py();
    let host_bytes = if host.is_none() {
        None
    } else if host.is_instance_of::<PyString>() {
        let idna = host.call_method1(pyo3::intern!(py, "encode"), ("idna",))?;
        Some(idna.cast_into::<PyBytes>()?.as_bytes().to_vec())
    } else if let Ok(b) = host.cast::<PyBytes>() {
        Some(b.as_bytes().to_vec())
    } else {
        return Ok(None);
    };
    let port_bytes = if port.is_exact_instance_of::<PyInt>() {
        Some(port.extract::<i64>()?.to_string().into_bytes())
    } else if let Ok(s) = port.cast::<PyString>() {
        Some(s.to_str()?.as_bytes().to_vec())
    } else if let Ok(b) = port.cast::<PyBytes>() {
        Some(b.as_bytes().to_vec())
    } else if port.is_none() {
        None
    } else {
        return Ok(None);
    };
    import_attr!(py, "sys", "audit")?.call1((
        "socket.getaddrinfo",
        host,
        port,
        family,
        socktype,
        proto,
    ))?;
    // NOTE: numeric hosts with numeric (or no) ports need no name service: they are
    //       answered on the loop thread. Service names read /etc/services: threads.
    let inline = host_bytes.as_deref().is_none_or(sys::is_numeric_host)
        && port_bytes
            .as_deref()
            .is_none_or(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit));
    Ok(Some((
        Request::AddrInfo {
            host: host_bytes.as_deref().map(c_string),
            port: port_bytes.as_deref().map(c_string),
            family,
            socktype,
            proto,
            flags,
        },
        inline,
    )))
}

/// Parses `socket.getnameinfo`'s arguments; `Ok(None)` when the socket module would
/// reject them (the caller lets it raise).
pub(crate) fn nameinfo_request(
    sockaddr: &Bound<'_, PyAny>,
    flags: i32,
) -> PyResult<Option<(Request, bool)>> {
    let py = sockaddr.py();
    let Ok(sa) = sockaddr.cast_exact::<PyTuple>() else {
        return Ok(None);
    };
    if !(2..=4).contains(&sa.len()) {
        return Ok(None);
    }
    let Ok(host) = sa.get_item(0)?.extract::<String>() else {
        return Ok(None);
    };
    if host.contains('\0') {
        return Ok(None);
    }
    let Ok(port) = sa.get_item(1)?.extract::<i32>() else {
        return Ok(None);
    };
    let mut extra = [0u32; 2];
    for (i, slot) in extra.iter_mut().enumerate() {
        if sa.len() > i + 2 {
            match sa.get_item(i + 2)?.extract::<u32>() {
                Ok(v) => *slot = v,
                Err(_) => return Ok(None),
            }
        }
    }
    if extra[0] > 0xfffff {
        return Err(PyOverflowError::new_err(
            "getnameinfo(): flowinfo must be 0-1048575.",
        ));
    }
    import_attr!(py, "sys", "audit")?.call1(("socket.getnameinfo", (sockaddr,)))?;
    let inline = flags & libc::NI_NUMERICHOST != 0 && flags & libc::NI_NUMERICSERV != 0;
    Ok(Some((
        Request::NameInfo {
            host: c_string(host.as_bytes()),
            port,
            flowinfo: extra[0],
            scope_id: extra[1],
            ipv4_tuple: sa.len() == 2,
            flags,
        },
        inline,
    )))
}

/// The socket module's exception for a failed resolution.
fn error(py: Python<'_>, e: GaiError) -> PyErr {
    match e {
        GaiError::Gai(code, msg) => match import_attr!(py, "socket", "gaierror") {
            Ok(cls) => match cls.call1((code, msg)) {
                Ok(exc) => PyErr::from_value(exc),
                Err(e) => e,
            },
            Err(e) => e,
        },
        GaiError::Os(errno) => crate::errors::os_error(py, errno),
        GaiError::Multiple => PyOSError::new_err("sockaddr resolved to multiple addresses"),
        GaiError::Ipv4TupleLen => PyOSError::new_err("IPv4 sockaddr must be 2 tuple"),
    }
}

pub(crate) fn sockaddr<'py>(py: Python<'py>, a: &SockAddr) -> PyResult<Bound<'py, PyAny>> {
    Ok(match a {
        SockAddr::V4 { host, port } => (host.as_str(), *port).into_pyobject(py)?.into_any(),
        SockAddr::V6 {
            host,
            port,
            flowinfo,
            scope_id,
        } => (host.as_str(), *port, *flowinfo, *scope_id)
            .into_pyobject(py)?
            .into_any(),
        SockAddr::UnixAbstract(name) => PyBytes::new(py, name).into_any(),
        SockAddr::UnixPath(path) => {
            // SAFETY: `path` is valid for its length; NULL means an exception is set.
            unsafe {
                Bound::from_owned_ptr_or_err(
                    py,
                    pyo3::ffi::PyUnicode_DecodeFSDefaultAndSize(
                        path.as_ptr().cast(),
                        path.len() as pyo3::ffi::Py_ssize_t,
                    ),
                )?
            }
        }
        SockAddr::Other { family, data } => (*family, PyBytes::new(py, data))
            .into_pyobject(py)?
            .into_any(),
    })
}

/// Converts an answer into what `socket.getaddrinfo` / `socket.getnameinfo` return.
pub(crate) fn to_python(py: Python<'_>, answer: Answer) -> PyResult<Bound<'_, PyAny>> {
    match answer {
        Answer::AddrInfo(res) => {
            let entries = res.map_err(|e| error(py, e))?;
            let convert = import_attr!(py, "socket", "_intenum_converter")?;
            let family_cls = import_attr!(py, "socket", "AddressFamily")?;
            let kind_cls = import_attr!(py, "socket", "SocketKind")?;
            let out = PyList::empty(py);
            for e in entries {
                let canon = match &e.canonname {
                    // Py_BuildValue("s") decodes strictly, as this does.
                    Some(c) => PyBytes::new(py, c)
                        .call_method1(pyo3::intern!(py, "decode"), ("utf-8",))?
                        .cast_into::<PyString>()?,
                    None => PyString::new(py, ""),
                };
                out.append((
                    convert.call1((e.family, family_cls))?,
                    convert.call1((e.socktype, kind_cls))?,
                    e.protocol,
                    canon,
                    sockaddr(py, &e.addr)?,
                ))?;
            }
            Ok(out.into_any())
        }
        Answer::NameInfo(res) => {
            let (h, p) = res.map_err(|e| error(py, e))?;
            Ok((h, p).into_pyobject(py)?.into_any())
        }
        // Only answers a cancelled future, which is not completed again.
        Answer::Withdrawn => Err(pyo3::exceptions::PyRuntimeError::new_err(
            "the resolution was withdrawn",
        )),
    }
}
