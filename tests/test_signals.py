"""add_signal_handler / remove_signal_handler, and Ctrl+C (SIGINT) in child processes."""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import sys
import textwrap
import threading
import time

import pytest
from _util import python_subprocess, run_briefly, run_until

var = contextvars.ContextVar("var", default="default")


def kill_self(sig: int) -> None:
    # A signal whose default action kills the process must never reach us unhandled.
    assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, None), (
        f"no Python handler for {signal.Signals(sig).name}: refusing to send it"
    )
    os.kill(os.getpid(), sig)


@pytest.fixture(autouse=True)
def _restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    yield
    changed = [signal.Signals(s).name for s, h in saved.items() if signal.getsignal(s) is not h]
    for s, h in saved.items():
        signal.signal(s, h)
    assert not changed, f"signal handlers left installed: {changed}"


# ---- add / remove --------------------------------------------------------------------


def test_handler_runs_on_signal(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, lambda *a: calls.append(a), 1, "x")
    loop.call_soon(kill_self, signal.SIGUSR1)
    run_until(loop, lambda: calls)
    assert calls == [(1, "x")]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_signal_before_run_is_handled_when_loop_runs(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "late")
    kill_self(signal.SIGUSR1)
    assert calls == []
    run_until(loop, lambda: calls)
    assert calls == ["late"]
    loop.remove_signal_handler(signal.SIGUSR1)


def test_two_signals(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "usr1")
    loop.add_signal_handler(signal.SIGUSR2, calls.append, "usr2")
    loop.call_soon(kill_self, signal.SIGUSR1)
    loop.call_soon(kill_self, signal.SIGUSR2)
    run_until(loop, lambda: len(calls) == 2)
    assert sorted(calls) == ["usr1", "usr2"]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert loop.remove_signal_handler(signal.SIGUSR2) is True


def test_replace_handler(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "old")
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "new")
    loop.call_soon(kill_self, signal.SIGUSR1)
    run_until(loop, lambda: calls)
    assert calls == ["new"]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True


def test_handler_added_while_running(loop):
    calls = []

    async def main():
        loop.add_signal_handler(signal.SIGUSR1, calls.append, "running")
        kill_self(signal.SIGUSR1)
        for _ in range(200):
            if calls:
                break
            await asyncio.sleep(0.01)

    loop.run_until_complete(main())
    assert calls == ["running"]
    loop.remove_signal_handler(signal.SIGUSR1)


def test_signal_wakes_sleeping_loop(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: (calls.append(1), loop.stop()))
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
    guard = loop.call_later(5, loop.stop)
    t0 = time.monotonic()
    timer.start()
    loop.run_forever()
    elapsed = time.monotonic() - t0
    timer.join()
    guard.cancel()
    assert calls == [1]
    assert elapsed < 1
    loop.remove_signal_handler(signal.SIGUSR1)


def test_handler_context_is_copied_at_registration(loop):
    seen = []
    token = var.set("at-registration")
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda: seen.append(var.get()))
    finally:
        var.reset(token)
    loop.call_soon(kill_self, signal.SIGUSR1)
    run_until(loop, lambda: seen)
    assert seen == ["at-registration"]
    loop.remove_signal_handler(signal.SIGUSR1)


def test_handler_exception_goes_to_exception_handler(loop, loop_errors):
    def bad():
        raise ZeroDivisionError("in signal handler")

    loop.add_signal_handler(signal.SIGUSR1, bad)
    loop.call_soon(kill_self, signal.SIGUSR1)
    run_until(loop, lambda: loop_errors)
    ctx = loop_errors.pop()
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["message"].startswith("Exception in callback ")
    assert isinstance(ctx["handle"], asyncio.Handle)
    loop.remove_signal_handler(signal.SIGUSR1)


