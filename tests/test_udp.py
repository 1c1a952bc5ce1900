"""Datagram endpoints: loop.create_datagram_endpoint and the datagram transport
(asyncio/base_events.py, asyncio/selector_events.py _SelectorDatagramTransport)."""

from __future__ import annotations

import asyncio
import inspect
import socket
import sys
import uuid

import pytest
from _net import HOST, PY313, run

TUPLE_ERROR = AssertionError if sys.version_info < (3, 11) else TypeError


class DatagramRecorder(asyncio.DatagramProtocol):
    def __init__(self):
        loop = asyncio.get_running_loop()
        self.events: list = []
        self.datagrams: list = []
        self.errors: list = []
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.received = asyncio.Event()

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        self.made.set_result(None)

    def datagram_received(self, data, addr):
        assert type(data) is bytes
        if not self.events or self.events[-1] != "datagram":
            self.events.append("datagram")
        self.datagrams.append((data, addr))
        self.received.set()

    def error_received(self, exc):
        self.events.append("error")
        self.errors.append(exc)
        self.received.set()

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)

    async def wait_for(self, n: int):
        while len(self.datagrams) < n:
            self.received.clear()
            await self.received.wait()
        return self.datagrams


async def close(*pairs):
    for tr, _ in pairs:
        tr.close()
    for _, proto in pairs:
        assert await proto.lost is None


def dead_udp_port(family=socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((HOST if family == socket.AF_INET else "::1", 0))
        return s.getsockname()[1]


def test_local_addr_and_sendto(loop):
    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        b = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        try:
            (tra, pa), (trb, pb) = a, b
            assert pa.events == ["made"]
            addr_a = tra.get_extra_info("sockname")
            addr_b = trb.get_extra_info("sockname")
            assert addr_a[0] == HOST
            assert tra.get_extra_info("peername") is None
            assert tra.get_extra_info("socket").type == socket.SOCK_DGRAM
            tra.sendto(b"one", addr_b)
            tra.sendto(bytearray(b"two"), addr_b)
            tra.sendto(memoryview(b"three"), addr_b)
            assert tra.get_write_buffer_size() == 0
            assert await pb.wait_for(3) == [(b"one", addr_a), (b"two", addr_a), (b"three", addr_a)]
            trb.sendto(b"reply", addr_a)
            assert await pa.wait_for(1) == [(b"reply", addr_b)]
        finally:
            await close(a, b)
        assert pa.events == ["made", "datagram", "lost"]

    run(loop, main())


def test_remote_addr_connected(loop):
    async def main():
        server = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        srv_addr = server[0].get_extra_info("sockname")
        client = await loop.create_datagram_endpoint(DatagramRecorder, remote_addr=srv_addr)
        try:
            tr, proto = client
            assert tr.get_extra_info("peername") == srv_addr
            tr.sendto(b"no address")
            tr.sendto(b"same address", srv_addr)
            got = await server[1].wait_for(2)
            assert [d for d, _ in got] == [b"no address", b"same address"]
            client_addr = tr.get_extra_info("sockname")
            assert got[0][1] == client_addr
            with pytest.raises(ValueError) as info:
                tr.sendto(b"elsewhere", (HOST, 9))
            assert str(info.value) == f"Invalid address: must be None or {srv_addr}"
            # Replies from the peer arrive.
            server[0].sendto(b"back", client_addr)
            assert await proto.wait_for(1) == [(b"back", srv_addr)]
        finally:
            await close(client, server)

    run(loop, main())


def test_connected_endpoint_refused_goes_to_error_received(loop):
    """ICMP port unreachable on a connected UDP socket: error_received(), the
    transport stays open."""

    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            DatagramRecorder, remote_addr=(HOST, dead_udp_port())
        )
        try:
            for _ in range(50):
                tr.sendto(b"anyone?")
                await asyncio.sleep(0.01)
                if proto.errors:
                    break
            assert proto.errors
            assert all(isinstance(e, ConnectionRefusedError) for e in proto.errors)
            assert not tr.is_closing()
            assert not proto.lost.done()
        finally:
            await close((tr, proto))

    run(loop, main())


def test_family_only_endpoint(loop):
    async def main():
        tr, proto = await loop.create_datagram_endpoint(DatagramRecorder, family=socket.AF_INET)
        try:
            assert tr.get_extra_info("sockname") == ("0.0.0.0", 0)
            assert tr.get_extra_info("peername") is None
        finally:
            await close((tr, proto))

    run(loop, main())


