"""Transport edge cases found in review of the native transports: descriptor reuse after
the connection is lost, ttys that return one line per read, protocol errors in the
middle of a datagram burst, rejected writelines() and per-instance attributes.

Parity: every test runs on stdlib asyncio and on ferroloop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys

import pytest
from _net import HOST, RecordingProtocol, run


def test_write_after_connection_lost_never_reaches_a_reused_fd(loop):
    """close() with data pending flushes it, then the socket closes; a later write() is
    dropped (asyncio raises AttributeError) and never reaches a new socket that got the
    same descriptor number."""

    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        proto = RecordingProtocol()
        tr, _ = await loop.connect_accepted_socket(lambda: proto, a)
        old_fd = a.fileno()
        tr.write(b"x" * (4 * 1024 * 1024))  # more than the socket buffers hold
        tr.close()
        got = 0
        b.setblocking(False)
        while True:  # everything, then EOF
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0)
                continue
            if not chunk:
                break
            got += len(chunk)
        await proto.lost
        b.close()
        # The next socket gets the lowest free descriptor: the one the transport had.
        c, d = socket.socketpair()
        try:
            assert old_fd in (c.fileno(), d.fileno())
            with contextlib.suppress(AttributeError):
                tr.write(b"LEAKED")
            with contextlib.suppress(AttributeError):
                tr.writelines([b"LEAKED"])
            await asyncio.sleep(0.05)
            for s in (c, d):
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    assert s.recv(100) == b""
        finally:
            c.close()
            d.close()
        return got

    assert run(loop, main()) == 4 * 1024 * 1024


def test_tty_lines_are_all_delivered(loop):
    """A tty in canonical mode returns one line per read(): every line of a burst still
    arrives without more input."""

    async def main():
        master, slave = os.openpty()
        proto = RecordingProtocol()
        slave_file = open(slave, "rb", buffering=0)  # closed by the transport
        tr, _ = await loop.connect_read_pipe(lambda: proto, slave_file)
        try:
            os.write(master, b"one\ntwo\nthree\n")
            deadline = loop.time() + 5
            while proto.data.count(b"\n") < 3 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            return bytes(proto.data)
        finally:
            tr.close()
            await proto.lost
            os.close(master)

    assert run(loop, main()) == b"one\ntwo\nthree\n"


def test_datagram_protocol_error_does_not_stall_the_queue(loop, loop_errors):
    """datagram_received() raising goes to the exception handler; the datagrams behind it
    are still delivered."""
    got = []

    class Picky(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            got.append(data)
            if data == b"bad":
                raise ValueError("bad datagram")

    async def main():
        tr, _ = await loop.create_datagram_endpoint(Picky, local_addr=(HOST, 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            addr = tr.get_extra_info("sockname")
            for d in (b"bad", b"1", b"2"):
                sender.sendto(d, addr)
            deadline = loop.time() + 5
            while len(got) < 3 and loop.time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            sender.close()
            tr.close()
            await asyncio.sleep(0)

    run(loop, main())
    assert got == [b"bad", b"1", b"2"]
    assert [type(c.get("exception")) for c in loop_errors] == [ValueError]
    loop_errors.clear()


@contextlib.asynccontextmanager
async def _accepted_pair(loop):
    """A transport on one end of a socket pair, and the other end (5 s timeout)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    proto = RecordingProtocol()
    tr, _ = await loop.connect_accepted_socket(lambda: proto, a)
    try:
        yield tr, b
    finally:
        tr.close()
        await proto.lost
        b.close()


def test_rejected_writelines_leaves_the_transport_usable(loop):
    """writelines() with an item that is not bytes-like raises and queues nothing; later
    writes go through."""

    async def main():
        async with _accepted_pair(loop) as (tr, b):
            bad = [b"first", memoryview(b"xxxx")[::2], b"last"]  # non-contiguous view
            try:
                tr.writelines(bad)
            except (TypeError, ValueError, BufferError):
                pass
            tr.write(b"after")
            await asyncio.sleep(0.05)
            data = b.recv(100)
            return data, tr.get_write_buffer_size()

    data, size = run(loop, main())
    assert data.endswith(b"after")
    assert size == 0


