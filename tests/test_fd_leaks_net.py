"""Networking failures and shutdowns leave no file descriptor open: the count of open
fds (/proc/self/fd) is the same before and after a batch of failed, cancelled or
closed connections, servers and endpoints."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import pytest
from _net import HOST, FullBacklog, RecordingProtocol, listening_socket, refused_port, run

N = 20


@pytest.fixture
def fds():
    if not os.path.isdir("/proc/self/fd"):  # pragma: no cover
        pytest.skip("needs /proc/self/fd")
    return FdCounter()


class FdCounter:
    @staticmethod
    def snapshot() -> set[int]:
        return set(map(int, os.listdir("/proc/self/fd")))

    def assert_same(self, before: set[int]) -> None:
        after = self.snapshot()
        leaked = {}
        for fd in sorted(after - before):
            try:
                leaked[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                leaked[fd] = "?"
        assert not leaked, f"file descriptors left open: {leaked}"


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_refused_create_connection(loop, fds):
    port = refused_port()

    async def main():
        for _ in range(N):
            with pytest.raises(ConnectionRefusedError):
                await loop.create_connection(asyncio.Protocol, HOST, port)
        await settle()

    run(loop, main())  # warm up whatever the loop creates lazily
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_create_connection_bind_failure(loop, fds):
    async def main():
        lst = listening_socket()
        try:
            addr = lst.getsockname()
            for _ in range(N):
                with pytest.raises(OSError):
                    await loop.create_connection(asyncio.Protocol, *addr, local_addr=addr)
        finally:
            lst.close()
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_cancelled_create_connection(loop, fds):
    with FullBacklog() as target:

        async def main():
            for _ in range(5):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        loop.create_connection(asyncio.Protocol, *target.address), 0.02
                    )
            await settle()

        run(loop, main())
        before = fds.snapshot()
        run(loop, main())
        fds.assert_same(before)


def test_refused_sock_connect_keeps_only_the_callers_socket(loop, fds):
    port = refused_port()

    async def main():
        for _ in range(N):
            with socket.socket() as s:
                s.setblocking(False)
                with pytest.raises(ConnectionRefusedError):
                    await loop.sock_connect(s, (HOST, port))
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_server_close(loop, fds):
    async def main():
        server = await loop.create_server(RecordingProtocol, HOST, 0)
        pairs = []
        try:
            addr = server.sockets[0].getsockname()
            for _ in range(N):
                pairs.append(await loop.create_connection(RecordingProtocol, *addr))
        finally:
            server.close()
            for tr, _ in pairs:
                tr.close()
            for _, proto in pairs:
                await proto.lost
            # From 3.12.1 wait_closed() also waits for the server's connections to end.
            await server.wait_closed()
        await asyncio.sleep(0.01)
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_server_bind_failure(loop, fds):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            for _ in range(N):
                with pytest.raises(OSError):
                    # The second address binds, the first cannot: nothing may stay open.
                    await loop.create_server(asyncio.Protocol, ["::1", HOST], port)
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_unix_server_close(loop, fds, tmp_path):
    path = str(tmp_path / "leak.sock")

    async def main():
        server = await loop.create_unix_server(RecordingProtocol, path)
        async with server:
            for _ in range(5):
                tr, proto = await loop.create_unix_connection(RecordingProtocol, path)
                tr.close()
                await proto.lost
        await asyncio.sleep(0.01)
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_datagram_endpoints(loop, fds):
    async def main():
        for _ in range(N):
            tr, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(HOST, 0)
            )
            tr.close()
        taken, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(HOST, 0)
        )
        try:
            for _ in range(N):
                with pytest.raises(OSError):
                    await loop.create_datagram_endpoint(
                        asyncio.DatagramProtocol, local_addr=taken.get_extra_info("sockname")
                    )
        finally:
            taken.close()
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_tls_handshake_failures(loop, fds):
    """Handshakes that fail (a peer that is not TLS) and handshakes that time out."""
    ctx = ssl.create_default_context()

    async def main():
        lst = listening_socket()
        try:
            for _ in range(5):
                with pytest.raises(ConnectionAbortedError):
                    await loop.create_connection(
                        asyncio.Protocol,
                        *lst.getsockname(),
                        ssl=ctx,
                        server_hostname="x",
                        ssl_handshake_timeout=0.01,
                    )
                conn, _ = await loop.sock_accept(lst)
                conn.close()
        finally:
            lst.close()
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)


def test_streams_close(loop, fds):
    async def handle(reader, writer):
        writer.write(await reader.read())
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, HOST, 0)
        async with server:
            for _ in range(10):
                reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
                writer.write(b"x")
                writer.write_eof()
                assert await reader.read() == b"x"
                writer.close()
                await writer.wait_closed()
        await asyncio.sleep(0.01)
        await settle()

    run(loop, main())
    before = fds.snapshot()
    run(loop, main())
    fds.assert_same(before)
