"""TCP: loop.create_connection / create_server / connect_accepted_socket, the socket
transport and its flow control, Server objects, and streams on top of them.

stdlib reference: asyncio/base_events.py (create_*, Server) and asyncio/selector_events.py
(_SelectorSocketTransport). Features newer than the running Python's asyncio are tested
on ferroloop only (skipped on stdlib asyncio, marked ``stdlib_only_from``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import resource
import socket
import ssl
import subprocess
import sys

import pytest
from _net import (
    HOST,
    FullBacklog,
    RecordingProtocol,
    assert_pending,
    listening_socket,
    refused_port,
    run,
    stdlib_only_from,
)

LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close() sends RST


class Conn:
    """A client transport/protocol connected to a server protocol over loopback."""

    server: asyncio.AbstractServer
    client_tr: asyncio.Transport
    client: RecordingProtocol
    server_tr: asyncio.Transport
    server_proto: RecordingProtocol


@contextlib.asynccontextmanager
async def tcp_conn(
    loop, client_factory=RecordingProtocol, server_factory=RecordingProtocol, **server_kwargs
):
    """create_server() + create_connection(); on exit everything is aborted and closed
    and every connection_lost() has run."""
    conn = Conn()
    server_protos = []

    def make_server_proto():
        proto = server_factory()
        server_protos.append(proto)
        return proto

    conn.server = await loop.create_server(make_server_proto, HOST, 0, **server_kwargs)
    transports = []
    try:
        addr = conn.server.sockets[0].getsockname()
        conn.client_tr, conn.client = await loop.create_connection(client_factory, *addr)
        transports.append(conn.client_tr)
        for _ in range(200):
            if server_protos and server_protos[0].transport is not None:
                break
            await asyncio.sleep(0.005)
        conn.server_proto = server_protos[0]
        conn.server_tr = conn.server_proto.transport
        transports.append(conn.server_tr)
        yield conn
    finally:
        protos = [getattr(conn, "client", None), getattr(conn, "server_proto", None)]
        for tr, proto in zip(transports, protos, strict=False):
            # (asyncio: abort() after a close() that flushed its buffer raises.)
            if not proto.lost.done():
                tr.abort()
        conn.server.close()
        await conn.server.wait_closed()
        losts = [p.lost for p in [*server_protos, getattr(conn, "client", None)] if p is not None]
        losts = [f for f in losts if isinstance(f, asyncio.Future)]
        if losts:
            await asyncio.wait(losts, timeout=2)
        await asyncio.sleep(0)


async def server_addr(server):
    return server.sockets[0].getsockname()


def sockopt(transport, level, option) -> int:
    return transport.get_extra_info("socket").getsockopt(level, option)


async def fill_write_buffer(transport, chunk=256 * 1024, limit=64 * 1024 * 1024):
    """Write until data stays in the transport's buffer (the peer does not read)."""
    total = 0
    while transport.get_write_buffer_size() == 0:
        assert total < limit, "the peer keeps absorbing data"
        transport.write(b"\0" * chunk)
        total += chunk
        await asyncio.sleep(0)
    return total


# ---- connection life cycle -------------------------------------------------------------


def test_connection_made_before_create_connection_returns(loop):
    async def main():
        async with tcp_conn(loop) as c:
            assert c.client.events == ["made"]
            assert c.client.transport is c.client_tr
            assert isinstance(c.client_tr, asyncio.Transport)
            assert c.client_tr.get_protocol() is c.client
            assert not c.client_tr.is_closing()
            assert c.client_tr.is_reading()
            assert c.server_proto.events == ["made"]

    run(loop, main())