def test_writelines_takes_any_bytes_like_object(loop):
    """asyncio joins the list (3.11) or takes a memoryview of each item (3.12+): any
    object with the buffer protocol goes, and the first item without one raises
    TypeError with nothing sent."""
    import array

    async def main():
        async with _accepted_pair(loop) as (tr, b):
            tr.writelines(
                [b"head-", array.array("b", b"ABC"), bytearray(b"-"), memoryview(b"tail")]
            )
            try:
                tr.writelines([b"x", "not bytes", b"y"])
            except TypeError as exc:
                refused = str(exc)
            await asyncio.sleep(0.05)
            b.setblocking(False)
            return b.recv(100), refused

    data, refused = run(loop, main())
    assert data == b"head-ABC-tail"
    assert "bytes-like object" in refused and "str" in refused


def test_transport_has_a_dict(loop):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        proto = RecordingProtocol()
        tr, _ = await loop.connect_accepted_socket(lambda: proto, a)
        try:
            tr.custom = 1
            return vars(tr).get("custom")
        finally:
            tr.close()
            await proto.lost
            b.close()

    assert run(loop, main()) == 1


SHUTDOWN_SCRIPT = """
import asyncio, socket, sys
if sys.argv[1] == "asyncio":
    loop = asyncio.new_event_loop()
else:
    import ferroloop
    loop = ferroloop.new_event_loop()

class Proto(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

async def main():
    server = await loop.create_server(Proto, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    keep = []
    for _ in range(20):
        keep.append(await loop.create_connection(Proto, "127.0.0.1", port))
    udp = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    keep.append(udp)
    await asyncio.sleep(0.05)
    globals()["keep"] = (server, keep)

loop.run_until_complete(main())
print("done", flush=True)
# The loop is neither closed nor are the transports: they go at interpreter shutdown.
"""