def test_ipv6_endpoint(loop):
    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=("::1", 0))
        b = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=("::1", 0))
        try:
            addr_b = b[0].get_extra_info("sockname")
            a[0].sendto(b"v6", addr_b)
            got = await b[1].wait_for(1)
            assert got[0][0] == b"v6"
            assert got[0][1][:2] == a[0].get_extra_info("sockname")[:2]
        finally:
            await close(a, b)

    run(loop, main())


def test_sendto_address_forms(loop, loop_errors):
    """Every address form socket.sendto takes reaches the peer: numeric tuples (sent
    natively by ferroloop), a host name, IPv6 tuples of 2 and 4 items; a bad port is
    refused as socket.sendto refuses it."""

    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        b = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        c = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=("::1", 0))
        d = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=("::1", 0))
        try:
            port_b = b[0].get_extra_info("sockname")[1]
            port_d = d[0].get_extra_info("sockname")[1]
            a[0].sendto(b"numeric", (HOST, port_b))
            a[0].sendto(b"name", ("localhost", port_b))
            c[0].sendto(b"v6-2", ("::1", port_d))
            c[0].sendto(b"v6-4", ("::1", port_d, 0, 0))
            got_b = await b[1].wait_for(2)
            assert sorted(dg for dg, _ in got_b) == [b"name", b"numeric"]
            got_d = await d[1].wait_for(2)
            assert sorted(dg for dg, _ in got_d) == [b"v6-2", b"v6-4"]
            sender = c[0].get_extra_info("sockname")
            assert {addr for _, addr in got_d} == {sender}
            # The address a datagram came with answers it (the echo pattern), twice.
            _, back = got_b[0]
            b[0].sendto(b"echo-1", back)
            b[0].sendto(b"echo-2", back)
            assert [dg for dg, _ in await a[1].wait_for(2)] == [b"echo-1", b"echo-2"]
            a[0].sendto(b"bad port", (HOST, 70000))
            assert type(await a[1].lost) is OverflowError
        finally:
            for tr, _ in (a, b, c, d):
                tr.close()
            await asyncio.sleep(0)

    run(loop, main())
    assert [type(c["exception"]) for c in loop_errors] == [OverflowError]
    loop_errors.clear()


def test_reply_address_is_the_kernel_form_not_the_senders_spelling(loop):
    """A datagram's address is always socket.recvfrom's form, even when this transport
    sent to that peer under another spelling of the same address."""

    async def main():
        peer = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        peer.bind(("::1", 0))
        try:
            port = peer.getsockname()[1]
            tr, proto = await loop.create_datagram_endpoint(
                DatagramRecorder, local_addr=("::1", 0), family=socket.AF_INET6
            )
            try:
                tr.sendto(b"x", ("0:0:0:0:0:0:0:1", port))
                tr.sendto(b"y", ("0:0:0:0:0:0:0:1", port))
                peer.settimeout(5)
                _, back = peer.recvfrom(10)
                peer.recvfrom(10)
                peer.sendto(b"reply", back)
                got = await proto.wait_for(1)
                assert got == [(b"reply", ("::1", port, 0, 0))]
            finally:
                tr.close()
                await proto.lost
        finally:
            peer.close()

    run(loop, main())


def test_many_peers(loop):
    """More peers than ferroloop remembers address tuples for: every reply reaches the
    peer that asked, with the peer's address."""

    async def main():
        server = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        srv_addr = server[0].get_extra_info("sockname")
        peers = [
            await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
            for _ in range(150)
        ]
        try:
            for rnd in range(2):
                for i, (tr, _) in enumerate(peers):
                    tr.sendto(b"%d:%d" % (rnd, i), srv_addr)
                got = await server[1].wait_for(len(peers) * (rnd + 1))
                for data, addr in got[len(peers) * rnd :]:
                    server[0].sendto(data, addr)
                for i, (tr, proto) in enumerate(peers):
                    replies = await proto.wait_for(rnd + 1)
                    assert replies[rnd] == (b"%d:%d" % (rnd, i), srv_addr)
                    senders = [a for d, a in got if d.endswith(b":%d" % i)]
                    assert tr.get_extra_info("sockname") in senders
        finally:
            await close(server, *peers)

    run(loop, main())


def test_empty_datagram(loop):
    """sendto(b"") does nothing up to asyncio 3.12; from 3.13 it sends an empty
    datagram."""

    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        b = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        try:
            addr_b = b[0].get_extra_info("sockname")
            a[0].sendto(b"", addr_b)
            a[0].sendto(b"marker", addr_b)
            await b[1].wait_for(1)
            await asyncio.sleep(0.01)
            return [d for d, _ in b[1].datagrams]
        finally:
            await close(a, b)

    expected = [b"", b"marker"] if PY313 else [b"marker"]
    assert run(loop, main()) == expected