def test_data_eof_lost_order(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.client_tr.write(b"hello ")
            c.client_tr.write(b"world")
            c.client_tr.write_eof()
            # The server protocol's eof_received() returns None: its transport closes.
            assert await c.server_proto.lost is None
            assert bytes(c.server_proto.data) == b"hello world"
            assert c.server_proto.events == ["made", "data", "eof", "lost"]
            # ... which the client sees as EOF, then (returning None) its own close.
            assert await c.client.lost is None
            assert c.client.events == ["made", "eof", "lost"]

    run(loop, main())


def test_eof_received_true_keeps_half_open(loop):
    async def main():
        async with tcp_conn(loop, server_factory=KeepOpen) as c:
            c.client_tr.write(b"question")
            c.client_tr.write_eof()
            await c.server_proto.eof
            for _ in range(5):
                await asyncio.sleep(0)
            assert not c.server_tr.is_closing()
            assert c.server_proto.events == ["made", "data", "eof"]
            c.server_tr.write(b"answer after eof")
            c.server_tr.close()
            assert await c.client.lost is None
            assert bytes(c.client.data) == b"answer after eof"
            assert c.client.events == ["made", "data", "eof", "lost"]
            assert await c.server_proto.lost is None
            assert c.server_proto.events == ["made", "data", "eof", "lost"]

    run(loop, main())


def test_eof_received_false_closes(loop):
    class ReturnsFalse(RecordingProtocol):
        eof_result = False

    async def main():
        async with tcp_conn(loop, server_factory=ReturnsFalse) as c:
            c.client_tr.write_eof()
            assert await c.server_proto.lost is None
            assert c.server_proto.events == ["made", "eof", "lost"]

    run(loop, main())


def test_server_close_seen_by_client(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.server_tr.write(b"bye")
            c.server_tr.close()
            assert c.server_tr.is_closing()
            assert await c.server_proto.lost is None
            assert await c.client.lost is None
            assert bytes(c.client.data) == b"bye"
            assert c.client.events == ["made", "data", "eof", "lost"]

    run(loop, main())


def test_write_variants(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.client_tr.write(b"bytes,")
            c.client_tr.write(bytearray(b"bytearray,"))
            c.client_tr.write(memoryview(b"memoryview,"))
            c.client_tr.write(b"")
            c.client_tr.writelines([b"a", bytearray(b"b"), memoryview(b"c")])
            c.client_tr.writelines([])
            c.client_tr.write_eof()
            await c.server_proto.eof
            return bytes(c.server_proto.data)

    assert run(loop, main()) == b"bytes,bytearray,memoryview,abc"


def test_write_type_error(loop):
    async def main():
        async with tcp_conn(loop) as c:
            with pytest.raises(TypeError) as info:
                c.client_tr.write("text")
            assert str(info.value) == "data argument must be a bytes-like object, not 'str'"
            with pytest.raises(TypeError) as info:
                c.client_tr.write(12)
            assert str(info.value) == "data argument must be a bytes-like object, not 'int'"

    run(loop, main())


class KeepOpen(RecordingProtocol):
    eof_result = True


def test_write_eof(loop):
    async def main():
        async with tcp_conn(loop, server_factory=KeepOpen) as c:
            assert c.client_tr.can_write_eof() is True
            c.client_tr.write(b"data")
            c.client_tr.write_eof()
            c.client_tr.write_eof()  # idempotent
            assert not c.client_tr.is_closing()
            with pytest.raises(RuntimeError, match=r"^Cannot call write\(\) after write_eof\(\)$"):
                c.client_tr.write(b"more")
            # Writing nothing is also refused after write_eof().
            with pytest.raises(RuntimeError):
                c.client_tr.write(b"")
            # writelines() is write(b"".join(...)) before 3.12, a method of its own after.
            name = "writelines" if sys.version_info >= (3, 12) else "write"
            with pytest.raises(RuntimeError, match=rf"^Cannot call {name}\(\) after write_eof"):
                c.client_tr.writelines([b"more"])
            await c.server_proto.eof
            assert bytes(c.server_proto.data) == b"data"
            # Reading still works after write_eof().
            c.server_tr.write(b"reply")
            assert await c.client.read_until(5) == b"reply"

    run(loop, main())


def test_write_after_close_is_ignored(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.client_tr.close()
            assert c.client_tr.is_closing()
            assert not c.client_tr.is_reading()
            c.client_tr.write(b"ignored")
            c.client_tr.close()  # idempotent
            assert await c.client.lost is None
            c.client_tr.write(b"ignored too")
            assert c.client.events == ["made", "lost"]
            await c.server_proto.lost
            assert bytes(c.server_proto.data) == b""

    run(loop, main())


def test_is_closing_takes_no_arguments(loop):
    # ferroloop answers a plain is_closing() without a method call; anything else must
    # still be the TypeError asyncio's method raises.
    async def main():
        async with tcp_conn(loop) as c:
            assert c.client_tr.is_closing() is False
            with pytest.raises(TypeError):
                c.client_tr.is_closing(True)
            with pytest.raises(TypeError):
                c.client_tr.is_closing(closing=True)
            c.client_tr.close()
            assert c.client_tr.is_closing() is True
            await c.client.lost

    run(loop, main())


def test_connection_lost_called_once(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.client_tr.close()
            c.client_tr.abort()
            c.client_tr.close()
            await c.client.lost
            for _ in range(5):
                await asyncio.sleep(0)
            assert c.client.events.count("lost") == 1

    run(loop, main())


# ---- reading control --------------------------------------------------------------------


def test_pause_resume_reading(loop):
    async def main():
        async with tcp_conn(loop) as c:
            tr = c.server_tr
            assert tr.is_reading()
            tr.pause_reading()
            assert not tr.is_reading()
            tr.pause_reading()  # idempotent
            c.client_tr.write(b"while paused")
            await asyncio.sleep(0.05)
            assert c.server_proto.data == b""
            tr.resume_reading()
            assert tr.is_reading()
            tr.resume_reading()  # idempotent
            assert await c.server_proto.read_until(12) == b"while paused"
            tr.close()
            assert not tr.is_reading()
            tr.resume_reading()  # no effect on a closing transport
            assert not tr.is_reading()

    run(loop, main())


def test_pause_reading_delays_eof(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.server_tr.pause_reading()
            c.client_tr.write(b"x")
            c.client_tr.write_eof()
            await asyncio.sleep(0.05)
            assert c.server_proto.events == ["made"]
            c.server_tr.resume_reading()
            await c.server_proto.lost
            assert c.server_proto.events == ["made", "data", "eof", "lost"]

    run(loop, main())


# ---- write buffer and flow control ------------------------------------------------------


def test_write_buffer_limits(loop):
    async def main():
        async with tcp_conn(loop) as c:
            tr = c.client_tr
            assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
            assert tr.get_write_buffer_size() == 0
            tr.set_write_buffer_limits(high=100)
            assert tr.get_write_buffer_limits() == (25, 100)
            tr.set_write_buffer_limits(low=10)
            assert tr.get_write_buffer_limits() == (10, 40)
            tr.set_write_buffer_limits(high=50, low=20)
            assert tr.get_write_buffer_limits() == (20, 50)
            tr.set_write_buffer_limits(high=0)
            assert tr.get_write_buffer_limits() == (0, 0)
            tr.set_write_buffer_limits()
            assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
            with pytest.raises(ValueError) as info:
                tr.set_write_buffer_limits(high=1, low=2)
            assert str(info.value) == "high (1) must be >= low (2) must be >= 0"
            with pytest.raises(ValueError) as info:
                tr.set_write_buffer_limits(high=-4)
            assert str(info.value) == "high (-4) must be >= low (-1) must be >= 0"
            with pytest.raises(ValueError) as info:  # low is high // 4: floor division
                tr.set_write_buffer_limits(high=-1)
            assert str(info.value) == "high (-1) must be >= low (-1) must be >= 0"
            assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)

    run(loop, main())


def test_pause_resume_writing_with_slow_reader(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.server_tr.pause_reading()
            sock = c.client_tr.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            written = 0
            chunk = b"w" * 16 * 1024
            while "pause_writing" not in c.client.events:
                assert written < 64 * 1024 * 1024
                c.client_tr.write(chunk)
                written += len(chunk)
                if c.client_tr.get_write_buffer_size() == 0:
                    await asyncio.sleep(0)
            # pause_writing() came from write() itself, past the high-water mark.
            _, high = c.client_tr.get_write_buffer_limits()
            assert c.client_tr.get_write_buffer_size() > high
            assert c.client.events == ["made", "pause_writing"]
            c.server_tr.resume_reading()
            await c.server_proto.read_until(written)
            assert c.client.events == ["made", "pause_writing", "resume_writing"]
            assert c.client_tr.get_write_buffer_size() == 0
            assert len(c.server_proto.data) == written

    run(loop, main(), timeout=30)


def test_set_write_buffer_limits_pauses_at_once(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.server_tr.pause_reading()
            c.client_tr.set_write_buffer_limits(high=1 << 40)
            await fill_write_buffer(c.client_tr)
            assert c.client.events == ["made"]
            c.client_tr.set_write_buffer_limits(high=1)
            assert c.client.events == ["made", "pause_writing"]

    run(loop, main(), timeout=30)


def test_close_flushes_before_connection_lost(loop):
    class Client(RecordingProtocol):
        def connection_lost(self, exc):
            self.buffer_at_lost = self.transport.get_write_buffer_size()
            super().connection_lost(exc)

    payload = random.Random(3).randbytes(4 * 1024 * 1024)

    async def main():
        async with tcp_conn(loop, client_factory=Client) as c:
            c.server_tr.pause_reading()
            sock = c.client_tr.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            c.client_tr.write(payload)
            c.client_tr.close()
            assert c.client_tr.is_closing()
            await asyncio.sleep(0.05)
            assert_pending(c.client.lost)
            c.server_tr.resume_reading()
            assert await c.client.lost is None
            assert c.client.buffer_at_lost == 0
            await c.server_proto.lost
            assert bytes(c.server_proto.data) == payload
            assert c.server_proto.events == ["made", "data", "eof", "lost"]

    run(loop, main(), timeout=30)


def test_abort_discards_buffer(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.server_tr.pause_reading()
            written = await fill_write_buffer(c.client_tr)
            assert c.client_tr.get_write_buffer_size() > 0
            c.client_tr.abort()
            assert c.client_tr.is_closing()
            assert c.client_tr.get_write_buffer_size() == 0
            assert await c.client.lost is None
            assert c.client.events[-1] == "lost"
            c.server_tr.resume_reading()
            exc = await c.server_proto.lost
            assert exc is None or isinstance(exc, ConnectionResetError)
            assert len(c.server_proto.data) < written

    run(loop, main(), timeout=30)


# ---- transport details -------------------------------------------------------------------


def test_get_extra_info(loop):
    async def main():
        async with tcp_conn(loop) as c:
            addr = c.server.sockets[0].getsockname()
            tr = c.client_tr
            sock = tr.get_extra_info("socket")
            assert sock.family == socket.AF_INET
            assert sock.type == socket.SOCK_STREAM
            assert sock.fileno() >= 0
            assert tr.get_extra_info("peername") == addr
            assert tr.get_extra_info("sockname") == sock.getsockname()
            assert sock.getpeername() == addr
            assert c.server_tr.get_extra_info("peername") == tr.get_extra_info("sockname")
            assert c.server_tr.get_extra_info("sockname") == addr
            assert tr.get_extra_info("no such key") is None
            assert tr.get_extra_info("no such key", 42) == 42
            assert tr.get_extra_info("peercert") is None
            assert tr.get_extra_info("sslcontext") is None

    run(loop, main())


def test_tcp_nodelay_by_default(loop):
    async def main():
        async with tcp_conn(loop) as c:
            for tr in (c.client_tr, c.server_tr):
                assert sockopt(tr, socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    run(loop, main())


@pytest.mark.parametrize("proto", [0, socket.IPPROTO_TCP])
def test_tcp_nodelay_needs_ipproto_tcp(loop, proto):
    """asyncio sets TCP_NODELAY only on sockets whose ``proto`` is IPPROTO_TCP: a
    socket made with proto=0 (socket.socket()'s default) keeps Nagle on."""

    async def main():
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        client = socket.socket()
        try:
            lst.bind((HOST, 0))
            lst.listen(1)
            client.connect(lst.getsockname())
            conn, _ = lst.accept()
            assert conn.proto == proto
            tr, p = await loop.connect_accepted_socket(RecordingProtocol, conn)
            try:
                return sockopt(tr, socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                await close_and_wait(tr, p)
        finally:
            client.close()
            lst.close()

    nodelay = run(loop, main())
    assert (nodelay != 0) == (proto == socket.IPPROTO_TCP)


def test_set_protocol(loop):
    async def main():
        async with tcp_conn(loop) as c:
            c.client_tr.write(b"first")
            await c.server_proto.read_until(5)
            other = RecordingProtocol()
            c.server_tr.set_protocol(other)
            assert c.server_tr.get_protocol() is other
            c.client_tr.write(b"second")
            assert await other.read_until(6) == b"second"
            assert bytes(c.server_proto.data) == b"first"
            # No connection_made() for the new protocol.
            assert other.events == ["data"]
            c.client_tr.close()
            assert await other.lost is None
            assert not c.server_proto.lost.done()
            c.server_proto.lost.set_result(None)

    run(loop, main())


class Raising(RecordingProtocol):
    where = ""

    def data_received(self, data):
        if self.where == "data_received":
            raise ZeroDivisionError("boom")
        super().data_received(data)

    def eof_received(self):
        if self.where == "eof_received":
            raise ZeroDivisionError("boom")
        return super().eof_received()


@pytest.mark.parametrize("where", ["data_received", "eof_received"])
def test_protocol_callback_raises(loop, loop_errors, where):
    class Proto(Raising):
        pass

    Proto.where = where

    async def main():
        async with tcp_conn(loop, server_factory=Proto) as c:
            c.client_tr.write(b"x")
            c.client_tr.write_eof()
            exc = await c.server_proto.lost
            assert isinstance(exc, ZeroDivisionError)
            return c, exc

    c, exc = run(loop, main())
    assert len(loop_errors) == 1
    context = loop_errors.pop()
    assert context["message"] == f"Fatal error: protocol.{where}() call failed."
    assert context["exception"] is exc
    assert context["transport"] is c.server_tr
    assert context["protocol"] is c.server_proto


class Buffered(asyncio.BufferedProtocol):
    size = 1000

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.events = []
        self.buf = bytearray(self.size)
        self.data = bytearray()
        self.hints = []
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")
        self.made.set_result(None)

    def get_buffer(self, sizehint):
        self.hints.append(sizehint)
        if not self.events or self.events[-1] != "get_buffer":
            self.events.append("get_buffer")
        return self.buf

    def buffer_updated(self, nbytes):
        assert 0 < nbytes <= len(self.buf)
        self.data += self.buf[:nbytes]
        if self.events[-1] != "buffer_updated":
            self.events.append("buffer_updated")

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)


def test_buffered_protocol(loop):
    payload = random.Random(4).randbytes(1024 * 1024)

    async def main():
        async with tcp_conn(loop, server_factory=Buffered) as c:
            c.client_tr.write(payload)
            c.client_tr.write_eof()
            assert await c.server_proto.lost is None
            return c.server_proto

    proto = run(loop, main())
    assert bytes(proto.data) == payload
    assert proto.events[0] == "made"
    assert proto.events[-2:] == ["eof", "lost"]
    assert set(proto.events[1:-2]) == {"get_buffer", "buffer_updated"}
    assert all(type(h) is int for h in proto.hints)


def test_buffered_protocol_empty_buffer(loop, loop_errors):
    class Empty(Buffered):
        size = 0

    async def main():
        async with tcp_conn(loop, server_factory=Empty) as c:
            c.client_tr.write(b"data")
            exc = await c.server_proto.lost
            return c, exc

    c, exc = run(loop, main())
    assert isinstance(exc, RuntimeError)
    assert str(exc) == "get_buffer() returned an empty buffer"
    assert len(loop_errors) == 1
    context = loop_errors.pop()
    assert context["message"] == "Fatal error: protocol.get_buffer() call failed."
    assert context["exception"] is exc
    assert context["protocol"] is c.server_proto


@pytest.mark.parametrize(
    "unusable", [b"read-only", "text", memoryview(bytearray(10))[::2]], ids=repr
)
def test_buffered_protocol_unusable_buffer(loop, loop_errors, unusable):
    """A buffer recv_into() cannot fill: asyncio's recv_into() raises TypeError, a read
    error that loses the connection."""

    class Unusable(Buffered):
        def get_buffer(self, sizehint):
            return unusable

    async def main():
        async with tcp_conn(loop, server_factory=Unusable) as c:
            c.client_tr.write(b"data")
            return await c.server_proto.lost

    exc = run(loop, main())
    assert isinstance(exc, TypeError)
    assert str(exc).startswith("recv_into() argument 1 must be read-write bytes-like object")
    assert [c["message"] for c in loop_errors] == ["Fatal read error on socket transport"]
    loop_errors.clear()


def test_peer_reset(loop, loop_errors):
    """An RST from the peer: connection_lost(ConnectionResetError); OSErrors are not
    reported to the exception handler."""

    async def main():
        lst = listening_socket()
        try:
            tr, proto = await loop.create_connection(RecordingProtocol, *lst.getsockname())
            try:
                peer, _ = await loop.sock_accept(lst)
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                peer.close()
                exc = await proto.lost
            finally:
                tr.close()
        finally:
            lst.close()
        return proto, exc

    proto, exc = run(loop, main())
    assert isinstance(exc, ConnectionResetError)
    assert proto.events == ["made", "lost"]
    assert loop_errors == []


# ---- create_connection --------------------------------------------------------------------


def test_create_connection_refused(loop):
    port = refused_port()
    made = []
    with pytest.raises(ConnectionRefusedError) as info:
        run(loop, loop.create_connection(lambda: made.append(1), HOST, port))
    assert info.value.errno == errno.ECONNREFUSED
    assert str(info.value) == f"[Errno {errno.ECONNREFUSED}] Connect call failed ('{HOST}', {port})"
    assert made == []


def test_create_connection_unresolvable(loop):
    with pytest.raises(socket.gaierror):
        run(loop, loop.create_connection(asyncio.Protocol, "ferroloop-test.invalid", 80))


def test_create_connection_localhost(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(
                RecordingProtocol, "localhost", port, family=socket.AF_INET
            )
            try:
                return port, tr.get_extra_info("peername")
            finally:
                await close_and_wait(tr, proto)

    port, peer = run(loop, main())
    assert peer == (HOST, port)


async def close_and_wait(tr, proto):
    tr.close()
    await proto.lost


def test_create_connection_port_as_str(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(RecordingProtocol, HOST, str(port))
            try:
                return port, tr.get_extra_info("peername")
            finally:
                await close_and_wait(tr, proto)

    port, peer = run(loop, main())
    assert peer == (HOST, port)


def test_create_connection_ipv6(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, "::1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(RecordingProtocol, "::1", port)
            try:
                assert tr.get_extra_info("socket").family == socket.AF_INET6
                return port, tr.get_extra_info("peername")
            finally:
                await close_and_wait(tr, proto)

    port, peer = run(loop, main())
    assert peer[:2] == ("::1", port)


def test_create_connection_local_addr(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with server:
            addr = server.sockets[0].getsockname()
            tr, proto = await loop.create_connection(RecordingProtocol, *addr, local_addr=(HOST, 0))
            try:
                return tr.get_extra_info("sockname")
            finally:
                await close_and_wait(tr, proto)

    sockname = run(loop, main())
    assert sockname[0] == HOST
    assert sockname[1] != 0


def test_create_connection_local_addr_in_use(loop):
    async def main():
        lst = listening_socket()
        try:
            addr = lst.getsockname()
            with pytest.raises(OSError) as info:
                await loop.create_connection(asyncio.Protocol, *addr, local_addr=addr)
            return addr, info.value
        finally:
            lst.close()

    addr, exc = run(loop, main())
    assert exc.errno == errno.EADDRINUSE
    # Python 3.13 words the reason as str(err), with the errno.
    reason = (
        "[errno 98] address already in use"
        if sys.version_info >= (3, 13)
        else ("address already in use")
    )
    assert exc.strerror == f"error while attempting to bind on address {addr!r}: {reason}"


def test_create_connection_sock(loop):
    async def main():
        lst = listening_socket()
        sock = socket.socket()
        try:
            sock.connect(lst.getsockname())
            tr, proto = await loop.create_connection(RecordingProtocol, sock=sock)
            try:
                # The transport owns the socket, now non-blocking.
                assert sock.gettimeout() == 0.0
                assert tr.get_extra_info("socket").fileno() == sock.fileno()
                assert tr.get_extra_info("peername") == lst.getsockname()
            finally:
                await close_and_wait(tr, proto)
        finally:
            sock.close()
            lst.close()
        return sock

    sock = run(loop, main())
    assert sock.fileno() == -1  # closed with the transport


def test_happy_eyeballs_arguments_accepted(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(
                RecordingProtocol, HOST, port, happy_eyeballs_delay=0.25, interleave=1
            )
            await close_and_wait(tr, proto)
            tr, proto = await loop.create_connection(
                RecordingProtocol, "localhost", port, happy_eyeballs_delay=0.1
            )
            await close_and_wait(tr, proto)

    run(loop, main())


def test_happy_eyeballs_refused(loop):
    port = refused_port()
    with pytest.raises(ConnectionRefusedError):
        run(
            loop,
            loop.create_connection(asyncio.Protocol, HOST, port, happy_eyeballs_delay=0.05),
        )


def test_create_connection_all_errors(loop, loop_name):
    """all_errors=True (asyncio 3.12+): the failure is an ExceptionGroup of every
    attempt's error, even for a single address."""
    stdlib_only_from(loop_name, (3, 12), "create_connection(all_errors=)")
    port = refused_port()
    if sys.version_info < (3, 11):
        # No ExceptionGroup on 3.10: what all_errors=False raises, raised as it is.
        with pytest.raises(ConnectionRefusedError):
            run(loop, loop.create_connection(asyncio.Protocol, HOST, port, all_errors=True))
        return
    with pytest.raises(BaseExceptionGroup) as info:  # noqa: F821 (3.11+)
        run(loop, loop.create_connection(asyncio.Protocol, HOST, port, all_errors=True))
    group = info.value
    assert type(group) is ExceptionGroup  # noqa: F821
    assert group.message == "create_connection failed"
    assert [type(e) for e in group.exceptions] == [ConnectionRefusedError]


def test_create_connection_ssl_socket_rejected(loop):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sock = ctx.wrap_socket(socket.socket(), server_hostname="x", do_handshake_on_connect=False)
    try:
        with pytest.raises(TypeError, match=r"^Socket cannot be of type SSLSocket$"):
            run(loop, loop.create_connection(asyncio.Protocol, sock=sock))
        with pytest.raises(TypeError, match=r"^Socket cannot be of type SSLSocket$"):
            run(loop, loop.create_server(asyncio.Protocol, sock=sock))
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"host": HOST, "port": 1, "server_hostname": "x"},
            "server_hostname is only meaningful with ssl",
        ),
        (
            {"host": HOST, "port": 1, "ssl_handshake_timeout": 1},
            "ssl_handshake_timeout is only meaningful with ssl",
        ),
        (
            {"host": HOST, "port": 1, "ssl_shutdown_timeout": 1},
            "ssl_shutdown_timeout is only meaningful with ssl",
        ),
        ({"port": 1, "ssl": True}, "You must set server_hostname when using ssl without a host"),
        ({}, "host and port was not specified and no sock specified"),
    ],
)
def test_create_connection_argument_errors(loop, kwargs, message):
    with pytest.raises(ValueError) as info:
        run(loop, loop.create_connection(asyncio.Protocol, **kwargs))
    assert str(info.value) == message


def test_create_connection_host_and_sock(loop):
    with socket.socket() as sock:
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_connection(asyncio.Protocol, HOST, 1, sock=sock))
        assert str(info.value) == "host/port and sock can not be specified at the same time"


def test_create_connection_datagram_sock(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_connection(asyncio.Protocol, sock=sock))
        assert str(info.value) == f"A Stream Socket was expected, got {sock!r}"


def test_create_connection_timeout_cancels(loop):
    """A connect that cannot complete, cancelled by a timeout: the protocol factory is
    never called."""
    made = []
    with FullBacklog() as target:

        async def main():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    loop.create_connection(lambda: made.append(1), *target.address), 0.1
                )

        run(loop, main())
    assert made == []


# ---- connect_accepted_socket ----------------------------------------------------------------


def test_connect_accepted_socket(loop):
    async def main():
        lst = listening_socket()
        client = socket.socket()
        try:
            client.setblocking(False)
            await loop.sock_connect(client, lst.getsockname())
            conn, _ = await loop.sock_accept(lst)
            tr, proto = await loop.connect_accepted_socket(RecordingProtocol, conn)
            try:
                assert proto.events == ["made"]
                assert tr.get_extra_info("peername") == client.getsockname()
                await loop.sock_sendall(client, b"to accepted")
                assert await proto.read_until(11) == b"to accepted"
                tr.write(b"from accepted")
                assert await loop.sock_recv(client, 100) == b"from accepted"
            finally:
                await close_and_wait(tr, proto)
        finally:
            client.close()
            lst.close()

    run(loop, main())


def test_connect_accepted_socket_datagram(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError) as info:
            run(loop, loop.connect_accepted_socket(asyncio.Protocol, sock))
        assert str(info.value) == f"A Stream Socket was expected, got {sock!r}"


# ---- create_server ----------------------------------------------------------------------------


def test_create_server_basic(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        try:
            assert server.get_loop() is loop
            assert server.is_serving()
            socks = server.sockets
            assert type(socks) is tuple
            assert len(socks) == 1
            sock = socks[0]
            assert sock.family == socket.AF_INET
            assert sock.type == socket.SOCK_STREAM
            assert sock.getsockname()[0] == HOST
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
            assert repr(server).startswith("<Server sockets=(")
        finally:
            server.close()
            await server.wait_closed()
        assert not server.is_serving()
        assert server.sockets == ()

    run(loop, main())


def test_create_server_host_list(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, [HOST, "::1"], 0)
        async with server:
            families = sorted(s.family for s in server.sockets)
            # Every socket accepts connections.
            for s in server.sockets:
                tr, proto = await loop.create_connection(RecordingProtocol, *s.getsockname()[:2])
                await close_and_wait(tr, proto)
            return families

    assert run(loop, main()) == [socket.AF_INET, socket.AF_INET6]


def test_create_server_duplicate_hosts_bound_once(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, [HOST, HOST], 0)
        async with server:
            return len(server.sockets)

    assert run(loop, main()) == 1


@pytest.mark.parametrize("host", [None, ""])
def test_create_server_all_interfaces(loop, host):
    async def main():
        server = await loop.create_server(asyncio.Protocol, host, 0)
        async with server:
            names = {s.family: s.getsockname() for s in server.sockets}
            v6 = [s for s in server.sockets if s.family == socket.AF_INET6]
            # asyncio disables dual-stack on the IPv6 socket.
            v6only = [s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) for s in v6]
            return names, v6only

    expected = {info[0] for info in socket.getaddrinfo(None, 0, flags=socket.AI_PASSIVE)}
    names, v6only = run(loop, main())
    assert set(names) == expected
    if socket.AF_INET in names:
        assert names[socket.AF_INET][0] == "0.0.0.0"
    if socket.AF_INET6 in names:
        assert names[socket.AF_INET6][0] == "::"
        assert all(v6only)


def test_create_server_reuse_port(loop):
    async def main():
        first = await loop.create_server(asyncio.Protocol, HOST, 0, reuse_port=True)
        async with first:
            sock = first.sockets[0]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0
            port = sock.getsockname()[1]
            second = await loop.create_server(asyncio.Protocol, HOST, port, reuse_port=True)
            async with second:
                assert second.sockets[0].getsockname() == (HOST, port)

    run(loop, main())


def test_create_server_address_in_use(loop):
    async def main():
        first = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with first:
            port = first.sockets[0].getsockname()[1]
            assert first.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
            with pytest.raises(OSError) as info:
                await loop.create_server(asyncio.Protocol, HOST, port)
            return port, info.value

    port, exc = run(loop, main())
    assert type(exc) is OSError
    assert exc.errno == errno.EADDRINUSE
    if sys.version_info >= (3, 13):
        reason = f"[errno {errno.EADDRINUSE}] address already in use"
    else:
        reason = "address already in use"
    assert exc.strerror == f"error while attempting to bind on address ('{HOST}', {port}): {reason}"


def test_create_server_address_not_available(loop):
    """An address the host does not have (TEST-NET-1): from Python 3.13 asyncio skips it
    (assuming its family is disabled) and binds the others; before, it fails the server.
    ferroloop skipped it on every Python."""
    missing = "192.0.2.55"

    async def main():
        try:
            server = await loop.create_server(asyncio.Protocol, [HOST, missing], 0)
        except OSError as exc:
            return exc
        async with server:
            return [s.getsockname()[0] for s in server.sockets]

    got = run(loop, main())
    if sys.version_info >= (3, 13):
        assert got == [HOST]
    else:
        assert type(got) is OSError and got.errno == errno.EADDRNOTAVAIL
        assert got.strerror == (
            f"error while attempting to bind on address ('{missing}', 0): "
            "cannot assign requested address"
        )


def test_create_server_keep_alive(loop, loop_name):
    """keep_alive=True (asyncio 3.13+) sets SO_KEEPALIVE on the listening socket."""
    stdlib_only_from(loop_name, (3, 13), "create_server(keep_alive=)")

    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0, keep_alive=True)
        async with server:
            return server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)

    assert run(loop, main()) != 0


def test_create_server_start_serving_false(loop):
    async def main():
        server = await loop.create_server(RecordingProtocol, HOST, 0, start_serving=False)
        async with server:
            assert not server.is_serving()
            addr = server.sockets[0].getsockname()
            # Not listening yet: asyncio calls listen() when serving starts.
            with pytest.raises(ConnectionRefusedError):
                await loop.create_connection(asyncio.Protocol, *addr)
            await server.start_serving()
            assert server.is_serving()
            await server.start_serving()  # idempotent
            tr, proto = await loop.create_connection(RecordingProtocol, *addr)
            await close_and_wait(tr, proto)

    run(loop, main())


def test_create_server_sock(loop):
    async def main():
        lst = listening_socket()
        try:
            server = await loop.create_server(RecordingProtocol, sock=lst)
        except BaseException:
            lst.close()
            raise
        async with server:
            assert server.sockets[0].fileno() == lst.fileno()
            tr, proto = await loop.create_connection(RecordingProtocol, *lst.getsockname())
            await close_and_wait(tr, proto)
        return lst

    lst = run(loop, main())
    assert lst.fileno() == -1  # closed with the server


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"host": HOST, "port": 0, "ssl": True},
            TypeError,
            "ssl argument must be an SSLContext or None",
        ),
        (
            {"host": HOST, "port": 0, "ssl_handshake_timeout": 1},
            ValueError,
            "ssl_handshake_timeout is only meaningful with ssl",
        ),
        (
            {"host": HOST, "port": 0, "ssl_shutdown_timeout": 1},
            ValueError,
            "ssl_shutdown_timeout is only meaningful with ssl",
        ),
        ({}, ValueError, "Neither host/port nor sock were specified"),
    ],
)
def test_create_server_argument_errors(loop, kwargs, exc, message):
    with pytest.raises(exc) as info:
        run(loop, loop.create_server(asyncio.Protocol, **kwargs))
    assert str(info.value) == message


def test_create_server_datagram_sock(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_server(asyncio.Protocol, sock=sock))
        assert str(info.value) == f"A Stream Socket was expected, got {sock!r}"


def test_create_server_host_and_sock(loop):
    with socket.socket() as sock:
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_server(asyncio.Protocol, HOST, 0, sock=sock))
        assert str(info.value) == "host/port and sock can not be specified at the same time"


# ---- Server -----------------------------------------------------------------------------------


def test_server_close_keeps_connections(loop):
    async def main():
        async with tcp_conn(loop) as c:
            addr = c.server.sockets[0].getsockname()
            c.server.close()
            assert not c.server.is_serving()
            assert c.server.sockets == ()
            c.server.close()  # idempotent
            with pytest.raises(ConnectionRefusedError):
                await loop.create_connection(asyncio.Protocol, *addr)
            # The accepted connection lives on.
            c.client_tr.write(b"still here")
            assert await c.server_proto.read_until(10) == b"still here"

    run(loop, main())


def test_server_wait_closed_with_active_connection(loop):
    """asyncio < 3.12.1: wait_closed() returns at once once the server is closed, even
    with live connections; from 3.12.1 it also waits for them to be dropped."""

    async def main():
        async with tcp_conn(loop) as c:
            c.server.close()
            waiter = asyncio.ensure_future(c.server.wait_closed())
            for _ in range(5):
                await asyncio.sleep(0)
            if sys.version_info >= (3, 12, 1):
                assert not waiter.done()
                c.client_tr.close()
                await c.server_proto.lost
                await asyncio.wait_for(waiter, 2)
            else:
                assert waiter.done()
                await waiter

    run(loop, main())


def test_serve_forever_cancelled(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0, start_serving=False)
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        assert server.is_serving()
        with pytest.raises(RuntimeError) as info:
            await server.serve_forever()
        assert str(info.value) == f"server {server!r} is already being awaited on serve_forever()"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        assert server.sockets == ()
        with pytest.raises(RuntimeError) as info:
            await server.serve_forever()
        assert str(info.value) == f"server {server!r} is closed"

    run(loop, main())


def test_serve_forever_ended_by_close(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        server.close()
        # close() cancels the serve_forever() future.
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop, main())


def test_server_async_with(loop):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with server as entered:
            assert entered is server
            assert server.is_serving()
        assert not server.is_serving()
        assert server.sockets == ()

    run(loop, main())


def test_server_close_clients(loop, loop_name):
    """Server.close_clients() (asyncio 3.13+) closes every accepted transport."""
    stdlib_only_from(loop_name, (3, 13), "Server.close_clients()")

    async def main():
        async with tcp_conn(loop) as c:
            c.server.close_clients()
            assert await c.server_proto.lost is None
            assert await c.client.lost is None
            assert c.client.events == ["made", "eof", "lost"]

    run(loop, main())


def test_server_abort_clients(loop, loop_name):
    """Server.abort_clients() (asyncio 3.13+) aborts every accepted transport."""
    stdlib_only_from(loop_name, (3, 13), "Server.abort_clients()")

    async def main():
        async with tcp_conn(loop) as c:
            c.server_tr.pause_reading()
            c.client_tr.write(b"x")  # unread data: the abort resets the connection
            await asyncio.sleep(0.01)
            c.server.abort_clients()
            assert await c.server_proto.lost is None
            exc = await c.client.lost
            assert exc is None or isinstance(exc, ConnectionResetError)

    run(loop, main())


# ---- streams ------------------------------------------------------------------------------------


def test_streams_echo(loop):
    async def handle(reader, writer):
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, HOST, 0)
        async with server:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            try:
                writer.write(b"hello\n")
                writer.writelines([b"wor", b"ld\n"])
                await writer.drain()
                assert await reader.readline() == b"HELLO\n"
                assert await reader.readexactly(6) == b"WORLD\n"
                writer.write_eof()
                assert await reader.read() == b""
                assert reader.at_eof()
            finally:
                writer.close()
                await writer.wait_closed()

    run(loop, main())