def test_unclosed_transports_at_interpreter_shutdown(loop_name, tmp_path):
    """Transports left open until the interpreter exits are finalized quietly (asyncio
    prints nothing: its ResourceWarning is ignored by default), with no error from a
    finalizer that can no longer import modules."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(SHUTDOWN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), loop_name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def test_negative_backlog_is_taken_as_listen_takes_it(loop, loop_name):
    """listen() clamps a negative backlog to 0; the server still accepts."""
    if loop_name == "asyncio":
        pytest.skip("asyncio makes the server, which never accepts: range(backlog) is empty")

    async def main():
        made = loop.create_future()

        class Made(asyncio.Protocol):
            def connection_made(self, transport):
                if not made.done():
                    made.set_result(True)
                transport.close()

        server = await loop.create_server(Made, HOST, 0, backlog=-5)
        try:
            _reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.close()
            return await asyncio.wait_for(made, 5)
        finally:
            server.close()

    assert run(loop, main())


class _ClosingServer:
    """A server whose accepted transports close with it."""

    def __init__(self, server, accepted):
        self.server = server
        self.accepted = accepted

    def close(self):
        for transport in self.accepted:
            transport.close()
        self.server.close()


async def _stream_and_datagram(loop):
    accepted = []

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport):
            accepted.append(transport)

    server = await loop.create_server(Accepted, HOST, 0)
    stream, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname())
    datagram, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=(HOST, 0)
    )
    while not accepted:
        await asyncio.sleep(0.001)
    return _ClosingServer(server, accepted), stream, datagram


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1e6,), (250000.0, 1e6)),
        ((10.0, 2.0), (2.0, 10.0)),
        ((2**70,), (2**68, 2**70)),
        ((None, 2**62), (2**62, 2**64)),
        ((None, 3), (3, 12)),
    ],
)
def test_write_buffer_limits_take_any_numbers(loop, args, expected):
    """asyncio computes and checks the marks with Python numbers: floats and big ints
    are kept as given."""

    async def main():
        server, stream, datagram = await _stream_and_datagram(loop)
        try:
            results = []
            for transport in (stream, datagram):
                transport.set_write_buffer_limits(*args)
                results.append(transport.get_write_buffer_limits())
            return results
        finally:
            stream.close()
            datagram.close()
            server.close()

    for got in run(loop, main()):
        assert got == expected
        assert [type(v) for v in got] == [type(v) for v in expected]


def test_write_buffer_limits_errors_show_the_values(loop):
    async def main():
        server, stream, datagram = await _stream_and_datagram(loop)
        try:
            for transport in (stream, datagram):
                with pytest.raises(ValueError, match=r"high \(4\) must be >= low \(5\)"):
                    transport.set_write_buffer_limits(4, 5)
                with pytest.raises(ValueError, match=r"low \(-1\.5\) must be >= 0"):
                    transport.set_write_buffer_limits(None, -1.5)
                with pytest.raises(TypeError):
                    transport.set_write_buffer_limits("10")
        finally:
            stream.close()
            datagram.close()
            server.close()

    run(loop, main())


def test_float_high_water_mark_pauses_writing(loop):
    """A float mark works as asyncio's: pause once the buffer is above it."""
    paused = []

    class Proto(asyncio.Protocol):
        def pause_writing(self):
            paused.append(True)

    accepted = []

    class Deaf(asyncio.Protocol):
        def connection_made(self, transport):
            accepted.append(transport)
            transport.pause_reading()

    async def main():
        server = await loop.create_server(Deaf, HOST, 0)
        transport, _ = await loop.create_connection(Proto, *server.sockets[0].getsockname())
        try:
            transport.set_write_buffer_limits(high=1024.5)
            chunk = b"x" * 65536
            for _ in range(200):
                if paused:
                    break
                transport.write(chunk)
                await asyncio.sleep(0)
            return transport.get_write_buffer_size()
        finally:
            transport.abort()
            for t in accepted:
                t.abort()
            server.close()

    size = run(loop, main())
    assert paused == [True]
    assert size > 1024.5


def test_transport_methods_have_asyncios_signatures(loop):
    import inspect

    async def main():
        server, stream, datagram = await _stream_and_datagram(loop)
        try:
            return {
                name: str(inspect.signature(getattr(t, name)))
                for t, names in [
                    (stream, ["write", "writelines", "set_write_buffer_limits", "get_extra_info"]),
                    (datagram, ["sendto"]),
                ]
                for name in names
            }
        finally:
            stream.close()
            datagram.close()
            server.close()

    assert run(loop, main()) == {
        "write": "(data)",
        "writelines": "(list_of_data)",
        "set_write_buffer_limits": "(high=None, low=None)",
        "get_extra_info": "(name, default=None)",
        "sendto": "(data, addr=None)",
    }


def test_closed_transport_repr_keeps_its_descriptor_number(loop):
    """asyncio's repr shows the descriptor a transport had (``closed fd=7``), also once
    the connection is lost; the accepted, client and datagram transports alike."""
    import re

    async def main():
        server, stream, datagram = await _stream_and_datagram(loop)
        transports = [stream, datagram, server.accepted[0]]
        fds = [t.get_extra_info("socket").fileno() for t in transports]
        server.close()
        for t in transports:
            t.close()
        for _ in range(3):
            await asyncio.sleep(0)
        return fds, [repr(t) for t in transports]

    fds, reprs = run(loop, main())
    for fd, text in zip(fds, reprs, strict=True):
        assert re.search(rf" closed fd={fd}(>| )", text), text


def test_get_extra_info_of_unhashable_name_is_a_type_error(loop):
    """``self._extra.get(name)``: an unhashable name raises, on every kind of transport."""

    async def main():
        server, stream, datagram = await _stream_and_datagram(loop)
        try:
            for t in (server.accepted[0], stream, datagram):
                with pytest.raises(TypeError, match="unhashable type: 'list'"):
                    t.get_extra_info([])
        finally:
            stream.close()
            datagram.close()
            server.close()

    run(loop, main())