def test_sendto_type_error(loop):
    async def main():
        tr, proto = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        try:
            with pytest.raises(TypeError) as info:
                tr.sendto("text", (HOST, 9))
            assert str(info.value) == "data argument must be a bytes-like object, not 'str'"
        finally:
            await close((tr, proto))

    run(loop, main())


def test_many_datagrams_in_order(loop):
    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        b = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        try:
            addr_b = b[0].get_extra_info("sockname")
            for i in range(200):
                a[0].sendto(i.to_bytes(2, "big") * 100, addr_b)
                if i % 20 == 19:
                    await asyncio.sleep(0.001)
            got = await b[1].wait_for(200)
            return [d for d, _ in got]
        finally:
            await close(a, b)

    assert run(loop, main()) == [i.to_bytes(2, "big") * 100 for i in range(200)]


def test_large_datagram(loop):
    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        b = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        try:
            payload = bytes(range(256)) * 200  # 51200 bytes, under the 64 KiB UDP limit
            a[0].sendto(payload, b[0].get_extra_info("sockname"))
            got = await b[1].wait_for(1)
            return got[0][0] == payload
        finally:
            await close(a, b)

    assert run(loop, main())


def test_close_and_abort(loop):
    async def main():
        t1, p1 = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        t1.close()
        assert t1.is_closing()
        t1.close()
        assert await p1.lost is None
        t2, p2 = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        t2.abort()
        assert t2.is_closing()
        assert await p2.lost is None
        assert p1.events == ["made", "lost"]
        assert p2.events == ["made", "lost"]

    run(loop, main())


def test_allow_broadcast(loop):
    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=(HOST, 0), allow_broadcast=True
        )
        try:
            sock = tr.get_extra_info("socket")
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
        finally:
            await close((tr, proto))

    assert run(loop, main()) != 0


def test_allow_broadcast_with_remote_addr_does_not_connect(loop):
    """With allow_broadcast, asyncio does not connect() to remote_addr; sendto()
    without an address still goes there."""

    async def main():
        target = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        addr = target[0].get_extra_info("sockname")
        client = await loop.create_datagram_endpoint(
            DatagramRecorder, remote_addr=addr, allow_broadcast=True
        )
        try:
            with pytest.raises(OSError):
                client[0].get_extra_info("socket").getpeername()
            client[0].sendto(b"via remote_addr")
            got = await target[1].wait_for(1)
            return got[0][0]
        finally:
            await close(client, target)

    assert run(loop, main()) == b"via remote_addr"


def test_reuse_port(loop):
    async def main():
        a = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=(HOST, 0), reuse_port=True
        )
        try:
            sock = a[0].get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0
            port = a[0].get_extra_info("sockname")[1]
            b = await loop.create_datagram_endpoint(
                DatagramRecorder, local_addr=(HOST, port), reuse_port=True
            )
            await close(b)
        finally:
            await close(a)

    run(loop, main())


def test_address_in_use(loop):
    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        try:
            port = a[0].get_extra_info("sockname")[1]
            with pytest.raises(OSError) as info:
                await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, port))
            return info.value
        finally:
            await close(a)

    exc = run(loop, main())
    assert type(exc) is OSError
    assert exc.errno == 98  # EADDRINUSE, straight from bind()


def test_sock_argument(loop):
    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((HOST, 0))
            tr, proto = await loop.create_datagram_endpoint(DatagramRecorder, sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            assert sock.gettimeout() == 0.0
            assert tr.get_extra_info("sockname") == sock.getsockname()
        finally:
            await close((tr, proto))
        return sock

    assert run(loop, main()).fileno() == -1


def test_sock_with_modifiers_rejected(loop):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError) as info:
            run(
                loop,
                loop.create_datagram_endpoint(
                    asyncio.DatagramProtocol, sock=sock, local_addr=(HOST, 0), reuse_port=True
                ),
            )
    assert str(info.value) == (
        "socket modifier keyword arguments can not be used when sock is specified. "
        f"(local_addr=('{HOST}', 0), reuse_port=True)"
    )


