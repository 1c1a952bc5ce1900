"""The low-level socket coroutines: loop.sock_recv / sock_recv_into / sock_recvfrom /
sock_recvfrom_into / sock_sendall / sock_sendto / sock_connect / sock_accept /
sock_sendfile.

asyncio (selector_events.py) first tries the operation, and only when it would block
registers a reader/writer on the fd, removed again by a done-callback of its future;
errors are whatever the socket call raised.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import random
import socket
import ssl

import pytest
from _net import HOST, FullBacklog, assert_pending, refused_port, run
from _util import reraise_not_implemented, run_briefly

# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture
def closing():
    """Registers sockets (and files) to close at teardown: ``closing(sock)``."""
    things = []

    def register(thing):
        things.append(thing)
        return thing

    yield register
    for thing in reversed(things):
        thing.close()


@pytest.fixture
def sockpair(closing):
    a, b = socket.socketpair()
    closing(a)
    closing(b)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@pytest.fixture
def listener(closing):
    sock = closing(socket.socket())
    sock.bind((HOST, 0))
    sock.listen(100)
    sock.setblocking(False)
    return sock


@pytest.fixture
def tcp_pair(closing, listener):
    client = closing(socket.create_connection(listener.getsockname(), timeout=5))
    listener.setblocking(True)
    listener.settimeout(5)
    server, _ = listener.accept()
    closing(server)
    listener.setblocking(False)
    client.setblocking(False)
    server.setblocking(False)
    return client, server


@pytest.fixture
def udp_pair(closing):
    a = closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    b = closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    for s in (a, b):
        s.bind((HOST, 0))
        s.setblocking(False)
    return a, b


def small_buffers(*socks, size=32 * 1024):
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


# ---- sock_recv / sock_recv_into -------------------------------------------------------


def test_sock_recv_ready_data(loop, sockpair):
    a, b = sockpair
    b.send(b"hello")
    assert run(loop, loop.sock_recv(a, 100)) == b"hello"


def test_sock_recv_waits_for_data(loop, sockpair):
    a, b = sockpair

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        for _ in range(3):
            await asyncio.sleep(0)
        assert_pending(task)
        loop.call_later(0.01, b.send, b"later")
        return await task

    assert run(loop, main()) == b"later"


def test_sock_recv_reused_descriptor(loop):
    """A socket that waited in sock_recv is closed and its descriptor number reused by
    a new socket (and a new socket object, possibly at the same address): a wait on the
    new one is still woken (ferroloop skips re-registering only for the same live
    socket object)."""

    async def wait_then_send(a, b, payload):
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        for _ in range(3):
            await asyncio.sleep(0)
        assert_pending(task)
        loop.call_later(0.01, b.send, payload)
        return await asyncio.wait_for(task, 5)

    async def main():
        fds = set()
        for i in range(20):
            a, b = socket.socketpair()
            a.setblocking(False)
            try:
                fds.add(a.fileno())
                assert await wait_then_send(a, b, b"first %d" % i) == b"first %d" % i
                # The same socket again: its registration is reused.
                assert await wait_then_send(a, b, b"again %d" % i) == b"again %d" % i
                # A user reader in between, then the operation again.
                got = asyncio.Event()
                loop.add_reader(a, got.set)
                b.send(b"x")
                await asyncio.wait_for(got.wait(), 5)
                assert loop.remove_reader(a)
                assert a.recv(1) == b"x"
                assert await wait_then_send(a, b, b"after %d" % i) == b"after %d" % i
            finally:
                a.close()
                b.close()
            del a, b
        return fds

    fds = run(loop, main())
    assert len(fds) <= 2  # the descriptor numbers were reused


def test_sock_recv_reused_descriptor_same_object_dup(loop):
    """A registration reused for the same socket object still holds after another
    descriptor of the same connection came and went."""

    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            for i in range(3):
                task = asyncio.ensure_future(loop.sock_recv(a, 100))
                await asyncio.sleep(0)
                os.close(os.dup(a.fileno()))
                loop.call_later(0.01, b.send, b"%d" % i)
                assert await asyncio.wait_for(task, 5) == b"%d" % i

    run(loop, main())


def test_level_writer_keeps_firing_with_sock_recv_pending(loop, sockpair):
    """A level-triggered add_writer on a socket keeps being called while sock_recv
    operations on the same socket come and go."""
    a, _ = sockpair

    async def main():
        calls = 0

        def writable():
            nonlocal calls
            calls += 1

        first = asyncio.ensure_future(loop.sock_recv(a, 10))
        await asyncio.sleep(0.01)
        loop.add_writer(a, writable)
        try:
            second = asyncio.ensure_future(loop.sock_recv(a, 10))
            await asyncio.sleep(0.01)
            third = asyncio.ensure_future(loop.sock_recv(a, 10))
            await asyncio.sleep(0.01)
            before = calls
            await asyncio.sleep(0.05)
            assert calls - before > 10
        finally:
            loop.remove_writer(a)
        for t in (first, second, third):
            t.cancel()
        await asyncio.gather(first, second, third, return_exceptions=True)

    run(loop, main())


def test_sock_recv_respects_nbytes(loop, sockpair):
    a, b = sockpair
    b.send(b"0123456789")

    async def main():
        return [await loop.sock_recv(a, 4), await loop.sock_recv(a, 4), await loop.sock_recv(a, 4)]

    assert run(loop, main()) == [b"0123", b"4567", b"89"]


def test_sock_recv_eof(loop, sockpair):
    a, b = sockpair
    b.send(b"last")
    b.shutdown(socket.SHUT_WR)

    async def main():
        return [await loop.sock_recv(a, 100), await loop.sock_recv(a, 100)]

    assert run(loop, main()) == [b"last", b""]


def test_sock_recv_eof_while_waiting(loop, sockpair):
    a, b = sockpair

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0.01)
        b.close()
        return await task

    assert run(loop, main()) == b""


def test_sock_recv_tcp(loop, tcp_pair):
    client, server = tcp_pair

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(server, 1000))
        await asyncio.sleep(0.01)
        client.send(b"tcp data")
        return await task

    assert run(loop, main()) == b"tcp data"


def test_sock_recv_returns_bytes(loop, sockpair):
    a, b = sockpair
    b.send(b"x")
    assert type(run(loop, loop.sock_recv(a, 10))) is bytes


def test_sock_recv_into(loop, sockpair):
    a, b = sockpair
    buf = bytearray(10)

    async def main():
        task = asyncio.ensure_future(loop.sock_recv_into(a, buf))
        await asyncio.sleep(0.01)
        assert_pending(task)
        b.send(b"abc")
        return await task

    assert run(loop, main()) == 3
    assert buf == b"abc" + bytes(7)


def test_sock_recv_into_memoryview_slice(loop, sockpair):
    a, b = sockpair
    buf = bytearray(b"." * 8)
    b.send(b"0123456789")
    n = run(loop, loop.sock_recv_into(a, memoryview(buf)[2:6]))
    assert n == 4
    assert buf == b"..0123.."
    assert a.recv(100) == b"456789"


def test_sock_recv_into_eof(loop, sockpair):
    a, b = sockpair
    b.close()
    assert run(loop, loop.sock_recv_into(a, bytearray(4))) == 0


def test_sock_recv_closed_socket_error(loop, closing):
    loop.set_debug(False)  # debug mode would reject the (blocking) closed socket first
    s = socket.socket()
    s.close()
    with pytest.raises(OSError) as info:
        run(loop, loop.sock_recv(s, 10))
    assert info.value.errno == errno.EBADF


def test_sock_recv_peer_reset(loop, tcp_pair):
    """An RST from the peer surfaces as ConnectionResetError from the recv call."""
    client, server = tcp_pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(server, 100))
        await asyncio.sleep(0.01)
        client.close()
        return await task

    with pytest.raises(ConnectionResetError):
        run(loop, main())


# ---- sock_recvfrom / sock_recvfrom_into / sock_sendto ---------------------------------


def test_sock_sendto_recvfrom(loop, udp_pair):
    a, b = udp_pair

    async def main():
        task = asyncio.ensure_future(loop.sock_recvfrom(b, 100))
        await asyncio.sleep(0.01)
        assert_pending(task)
        sent = await loop.sock_sendto(a, b"datagram", b.getsockname())
        return sent, await task

    sent, (data, addr) = run(loop, main())
    assert sent == len(b"datagram")
    assert type(sent) is int
    assert data == b"datagram"
    assert addr == a.getsockname()


def test_sock_recvfrom_truncates(loop, udp_pair):
    a, b = udp_pair
    a.sendto(b"0123456789", b.getsockname())
    data, addr = run(loop, loop.sock_recvfrom(b, 4))
    assert data == b"0123"
    assert addr == a.getsockname()


def test_sock_recvfrom_into(loop, udp_pair):
    a, b = udp_pair
    buf = bytearray(16)

    async def main():
        task = asyncio.ensure_future(loop.sock_recvfrom_into(b, buf))
        await asyncio.sleep(0.01)
        assert_pending(task)
        a.sendto(b"into", b.getsockname())
        return await task

    n, addr = run(loop, main())
    assert n == 4
    assert buf[:4] == b"into"
    assert addr == a.getsockname()


def test_sock_recvfrom_into_nbytes(loop, udp_pair):
    a, b = udp_pair
    buf = bytearray(16)
    a.sendto(b"0123456789", b.getsockname())
    n, _ = run(loop, loop.sock_recvfrom_into(b, buf, 3))
    assert n == 3
    assert buf[:4] == b"012\x00"


def test_sock_recvfrom_into_nbytes_too_large(loop, udp_pair):
    """The socket method's check, raised as is (it runs before anything would block)."""
    _, b = udp_pair
    with pytest.raises(ValueError, match=r"^nbytes is greater than the length of the buffer$"):
        run(loop, loop.sock_recvfrom_into(b, bytearray(4), 10))


