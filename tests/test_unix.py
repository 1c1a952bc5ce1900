"""Unix stream sockets: loop.create_unix_server / create_unix_connection and the unix
streams (asyncio/unix_events.py)."""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import socket
import sys
import uuid

import pytest
from _net import PY313, RecordingProtocol, run, stdlib_only_from


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "test.sock")


async def connect_and_close(loop, path):
    tr, proto = await loop.create_unix_connection(RecordingProtocol, path)
    tr.close()
    await proto.lost


def test_unix_echo_and_extra_info(loop, sock_path):
    server_protos = []

    def factory():
        proto = RecordingProtocol()
        server_protos.append(proto)
        return proto

    async def main():
        server = await loop.create_unix_server(factory, sock_path)
        async with server:
            assert server.sockets[0].family == socket.AF_UNIX
            assert server.sockets[0].getsockname() == sock_path
            tr, proto = await loop.create_unix_connection(RecordingProtocol, sock_path)
            try:
                assert proto.events == ["made"]
                assert tr.get_extra_info("peername") == sock_path
                # The client socket is unnamed.
                assert tr.get_extra_info("sockname") == ""
                assert tr.get_extra_info("socket").family == socket.AF_UNIX
                assert tr.can_write_eof()
                tr.write(b"over unix")
                tr.write_eof()
                while not server_protos or not server_protos[0].eof.done():
                    await asyncio.sleep(0.005)
                sp = server_protos[0]
                assert bytes(sp.data) == b"over unix"
                assert sp.transport.get_extra_info("sockname") == sock_path
                assert sp.transport.get_extra_info("peername") == ""
                assert await sp.lost is None
                assert sp.events == ["made", "data", "eof", "lost"]
                assert await proto.lost is None
                assert proto.events == ["made", "eof", "lost"]
            finally:
                tr.close()

    run(loop, main())


def test_unix_pathlike(loop, tmp_path):
    path = tmp_path / "pathlike.sock"

    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, path)
        async with server:
            assert isinstance(path, pathlib.Path)
            await connect_and_close(loop, path)

    run(loop, main())


def test_unix_stale_socket_file_is_replaced(loop, sock_path):
    """A socket file left behind by a dead server is removed before binding."""
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    assert os.path.exists(sock_path)

    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, sock_path)
        async with server:
            await connect_and_close(loop, sock_path)

    run(loop, main())


def test_unix_live_socket_file_is_replaced_too(loop, sock_path):
    """asyncio removes any socket file at the path, even one a live server listens on:
    the second server takes the path over; the first keeps its (unlinked) socket."""
    first_protos = []
    second_protos = []

    def first():
        first_protos.append(1)
        return asyncio.Protocol()

    def second():
        second_protos.append(1)
        return asyncio.Protocol()

    async def main():
        s1 = await loop.create_unix_server(first, sock_path)
        async with s1:
            ino1 = os.stat(sock_path).st_ino
            s2 = await loop.create_unix_server(second, sock_path)
            async with s2:
                assert os.stat(sock_path).st_ino != ino1
                await connect_and_close(loop, sock_path)
                for _ in range(20):
                    if second_protos:
                        break
                    await asyncio.sleep(0.005)

    run(loop, main())
    assert second_protos == [1]
    assert first_protos == []


def test_unix_regular_file_in_the_way(loop, sock_path):
    with open(sock_path, "w"):
        pass
    with pytest.raises(OSError) as info:
        run(loop, loop.create_unix_server(asyncio.Protocol, sock_path))
    assert type(info.value) is OSError
    assert info.value.errno == errno.EADDRINUSE
    assert info.value.strerror == f"Address {sock_path!r} is already in use"
    assert os.path.isfile(sock_path)  # left alone


def test_unix_server_missing_directory(loop, tmp_path):
    with pytest.raises(FileNotFoundError):
        run(loop, loop.create_unix_server(asyncio.Protocol, str(tmp_path / "no" / "s.sock")))


def test_unix_connection_missing_path(loop, sock_path):
    with pytest.raises(FileNotFoundError):
        run(loop, loop.create_unix_connection(asyncio.Protocol, sock_path))


def test_unix_connection_refused(loop, sock_path):
    """Nothing listens on a socket file: a Unix connect fails at once, with the plain
    OS message (no "Connect call failed")."""
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock_path)
    dead.close()
    with pytest.raises(ConnectionRefusedError) as info:
        run(loop, loop.create_unix_connection(asyncio.Protocol, sock_path))
    assert info.value.errno == errno.ECONNREFUSED
    assert info.value.strerror == os.strerror(errno.ECONNREFUSED)


def test_unix_server_close_socket_file_default(loop, sock_path):
    """Up to asyncio 3.12 the socket file stays after the server is closed; from 3.13
    (cleanup_socket defaults to True) it is removed."""

    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, sock_path)
        async with server:
            assert os.path.exists(sock_path)

    run(loop, main())
    assert os.path.exists(sock_path) is (not PY313)


@pytest.mark.parametrize("cleanup", [True, False])
def test_unix_server_cleanup_socket(loop, loop_name, sock_path, cleanup):
    """cleanup_socket= (asyncio 3.13+): True removes the socket file on close."""
    stdlib_only_from(loop_name, (3, 13), "create_unix_server(cleanup_socket=)")

    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, sock_path, cleanup_socket=cleanup)
        async with server:
            await connect_and_close(loop, sock_path)

    run(loop, main())
    assert os.path.exists(sock_path) is (not cleanup)


