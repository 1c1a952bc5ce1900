//! Datagram transport. Mirrors asyncio.selector_events._SelectorDatagramTransport (UDP
//! and Unix datagram sockets, connected or not).

use std::collections::VecDeque;
use std::os::fd::RawFd;

use pyo3::exceptions::{
    PyBlockingIOError, PyInterruptedError, PyKeyboardInterrupt, PyOSError, PySystemExit,
    PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use super::flow::{FlowControl, call_protocol_hook, report_hook_error};
use super::stream::{LOG_THRESHOLD_FOR_CONNLOST_WRITES, MAX_SIZE};
use crate::event_loop::LoopCore;
use crate::py::{self, GilCell, import_attr};

/// Datagrams read per readiness event before yielding to other callbacks.
const READS_PER_EVENT: usize = 32;

/// The most bytes the spare `bytes` of a transport hold together (unless just one).
const SPARE_BYTES: usize = 64 * 1024;

/// The longest a datagram `sendto` deferred during a read batch waits for the batch to
/// end: past it, what was deferred is sent before the next delivery.
const DEFER_MAX: std::time::Duration = std::time::Duration::from_micros(50);

/// A datagram `sendto` took while the transport's reader was delivering a batch: sent
/// with the others of the batch by one `sendmmsg` when the batch ends.
struct Deferred {
    data: Py<PyBytes>,
    /// The address as given (for the write buffer if the socket's buffer is full).
    addr: Py<PyAny>,
    /// Its binary form.
    raw: crate::sys::RawAddr,
}

/// The inet readers' `recvmmsg` buffers (READS_PER_EVENT datagrams), shared by every
/// datagram transport of the process (the GIL guards it).
static BATCH: GilCell<Option<Box<crate::sys::RecvBatch>>> = GilCell::new(None);

/// Address tuples remembered per transport, in each of `Peers`' two caches.
const PEERS_CACHED: usize = 64;
// `AddrCache`'s indexes store entry numbers as u8.
const _: () = assert!(PEERS_CACHED <= 256);

type IndexMap =
    std::collections::HashMap<u64, u8, std::hash::BuildHasherDefault<crate::event_loop::IntHasher>>;

/// A hash of an address's bytes (for `AddrCache`'s index; equal bytes, equal hashes).
fn addr_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = bytes.len() as u64;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w))
            .rotate_left(23)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    h
}

/// Address tuples paired with their binary form, replaced round-robin once full, with
/// an index by the address's bytes and by the tuple's identity (a linear scan of 64
/// entries cost ~5% of a UDP echo's CPU).
#[derive(Default)]
struct AddrCache {
    entries: Vec<(crate::sys::RawAddr, Py<PyAny>)>,
    /// The entry replaced next once the cache is full.
    next: usize,
    /// `addr_hash` of an entry's bytes -> its index (the latest entry with that hash).
    raw_index: IndexMap,
    /// An entry's tuple (its address) -> its index.
    obj_index: IndexMap,
}

impl AddrCache {
    /// Remembers `obj` as `raw`; returns the entry it displaced (dropped by the caller
    /// outside any borrow).
    fn insert(&mut self, raw: crate::sys::RawAddr, obj: Py<PyAny>) -> Option<Py<PyAny>> {
        let (rh, oh) = (addr_hash(raw.bytes()), obj.as_ptr() as u64);
        let (i, old) = if self.entries.len() < PEERS_CACHED {
            self.entries.push((raw, obj));
            (self.entries.len() - 1, None)
        } else {
            let i = self.next;
            self.next = (i + 1) % PEERS_CACHED;
            let (old_raw, old_obj) = std::mem::replace(&mut self.entries[i], (raw, obj));
            let idx = i as u8;
            let old_rh = addr_hash(old_raw.bytes());
            if self.raw_index.get(&old_rh) == Some(&idx) {
                self.raw_index.remove(&old_rh);
            }
            let old_oh = old_obj.as_ptr() as u64;
            if self.obj_index.get(&old_oh) == Some(&idx) {
                self.obj_index.remove(&old_oh);
            }
            (i, Some(old_obj))
        };
        self.raw_index.insert(rh, i as u8);
        self.obj_index.insert(oh, i as u8);
        old
    }

    fn by_raw(&self, raw: &crate::sys::RawAddr) -> Option<&Py<PyAny>> {
        let i = *self.raw_index.get(&addr_hash(raw.bytes()))? as usize;
        let (r, t) = &self.entries[i];
        (r == raw).then_some(t)
    }

    fn by_object(&self, obj: &Bound<'_, PyAny>) -> Option<crate::sys::RawAddr> {
        let i = *self.obj_index.get(&(obj.as_ptr() as u64))? as usize;
        let (r, t) = &self.entries[i];
        (t.as_ptr() == obj.as_ptr()).then_some(*r)
    }
}

/// Recent peers. `received`: the address tuples this transport made for incoming
/// datagrams (exactly as `makesockaddr` spells them), so a datagram from a known peer
/// reuses its tuple (no `inet_ntop`, no new objects). `sent`: tuples the user passed to
/// `sendto` with their parsed form, so sending to the same object again skips parsing.
/// Only `received` answers for incoming datagrams: a user's own spelling of an address
/// (`"0:0:0:0:0:0:0:1"`) never reaches `datagram_received`.
#[derive(Default)]
struct Peers {
    received: AddrCache,
    sent: AddrCache,
}

impl Peers {
    fn by_raw(&self, py: Python<'_>, raw: &crate::sys::RawAddr) -> Option<Py<PyAny>> {
        self.received.by_raw(raw).map(|t| t.clone_ref(py))
    }

    /// The binary form of an address tuple this transport made or was given before.
    fn by_object(&self, obj: &Bound<'_, PyAny>) -> Option<crate::sys::RawAddr> {
        self.received
            .by_object(obj)
            .or_else(|| self.sent.by_object(obj))
    }
}