def test_stress_many_connections(loop):
    """200 concurrent connections, each echoing a random-sized payload back through an
    echo server; every byte is checked."""
    rng = random.Random(5)
    payloads = [rng.randbytes(rng.randint(1, 128 * 1024)) for _ in range(200)]

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    async def client(addr, payload):
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(payload)
            writer.write_eof()
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async def main():
        server = await loop.create_server(Echo, HOST, 0, backlog=1000)
        async with server:
            addr = server.sockets[0].getsockname()
            return await asyncio.gather(*(client(addr, p) for p in payloads))

    results = run(loop, main(), timeout=30)
    assert len(results) == len(payloads)
    for got, want in zip(results, payloads, strict=True):
        assert got == want


@pytest.fixture
def many_fds():
    """Raise the soft RLIMIT_NOFILE so that 1,000 connections (2,000+ descriptors) fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stress_1000_connections(loop, many_fds):
    """1,000 concurrent connections through a Protocol echo server, each writing a random
    number of random-sized chunks and reading everything back; every byte is checked."""
    rng = random.Random(1000)
    plans = [
        [rng.randbytes(rng.randint(1, 16 * 1024)) for _ in range(rng.randint(1, 4))]
        for _ in range(1000)
    ]

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

        # eof_received() returns None: the transport closes once the echo is flushed.

    async def client(addr, chunks):
        reader, writer = await asyncio.open_connection(*addr)
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async def main():
        server = await loop.create_server(Echo, HOST, 0, backlog=1000)
        async with server:
            addr = server.sockets[0].getsockname()
            return await asyncio.gather(*(client(addr, c) for c in plans))

    results = run(loop, main(), timeout=60)
    for got, chunks in zip(results, plans, strict=True):
        assert got == b"".join(chunks)


def test_accept_survives_emfile(loop, loop_errors):
    """Running out of descriptors during accept() is reported ('socket.accept() out of
    system resource'), accepting pauses, and the pending connection is served once
    descriptors are free again."""
    made = []

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            made.append(transport)
            transport.write(b"hi")
            transport.close()

    async def main():
        server = await loop.create_server(Server, HOST, 0)
        async with server:
            addr = server.sockets[0].getsockname()
            client = socket.socket()
            client.settimeout(5)
            hog = []
            try:
                # Exhaust the descriptor table, then connect: the kernel completes the
                # handshake, and the loop's accept() fails with EMFILE.
                with contextlib.suppress(OSError):
                    while True:
                        hog.append(os.open(os.devnull, os.O_RDONLY))
                client.connect(addr)
                deadline = loop.time() + 5
                while not loop_errors and loop.time() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                for fd in hog:
                    os.close(fd)
            # asyncio reports each failed accept() of the batch (up to backlog of them).
            assert loop_errors
            assert {c["message"] for c in loop_errors} == {"socket.accept() out of system resource"}
            assert {c["exception"].errno for c in loop_errors} == {errno.EMFILE}
            loop_errors.clear()
            assert made == []
            # Accepting resumes after asyncio's ACCEPT_RETRY_DELAY (1 s).
            data = await loop.run_in_executor(None, client.recv, 10)
            client.close()
            return data

    assert run(loop, main()) == b"hi"
    assert len(made) == 1


class ChunkKeeper(RecordingProtocol):
    """Keeps every other data_received() object as it came (all of them with
    ``keep_all``) with a copy taken on arrival, and checks each one's hash then (the
    transport may reuse the storage of data nobody kept)."""

    keep_all = True

    def __init__(self, loop=None):
        super().__init__(loop)
        self.kept: list = []
        self.bad_hash = 0
        self.calls = 0

    def data_received(self, data):
        copy = bytes(bytearray(data))
        if hash(data) != hash(copy):
            self.bad_hash += 1
        if self.keep_all or self.calls % 2 == 0:
            self.kept.append((data, copy))
        self.calls += 1
        super().data_received(data)


class HalfKeeper(ChunkKeeper):
    keep_all = False


@pytest.mark.parametrize("keeper", [ChunkKeeper, HalfKeeper], ids=["keep-all", "keep-half"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("profile", ["mixed", "small"])
def test_large_and_small_reads_keep_every_byte(loop, family, keeper, profile, tmp_path):
    # Large writes make the transport read straight into bytes objects (ferroloop), and
    # reuse one nobody kept; the sizes vary above and below that path's thresholds.
    # Small reads (each write apart from the next, so each is a read of its own) are
    # copied into the last small one nobody kept, when it fits. Every byte must arrive in
    # order, and every chunk the protocol kept must still hold what it held when it
    # arrived.
    rng = random.Random(7)
    if profile == "mixed":
        sizes = [rng.choice([1, 900, 20_000, 70_000, 130_000, 300_000]) for _ in range(40)]
        pause = 0.3
    else:
        sizes = [rng.choice([1, 2, 500, 1000, 1024, 1100, 2000, 4000]) for _ in range(60)]
        pause = 1.0
    payload = rng.randbytes(sum(sizes))

    async def main():
        protos = []

        def factory():
            p = keeper()
            protos.append(p)
            return p

        if family == "tcp":
            server = await loop.create_server(factory, HOST, 0)
            host, port = server.sockets[0].getsockname()[:2]
            tr, _ = await loop.create_connection(asyncio.Protocol, host, port)
        else:
            path = str(tmp_path / "s")
            server = await loop.create_unix_server(factory, path)
            tr, _ = await loop.create_unix_connection(asyncio.Protocol, path)
        try:
            off = 0
            for n in sizes:
                tr.write(payload[off : off + n])
                off += n
                if rng.random() < pause:
                    await asyncio.sleep(0.002)
            tr.write_eof()
            while not protos:
                await asyncio.sleep(0.001)
            await asyncio.wait_for(protos[0].eof, 10)
            return protos[0]
        finally:
            tr.close()
            server.close()
            await server.wait_closed()

    proto = run(loop, main())
    assert bytes(proto.data) == payload
    assert proto.bad_hash == 0
    assert proto.kept and all(type(c) is bytes and c for c, _ in proto.kept)
    assert [c for c, _ in proto.kept] == [copy for _, copy in proto.kept]


OOM_READ_SCRIPT = r"""
import asyncio, socket, sys, threading, _testcapi
import ferroloop

