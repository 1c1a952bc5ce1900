"""The interpreter exits while a loop still runs in a daemon thread (the common
``Thread(target=loop.run_forever, daemon=True)`` pattern): the process ends normally.

On Python 3.10-3.13 CPython ends such a thread with ``pthread_exit`` once it finalizes;
unwinding that through ferroloop's Rust frames aborted the process ("FATAL: exception
not rethrown", or an abort in ``__pthread_unwind``: status -6). Each case runs in a
subprocess, several times, because where the thread is when the interpreter exits
varies.
"""

from __future__ import annotations

import signal
import sys
import time

import pytest
from _util import python_subprocess

# argv: loop name, what the daemon thread's loop is doing when the main thread returns.
DAEMON_SCRIPT = r"""
import asyncio, socket, sys, threading, time
import ferroloop

kind, mode = sys.argv[1], sys.argv[2]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()

if mode == "submitted":
    # Coroutines submitted from the main thread, most still queued at exit.
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def work():
        await asyncio.sleep(0)
        return sum(range(2000))

    futures = [asyncio.run_coroutine_threadsafe(work(), loop) for _ in range(20000)]
    print(futures[0].result(), flush=True)
elif mode == "callbacks":
    def again():
        loop.call_soon(again)

    loop.call_soon(again)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    time.sleep(0.1)
    print("callbacks", flush=True)
elif mode == "writing":
    a, b = socket.socketpair()

    async def write_forever():
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        while True:
            transport.write(b"x" * 1000)
            await asyncio.sleep(0)
            try:
                b.recv(100000, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass

    threading.Thread(target=loop.run_until_complete, args=(write_forever(),), daemon=True).start()
    time.sleep(0.1)
    print("writing", flush=True)
elif mode == "datagrams":
    # A UDP echo endpoint busy with datagrams the main thread keeps sending.
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    async def serve():
        transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        return transport.get_extra_info("sockname")

    addr = loop.run_until_complete(serve())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    for _ in range(20000):
        try:
            client.sendto(b"x" * 100, addr)
            client.recv(1000)
        except BlockingIOError:
            pass
    print("datagrams", flush=True)
elif mode == "reloop":
    # Daemon threads keep running new loops to completion (asyncio.run() again and
    # again): a loop started after ferroloop's exit handler ran pauses too.
    factory = ferroloop.new_event_loop if kind == "ferroloop" else asyncio.new_event_loop

    async def work():
        await asyncio.gather(*[asyncio.sleep(0) for _ in range(20)])

    def spin():
        while True:
            if hasattr(asyncio, "Runner"):
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(work())
            else:
                lp = factory()
                try:
                    lp.run_until_complete(work())
                    lp.run_until_complete(lp.shutdown_asyncgens())
                finally:
                    lp.close()

    for _ in range(3):
        threading.Thread(target=spin, daemon=True).start()
    time.sleep(0.2)
    print("reloop", flush=True)
elif mode == "poster":
    # Other daemon threads keep calling into daemon loops busy with timers: their calls
    # do not resume a loop once it paused.
    import random

    async def timers():
        while True:
            await asyncio.sleep(random.random() * 0.001)

    async def nothing():
        await asyncio.sleep(0)

    loops = [loop] + [
        ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()
        for _ in range(2)
    ]
    for lp in loops:
        threading.Thread(target=lp.run_until_complete, args=(timers(),), daemon=True).start()

    def post():
        while True:
            for lp in loops:
                lp.call_soon_threadsafe(lambda: None)
                asyncio.run_coroutine_threadsafe(nothing(), lp)

    for _ in range(2):
        threading.Thread(target=post, daemon=True).start()
    time.sleep(0.2)
    print("poster", flush=True)
elif mode in ("futures", "readers", "cancels"):
    # Daemon threads whose only calls into a daemon thread's loop are create_future(),
    # add_reader()/remove_reader() or Handle.cancel(): in debug mode each runs Python
    # code inside ferroloop (a future's creation stack, a cancelled handle's repr).
    import collections

    handles = collections.deque()

    def noop():
        pass

    def make_timers():
        if len(handles) < 30000:
            handles.extend(loop.call_later(1000, noop) for _ in range(5000))
        loop.call_soon(make_timers)

    if mode == "cancels":
        loop.call_soon(make_timers)
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def hammer():
        a, b = socket.socketpair()
        while True:
            if mode == "futures":
                loop.create_future()
            elif mode == "readers":
                loop.add_reader(a, noop)
                loop.remove_reader(a)
            else:
                try:
                    handles.popleft().cancel()
                except IndexError:
                    pass

    while mode == "cancels" and len(handles) < 30000:
        time.sleep(0.01)
    for _ in range(1 if mode == "cancels" else 3):
        threading.Thread(target=hammer, daemon=True).start()
    time.sleep(0.2)
    print(mode, flush=True)
elif mode == "blocked":
    # A callback blocks past the exit: the process must not wait for it.
    loop.call_soon(time.sleep, 3)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    time.sleep(0.1)
    print("blocked", flush=True)
"""