/// The binary form of an `AF_INET` / `AF_INET6` address tuple when it is a numeric host
/// and a port in range, exactly as `socket.sendto` would take it; anything else (host
/// names, `''`, `'<broadcast>'`, scoped IPv6 hosts, odd types) is left to the socket
/// object, which resolves or rejects it.
fn parse_inet(family: i32, addr: &Bound<'_, PyAny>) -> Option<crate::sys::RawAddr> {
    let t = addr.cast_exact::<PyTuple>().ok()?;
    let host = t.get_item(0).ok()?;
    let host = host.cast_exact::<pyo3::types::PyString>().ok()?;
    let host = host.to_str().ok()?;
    let int = |i: usize| -> Option<u64> {
        let v = t.get_item(i).ok()?;
        if !v.is_exact_instance_of::<pyo3::types::PyInt>() {
            return None;
        }
        v.extract::<u64>().ok()
    };
    let port = u16::try_from(int(1)?).ok()?;
    if family == libc::AF_INET && t.len() == 2 {
        return Some(crate::sys::RawAddr::v4(host.parse().ok()?, port));
    }
    if family == libc::AF_INET6 && (2..=4).contains(&t.len()) {
        let flowinfo = if t.len() > 2 { int(2)? } else { 0 };
        let scope_id = if t.len() > 3 { int(3)? } else { 0 };
        // socket.sendto: "flowinfo must be 0-1048575."
        if flowinfo > 0xfffff {
            return None;
        }
        let ip: std::net::Ipv6Addr = host.parse().ok()?;
        return Some(crate::sys::RawAddr::v6(
            ip,
            port,
            flowinfo as u32,
            u32::try_from(scope_id).ok()?,
        ));
    }
    None
}

struct St {
    fd: RawFd,
    /// The descriptor `repr()` shows: `fd`'s first value, kept once the transport is
    /// closed (asyncio's `_sock_fd` / `_fileno`).
    repr_fd: RawFd,
    loop_: Option<Py<LoopCore>>,
    wrapper: Option<Py<PyAny>>,
    sock: Option<Py<PyAny>>,
    protocol: Option<Py<PyAny>>,
    protocol_connected: bool,
    /// The `remote_addr` the socket is connected to, if any.
    address: Option<Py<PyAny>>,
    /// The socket has a peer (`extra['peername']`): use `send`, not `sendto`.
    connected: bool,
    /// AF_INET / AF_INET6: datagrams are received natively (other families through the
    /// socket object's `recvfrom`, which knows how to convert their addresses).
    inet: bool,
    family: i32,
    peers: Peers,
    /// Delivered datagrams' `bytes` that nothing else references any more (at most
    /// READS_PER_EVENT of them, SPARE_BYTES together unless just one): a new datagram of
    /// the same size is copied into one of them instead of a new object (a 1 KiB `bytes`
    /// is a glibc malloc/free pair, ~20% of a UDP echo's user time).
    spare: Vec<Py<PyBytes>>,
    spare_bytes: usize,
    /// The inet reader is delivering a batch: `sendto` defers what it can send natively
    /// to `out`, sent together when the batch ends (`flush_out`).
    batching: bool,
    out: Vec<Deferred>,
    /// When the first datagram now in `out` has waited DEFER_MAX.
    out_deadline: Option<std::time::Instant>,
    buf: VecDeque<(Py<PyBytes>, Py<PyAny>)>,
    buf_size: usize,
    /// Datagrams received in a batch but not delivered yet, because the protocol paused
    /// reading or its `datagram_received` raised: delivered first when reading goes on.
    pending: VecDeque<(Py<PyAny>, Py<PyAny>)>,
    conn_lost: u32,
    closing: bool,
    paused: bool,
    flow: FlowControl,
}

#[pyclass(frozen, name = "_DatagramCore", module = "ferroloop._ferroloop")]
pub struct DatagramCore {
    st: GilCell<St>,
}

fn passthrough(e: &PyErr, py: Python<'_>) -> bool {
    e.is_instance_of::<PyKeyboardInterrupt>(py) || e.is_instance_of::<PySystemExit>(py)
}

/// What a queued datagram of `len` bytes counts for in the write buffer: from Python
/// 3.13 asyncio adds 8 bytes of header per datagram (so that empty datagrams, sent from
/// 3.13, count too), and takes them off again when it is sent (gh-135444).
#[inline]
fn queued_size(py: Python<'_>, len: usize) -> usize {
    if py::version(py) >= (3, 13) {
        len + 8
    } else {
        len
    }
}

fn would_block(e: &PyErr, py: Python<'_>) -> bool {
    e.is_instance_of::<PyBlockingIOError>(py) || e.is_instance_of::<PyInterruptedError>(py)
}

