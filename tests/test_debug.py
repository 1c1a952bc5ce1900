"""Debug mode: get/set_debug, the environment, slow callbacks, source tracebacks,
callback checks."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import pytest
from _util import LOOP_FACTORIES, python_subprocess, run_briefly


def noop(*args):
    pass


def test_get_set_debug(loop):
    loop.set_debug(True)
    assert loop.get_debug() is True
    loop.set_debug(False)
    assert loop.get_debug() is False


@pytest.mark.parametrize(
    ("value", "on"), [(0, False), (1, True), (None, False), ("", False), ("x", True)]
)
def test_set_debug_takes_any_value(loop, value, on):
    # asyncio stores the value as given, uvloop and ferroloop its truth value.
    loop.set_debug(value)
    assert bool(loop.get_debug()) is on
    seen = []

    async def main():
        loop.set_debug(value)
        seen.append(bool(loop.get_debug()))
        await asyncio.sleep(0)
        seen.append(bool(sys.get_coroutine_origin_tracking_depth()))

    loop.run_until_complete(main())
    assert seen == [on, on]
    loop.set_debug(False)


def test_set_debug_while_running(loop):
    seen = []

    async def main():
        loop.set_debug(True)
        seen.append(loop.get_debug())
        await asyncio.sleep(0)
        loop.set_debug(False)
        seen.append(loop.get_debug())
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert seen == [True, False]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, False),
        ([], {"PYTHONASYNCIODEBUG": "1"}, True),
        (["-X", "dev"], {}, True),
    ],
    ids=["default", "PYTHONASYNCIODEBUG", "X-dev"],
)
def test_debug_from_environment(loop_name, args, env, expected):
    code = (
        "import asyncio, ferroloop\n"
        f"loop = {'ferroloop' if loop_name == 'ferroloop' else 'asyncio'}.new_event_loop()\n"
        "print(loop.get_debug())\n"
        "loop.close()\n"
    )
    proc = python_subprocess([*args, "-c", code], env_extra=env)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == str(expected)


def test_slow_callback_warning(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    def slow():
        time.sleep(0.03)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(slow)
        run_briefly(loop)
    records = [r for r in caplog.records if "took" in r.getMessage()]
    assert len(records) == 1
    (record,) = records
    assert record.name == "asyncio"
    assert record.levelname == "WARNING"
    msg = record.getMessage()
    assert msg.startswith("Executing <Handle test_slow_callback_warning.<locals>.slow() at ")
    assert " created at " in msg
    took = float(msg.rsplit(" took ", 1)[1].removesuffix(" seconds"))
    assert 0.03 <= took < 1


def test_slow_callback_warning_for_failing_callback(loop, loop_errors, caplog):
    """asyncio times the whole handle run, exception handling included: a slow callback
    that raises is reported too."""
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    def slow_and_failing():
        time.sleep(0.03)
        raise ValueError("slow failure")

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(slow_and_failing)
        run_briefly(loop)
    assert [type(c["exception"]) for c in loop_errors] == [ValueError]
    loop_errors.clear()
    records = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(records) == 1
    assert records[0].startswith(
        "Executing <Handle test_slow_callback_warning_for_failing_callback.<locals>"
        ".slow_and_failing() at "
    )


def test_no_slow_callback_warning_without_debug(loop, caplog):
    loop.set_debug(False)
    loop.slow_callback_duration = 0.0

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(time.sleep, 0.01)
        run_briefly(loop)
    assert not [r for r in caplog.records if "took" in r.getMessage()]


def test_slow_callback_duration_default(loop):
    assert loop.slow_callback_duration == 0.1
    loop.slow_callback_duration = 0.5
    assert loop.slow_callback_duration == 0.5


def test_slow_callback_duration_keeps_the_object_assigned(loop, caplog):
    """As an attribute of asyncio's loop: an int reads back as that int (not a float),
    and it is the threshold in debug mode. ferroloop refuses a value that is not a number."""
    loop.set_debug(True)
    loop.slow_callback_duration = 0
    assert loop.slow_callback_duration == 0
    assert type(loop.slow_callback_duration) is int
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(time.sleep, 0.001)
        run_briefly(loop)
    took = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert any(m.startswith("Executing <Handle sleep(0.001)") for m in took), took
    if "ferroloop" in type(loop).__module__:
        # (asyncio's loop takes it and fails at the next callback in debug mode)
        with pytest.raises(TypeError):
            loop.slow_callback_duration = "fast"
        assert loop.slow_callback_duration == 0


def test_slow_task_step_warning_names_task(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    async def slow_coro():
        time.sleep(0.03)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.run_until_complete(slow_coro())
    msgs = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(msgs) == 1
    assert msgs[0].startswith("Executing <Task ")
    assert "slow_coro()" in msgs[0]


def check_source_traceback(h, test_name):
    lineno = sys._getframe(1).f_lineno - 1
    assert isinstance(h._source_traceback, list)
    assert h._source_traceback[-1][:3] == (__file__, lineno, test_name)


def test_handle_source_traceback(loop):
    """As test_asyncio.test_events.HandleTests.test_handle_source_traceback."""
    loop.set_debug(True)
    name = "test_handle_source_traceback"
    h = loop.call_soon(noop)
    check_source_traceback(h, name)
    h = loop.call_soon_threadsafe(noop)
    check_source_traceback(h, name)
    h = loop.call_later(0, noop)
    check_source_traceback(h, name)
    h = loop.call_at(loop.time(), noop)
    check_source_traceback(h, name)


def test_no_source_traceback_without_debug(loop):
    loop.set_debug(False)
    h = loop.call_soon(noop)
    assert h._source_traceback is None
    t = loop.call_later(1, noop)
    assert t._source_traceback is None
    h.cancel()
    t.cancel()


def test_task_source_traceback(loop):
    loop.set_debug(True)

    async def coro():
        pass

    task = loop.create_task(coro())
    check_source_traceback(task, "test_task_source_traceback")
    loop.run_until_complete(task)


def _source_tracebacks(factory):
    loop = factory()
    loop.set_debug(True)
    try:
        handles = [
            loop.call_soon(noop),
            loop.call_soon_threadsafe(noop),
            loop.call_later(0, noop),
            loop.call_at(0, noop),
        ]
        return [[tuple(frame)[:3] for frame in h._source_traceback] for h in handles]
    finally:
        loop.close()


def test_source_traceback_frames_identical():
    """The same frames as stdlib (asyncio keeps DEBUG_STACK_DEPTH frames counted from its
    own internal frames, which it then drops)."""
    results = {name: _source_tracebacks(f) for name, f in LOOP_FACTORIES.items()}
    assert results["ferroloop"] == results["asyncio"]


async def coro_fn():
    pass


def test_reader_and_signal_handles_record_where_they_were_registered(loop, loop_errors):
    """In debug mode the handle of a reader or a signal handler keeps its creation stack,
    which the report of a failing callback shows. (asyncio's ends in its own
    `add_reader`/`_add_reader` or `add_signal_handler` frames, which ferroloop, written
    in Rust, does not have; the caller's frames are the same.)"""
    import os
    import signal
    import socket

    def fail():
        raise ValueError("boom")

    loop.set_debug(True)
    a, b = socket.socketpair()
    try:

        def register_reader():
            loop.add_reader(a, fail)

        def register_signal():
            loop.add_signal_handler(signal.SIGUSR1, fail)

        register_reader()
        register_signal()
        b.send(b"x")
        os.kill(os.getpid(), signal.SIGUSR1)
        run_briefly(loop)
        run_briefly(loop)
        loop.remove_reader(a)
        loop.remove_signal_handler(signal.SIGUSR1)
    finally:
        a.close()
        b.close()
        loop.set_debug(False)
    assert len(loop_errors) >= 2, loop_errors  # the reader fires while data waits
    where = set()
    for context in loop_errors:
        frames = context["source_traceback"]
        assert frames is context["handle"]._source_traceback
        where |= {f.name for f in frames if f.filename == __file__}
    loop_errors.clear()
    assert {"register_reader", "register_signal"} <= where


@pytest.mark.parametrize("method", ["call_soon", "call_soon_threadsafe", "call_later", "call_at"])
def test_debug_rejects_coroutines(loop, method):
    loop.set_debug(True)
    args = {"call_later": (0,), "call_at": (0,)}.get(method, ())
    # asyncio's call_later() delegates to call_at(), whose name is in the message.
    named = "call_at" if method == "call_later" else method
    with pytest.raises(TypeError, match=rf"^coroutines cannot be used with {named}\(\)$"):
        getattr(loop, method)(*args, coro_fn)
    coro = coro_fn()
    try:
        with pytest.raises(TypeError, match=rf"^coroutines cannot be used with {named}\(\)$"):
            getattr(loop, method)(*args, coro)
    finally:
        coro.close()


@pytest.mark.parametrize("method", ["call_soon", "call_soon_threadsafe", "call_later", "call_at"])
def test_debug_rejects_non_callable(loop, method):
    loop.set_debug(True)
    args = {"call_later": (0,), "call_at": (0,)}.get(method, ())
    named = "call_at" if method == "call_later" else method
    with pytest.raises(TypeError, match=rf"^a callable object was expected by {named}\(\), got 1$"):
        getattr(loop, method)(*args, 1)


def test_current_handle_in_debug(loop):
    loop.set_debug(True)
    seen = []
    h = loop.call_soon(lambda: seen.append(loop._current_handle))
    run_briefly(loop)
    assert seen == [h]
    assert loop._current_handle is None


def test_debug_exception_log_has_handle_traceback(loop_factory, caplog):
    """In debug mode, an error reported from inside a callback logs where the running
    handle was created."""
    loop = loop_factory()
    loop.set_debug(True)

    def report():
        loop.call_exception_handler({"message": "reported"})

    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.call_soon(report)
            run_briefly(loop)
    finally:
        loop.close()
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    msg = record.getMessage()
    assert msg.startswith("reported\nhandle_traceback: Handle created at (most recent call last):")
    assert "loop.call_soon(report)" in msg


def test_coroutine_origin_tracking(loop):
    loop.set_debug(True)
    seen = []

    async def inner():
        pass

    async def main():
        seen.append(sys.get_coroutine_origin_tracking_depth())
        coro = inner()
        seen.append(coro.cr_origin is not None)
        coro.close()

    before = sys.get_coroutine_origin_tracking_depth()
    loop.run_until_complete(main())
    assert seen == [asyncio.constants.DEBUG_STACK_DEPTH, True]
    assert sys.get_coroutine_origin_tracking_depth() == before