def test_sock_sendto_many(loop, udp_pair):
    a, b = udp_pair
    payloads = [bytes([i]) * (i + 1) for i in range(20)]

    async def main():
        for p in payloads:
            await loop.sock_sendto(a, p, b.getsockname())
        return [(await loop.sock_recvfrom(b, 100))[0] for _ in payloads]

    assert run(loop, main()) == payloads


def test_sock_sendto_unix_dgram(loop, closing, tmp_path):
    path_a, path_b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    a = closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    b = closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    a.bind(path_a)
    b.bind(path_b)
    a.setblocking(False)
    b.setblocking(False)

    async def main():
        n = await loop.sock_sendto(a, b"unix dgram", path_b)
        return n, await loop.sock_recvfrom(b, 100)

    assert run(loop, main()) == (10, (b"unix dgram", path_a))


# ---- sock_sendall ---------------------------------------------------------------------


def test_sock_sendall_small(loop, sockpair):
    a, b = sockpair
    assert run(loop, loop.sock_sendall(a, b"small")) is None
    assert b.recv(100) == b"small"


def test_sock_sendall_empty(loop, sockpair):
    a, b = sockpair
    assert run(loop, loop.sock_sendall(a, b"")) is None
    with pytest.raises(BlockingIOError):
        b.recv(100)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_sock_sendall_buffer_types(loop, sockpair, kind):
    a, b = sockpair
    run(loop, loop.sock_sendall(a, kind(b"buffer")))
    assert b.recv(100) == b"buffer"