EXPECTED = {
    "submitted": "1999000\n",
    "callbacks": "callbacks\n",
    "writing": "writing\n",
    "datagrams": "datagrams\n",
    "reloop": "reloop\n",
    "poster": "poster\n",
    "futures": "futures\n",
    "readers": "readers\n",
    "cancels": "cancels\n",
}
# Runs per mode: where the threads are at exit varies. These two crashed (SIGABRT or
# SIGSEGV) in about 1 run in 6 before the exit handler paused such loops, and in ~2 runs
# in 96 (12 processes on 2 cores) until threads that use ferroloop registered a handler
# that stops them before any unwinding (src/py/thread_exit.rs).
RUNS = {"reloop": 12, "poster": 12}

# CPython before 3.14 has a race of its own at exit: a daemon thread that was waiting for
# the GIL in take_gil() can wake after finalization freed the interpreter and read freed
# memory (SIGSEGV in COMPUTE_EVAL_BREAKER / RESET_GIL_DROP_REQUEST, with no ferroloop
# frame on its stack: a core dump of such a ferroloop run on 3.10 showed the thread in
# plain Python code). The stdlib loop hits it too: 1 run in 100 of the "futures" mode on
# 3.10. So one run per test may end with SIGSEGV after printing its output; a second
# one, an abort, a wrong output or a FATAL message fails.
CPYTHON_EXIT_RACE = sys.version_info < (3, 14)


def run_exit_script(loop_name, mode, runs, env_extra=None):
    segfaults = 0
    for _ in range(runs):
        proc = python_subprocess(["-c", DAEMON_SCRIPT, loop_name, mode], env_extra=env_extra)
        out, err = proc.communicate(timeout=60)
        assert "FATAL" not in err, err[-2000:]
        if (
            CPYTHON_EXIT_RACE
            and proc.returncode == -signal.SIGSEGV
            and out == EXPECTED[mode]
            and segfaults == 0
        ):
            segfaults += 1
            continue
        assert (proc.returncode, out) == (0, EXPECTED[mode]), err[-2000:]


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_exit_with_a_busy_loop_in_a_daemon_thread(loop_name, mode):
    run_exit_script(loop_name, mode, RUNS.get(mode, 4))


@pytest.mark.parametrize("mode", ["poster", "reloop", "futures", "readers", "cancels"])
def test_exit_with_a_busy_daemon_loop_in_debug_mode(loop_name, mode):
    """In debug mode call_soon_threadsafe(), create_future(), Handle.cancel() and
    replacing or removing a reader run Python code (the creation stack, a repr), so
    threads calling them are inside ferroloop's Rust code, calling Python, when
    finalization ends them: every such run aborted (in ``__pthread_unwind``, or "FATAL:
    exception not rethrown") before those threads registered the handler that stops
    them first."""
    run_exit_script(loop_name, mode, 5, env_extra={"PYTHONASYNCIODEBUG": "1"})


def test_exit_with_a_daemon_loop_blocked_in_a_callback(loop_name):
    """ferroloop waits a little (250 ms) for the loop to reach its next callback, then
    exits without it."""
    start = time.monotonic()
    proc = python_subprocess(["-c", DAEMON_SCRIPT, loop_name, "blocked"])
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "blocked\n"), err
    assert time.monotonic() - start < 2.5


# A loop never closed, with a child still running, is collected while the interpreter
# finalizes: its close() must neither start a thread (3.10/3.11 block for good, 3.12+
# raise) nor fail before closing the loop.
UNCLOSED_WITH_CHILD = r"""
import asyncio, sys
import ferroloop

kind = sys.argv[1]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()
proc = loop.run_until_complete(asyncio.create_subprocess_exec("sleep", "5"))
print("exiting", flush=True)
"""


