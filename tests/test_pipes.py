"""Pipes: loop.connect_read_pipe / connect_write_pipe and the pipe transports (pipes,
sockets and character devices; regular files are refused).

stdlib reference: asyncio/base_events.py (connect_*_pipe) and asyncio/unix_events.py
(_UnixReadPipeTransport, _UnixWritePipeTransport).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import io
import os
import socket
import sys
import tty

import pytest
from _net import RecordingProtocol, run

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)  # (named in fcntl from Python 3.10)


def capacity(pipe) -> int:
    """How many bytes the pipe holds (64 KiB by default on Linux): a write of more to an
    empty non-blocking pipe writes exactly this much."""
    return fcntl.fcntl(pipe.fileno(), F_GETPIPE_SZ)


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


@pytest.fixture
def no_fd_leak(loop):
    """Fails the test if it leaves a file descriptor open (the loop's own are there
    before and after)."""
    before = open_fds()
    yield
    if not loop.is_closed():
        for _ in range(3):  # pending connection_lost() callbacks close the pipes
            loop.call_soon(loop.stop)
            loop.run_forever()
    leaked = {fd: _fd_target(fd) for fd in sorted(open_fds() - before)}
    assert not leaked, f"file descriptors left open: {leaked}"


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@contextlib.contextmanager
def pipe_files():
    """An ``os.pipe()`` as unbuffered (read, write) file objects. Either end may be handed
    to a transport (which then owns and closes it); whatever is still open is closed on
    exit. Tests close an end through its file object, never by fd number."""
    r, w = os.pipe()
    rf, wf = open(r, "rb", 0), open(w, "wb", 0)
    try:
        yield rf, wf
    finally:
        rf.close()
        wf.close()


class Drain:
    """Reads everything a (non-blocking) fd delivers, from a loop reader, until EOF."""

    def __init__(self, loop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.data = bytearray()
        self.eof = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        if chunk:
            self.data += chunk
        else:
            self.loop.remove_reader(self.fd)
            self.eof.set_result(None)


def skip_stdlib_310(loop_name: str, what: str) -> None:
    if loop_name == "asyncio" and sys.version_info < (3, 11):
        pytest.skip(f"ferroloop-only on this Python: {what} (asyncio 3.11+)")


# ---- read pipes ----------------------------------------------------------------------------


def test_read_pipe_data_eof_lost(loop, no_fd_leak):
    async def main():
        with pipe_files() as (r, w):
            pipe = r
            transport, proto = await loop.connect_read_pipe(RecordingProtocol, pipe)
            assert proto.events == ["made"]
            assert proto.transport is transport
            assert isinstance(transport, asyncio.ReadTransport)
            assert transport.get_extra_info("pipe") is pipe
            assert transport.get_extra_info("nothing", "default") == "default"
            assert transport.get_protocol() is proto
            assert not transport.is_closing()
            assert not os.get_blocking(r.fileno())  # set non-blocking
            w.write(b"hello ")
            await proto.read_until(6)
            w.write(b"world")
            await proto.read_until(11)
            w.close()
            assert await proto.lost is None
            assert bytes(proto.data) == b"hello world"
            assert proto.events == ["made", "data", "eof", "lost"]
            assert transport.is_closing()
            assert pipe.closed  # the transport owns the pipe object

    run(loop, main())


def test_read_pipe_eof_received_true_still_closes(loop, no_fd_leak):
    class KeepOpen(RecordingProtocol):
        eof_result = True

    async def main():
        with pipe_files() as (r, w):
            _, proto = await loop.connect_read_pipe(KeepOpen, r)
            w.close()
            # A pipe cannot stay half open: the transport closes after eof_received().
            assert await proto.lost is None
            assert proto.events == ["made", "eof", "lost"]

    run(loop, main())


def test_read_pipe_large_data(loop, no_fd_leak):
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def main():
        with pipe_files() as (r, w):
            _, proto = await loop.connect_read_pipe(RecordingProtocol, r)
            writer = await loop.connect_write_pipe(RecordingProtocol, w)
            writer[0].write(payload)
            writer[0].close()
            assert await proto.lost is None
            assert await writer[1].lost is None
            return bytes(proto.data)

    assert run(loop, main()) == payload


def test_read_pipe_pause_resume(loop, loop_name, no_fd_leak):
    skip_stdlib_310(loop_name, "is_reading() on pipe transports")

    async def main():
        with pipe_files() as (r, w):
            transport, proto = await loop.connect_read_pipe(RecordingProtocol, r)
            assert transport.is_reading()
            transport.pause_reading()
            assert not transport.is_reading()
            transport.pause_reading()  # idempotent
            w.write(b"while paused")
            for _ in range(5):
                await asyncio.sleep(0)
            await asyncio.sleep(0.01)
            assert proto.data == b""
            transport.resume_reading()
            assert transport.is_reading()
            transport.resume_reading()  # idempotent
            await proto.read_until(12)
            assert bytes(proto.data) == b"while paused"
            transport.close()
            assert not transport.is_reading()
            transport.resume_reading()  # no effect once closing
            assert not transport.is_reading()
            assert await proto.lost is None

    run(loop, main())


def test_read_pipe_paused_in_connection_made(loop, loop_name, no_fd_leak):
    """pause_reading() from connection_made(): nothing is read until resume_reading(),
    even with data already waiting (the transport starts reading only if still
    reading once connection_made() has run)."""
    skip_stdlib_310(loop_name, "pause_reading() from connection_made()")

    class PausesAtOnce(RecordingProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            transport.pause_reading()

    async def main():
        with pipe_files() as (r, w):
            w.write(b"early")
            transport, proto = await loop.connect_read_pipe(PausesAtOnce, r)
            assert not transport.is_reading()
            await asyncio.sleep(0.01)
            assert proto.events == ["made"]
            transport.resume_reading()
            await proto.read_until(5)
            transport.close()
            assert await proto.lost is None

    run(loop, main())


def test_read_pipe_close(loop, no_fd_leak):
    async def main():
        with pipe_files() as (r, w):
            pipe = r
            transport, proto = await loop.connect_read_pipe(RecordingProtocol, pipe)
            w.write(b"unread")
            transport.close()
            assert transport.is_closing()
            transport.close()  # idempotent
            assert await proto.lost is None
            assert proto.events == ["made", "lost"]  # nothing delivered after close()
            assert pipe.closed
            with pytest.raises(BrokenPipeError):
                w.write(b"x")

    run(loop, main())


def test_read_pipe_set_protocol(loop, no_fd_leak):
    async def main():
        with pipe_files() as (r, w):
            transport, first = await loop.connect_read_pipe(RecordingProtocol, r)
            second = RecordingProtocol()
            transport.set_protocol(second)
            assert transport.get_protocol() is second
            w.write(b"to second")
            w.close()
            assert await second.lost is None
            assert bytes(second.data) == b"to second"
            assert first.events == ["made"]

    run(loop, main())


def test_connect_read_pipe_cancelled(loop, no_fd_leak):
    """Cancelled before the waiter completes: the transport is closed, the pipe too."""

    async def main():
        with pipe_files() as (r, _):
            pipe = r
            protos = []

            def factory():
                protos.append(RecordingProtocol())
                return protos[-1]

            task = asyncio.ensure_future(loop.connect_read_pipe(factory, pipe))
            loop.call_soon(task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await protos[0].lost is None
            assert protos[0].events == ["made", "lost"]
            assert pipe.closed

    run(loop, main())


# ---- write pipes ---------------------------------------------------------------------------


def test_write_pipe_write_variants(loop, no_fd_leak):
    async def main():
        with pipe_files() as (r, w):
            pipe = w
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, pipe)
            assert proto.events == ["made"]
            assert isinstance(transport, asyncio.WriteTransport)
            # asyncio's write pipe transport is a full asyncio.Transport (its
            # _FlowControlMixin base): the read half is there and not implemented.
            assert isinstance(transport, asyncio.Transport)
            for method in (transport.pause_reading, transport.resume_reading):
                with pytest.raises(NotImplementedError):
                    method()
            assert transport.get_extra_info("pipe") is pipe
            assert not os.get_blocking(w.fileno())
            assert transport.can_write_eof() is True
            transport.write(b"bytes,")
            transport.write(bytearray(b"bytearray,"))
            transport.write(memoryview(b"memoryview,"))
            transport.write(b"")
            transport.writelines([b"a", bytearray(b"b"), memoryview(b"c")])
            transport.writelines([])
            assert transport.get_write_buffer_size() == 0
            transport.write_eof()
            assert transport.is_closing()
            transport.write_eof()  # idempotent
            assert await proto.lost is None
            assert proto.events == ["made", "lost"]
            assert pipe.closed
            got = bytearray()
            while chunk := r.read(1024):
                got += chunk
            assert got == b"bytes,bytearray,memoryview,abc"

    run(loop, main())


def test_write_pipe_buffer_flushed_before_eof(loop, no_fd_leak):
    async def main():
        with pipe_files() as (r, w):
            payload = os.urandom(5 * capacity(w) + 3)
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, w)
            transport.write(payload)
            assert transport.get_write_buffer_size() > 0  # the pipe holds 64 KiB at most
            transport.close()  # = write_eof(): flush, then close
            assert transport.is_closing()
            transport.write(b"dropped")  # after close(): silently ignored
            drain = Drain(loop, r.fileno())
            assert await proto.lost is None
            await drain.eof
            assert transport.get_write_buffer_size() == 0
            assert drain.data == payload

    run(loop, main())


def test_write_pipe_flow_control(loop, no_fd_leak):
    async def main():
        with pipe_files() as (r, w):
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, w)
            assert transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)  # defaults
            transport.set_write_buffer_limits(high=4096, low=1024)
            assert transport.get_write_buffer_limits() == (1024, 4096)
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(high=1, low=2)
            full = capacity(w)
            transport.write(b"a" * full)  # fills the pipe
            assert proto.events == ["made"]
            transport.write(b"b" * 4096)  # buffered: == high, not above it
            assert transport.get_write_buffer_size() == 4096
            assert proto.events == ["made"]
            transport.write(b"c")
            assert proto.events == ["made", "pause_writing"]
            transport.write(b"d" * 10000)  # pause_writing() is not repeated
            assert proto.events == ["made", "pause_writing"]
            drain = Drain(loop, r.fileno())
            while "resume_writing" not in proto.events:
                await asyncio.sleep(0.001)
            assert transport.get_write_buffer_size() <= 1024
            transport.close()
            assert await proto.lost is None
            await drain.eof
            assert proto.events == ["made", "pause_writing", "resume_writing", "lost"]
            assert drain.data == b"a" * full + b"b" * 4096 + b"c" + b"d" * 10000

    run(loop, main())


def test_write_pipe_abort_discards_buffer(loop, no_fd_leak):
    async def main():
        with pipe_files() as (r, w):
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, w)
            full = capacity(w)
            transport.write(b"x" * (full + 1000))
            assert transport.get_write_buffer_size() == 1000
            transport.abort()
            assert transport.is_closing()
            assert transport.get_write_buffer_size() == 0
            assert await proto.lost is None
            got = bytearray()
            while chunk := r.read(1 << 20):
                got += chunk
            assert got == b"x" * full

    run(loop, main())


def test_write_pipe_peer_closed_idle(loop, no_fd_leak):
    """The read end closes while nothing is buffered: connection_lost(None)."""

    async def main():
        with pipe_files() as (r, w):
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, w)
            transport.write(b"consumed")
            await asyncio.sleep(0)
            r.close()
            assert await proto.lost is None
            assert transport.is_closing()

    run(loop, main())


def test_write_pipe_peer_closed_with_buffer(loop, no_fd_leak):
    """The read end closes while data is buffered: connection_lost(BrokenPipeError)."""

    async def main():
        with pipe_files() as (r, w):
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, w)
            transport.write(b"x" * (capacity(w) + 1))
            assert transport.get_write_buffer_size() == 1
            r.close()
            exc = await proto.lost
            assert isinstance(exc, BrokenPipeError)
            assert transport.get_write_buffer_size() == 0

    run(loop, main())


def test_write_pipe_write_after_peer_closed(loop, no_fd_leak):
    """write() finds the read end closed (EPIPE) before the loop noticed: the transport
    closes with BrokenPipeError and later writes are dropped; the exception handler is
    not called (an OSError is not a bug)."""

    async def main():
        with pipe_files() as (r, w):
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, w)
            r.close()
            transport.write(b"x")
            assert transport.is_closing()
            transport.write(b"y")  # dropped
            exc = await proto.lost
            assert isinstance(exc, BrokenPipeError)

    run(loop, main())


def test_connect_write_pipe_cancelled(loop, no_fd_leak):
    async def main():
        with pipe_files() as (_, w):
            pipe = w
            protos = []

            def factory():
                protos.append(RecordingProtocol())
                return protos[-1]

            task = asyncio.ensure_future(loop.connect_write_pipe(factory, pipe))
            loop.call_soon(task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await protos[0].lost is None
            assert pipe.closed

    run(loop, main())


def test_pipe_streams(loop, no_fd_leak):
    """StreamReader/StreamWriter on a pipe pair, as asyncio applications build them;
    drain() waits while the reader is slow."""

    async def main():
        with pipe_files() as (r, w):
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), r)
            w_transport, w_proto = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, w
            )
            writer = asyncio.StreamWriter(w_transport, w_proto, None, loop)

            async def produce():
                for i in range(100):
                    writer.write(b"line %d\n" % i)
                    await writer.drain()
                writer.write(b"x" * 2_000_000)
                await writer.drain()
                writer.close()

            producer = asyncio.ensure_future(produce())
            lines = [await reader.readline() for _ in range(100)]
            assert lines == [b"line %d\n" % i for i in range(100)]
            await asyncio.sleep(0.01)
            assert not producer.done()  # drain() is waiting for the reader
            assert await reader.read() == b"x" * 2_000_000
            assert reader.at_eof()
            await producer

    run(loop, main())


# ---- sockets and character devices --------------------------------------------------------


@contextlib.contextmanager
def socket_files():
    """A socketpair as unbuffered (read, write) file objects, closed on exit if still
    open (a transport given one owns and closes it)."""
    a, b = socket.socketpair()
    rf, wf = open(a.detach(), "rb", 0), open(b.detach(), "wb", 0)
    try:
        yield rf, wf
    finally:
        rf.close()
        wf.close()


def test_socket_as_pipes(loop, no_fd_leak):
    async def main():
        with socket_files() as (read_pipe, write_pipe):
            r_transport, r_proto = await loop.connect_read_pipe(RecordingProtocol, read_pipe)
            w_transport, w_proto = await loop.connect_write_pipe(RecordingProtocol, write_pipe)
            w_transport.write(b"over a socket")
            await r_proto.read_until(13)
            r_transport.close()  # the peer goes away: the write side sees it
            assert await r_proto.lost is None
            assert await w_proto.lost is None
            assert w_transport.is_closing()

    run(loop, main())


def test_socket_write_pipe_peer_closed_with_buffer(loop, no_fd_leak):
    async def main():
        with socket_files() as (peer, write_pipe):
            w_transport, w_proto = await loop.connect_write_pipe(RecordingProtocol, write_pipe)
            w_transport.set_write_buffer_limits(high=1 << 30)
            while w_transport.get_write_buffer_size() == 0:
                w_transport.write(b"\0" * 65536)
                await asyncio.sleep(0)
            peer.close()
            exc = await w_proto.lost
            assert isinstance(exc, (BrokenPipeError, ConnectionResetError))

    run(loop, main())


@pytest.fixture
def pty_files():
    """(master, slave) of a new pty as unbuffered read/write file objects, closed at the
    end if still open."""
    master, slave = os.openpty()
    master_f, slave_f = open(master, "r+b", 0), open(slave, "r+b", 0)
    yield master_f, slave_f
    master_f.close()
    slave_f.close()


def test_pty_read(loop, pty_files, no_fd_leak):
    master, slave = pty_files

    async def main():
        transport, proto = await loop.connect_read_pipe(RecordingProtocol, master)
        slave.write(b"from the slave")
        await proto.read_until(14)
        assert bytes(proto.data).replace(b"\r", b"") == b"from the slave"
        slave.close()
        # Reading the master now fails with EIO, which is how a pty reports that the
        # other side is gone: the transport closes without calling the exception handler.
        exc = await proto.lost
        assert exc is None or (isinstance(exc, OSError) and exc.errno == errno.EIO), exc
        transport.close()
        assert master.closed

    run(loop, main())


def test_pty_write(loop, pty_files, no_fd_leak):
    master, slave = pty_files

    async def main():
        tty.setraw(slave.fileno())
        transport, proto = await loop.connect_write_pipe(RecordingProtocol, slave)
        transport.write(b"to the master")
        os.set_blocking(master.fileno(), False)
        got = bytearray()
        while len(got) < 13:
            await asyncio.sleep(0.001)
            got += master.read(1024) or b""  # None: nothing to read yet
        assert got == b"to the master"
        assert transport.get_extra_info("pipe") is slave
        transport.close()
        assert await proto.lost is None
        assert slave.closed

    run(loop, main())


# ---- refused pipes -------------------------------------------------------------------------


def _stdlib_message(make, path):
    """The ValueError message asyncio's own transport gives for a regular file."""
    std = asyncio.new_event_loop()
    try:
        with open(path, "r+b", buffering=0) as f:
            with pytest.raises(ValueError) as info:
                make(std)(f, asyncio.Protocol())
        return str(info.value)
    finally:
        std.close()