@pytest.mark.parametrize("plain", [True, False], ids=["socket", "subclass"])
def test_sock_sendall_keeps_its_own_view_of_a_released_memoryview(loop, plain, closing):
    """The caller releases its memoryview while the send waits: the send goes on with a
    view of its own, as asyncio's does (ferroloop failed with ValueError part-way)."""

    class Sock(socket.socket):
        pass

    a, b = socket.socketpair()
    if not plain:
        a = Sock(fileno=a.detach())
    for s in (a, b):
        closing(s)
        s.setblocking(False)
    payload = bytearray(b"A" * 2_000_000)
    view = memoryview(payload)

    async def main():
        task = asyncio.ensure_future(loop.sock_sendall(a, view))
        await asyncio.sleep(0.01)
        assert not task.done()  # the socket's buffer is full
        view.release()
        got = 0
        while True:
            try:
                got += len(b.recv(1 << 20))
            except BlockingIOError:
                if task.done():
                    return got, task.exception()
                await asyncio.sleep(0.001)

    assert run(loop, main()) == (len(payload), None)


def test_sock_sendall_str_is_type_error(loop, sockpair):
    a, _ = sockpair
    with pytest.raises(TypeError):
        run(loop, loop.sock_sendall(a, "text"))


async def slow_reader(loop, sock, total, chunk=16 * 1024, pause=0.0005):
    received = bytearray()
    while len(received) < total:
        data = await loop.sock_recv(sock, chunk)
        if not data:
            break
        received += data
        await asyncio.sleep(pause)
    return bytes(received)


@pytest.mark.parametrize("pair", ["sockpair", "tcp_pair"])
def test_sock_sendall_large_slow_reader(loop, request, pair):
    """A payload far larger than the socket buffers: sock_sendall() waits for the
    reader, and every byte arrives in order."""
    a, b = request.getfixturevalue(pair)
    small_buffers(a, b)
    payload = random.Random(1).randbytes(3 * 1024 * 1024)

    async def main():
        sender = asyncio.ensure_future(loop.sock_sendall(a, payload))
        await asyncio.sleep(0.02)
        # Nobody reads yet: the buffers are full, the send is still pending.
        assert_pending(sender)
        received = await slow_reader(loop, b, len(payload))
        assert await sender is None
        return received

    received = run(loop, main(), timeout=30)
    assert len(received) == len(payload)
    assert received == payload


def test_sock_sendall_peer_closed(loop, sockpair):
    a, b = sockpair
    b.close()
    with pytest.raises(BrokenPipeError):
        run(loop, loop.sock_sendall(a, b"x" * 100))


def test_sock_sendall_peer_closes_while_pending(loop, sockpair):
    a, b = sockpair
    small_buffers(a, b)

    async def main():
        task = asyncio.ensure_future(loop.sock_sendall(a, b"x" * (4 * 1024 * 1024)))
        await asyncio.sleep(0.01)
        assert_pending(task)
        b.close()
        return await task

    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        run(loop, main())


# ---- sock_connect / sock_accept -------------------------------------------------------


def test_sock_connect_numeric(loop, closing, listener):
    client = closing(socket.socket())
    client.setblocking(False)

    async def main():
        assert await loop.sock_connect(client, listener.getsockname()) is None
        conn, addr = await loop.sock_accept(listener)
        closing(conn)
        return conn, addr

    conn, addr = run(loop, main())
    assert addr == client.getsockname()
    assert client.getpeername() == listener.getsockname()
    assert conn.getpeername() == client.getsockname()


def test_sock_connect_localhost(loop, closing, listener):
    """A host name is resolved (loop.getaddrinfo) with the socket's family."""
    client = closing(socket.socket())
    client.setblocking(False)
    port = listener.getsockname()[1]
    run(loop, loop.sock_connect(client, ("localhost", port)))
    assert client.getpeername() == (HOST, port)


def test_sock_connect_ipv6(loop, closing):
    lst = closing(socket.socket(socket.AF_INET6))
    lst.bind(("::1", 0))
    lst.listen(1)
    client = closing(socket.socket(socket.AF_INET6))
    client.setblocking(False)
    run(loop, loop.sock_connect(client, lst.getsockname()[:2]))
    assert client.getpeername()[:2] == lst.getsockname()[:2]


