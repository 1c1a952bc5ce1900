"""Helpers shared by the networking test modules (test_dns, test_sock, test_tcp, test_unix,
test_udp, test_tls, test_sendfile, test_fd_leaks_net).

Only loopback and Unix sockets are used. Every coroutine a test runs is bounded by
``run()``'s timeout, so a hang fails the test instead of eating the per-test budget.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import subprocess
import sys

import pytest
from _util import reraise_not_implemented

PY313 = sys.version_info >= (3, 13)

HOST = "127.0.0.1"


def run(loop, coro, timeout: float = 10.0):
    """Run ``coro`` to completion on ``loop``, failing after ``timeout`` seconds."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def stdlib_only_from(loop_name: str, version: tuple[int, int], what: str) -> None:
    """Skip on stdlib asyncio older than ``version``: ``what`` does not exist there, so
    the test checks ferroloop against the newer asyncio's documented behaviour."""
    if loop_name == "asyncio" and sys.version_info < version:
        pytest.skip(f"ferroloop-only on this Python: {what} is new in asyncio {version}")


def listening_socket(family=socket.AF_INET, backlog: int = 100) -> socket.socket:
    """A non-blocking listening TCP socket on loopback."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(("::1" if family == socket.AF_INET6 else HOST, 0))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def refused_port() -> int:
    """A loopback TCP port nothing listens on (bound then closed: connecting to it is
    refused)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class RecordingProtocol(asyncio.Protocol):
    """Records every protocol callback in ``events``; ``made``/``lost`` are futures set
    by connection_made/connection_lost (``lost``'s result is the exception argument),
    ``eof`` is set by eof_received."""

    eof_result = None

    def __init__(self, loop=None):
        loop = loop or asyncio.get_running_loop()
        self.events: list = []
        self.data = bytearray()
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.eof = loop.create_future()
        self.data_event = asyncio.Event()

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data):
        assert isinstance(data, bytes), type(data)
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += data
        self.data_event.set()

    def eof_received(self):
        self.events.append("eof")
        self.eof.set_result(None)
        return self.eof_result

    def pause_writing(self):
        self.events.append("pause_writing")

    def resume_writing(self):
        self.events.append("resume_writing")

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)

    async def read_until(self, n: int) -> bytes:
        while len(self.data) < n:
            self.data_event.clear()
            await self.data_event.wait()
        return bytes(self.data)


# ---- TLS ------------------------------------------------------------------------------


def make_tls_files(directory) -> dict[str, str]:
    """A self-signed certificate for ``localhost`` / 127.0.0.1 (also the CA to trust),
    made with the ``openssl`` command line tool (the ssl module cannot create one)."""
    openssl = shutil.which("openssl")
    if openssl is None:  # pragma: no cover
        pytest.skip("the openssl command line tool is needed to create a test certificate")
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return {"cert": cert, "key": key}


class FullBacklog:
    """A loopback listener whose accept queue is full and never drained: a new connect
    to ``address`` stays in progress (its SYN is dropped), which makes a pending
    connect to cancel or time out. Use as a context manager."""

    def __init__(self):
        self.listener = socket.socket()
        self.fillers: list[socket.socket] = []
        try:
            self.listener.bind((HOST, 0))
            self.listener.listen(0)
            self.address = self.listener.getsockname()
            for _ in range(32):
                probe = socket.socket()
                self.fillers.append(probe)
                probe.setblocking(False)
                probe.connect_ex(self.address)
                if not select.select([], [probe], [], 0.1)[1]:
                    break
            else:  # pragma: no cover
                pytest.skip("could not fill a listener's accept queue")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def assert_pending(*futures) -> None:
    """Assert that each future is still pending; one that already failed with a ferroloop
    placeholder's NotImplementedError re-raises it (the test becomes an xfail)."""
    for fut in futures:
        if fut.done() and not fut.cancelled() and fut.exception() is not None:
            reraise_not_implemented(fut.exception())
        assert not fut.done(), fut
