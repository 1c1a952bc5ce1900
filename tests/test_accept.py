"""Connections accepted by create_server() / create_unix_server(): what asyncio's
``_accept_connection`` / ``_accept_connection2`` guarantee, which ferroloop does natively
(no socket object, task or ``extra`` dict per connection until asked for).

stdlib reference: asyncio/selector_events.py (_accept_connection, _accept_connection2,
_SelectorTransport.__init__), asyncio/base_events.py (Server).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import socket
import sys
import uuid
import warnings

import pytest
from _net import HOST, RecordingProtocol, run, stdlib_only_from

VAR = contextvars.ContextVar("VAR", default="unset")


async def until(condition, what="condition"):
    """Waits (up to 2 s) for ``condition()`` to be true."""
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def serve(loop, factory=RecordingProtocol, host=HOST, unix=None):
    """A server whose protocols are collected in the returned list."""
    protos = []

    def make():
        protos.append(factory())
        return protos[-1]

    if unix is not None:
        return await loop.create_unix_server(make, unix), protos
    return await loop.create_server(make, host, 0), protos


def connected(protos, n=1):
    return len(protos) >= n and all(p.transport is not None for p in protos[:n])


async def accept_one(loop, factory=RecordingProtocol):
    """A server, a connected client socket and the server's protocol, once connected."""
    server, protos = await serve(loop, factory)
    client = socket.create_connection(server.sockets[0].getsockname()[:2])
    client.setblocking(False)
    await until(lambda: connected(protos), "the connection")
    return server, client, protos[0]


async def shut(server, client, proto=None):
    client.close()
    if proto is not None and proto.transport is not None:
        proto.transport.abort()
        await proto.lost
    server.close()
    await server.wait_closed()


def test_extra_info_of_accepted_connection(loop):
    async def main():
        server, client, proto = await accept_one(loop)
        tr = proto.transport
        try:
            sock = tr.get_extra_info("socket")
            assert sock is tr.get_extra_info("socket")  # the same object every time
            assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
            assert sock.getpeername() == client.getsockname()
            assert tr.get_extra_info("peername") == client.getsockname()
            assert tr.get_extra_info("sockname") == client.getpeername()
            assert tr.get_extra_info("sockname") == server.sockets[0].getsockname()
            assert tr.get_extra_info("peercert") is None
            assert tr.get_extra_info("sslcontext", 7) == 7
            assert tr.get_extra_info(name="peername") == client.getsockname()
            assert tr.get_extra_info("nothing", default="d") == "d"
            assert tr.get_extra_info(default="d", name="nothing") == "d"
            assert sorted(tr._extra) == ["peername", "socket", "sockname"]
            assert tr._extra["peername"] == client.getsockname()
            with pytest.raises(TypeError):
                tr.get_extra_info()
            with pytest.raises(TypeError):
                tr.get_extra_info("peername", None, None)
            with pytest.raises(TypeError):
                tr.get_extra_info("peername", bogus=1)
            # The socket object is the transport's: data written still arrives.
            tr.write(b"after socket")
            await asyncio.sleep(0.05)
            assert client.recv(100) == b"after socket"
        finally:
            await shut(server, client, proto)

    run(loop, main())


def test_extra_info_one_key_at_a_time(loop):
    """Asking for one key first (each key is made when first asked for on ferroloop)."""

    async def main():
        server, client, proto = await accept_one(loop)
        tr = proto.transport
        try:
            assert tr.get_extra_info("peername") == client.getsockname()
            assert tr.get_extra_info("sockname") == client.getpeername()
            assert tr.get_extra_info("socket").fileno() >= 0
            assert set(tr._extra) == {"peername", "socket", "sockname"}
        finally:
            await shut(server, client, proto)

    run(loop, main())


def test_extra_info_after_close(loop, loop_name):
    """peername and sockname are recorded at accept time, so they outlive the socket."""

    async def main():
        server, client, proto = await accept_one(loop)
        peer, local = client.getsockname(), client.getpeername()
        proto.transport.close()
        await proto.lost
        tr = proto.transport
        try:
            assert tr.get_extra_info("peername") == peer
            assert tr.get_extra_info("sockname") == local
            sock = tr.get_extra_info("socket")
            if loop_name == "asyncio" or loop.get_debug():
                assert sock.fileno() == -1
            else:
                # DEVIATION (README): no socket object was made before the close (in
                # debug mode ferroloop makes it at accept time, as asyncio).
                assert sock is None
        finally:
            await shut(server, client)

    run(loop, main())