def test_stream_sock_rejected(loop):
    source = inspect.getsource(asyncio.base_events.BaseEventLoop.create_datagram_endpoint)
    with socket.socket() as sock:
        if "A UDP Socket was expected" in source:
            expected = f"A UDP Socket was expected, got {sock!r}"
        else:
            expected = f"A datagram socket was expected, got {sock!r}"
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock))
        assert str(info.value) == expected


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({}, ValueError, "unexpected address family"),
        # asyncio 3.10 asserts the address's shape.
        ({"local_addr": (HOST, 0, 0)}, TUPLE_ERROR, "2-tuple is expected"),
        ({"remote_addr": "127.0.0.1"}, TUPLE_ERROR, "2-tuple is expected"),
        ({"family": socket.AF_UNIX, "local_addr": (HOST, 0)}, TypeError, "string is expected"),
    ],
)
def test_argument_errors(loop, kwargs, exc, message):
    with pytest.raises(exc) as info:
        run(loop, loop.create_datagram_endpoint(asyncio.DatagramProtocol, **kwargs))
    assert str(info.value) == message


def test_family_mismatch(loop):
    """local and remote addresses of different families: no (family, proto) pair has
    both, asyncio gives up before making a socket."""
    with pytest.raises(ValueError) as info:
        run(
            loop,
            loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(HOST, 0), remote_addr=("::1", 9)
            ),
        )
    assert str(info.value) == "can not get address information"


def test_unresolvable_remote(loop):
    with pytest.raises(socket.gaierror):
        run(
            loop,
            loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=("ferroloop-test.invalid", 9)
            ),
        )


# ---- Unix datagram sockets -------------------------------------------------------------


def test_unix_datagram(loop, tmp_path):
    path_a = str(tmp_path / "a.sock")
    path_b = str(tmp_path / "b.sock")

    async def main():
        a = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=path_a, family=socket.AF_UNIX
        )
        b = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=path_b, family=socket.AF_UNIX
        )
        try:
            assert a[0].get_extra_info("sockname") == path_a
            a[0].sendto(b"unix datagram", path_b)
            assert await b[1].wait_for(1) == [(b"unix datagram", path_a)]
        finally:
            await close(a, b)

    run(loop, main())


def test_unix_datagram_connected(loop, tmp_path):
    path_srv = str(tmp_path / "srv.sock")

    async def main():
        srv = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=path_srv, family=socket.AF_UNIX
        )
        client = await loop.create_datagram_endpoint(
            DatagramRecorder, remote_addr=path_srv, family=socket.AF_UNIX
        )
        try:
            assert client[0].get_extra_info("peername") == path_srv
            client[0].sendto(b"to server")
            got = await srv[1].wait_for(1)
            # An unbound Unix datagram client has no address.
            assert got == [(b"to server", None)]
        finally:
            await close(client, srv)

    run(loop, main())


def test_unix_datagram_stale_file_removed(loop, tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(path)
    stale.close()

    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=path, family=socket.AF_UNIX
        )
        await close((tr, proto))

    run(loop, main())


def test_unix_datagram_abstract(loop):
    name = f"\0ferroloop-dgram-test-{uuid.uuid4().hex}"

    async def main():
        a = await loop.create_datagram_endpoint(
            DatagramRecorder, local_addr=name, family=socket.AF_UNIX
        )
        b = await loop.create_datagram_endpoint(
            DatagramRecorder, remote_addr=name, family=socket.AF_UNIX
        )
        try:
            b[0].sendto(b"abstract")
            got = await a[1].wait_for(1)
            return got[0][0]
        finally:
            await close(b, a)

    assert run(loop, main()) == b"abstract"


class Inspector(asyncio.DatagramProtocol):
    """Keeps every other datagram and checks each one's value and hash on arrival (the
    transport may reuse the storage of a datagram nobody kept for the next one)."""

    def __init__(self, expected: int):
        self.kept: list = []
        self.seen = 0
        self.bad: list = []
        self.done = asyncio.get_running_loop().create_future()
        self.expected = expected

    def datagram_received(self, data, addr):
        copy = bytes(bytearray(data))
        if hash(data) != hash(copy) or data != copy:
            self.bad.append(self.seen)
        if self.seen % 2 == 0:
            self.kept.append(data)
        self.seen += 1
        if self.seen == self.expected and not self.done.done():
            self.done.set_result(None)


