"""No file descriptor stays open after a loop is closed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

N = 50


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


@pytest.fixture
def fd_baseline():
    if not os.path.isdir("/proc/self/fd"):  # pragma: no cover
        pytest.skip("needs /proc/self/fd")
    return open_fds()


def assert_no_new_fds(before):
    after = open_fds()
    # listdir itself opens one descriptor transiently; it is gone by the time we compare.
    leaked = sorted(after - before)
    targets = {}
    for fd in leaked:
        try:
            targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            targets[fd] = "?"
    assert not leaked, f"file descriptors left open: {targets}"


def test_create_and_close(loop_factory, fd_baseline):
    for _ in range(N):
        loop_factory().close()
    assert_no_new_fds(fd_baseline)


def test_create_many_then_close(loop_factory, fd_baseline):
    loops = [loop_factory() for _ in range(N)]
    assert len(open_fds()) > len(fd_baseline)  # a loop owns descriptors
    for loop in loops:
        loop.close()
    assert_no_new_fds(fd_baseline)


def test_run_then_close(loop_factory, fd_baseline):
    async def main():
        await asyncio.sleep(0)
        return 1

    for _ in range(N):
        loop = loop_factory()
        loop.call_soon_threadsafe(lambda: None)
        assert loop.run_until_complete(main()) == 1
        loop.close()
    assert_no_new_fds(fd_baseline)


def test_add_reader_then_close(loop_factory, fd_baseline):
    a, b = socket.socketpair()
    try:
        for _ in range(N):
            loop = loop_factory()
            loop.add_reader(a, lambda: None)
            loop.add_writer(b, lambda: None)
            loop.call_soon(loop.stop)
            loop.run_forever()
            loop.close()
    finally:
        a.close()
        b.close()
    assert_no_new_fds(fd_baseline)


def test_add_signal_handler_then_close(loop_factory, fd_baseline):
    try:
        for _ in range(N):
            loop = loop_factory()
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
            loop.call_soon(loop.stop)
            loop.run_forever()
            loop.close()
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert_no_new_fds(fd_baseline)
    assert signal.set_wakeup_fd(-1) == -1


def test_closed_loop_keeps_fds_closed(loop_factory, fd_baseline):
    loop = loop_factory()
    loop.close()
    loop.close()
    assert_no_new_fds(fd_baseline)
