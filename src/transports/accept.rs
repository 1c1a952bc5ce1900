//! Accepting connections natively: the listening socket's reader for plain (non-TLS)
//! TCP and Unix servers. Mirrors asyncio.selector_events' `_accept_connection` and
//! `_accept_connection2` without their per-connection socket object, task and `extra`
//! dict: the connection's descriptor and addresses go straight into a stream transport,
//! which makes a socket object and its `extra` entries only if they are asked for.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{PyTraverseError, PyVisit};

use super::stream;
use crate::errors;
use crate::event_loop::LoopCore;
use crate::py::GilCell;

struct St {
    loop_: Py<LoopCore>,
    /// The listening socket object.
    sock: Py<PyAny>,
    protocol_factory: Py<PyAny>,
    server: Py<PyAny>,
}

/// The reader of a listening socket: `loop.add_reader(fd, acceptor)`.
#[pyclass(frozen, name = "_Acceptor", module = "ferroloop._ferroloop")]
pub struct Acceptor {
    st: GilCell<Option<St>>,
    fd: RawFd,
    backlog: usize,
    unix: bool,
    /// asyncio's `_set_nodelay` condition: a TCP socket (AF_INET/6, SOCK_STREAM,
    /// IPPROTO_TCP); accepted sockets inherit the listener's protocol.
    nodelay: bool,
}

/// Errors after which asyncio stops accepting for a while (`ACCEPT_RETRY_DELAY`).
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Errors that only mean the accept queue is empty (asyncio returns on them).
fn queue_empty(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED)
    )
}

#[pymethods]
impl Acceptor {
    #[new]
    fn new(
        lp: &Bound<'_, LoopCore>,
        sock: &Bound<'_, PyAny>,
        protocol_factory: &Bound<'_, PyAny>,
        server: &Bound<'_, PyAny>,
        backlog: i64,
    ) -> PyResult<Self> {
        let fd: RawFd = sock.call_method0("fileno")?.extract()?;
        let family: i32 = sock.getattr("family")?.extract()?;
        let kind: i32 = sock.getattr("type")?.extract()?;
        let proto: i32 = sock.getattr("proto")?.extract()?;
        Ok(Acceptor {
            st: GilCell::new(Some(St {
                loop_: lp.clone().unbind(),
                sock: sock.clone().unbind(),
                protocol_factory: protocol_factory.clone().unbind(),
                server: server.clone().unbind(),
            })),
            fd,
            // listen() takes a negative backlog as 0; accepting stays possible.
            backlog: backlog.clamp(1, i64::from(i32::MAX)) as usize,
            unix: family == libc::AF_UNIX,
            nodelay: crate::sys::is_inet(family)
                && kind == libc::SOCK_STREAM
                && proto == libc::IPPROTO_TCP,
        })
    }

    /// The listening socket is readable: accept up to `backlog` connections (bpo-27906).
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let Some((lp, sock, factory, server)) = me.st.with(py, |s| {
            s.as_ref().map(|s| {
                (
                    s.loop_.clone_ref(py),
                    s.sock.clone_ref(py),
                    s.protocol_factory.clone_ref(py),
                    s.server.clone_ref(py),
                )
            })
        }) else {
            return Ok(());
        };
        let lp = lp.into_bound(py);
        for _ in 0..me.backlog {
            match crate::sys::accept(me.fd) {
                Ok((conn, peer)) => {
                    me.serve(&lp, factory.bind(py), server.bind(py), conn, peer)?;
                    // The protocol factory may have closed the server (and so the
                    // listening socket, whose number may already be reused).
                    let fd: RawFd = sock
                        .call_method0(py, pyo3::intern!(py, "fileno"))?
                        .extract(py)?;
                    if fd != me.fd {
                        return Ok(());
                    }
                }
                Err(e) if queue_empty(&e) => return Ok(()),
                Err(e) if out_of_resources(&e) => {
                    // Cold: asyncio's handling (exception handler, pause, retry later).
                    lp.call_method1(
                        pyo3::intern!(py, "_accept_exhausted"),
                        (errors::from_io(py, e), factory, sock, server, me.backlog),
                    )?;
                    return Ok(());
                }
                Err(e) => return Err(errors::from_io(py, e)),
            }
        }
        Ok(())
    }

    /// What a handle's repr shows for this callback (asyncio's shows its loop method).
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "Loop._accept_connection"
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // SAFETY: the collector runs with the GIL held and never inside `GilCell::with`.
        if let Some(s) = unsafe { self.st.get_unchecked() } {
            visit.call(&s.loop_)?;
            visit.call(&s.sock)?;
            visit.call(&s.protocol_factory)?;
            visit.call(&s.server)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        // SAFETY: called by the collector with the GIL held, outside any `with`.
        let py = unsafe { Python::assume_attached() };
        let old = self.st.with(py, |s| s.take());
        drop(old);
    }
}