def test_sock_connect_unix(loop, closing, tmp_path):
    path = str(tmp_path / "s.sock")
    lst = closing(socket.socket(socket.AF_UNIX))
    lst.bind(path)
    lst.listen(1)
    client = closing(socket.socket(socket.AF_UNIX))
    client.setblocking(False)
    run(loop, loop.sock_connect(client, path))
    assert client.getpeername() == path


def test_sock_connect_refused(loop, closing):
    client = closing(socket.socket())
    client.setblocking(False)
    address = (HOST, refused_port())
    with pytest.raises(ConnectionRefusedError) as info:
        run(loop, loop.sock_connect(client, address))
    assert info.value.errno == errno.ECONNREFUSED
    # A non-blocking connect() reports EINPROGRESS; asyncio then raises
    # OSError(err, f"Connect call failed {address}") from SO_ERROR.
    assert info.value.strerror == f"Connect call failed {address}"
    assert str(info.value) == f"[Errno {errno.ECONNREFUSED}] Connect call failed {address}"


def test_sock_connect_unix_missing_path(loop, closing, tmp_path):
    client = closing(socket.socket(socket.AF_UNIX))
    client.setblocking(False)
    with pytest.raises(FileNotFoundError):
        run(loop, loop.sock_connect(client, str(tmp_path / "missing.sock")))


def test_sock_connect_unresolvable(loop, closing):
    client = closing(socket.socket())
    client.setblocking(False)
    with pytest.raises(socket.gaierror):
        run(loop, loop.sock_connect(client, ("ferroloop-test.invalid", 80)))


def test_sock_connect_family_mismatch(loop, closing):
    """An IPv6 literal for an AF_INET socket goes through getaddrinfo(family=AF_INET),
    which fails."""
    client = closing(socket.socket())
    client.setblocking(False)
    expected = None
    try:
        socket.getaddrinfo("::1", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        expected = exc.args
    with pytest.raises(socket.gaierror) as info:
        run(loop, loop.sock_connect(client, ("::1", 80)))
    assert info.value.args == expected


def test_sock_connect_timeout_then_cancel(loop, closing):
    """A connect that stays in progress is cancelled by wait_for(); the writer it
    registered is gone afterwards."""
    with FullBacklog() as target:
        client = closing(socket.socket())
        client.setblocking(False)

        async def main():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.sock_connect(client, target.address), 0.1)
            await asyncio.sleep(0)

        run(loop, main())
        assert loop.remove_writer(client) is False


def test_sock_accept_ready(loop, closing, listener):
    client = closing(socket.create_connection(listener.getsockname(), timeout=5))
    conn, addr = run(loop, loop.sock_accept(listener))
    closing(conn)
    assert addr == client.getsockname()
    assert isinstance(conn, socket.socket)
    # asyncio makes the accepted socket non-blocking.
    assert conn.gettimeout() == 0.0
    assert conn.family == socket.AF_INET
    assert conn.type == socket.SOCK_STREAM


def test_sock_accept_waits(loop, closing, listener):
    async def main():
        task = asyncio.ensure_future(loop.sock_accept(listener))
        for _ in range(3):
            await asyncio.sleep(0)
        assert_pending(task)
        client = closing(socket.socket())
        client.setblocking(False)
        await loop.sock_connect(client, listener.getsockname())
        conn, addr = await task
        closing(conn)
        await loop.sock_sendall(client, b"ping")
        return client.getsockname(), addr, await loop.sock_recv(conn, 10)

    client_name, addr, data = run(loop, main())
    assert addr == client_name
    assert data == b"ping"


def test_sock_accept_not_listening(loop, closing):
    s = closing(socket.socket())
    s.setblocking(False)
    with pytest.raises(OSError) as info:
        run(loop, loop.sock_accept(s))
    assert info.value.errno == errno.EINVAL


def test_sock_echo_many_clients(loop, closing, listener):
    async def handle(conn):
        data = await loop.sock_recv(conn, 100)
        await loop.sock_sendall(conn, data.upper())

    async def serve(n):
        # One sock_accept() at a time: asyncio keeps a single reader per fd, so a second
        # concurrent sock_accept() on the same socket would replace the first one's.
        handlers = []
        for _ in range(n):
            conn, _ = await loop.sock_accept(listener)
            closing(conn)
            handlers.append(asyncio.ensure_future(handle(conn)))
        await asyncio.gather(*handlers)

    async def client(i):
        c = closing(socket.socket())
        c.setblocking(False)
        await loop.sock_connect(c, listener.getsockname())
        await loop.sock_sendall(c, f"client {i}".encode())
        return await loop.sock_recv(c, 100)

    async def main():
        server = asyncio.ensure_future(serve(20))
        replies = await asyncio.gather(*(client(i) for i in range(20)))
        await server
        return replies

    assert run(loop, main()) == [f"CLIENT {i}".encode() for i in range(20)]


# ---- cancellation leaves nothing registered -------------------------------------------


