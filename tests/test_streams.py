"""asyncio streams (start_server / open_connection) over the loop's transports.

ferroloop feeds asyncio's own, unmodified ``StreamReaderProtocol`` / ``StreamReader``
natively (``src/py/stream_reader.rs``). These tests run on both loops and check that the
result is what the Python methods do, and that anything replacing those methods (on the
class, on the instance, in a subclass) or watching them (a profile function) gets the
Python methods run. ``_streams_fed_natively()`` tells which path ferroloop took.
"""

from __future__ import annotations

import asyncio
import random
import sys
import weakref
from unittest import mock

import ferroloop._ferroloop as native
import pytest
from _net import HOST, run


def fed(loop_name: str) -> int:
    return native._streams_fed_natively() if loop_name == "ferroloop" else 0


async def stream_pair(limit: float = 2**16):
    """A client (reader, writer) connected to a server (reader, writer); and the server."""
    accepted = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(handle, HOST, 0, limit=limit)
    client = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    return server, client, await accepted


async def close_pair(server, client, peer) -> None:
    for _, writer in (client, peer):
        writer.close()
    for _, writer in (client, peer):
        await writer.wait_closed()
    server.close()
    await server.wait_closed()


def test_echo_of_random_sizes_keeps_every_byte(loop, loop_name):
    rng = random.Random(7)
    chunks = [rng.randbytes(rng.choice((1, 100, 1024, 5000, 70000))) for _ in range(60)]

    async def main():
        before = fed(loop_name)
        server, (cr, cw), (sr, sw) = await stream_pair()

        async def echo():
            while data := await sr.read(65536):
                sw.write(data)
                await sw.drain()
            sw.close()

        echoer = asyncio.ensure_future(echo())
        got = bytearray()
        for chunk in chunks:
            cw.write(chunk)
            await cw.drain()
            while len(got) < sum(map(len, chunks[: chunks.index(chunk) + 1])):
                got += await cr.read(65536)
        cw.write_eof()
        assert await cr.read() == b""
        await echoer
        await close_pair(server, (cr, cw), (sr, sw))
        return bytes(got), fed(loop_name) - before

    got, natively = run(loop, main())
    assert got == b"".join(chunks)
    if loop_name == "ferroloop":
        assert natively >= len(chunks)  # each direction reads every chunk, maybe merged


def test_reader_pauses_its_transport_past_twice_the_limit(loop, loop_name):
    async def main():
        before = fed(loop_name)
        server, (cr, cw), (sr, sw) = await stream_pair(limit=1000)
        cw.write(b"x" * 1500)
        await asyncio.sleep(0.05)
        small = (sw.transport.is_reading(), sr._paused)
        cw.write(b"y" * 1500)
        while len(sr._buffer) < 3000:
            await asyncio.sleep(0.01)
        paused = (sw.transport.is_reading(), sr._paused)
        got = await sr.read(5000)
        resumed = (sw.transport.is_reading(), sr._paused)
        await close_pair(server, (cr, cw), (sr, sw))
        return small, paused, got, resumed, fed(loop_name) - before

    small, paused, got, resumed, natively = run(loop, main())
    assert small == (True, False)
    assert paused == (False, True)
    assert got == b"x" * 1500 + b"y" * 1500
    assert resumed == (True, False)
    if loop_name == "ferroloop":
        assert natively >= 2


def test_a_float_limit_is_compared_as_python_compares_it(loop):
    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair(limit=1000.5)
        cw.write(b"x" * 2001)
        while len(sr._buffer) < 2001:
            await asyncio.sleep(0.01)
        first = sr._paused  # 2001 > 2 * 1000.5 is false
        cw.write(b"y")
        while len(sr._buffer) < 2002:
            await asyncio.sleep(0.01)
        second = sr._paused
        await close_pair(server, (cr, cw), (sr, sw))
        return first, second

    assert run(loop, main()) == (False, True)


def test_a_transport_that_cannot_pause_is_forgotten(loop):
    class Unpausable:
        def pause_reading(self):
            raise NotImplementedError

    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair(limit=100)
        sr._transport = Unpausable()
        cw.write(b"x" * 300)
        while len(sr._buffer) < 300:
            await asyncio.sleep(0.01)
        state = (sr._transport, sr._paused)
        await close_pair(server, (cr, cw), (sr, sw))
        return state

    assert run(loop, main()) == (None, False)