def test_close_removes_handlers(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_handler_and_restore(loop):
    calls = []
    loop.add_signal_handler(signal.SIGINT, calls.append, "sigint")
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    loop.call_soon(kill_self, signal.SIGINT)
    run_until(loop, lambda: calls)  # no KeyboardInterrupt
    assert calls == ["sigint"]
    assert loop.remove_signal_handler(signal.SIGINT) is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Ctrl+C interrupts the loop again.
    loop.call_soon(os.kill, os.getpid(), signal.SIGINT)
    guard = loop.call_later(5, loop.stop)
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    guard.cancel()
    assert calls == ["sigint"]


def test_signal_for_idle_loop_while_other_loop_runs(loop, loop_factory):
    """A signal that arrives while another loop runs is still delivered to the loop
    that registered the handler, when that loop runs next."""
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "idle-loop")
    other = loop_factory()
    try:
        other.call_soon(kill_self, signal.SIGUSR1)
        other.call_later(0.05, other.stop)
        other.run_forever()
    finally:
        other.close()
    assert calls == []
    run_until(loop, lambda: calls, timeout=1)
    assert calls == ["idle-loop"]
    loop.remove_signal_handler(signal.SIGUSR1)


def test_handler_runs_on_loop_in_other_thread(loop):
    """Handlers are registered from the main thread; the loop may run elsewhere."""
    calls = []
    started = threading.Event()

    def handler():
        calls.append(threading.current_thread().name)
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR1, handler)
    loop.call_soon(started.set)
    guard = loop.call_later(5, loop.stop)
    t = threading.Thread(target=loop.run_forever, name="loop-thread")
    t.start()
    try:
        assert started.wait(5)
        kill_self(signal.SIGUSR1)
    finally:
        t.join(10)
    guard.cancel()
    assert calls == ["loop-thread"]
    loop.remove_signal_handler(signal.SIGUSR1)


def test_default_sigint_raises_keyboard_interrupt_from_loop(loop):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    guard = loop.call_later(5, loop.stop)
    t0 = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    elapsed = time.monotonic() - t0
    timer.join()
    guard.cancel()
    assert elapsed < 1
    assert not loop.is_running()
    run_briefly(loop)


def test_signal_handler_exception_leaves_run_forever_between_callbacks(loop_factory):
    """A Python-level signal handler (signal.signal, as a test-timeout plugin installs)
    that raises while the loop runs callbacks of native code only: the exception leaves
    run_forever at the next callback boundary, as when asyncio's loop code (Python) runs
    the handler, instead of being raised in, and swallowed with, an unrelated callback.
    No queued callback is lost: the next run goes on where the first stopped."""
    loop = loop_factory()
    if "ferroloop" not in type(loop).__module__:
        loop.close()
        pytest.skip("asyncio's Handle._run can run the handler inside its try block")

    class Timeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise Timeout("alarm")

    errors = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    done: list[int] = []
    n = 400
    for i in range(n):
        loop.call_soon(sum, range(50_000))  # C code: no bytecode runs the handler early
        loop.call_soon(done.append, i)
    loop.call_soon(loop.stop)
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(Timeout):
            loop.run_forever()
        first = len(done)
        assert not loop.is_running()
        loop.call_soon(loop.stop)  # (a second stop: ends the run if the first is gone)
        loop.run_forever()  # the rest, up to the stop queued first
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        loop.close()
    assert errors == []
    assert 0 < first < n
    assert done == list(range(n))


# ---- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["add_signal_handler", "remove_signal_handler"])
def test_sig_must_be_int(loop, method):
    args = ("2", print) if method == "add_signal_handler" else ("2",)
    with pytest.raises(TypeError, match=r"^sig must be an int, not '2'$"):
        getattr(loop, method)(*args)


@pytest.mark.parametrize("method", ["add_signal_handler", "remove_signal_handler"])
@pytest.mark.parametrize("sig", [0, -1, 1000])
def test_invalid_signal_number(loop, method, sig):
    args = (sig, print) if method == "add_signal_handler" else (sig,)
    with pytest.raises(ValueError, match=f"^invalid signal number {sig}$"):
        getattr(loop, method)(*args)