def test_extra_info_ipv6(loop):
    if not socket.has_ipv6:  # pragma: no cover
        pytest.skip("no IPv6")

    async def main():
        try:
            server, protos = await serve(loop, host="::1")
        except OSError:  # pragma: no cover
            pytest.skip("no IPv6 loopback")
        client = socket.create_connection(server.sockets[0].getsockname()[:2])
        try:
            await until(lambda: connected(protos), "the connection")
            tr = protos[0].transport
            assert tr.get_extra_info("peername") == client.getsockname()
            assert len(tr.get_extra_info("peername")) == 4
            assert tr.get_extra_info("sockname") == client.getpeername()
            assert tr.get_extra_info("socket").family == socket.AF_INET6
        finally:
            await shut(server, client, protos[0] if protos else None)

    run(loop, main())


def test_unix_abstract_server_side_extra_info(loop):
    if not sys.platform.startswith("linux"):  # pragma: no cover
        pytest.skip("abstract Unix sockets are Linux-only")
    name = f"\0ferroloop-accept-{uuid.uuid4().hex}"

    async def main():
        server, protos = await serve(loop, unix=name)
        client = socket.socket(socket.AF_UNIX)
        client.connect(name)
        try:
            await until(lambda: connected(protos), "the connection")
            tr = protos[0].transport
            assert tr.get_extra_info("sockname") == name.encode()
            assert tr.get_extra_info("peername") == ""
            assert tr.get_extra_info("socket").family == socket.AF_UNIX
        finally:
            await shut(server, client, protos[0] if protos else None)

    run(loop, main())


def test_contexts_of_protocol_callbacks(loop):
    """The factory runs in a copy of the server's context; connection_made in a copy of
    that; data_received in another copy, which it keeps from one call to the next."""
    seen = {}

    class P(RecordingProtocol):
        def __init__(self):
            super().__init__()
            seen["factory"] = VAR.get()
            VAR.set("factory")

        def connection_made(self, transport):
            seen["made"] = VAR.get()
            VAR.set("made")
            super().connection_made(transport)

        def data_received(self, data):
            seen.setdefault("data", []).append(VAR.get())
            VAR.set("data")
            super().data_received(data)

    async def main():
        VAR.set("server")
        server, client, proto = await accept_one(loop, P)
        VAR.set("changed later")
        try:
            client.send(b"one")
            await proto.read_until(3)
            client.send(b"two")
            await proto.read_until(6)
        finally:
            await shut(server, client, proto)
        assert VAR.get() == "changed later"

    run(loop, contextvars.copy_context().run(main))
    assert seen == {"factory": "server", "made": "factory", "data": ["factory", "data"]}