def test_datagrams_kept_or_dropped_keep_their_contents(loop):
    # Same-size datagrams with different contents, interleaved with other sizes: the
    # kept ones must not change afterwards, and each one's hash must be its own.
    payloads = [bytes([i]) * (1024 if i % 3 else 700) for i in range(60)]

    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        b = await loop.create_datagram_endpoint(
            lambda: Inspector(len(payloads)), local_addr=(HOST, 0)
        )
        try:
            addr_b = b[0].get_extra_info("sockname")
            for i, p in enumerate(payloads):
                a[0].sendto(p, addr_b)
                if i % 10 == 9:
                    await asyncio.sleep(0.001)
            await asyncio.wait_for(b[1].done, 5)
            return b[1].bad, b[1].kept
        finally:
            await close(a)
            b[0].close()

    bad, kept = run(loop, main())
    assert bad == []
    assert kept == payloads[::2]


def _numbered(n: int) -> list[bytes]:
    return [i.to_bytes(2, "big") * 50 for i in range(n)]


async def _queue_then_receive(loop, proto_factory, payloads):
    """Sends every payload before the receiver's reader runs (so they wait in its
    socket together and are received in one batch), then returns the endpoints."""
    a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
    b = await loop.create_datagram_endpoint(proto_factory, local_addr=(HOST, 0))
    addr_b = b[0].get_extra_info("sockname")
    for p in payloads:
        a[0].sendto(p, addr_b)
    return a, b


async def _replies(loop, proto_factory, payloads, n: int):
    """Queues ``payloads`` for a ``proto_factory`` endpoint (see `_queue_then_receive`),
    waits for ``n`` replies at the sender and closes both: (the replies' data, the
    replying protocol, whether its transport was closing)."""
    a, b = await _queue_then_receive(loop, proto_factory, payloads)
    try:
        got = await asyncio.wait_for(a[1].wait_for(n), 5)
        await asyncio.sleep(0.01)
        return [d for d, _ in got], b[1], b[0].is_closing()
    finally:
        await close(a, b)