impl Acceptor {
    /// One accepted connection: the protocol and its transport, made as asyncio's
    /// `_accept_connection2` task makes them, in a copy of the current context.
    fn serve(
        &self,
        lp: &Bound<'_, LoopCore>,
        factory: &Bound<'_, PyAny>,
        server: &Bound<'_, PyAny>,
        conn: OwnedFd,
        peer: crate::sys::RawAddr,
    ) -> PyResult<()> {
        let py = lp.py();
        let fd = conn.as_raw_fd();
        if self.nodelay {
            // As asyncio's _set_nodelay; a connection already reset fails later anyway.
            let _ = crate::sys::set_nodelay(fd);
        }
        let debug = lp.get().debug(py);
        let local = crate::sys::getsockname(fd).ok();
        // SAFETY: plain C-API calls with the GIL held; every Enter is paired with an Exit.
        let ctx = unsafe { Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyContext_CopyCurrent())? };
        // SAFETY: `ctx` is a fresh context that is not entered anywhere.
        if unsafe { pyo3::ffi::PyContext_Enter(ctx.as_ptr()) } < 0 {
            return Err(PyErr::fetch(py));
        }
        let mut protocol = None;
        let made = (|| -> PyResult<()> {
            if debug {
                return self.serve_debug(lp, factory, server, conn, &peer, &mut protocol);
            }
            let p = factory.call0()?;
            protocol = Some(p.clone());
            let t = super::types()?;
            let wrapper_type = if self.unix { &t.unix } else { &t.tcp };
            let addrs = crate::sys::PackedAddrs::new(&peer, local.as_ref());
            let server = (!server.is_none()).then_some(server);
            stream::make(
                lp,
                stream::Kind::Socket,
                wrapper_type,
                stream::File::Accepted(conn, addrs),
                fd,
                &p,
                None,
                None,
                server,
            )
            .map(drop)
        })();
        // SAFETY: `ctx` was entered above on this thread.
        if unsafe { pyo3::ffi::PyContext_Exit(ctx.as_ptr()) } < 0 {
            return Err(PyErr::fetch(py));
        }
        match made {
            Ok(()) => Ok(()),
            Err(e) if e.is_instance_of::<PyKeyboardInterrupt>(py) => Err(e),
            Err(e) if e.is_instance_of::<PySystemExit>(py) => Err(e),
            Err(e) => {
                // As asyncio: the connection is closed (dropped above) and the error
                // reported only in debug mode.
                if debug {
                    let context = PyDict::new(py);
                    context.set_item(
                        "message",
                        "Error on transport creation for incoming connection",
                    )?;
                    context.set_item("exception", e.value(py))?;
                    if let Some(p) = protocol.filter(|p| !p.is_none()) {
                        context.set_item("protocol", p)?;
                    }
                    crate::py::call_exception_handler_for(lp.as_any(), &context, e.value(py))?;
                }
                Ok(())
            }
        }
    }

    /// Debug mode: as asyncio, with a socket object from the start (logged with the
    /// peer's address) and `extra` filled eagerly.
    fn serve_debug<'py>(
        &self,
        lp: &Bound<'py, LoopCore>,
        factory: &Bound<'py, PyAny>,
        server: &Bound<'py, PyAny>,
        conn: OwnedFd,
        peer: &crate::sys::RawAddr,
        protocol: &mut Option<Bound<'py, PyAny>>,
    ) -> PyResult<()> {
        let py = lp.py();
        let addr = crate::dns::sockaddr(py, &peer.to_sockaddr())?;
        let fd = conn.into_raw_fd();
        let kw = PyDict::new(py);
        kw.set_item("fileno", fd)?;
        let sock = match crate::py::import_attr!(py, "socket", "socket")
            .and_then(|cls| cls.call((), Some(&kw)))
        {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: no socket object took the descriptor: close it here.
                unsafe { libc::close(fd) };
                return Err(e);
            }
        };
        crate::py::asyncio_logger(py)?.call_method1(
            "debug",
            ("%r got a new connection from %r: %r", server, &addr, &sock),
        )?;
        let made = (|| -> PyResult<()> {
            sock.call_method1("setblocking", (false,))?;
            let p = factory.call0()?;
            *protocol = Some(p.clone());
            let extra = PyDict::new(py);
            extra.set_item("peername", &addr)?;
            let server = (!server.is_none()).then_some(server);
            super::make_socket_transport(lp, &sock, &p, None, Some(extra.as_any()), server)
                .map(drop)
        })();
        if made.is_err() {
            let _ = sock.call_method0("close");
        }
        made
    }
}