def test_coroutine_function_rejected(loop):
    async def handler():
        pass

    with pytest.raises(TypeError, match=r"^coroutines cannot be used with add_signal_handler\(\)$"):
        loop.add_signal_handler(signal.SIGUSR1, handler)
    coro = handler()
    try:
        with pytest.raises(
            TypeError, match=r"^coroutines cannot be used with add_signal_handler\(\)$"
        ):
            loop.add_signal_handler(signal.SIGUSR1, coro)
    finally:
        coro.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_uncatchable_signal(loop):
    with pytest.raises(RuntimeError, match=f"^sig {int(signal.SIGKILL)} cannot be caught$"):
        loop.add_signal_handler(signal.SIGKILL, print)
    assert loop.remove_signal_handler(signal.SIGKILL) is False


def test_close_from_other_thread_with_signal_handlers(loop):
    """close() from a thread that cannot touch signal handlers: the error surfaces, and
    the loop is closed all the same."""
    loop.add_signal_handler(signal.SIGUSR1, print)
    errors = []

    def in_thread():
        try:
            loop.close()
        except ValueError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    try:
        assert errors == ["signal only works in main thread of the main interpreter"]
        assert loop.is_closed()
    finally:
        # Both loops forget the handler before failing to uninstall it: tidy up here.
        loop.close()
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)