def test_pause_reading_mid_batch_delivers_the_rest_after_resume(loop):
    # 20 datagrams are received together; the protocol pauses at the 5th. Nothing more
    # may arrive while paused, and resuming must deliver the other 15, in order,
    # although no new datagram arrives to wake the reader.
    payloads = _numbered(20)

    class Pauser(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if len(self.datagrams) == 5:
                self.transport.pause_reading()

    async def main():
        a, b = await _queue_then_receive(loop, Pauser, payloads)
        try:
            await asyncio.wait_for(b[1].wait_for(5), 5)
            await asyncio.sleep(0.05)
            paused_count = len(b[1].datagrams)
            assert not b[0].is_reading()
            b[0].resume_reading()
            assert b[0].is_reading()
            got = await asyncio.wait_for(b[1].wait_for(len(payloads)), 5)
            await asyncio.sleep(0.01)
            return paused_count, [d for d, _ in b[1].datagrams], {a for _, a in got}
        finally:
            await close(a, b)

    paused_count, got, senders = run(loop, main())
    assert paused_count == 5
    assert got == payloads
    assert len(senders) == 1


def test_datagram_received_raising_mid_batch_loses_nothing(loop, loop_errors):
    # The protocol raises on the 3rd of 70 queued datagrams (more than one batch): the
    # error reaches the exception handler, the transport stays open, and every other
    # datagram is delivered once, in order.
    payloads = _numbered(70)

    class Raiser(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if len(self.datagrams) == 3:
                raise ZeroDivisionError("third")

    async def main():
        a, b = await _queue_then_receive(loop, Raiser, payloads)
        try:
            await asyncio.wait_for(b[1].wait_for(len(payloads)), 5)
            await asyncio.sleep(0.01)
            return [d for d, _ in b[1].datagrams], b[0].is_closing()
        finally:
            await close(a, b)

    got, closing = run(loop, main())
    assert got == payloads
    assert not closing
    assert len(loop_errors) == 1
    assert isinstance(loop_errors[0]["exception"], ZeroDivisionError)
    loop_errors.clear()


def test_close_mid_batch_delivers_nothing_more(loop):
    payloads = _numbered(20)

    class Closer(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if len(self.datagrams) == 3:
                self.transport.close()

    async def main():
        a, b = await _queue_then_receive(loop, Closer, payloads)
        try:
            assert await asyncio.wait_for(b[1].lost, 5) is None
            await asyncio.sleep(0.02)
            return b[1].events, [d for d, _ in b[1].datagrams]
        finally:
            a[0].close()
            await a[1].lost

    events, got = run(loop, main())
    assert events == ["made", "datagram", "lost"]
    assert got == payloads[:3]


def test_batch_of_large_datagrams_keeps_every_byte(loop):
    # Datagrams near the UDP size limit, several received together: each one whole.
    import random

    rnd = random.Random(7)
    payloads = [rnd.randbytes(size) for size in (65507, 1, 60000, 40000, 65507, 3)]

    async def main():
        a = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        b = await loop.create_datagram_endpoint(DatagramRecorder, local_addr=(HOST, 0))
        sock = b[0].get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        try:
            addr_b = b[0].get_extra_info("sockname")
            for p in payloads:
                a[0].sendto(p, addr_b)
            got = await asyncio.wait_for(b[1].wait_for(len(payloads)), 5)
            return [d for d, _ in got]
        finally:
            await close(a, b)

    assert run(loop, main()) == payloads


class Replier(DatagramRecorder):
    """Echoes each datagram from `datagram_received` (ferroloop defers such replies to
    the end of the read batch and sends them together): also a bytearray and a
    memoryview copy of every third one, and what the write buffer held after each."""

    def __init__(self):
        super().__init__()
        self.buffer_sizes: list[int] = []

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        i = len(self.datagrams)
        self.transport.sendto(data, addr)
        if i % 3 == 1:
            mutable = bytearray(b"b" + data)
            self.transport.sendto(mutable, addr)
            # asyncio sent it at once: changing it afterwards changes nothing sent.
            mutable[:] = b"changed"
        elif i % 3 == 2:
            self.transport.sendto(memoryview(b"m" + data), addr)
        self.buffer_sizes.append(self.transport.get_write_buffer_size())


def _expected_replies(payloads):
    want = []
    for i, p in enumerate(payloads, 1):
        want.append(p)
        if i % 3 == 1:
            want.append(b"b" + p)
        elif i % 3 == 2:
            want.append(b"m" + p)
    return want


def test_replies_sent_during_a_batch_arrive_whole_and_in_order(loop):
    # 70 datagrams wait together (more than one read batch); every reply, whatever its
    # buffer type, arrives once and in order, and none waits in the write buffer.
    payloads = _numbered(70)

    want = _expected_replies(payloads)
    got, proto, _ = run(loop, _replies(loop, Replier, payloads, len(want)))
    assert got == want
    assert proto.buffer_sizes == [0] * len(payloads)
    assert proto.errors == []


@pytest.mark.parametrize("how", ["close", "abort"])
def test_replies_before_close_or_abort_mid_batch_are_sent(loop, how):
    # The protocol replies, then closes (or aborts) at the 3rd of 20 queued datagrams:
    # the three replies were sent (asyncio sends them at once; abort only drops what
    # waits in the write buffer), and nothing more is delivered.
    payloads = _numbered(20)

    class ReplyThenClose(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            self.transport.sendto(data, addr)
            if len(self.datagrams) == 3:
                getattr(self.transport, how)()

    async def main():
        a, b = await _queue_then_receive(loop, ReplyThenClose, payloads)
        try:
            assert await asyncio.wait_for(b[1].lost, 5) is None
            got = await asyncio.wait_for(a[1].wait_for(3), 5)
            await asyncio.sleep(0.02)
            return b[1].events, [d for d, _ in got]
        finally:
            a[0].close()
            await a[1].lost

    events, got = run(loop, main())
    assert events == ["made", "datagram", "lost"]
    assert got == payloads[:3]


def test_send_error_during_a_batch_goes_to_error_received(loop):
    # A reply to the broadcast address without SO_BROADCAST fails (EACCES): that one
    # reaches error_received as asyncio reports it, and every other reply is sent.
    payloads = _numbered(10)

    class Broadcaster(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if len(self.datagrams) == 4:
                self.transport.sendto(data, ("255.255.255.255", addr[1]))
            self.transport.sendto(data, addr)

    got, proto, closing = run(loop, _replies(loop, Broadcaster, payloads, len(payloads)))
    assert got == payloads
    assert [type(e) for e in proto.errors] == [PermissionError]
    assert not closing


def test_reply_from_a_slow_protocol_is_not_held_for_the_batch(loop):
    # Five datagrams wait together; the protocol takes 20 ms over each. The first reply
    # must reach the peer before the protocol gets to the last datagram (ferroloop sends
    # replies deferred during a batch once the first has waited 50 µs).
    import threading
    import time

    n = 5
    starts: list[float] = []
    arrivals: list[float] = []

    class Slow(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            starts.append(time.monotonic())
            time.sleep(0.02)
            self.transport.sendto(data, addr)

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((HOST, 0))
    peer.settimeout(5)

    def receive():
        for _ in range(n):
            peer.recv(100)
            arrivals.append(time.monotonic())

    async def main():
        tr, _ = await loop.create_datagram_endpoint(Slow, local_addr=(HOST, 0))
        try:
            addr = tr.get_extra_info("sockname")
            for i in range(n):
                peer.sendto(bytes([i]), addr)
            t = threading.Thread(target=receive)
            t.start()
            while len(starts) < n:
                await asyncio.sleep(0.01)
            await loop.run_in_executor(None, t.join)
        finally:
            tr.close()

    try:
        run(loop, main())
    finally:
        peer.close()
    assert len(arrivals) == n
    assert arrivals[0] < starts[-1]


def test_error_received_raising_for_a_reply_goes_to_the_handler(loop, loop_errors):
    # error_received raises for a failed reply (the broadcast address without
    # SO_BROADCAST) sent from datagram_received: the exception reaches the loop's
    # exception handler (asyncio: out of sendto and datagram_received), the transport
    # stays open, and every other reply is sent.
    payloads = _numbered(40)

    class Raiser(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            self.transport.sendto(data, addr)
            if len(self.datagrams) == 4:
                self.transport.sendto(data, ("255.255.255.255", addr[1]))

        def error_received(self, exc):
            super().error_received(exc)
            raise ValueError("from error_received")

    got, proto, closing = run(loop, _replies(loop, Raiser, payloads, len(payloads)))
    assert got == payloads
    assert [type(e) for e in proto.errors] == [PermissionError]
    assert not closing
    assert len(loop_errors) == 1
    assert isinstance(loop_errors[0]["exception"], ValueError)
    loop_errors.clear()


def test_close_after_a_failed_deferred_reply_closes(loop, loop_name, loop_errors):
    # ferroloop only: asyncio raises error_received's exception out of sendto itself,
    # so its protocol never reaches close(). On ferroloop the reply was deferred, so
    # close() sends it, reports error_received's exception to the handler and closes.
    if loop_name != "ferroloop":
        pytest.skip("asyncio raises out of sendto before close() is reached")

    class Closer(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            self.transport.sendto(data, ("255.255.255.255", addr[1]))
            self.transport.sendto(data, addr)
            self.transport.close()

        def error_received(self, exc):
            super().error_received(exc)
            raise ValueError("from error_received")

    async def main():
        a, b = await _queue_then_receive(loop, Closer, [b"x1"])
        try:
            assert await asyncio.wait_for(b[1].lost, 5) is None
            got = await asyncio.wait_for(a[1].wait_for(1), 5)
            return [d for d, _ in got], b[1].errors, b[0].get_extra_info("socket").fileno()
        finally:
            a[0].close()
            await a[1].lost

    got, errors, fileno = run(loop, main())
    assert got == [b"x1"]
    assert [type(e) for e in errors] == [PermissionError]
    assert fileno == -1
    assert [type(c["exception"]) for c in loop_errors] == [ValueError]
    loop_errors.clear()


def test_reply_from_error_received_keeps_its_place(loop):
    # datagram_received sends A, a datagram that fails (EACCES), B and C; error_received
    # sends R. asyncio calls error_received inside the failing sendto, so the peer gets
    # A R B C; replies ferroloop deferred to the batch's end keep that order too.
    class Replier(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            self.peer = addr
            self.transport.sendto(b"A", addr)
            self.transport.sendto(b"bad", ("255.255.255.255", addr[1]))
            self.transport.sendto(b"B", addr)
            self.transport.sendto(bytearray(b"C"), addr)

        def error_received(self, exc):
            super().error_received(exc)
            self.transport.sendto(b"R", self.peer)

    got, proto, _ = run(loop, _replies(loop, Replier, [b"go"], 4))
    assert got == [b"A", b"R", b"B", b"C"]
    assert [type(e) for e in proto.errors] == [PermissionError]


def test_error_received_resending_the_failing_datagram_recurses(loop, loop_errors):
    import time

    # A protocol that re-sends a failing datagram from error_received recurses (asyncio:
    # error_received is called inside sendto) until RecursionError, which reaches the
    # exception handler; the loop goes on and the transport still works.
    class Retrier(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            self.peer = addr
            self.transport.sendto(data, addr)
            if data == b"go":
                self.transport.sendto(b"bad", ("255.255.255.255", addr[1]))
                # ferroloop: past the 50 µs deadline, sent while the batch is delivered.
                time.sleep(0.001)

        def error_received(self, exc):
            self.errors.append(exc)
            self.transport.sendto(b"bad", ("255.255.255.255", self.peer[1]))

    async def main():
        a, b = await _queue_then_receive(loop, Retrier, [b"go"])
        try:
            await asyncio.wait_for(a[1].wait_for(1), 5)
            a[0].sendto(b"again", b[0].get_extra_info("sockname"))
            got = await asyncio.wait_for(a[1].wait_for(2), 5)
            return [d for d, _ in got], len(b[1].errors), b[0].is_closing()
        finally:
            await close(a, b)

    got, n_errors, closing = run(loop, main())
    assert got == [b"go", b"again"]
    assert n_errors > 50
    assert not closing
    assert [type(c["exception"]) for c in loop_errors] == [RecursionError]
    loop_errors.clear()


def test_queued_datagrams_count_their_header(loop, tmp_path):
    """From Python 3.13 asyncio counts 8 bytes per queued datagram on top of its data,
    so that queued empty datagrams (sent from 3.13) reach the high-water mark too."""
    path = str(tmp_path / "peer.sock")
    events = []

    class Proto(asyncio.DatagramProtocol):
        def pause_writing(self):
            events.append("pause")

    async def main():
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        peer.bind(path)  # never reads: the queue fills
        transport, _ = await loop.create_datagram_endpoint(
            Proto, family=socket.AF_UNIX, remote_addr=path
        )
        try:
            transport.set_write_buffer_limits(high=64)
            for _ in range(10_000):
                if transport.get_write_buffer_size():
                    break
                transport.sendto(b"x")
            sizes = [transport.get_write_buffer_size()]
            for _ in range(10):
                transport.sendto(b"")
                sizes.append(transport.get_write_buffer_size())
            return sizes
        finally:
            transport.abort()
            peer.close()

    sizes = run(loop, main())
    if PY313:
        assert sizes == [9 + 8 * i for i in range(11)]
        assert events == ["pause"]
    else:
        assert sizes == [1] * 11
        assert events == []


def test_empty_datagrams_after_close_count_as_asyncio_counts_them(loop, caplog):
    """Before 3.13 asyncio drops an empty datagram before anything else, so sending one
    on a closed transport does not count towards the 'socket.send() raised exception.'
    warning; from 3.13 it does."""

    async def main():
        server, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(HOST, 0)
        )
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=server.get_extra_info("sockname")
        )
        transport.close()
        await asyncio.sleep(0.01)
        for data in [b"", b"x", b"", b"x", b"", b"x", b"x", b"x", b"x"]:
            transport.sendto(data)
        server.close()

    with caplog.at_level("WARNING", logger="asyncio"):
        run(loop, main())
    warned = [r for r in caplog.records if r.getMessage() == "socket.send() raised exception."]
    assert len(warned) == (5 if PY313 else 2)


def test_reuse_address_is_python_3_10s(loop):
    """asyncio 3.10 still takes ``reuse_address`` (False with a DeprecationWarning, True
    refused); later versions have no such argument."""
    import sys
    import warnings

    async def attempt(**kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    asyncio.DatagramProtocol, local_addr=(HOST, 0), **kwargs
                )
            except Exception as exc:
                return type(exc).__name__, [w.category.__name__ for w in caught]
            transport.close()
            return "ok", [w.category.__name__ for w in caught]

    async def main():
        return [await attempt(reuse_address=False), await attempt(reuse_address=True)]

    results = run(loop, main())
    if sys.version_info < (3, 11):
        assert results == [("ok", ["DeprecationWarning"]), ("ValueError", [])]
    else:
        assert results == [("TypeError", []), ("TypeError", [])]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_interrupt_from_error_received_ends_the_run_after_a_protocol_error(
    loop, loop_errors, exc_type
):
    """datagram_received() sends a reply that fails at once (EACCES), then raises;
    error_received() raises KeyboardInterrupt / SystemExit. On asyncio that escapes from
    sendto() inside datagram_received(); ferroloop sends the reply at the end of the read
    batch, and the interrupt still ends the run instead of being printed and lost."""

    class P(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(b"reply", ("255.255.255.255", addr[1]))
            raise ValueError("from datagram_received")

        def error_received(self, exc):
            raise exc_type()

    async def main():
        transport, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"ping", transport.get_extra_info("sockname"))
            try:
                await asyncio.sleep(2)
            finally:
                transport.close()

    task = loop.create_task(main())
    with pytest.raises(exc_type):
        loop.run_until_complete(task)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)
    # Nothing reaches the handler: asyncio never gets to the ValueError, ferroloop makes
    # it the interrupt's context.
    assert not loop_errors