def test_pause_reading_in_connection_made(loop):
    """Data that arrives with the connection waits until reading resumes."""

    class P(RecordingProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            transport.pause_reading()

    async def main():
        server, protos = await serve(loop, P)
        client = socket.create_connection(server.sockets[0].getsockname())
        client.sendall(b"early data")
        try:
            await until(lambda: connected(protos), "the connection")
            proto = protos[0]
            await asyncio.sleep(0.05)
            assert proto.events == ["made"]
            assert not proto.transport.is_reading()
            proto.transport.resume_reading()
            assert await proto.read_until(10) == b"early data"
        finally:
            await shut(server, client, protos[0] if protos else None)

    run(loop, main())


def test_close_in_connection_made(loop):
    class P(RecordingProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            transport.close()

    async def main():
        server, protos = await serve(loop, P)
        client = socket.create_connection(server.sockets[0].getsockname())
        client.sendall(b"ignored")
        try:
            await until(lambda: protos and protos[0].lost.done(), "connection_lost")
            assert protos[0].events == ["made", "lost"]
            client.settimeout(5)
            try:  # closed with unread data: the kernel may send a reset
                assert client.recv(10) == b""
            except ConnectionResetError:
                pass
        finally:
            await shut(server, client)

    run(loop, main())


@pytest.mark.parametrize("debug", [False, True])
def test_protocol_factory_error(loop, loop_name, loop_errors, debug):
    """A failing factory drops the connection; only debug mode reports it. (asyncio
    before 3.12 leaves the socket to the garbage collector; ferroloop closes it at once,
    as later versions do.)"""
    calls = []

    def factory():
        calls.append(1)
        raise ZeroDivisionError("no protocol")

    async def main():
        loop.set_debug(debug)
        server = await loop.create_server(factory, HOST, 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        client.settimeout(5)
        try:
            while not calls:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            if loop_name == "ferroloop":
                try:
                    data = client.recv(10)
                except ConnectionResetError:
                    data = b""
                assert data == b""
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    with warnings.catch_warnings():
        if loop_name == "asyncio":
            warnings.simplefilter("ignore", ResourceWarning)  # its socket left to the GC
        run(loop, main())
        if debug:
            assert len(loop_errors) == 1
            ctx = loop_errors.pop()
            assert ctx["message"] == "Error on transport creation for incoming connection"
            assert isinstance(ctx["exception"], ZeroDivisionError)
            del ctx  # its traceback holds asyncio's socket
        assert loop_errors == []
        gc.collect()


def test_protocol_factory_returns_none(loop, loop_errors):
    """A factory that returns None: the transport cannot be made. Debug mode reports the
    AttributeError without a 'protocol' key (asyncio adds it only when not None)."""

    async def main():
        loop.set_debug(True)
        server = await loop.create_server(lambda: None, HOST, 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        try:
            await until(lambda: loop_errors, "the error report")
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # asyncio <3.12: socket to the GC
        run(loop, main())
        assert len(loop_errors) == 1
        ctx = loop_errors.pop()
        assert ctx["message"] == "Error on transport creation for incoming connection"
        assert isinstance(ctx["exception"], AttributeError)
        assert sorted(ctx) == ["exception", "message"]
        del ctx
        gc.collect()


def test_debug_logs_new_connection(loop, caplog):
    async def main():
        loop.set_debug(True)
        loop.slow_callback_duration = 10
        server, client, proto = await accept_one(loop)
        try:
            assert proto.transport.get_extra_info("peername") == client.getsockname()
        finally:
            await shut(server, client, proto)

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        run(loop, main())
    assert any("got a new connection from" in r.getMessage() for r in caplog.records)


def test_add_reader_on_accepted_descriptor(loop):
    """The transport claims its descriptor until it is closing."""

    async def main():
        server, client, proto = await accept_one(loop)
        tr = proto.transport
        fd = tr.get_extra_info("socket").fileno()
        try:
            with pytest.raises(RuntimeError, match="is used by transport"):
                loop.add_reader(fd, print)
            # A closing transport (data still queued: the peer does not read) no longer
            # claims it.
            tr.set_write_buffer_limits(high=1 << 30)
            while tr.get_write_buffer_size() == 0:
                tr.write(b"x" * 65536)
            tr.close()
            assert tr.is_closing() and not proto.lost.done()
            loop.add_reader(fd, print)
            assert loop.remove_reader(fd)
        finally:
            await shut(server, client, proto)

    run(loop, main())


def test_abort_clients_aborts_closing_transports(loop, loop_name):
    """abort_clients() also reaches a transport still flushing after close()."""
    stdlib_only_from(loop_name, (3, 13), "Server.abort_clients()")

    async def main():
        server, client, proto = await accept_one(loop)
        tr = proto.transport
        try:
            tr.set_write_buffer_limits(high=1 << 30)
            while tr.get_write_buffer_size() == 0:
                tr.write(b"x" * 65536)
            tr.close()
            await asyncio.sleep(0.02)
            assert not proto.lost.done()
            server.close_clients()  # already closing: nothing changes
            await asyncio.sleep(0.02)
            assert not proto.lost.done()
            server.abort_clients()
            assert await asyncio.wait_for(proto.lost, 5) is None
        finally:
            await shut(server, client)

    run(loop, main())


def test_close_clients_of_many_connections(loop, loop_name):
    stdlib_only_from(loop_name, (3, 13), "Server.close_clients()")

    async def main():
        server, protos = await serve(loop)
        other, other_protos = await serve(loop)
        clients = [socket.create_connection(server.sockets[0].getsockname()) for _ in range(20)]
        bystander = socket.create_connection(other.sockets[0].getsockname())
        try:
            await until(lambda: connected(protos, 20), "20 connections")
            await until(lambda: connected(other_protos), "the bystander")
            server.close()
            server.close_clients()
            await asyncio.wait_for(server.wait_closed(), 5)
            assert all(p.lost.done() for p in protos)
            assert not other_protos[0].lost.done()
        finally:
            for c in clients:
                c.close()
            bystander.close()
            other_protos[0].transport.abort()
            await other_protos[0].lost
            other.close()
            await other.wait_closed()

    run(loop, main())


def test_close_clients_after_loop_close_raises(loop_factory, loop_name):
    """Once the loop is closed, the first close_clients() / abort_clients() of a server
    with open connections raises the closed loop's RuntimeError, as closing a transport
    then does; that leaves the transport closing on asyncio, so later calls do nothing.

    DEVIATION: ferroloop's closed loop no longer lists its transports, so the transport
    itself is not marked closing (its own close() still raises once, as asyncio's)."""
    stdlib_only_from(loop_name, (3, 13), "Server.close_clients()")
    loop = loop_factory()
    server, client, proto = loop.run_until_complete(accept_one(loop))
    loop.close()
    try:
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            server.abort_clients()
        server.close_clients()
        server.abort_clients()
    finally:
        client.close()
        server.close()  # works on a closed loop: closes the listening sockets
        with warnings.catch_warnings():
            # The accepted transport cannot be closed any more: collecting it closes its
            # socket, with asyncio's ResourceWarning.
            warnings.simplefilter("ignore", ResourceWarning)
            del proto.transport
            gc.collect()


def test_unclosed_accepted_transport_is_collected(loop, loop_name):
    """A transport nobody holds (not reading, so not even the loop) is collected with a
    ResourceWarning; its server stops counting it, so wait_closed() returns."""
    stdlib_only_from(loop_name, (3, 13), "Server.wait_closed() waiting for clients")

    class Forgetful(asyncio.Protocol):
        def connection_made(self, transport):
            transport.pause_reading()
            made.set_result(None)

    async def main():
        server = await loop.create_server(Forgetful, HOST, 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        try:
            await made
            await asyncio.sleep(0)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                gc.collect()
                gc.collect()
            (message,) = [str(x.message) for x in w if "unclosed transport" in str(x.message)]
            # Its repr in the warning shows it still open (ferroloop's said "closed").
            assert " closed" not in message and "fd=-1" not in message, message
            server.close()
            await asyncio.wait_for(server.wait_closed(), 5)
            client.settimeout(5)
            assert client.recv(10) == b""
        finally:
            client.close()

    made = loop.create_future()
    run(loop, main())


def test_factory_closing_the_server(loop, loop_name, loop_errors):
    """A protocol factory that closes its server while more connections wait in the
    accept queue: accepting stops quietly (no accept() on the closed listener), the
    connection being built is dropped (the closed server refuses it) and the server
    counts no client."""
    calls = []

    async def main():
        def factory():
            calls.append(1)
            server.close()
            return RecordingProtocol()

        server = await loop.create_server(factory, HOST, 0)
        addr = server.sockets[0].getsockname()
        # Three connections complete in the kernel before the loop accepts any.
        clients = [socket.create_connection(addr) for _ in range(3)]
        try:
            for _ in range(100):
                if calls:
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            # asyncio accepts the whole queue before any factory runs (in tasks), so
            # its factory runs for each of them.
            assert len(calls) == (3 if loop_name == "asyncio" else 1)
            assert not server.is_serving()
            await asyncio.wait_for(server.wait_closed(), 5)
            if loop_name == "ferroloop":
                gc.collect()
                assert server._client_count() == 0
        finally:
            for c in clients:
                c.close()

    with warnings.catch_warnings():
        if loop_name == "asyncio":
            warnings.simplefilter("ignore", ResourceWarning)  # its half-made transports
        run(loop, main())
        if loop.get_debug():
            # Debug mode reports each refused connection (asyncio: all three).
            message = "Error on transport creation for incoming connection"
            assert loop_errors
            assert all(c["message"] == message for c in loop_errors)
            loop_errors.clear()
        gc.collect()