def _pending_op(loop, name, sockpair, listener, udp_pair, closing):
    a, b = sockpair
    if name == "sock_recv":
        return a, loop.sock_recv(a, 10), "reader", lambda: b.send(b"after")
    if name == "sock_recv_into":
        return a, loop.sock_recv_into(a, bytearray(10)), "reader", lambda: b.send(b"after")
    if name == "sock_recvfrom":
        u, v = udp_pair
        return v, loop.sock_recvfrom(v, 10), "reader", lambda: u.sendto(b"after", v.getsockname())
    if name == "sock_recvfrom_into":
        u, v = udp_pair
        send = lambda: u.sendto(b"after", v.getsockname())  # noqa: E731
        return v, loop.sock_recvfrom_into(v, bytearray(10)), "reader", send
    if name == "sock_accept":

        def connect():
            closing(socket.create_connection(listener.getsockname(), timeout=5))

        return listener, loop.sock_accept(listener), "reader", connect
    if name == "sock_sendall":
        small_buffers(a, b)
        return a, loop.sock_sendall(a, b"x" * (4 * 1024 * 1024)), "writer", None
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "sock_recv",
        "sock_recv_into",
        "sock_recvfrom",
        "sock_recvfrom_into",
        "sock_accept",
        "sock_sendall",
    ],
)
def test_cancel_pending_op_unregisters_fd(loop, name, sockpair, listener, udp_pair, closing):
    sock, coro, kind, trigger = _pending_op(loop, name, sockpair, listener, udp_pair, closing)
    task = loop.create_task(coro)
    try:
        run_briefly(loop, 3)
        assert_pending(task)
        task.cancel()
        run_briefly(loop, 3)
        assert task.cancelled()
        if kind == "reader":
            assert loop.remove_reader(sock) is False
        else:
            assert loop.remove_writer(sock) is False
        if trigger is not None:
            # Nothing consumes what arrives after the cancellation.
            trigger()
            run_briefly(loop, 3)
            sock.setblocking(True)
            sock.settimeout(5)
            if name == "sock_accept":
                conn, _ = sock.accept()
                conn.close()
            elif name in ("sock_recvfrom", "sock_recvfrom_into"):
                assert sock.recvfrom(10)[0] == b"after"
            else:
                assert sock.recv(10) == b"after"
    finally:
        if not task.done():
            task.cancel()
            run_briefly(loop, 3)
        if task.done() and not task.cancelled():
            reraise_not_implemented(task.exception())


def test_cancel_then_new_recv(loop, sockpair):
    a, b = sockpair

    async def main():
        first = asyncio.ensure_future(loop.sock_recv(a, 10))
        await asyncio.sleep(0)
        first.cancel()
        second = asyncio.ensure_future(loop.sock_recv(a, 10))
        await asyncio.sleep(0)
        b.send(b"data")
        return await second, first.cancelled()

    assert run(loop, main()) == (b"data", True)


def test_recv_and_send_on_same_socket(loop, sockpair):
    """A pending sock_recv (reader) and a pending sock_sendall (writer) on one fd."""
    a, b = sockpair
    small_buffers(a, b)
    payload = b"y" * (1024 * 1024)

    async def main():
        recv = asyncio.ensure_future(loop.sock_recv(a, 100))
        send = asyncio.ensure_future(loop.sock_sendall(a, payload))
        await asyncio.sleep(0.01)
        assert_pending(recv)
        assert_pending(send)
        await loop.sock_sendall(b, b"to a")
        got = await recv
        received = await slow_reader(loop, b, len(payload), pause=0)
        await send
        return got, received

    got, received = run(loop, main())
    assert got == b"to a"
    assert received == payload


# ---- socket mode checks ---------------------------------------------------------------


def _call(loop, name, sock, tmp_file):
    addr = (HOST, 9)
    args = {
        "sock_recv": (sock, 1),
        "sock_recv_into": (sock, bytearray(1)),
        "sock_recvfrom": (sock, 1),
        "sock_recvfrom_into": (sock, bytearray(1)),
        "sock_sendall": (sock, b"x"),
        "sock_sendto": (sock, b"x", addr),
        "sock_connect": (sock, addr),
        "sock_accept": (sock,),
        "sock_sendfile": (sock, tmp_file),
    }[name]
    return getattr(loop, name)(*args)


SOCK_METHODS = [
    "sock_recv",
    "sock_recv_into",
    "sock_recvfrom",
    "sock_recvfrom_into",
    "sock_sendall",
    "sock_sendto",
    "sock_connect",
    "sock_accept",
    "sock_sendfile",
]


@pytest.fixture
def tmp_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"file data")
    with open(path, "rb") as f:
        yield f


@pytest.mark.parametrize("name", SOCK_METHODS)
def test_blocking_socket_rejected_in_debug_mode(loop, name, closing, tmp_file):
    """asyncio checks the socket's timeout in debug mode only."""
    loop.set_debug(True)
    sock = closing(socket.socket())
    assert sock.gettimeout() is None
    with pytest.raises(ValueError, match=r"^the socket must be non-blocking$"):
        run(loop, _call(loop, name, sock, tmp_file))


@pytest.mark.parametrize("name", SOCK_METHODS)
def test_socket_with_timeout_rejected_in_debug_mode(loop, name, closing, tmp_file):
    loop.set_debug(True)
    sock = closing(socket.socket())
    sock.settimeout(1.0)
    with pytest.raises(ValueError, match=r"^the socket must be non-blocking$"):
        run(loop, _call(loop, name, sock, tmp_file))