impl DatagramCore {
    fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut St) -> R) -> R {
        self.st.with(py, f)
    }

    fn loop_<'py>(&self, py: Python<'py>) -> Option<Bound<'py, LoopCore>> {
        self.with(py, |s| s.loop_.as_ref().map(|l| l.clone_ref(py)))
            .map(|l| l.into_bound(py))
    }

    /// The loop and descriptor its `_transports` entry (if any) is under: None once the
    /// connection is lost or the core cleared.
    pub(crate) fn registration(&self, py: Python<'_>) -> Option<(Py<LoopCore>, RawFd)> {
        self.with(py, |s| {
            let lp = s.loop_.as_ref().filter(|_| s.fd >= 0)?;
            Some((lp.clone_ref(py), s.fd))
        })
    }

    fn get<'py>(
        &self,
        py: Python<'py>,
        f: impl FnOnce(&St) -> &Option<Py<PyAny>>,
    ) -> Bound<'py, PyAny> {
        self.with(py, |s| f(s).as_ref().map(|p| p.clone_ref(py)))
            .map_or_else(|| py.None().into_bound(py), |p| p.into_bound(py))
    }

    fn protocol<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.get(py, |s| &s.protocol)
    }

    fn wrapper<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.get(py, |s| &s.wrapper)
    }

    fn sock<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.get(py, |s| &s.sock)
    }

    fn add_io(slf: &Bound<'_, Self>, method: &str, read: bool) -> PyResult<()> {
        let py = slf.py();
        let Some(lp) = slf.get().loop_(py) else {
            return Ok(());
        };
        // The reader is the core itself (callable, named as the transport's method).
        let cb = if method == "_read_ready" {
            slf.clone().into_any()
        } else {
            slf.getattr(method)?
        };
        let fd = slf.get().with(py, |s| s.fd);
        if fd < 0 {
            return Ok(());
        }
        LoopCore::add_io_fd(&lp, fd, &cb, PyTuple::empty(py), read, true).map(drop)
    }

    fn remove_io(&self, py: Python<'_>, read: bool) -> PyResult<()> {
        let fd = self.with(py, |s| s.fd);
        if let Some(lp) = self.loop_(py)
            && fd >= 0
        {
            LoopCore::remove_io_fd(&lp, fd, read)?;
        }
        Ok(())
    }

    fn schedule_lost(slf: &Bound<'_, Self>, exc: Py<PyAny>) -> PyResult<()> {
        let py = slf.py();
        if let Some(lp) = slf.get().loop_(py) {
            let callback = super::connection_lost_callback(
                slf.as_any(),
                &slf.get().wrapper(py),
                "_DatagramCore",
            )?;
            lp.call_method1("call_soon", (callback, exc))?;
        }
        Ok(())
    }

    fn fatal_error(slf: &Bound<'_, Self>, exc: PyErr, message: &str) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let wrapper = core.wrapper(py);
        if let Some(lp) = core.loop_(py) {
            if exc.is_instance_of::<PyOSError>(py) {
                if lp.get().debug(py) {
                    let kw = PyDict::new(py);
                    kw.set_item("exc_info", exc.value(py))?;
                    py::asyncio_logger(py)?.call_method(
                        "debug",
                        ("%r: %s", &wrapper, message),
                        Some(&kw),
                    )?;
                }
            } else {
                let ctx = PyDict::new(py);
                ctx.set_item("message", message)?;
                ctx.set_item("exception", exc.value(py))?;
                ctx.set_item("transport", &wrapper)?;
                ctx.set_item("protocol", core.protocol(py))?;
                py::call_exception_handler_for(lp.as_any(), &ctx, exc.value(py))?;
            }
        }
        Self::force_close(slf, exc.into_value(py).into_any())
    }

    fn force_close(slf: &Bound<'_, Self>, exc: Py<PyAny>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        // Deferred datagrams count as sent (asyncio sent them at once); only what waits
        // in the write buffer is dropped.
        let flushed = match core.with(py, |s| s.conn_lost == 0) {
            true => Self::flush_out(slf),
            false => Ok(()),
        };
        let (lost, had_buf, closing) =
            core.with(py, |s| (s.conn_lost, !s.buf.is_empty(), s.closing));
        if lost > 0 {
            return flushed;
        }
        if had_buf {
            let old = core.with(py, |s| {
                s.buf_size = 0;
                std::mem::take(&mut s.buf)
            });
            drop(old);
            core.remove_io(py, false)?;
        }
        if !closing {
            core.set_closing(py);
            core.remove_io(py, true)?;
        }
        core.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
        Self::schedule_lost(slf, exc)?;
        flushed
    }

    fn maybe_pause_protocol(&self, py: Python<'_>) -> PyResult<()> {
        if self.with(py, |s| s.flow.should_pause(s.buf_size)) {
            call_protocol_hook(
                py,
                self.loop_(py),
                &self.protocol(py),
                &self.wrapper(py),
                "pause_writing",
            )?;
        }
        Ok(())
    }

    fn maybe_resume_protocol(&self, py: Python<'_>) -> PyResult<()> {
        if self.with(py, |s| s.flow.should_resume(s.buf_size)) {
            call_protocol_hook(
                py,
                self.loop_(py),
                &self.protocol(py),
                &self.wrapper(py),
                "resume_writing",
            )?;
        }
        Ok(())
    }

    /// Datagram `i` of the last batch `batch` received, as `(data, address)`.
    fn datagram<'py>(
        &self,
        py: Python<'py>,
        batch: &crate::sys::RecvBatch,
        i: usize,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (bytes, raw) = batch.get(i);
        let data = self.new_bytes(py, bytes);
        let addr = match self.with(py, |s| s.peers.by_raw(py, &raw)) {
            Some(a) => a.into_bound(py),
            None => {
                let sa = raw.to_sockaddr();
                let a = crate::dns::sockaddr(py, &sa)?;
                // A flowinfo socket.sendto would refuse ("flowinfo must be 0-1048575")
                // must not be sent back natively: such a tuple is not remembered.
                let sendable =
                    !matches!(sa, crate::sys::SockAddr::V6 { flowinfo, .. } if flowinfo > 0xfffff);
                if sendable {
                    let old = self.with(py, |s| s.peers.received.insert(raw, a.clone().unbind()));
                    drop(old);
                }
                a
            }
        };
        Ok((data.into_any(), addr))
    }

    /// Whether received datagrams may be delivered now.
    fn receiving(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.conn_lost == 0 && !s.paused && !s.closing)
    }

    /// Keeps datagrams `from..n` of `batch` for later delivery (dropped if the transport
    /// is closing: its socket would have dropped them).
    fn keep_pending(
        &self,
        py: Python<'_>,
        batch: &crate::sys::RecvBatch,
        from: usize,
        n: usize,
    ) -> PyResult<()> {
        if self.with(py, |s| s.closing || s.conn_lost > 0) {
            return Ok(());
        }
        for i in from..n {
            let (d, a) = self.datagram(py, batch, i)?;
            self.with(py, |s| s.pending.push_back((d.unbind(), a.unbind())));
        }
        Ok(())
    }

    /// Runs the reader again at the next iteration (the registration is edge-triggered).
    fn again(&self, py: Python<'_>) {
        if let Some(lp) = self.loop_(py) {
            lp.get().redispatch(py, self.with(py, |s| s.fd));
        }
    }

    /// `protocol.datagram_received(data, addr)`; `data` is kept for reuse if the
    /// protocol did not keep it.
    fn deliver(
        slf: &Bound<'_, Self>,
        data: Bound<'_, PyAny>,
        addr: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let r = core
            .protocol(py)
            .call_method1(pyo3::intern!(py, "datagram_received"), (&data, addr))
            .map(drop);
        core.recycle(py, data);
        if r.is_ok()
            && core.with(py, |s| {
                s.out_deadline
                    .is_some_and(|t| std::time::Instant::now() >= t)
            })
        {
            return Self::flush_out(slf);
        }
        r
    }

    /// While the reader delivers a batch, keeps a `bytes` datagram the socket can send
    /// natively for the batch's `sendmmsg` (true). Otherwise sends what was deferred
    /// first, to keep the order, and leaves this datagram to `sendto` (false).
    ///
    /// DEVIATION(asyncio): asyncio tries each datagram's `sendto(2)` inside `sendto`, so
    ///   a send error reaches `error_received` before `sendto` returns; a deferred
    ///   datagram's error reaches it when the batch is sent (at most 50 µs or one
    ///   `datagram_received` later). `get_write_buffer_size()` does not count deferred
    ///   datagrams: asyncio would have sent them, not buffered them.
    fn defer(
        slf: &Bound<'_, Self>,
        data: &Bound<'_, PyAny>,
        addr: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let py = slf.py();
        let core = slf.get();
        if !core.with(py, |s| s.batching) {
            return Ok(false);
        }
        let raw = match data.is_exact_instance_of::<PyBytes>() {
            true => core.native_addr(py, addr),
            false => None,
        };
        // NOTE: not on a connected socket: there the kernel reports a peer's refusal
        //       (ICMP) to the next send, and sendmmsg drops that error when it comes at a
        //       datagram other than the first.
        let Some(Some(raw)) = raw else {
            Self::flush_out(slf)?;
            return Ok(false);
        };
        if core.with(py, |s| s.out.len() >= crate::sys::SEND_BATCH) {
            Self::flush_out(slf)?;
        }
        // SAFETY: checked exact bytes above.
        let data = unsafe { data.clone().cast_into_unchecked::<PyBytes>() }.unbind();
        let d = Deferred {
            data,
            addr: addr.clone().unbind(),
            raw,
        };
        // A full socket buffer (found by a flush) queued datagrams: this one goes after.
        let refused = core.with(py, |s| {
            if !s.buf.is_empty() {
                return Some(d);
            }
            if s.out.is_empty() {
                s.out_deadline = Some(std::time::Instant::now() + DEFER_MAX);
            }
            s.out.push(d);
            None
        });
        Ok(refused.is_none())
    }

    /// Sends what `sendto` deferred during the read batch, in order, with one
    /// `sendmmsg` per SEND_BATCH datagrams. A full socket buffer queues the rest as
    /// `sendto` would have; any other error goes to `error_received` and loses that
    /// datagram, as asyncio's `sendto` reports it. What `error_received` raises goes to
    /// the exception handler; KeyboardInterrupt / SystemExit end the calls to it and are
    /// returned once every datagram was tried.
    fn flush_out(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let (fd, mut out) = core.with(py, |s| {
            s.out_deadline = None;
            (s.fd, std::mem::take(&mut s.out))
        });
        if out.is_empty() {
            return Ok(());
        }
        let mut res = Ok(());
        let mut sent = 0;
        while fd >= 0 && sent < out.len() {
            let mut msgs: [(&[u8], Option<&crate::sys::RawAddr>); crate::sys::SEND_BATCH] =
                [(&[], None); crate::sys::SEND_BATCH];
            let mut k = 0;
            for (m, d) in msgs.iter_mut().zip(&out[sent..]) {
                *m = (d.data.bind(py).as_bytes(), Some(&d.raw));
                k += 1;
            }
            match crate::sys::sendmmsg(fd, &msgs[..k]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    sent += 1;
                    if res.is_err() {
                        // After a KeyboardInterrupt / SystemExit: no more calls.
                        continue;
                    }
                    let exc = crate::errors::from_io(py, e).into_value(py);
                    let proto = core.protocol(py);
                    // What error_received sends goes out at once, right after the failed
                    // datagram, where asyncio (calling it inside that datagram's sendto)
                    // sends it; a protocol that re-sends a failing datagram from it
                    // recurses as on asyncio, instead of being deferred behind itself.
                    let batching = core.with(py, |s| std::mem::replace(&mut s.batching, false));
                    let r = proto.call_method1(pyo3::intern!(py, "error_received"), (exc,));
                    core.with(py, |s| s.batching = batching);
                    if let Err(e) = r {
                        let lp = core.loop_(py);
                        let w = core.wrapper(py);
                        res = report_hook_error(py, lp, &proto, &w, "error_received", e);
                    }
                    if core.with(py, |s| !s.buf.is_empty()) {
                        // It filled the socket's buffer: the rest queues behind it.
                        break;
                    }
                }
            }
        }
        for d in out.drain(..sent) {
            core.recycle(py, d.data.into_bound(py).into_any());
        }
        let queued = if fd >= 0 && !out.is_empty() {
            let n: usize = out
                .iter()
                .map(|d| queued_size(py, d.data.bind(py).as_bytes().len()))
                .sum();
            core.with(py, |s| {
                s.buf.extend(out.drain(..).map(|d| (d.data, d.addr)));
                s.buf_size += n;
            });
            Self::add_io(slf, "_sendto_ready", false).and_then(|()| core.maybe_pause_protocol(py))
        } else {
            Ok(())
        };
        // The emptied vector keeps its room for the next batch (unless Python code run
        // meanwhile deferred more: then it is dropped, outside the borrow).
        out.clear();
        let _unused = core.with(py, |s| {
            if s.out.capacity() == 0 {
                std::mem::replace(&mut s.out, out)
            } else {
                out
            }
        });
        res.and(queued)
    }

    /// The inet reader: up to `budget` datagrams, received `READS_PER_EVENT` at a time
    /// with `recvmmsg` (one system call for what a `recvfrom` per datagram would take:
    /// a system call costs ~170 ns here, ~4% of a 1 KiB UDP echo's server CPU).
    fn read_batches(
        slf: &Bound<'_, Self>,
        batch: &mut crate::sys::RecvBatch,
        mut budget: usize,
    ) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        while budget > 0 {
            if !core.receiving(py) {
                return Ok(());
            }
            let fd = core.with(py, |s| s.fd);
            let res = loop {
                match batch.recv(fd, budget) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let n = match res {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    // asyncio: an OSError from recvfrom goes to error_received.
                    budget -= 1;
                    let exc = crate::errors::from_io(py, e).into_value(py);
                    if let Err(e) = core
                        .protocol(py)
                        .call_method1(pyo3::intern!(py, "error_received"), (exc,))
                    {
                        core.again(py);
                        return Err(e);
                    }
                    continue;
                }
            };
            budget -= n;
            for i in 0..n {
                if !core.receiving(py) {
                    return core.keep_pending(py, batch, i, n);
                }
                let (data, addr) = match core.datagram(py, batch, i) {
                    Ok(got) => got,
                    Err(e) if passthrough(&e, py) => return Err(e),
                    Err(e) => {
                        return Self::fatal_error(slf, e, "Fatal read error on datagram transport");
                    }
                };
                if let Err(e) = Self::deliver(slf, data, addr) {
                    // The protocol's error goes to the exception handler (as asyncio's
                    // does); the rest of the batch is delivered at the next iteration.
                    core.again(py);
                    if let Err(lost) = core.keep_pending(py, batch, i + 1, n) {
                        // The protocol's error is the one reported; this one (memory
                        // running out) is not lost silently either.
                        lost.write_unraisable(py, Some(slf.as_any()));
                    }
                    return Err(e);
                }
            }
        }
        core.again(py);
        Ok(())
    }

    /// The inet reader: datagrams kept from earlier batches, then new ones, up to
    /// READS_PER_EVENT.
    fn read_inet(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let mut budget = READS_PER_EVENT;
        // Datagrams read ahead of a pause or a failed delivery go first.
        while budget > 0 && core.receiving(py) {
            let Some((data, addr)) = core.with(py, |s| s.pending.pop_front()) else {
                break;
            };
            budget -= 1;
            if let Err(e) = Self::deliver(slf, data.into_bound(py), addr.into_bound(py)) {
                core.again(py);
                return Err(e);
            }
        }
        // NOTE: the batch is taken out of its cell while Python code runs between
        //       deliveries: a re-entrant reader would allocate another.
        let mut batch = BATCH
            .with(py, |b| b.take())
            .unwrap_or_else(|| crate::sys::RecvBatch::new(READS_PER_EVENT));
        let res = Self::read_batches(slf, &mut batch, budget);
        BATCH.with(py, |b| {
            if b.is_none() {
                *b = Some(batch);
            }
        });
        res
    }

    /// The reader of other families (Unix datagram sockets): the socket object's
    /// `recvfrom`, which knows how to convert their addresses.
    fn read_ready_socket(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        for _ in 0..READS_PER_EVENT {
            if !core.receiving(py) {
                return Ok(());
            }
            let got = core
                .sock(py)
                .call_method1(pyo3::intern!(py, "recvfrom"), (MAX_SIZE,))
                .and_then(|p| {
                    let p = p.cast_into::<PyTuple>()?;
                    Ok((p.get_item(0)?, p.get_item(1)?))
                });
            let delivered = match got {
                Err(e) if would_block(&e, py) => return Ok(()),
                Err(e) if e.is_instance_of::<PyOSError>(py) => core
                    .protocol(py)
                    .call_method1(pyo3::intern!(py, "error_received"), (e.into_value(py),))
                    .map(drop),
                Err(e) if passthrough(&e, py) => return Err(e),
                Err(e) => {
                    return Self::fatal_error(slf, e, "Fatal read error on datagram transport");
                }
                Ok((data, addr)) => Self::deliver(slf, data, addr),
            };
            if let Err(e) = delivered {
                // The protocol's error goes to the exception handler (as asyncio's does);
                // datagrams still queued are delivered at the next iteration.
                core.again(py);
                return Err(e);
            }
        }
        core.again(py);
        Ok(())
    }

    /// A `bytes` holding `data`: a spare one when its size matches, else a new one.
    fn new_bytes<'py>(&self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        let spare = self.with(py, |s| {
            let b = s.spare.pop()?;
            s.spare_bytes -= b.bind(py).as_bytes().len();
            Some(b)
        });
        if let Some(b) = spare {
            let p = b.as_ptr();
            // SAFETY: `p` is an exact bytes object only this transport references (checked
            // when it became the spare, and nothing could take a reference since), so
            // rewriting its contents is invisible; its cached hash is reset. GIL held.
            unsafe {
                if pyo3::ffi::Py_REFCNT(p) == 1 && pyo3::ffi::Py_SIZE(p) as usize == data.len() {
                    let obj = p.cast::<pyo3::ffi::PyBytesObject>();
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        std::ptr::addr_of_mut!((*obj).ob_sval).cast::<u8>(),
                        data.len(),
                    );
                    #[allow(deprecated)]
                    {
                        (*obj).ob_shash = -1;
                    }
                    return b.into_bound(py);
                }
            }
        }
        PyBytes::new(py, data)
    }

    /// Keeps a delivered datagram's `bytes` for reuse if nothing else references it
    /// (only where the inet reader can reuse it).
    fn recycle(&self, py: Python<'_>, data: Bound<'_, PyAny>) {
        // SAFETY: reading the reference count of a live object, GIL held.
        let alone = unsafe { pyo3::ffi::Py_REFCNT(data.as_ptr()) } == 1;
        if alone && data.is_exact_instance_of::<PyBytes>() {
            // SAFETY: checked exact bytes just above.
            let b = unsafe { data.cast_into_unchecked::<PyBytes>() }.unbind();
            // Dropped here if not kept: outside the borrow.
            let _dropped = self.with(py, |s| {
                let len = b.bind(py).as_bytes().len();
                let room = s.spare.is_empty()
                    || (s.spare.len() < READS_PER_EVENT && s.spare_bytes + len <= SPARE_BYTES);
                if s.inet && !s.closing && room {
                    s.spare_bytes += len;
                    s.spare.push(b);
                    None
                } else {
                    Some(b)
                }
            });
        }
    }

    fn set_closing(&self, py: Python<'_>) {
        // Datagrams read ahead are dropped, as a closed socket drops what it queued.
        let (fd, w, pending) = self.with(py, |s| {
            s.closing = true;
            (
                s.fd,
                s.wrapper.as_ref().map(|w| w.as_ptr()),
                std::mem::take(&mut s.pending),
            )
        });
        drop(pending);
        if let (Some(lp), Some(w)) = (self.loop_(py), w) {
            super::forget_transport(&lp, fd, w);
        }
    }

    /// How a datagram to `addr` is sent without the socket object: `Some(None)` on a
    /// connected inet socket, `Some(Some(raw))` to a numeric inet address, `None` when
    /// only the socket object can send it.
    fn native_addr(
        &self,
        py: Python<'_>,
        addr: &Bound<'_, PyAny>,
    ) -> Option<Option<crate::sys::RawAddr>> {
        let (fd, inet, family, connected) =
            self.with(py, |s| (s.fd, s.inet, s.family, s.connected));
        if !inet || fd < 0 {
            return None;
        }
        if connected {
            return Some(None);
        }
        if let Some(raw) = self.with(py, |s| s.peers.by_object(addr)) {
            return Some(Some(raw));
        }
        let raw = parse_inet(family, addr)?;
        let old = self.with(py, |s| s.peers.sent.insert(raw, addr.clone().unbind()));
        drop(old);
        Some(Some(raw))
    }

    fn send_one(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        addr: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        // NOTE: the native paths skip the socket object, so no "socket.sendto" audit event.
        if let Some(raw) = self.native_addr(py, addr) {
            let fd = self.with(py, |s| s.fd);
            let view = py::ByteView::new(data)?;
            return match raw {
                None => Self::native_send(py, &view, |b| unsafe {
                    // SAFETY: `b` is a live slice.
                    crate::sys::send(fd, b.as_ptr(), b.len())
                }),
                Some(raw) => Self::native_send(py, &view, |b| crate::sys::sendto(fd, b, &raw)),
            };
        }
        let connected = self.with(py, |s| s.connected);
        let sock = self.sock(py);
        if connected {
            sock.call_method1(pyo3::intern!(py, "send"), (data,))?;
        } else {
            sock.call_method1(pyo3::intern!(py, "sendto"), (data, addr))?;
        }
        Ok(())
    }

    fn native_send(
        py: Python<'_>,
        view: &py::ByteView,
        send: impl Fn(&[u8]) -> std::io::Result<usize>,
    ) -> PyResult<()> {
        // SAFETY: the view covers `len` readable bytes and outlives the call.
        let bytes = unsafe { std::slice::from_raw_parts(view.as_ptr(), view.len()) };
        loop {
            match send(bytes) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => return other.map(drop).map_err(|e| crate::errors::from_io(py, e)),
            }
        }
    }
}