@pytest.mark.parametrize("direction", ["read", "write"])
def test_regular_file_refused(loop, tmp_path, direction, no_fd_leak):
    path = tmp_path / "regular"
    path.write_bytes(b"data")
    if direction == "read":

        def make(lp):
            return lp._make_read_pipe_transport
    else:

        def make(lp):
            return lp._make_write_pipe_transport

    expected = _stdlib_message(make, path)
    assert expected in (
        "Pipe transport is for pipes/sockets only.",
        "Pipe transport is only for pipes, sockets and character devices",
    )
    connect = loop.connect_read_pipe if direction == "read" else loop.connect_write_pipe

    async def main():
        with open(path, "r+b", buffering=0) as f:
            with pytest.raises(ValueError) as info:
                await connect(RecordingProtocol, f)
            assert str(info.value) == expected
            assert not f.closed  # refused, not taken over
            assert os.get_blocking(f.fileno())  # left as it was

    run(loop, main())


# ---- unclosed transports -------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["read", "write"])
def test_unclosed_pipe_transport_warns(loop_factory, direction):
    """A pipe transport collected while open warns ResourceWarning and closes its pipe."""
    loop = loop_factory()
    try:
        with pipe_files() as (r, w):
            pipe = r if direction == "read" else w
            connect = loop.connect_read_pipe if direction == "read" else loop.connect_write_pipe
            transport, proto = loop.run_until_complete(connect(asyncio.Protocol, pipe))
            loop.close()
            repr(transport)  # works after the loop closed
            with pytest.warns(ResourceWarning, match="unclosed transport"):
                del transport, proto
                gc.collect()
            assert pipe.closed
    finally:
        loop.close()