def test_a_cancelled_read_leaves_the_data_for_the_next(loop):
    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair()
        reading = asyncio.ensure_future(sr.read(100))
        await asyncio.sleep(0.01)
        waiter = sr._waiter
        reading.cancel()
        # The waiter is cancelled with the task; data then arrives for nobody.
        await asyncio.sleep(0)
        cw.write(b"abc")
        while not sr._buffer:
            await asyncio.sleep(0.01)
        got = await sr.read(100)
        await close_pair(server, (cr, cw), (sr, sw))
        return waiter.cancelled(), reading.cancelled(), got

    assert run(loop, main()) == (True, True, b"abc")


def test_an_exported_buffer_fails_data_received(loop, loop_errors):
    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair()  # noqa: RUF059
        cw.write(b"abc")
        while not sr._buffer:
            await asyncio.sleep(0.01)
        view = memoryview(sr._buffer)  # a bytearray with an export cannot grow
        cw.write(b"def")
        while sr.exception() is None:
            await asyncio.sleep(0.01)
        view.release()
        with pytest.raises(BufferError):
            await sr.read(100)
        assert bytes(sr._buffer) == b"abc"
        sw.close()
        with pytest.raises(BufferError):
            await sw.wait_closed()
        cw.close()
        await cw.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert [c["message"] for c in loop_errors] == [
        "Fatal error: protocol.data_received() call failed."
    ]
    assert isinstance(loop_errors[0]["exception"], BufferError)
    loop_errors.clear()


def _echo_once(loop, loop_name, prepare, calls=None):
    """Connects, lets ``prepare(server_reader, server_protocol)`` replace something, sends
    b"ping" and reads it on the server; returns the data and the natively fed reads. With
    ``calls``, the list is cut back to what it held when the read returned."""

    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair()
        prepare(sr, sw.transport.get_protocol())
        before = fed(loop_name)
        cw.write(b"ping")
        got = await sr.read(100)
        natively = fed(loop_name) - before
        seen = None if calls is None else list(calls)
        await close_pair(server, (cr, cw), (sr, sw))
        if calls is not None:
            calls[:] = seen
        return got, natively

    return run(loop, main())


@pytest.mark.parametrize("where", ["class", "instance"])
@pytest.mark.parametrize(
    "owner, name",
    [
        ("protocol", "data_received"),
        ("reader", "feed_data"),
        ("reader", "_wakeup_waiter"),
    ],
)
def test_replaced_methods_are_called(loop, loop_name, where, owner, name):
    calls = []

    def prepare(reader, protocol):
        obj = reader if owner == "reader" else protocol
        original = getattr(type(obj), name)

        def spy(self, *args):
            calls.append(args)
            return original(self, *args)

        if where == "class":
            patcher = mock.patch.object(type(obj), name, spy)
        else:
            patcher = mock.patch.object(obj, name, spy.__get__(obj))
        patcher.start()
        cleanups.append(patcher.stop)

    cleanups = []
    try:
        got, natively = _echo_once(loop, loop_name, prepare, calls)
    finally:
        for stop in cleanups:
            stop()
    assert got == b"ping"
    assert calls == ([(b"ping",)] if name != "_wakeup_waiter" else [()])
    if name != "_wakeup_waiter":
        # Nothing of the replaced method's caller runs natively past it.
        assert natively == 0


def test_subclasses_run_their_own_methods(loop, loop_name):
    seen = []

    class Reader(asyncio.StreamReader):
        def feed_data(self, data):
            seen.append(data)
            super().feed_data(data.upper())

    async def main():
        before = fed(loop_name)
        accepted = asyncio.get_running_loop().create_future()

        async def handle(r, w):
            accepted.set_result(w)

        server = await asyncio.start_server(handle, HOST, 0)
        reader = Reader()
        transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: asyncio.StreamReaderProtocol(reader),
            *server.sockets[0].getsockname()[:2],
        )
        writer = await accepted
        writer.write(b"hello")
        got = await reader.read(100)
        natively = fed(loop_name) - before
        transport.close()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got, natively

    got, natively = run(loop, main())
    assert (got, seen) == (b"HELLO", [b"hello"])
    assert natively == 0


def test_a_profile_function_sees_feed_data(loop, loop_name):
    events = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name in ("data_received", "feed_data"):
            events.append(frame.f_code.co_name)

    def prepare(reader, protocol):
        sys.setprofile(profile)

    try:
        got, natively = _echo_once(loop, loop_name, prepare)
    finally:
        sys.setprofile(None)
    assert got == b"ping"
    assert events[:2] == ["data_received", "feed_data"]
    assert natively == 0