#[pymethods]
impl DatagramCore {
    fn _start_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let reading = slf.get().with(slf.py(), |s| !s.paused && !s.closing);
        if reading {
            Self::add_io(slf, "_read_ready", true)?;
        }
        Ok(())
    }

    /// The reader callback: `_read_ready()`.
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::_read_ready(slf)
    }

    /// What a handle's repr and the exception handler's message show for the reader
    /// callback (the core itself), as asyncio's show its bound method:
    /// `UDPTransport._read_ready`.
    #[getter]
    fn __qualname__(&self, py: Python<'_>) -> PyResult<String> {
        super::method_qualname(&self.wrapper(py), "_DatagramCore", "_read_ready")
    }

    fn _read_ready(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        // DEVIATION(asyncio): the registration is edge-triggered, so one event delivers
        //   the datagrams queued at that moment, up to READS_PER_EVENT (then the reader
        //   runs again at the next iteration): asyncio delivers one per loop iteration.
        if !core.with(py, |s| s.inet) {
            return Self::read_ready_socket(slf);
        }
        // Replies the protocol sends while the batch is delivered leave together at its
        // end (`defer`).
        let nested = core.with(py, |s| std::mem::replace(&mut s.batching, true));
        let res = Self::read_inet(slf);
        if nested {
            return res;
        }
        core.with(py, |s| s.batching = false);
        let flushed = Self::flush_out(slf);
        match (res, flushed) {
            (Ok(()), flushed) => flushed,
            (Err(e), Ok(())) => Err(e),
            // A KeyboardInterrupt / SystemExit from the replies (error_received) ends
            // the run, as it would have from sendto() inside datagram_received on
            // asyncio; the protocol's own error is its context.
            (Err(e), Err(lost)) if passthrough(&lost, py) => {
                lost.set_context(py, Some(e));
                Err(lost)
            }
            (Err(e), Err(lost)) => {
                lost.write_unraisable(py, Some(slf.as_any()));
                Err(e)
            }
        }
    }

    #[pyo3(signature = (data, addr=None))]
    pub(crate) fn sendto(
        slf: &Bound<'_, Self>,
        data: &Bound<'_, PyAny>,
        addr: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let ok = data.is_instance_of::<PyBytes>()
            || data.is_instance_of::<pyo3::types::PyByteArray>()
            || data.is_instance_of::<pyo3::types::PyMemoryView>();
        if !ok {
            return Err(PyTypeError::new_err(format!(
                "data argument must be a bytes-like object, not {}",
                data.get_type().name()?.repr()?
            )));
        }
        // NOTE: Python 3.13 sends empty datagrams (gh-113812); 3.12 and earlier drop
        //       them first thing. ferroloop follows the running Python's asyncio.
        if py::version(py) < (3, 13) && data.len()? == 0 {
            return Ok(());
        }
        let mut addr = addr.unwrap_or_else(|| py.None().into_bound(py));
        let address = core.get(py, |s| &s.address);
        if address.is_truthy()? {
            if !addr.is_none() && !addr.eq(&address)? {
                return Err(PyValueError::new_err(format!(
                    "Invalid address: must be None or {}",
                    address.str()?
                )));
            }
            addr = address.clone();
        }
        let (lost, empty, gone) =
            core.with(py, |s| (s.conn_lost, s.buf.is_empty(), s.sock.is_none()));
        if (lost > 0 && address.is_truthy()?) || gone {
            if lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES {
                py::asyncio_logger(py)?
                    .call_method1("warning", ("socket.send() raised exception.",))?;
            }
            core.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
            return Ok(());
        }
        if empty && Self::defer(slf, data, &addr)? {
            return Ok(());
        }
        // A flush of deferred datagrams may have found the socket's buffer full.
        let empty = empty && core.with(py, |s| s.buf.is_empty());
        if empty {
            match core.send_one(py, data, &addr) {
                Ok(()) => return Ok(()),
                Err(e) if would_block(&e, py) => Self::add_io(slf, "_sendto_ready", false)?,
                Err(e) if e.is_instance_of::<PyOSError>(py) => {
                    core.protocol(py)
                        .call_method1(pyo3::intern!(py, "error_received"), (e.into_value(py),))?;
                    return Ok(());
                }
                Err(e) if passthrough(&e, py) => return Err(e),
                Err(e) => {
                    return Self::fatal_error(slf, e, "Fatal write error on datagram transport");
                }
            }
        }
        // Ensure that what is queued is immutable.
        let bytes = if data.is_exact_instance_of::<PyBytes>() {
            data.clone().cast_into::<PyBytes>()?
        } else {
            py.get_type::<PyBytes>()
                .call1((data,))?
                .cast_into::<PyBytes>()?
        };
        let n = queued_size(py, bytes.as_bytes().len());
        core.with(py, |s| {
            s.buf.push_back((bytes.unbind(), addr.unbind()));
            s.buf_size += n;
        });
        core.maybe_pause_protocol(py)
    }

    fn _sendto_ready(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        if core.with(py, |s| s.conn_lost > 0 && s.buf.is_empty()) {
            // Aborted (from error_received) since the writer was scheduled again:
            // connection_lost is already on its way.
            return core.remove_io(py, false);
        }
        loop {
            let Some((data, addr)) = core.with(py, |s| {
                let item = s.buf.pop_front()?;
                s.buf_size -= queued_size(py, item.0.bind(py).as_bytes().len());
                Some(item)
            }) else {
                break;
            };
            match core.send_one(py, data.bind(py), addr.bind(py)) {
                Ok(()) => {}
                Err(e) if would_block(&e, py) => {
                    core.with(py, |s| {
                        s.buf_size += queued_size(py, data.bind(py).as_bytes().len());
                        s.buf.push_front((data, addr));
                    });
                    break;
                }
                Err(e) if e.is_instance_of::<PyOSError>(py) => {
                    // That datagram is dropped and the writer returns, as asyncio's does:
                    // its level-triggered writer sends the rest once the socket is
                    // writable again, at the next iteration or later (resume_writing and
                    // connection_lost come from there too).
                    core.protocol(py)
                        .call_method1(pyo3::intern!(py, "error_received"), (e.into_value(py),))?;
                    if let Some(lp) = core.loop_(py) {
                        lp.get().rearm(py, core.with(py, |s| s.fd));
                    }
                    return Ok(());
                }
                Err(e) if passthrough(&e, py) => return Err(e),
                Err(e) => {
                    return Self::fatal_error(slf, e, "Fatal write error on datagram transport");
                }
            }
        }
        core.maybe_resume_protocol(py)?;
        if core.with(py, |s| s.buf.is_empty()) {
            core.remove_io(py, false)?;
            if core.with(py, |s| s.closing) {
                Self::_call_connection_lost(slf, py.None().into_bound(py))?;
            }
        }
        Ok(())
    }

    fn get_write_buffer_size(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.buf_size)
    }

    fn get_write_buffer_limits(&self, py: Python<'_>) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
        self.with(py, |s| s.flow.get(py))
    }

    #[pyo3(signature = (high=None, low=None))]
    fn set_write_buffer_limits(
        &self,
        py: Python<'_>,
        high: Option<&Bound<'_, PyAny>>,
        low: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let limits = super::flow::limits(high, low, py)?;
        let old = self.with(py, |s| {
            let paused = s.flow.paused;
            std::mem::replace(&mut s.flow, super::flow::FlowControl { paused, ..limits })
        });
        drop(old);
        self.maybe_pause_protocol(py)
    }

    fn is_reading(&self, py: Python<'_>) -> bool {
        self.with(py, |s| !s.paused && !s.closing)
    }

    fn pause_reading(&self, py: Python<'_>) -> PyResult<()> {
        if !self.is_reading(py) {
            return Ok(());
        }
        self.with(py, |s| s.paused = true);
        self.remove_io(py, true)
    }

    fn resume_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let (closing, paused) = slf.get().with(py, |s| (s.closing, s.paused));
        if closing || !paused {
            return Ok(());
        }
        slf.get().with(py, |s| s.paused = false);
        Self::add_io(slf, "_read_ready", true)?;
        // Datagrams read ahead of the pause wait for no new event.
        if slf.get().with(py, |s| !s.pending.is_empty()) {
            slf.get().again(py);
        }
        Ok(())
    }

    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        if core.with(py, |s| s.closing) {
            return Ok(());
        }
        // What sendto deferred counts as sent (asyncio sent it at once): out before closing.
        let flushed = Self::flush_out(slf);
        if core.with(py, |s| s.closing) {
            // error_received closed it meanwhile.
            return flushed;
        }
        core.set_closing(py);
        core.remove_io(py, true)?;
        if core.with(py, |s| s.buf.is_empty()) {
            core.with(py, |s| s.conn_lost = s.conn_lost.saturating_add(1));
            core.remove_io(py, false)?;
            Self::schedule_lost(slf, py.None())?;
        }
        flushed
    }

    fn abort(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::force_close(slf, slf.py().None())
    }

    #[pyo3(signature = (exc=None))]
    fn _force_close(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        Self::force_close(slf, exc.unwrap_or_else(|| slf.py().None()))
    }

    #[pyo3(signature = (exc, message="Fatal error on transport"))]
    fn _fatal_error(slf: &Bound<'_, Self>, exc: &Bound<'_, PyAny>, message: &str) -> PyResult<()> {
        Self::fatal_error(slf, PyErr::from_value(exc.clone()), message)
    }

    fn is_closing(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.closing)
    }

    fn get_protocol(&self, py: Python<'_>) -> Py<PyAny> {
        self.protocol(py).unbind()
    }

    fn set_protocol(&self, protocol: &Bound<'_, PyAny>) {
        let py = protocol.py();
        let old = self.with(py, |s| {
            s.protocol_connected = true;
            s.protocol.replace(protocol.clone().unbind())
        });
        drop(old);
    }

    fn _call_connection_lost(slf: &Bound<'_, Self>, exc: Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let core = slf.get();
        let connected = core.with(py, |s| s.protocol_connected);
        let proto = core.protocol(py);
        let res = if connected && !proto.is_none() {
            proto.call_method1("connection_lost", (&exc,)).map(drop)
        } else {
            Ok(())
        };
        let (taken, fd) = core.with(py, |s| {
            s.conn_lost = s.conn_lost.max(1);
            (
                (
                    s.sock.take(),
                    s.protocol.take(),
                    s.loop_.take(),
                    s.wrapper.take(),
                    std::mem::take(&mut s.buf),
                ),
                std::mem::replace(&mut s.fd, -1),
            )
        });
        if let Some(lp) = &taken.2
            && fd >= 0
        {
            if let Some(w) = &taken.3 {
                super::forget_transport(lp.bind(py), fd, w.as_ptr());
            }
            LoopCore::forget_fd(lp.bind(py), fd)?;
        }
        let closed = match &taken.0 {
            Some(sock) => sock.call_method0(py, "close").map(drop),
            None => Ok(()),
        };
        drop(taken);
        res.and(closed)
    }

    fn _repr(&self, py: Python<'_>, name: String) -> PyResult<String> {
        let (fd, shown, has_sock, closing, size) = self.with(py, |s| {
            (s.fd, s.repr_fd, s.sock.is_some(), s.closing, s.buf_size)
        });
        let mut info = vec![name];
        if !has_sock {
            info.push("closed".into());
        } else if closing {
            info.push("closing".into());
        }
        info.push(format!("fd={shown}"));
        if let Some(lp) = self.loop_(py)
            && !lp.get().is_closed(py)
        {
            let (r, w) = lp.get().io_registered(py, fd);
            let state = |b: bool| if b { "polling" } else { "idle" };
            info.push(format!("read={}", state(r)));
            info.push(format!("write=<{}, bufsize={size}>", state(w)));
        }
        Ok(format!("<{}>", info.join(" ")))
    }

    fn _finalize(&self, py: Python<'_>, wrapper: &Bound<'_, PyAny>) -> PyResult<()> {
        // Garbage from here on (as asyncio's weak reference, cleared before `__del__`),
        // even if the warning's record resurrects it: its entry in `_transports` goes.
        if let Some((lp, fd)) = self.registration(py) {
            super::forget_transport(lp.bind(py), fd, wrapper.as_ptr());
        }
        let sock = self.with(py, |s| s.sock.as_ref().map(|s| s.clone_ref(py)));
        let detach = || {
            let (fd, lp) = self.with(py, |s| {
                (
                    std::mem::replace(&mut s.fd, -1),
                    s.loop_.as_ref().map(|l| l.clone_ref(py)),
                )
            });
            super::detach_fd(py, fd, lp);
        };
        match sock {
            Some(sock) => super::warn_unclosed(wrapper, Some(sock.bind(py)), detach),
            None => Ok(()),
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // SAFETY: the collector runs with the GIL held and never inside `GilCell::with`.
        let s = unsafe { self.st.get_unchecked() };
        visit.call(&s.loop_)?;
        visit.call(&s.wrapper)?;
        visit.call(&s.sock)?;
        visit.call(&s.protocol)?;
        visit.call(&s.address)?;
        for (d, a) in &s.buf {
            visit.call(d)?;
            visit.call(a)?;
        }
        for (d, a) in &s.pending {
            visit.call(d)?;
            visit.call(a)?;
        }
        for d in &s.out {
            visit.call(&d.addr)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        // SAFETY: called by the collector with the GIL held, outside any `with`.
        let py = unsafe { Python::assume_attached() };
        // The loop's entry for the wrapper goes before the reference keeping it alive.
        let w = self.with(py, |s| s.wrapper.as_ref().map(|w| w.as_ptr()));
        if let (Some((lp, fd)), Some(w)) = (self.registration(py), w) {
            super::forget_transport(lp.bind(py), fd, w);
        }
        let taken = self.with(py, |s| {
            (
                s.loop_.take(),
                s.wrapper.take(),
                s.sock.take(),
                s.protocol.take(),
                s.address.take(),
                std::mem::take(&mut s.buf),
                {
                    s.spare_bytes = 0;
                    std::mem::take(&mut s.spare)
                },
                std::mem::take(&mut s.pending),
                std::mem::take(&mut s.out),
            )
        });
        drop(taken);
    }
}

/// asyncio's `_make_datagram_transport`.
#[allow(clippy::too_many_arguments)]
pub fn make<'py>(
    lp: &Bound<'py, LoopCore>,
    wrapper_type: &crate::py::transport_type::WrapperType,
    sock: &Bound<'py, PyAny>,
    fd: RawFd,
    protocol: &Bound<'py, PyAny>,
    address: Option<&Bound<'py, PyAny>>,
    waiter: Option<&Bound<'py, PyAny>>,
    extra: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = lp.py();
    let family: i32 = sock.getattr("family")?.extract()?;
    let connected = match extra.get_item("peername")? {
        Some(p) => p.is_truthy()?,
        None => false,
    };
    let core = Bound::new(
        py,
        DatagramCore {
            st: GilCell::new(St {
                fd,
                repr_fd: fd,
                loop_: Some(lp.clone().unbind()),
                wrapper: None,
                sock: Some(sock.clone().unbind()),
                protocol: Some(protocol.clone().unbind()),
                protocol_connected: true,
                address: address.filter(|a| !a.is_none()).map(|a| a.clone().unbind()),
                connected,
                inet: crate::sys::is_inet(family),
                family,
                peers: Peers::default(),
                spare: Vec::new(),
                spare_bytes: 0,
                batching: false,
                out: Vec::new(),
                out_deadline: None,
                buf: VecDeque::new(),
                pending: VecDeque::new(),
                buf_size: 0,
                conn_lost: 0,
                closing: false,
                paused: false,
                flow: FlowControl::default(),
            }),
        },
    )?;
    let wrapper = wrapper_type.wrap(core.as_any(), Some(extra.as_any()))?;
    let w = wrapper.clone().unbind();
    core.get().with(py, |s| s.wrapper = Some(w));
    super::register_transport(lp, fd, &wrapper)?;
    let built = (|| -> PyResult<()> {
        lp.call_method1(
            "call_soon",
            (protocol.getattr("connection_made")?, &wrapper),
        )?;
        lp.call_method1("call_soon", (core.getattr("_start_reading")?,))?;
        if let Some(waiter) = waiter
            && !waiter.is_none()
        {
            let set = import_attr!(py, "asyncio.futures", "_set_result_unless_cancelled")?;
            lp.call_method1("call_soon", (set, waiter, py.None()))?;
        }
        Ok(())
    })();
    if let Err(e) = built {
        // Undone: it stops claiming the descriptor (the caller closes the socket) and
        // its cycle with the wrapper is broken, as asyncio's half-built transport is
        // simply dropped.
        super::forget_transport(lp, fd, wrapper.as_ptr());
        let taken = core.get().with(py, |s| {
            s.closing = true;
            s.conn_lost = s.conn_lost.max(1);
            s.fd = -1;
            (
                s.wrapper.take(),
                s.protocol.take(),
                s.loop_.take(),
                s.sock.take(),
            )
        });
        drop(taken);
        return Err(e);
    }
    Ok(wrapper)
}