def test_pipe_object_with_fileno_only(loop, no_fd_leak):
    """Any object with fileno() and close() is accepted as a pipe."""

    class Pipe(io.RawIOBase):
        def __init__(self, fd):
            self.fd = fd

        def fileno(self):
            return self.fd

        def close(self):
            if not self.closed:
                os.close(self.fd)
            super().close()

    async def main():
        rfd, wfd = os.pipe()
        pipe = Pipe(rfd)
        with open(wfd, "wb", 0) as w:
            try:
                transport, proto = await loop.connect_read_pipe(RecordingProtocol, pipe)
                w.write(b"duck")
                await proto.read_until(4)
                transport.close()
                assert await proto.lost is None
                assert pipe.closed
            finally:
                pipe.close()

    run(loop, main())


def test_write_pipe_writes_after_the_reader_left_warn_as_asyncio(loop, no_fd_leak, caplog):
    """asyncio warns "pipe closed by peer..." from the sixth write after a loss (its
    constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5 writes dropped quietly); the reader
    going away is not itself counted. ferroloop counted it, and warned a write early."""
    import logging

    async def main():
        with pipe_files() as (r, w):
            transport, proto = await loop.connect_write_pipe(RecordingProtocol, w)
            r.close()
            assert await asyncio.wait_for(proto.lost, 5) is None
            with caplog.at_level(logging.WARNING, logger="asyncio"):
                for _ in range(7):
                    transport.write(b"x")
            return [rec.getMessage() for rec in caplog.records if rec.name == "asyncio"]

    assert (
        run(loop, main()) == ["pipe closed by peer or os.write(pipe, data) raised exception."] * 2
    )