def test_plain_streams_are_fed_natively(loop, loop_name):
    if loop_name != "ferroloop":
        pytest.skip("ferroloop's own path")
    # Every CPython this supports has the streams code the native path mirrors.
    assert _echo_once(loop, loop_name, lambda reader, protocol: None) == (b"ping", 1)


def test_reads_after_the_reader_is_gone_are_dropped(loop, loop_name):
    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair()
        protocol = sw.transport.get_protocol()
        # As if the reader had been collected: the weak reference answers None.
        protocol._stream_reader_wr = lambda: None
        cw.write(b"lost")
        await asyncio.sleep(0.05)
        left = bytes(sr._buffer)
        protocol._stream_reader_wr = None
        cw.write(b"also lost")
        await asyncio.sleep(0.05)
        left += bytes(sr._buffer)
        await close_pair(server, (cr, cw), (sr, sw))
        return left

    assert run(loop, main()) == b""


def test_a_weakly_referenced_reader_that_died_drops_the_data(loop, loop_name):
    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair()
        protocol = sw.transport.get_protocol()
        dead = asyncio.StreamReader()

        protocol._stream_reader_wr = weakref.ref(dead)
        del dead
        cw.write(b"lost")
        await asyncio.sleep(0.05)
        left = bytes(sr._buffer)
        await close_pair(server, (cr, cw), (sr, sw))
        return left

    assert run(loop, main()) == b""


def test_a_replaced_lookup_runs_once(loop, loop_name):
    # A class-level __getattribute__, or a property where feed_data was: each runs once
    # for the one `reader.feed_data` lookup data_received makes, as in Python.
    looked = []

    def getattribute(self, name):
        if name == "feed_data":
            looked.append("getattribute")
        return object.__getattribute__(self, name)

    def prepare_getattribute(reader, protocol):
        patcher = mock.patch.object(
            asyncio.StreamReader, "__getattribute__", getattribute, create=True
        )
        patcher.start()
        cleanups.append(patcher.stop)

    feed_data = asyncio.StreamReader.feed_data

    def as_property(self):
        looked.append("property")
        return feed_data.__get__(self)

    def prepare_property(reader, protocol):
        patcher = mock.patch.object(asyncio.StreamReader, "feed_data", property(as_property))
        patcher.start()
        cleanups.append(patcher.stop)

    for prepare in (prepare_getattribute, prepare_property):
        cleanups = []
        looked.clear()
        try:
            got, natively = _echo_once(loop, loop_name, prepare, looked)
        finally:
            for stop in cleanups:
                stop()
        assert (got, natively) == (b"ping", 0)
        assert looked == ["getattribute" if prepare is prepare_getattribute else "property"]


def test_the_limit_is_only_multiplied(loop):
    # `2 * self._limit` with a non-int: int * obj falls to obj.__rmul__; nothing asks
    # for its __index__.
    indexed = []

    class Limit:
        def __index__(self):
            indexed.append(1)
            return 10**9

        def __rmul__(self, other):
            return other * 1000

    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair()
        sr._limit = Limit()
        cw.write(b"x" * 2500)
        while len(sr._buffer) < 2500:
            await asyncio.sleep(0.01)
        paused = sr._paused
        sr._limit = 2**16
        await close_pair(server, (cr, cw), (sr, sw))
        return paused

    assert run(loop, main()) is True
    assert indexed == []


def test_the_transport_is_read_again_for_pause_reading(loop):
    # Python reads `self._transport` for the test and again for the call: code that runs
    # in between (here `bool(self._paused)`) decides which transport is paused.
    class Recorder:
        paused = 0

        def pause_reading(self):
            Recorder.paused += 1

    async def main():
        server, (cr, cw), (sr, sw) = await stream_pair(limit=100)
        transport = sr._transport

        class Flag:
            def __bool__(self):
                sr._transport = Recorder()
                return False

        sr._paused = Flag()
        cw.write(b"x" * 300)
        while len(sr._buffer) < 300:
            await asyncio.sleep(0.01)
        state = (type(sr._transport), sr._paused, transport.is_reading())
        sr._transport = transport
        sr._paused = False
        await close_pair(server, (cr, cw), (sr, sw))
        return state

    assert run(loop, main()) == (Recorder, True, True)
    assert Recorder.paused == 1
