"""add_reader / add_writer / remove_reader / remove_writer."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import time

import pytest
from _util import run_briefly, run_until


@pytest.fixture
def sockpair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


class FileLike:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


def test_add_reader_int_fd(loop, sockpair):
    a, b = sockpair
    got = []

    def on_readable(*args):
        got.append((args, a.recv(100)))

    loop.add_reader(a.fileno(), on_readable, 1, "x")
    run_briefly(loop)
    assert got == []
    b.send(b"hello")
    run_until(loop, lambda: got)
    assert got == [((1, "x"), b"hello")]
    assert loop.remove_reader(a.fileno()) is True
    assert loop.remove_reader(a.fileno()) is False


def test_add_reader_file_object(loop, sockpair):
    a, b = sockpair
    got = []
    loop.add_reader(a, lambda: got.append(a.recv(100)))
    b.send(b"obj")
    run_until(loop, lambda: got)
    assert got == [b"obj"]
    # The object and its fd name the same registration.
    assert loop.remove_reader(a.fileno()) is True
    assert loop.remove_reader(a) is False


def test_add_reader_object_with_fileno_method(loop, sockpair):
    a, b = sockpair
    got = []
    loop.add_reader(FileLike(a.fileno()), lambda: got.append(a.recv(100)))
    b.send(b"fileno")
    run_until(loop, lambda: got)
    assert got == [b"fileno"]
    assert loop.remove_reader(FileLike(a.fileno())) is True


def test_reader_is_level_triggered(loop, sockpair):
    """A reader that does not drain its fd is called again on every iteration."""
    a, b = sockpair
    calls = []
    loop.add_reader(a, calls.append, "r")
    b.send(b"x")
    run_until(loop, lambda: calls)
    n = len(calls)
    run_briefly(loop, 3)
    assert len(calls) == n + 3
    # Drained: no more calls.
    a.recv(100)
    run_briefly(loop)  # the event may already have been queued
    n = len(calls)
    run_briefly(loop, 3)
    assert len(calls) == n
    loop.remove_reader(a)


def test_partial_drain_keeps_reader_ready(loop, sockpair):
    a, b = sockpair
    chunks = []
    loop.add_reader(a, lambda: chunks.append(a.recv(1)))
    b.send(b"abc")
    run_until(loop, lambda: len(chunks) == 3)
    assert chunks == [b"a", b"b", b"c"]
    loop.remove_reader(a)


def test_writer_is_level_triggered(loop, sockpair):
    a, _ = sockpair
    calls = []
    loop.add_writer(a, calls.append, "w")
    run_until(loop, lambda: calls)
    n = len(calls)
    run_briefly(loop, 3)
    assert len(calls) == n + 3
    assert loop.remove_writer(a) is True
    n = len(calls)
    run_briefly(loop, 2)
    assert len(calls) == n


def test_writer_called_when_buffer_drains(loop, sockpair):
    a, b = sockpair
    # Fill the send buffer.
    with pytest.raises(BlockingIOError):
        while True:
            a.send(b"x" * 65536)
    calls = []
    loop.add_writer(a, calls.append, "w")
    run_briefly(loop, 3)
    assert calls == []

    def drain():
        try:
            while b.recv(1 << 20):
                pass
        except BlockingIOError:
            pass

    drain()
    run_until(loop, lambda: calls)
    loop.remove_writer(a)


def test_replace_reader_callback(loop, sockpair):
    a, b = sockpair
    calls = []
    loop.add_reader(a, calls.append, "old")
    loop.add_reader(a, calls.append, "new")
    b.send(b"x")
    run_until(loop, lambda: calls)
    assert set(calls) == {"new"}
    assert loop.remove_reader(a) is True
    assert loop.remove_reader(a) is False


def test_reader_and_writer_on_same_fd(loop, sockpair):
    a, b = sockpair
    reads, writes = [], []
    loop.add_reader(a, lambda: reads.append(a.recv(100)))
    loop.add_writer(a, writes.append, 1)
    b.send(b"both")
    run_until(loop, lambda: reads and writes)
    assert reads == [b"both"]
    # Removing the writer keeps the reader.
    assert loop.remove_writer(a) is True
    assert loop.remove_writer(a) is False
    n = len(writes)
    b.send(b"again")
    run_until(loop, lambda: len(reads) == 2)
    assert reads == [b"both", b"again"]
    assert len(writes) == n
    assert loop.remove_reader(a) is True


def test_remove_reader_keeps_writer(loop, sockpair):
    a, _ = sockpair
    writes = []
    loop.add_reader(a, lambda: None)
    loop.add_writer(a, writes.append, 1)
    assert loop.remove_reader(a) is True
    run_until(loop, lambda: writes)
    assert loop.remove_writer(a) is True


def test_remove_unregistered(loop, sockpair):
    a, _ = sockpair
    assert loop.remove_reader(a) is False
    assert loop.remove_writer(a) is False
    loop.add_reader(a, lambda: None)
    assert loop.remove_writer(a) is False
    assert loop.remove_reader(a) is True


def test_reader_removes_itself(loop, sockpair):
    a, b = sockpair
    calls = []

    def once():
        calls.append(a.recv(100))
        assert loop.remove_reader(a) is True

    loop.add_reader(a, once)
    b.send(b"x")
    run_until(loop, lambda: calls)
    b.send(b"y")
    run_briefly(loop, 3)
    assert calls == [b"x"]


def test_reader_exception_goes_to_handler_and_stays_registered(loop, loop_errors, sockpair):
    a, b = sockpair
    calls = []

    def bad():
        calls.append(1)
        raise ZeroDivisionError("reader failed")

    loop.add_reader(a, bad)
    b.send(b"x")
    run_until(loop, lambda: len(calls) >= 2)
    assert len(loop_errors) >= 2
    ctx = loop_errors[0]
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["message"].startswith("Exception in callback ")
    assert "bad()" in ctx["message"]
    loop_errors.clear()
    loop.remove_reader(a)


def test_reader_removed_by_earlier_callback_in_same_iteration(loop):
    """Both fds are ready in the same iteration: whichever reader runs first removes the
    other, which must then not be called (its handle is cancelled)."""
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    try:
        calls = []
        fds = {"one": a1, "two": a2}

        def on_read(name, other):
            calls.append(name)
            fds[name].recv(100)
            assert loop.remove_reader(fds[other]) is True
            loop.remove_reader(fds[name])

        loop.add_reader(a1, on_read, "one", "two")
        loop.add_reader(a2, on_read, "two", "one")
        b1.send(b"x")
        b2.send(b"x")
        # Both fds are readable before the loop polls.
        run_until(loop, lambda: calls)
        run_briefly(loop, 2)
        assert len(calls) == 1
    finally:
        for s in (a1, b1, a2, b2):
            s.close()


def test_order_of_ready_io_and_timer_callbacks(loop, sockpair):
    """One iteration runs what was queued before it, then I/O callbacks, then due
    timers."""
    a, b = sockpair
    order = []
    loop.add_reader(a, lambda: (order.append("io"), a.recv(100)))
    loop.call_later(0, order.append, "timer")
    loop.call_soon(order.append, "soon")
    b.send(b"x")
    time.sleep(0.01)
    run_briefly(loop)
    assert order == ["soon", "io", "timer"]
    loop.remove_reader(a)


def test_reader_sees_eof(loop, sockpair):
    a, b = sockpair
    got = []

    def on_read():
        got.append(a.recv(100))
        loop.remove_reader(a)

    loop.add_reader(a, on_read)
    b.close()
    run_until(loop, lambda: got)
    assert got == [b""]


def test_pipe_reader(loop):
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        got = []
        loop.add_reader(r, lambda: got.append(os.read(r, 100)))
        os.write(w, b"pipe")
        run_until(loop, lambda: got)
        assert got == [b"pipe"]
        assert loop.remove_reader(r) is True
    finally:
        os.close(r)
        os.close(w)


def test_fd_closed_while_registered(loop, sockpair):
    a, _ = sockpair
    fd = a.fileno()
    loop.add_reader(fd, lambda: None)
    a.close()
    # The registration is still known to the loop (and removing it succeeds).
    assert loop.remove_reader(fd) is True


@pytest.mark.parametrize("direction", ["reader", "writer"])
def test_remove_with_socket_object_closed_since(loop, direction):
    """A socket object registered, then closed (fileno() is now -1): removing by the
    object still finds its registration, as the selectors module does (anyio closes
    sockets this way), and the number can be used by a new socket afterwards."""
    add, remove = getattr(loop, "add_" + direction), getattr(loop, "remove_" + direction)
    a, b = socket.socketpair()
    a.setblocking(False)
    fd = a.fileno()
    called = []
    add(a, called.append, "old")
    run_briefly(loop)
    a.close()
    assert a.fileno() == -1
    assert remove(a) is True
    with pytest.raises(ValueError, match=r"^Invalid file descriptor: -1$"):
        remove(a)  # no longer registered: nothing names the object now
    # Another closed socket that was never registered: asyncio's ValueError.
    c = socket.socket()
    c.close()
    with pytest.raises(ValueError, match=r"^Invalid file descriptor: -1$"):
        remove(c)
    with pytest.raises(ValueError, match=r"^Invalid file descriptor: -1$"):
        add(c, called.append, "never")
    # The number, reused by a new socket, works with a new callback only.
    d, e = socket.socketpair()
    try:
        d.setblocking(False)
        assert d.fileno() == fd
        got = []
        add(d, got.append, "new")
        if direction == "reader":
            e.send(b"x")
        run_until(loop, lambda: got)
        assert remove(d) is True
        assert called in ([], ["old"])  # a writer may have run before the close
        assert "old" not in got
    finally:
        for s in (b, d, e):
            s.close()


class ClosableFileLike:
    """A file-like object without weak-reference support whose fileno() turns -1."""

    __slots__ = ("sock",)

    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()


def test_remove_with_closed_object_without_weakrefs(loop):
    a, b = socket.socketpair()
    try:
        obj = ClosableFileLike(a)
        loop.add_reader(obj, lambda: None)
        a.close()
        assert obj.fileno() == -1
        assert loop.remove_writer(obj) is False
        assert loop.remove_reader(obj) is True
        with pytest.raises(ValueError, match=r"^Invalid file descriptor: -1$"):
            loop.remove_reader(obj)
    finally:
        b.close()


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
@pytest.mark.parametrize(
    ("fileobj", "message"),
    [
        (-1, "Invalid file descriptor: -1"),
        (FileLike(-5), "Invalid file descriptor: -5"),
        ("not a file", "Invalid file object: 'not a file'"),
        (1.5, "Invalid file object: 1.5"),
        (None, "Invalid file object: None"),
        (FileLike("x"), None),
    ],
    ids=["negative", "negative-fileno", "str", "float", "None", "bad-fileno"],
)
def test_add_bad_file_object(loop, method, fileobj, message):
    with pytest.raises(ValueError) as info:
        getattr(loop, method)(fileobj, lambda: None)
    assert type(info.value) is ValueError
    if message is None:
        assert str(info.value).startswith("Invalid file object: <")
    else:
        assert str(info.value) == message


@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_bad_file_object(loop, method):
    with pytest.raises(ValueError, match=r"^Invalid file descriptor: -1$"):
        getattr(loop, method)(-1)
    with pytest.raises(ValueError, match=r"^Invalid file object: 'x'$"):
        getattr(loop, method)("x")


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_closed_fd(loop, method):
    s = socket.socket()
    fd = s.fileno()
    s.close()
    with pytest.raises(OSError) as info:
        getattr(loop, method)(fd, lambda: None)
    assert type(info.value) is OSError
    assert info.value.errno == errno.EBADF
    assert str(info.value) == "[Errno 9] Bad file descriptor"
    assert loop.remove_reader(fd) is False
    assert loop.remove_writer(fd) is False


@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_regular_file(loop, method):
    """epoll refuses regular files with EPERM."""
    with tempfile.TemporaryFile() as f:
        with pytest.raises(PermissionError) as info:
            getattr(loop, method)(f, lambda: None)
        assert info.value.errno == errno.EPERM
        assert str(info.value) == "[Errno 1] Operation not permitted"
        assert loop.remove_reader(f) is False
        assert loop.remove_writer(f) is False


@pytest.mark.parametrize("fd", [2**31, 2**70], ids=["2**31", "2**70"])
def test_add_huge_fd(loop, fd):
    with pytest.raises(OverflowError, match=r"^Python int too large to convert to C int$"):
        loop.add_reader(fd, lambda: None)


def test_fd_number_reused_after_remove_and_close(loop):
    """remove_reader, close the socket, get the same fd number for a new socket: a new
    reader on it works (the loop must not assume the old registration still exists)."""
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, lambda: None)
    run_briefly(loop)
    assert loop.remove_reader(fd)
    a.close()
    b.close()
    c, d = socket.socketpair()
    try:
        assert c.fileno() == fd  # the lowest free number is reused
        got = []
        loop.add_reader(c.fileno(), lambda: got.append(c.recv(10)))
        d.send(b"again")
        run_until(loop, lambda: got)
        assert got == [b"again"]
        assert loop.remove_reader(c.fileno())
    finally:
        c.close()
        d.close()


def test_reader_readded_sees_data_that_arrived_meanwhile(loop, sockpair):
    """Data that arrives while no reader is registered is seen by a reader added later
    (edge-triggered notifications must not be lost)."""
    a, b = sockpair
    loop.add_reader(a, lambda: None)
    run_briefly(loop)
    loop.remove_reader(a)
    b.send(b"x")
    run_briefly(loop, 3)
    got = []
    loop.add_reader(a, lambda: got.append(a.recv(10)))
    run_until(loop, lambda: got)
    assert got == [b"x"]
    loop.remove_reader(a)