def test_blocking_socket_accepted_outside_debug_mode(loop, sockpair):
    """Outside debug mode asyncio does not check: with data ready, a blocking socket
    just works."""
    a, b = sockpair
    a.setblocking(True)
    b.setblocking(True)
    loop.set_debug(False)

    async def main():
        await loop.sock_sendall(b, b"blocking ok")
        return await loop.sock_recv(a, 100)

    assert run(loop, main()) == b"blocking ok"


@pytest.mark.parametrize("name", SOCK_METHODS)
def test_ssl_socket_rejected(loop, name, tmp_file):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    raw = socket.socket()
    raw.setblocking(False)
    sock = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    try:
        with pytest.raises(TypeError, match=r"^Socket cannot be of type SSLSocket$"):
            run(loop, _call(loop, name, sock, tmp_file))
    finally:
        sock.close()


def test_fd_used_by_transport(loop, closing, tcp_pair):
    """A socket owned by a transport cannot be used by sock_recv() when it would have
    to wait: RuntimeError naming the fd and the transport."""
    _, server = tcp_pair
    fd = server.fileno()

    async def main():
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server)
        try:
            with pytest.raises(RuntimeError) as info:
                await loop.sock_recv(server, 10)
            return str(info.value)
        finally:
            transport.close()
            await asyncio.sleep(0)

    message = run(loop, main())
    assert message.startswith(f"File descriptor {fd} is used by transport ")


# ---- sock_sendfile --------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path):
    data = random.Random(2).randbytes(300 * 1024)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


async def recv_all(loop, sock, n):
    received = bytearray()
    while len(received) < n:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            break
        received += chunk
    return bytes(received)


def test_sock_sendfile(loop, tcp_pair, data_file):
    client, server = tcp_pair
    f, data = data_file

    async def main():
        reader = asyncio.ensure_future(recv_all(loop, server, len(data)))
        sent = await loop.sock_sendfile(client, f)
        return sent, await reader

    sent, received = run(loop, main())
    assert sent == len(data)
    assert received == data
    assert f.tell() == len(data)


def test_sock_sendfile_offset_count(loop, tcp_pair, data_file):
    client, server = tcp_pair
    f, data = data_file

    async def main():
        reader = asyncio.ensure_future(recv_all(loop, server, 1000))
        sent = await loop.sock_sendfile(client, f, 5000, 1000)
        return sent, await reader

    sent, received = run(loop, main())
    assert sent == 1000
    assert received == data[5000:6000]
    # The file position ends after the bytes sent.
    assert f.tell() == 6000


def test_sock_sendfile_offset_past_end(loop, tcp_pair, data_file):
    client, _ = tcp_pair
    f, data = data_file
    assert run(loop, loop.sock_sendfile(client, f, len(data) + 10)) == 0


def test_sock_sendfile_empty_file(loop, tcp_pair, tmp_path):
    client, _ = tcp_pair
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with open(path, "rb") as f:
        assert run(loop, loop.sock_sendfile(client, f)) == 0


def test_sock_sendfile_fallback_non_regular_file(loop, tcp_pair):
    """A file object without a file descriptor: the fallback reads and sends it."""
    client, server = tcp_pair
    data = b"in memory " * 1000
    f = io.BytesIO(data)

    async def main():
        reader = asyncio.ensure_future(recv_all(loop, server, len(data)))
        sent = await loop.sock_sendfile(client, f)
        return sent, await reader

    sent, received = run(loop, main())
    assert sent == len(data)
    assert received == data
    assert f.tell() == len(data)


def test_sock_sendfile_fallback_offset_count(loop, tcp_pair):
    client, server = tcp_pair
    data = bytes(range(256)) * 100
    f = io.BytesIO(data)

    async def main():
        reader = asyncio.ensure_future(recv_all(loop, server, 300))
        sent = await loop.sock_sendfile(client, f, 10, 300)
        return sent, await reader

    sent, received = run(loop, main())
    assert sent == 300
    assert received == data[10:310]
    assert f.tell() == 310


def test_sock_sendfile_no_fallback(loop, tcp_pair):
    client, _ = tcp_pair
    with pytest.raises(asyncio.SendfileNotAvailableError, match=r"^not a regular file$"):
        run(loop, loop.sock_sendfile(client, io.BytesIO(b"data"), fallback=False))


def test_sock_sendfile_pipe_sends_nothing(loop, tcp_pair):
    """stdlib quirk (3.10-3.13): for a pipe, fstat() gives st_size 0, which asyncio's
    native path takes for an empty file: sock_sendfile() returns 0 at once, sends
    nothing and leaves the pipe's data unread (no fallback)."""
    client, server = tcp_pair
    r, w = os.pipe()
    os.write(w, b"through a pipe")
    os.close(w)
    with open(r, "rb", buffering=0) as f:
        assert run(loop, loop.sock_sendfile(client, f)) == 0
        assert f.read() == b"through a pipe"
    with pytest.raises(BlockingIOError):
        server.recv(100)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"count": 0}, ValueError, "count must be a positive integer (got 0)"),
        ({"count": -1}, ValueError, "count must be a positive integer (got -1)"),
        ({"count": "1"}, TypeError, "count must be a positive integer (got '1')"),
        ({"offset": -1}, ValueError, "offset must be a non-negative integer (got -1)"),
        ({"offset": 1.0}, TypeError, "offset must be a non-negative integer (got 1.0)"),
    ],
)
def test_sock_sendfile_bad_params(loop, tcp_pair, data_file, kwargs, exc, message):
    client, _ = tcp_pair
    f, _ = data_file
    with pytest.raises(exc) as info:
        run(loop, loop.sock_sendfile(client, f, **kwargs))
    assert str(info.value) == message


