"""loop.sendfile(transport, file, offset, count, fallback=): os.sendfile() on plain
socket transports, the read-and-write fallback for other files and for TLS
(asyncio/base_events.py sendfile, selector_events.py _sendfile_native)."""

from __future__ import annotations

import asyncio
import io
import random
import socket
import ssl

import pytest
from _net import HOST, RecordingProtocol, make_tls_files, run

SIZE = 1024 * 1024 + 123


@pytest.fixture
def data_file(tmp_path):
    data = random.Random(6).randbytes(SIZE)
    path = tmp_path / "sendfile.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


class Conn:
    pass


async def open_conn(loop, *, server_ssl=None, client_ssl=None, unix_path=None, small=False):
    c = Conn()
    protos = []

    def factory():
        proto = RecordingProtocol()
        protos.append(proto)
        return proto

    if unix_path is not None:
        c.server = await loop.create_unix_server(factory, unix_path)
        c.tr, c.proto = await loop.create_unix_connection(RecordingProtocol, unix_path)
    elif small:
        # Small kernel buffers (accepted sockets inherit the listener's SO_RCVBUF), so
        # that a peer that does not read makes the sender wait.
        lst = socket.socket()
        try:
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            lst.bind((HOST, 0))
            c.server = await loop.create_server(factory, sock=lst)
        except BaseException:
            lst.close()
            raise
        c.tr, c.proto = await loop.create_connection(RecordingProtocol, *lst.getsockname())
        c.tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    else:
        c.server = await loop.create_server(factory, HOST, 0, ssl=server_ssl)
        addr = c.server.sockets[0].getsockname()
        kwargs = {"ssl": client_ssl, "server_hostname": "localhost"} if client_ssl else {}
        c.tr, c.proto = await loop.create_connection(RecordingProtocol, *addr, **kwargs)
    for _ in range(400):
        if protos and protos[0].made.done():
            break
        await asyncio.sleep(0.005)
    c.peer = protos[0]
    return c


async def close_conn(c):
    for tr, proto in ((c.tr, c.proto), (c.peer.transport, c.peer)):
        if not proto.lost.done():
            tr.close()
    for proto in (c.proto, c.peer):
        await asyncio.wait_for(asyncio.shield(proto.lost), 5)
    c.server.close()
    await c.server.wait_closed()


def test_sendfile_regular_file(loop, data_file):
    f, data = data_file

    async def main():
        c = await open_conn(loop)
        try:
            sent = await loop.sendfile(c.tr, f)
            received = await c.peer.read_until(len(data))
            return sent, received
        finally:
            await close_conn(c)

    sent, received = run(loop, main())
    assert sent == len(data)
    assert received == data
    assert f.tell() == len(data)


def test_sendfile_offset_count(loop, data_file):
    f, data = data_file

    async def main():
        c = await open_conn(loop)
        try:
            sent = await loop.sendfile(c.tr, f, 1000, 5000)
            received = await c.peer.read_until(5000)
            return sent, received
        finally:
            await close_conn(c)

    sent, received = run(loop, main())
    assert (sent, received) == (5000, data[1000:6000])
    assert f.tell() == 6000


def test_sendfile_offset_only(loop, data_file):
    f, data = data_file

    async def main():
        c = await open_conn(loop)
        try:
            sent = await loop.sendfile(c.tr, f, SIZE - 10)
            received = await c.peer.read_until(10)
            return sent, received
        finally:
            await close_conn(c)

    assert run(loop, main()) == (10, data[-10:])


def test_sendfile_then_write_and_read(loop, data_file):
    """The transport is usable afterwards: writes follow the file's bytes, reading
    resumes."""
    f, data = data_file

    async def main():
        c = await open_conn(loop)
        try:
            c.tr.write(b"header|")
            await loop.sendfile(c.tr, f, 0, 100)
            c.tr.write(b"|trailer")
            received = await c.peer.read_until(115)
            assert c.tr.is_reading()
            c.peer.transport.write(b"answer")
            assert await c.proto.read_until(6) == b"answer"
            return received
        finally:
            await close_conn(c)

    assert run(loop, main()) == b"header|" + data[:100] + b"|trailer"


def test_write_during_sendfile_refused(loop, data_file):
    f, _ = data_file

    async def main():
        c = await open_conn(loop, small=True)
        try:
            c.peer.transport.pause_reading()
            task = asyncio.ensure_future(loop.sendfile(c.tr, f))
            for _ in range(20):
                await asyncio.sleep(0.005)
            if task.done():
                task.result()
                pytest.skip("the kernel took the whole file at once")
            with pytest.raises(RuntimeError) as info:
                c.tr.write(b"x")
            assert str(info.value) == "unable to write; sendfile is in progress"
            c.peer.transport.resume_reading()
            assert await task == SIZE
            await c.peer.read_until(SIZE)
        finally:
            await close_conn(c)

    run(loop, main(), timeout=30)


def test_sendfile_fallback_bytesio(loop):
    data = b"not a real file " * 5000

    async def main():
        c = await open_conn(loop)
        try:
            f = io.BytesIO(data)
            sent = await loop.sendfile(c.tr, f)
            received = await c.peer.read_until(len(data))
            return sent, received, f.tell()
        finally:
            await close_conn(c)

    assert run(loop, main()) == (len(data), data, len(data))


