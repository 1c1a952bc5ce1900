"""loop.getaddrinfo() / loop.getnameinfo(): the results and errors of socket.getaddrinfo()
and socket.getnameinfo() (asyncio runs those in the default executor), unchanged.

No name here needs the network: numeric hosts, ``localhost`` (from /etc/hosts) and a name
under the reserved ``.invalid`` TLD, which cannot resolve.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from _net import run
from _util import reraise_not_implemented

UNRESOLVABLE = "ferroloop-test.invalid"


def sync_outcome(func, *args, **kwargs):
    try:
        return ("ok", func(*args, **kwargs))
    except Exception as exc:
        return ("error", type(exc), exc.args)


async def async_outcome(make_coro):
    try:
        return ("ok", await make_coro())
    except Exception as exc:
        reraise_not_implemented(exc)
        return ("error", type(exc), exc.args)


GETADDRINFO_CASES = [
    pytest.param(("127.0.0.1", 80), {}, id="ipv4"),
    pytest.param(("::1", 80), {}, id="ipv6"),
    pytest.param(("localhost", 80), {}, id="localhost"),
    pytest.param(("localhost", 80), {"family": socket.AF_INET}, id="family"),
    pytest.param(("localhost", 80), {"type": socket.SOCK_STREAM}, id="type-stream"),
    pytest.param(("127.0.0.1", 53), {"type": socket.SOCK_DGRAM}, id="type-dgram"),
    pytest.param(("127.0.0.1", 80), {"proto": socket.IPPROTO_TCP}, id="proto"),
    pytest.param(
        ("127.0.0.1", 80),
        {"family": socket.AF_INET, "type": socket.SOCK_STREAM, "proto": socket.IPPROTO_TCP},
        id="all-filters",
    ),
    pytest.param(("localhost", 80), {"flags": socket.AI_CANONNAME}, id="canonname"),
    pytest.param((None, 80), {"flags": socket.AI_PASSIVE}, id="passive-none-host"),
    pytest.param((None, 80), {}, id="none-host"),
    pytest.param(("127.0.0.1", "80"), {}, id="port-str"),
    pytest.param(("127.0.0.1", None), {}, id="port-none"),
    pytest.param(("127.0.0.1", "http"), {}, id="port-service-name"),
    pytest.param(("127.0.0.1", 0), {}, id="port-zero"),
    pytest.param((b"127.0.0.1", b"80"), {}, id="bytes"),
    # glibc truncates the port modulo 2**16; socket.getaddrinfo passes it on unchecked.
    pytest.param(("127.0.0.1", 70000), {}, id="port-above-65535"),
    pytest.param(("127.0.0.1", 80), {"flags": socket.AI_NUMERICHOST}, id="numerichost"),
    pytest.param(("127.0.0.1", 80), {"flags": socket.AI_NUMERICSERV}, id="numericserv"),
]

GETADDRINFO_ERRORS = [
    pytest.param((UNRESOLVABLE, 80), {}, id="unresolvable"),
    pytest.param(("localhost", 80), {"flags": socket.AI_NUMERICHOST}, id="numerichost-name"),
    pytest.param(("127.0.0.1", "http"), {"flags": socket.AI_NUMERICSERV}, id="numericserv-name"),
    pytest.param(("127.0.0.1", 80), {"family": socket.AF_INET6}, id="family-mismatch"),
    pytest.param(("127.0.0.1", "no-such-service"), {}, id="unknown-service"),
    pytest.param(("127.0.0.1", -1), {}, id="negative-port"),
    pytest.param(("127.0.0.1", 1.5), {}, id="float-port"),
    pytest.param((123, 80), {}, id="int-host"),
    pytest.param((None, None), {}, id="no-host-no-port"),
    pytest.param(("", 80), {}, id="empty-host"),
    pytest.param(("127.0.0.1", 80), {"type": 99}, id="bad-type"),
    pytest.param(("127.0.0.1", 80), {"family": 12345}, id="bad-family"),
]


@pytest.mark.parametrize(("args", "kwargs"), GETADDRINFO_CASES)
def test_getaddrinfo_matches_socket(loop, args, kwargs):
    # (Compared as outcomes: where the host lacks e.g. /etc/services both fail alike.)
    expected = sync_outcome(socket.getaddrinfo, *args, **kwargs)
    outcome = run(loop, async_outcome(lambda: loop.getaddrinfo(*args, **kwargs)))
    assert outcome == expected
    if expected[0] != "ok":  # pragma: no cover
        return
    result, expected = outcome[1], expected[1]
    assert type(result) is list
    # The family and type come back as the socket module's enums, as socket.getaddrinfo
    # gives them.
    for got, want in zip(result, expected, strict=True):
        assert [type(x) for x in got] == [type(x) for x in want]
        assert type(got[4]) is tuple


@pytest.mark.parametrize(("args", "kwargs"), GETADDRINFO_ERRORS)
def test_getaddrinfo_errors_match_socket(loop, args, kwargs):
    expected = sync_outcome(socket.getaddrinfo, *args, **kwargs)
    assert expected[0] == "error"
    got = run(loop, async_outcome(lambda: loop.getaddrinfo(*args, **kwargs)))
    assert got == expected


def test_getaddrinfo_unresolvable_is_gaierror(loop):
    with pytest.raises(socket.gaierror) as info:
        run(loop, loop.getaddrinfo(UNRESOLVABLE, 80))
    assert isinstance(info.value.errno, int)
    assert info.value.errno < 0  # an EAI_* code, not an errno


def test_getaddrinfo_keyword_only_arguments(loop):
    """family/type/proto/flags are keyword-only: passing them positionally is a
    TypeError raised by the call itself, before anything is awaited."""
    try:
        aw = loop.getaddrinfo("127.0.0.1", 80, socket.AF_INET)
    except TypeError:
        return
    run(loop, aw)  # a placeholder that accepts anything raises here
    pytest.fail("getaddrinfo() accepted family as a positional argument")


def test_getaddrinfo_concurrent(loop):
    hosts = ["127.0.0.1", "localhost", "::1", None] * 13
    hosts = hosts[:50]
    expected = {h: socket.getaddrinfo(h, 8080, type=socket.SOCK_STREAM) for h in set(hosts)}

    async def main():
        return await asyncio.gather(
            *(loop.getaddrinfo(h, 8080, type=socket.SOCK_STREAM) for h in hosts)
        )

    results = run(loop, main())
    assert len(results) == 50
    for host, result in zip(hosts, results, strict=True):
        assert result == expected[host]


def test_getaddrinfo_concurrent_with_errors(loop):
    """Failures do not disturb concurrent successful lookups."""

    async def main():
        return await asyncio.gather(
            *(loop.getaddrinfo(UNRESOLVABLE if i % 2 else "127.0.0.1", 80) for i in range(20)),
            return_exceptions=True,
        )

    results = run(loop, main())
    for result in results:
        if isinstance(result, BaseException):
            reraise_not_implemented(result)
    expected = socket.getaddrinfo("127.0.0.1", 80)
    for i, result in enumerate(results):
        if i % 2:
            assert type(result) is socket.gaierror
        else:
            assert result == expected


def test_getaddrinfo_cancelled(loop):
    """Cancelling a lookup cancels the awaiting task; the loop stays usable."""

    async def main():
        task = asyncio.ensure_future(loop.getaddrinfo("localhost", 80))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await loop.getaddrinfo("127.0.0.1", 80)

    assert run(loop, main()) == socket.getaddrinfo("127.0.0.1", 80)


def test_getaddrinfo_returns_coroutine_or_future(loop):
    """The result of the call is awaitable (asyncio: a coroutine)."""
    aw = loop.getaddrinfo("127.0.0.1", 80)
    try:
        assert hasattr(aw, "__await__")
    finally:

        async def consume():
            return await aw

        run(loop, consume())


GETNAMEINFO_CASES = [
    pytest.param(("127.0.0.1", 80), 0, id="ipv4"),
    pytest.param(("127.0.0.1", 80), socket.NI_NUMERICHOST, id="numerichost"),
    pytest.param(("127.0.0.1", 80), socket.NI_NUMERICSERV, id="numericserv"),
    pytest.param(
        ("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV, id="numeric-both"
    ),
    pytest.param(("127.0.0.1", 80), socket.NI_NAMEREQD, id="namereqd"),
    pytest.param(("127.0.0.1", 53), socket.NI_DGRAM, id="dgram"),
    pytest.param(("127.0.0.1", 80), socket.NI_NOFQDN, id="nofqdn"),
    pytest.param(("127.0.0.1", 0), 0, id="port-zero"),
    # (Numeric: ::1 is not in /etc/hosts, its reverse lookup would query DNS.)
    pytest.param(("::1", 80, 0, 0), socket.NI_NUMERICHOST, id="ipv6"),
    pytest.param(("::1", 80), socket.NI_NUMERICHOST, id="ipv6-2-tuple"),
]

GETNAMEINFO_ERRORS = [
    pytest.param(("127.0.0.1",), 0, id="short-tuple"),
    pytest.param(("127.0.0.1", 80, 0, 0), 0, id="ipv4-4-tuple"),
    pytest.param(("127.0.0.1", "80"), 0, id="str-port"),
    pytest.param(("127.0.0.1", 80), "x", id="str-flags"),
    pytest.param("127.0.0.1", 0, id="not-a-tuple"),
    # getnameinfo() resolves its host with AI_NUMERICHOST: a name is an error.
    pytest.param(("localhost", 80), 0, id="host-name"),
    pytest.param((UNRESOLVABLE, 80), 0, id="unresolvable"),
]


@pytest.mark.parametrize(("sockaddr", "flags"), GETNAMEINFO_CASES)
def test_getnameinfo_matches_socket(loop, sockaddr, flags):
    expected = sync_outcome(socket.getnameinfo, sockaddr, flags)
    outcome = run(loop, async_outcome(lambda: loop.getnameinfo(sockaddr, flags)))
    assert outcome == expected
    if expected[0] == "ok":
        assert type(outcome[1]) is tuple


def test_getnameinfo_default_flags(loop):
    assert run(loop, loop.getnameinfo(("127.0.0.1", 80))) == socket.getnameinfo(
        ("127.0.0.1", 80), 0
    )


@pytest.mark.parametrize(("sockaddr", "flags"), GETNAMEINFO_ERRORS)
def test_getnameinfo_errors_match_socket(loop, sockaddr, flags):
    expected = sync_outcome(socket.getnameinfo, sockaddr, flags)
    assert expected[0] == "error"
    got = run(loop, async_outcome(lambda: loop.getnameinfo(sockaddr, flags)))
    assert got == expected


def test_getnameinfo_concurrent(loop):
    addrs = [("127.0.0.1", 1000 + i) for i in range(50)]

    async def main():
        return await asyncio.gather(
            *(loop.getnameinfo(a, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV) for a in addrs)
        )

    assert run(loop, main()) == [("127.0.0.1", str(1000 + i)) for i in range(50)]


# ---- socket.getaddrinfo / getnameinfo replaced -------------------------------------------


def test_replaced_socket_functions_are_used(loop, monkeypatch):
    """asyncio calls whatever ``socket.getaddrinfo`` / ``socket.getnameinfo`` is current
    (dnspython's override_system_resolver() and test suites replace them); ferroloop's
    native resolution gives way to a replacement, for names, numeric hosts and the
    connections that resolve through it."""
    calls = []
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        calls.append(host)
        return real_getaddrinfo("127.0.0.1", port, family, type, proto, flags)

    def fake_getnameinfo(sockaddr, flags):
        calls.append(sockaddr)
        return ("fake-name.test", str(sockaddr[1]))

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    async def main():
        monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
        monkeypatch.setattr(socket, "getnameinfo", fake_getnameinfo)
        infos = await loop.getaddrinfo(UNRESOLVABLE, port, type=socket.SOCK_STREAM)
        _reader, writer = await asyncio.open_connection(UNRESOLVABLE, port)
        writer.close()
        name = await loop.getnameinfo(("127.0.0.1", 22))
        monkeypatch.undo()
        # Put back: resolved natively again (the name cannot resolve).
        with pytest.raises(socket.gaierror):
            await loop.getaddrinfo(UNRESOLVABLE, port)
        return infos[0][4], name

    try:
        addr, name = run(loop, main())
    finally:
        server.close()
    assert addr == ("127.0.0.1", port)
    assert name == ("fake-name.test", "22")
    assert calls == [UNRESOLVABLE, UNRESOLVABLE, ("127.0.0.1", 22)]


def test_close_after_a_lookup_releases_every_descriptor(loop_factory):
    """The resolver thread that answered may still be waking the loop when the loop
    closes: close() still returns with the loop's descriptors closed."""
    import os
    import time

    leftovers = 0
    for _ in range(60):
        before = set(os.listdir("/proc/self/fd"))
        loop = loop_factory()
        try:
            loop.run_until_complete(loop.getaddrinfo("localhost", 80))
        finally:
            loop.close()
        del loop
        leftovers += bool(set(os.listdir("/proc/self/fd")) - before)
        time.sleep(0.002)  # the resolver thread goes idle: the next answer wakes it
    assert leftovers == 0


NO_THREADS_SCRIPT = r"""
import asyncio, os, resource, sys
import concurrent.futures.thread, encodings.idna  # unreadable once unprivileged
import ferroloop

loop = ferroloop.new_event_loop() if sys.argv[1] == "ferroloop" else asyncio.new_event_loop()
os.setgid(65534)
os.setuid(65534)
resource.setrlimit(resource.RLIMIT_NPROC, (1, resource.getrlimit(resource.RLIMIT_NPROC)[1]))
try:
    loop.run_until_complete(loop.getaddrinfo("localhost", 80))
except Exception as exc:
    print(type(exc).__name__, exc)
loop.close()
"""


def test_no_thread_can_start(loop_name):
    """With no thread allowed (RLIMIT_NPROC), resolving a name fails as asyncio's
    executor does."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user with RLIMIT_NPROC")
    from _util import python_subprocess

    proc = python_subprocess(["-c", NO_THREADS_SCRIPT, loop_name])
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "RuntimeError can't start new thread\n"), err


SLOW_GETADDRINFO_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* getaddrinfo("slow.test") records the call in $SLOW_LOG, sleeps $SLOW_MS ms and fails. */
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    static int (*real)(const char *, const char *, const struct addrinfo *,
                       struct addrinfo **);
    if (!real)
        real = dlsym(RTLD_NEXT, "getaddrinfo");
    if (node && strcmp(node, "slow.test") == 0) {
        int fd = open(getenv("SLOW_LOG"), O_WRONLY | O_APPEND | O_CREAT, 0600);
        if (fd >= 0) {
            (void)write(fd, "x", 1);
            close(fd);
        }
        usleep(atoi(getenv("SLOW_MS")) * 1000);
        return EAI_NONAME;
    }
    return real(node, service, hints, res);
}
"""

CANCELLED_LOOKUPS_SCRIPT = r"""
import asyncio, sys, time
import ferroloop

N = 48

async def main():
    loop = asyncio.get_running_loop()
    for _ in range(N):
        try:
            await asyncio.wait_for(loop.getaddrinfo("slow.test", 80), 0.01)
        except (asyncio.TimeoutError, OSError):
            pass
    t = time.monotonic()
    await loop.getaddrinfo("localhost", 80)
    print(f"{time.monotonic() - t:.2f}")
    await asyncio.sleep(1.5)  # lookups that were still going to run have started

loop = ferroloop.new_event_loop() if sys.argv[1] == "ferroloop" else asyncio.new_event_loop()
loop.run_until_complete(main())
loop.close()
"""


def test_cancelled_lookups_that_have_not_started_are_not_run(loop_name, tmp_path):
    """A lookup whose future is cancelled before a resolver thread takes it is dropped,
    as asyncio's executor drops a cancelled work item: 48 lookups of a name that takes
    1 s, each abandoned after 10 ms, do not all run (ferroloop runs those its up to 32
    threads had started, asyncio those its min(32, CPUs + 4) workers had)."""
    from _util import build_preload_shim, python_subprocess

    shim = build_preload_shim(
        SLOW_GETADDRINFO_C, tmp_path / "slowgai.so", "the slow getaddrinfo() shim"
    )
    log = tmp_path / "calls"

    proc = python_subprocess(
        ["-c", CANCELLED_LOOKUPS_SCRIPT, loop_name],
        env_extra={"LD_PRELOAD": str(shim), "SLOW_LOG": str(log), "SLOW_MS": "1000"},
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    calls = len(log.read_bytes()) if log.exists() else 0
    assert 1 <= calls <= 32, (calls, out)
    # The next lookup waited at most for a thread to finish its 1 s lookup.
    assert float(out) < 2.0, out
