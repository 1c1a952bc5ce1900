"""TLS: ssl= on create_connection / create_server / create_unix_*, loop.start_tls,
handshake errors, timeouts and cancellation (asyncio/sslproto.py).

The certificate is self-signed for ``localhost`` and 127.0.0.1, made for the test module
with the ``openssl`` command line tool (the ssl module cannot create certificates).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys

import pytest
from _net import (
    HOST,
    RecordingProtocol,
    listening_socket,
    make_tls_files,
    run,
    stdlib_only_from,
)

# Python 3.10's asyncio.sslproto (replaced in 3.11) closes without eof_received, leaves its
# transport to the collector after a peer's close and reports handshake timeouts
# differently; ferroloop runs the running Python's SSLProtocol, so these follow 3.11+.
sslproto_311 = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10's asyncio.sslproto behaves differently"
)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server_ctx(tls_files):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files["cert"], tls_files["key"])
    return ctx


@pytest.fixture
def client_ctx(tls_files):
    """Trusts the test certificate; hostname checking on (the default)."""
    ctx = ssl.create_default_context(cafile=tls_files["cert"])
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


class ServerSide:
    """Protocol factory keeping the server protocols it made."""

    def __init__(self, cls=RecordingProtocol):
        self.cls = cls
        self.protocols: list = []

    def __call__(self):
        proto = self.cls()
        self.protocols.append(proto)
        return proto

    async def first(self):
        for _ in range(400):
            if self.protocols and self.protocols[0].made.done():
                return self.protocols[0]
            await asyncio.sleep(0.005)
        raise AssertionError("no server connection")


async def finish(*pairs):
    """Close the transports and wait for every connection_lost()."""
    for tr, _ in pairs:
        if not tr.is_closing():
            tr.close()
    for _, proto in pairs:
        await asyncio.wait_for(asyncio.shield(proto.lost), 5)


def test_tls_echo_and_extra_info(loop, server_ctx, client_ctx):
    side = ServerSide()

    async def main():
        server = await loop.create_server(side, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(RecordingProtocol, HOST, port, ssl=client_ctx)
            sp = await side.first()
            try:
                assert proto.events == ["made"]
                assert tr.get_extra_info("sslcontext") is client_ctx
                peercert = tr.get_extra_info("peercert")
                assert dict(x[0] for x in peercert["subject"])["commonName"] == "localhost"
                assert isinstance(tr.get_extra_info("ssl_object"), ssl.SSLObject)
                assert tr.get_extra_info("ssl_object").server_side is False
                assert tr.get_extra_info("cipher") is not None
                assert tr.get_extra_info("peername") == (HOST, port)
                assert tr.get_extra_info("socket").family == socket.AF_INET
                assert not tr.can_write_eof()
                assert sp.transport.get_extra_info("ssl_object").server_side is True
                # No client certificate was asked for.
                assert sp.transport.get_extra_info("peercert") is None
                tr.write(b"secret ")
                tr.writelines([b"message"])
                assert await sp.read_until(14) == b"secret message"
                sp.transport.write(b"encrypted reply")
                assert await proto.read_until(15) == b"encrypted reply"
            finally:
                tr.close()
                sp.transport.close()
                await finish((tr, proto), (sp.transport, sp))
            assert proto.lost.result() is None

    run(loop, main())


@sslproto_311
def test_tls_close_order(loop, server_ctx, client_ctx):
    """The client's close() (close_notify) reaches the server protocol as EOF."""
    side = ServerSide()

    async def main():
        server = await loop.create_server(side, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(RecordingProtocol, HOST, port, ssl=client_ctx)
            sp = await side.first()
            tr.write(b"bye")
            tr.close()
            assert tr.is_closing()
            assert await proto.lost is None
            assert await asyncio.wait_for(sp.lost, 5) is None
            assert bytes(sp.data) == b"bye"
            assert sp.events == ["made", "data", "eof", "lost"]
            # asyncio quirk: once the TLS shutdown completes, the side that called
            # close() gets eof_received() too, before connection_lost().
            assert proto.events == ["made", "eof", "lost"]

    run(loop, main())


def test_tls_write_eof_not_supported(loop, server_ctx, client_ctx):
    side = ServerSide()

    async def main():
        server = await loop.create_server(side, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(RecordingProtocol, HOST, port, ssl=client_ctx)
            sp = await side.first()
            try:
                assert tr.can_write_eof() is False
                with pytest.raises(NotImplementedError):
                    tr.write_eof()
            finally:
                await finish((tr, proto), (sp.transport, sp))

    run(loop, main())


@sslproto_311
def test_tls_large_transfer(loop, server_ctx, client_ctx):
    payload = os.urandom(2 * 1024 * 1024)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    async def main():
        server = await loop.create_server(Echo, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ctx)
            try:
                writer.write(payload)
                received = await reader.readexactly(len(payload))
            finally:
                writer.close()
                await writer.wait_closed()
            return received == payload

    assert run(loop, main(), timeout=30)


def test_tls_streams_echo(loop, server_ctx, client_ctx):
    async def handle(reader, writer):
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "localhost", port, ssl=client_ctx, family=socket.AF_INET
            )
            try:
                writer.write(b"over tls\n")
                assert await reader.readline() == b"OVER TLS\n"
                assert await reader.read() == b""
            finally:
                writer.close()
                await writer.wait_closed()

    run(loop, main())


def test_tls_hostname_mismatch(loop, server_ctx, client_ctx):
    """Hostname checking is on by default: a name the certificate does not cover fails
    the handshake."""
    # In debug mode asyncio also reports the failed accept to the exception handler.
    loop.set_debug(False)

    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await loop.create_connection(
                    asyncio.Protocol, HOST, port, ssl=client_ctx, server_hostname="wrong.example"
                )
            return info.value

    exc = run(loop, main())
    assert "Hostname mismatch" in exc.verify_message


def test_tls_untrusted_certificate(loop, server_ctx):
    """ssl=True: the default context does not trust a self-signed certificate."""
    # In debug mode asyncio also reports the failed accept to the exception handler.
    loop.set_debug(False)

    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await loop.create_connection(asyncio.Protocol, "localhost", port, ssl=True)
            return info.value

    exc = run(loop, main())
    assert exc.verify_code == 18  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT


@sslproto_311
def test_tls_no_hostname_check(loop, server_ctx, client_ctx):
    client_ctx.check_hostname = False

    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(
                RecordingProtocol, HOST, port, ssl=client_ctx, server_hostname="wrong.example"
            )
            await finish((tr, proto))

    run(loop, main())


def test_tls_handshake_timeout(loop, loop_errors):
    """A peer that never answers the ClientHello: ConnectionAbortedError after
    ssl_handshake_timeout (an OSError, so not reported to the exception handler)."""
    ctx = ssl.create_default_context()

    async def main():
        lst = listening_socket()
        try:
            with pytest.raises(ConnectionAbortedError) as info:
                await loop.create_connection(
                    asyncio.Protocol,
                    *lst.getsockname(),
                    ssl=ctx,
                    server_hostname="localhost",
                    ssl_handshake_timeout=0.2,
                )
            return info.value
        finally:
            lst.close()

    exc = run(loop, main())
    assert str(exc) == ("SSL handshake is taking longer than 0.2 seconds: aborting the connection")
    assert loop_errors == []


def test_tls_server_handshake_timeout(loop, server_ctx, loop_errors):
    """A client that connects and sends nothing: the server drops the connection after
    its ssl_handshake_timeout. asyncio calls the protocol factory at accept time, before
    the handshake, but never connection_made()."""
    # In debug mode asyncio also reports the failed accept to the exception handler.
    loop.set_debug(False)
    side = ServerSide()

    async def main():
        server = await loop.create_server(side, HOST, 0, ssl=server_ctx, ssl_handshake_timeout=0.2)
        async with server:
            client = socket.socket()
            try:
                client.setblocking(False)
                await loop.sock_connect(client, server.sockets[0].getsockname())
                data = await asyncio.wait_for(loop.sock_recv(client, 100), 5)
            finally:
                client.close()
        return data

    assert run(loop, main()) == b""
    assert [p.events for p in side.protocols] == [[]]
    assert loop_errors == []


def test_tls_server_handshake_cancelled_keeps_the_descriptor_number_it_frees(
    loop, server_ctx, loop_errors
):
    """Cancelling the server's handshake task: the transport closes the accepted socket
    when its connection is lost, an iteration later. ferroloop also closed it at once,
    so a descriptor made in between got the number, and the transport's clean-up then
    dropped that descriptor's reader."""
    loop.set_debug(False)

    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0, ssl=server_ctx)
        # Never starts the TLS handshake: the server's task waits for it.
        client = socket.create_connection(server.sockets[0].getsockname())
        try:
            for _ in range(200):
                handshakes = [
                    t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_accept_connection2"
                ]
                if handshakes:
                    break
                await asyncio.sleep(0.005)
            assert handshakes
            got = loop.create_future()
            pairs = []

            def watch_a_new_socket():
                a, b = socket.socketpair()
                pairs.append((a, b))
                loop.add_reader(a, lambda: got.done() or got.set_result(a.recv(10)))
                b.send(b"ping")

            for t in handshakes:
                t.cancel()
            loop.call_soon(watch_a_new_socket)
            try:
                return await asyncio.wait_for(got, 5)
            finally:
                for a, b in pairs:
                    loop.remove_reader(a)
                    a.close()
                    b.close()
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    assert run(loop, main()) == b"ping"