loop = ferroloop.new_event_loop() if sys.argv[1] == "ferroloop" else asyncio.new_event_loop()
k = int(sys.argv[2])
a, b = socket.socketpair()
a.setblocking(False)


def feed():
    # 20 MiB in large writes, so the reader's reads are large (ferroloop then reads
    # straight into bytes objects); stops when the reader goes away.
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(20):
            b.sendall(chunk)
    except OSError:
        pass
    b.close()


class P(asyncio.Protocol):
    def __init__(self):
        self.reads = 0
        self.kept = []
        self.done = loop.create_future()

    def data_received(self, data):
        self.kept.append(data)
        self.reads += 1
        if self.reads == 5:
            _testcapi.set_nomemory(k, k + 1)  # the k-th allocation from here fails

    def connection_lost(self, exc):
        _testcapi.remove_mem_hooks()
        if not self.done.done():
            self.done.set_result(exc)


async def main():
    t, p = await loop.create_connection(P, sock=a)
    threading.Thread(target=feed, daemon=True).start()
    try:
        return await asyncio.wait_for(p.done, 20)
    finally:
        _testcapi.remove_mem_hooks()
        t.close()


loop.set_exception_handler(lambda loop, ctx: None)
exc = loop.run_until_complete(main())
print("lost:", type(exc).__name__)
"""


@pytest.mark.parametrize("k", [0, 1, 4])
def test_out_of_memory_during_large_reads_is_an_error_not_a_crash(loop_name, k):
    # An allocation failing while the transport reads becomes the transport's fatal
    # error (connection_lost(MemoryError)), or a MemoryError out of run_until_complete
    # when it hits the loop's own code (stdlib asyncio's Python), never a crash.
    pytest.importorskip("_testcapi")
    proc = subprocess.run(
        [sys.executable, "-c", OOM_READ_SCRIPT, loop_name, str(k)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    if proc.returncode:
        assert proc.stderr.rstrip().endswith("MemoryError"), proc.stderr[-2000:]
    else:
        assert "lost:" in proc.stdout