def test_unix_server_cleanup_spares_replaced_file(loop, loop_name, sock_path):
    """cleanup_socket (asyncio 3.13+) removes the file only if it is still the one the
    server bound (same inode)."""
    stdlib_only_from(loop_name, (3, 13), "create_unix_server(cleanup_socket=)")

    async def main():
        s1 = await loop.create_unix_server(asyncio.Protocol, sock_path, cleanup_socket=True)
        s2 = await loop.create_unix_server(asyncio.Protocol, sock_path, cleanup_socket=True)
        async with s2:
            s1.close()
            await s1.wait_closed()
            assert os.path.exists(sock_path)
        assert not os.path.exists(sock_path)

    run(loop, main())


def test_unix_abstract_namespace(loop):
    if not sys.platform.startswith("linux"):  # pragma: no cover
        pytest.skip("abstract Unix sockets are Linux-only")
    name = f"\0ferroloop-test-{uuid.uuid4().hex}"

    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, name)
        async with server:
            assert server.sockets[0].getsockname() == name.encode()
            tr, proto = await loop.create_unix_connection(RecordingProtocol, name)
            try:
                return tr.get_extra_info("peername")
            finally:
                tr.close()
                await proto.lost

    assert run(loop, main()) == name.encode()


def test_unix_server_sock(loop, sock_path):
    async def main():
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(sock_path)
            server = await loop.create_unix_server(asyncio.Protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        async with server:
            assert server.is_serving()
            await connect_and_close(loop, sock_path)
        return sock

    assert run(loop, main()).fileno() == -1


def test_unix_connection_sock(loop, sock_path):
    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, sock_path)
        async with server:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(sock_path)
                tr, proto = await loop.create_unix_connection(RecordingProtocol, sock=sock)
            except BaseException:
                sock.close()
                raise
            tr.close()
            await proto.lost
            return sock

    assert run(loop, main()).fileno() == -1


def test_unix_start_serving_false(loop, sock_path):
    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, sock_path, start_serving=False)
        async with server:
            assert not server.is_serving()
            with pytest.raises(ConnectionRefusedError):
                await loop.create_unix_connection(asyncio.Protocol, sock_path)
            await server.start_serving()
            await connect_and_close(loop, sock_path)

    run(loop, main())


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"ssl": True}, TypeError, "ssl argument must be an SSLContext or None"),
        (
            {"ssl_handshake_timeout": 1},
            ValueError,
            "ssl_handshake_timeout is only meaningful with ssl",
        ),
        ({}, ValueError, "path was not specified, and no sock specified"),
    ],
)
def test_unix_server_argument_errors(loop, sock_path, kwargs, exc, message):
    kwargs = dict(kwargs)
    if kwargs.get("ssl") is True:
        kwargs["path"] = sock_path
    with pytest.raises(exc) as info:
        run(loop, loop.create_unix_server(asyncio.Protocol, **kwargs))
    assert str(info.value) == message


def test_unix_server_path_and_sock(loop, sock_path):
    with socket.socket(socket.AF_UNIX) as sock:
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_unix_server(asyncio.Protocol, sock_path, sock=sock))
        assert str(info.value) == "path and sock can not be specified at the same time"


@pytest.mark.parametrize("family", ["inet", "unix-dgram"])
def test_unix_wrong_socket_kind(loop, family):
    if family == "inet":
        sock = socket.socket()
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        expected = f"A UNIX Domain Stream Socket was expected, got {sock!r}"
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_unix_server(asyncio.Protocol, sock=sock))
        assert str(info.value) == expected
        with pytest.raises(ValueError) as info:
            run(loop, loop.create_unix_connection(asyncio.Protocol, sock=sock))
        assert str(info.value) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"server_hostname": "x"}, "server_hostname is only meaningful with ssl"),
        ({"ssl_handshake_timeout": 1}, "ssl_handshake_timeout is only meaningful with ssl"),
        ({"ssl_shutdown_timeout": 1}, "ssl_shutdown_timeout is only meaningful with ssl"),
        ({"ssl": True}, "you have to pass server_hostname when using ssl"),
    ],
)
def test_unix_connection_argument_errors(loop, sock_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        run(loop, loop.create_unix_connection(asyncio.Protocol, sock_path, **kwargs))
    assert str(info.value) == message


def test_unix_connection_no_path_no_sock(loop):
    with pytest.raises(ValueError) as info:
        run(loop, loop.create_unix_connection(asyncio.Protocol))
    assert str(info.value) == "no path and sock were specified"


def test_unix_streams_echo(loop, sock_path):
    async def handle(reader, writer):
        data = await reader.read()
        writer.write(data[::-1])
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_unix_server(handle, sock_path)
        async with server:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            try:
                payload = os.urandom(200_000)
                writer.write(payload)
                writer.write_eof()
                await writer.drain()
                assert await reader.read() == payload[::-1]
            finally:
                writer.close()
                await writer.wait_closed()

    run(loop, main())


def test_unix_many_connections(loop, sock_path):
    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    async def client(i):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        try:
            writer.write(f"message {i}".encode())
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async def main():
        server = await loop.create_unix_server(Echo, sock_path)
        async with server:
            return await asyncio.gather(*(client(i) for i in range(50)))

    assert run(loop, main()) == [f"message {i}".encode() for i in range(50)]