def test_sendfile_fallback_offset_count(loop):
    data = bytes(range(256)) * 1000

    async def main():
        c = await open_conn(loop)
        try:
            f = io.BytesIO(data)
            sent = await loop.sendfile(c.tr, f, 300, 70000)
            received = await c.peer.read_until(70000)
            return sent, received, f.tell()
        finally:
            await close_conn(c)

    assert run(loop, main()) == (70000, data[300:70300], 70300)


def test_sendfile_fallback_cancelled_leaves_the_file_after_what_was_written(loop):
    """Cancelled while waiting for the peer, the fallback leaves the file position after
    the last chunk it wrote, so a transfer can resume from file.tell(). ferroloop wrote a
    chunk before waiting and did not count it when the wait was cancelled: the position
    was 16 KiB short of the bytes the peer got."""
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB: far more than the sockets hold

    async def main():
        c = await open_conn(loop, small=True)
        try:
            c.peer.transport.pause_reading()
            f = io.BytesIO(data)
            task = asyncio.ensure_future(loop.sendfile(c.tr, f))
            await asyncio.sleep(0.2)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            c.peer.transport.resume_reading()
            # Whatever was written goes out: wait until nothing more arrives.
            quiet = 0
            while quiet < 5:
                before = len(c.peer.data)
                await asyncio.sleep(0.02)
                quiet = quiet + 1 if len(c.peer.data) == before else 0
            return f.tell(), bytes(c.peer.data)
        finally:
            await close_conn(c)

    position, received = run(loop, main())
    assert 0 < position < len(data)
    assert len(received) == position
    assert received == data[:position]


def test_sendfile_no_fallback_for_non_regular_file(loop):
    async def main():
        c = await open_conn(loop)
        try:
            with pytest.raises(asyncio.SendfileNotAvailableError) as info:
                await loop.sendfile(c.tr, io.BytesIO(b"data"), fallback=False)
            return str(info.value)
        finally:
            await close_conn(c)

    assert run(loop, main()) == "not a regular file"


def test_sendfile_bad_count(loop, data_file):
    """On a plain socket transport the parameters are checked by sock_sendfile()."""
    f, _ = data_file

    async def main():
        c = await open_conn(loop)
        try:
            with pytest.raises(ValueError) as info:
                await loop.sendfile(c.tr, f, 0, 0)
            return str(info.value)
        finally:
            await close_conn(c)

    assert run(loop, main()) == "count must be a positive integer (got 0)"


def test_sendfile_closing_transport(loop, data_file):
    f, _ = data_file

    async def main():
        c = await open_conn(loop)
        try:
            c.tr.close()
            with pytest.raises(RuntimeError) as info:
                await loop.sendfile(c.tr, f)
            return str(info.value)
        finally:
            await close_conn(c)

    assert run(loop, main()) == "Transport is closing"


def test_sendfile_datagram_transport_unsupported(loop, data_file):
    f, _ = data_file

    async def main():
        tr, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(HOST, 0))
        try:
            with pytest.raises(RuntimeError) as info:
                await loop.sendfile(tr, f)
            return str(info.value), f"sendfile is not supported for transport {tr!r}"
        finally:
            tr.close()
            await asyncio.sleep(0)

    message, expected = run(loop, main())
    assert message == expected


def test_sendfile_unix(loop, data_file, tmp_path):
    f, data = data_file

    async def main():
        c = await open_conn(loop, unix_path=str(tmp_path / "sf.sock"))
        try:
            sent = await loop.sendfile(c.tr, f)
            return sent, await c.peer.read_until(len(data))
        finally:
            await close_conn(c)

    assert run(loop, main()) == (len(data), data)


# ---- TLS: always the fallback -------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory):
    files = make_tls_files(tmp_path_factory.mktemp("sendfile-tls"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files["cert"], files["key"])
    client = ssl.create_default_context(cafile=files["cert"])
    return server, client


def test_sendfile_tls_fallback(loop, data_file, tls_contexts):
    f, data = data_file
    server_ctx, client_ctx = tls_contexts

    async def main():
        c = await open_conn(loop, server_ssl=server_ctx, client_ssl=client_ctx)
        try:
            sent = await loop.sendfile(c.tr, f, 10, 300_000)
            return sent, await c.peer.read_until(300_000)
        finally:
            await close_conn(c)

    sent, received = run(loop, main(), timeout=30)
    assert sent == 300_000
    assert received == data[10:300_010]
    assert f.tell() == 300_010


def test_sendfile_tls_no_fallback(loop, data_file, tls_contexts):
    f, _ = data_file
    server_ctx, client_ctx = tls_contexts

    async def main():
        c = await open_conn(loop, server_ssl=server_ctx, client_ssl=client_ctx)
        try:
            with pytest.raises(RuntimeError) as info:
                await loop.sendfile(c.tr, f, fallback=False)
            expected = (
                f"fallback is disabled and native sendfile is not supported for transport {c.tr!r}"
            )
            return str(info.value), expected
        finally:
            await close_conn(c)

    message, expected = run(loop, main())
    assert message == expected