def test_sock_sendfile_text_file(loop, tcp_pair, tmp_path):
    client, _ = tcp_pair
    path = tmp_path / "t.txt"
    path.write_text("text")
    with open(path) as f:
        with pytest.raises(ValueError, match=r"^file should be opened in binary mode$"):
            run(loop, loop.sock_sendfile(client, f))


def test_sock_sendfile_datagram_socket(loop, udp_pair, data_file):
    a, _ = udp_pair
    f, _ = data_file
    with pytest.raises(ValueError, match=r"^only SOCK_STREAM type sockets are supported$"):
        run(loop, loop.sock_sendfile(a, f))


def test_sock_sendall_of_nothing_still_sends(loop):
    """asyncio calls send() even for empty data, so a closed or an unconnected socket
    fails."""

    async def main():
        closed = socket.socket()
        closed.setblocking(False)
        closed.close()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setblocking(False)
        errors = []
        for sock in (closed, udp):
            try:
                await loop.sock_sendall(sock, b"")
            except OSError as exc:
                errors.append(exc.errno)
        udp.close()
        return errors

    assert run(loop, main()) == [errno.EBADF, errno.EDESTADDRREQ]


def test_sock_recvfrom_into_negative_nbytes(loop):
    async def main():
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.setblocking(False)
        try:
            with pytest.raises(ValueError, match="negative buffersize"):
                await loop.sock_recvfrom_into(a, bytearray(10), -1)
        finally:
            a.close()

    run(loop, main())


def test_sock_recv_of_zero_bytes_returns_at_once(loop, sockpair):
    """``socket.recv(0)`` makes no system call and returns b'' (even with nothing to
    read, or on a closed socket); waiting for data would hang."""
    a, _ = sockpair

    async def main():
        closed = socket.socket()
        closed.setblocking(False)
        closed.close()
        return [
            await asyncio.wait_for(loop.sock_recv(a, 0), 2),
            await asyncio.wait_for(loop.sock_recv(closed, 0), 2),
        ]

    assert run(loop, main()) == [b"", b""]


class ShoutingSocket(socket.socket):
    """A subclass whose recv() / send() change the data: asyncio calls them."""

    def recv(self, n, *flags):
        return super().recv(n, *flags).upper()

    def send(self, data, *flags):
        return super().send(bytes(data).upper(), *flags)


class DuckSocket:
    """Not a socket: fileno() and recv() only, as asyncio needs for sock_recv."""

    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def gettimeout(self):
        return 0.0

    def recv(self, n):
        return b"duck:" + self.sock.recv(n)


def test_sock_recv_and_sendall_call_the_sockets_own_methods(loop, sockpair, closing):
    a, b = sockpair
    shouting = closing(ShoutingSocket(fileno=os.dup(a.fileno())))
    shouting.setblocking(False)

    async def main():
        b.send(b"incoming")
        got = await loop.sock_recv(shouting, 100)
        await loop.sock_sendall(shouting, b"outgoing")
        await asyncio.sleep(0.01)
        sent = b.recv(100)
        b.send(b"x")
        duck = await loop.sock_recv(DuckSocket(a), 10)
        return got, sent, duck

    assert run(loop, main()) == (b"INCOMING", b"OUTGOING", b"duck:x")


def test_sock_sendall_through_a_subclass_in_pieces(loop, closing):
    """A send() that takes part of the data at a time: the rest follows from where it
    stopped."""

    class Trickle(socket.socket):
        def send(self, data, *flags):
            return super().send(memoryview(data)[:7], *flags)

    a, b = socket.socketpair()
    closing(b)
    t = closing(Trickle(fileno=a.detach()))
    t.setblocking(False)
    data = bytes(range(256)) * 4

    async def main():
        # Many small sends fill a Unix socket's buffer (it counts each one's overhead):
        # the peer reads meanwhile.
        b.setblocking(False)
        send = asyncio.ensure_future(loop.sock_sendall(t, data))
        got = b""
        while len(got) < len(data):
            got += await asyncio.wait_for(loop.sock_recv(b, 4096), 5)
        await asyncio.wait_for(send, 5)
        return got

    assert run(loop, main()) == data