def test_tls_cancelled_during_handshake(loop, loop_errors):
    """Cancelled while the handshake is pending: the raw connection is closed; the
    protocol (made by the factory before the handshake) never sees connection_made()."""
    ctx = ssl.create_default_context()
    side = ServerSide()

    async def main():
        lst = listening_socket()
        try:
            task = asyncio.ensure_future(
                loop.create_connection(side, *lst.getsockname(), ssl=ctx, server_hostname="x")
            )
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The raw connection was closed: the listener's accepted socket sees EOF.
            conn, _ = await loop.sock_accept(lst)
            try:
                data = b""
                while chunk := await asyncio.wait_for(loop.sock_recv(conn, 4096), 5):
                    data += chunk
            finally:
                conn.close()
            return data
        finally:
            lst.close()

    data = run(loop, main())
    assert data.startswith(b"\x16\x03")  # the ClientHello, then EOF
    assert [p.events for p in side.protocols] == [[]]
    assert loop_errors == []


def test_tls_plain_client_to_tls_server(loop, server_ctx, loop_errors):
    """Garbage instead of a ClientHello: the server side fails the handshake (an
    ssl.SSLError, an OSError: nothing reported) and closes the connection."""
    # In debug mode asyncio also reports the failed accept to the exception handler.
    loop.set_debug(False)
    side = ServerSide()

    async def main():
        server = await loop.create_server(side, HOST, 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(RecordingProtocol, HOST, port)
            try:
                tr.write(b"GET / HTTP/1.0\r\n\r\n")
                exc = await asyncio.wait_for(proto.lost, 5)
            finally:
                tr.close()
            return exc

    exc = run(loop, main())
    assert exc is None or isinstance(exc, ConnectionResetError)
    assert [p.events for p in side.protocols] == [[]]
    assert loop_errors == []


def test_tls_unix(loop, tmp_path, server_ctx, client_ctx):
    path = str(tmp_path / "tls.sock")
    side = ServerSide()

    async def main():
        server = await loop.create_unix_server(side, path, ssl=server_ctx)
        async with server:
            tr, proto = await loop.create_unix_connection(
                RecordingProtocol, path, ssl=client_ctx, server_hostname="localhost"
            )
            sp = await side.first()
            try:
                tr.write(b"tls over unix")
                assert await sp.read_until(13) == b"tls over unix"
                assert tr.get_extra_info("peercert") is not None
            finally:
                await finish((tr, proto), (sp.transport, sp))

    run(loop, main())


@sslproto_311
def test_tls_shutdown_timeout_accepted(loop, server_ctx, client_ctx):
    async def main():
        server = await loop.create_server(
            asyncio.Protocol,
            HOST,
            0,
            ssl=server_ctx,
            ssl_handshake_timeout=5,
            ssl_shutdown_timeout=5,
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(
                RecordingProtocol,
                HOST,
                port,
                ssl=client_ctx,
                ssl_handshake_timeout=5,
                ssl_shutdown_timeout=5,
            )
            await finish((tr, proto))

    run(loop, main())


def test_tls_shutdown_timeout_ends_an_unanswered_close(loop_name, loop, server_ctx, client_ctx):
    """close() sends close_notify and waits for the peer's; a peer that never answers
    ends the connection with TimeoutError after ssl_shutdown_timeout. ferroloop accepted
    the argument on Python 3.10 but ignored it (3.10's SSLProtocol has no such timer)."""
    stdlib_only_from(loop_name, (3, 11), "ssl_shutdown_timeout")
    import threading
    import time

    listener = socket.create_server((HOST, 0))
    released = threading.Event()

    def peer():
        # Completes the handshake, then reads nothing until released.
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True):
            released.wait(10)

    thread = threading.Thread(target=peer)
    thread.start()

    async def main():
        tr, proto = await loop.create_connection(
            RecordingProtocol,
            *listener.getsockname(),
            ssl=client_ctx,
            server_hostname="localhost",
            ssl_shutdown_timeout=0.3,
        )
        t0 = time.monotonic()
        tr.close()
        exc = await asyncio.wait_for(proto.lost, 5)
        return exc, time.monotonic() - t0

    try:
        exc, elapsed = run(loop, main())
        # (With a socket of the test's own: asyncio leaves one it made unclosed here.)
        with socket.create_connection(listener.getsockname()) as sock:
            with pytest.raises(ValueError, match="ssl_shutdown_timeout should be a positive"):
                run(
                    loop,
                    loop.create_connection(
                        asyncio.Protocol,
                        sock=sock,
                        ssl=client_ctx,
                        server_hostname="localhost",
                        ssl_shutdown_timeout=0,
                    ),
                )
    finally:
        released.set()
        thread.join(10)
        listener.close()
    assert isinstance(exc, TimeoutError) and str(exc) == "SSL shutdown timed out"
    assert 0.2 < elapsed < 3


# ---- start_tls ---------------------------------------------------------------------------------


class StartTLSServer(RecordingProtocol):
    """Plain text until b"STARTTLS\\n": answers b"OK\\n", then upgrades."""

    ctx: ssl.SSLContext

    def __init__(self):
        super().__init__()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.upgrade_task = None

    def data_received(self, data):
        super().data_received(data)
        if bytes(self.data) == b"STARTTLS\n":
            self.transport.write(b"OK\n")
            self.upgrade_task = asyncio.ensure_future(self.upgrade())

    async def upgrade(self):
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(self.transport, self, self.ctx, server_side=True)
        except BaseException as exc:
            self.upgraded.set_exception(exc)
            raise
        self.data.clear()
        self.transport = tls
        self.upgraded.set_result(tls)


def test_start_tls(loop, server_ctx, client_ctx):
    class Server(StartTLSServer):
        ctx = server_ctx

    side = ServerSide(Server)

    async def main():
        server = await loop.create_server(side, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            tr, proto = await loop.create_connection(RecordingProtocol, HOST, port)
            sp = await side.first()
            tls_tr = None
            try:
                tr.write(b"STARTTLS\n")
                assert await proto.read_until(3) == b"OK\n"
                proto.data.clear()
                tls_tr = await loop.start_tls(tr, proto, client_ctx, server_hostname="localhost")
                server_tls = await asyncio.wait_for(sp.upgraded, 5)
                assert tls_tr is not tr
                assert tls_tr.get_protocol() is proto
                assert tls_tr.get_extra_info("peercert") is not None
                assert tls_tr.get_extra_info("sslcontext") is client_ctx
                tls_tr.write(b"now encrypted")
                assert await sp.read_until(13) == b"now encrypted"
                server_tls.write(b"encrypted too")
                assert await proto.read_until(13) == b"encrypted too"
                # No second connection_made() for the upgraded protocol.
                assert proto.events == ["made", "data"]
                tls_tr.close()
                assert await asyncio.wait_for(proto.lost, 5) is None
                assert await asyncio.wait_for(sp.lost, 5) is None
            finally:
                if tls_tr is None:
                    tr.close()
                if sp.transport is not None:
                    sp.transport.close()

    run(loop, main())


def test_start_tls_argument_errors(loop, server_ctx):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        async with server:
            tr, proto = await loop.create_connection(
                RecordingProtocol, *server.sockets[0].getsockname()
            )
            try:
                with pytest.raises(TypeError) as info:
                    await loop.start_tls(tr, proto, "not a context")
                assert str(info.value) == (
                    "sslcontext is expected to be an instance of ssl.SSLContext, "
                    "got 'not a context'"
                )
            finally:
                await finish((tr, proto))
            udp_tr, udp_proto = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(HOST, 0)
            )
            try:
                with pytest.raises(TypeError) as info:
                    await loop.start_tls(udp_tr, udp_proto, server_ctx)
                assert str(info.value) == f"transport {udp_tr!r} is not supported by start_tls()"
            finally:
                udp_tr.close()
                await asyncio.sleep(0)

    run(loop, main())


@sslproto_311
def test_start_tls_handshake_failure(loop, server_ctx, client_ctx):
    """start_tls() against a peer that answers the ClientHello with plain text:
    the handshake fails with an SSLError, the transport is closed and the protocol
    (connected before the upgrade) gets connection_lost() with that same error."""

    async def main():
        lst = listening_socket()
        try:
            tr, proto = await loop.create_connection(RecordingProtocol, *lst.getsockname())
            conn, _ = await loop.sock_accept(lst)
            try:
                task = asyncio.ensure_future(
                    loop.start_tls(tr, proto, client_ctx, server_hostname="localhost")
                )
                await loop.sock_recv(conn, 4096)  # the ClientHello
                await loop.sock_sendall(conn, b"this is not TLS at all\r\n" * 10)
                with pytest.raises(ssl.SSLError) as info:
                    await task
                assert tr.is_closing()
                assert await asyncio.wait_for(proto.lost, 5) is info.value
            finally:
                conn.close()
                tr.close()
        finally:
            lst.close()

    run(loop, main())