def test_handler_names_the_transport_for_its_callbacks(loop, loop_errors):
    """An exception from connection_lost() or datagram_received() reaches the handler
    as asyncio's does: "Exception in callback <Transport class>._call_connection_lost(None)"
    / "._read_ready()", naming the transport's class, not an internal object."""
    import re

    class LostRaises(asyncio.Protocol):
        def connection_lost(self, exc):
            raise ValueError("from connection_lost")

    class DatagramRaises(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            raise ValueError("from datagram_received")

    async def main():
        server, stream, datagram = await _stream_and_datagram(loop)
        stream.set_protocol(LostRaises())
        stream.close()
        datagram.set_protocol(DatagramRaises())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", datagram.get_extra_info("sockname"))
            for _ in range(200):
                if len(loop_errors) == 2:
                    break
                await asyncio.sleep(0.005)
        datagram.close()
        server.close()
        await asyncio.sleep(0)

    run(loop, main())
    messages = sorted(c["message"] for c in loop_errors)
    loop_errors.clear()
    lost = [m for m in messages if "_call_connection_lost" in m]
    read = [m for m in messages if "_read_ready" in m]
    assert len(lost) == len(read) == 1, messages
    assert re.fullmatch(
        r"Exception in callback \w*Transport\._call_connection_lost\((None)?\)", lost[0]
    )
    assert re.fullmatch(r"Exception in callback \w*Transport\._read_ready\(\)", read[0])


EPOLLIN, EPOLLOUT, EPOLLET = 0x1, 0x4, 1 << 31


def _epoll_events(fd: int) -> int:
    """The event mask this process's epoll instances watch the open descriptor `fd`
    with (from /proc/self/fdinfo; the entry must be for the same file, by inode)."""
    ino = os.fstat(fd).st_ino
    masks = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if "eventpoll" not in os.readlink(f"/proc/self/fd/{name}"):
                continue
            with open(f"/proc/self/fdinfo/{name}") as f:
                lines = f.read().splitlines()
        except OSError:  # the listing's own descriptor, or one closed meanwhile
            continue
        for line in lines:
            # tfd:        8 events: 8000201d data:                8  pos:0 ino:11dfdde sdev:9
            m = re.match(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s.*\bino:([0-9a-f]+)", line)
            if m and int(m[1]) == fd and int(m[3], 16) == ino:
                masks.add(int(m[2], 16))
    assert len(masks) == 1, f"descriptor {fd}: epoll masks {masks}"
    return masks.pop()


@pytest.mark.parametrize("loop_name", ["ferroloop"], indirect=True)
def test_stream_sockets_are_watched_for_both_directions(loop, loop_errors):
    """ferroloop registers a stream socket transport for reading and writing,
    edge-triggered, from the start (as mio-based servers do; see add_stream_reader);
    datagram transports, read pipes and add_reader() are watched for reading only. A
    writable event without a writer (the peer read what was sent) runs nothing, and the
    transport goes on reading and writing."""

    async def main():
        got = []
        accepted = []

        class Echo(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                accepted.append(transport)

            def data_received(self, data):
                got.append(data)
                self.transport.write(data)

        server = await loop.create_server(Echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(RecordingProtocol, HOST, port)
        while not accepted:
            await asyncio.sleep(0.001)
        both = EPOLLIN | EPOLLOUT | EPOLLET
        for t in (tr, accepted[0]):
            assert _epoll_events(t.get_extra_info("socket").fileno()) & both == both
        # Round trips: the server's writable events (the client read the echo) run nothing.
        want = b"".join(b"%d." % i for i in range(20))
        for i in range(20):
            tr.write(b"%d." % i)
            await asyncio.sleep(0.002)
        while len(proto.data) < len(want):
            await asyncio.sleep(0.001)
        assert b"".join(got) == want
        assert bytes(proto.data) == want
        tr.close()
        server.close()
        await server.wait_closed()

        a, b = socket.socketpair()
        utr, _ = await loop.create_unix_connection(RecordingProtocol, sock=a)
        assert _epoll_events(a.fileno()) & (EPOLLOUT | EPOLLET) == EPOLLOUT | EPOLLET
        utr.pause_reading()
        utr.resume_reading()
        assert _epoll_events(a.fileno()) & (EPOLLOUT | EPOLLET) == EPOLLOUT | EPOLLET
        utr.close()
        b.close()

        dtr, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
        assert _epoll_events(dtr.get_extra_info("socket").fileno()) & EPOLLOUT == 0
        dtr.close()

        r, w = os.pipe()
        with os.fdopen(r, "rb", buffering=0) as pipe:
            ptr, _ = await loop.connect_read_pipe(RecordingProtocol, pipe)
            assert _epoll_events(r) & (EPOLLIN | EPOLLOUT) == EPOLLIN
            ptr.close()
            os.close(w)
            await asyncio.sleep(0)

        c, d = socket.socketpair()
        loop.add_reader(c.fileno(), lambda: None)
        # (Edge-triggered too: level-triggered handles are re-armed before each poll.)
        assert _epoll_events(c.fileno()) & (EPOLLIN | EPOLLOUT) == EPOLLIN
        loop.remove_reader(c.fileno())
        c.close()
        d.close()

    run(loop, main())
    assert loop_errors == []


def _method_load_ops(func, method: str) -> list[str]:
    """The (possibly specialised) instruction names loading `.method` in func's code."""
    import dis
    import io

    out = io.StringIO()
    dis.dis(func, adaptive=True, file=out)
    # 3.11 "LOAD_METHOD_WITH_DICT 1 (m)", 3.12 "LOAD_ATTR_... 3 (NULL|self + m)", 3.13
    # "LOAD_ATTR_... 3 (m + NULL|self)".
    self_slot = r"(?:NULL\|self \+ )?"
    pattern = re.compile(r"(LOAD_\w+)\s+\d+ \(" + self_slot + method + r"(?: \+ NULL\|self)?\)")
    return [m.group(1) for m in pattern.finditer(out.getvalue())]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="no specialising interpreter before 3.11")
def test_method_calls_on_transports_and_loop_specialise(loop_name):
    """ferroloop-only: the interpreter specialises method loads on ferroloop's transports
    and loop (as on asyncio's, whose transports are plain Python objects), so
    `transport.write(data)` in a protocol or streams code does not look the method up
    and bind it on every call. On 3.11 that needs the transport's instance dict to
    exist, and the loop's to be absent or free of method names."""
    if loop_name != "ferroloop":
        pytest.skip("ferroloop's object layout")
    import ferroloop

    # Loop methods that no test sets on an instance: a name once set on any instance of
    # a class joins the keys its instances share, and loads of it no longer specialise.
    def calls(t, lp):
        for _ in range(500):
            t.is_closing()
            t.get_write_buffer_size()
            lp.get_debug()
            lp.is_running()

    loop = ferroloop.new_event_loop()

    async def main():
        accepted = []

        def accept():
            accepted.append(RecordingProtocol())
            return accepted[-1]

        server = await loop.create_server(accept, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(RecordingProtocol, HOST, port)
        calls(tr, loop)
        tr.close()
        await proto.lost
        while not accepted:
            await asyncio.sleep(0.001)
        await accepted[0].lost
        server.close()
        await server.wait_closed()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    generic = {"LOAD_METHOD", "LOAD_ATTR", "LOAD_METHOD_ADAPTIVE", "LOAD_ATTR_ADAPTIVE"}
    for name in ("is_closing", "get_write_buffer_size", "get_debug", "is_running"):
        ops = _method_load_ops(calls, name)
        assert ops and not generic & set(ops), (name, ops)