def test_sock_sendall_holds_its_buffer_while_pending(loop, sockpair):
    """As asyncio (which keeps a memoryview): a pending sendall's bytearray cannot be
    resized, and exactly its bytes reach the peer."""
    a, b = sockpair
    size = 3_000_000

    async def main():
        data = bytearray(b"a" * size)
        task = asyncio.ensure_future(loop.sock_sendall(a, data))
        await asyncio.sleep(0)
        assert not task.done()
        with pytest.raises(BufferError):
            del data[1_000_000:]
        got = 0
        while not (task.done() and got >= size):
            try:
                got += len(b.recv(1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await task
        return got

    assert run(loop, main()) == size


def test_sock_operation_awaited_twice(loop, sockpair):
    """A second await of a waiting operation is refused as a coroutine's; the first
    awaiter still gets the data."""
    a, b = sockpair

    async def main():
        op = loop.sock_recv(a, 100)

        async def wait_on():
            return await op

        first = asyncio.ensure_future(wait_on())
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="being awaited already"):
            await op
        b.send(b"payload")
        return await asyncio.wait_for(first, 2)

    assert run(loop, main()) == b"payload"


def test_sock_operation_send_before_start(loop, sockpair):
    a, _ = sockpair
    op = loop.sock_recv(a, 1)
    with pytest.raises(TypeError, match="just-started coroutine"):
        op.send(1)
    op.close()


@pytest.mark.parametrize("nbytes", [None, 0.0, 0])
def test_sock_recvfrom_into_falsy_nbytes_means_the_whole_buffer(loop, nbytes):
    async def main():
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind((HOST, 0))
            a.setblocking(False)
            b.sendto(b"abc", a.getsockname())
            buf = bytearray(10)
            n, _ = await asyncio.wait_for(loop.sock_recvfrom_into(a, buf, nbytes), 2)
            return bytes(buf[:n])
        finally:
            a.close()
            b.close()

    assert run(loop, main()) == b"abc"


def test_closing_a_waiting_operation_after_the_loop_closed(loop_factory, sockpair):
    """What collecting a pending task's coroutine after ``loop.close()`` does: the
    coroutine sees GeneratorExit (cancelling the operation's future on the closed loop
    raised RuntimeError into it, which a retry loop could catch forever)."""
    a, _ = sockpair
    loop = loop_factory()
    seen = []

    async def receive():
        try:
            await loop.sock_recv(a, 100)
        except BaseException as exc:
            seen.append(type(exc).__name__)
            raise

    coro = receive()
    task = loop.create_task(coro)
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    coro.close()
    task._log_destroy_pending = False
    assert seen == ["GeneratorExit"]


class Hesitant(socket.socket):
    """Its own recv() / send() say "would block" twice while the kernel is ready:
    asyncio's level-triggered watch simply asks again."""

    misses = 2

    def recv(self, n, *flags):
        if self.misses:
            self.misses -= 1
            raise BlockingIOError
        return super().recv(n, *flags)

    def send(self, data, *flags):
        if self.misses:
            self.misses -= 1
            return 0
        return super().send(data, *flags)


@pytest.mark.parametrize("op", ["recv", "sendall"])
def test_socket_object_that_says_would_block_while_ready(loop, closing, op):
    a, b = socket.socketpair()
    closing(b)
    sock = closing(Hesitant(fileno=a.detach()))
    sock.setblocking(False)

    async def main():
        if op == "recv":
            b.send(b"hello")
            return await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
        await asyncio.wait_for(loop.sock_sendall(sock, b"hello"), 5)
        return b.recv(100)

    assert run(loop, main()) == b"hello"


# ---- recv() failures injected with an LD_PRELOAD shim -----------------------------------

FAILING_RECV_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

static volatile int fail_fd = -1, fail_errno, fail_count;

/* The next `count` recv() calls on `fd` fail with `err`. */
void fail_recv(int fd, int err, int count) {
    fail_errno = err;
    fail_count = count;
    fail_fd = fd;
}

ssize_t recv(int fd, void *buf, size_t n, int flags) {
    static ssize_t (*real)(int, void *, size_t, int);
    if (!real) real = (ssize_t (*)(int, void *, size_t, int))dlsym(RTLD_NEXT, "recv");
    if (fd == fail_fd && fail_count > 0) {
        fail_count--;
        errno = fail_errno;
        return -1;
    }
    return real(fd, buf, n, flags);
}
"""

FAILING_RECV_SCRIPT = r"""
import asyncio, ctypes, errno, socket, sys
import ferroloop

fail_recv = ctypes.CDLL(None).fail_recv
kind = sys.argv[1]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()
a, b = socket.socketpair()
a.setblocking(False)


async def main():
    # The recv made once data arrives is interrupted: retried, as socket.recv retries.
    waiting = loop.create_task(loop.sock_recv(a, 100))
    await asyncio.sleep(0.05)
    fail_recv(a.fileno(), errno.EINTR, 1)
    b.send(b"hello")
    print(await asyncio.wait_for(waiting, 5))
    # The kernel's ENOMEM is an OSError with its errno (MemoryError is for a buffer
    # ferroloop could not allocate).
    b.send(b"x")
    await asyncio.sleep(0.05)
    fail_recv(a.fileno(), errno.ENOMEM, 1)
    try:
        await loop.sock_recv(a, 100)
    except OSError as e:
        print(type(e).__name__, e.errno == errno.ENOMEM)
    print(await loop.sock_recv(a, 100))


loop.run_until_complete(main())
loop.close()
"""


def test_sock_recv_interrupted_or_out_of_kernel_memory(loop_name, tmp_path):
    from _util import build_preload_shim, python_subprocess

    shim = build_preload_shim(FAILING_RECV_C, tmp_path / "failrecv.so", "the failing recv() shim")
    proc = python_subprocess(
        ["-c", FAILING_RECV_SCRIPT, loop_name], env_extra={"LD_PRELOAD": str(shim)}
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "b'hello'\nOSError True\nb'x'\n", err