def test_add_signal_handler_from_other_thread(loop):
    errors = []

    def in_thread():
        try:
            loop.add_signal_handler(signal.SIGUSR1, print)
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert errors == ["set_wakeup_fd only works in main thread of the main interpreter"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


# ---- Ctrl+C in a child process -------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, signal, sys, threading, time

    loop_name, kind = sys.argv[1], sys.argv[2]
    if loop_name == "ferroloop":
        import ferroloop
        factory = ferroloop.new_event_loop
    else:
        factory = asyncio.new_event_loop


    def ready():
        print("ready", flush=True)


    if kind == "run_forever":
        loop = factory()
        loop.call_soon(ready)
        try:
            loop.run_forever()
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        finally:
            loop.close()
    elif kind == "busy":
        loop = factory()

        def busy():
            ready()
            end = time.monotonic() + 10
            while time.monotonic() < end:
                pass
            print("not interrupted", flush=True)

        loop.call_soon(busy)
        try:
            loop.run_forever()
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        finally:
            loop.close()
    elif kind in ("run", "run_busy"):
        async def main():
            ready()
            if kind == "run_busy":
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    pass
                print("busy part done", flush=True)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                print("main cancelled", flush=True)
                raise

        if loop_name == "ferroloop":
            ferroloop.run(main())
        else:
            asyncio.run(main())
    elif kind == "other_thread":
        # SIGINT is blocked in the main thread, so the kernel delivers it to another
        # thread: only the signal wake-up fd can wake the loop.
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        loop = factory()
        loop.call_soon(ready)
        try:
            loop.run_forever()
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        finally:
            loop.close()
    """
)


def start_child(tmp_path, loop_name, kind):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = python_subprocess([str(script), loop_name, kind])
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child did not start: {line!r} {out!r} {err!r}")
    return proc


def interrupt(proc, wait_for: str, settle: float = 0.1) -> float:
    """Send SIGINT once the child is idle; return the seconds until it prints
    ``wait_for``."""
    time.sleep(settle)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    lines = []
    deadline = t0 + 10
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line == wait_for + "\n":
            return time.monotonic() - t0
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"child never printed {wait_for!r}: {lines!r} {out!r} {err!r}")


@pytest.mark.parametrize("kind", ["run_forever", "busy"])
def test_ctrl_c_run_forever(tmp_path, loop_name, kind):
    proc = start_child(tmp_path, loop_name, kind)
    latency = interrupt(proc, "KeyboardInterrupt")
    out, err = proc.communicate(timeout=10)
    print(f"{loop_name} {kind}: KeyboardInterrupt {latency * 1000:.1f} ms after SIGINT")
    assert proc.returncode == 0, err
    assert out == ""
    assert latency < 1.0


@pytest.mark.parametrize("kind", ["run", "run_busy"])
def test_ctrl_c_asyncio_run(tmp_path, loop_name, kind):
    """asyncio.run / ferroloop.run: the main task is cancelled, then KeyboardInterrupt
    ends the program (traceback, killed by SIGINT) as with stdlib asyncio."""
    if kind == "run_busy" and sys.version_info < (3, 11):
        pytest.skip("asyncio.run turns SIGINT into cancelling the main task from 3.11")
    proc = start_child(tmp_path, loop_name, kind)
    if kind == "run_busy":
        # SIGINT arrives while the main task runs Python code: the task is cancelled
        # at its next await.
        latency = interrupt(proc, "main cancelled", settle=0.05)
    else:
        latency = interrupt(proc, "main cancelled")
    out, err = proc.communicate(timeout=10)
    print(f"{loop_name} {kind}: main task cancelled {latency * 1000:.1f} ms after SIGINT")
    if kind == "run_busy":
        assert out == ""
    else:
        assert out == ""
        assert latency < 1.0
    assert proc.returncode == -signal.SIGINT, err
    lines = err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "KeyboardInterrupt"


def test_ctrl_c_delivered_to_other_thread(tmp_path, loop_name):
    """ferroloop-only: SIGINT handled by another thread still wakes the loop (through the
    signal wake-up fd). Stdlib asyncio sleeps on in that case."""
    if loop_name != "ferroloop":
        pytest.skip("ferroloop-only: stdlib asyncio is not woken up")
    if sys.platform != "linux":  # pragma: no cover
        pytest.skip("Linux signal delivery")
    proc = start_child(tmp_path, loop_name, "other_thread")
    latency = interrupt(proc, "KeyboardInterrupt")
    proc.communicate(timeout=10)
    print(f"{loop_name} other thread: KeyboardInterrupt {latency * 1000:.1f} ms after SIGINT")
    assert latency < 1.0


def test_wakeup_fd_not_left_stale_after_remove_while_running(loop):
    """A handler added and removed while the loop runs, with another wake-up fd installed
    when the loop started, must not leave the wake-up fd pointing at the loop's socket
    (which close() then closes): removing the last handler resets it, as asyncio does."""
    import socket

    other_r, other_w = socket.socketpair()
    other_w.setblocking(False)
    previous = signal.set_wakeup_fd(other_w.fileno())
    try:

        async def main():
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
            loop.remove_signal_handler(signal.SIGUSR1)

        loop.run_until_complete(main())
        loop.close()
        assert signal.set_wakeup_fd(-1) == -1
    finally:
        signal.set_wakeup_fd(previous)
        other_r.close()
        other_w.close()


def test_wakeup_fd_installed_while_running_stays(loop):
    """A wake-up fd that a library installs while the loop runs is still installed after
    the run, as asyncio never touches it outside add/remove_signal_handler."""
    import socket

    r, w = socket.socketpair()
    w.setblocking(False)

    async def main():
        signal.set_wakeup_fd(w.fileno())

    try:
        loop.run_until_complete(main())
        assert signal.set_wakeup_fd(-1) == w.fileno()
    finally:
        signal.set_wakeup_fd(-1)
        r.close()
        w.close()


@pytest.mark.parametrize("other_name", ["asyncio", "ferroloop"])
@pytest.mark.parametrize("early", [False, True], ids=["while_running", "before_running"])
def test_other_loops_handler_added_during_a_run(loop, other_name, early):
    """Loop B gets a signal handler from code that runs in loop A: after A's run B's
    handler still gets the signal, whether it arrives before B runs or while it runs."""
    from _util import LOOP_FACTORIES

    other = LOOP_FACTORIES[other_name]()
    got = []

    async def setup():
        other.add_signal_handler(signal.SIGUSR1, got.append, "ran")

    try:
        loop.run_until_complete(setup())
        if early:
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            other.call_later(0.05, os.kill, os.getpid(), signal.SIGUSR1)
        other.run_until_complete(asyncio.sleep(0.3))
        assert got == ["ran"]
    finally:
        other.remove_signal_handler(signal.SIGUSR1)
        other.close()
