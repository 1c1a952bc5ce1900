"""A full socket send buffer (EAGAIN) on datagram transports. Loopback never fills a UDP
socket's send buffer, so a small LD_PRELOAD library (built here with the C compiler)
makes every other send on marked sockets fail with EAGAIN; the program runs in a child
process on each loop."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

# Sockets with SO_PRIORITY 6 (settable without privileges) are the marked ones.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>

static unsigned long calls;

static int refused(int fd) {
    int prio = 0;
    socklen_t len = sizeof prio;
    if (getsockopt(fd, SOL_SOCKET, SO_PRIORITY, &prio, &len) != 0 || prio != 6)
        return 0;
    return ++calls % 2 == 0;
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags,
               const struct sockaddr *addr, socklen_t alen) {
    static ssize_t (*real)(int, const void *, size_t, int, const struct sockaddr *,
                           socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "sendto");
    if (refused(fd)) { errno = EAGAIN; return -1; }
    return real(fd, buf, n, flags, addr, alen);
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    static ssize_t (*real)(int, const void *, size_t, int);
    if (!real) real = dlsym(RTLD_NEXT, "send");
    if (refused(fd)) { errno = EAGAIN; return -1; }
    return real(fd, buf, n, flags);
}

int sendmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags) {
    static int (*real)(int, struct mmsghdr *, unsigned int, int);
    if (!real) real = dlsym(RTLD_NEXT, "sendmmsg");
    unsigned int ok = 0;
    while (ok < n && !refused(fd)) ok++;
    if (ok == 0) { errno = EAGAIN; return -1; }
    return real(fd, msgs, ok, flags);
}
"""

PROGRAM = textwrap.dedent(
    """
    import asyncio, socket, sys

    if sys.argv[1] == "ferroloop":
        import ferroloop
        loop = ferroloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()

    class Replier(asyncio.DatagramProtocol):
        def __init__(self):
            self.errors, self.flow = [], []

        def connection_made(self, transport):
            self.transport = transport
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 6)

        def datagram_received(self, data, addr):
            for i in range(6):
                self.transport.sendto(b"dr%d" % i, addr)
            asyncio.get_running_loop().call_soon(self.later, addr)

        def later(self, addr):
            for i in range(6):
                self.transport.sendto(bytearray(b"cs%d" % i), addr)

        def error_received(self, exc):
            self.errors.append(repr(exc))

        def pause_writing(self):
            self.flow.append("pause")

        def resume_writing(self):
            self.flow.append("resume")

    async def main():
        tr, proto = await loop.create_datagram_endpoint(Replier, local_addr=("127.0.0.1", 0))
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        peer.sendto(b"go", tr.get_extra_info("sockname"))
        got = []
        for _ in range(500):
            await asyncio.sleep(0.01)
            try:
                while True:
                    got.append(peer.recv(100))
            except BlockingIOError:
                pass
            if len(got) >= 12 and tr.get_write_buffer_size() == 0:
                break
        size = tr.get_write_buffer_size()
        tr.close()
        peer.close()
        return got, proto.errors, size

    got, errors, size = loop.run_until_complete(main())
    loop.close()
    print(repr((got, errors, size)))
    """
)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the EAGAIN shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    out = d / "shim.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(d / "shim.c"), "-ldl"], check=True
    )
    return out


def test_full_send_buffer_buffers_datagrams_in_order(loop_name, shim, tmp_path):
    # Every other send fails with EAGAIN: the transport must buffer those datagrams and
    # send them when the socket is writable, in order, and never report them to
    # error_received (on Python 3.10/3.11 ferroloop once took a native send's EAGAIN for
    # another OSError). Six replies come from datagram_received (deferred to the end of
    # the read batch on ferroloop), six from a later callback.
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    env = {"LD_PRELOAD": str(shim), "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    r = subprocess.run(
        [sys.executable, str(script), loop_name],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    got, errors, size = eval(r.stdout.strip().splitlines()[-1])
    want = [b"dr%d" % i for i in range(6)] + [b"cs%d" % i for i in range(6)]
    assert got == want
    assert errors == []
    assert size == 0