def test_exit_with_an_unclosed_loop_watching_a_child(loop_name):
    proc = python_subprocess(["-c", UNCLOSED_WITH_CHILD, loop_name])
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (0, "exiting\n"), err
    assert "Exception ignored" not in err, err


# An atexit handler registered before ferroloop is imported runs after ferroloop's own
# handler, and still gets work done on the daemon thread's loop.
LATE_ATEXIT_SCRIPT = r"""
import asyncio, atexit, sys, threading


def shutdown():
    async def last_words():
        await asyncio.sleep(0.05)
        return "done"

    future = asyncio.run_coroutine_threadsafe(last_words(), loop)
    print("handler:", future.result(timeout=10), flush=True)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    print("joined:", not thread.is_alive(), flush=True)


atexit.register(shutdown)
import ferroloop  # noqa: E402  (after the handler, so its own exit handler runs first)

kind = sys.argv[1]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()


def again():
    loop.call_soon(again)


loop.call_soon(again)
thread = threading.Thread(target=loop.run_forever, daemon=True)
thread.start()
print("main done", flush=True)
"""


def test_exit_handler_registered_earlier_still_uses_the_daemon_loop(loop_name):
    proc = python_subprocess(["-c", LATE_ATEXIT_SCRIPT, loop_name])
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "main done\nhandler: done\njoined: True\n"), err


# An exit handler that runs after ferroloop's stops the daemon loop with a plain stop()
# from the main thread (not call_soon_threadsafe) and joins its thread.
STOP_AT_EXIT_SCRIPT = r"""
import asyncio, atexit, sys, threading


def shutdown():
    loop.stop()
    thread.join(10)
    print("joined:", not thread.is_alive(), flush=True)


atexit.register(shutdown)
import ferroloop  # noqa: E402  (after the handler, so its own exit handler runs first)

kind = sys.argv[1]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()


def tick():
    loop.call_later(0.01, tick)


loop.call_soon(tick)
thread = threading.Thread(target=loop.run_forever, daemon=True)
thread.start()
print("main done", flush=True)
"""


def test_exit_handler_registered_earlier_stops_the_daemon_loop(loop_name):
    """stop() resumes a loop that ferroloop's exit handler paused, so that its thread
    can be joined (it hung before)."""
    proc = python_subprocess(["-c", STOP_AT_EXIT_SCRIPT, loop_name])
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (0, "main done\njoined: True\n"), err


# Transport writes that fail from a __del__ that only the interpreter's last collection
# reaches: pyo3 cannot make an exception object lazily then (it panicked, "The Python
# interpreter is not initialized", PanicException), so ferroloop makes OS errors eagerly.
SHUTDOWN_WRITE = r"""
import asyncio, socket, sys
import ferroloop

kind = sys.argv[1]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()
lost = []


class Proto(asyncio.Protocol):
    def connection_lost(self, exc):
        lost.append(type(exc).__name__)


class Datagrams(asyncio.DatagramProtocol):
    def error_received(self, exc):
        lost.append(type(exc).__name__)


a, b = socket.socketpair()
stream, _ = loop.run_until_complete(loop.create_connection(Proto, sock=a))
b.close()  # the next write fails (EPIPE)
udp, _ = loop.run_until_complete(
    loop.create_datagram_endpoint(Datagrams, local_addr=("127.0.0.1", 0))
)


class Holder:
    def __del__(self):
        for what, call in (
            ("write", lambda: stream.write(b"x" * 10)),
            ("sendto", lambda: udp.sendto(b"x" * 70000, ("127.0.0.1", 9))),
        ):
            try:
                call()
                print(what, "ok", flush=True)
            except BaseException as e:
                print(what, "raised", type(e).__name__, e, flush=True)


h = Holder()
h.me = h  # a cycle: only the last collection at exit reaches it
del h
"""


def test_failing_transport_writes_from_a_finalizer_at_exit(loop_name):
    proc = python_subprocess(["-c", SHUTDOWN_WRITE, loop_name])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "write ok\nsendto ok\n", err
    assert "panicked" not in err and "PanicException" not in err, err
