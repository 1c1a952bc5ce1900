"""run_until_complete, run_forever / stop, is_running / is_closed, close."""

from __future__ import annotations

import asyncio

import pytest
from _util import LOOP_FACTORIES, run_briefly


async def coro_result(value):
    await asyncio.sleep(0)
    return value


async def coro_raise(exc):
    await asyncio.sleep(0)
    raise exc


def test_run_until_complete_returns_result(loop):
    assert loop.run_until_complete(coro_result(42)) == 42


def test_run_until_complete_raises_exception(loop):
    with pytest.raises(ValueError, match=r"^bad$"):
        loop.run_until_complete(coro_raise(ValueError("bad")))


def test_run_until_complete_with_future(loop):
    fut = loop.create_future()
    loop.call_later(0.01, fut.set_result, "done")
    assert loop.run_until_complete(fut) == "done"


def test_run_until_complete_with_task(loop):
    task = loop.create_task(coro_result("task"))
    assert loop.run_until_complete(task) == "task"
    assert task.done()


def test_run_until_complete_with_awaitable(loop):
    class Awaitable:
        def __await__(self):
            return coro_result("awaitable").__await__()

    assert loop.run_until_complete(Awaitable()) == "awaitable"


def test_run_until_complete_rejects_non_awaitable(loop):
    with pytest.raises(
        TypeError, match=r"^An asyncio.Future, a coroutine or an awaitable is required$"
    ):
        loop.run_until_complete(42)


def test_run_until_complete_future_of_other_loop(loop, loop_factory):
    other = loop_factory()
    try:
        fut = other.create_future()
        with pytest.raises(ValueError, match=r"^The future belongs to a different loop"):
            loop.run_until_complete(fut)
    finally:
        other.close()


def test_run_until_complete_stopped_early(loop):
    fut = loop.create_future()
    loop.call_soon(loop.stop)
    with pytest.raises(RuntimeError, match=r"^Event loop stopped before Future completed\.$"):
        loop.run_until_complete(fut)
    fut.cancel()


def test_run_until_complete_keyboard_interrupt_in_coroutine(loop):
    async def main():
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run_until_complete(main())
    assert not loop.is_running()
    assert loop.run_until_complete(coro_result(1)) == 1


def test_run_forever_stop_semantics(loop):
    """stop(): the current batch runs to the end; what it schedules waits for the next
    run."""
    order = []

    def a():
        order.append("a")
        loop.stop()
        loop.call_soon(order.append, "c")

    loop.call_soon(a)
    loop.call_soon(order.append, "b")
    loop.run_forever()
    assert order == ["a", "b"]
    assert not loop.is_running()
    # stop then run again: the pending callback runs.
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order == ["a", "b", "c"]


def test_stop_before_run_forever_runs_one_iteration(loop):
    order = []
    loop.stop()
    loop.call_soon(order.append, 1)

    def schedule_more():
        order.append(2)
        loop.call_soon(order.append, 3)

    loop.call_soon(schedule_more)
    loop.run_forever()
    assert order == [1, 2]
    run_briefly(loop)
    assert order == [1, 2, 3]


def test_stop_twice(loop):
    order = []
    loop.call_soon(loop.stop)
    loop.call_soon(loop.stop)
    loop.call_soon(order.append, 1)
    loop.run_forever()
    assert order == [1]
    # The stop request was consumed: a later run is not stopped immediately.
    loop.call_later(0.01, order.append, 2)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert order == [1, 2]


def test_stop_from_timer(loop):
    order = []
    loop.call_later(0.01, loop.stop)
    loop.call_later(0.01, order.append, "same-deadline-batch")
    loop.call_later(1, order.append, "late")
    loop.run_forever()
    assert "late" not in order


def test_is_running(loop):
    seen = []

    def cb():
        seen.append(loop.is_running())
        loop.stop()

    assert not loop.is_running()
    loop.call_soon(cb)
    loop.run_forever()
    assert seen == [True]
    assert not loop.is_running()


def test_get_running_loop_inside_callbacks(loop):
    seen = []
    loop.call_soon(lambda: seen.append(asyncio.get_running_loop()))
    run_briefly(loop)
    assert seen == [loop]
    assert asyncio.events._get_running_loop() is None


def test_is_closed_and_close_idempotent(loop):
    assert not loop.is_closed()
    loop.close()
    assert loop.is_closed()
    loop.close()
    assert loop.is_closed()


def test_close_while_running(loop):
    errors = []

    def cb():
        try:
            loop.close()
        except RuntimeError as exc:
            errors.append(str(exc))

    loop.call_soon(cb)
    run_briefly(loop)
    assert errors == ["Cannot close a running event loop"]
    assert not loop.is_closed()


def test_close_drops_pending_callbacks(loop):
    called = []
    loop.call_soon(called.append, 1)
    loop.call_later(0, called.append, 2)
    loop.close()
    assert called == []


def _closed_loop_calls(loop):
    def noop():
        pass

    return {
        "call_soon": lambda: loop.call_soon(noop),
        "call_soon_threadsafe": lambda: loop.call_soon_threadsafe(noop),
        "call_later": lambda: loop.call_later(1, noop),
        "call_at": lambda: loop.call_at(loop.time() + 1, noop),
        "run_forever": loop.run_forever,
        "run_in_executor": lambda: loop.run_in_executor(None, noop),
        "add_reader": lambda: loop.add_reader(0, noop),
        "add_writer": lambda: loop.add_writer(1, noop),
        "add_signal_handler": lambda: loop.add_signal_handler(2, noop),
    }


CLOSED_LOOP_METHODS = [
    "call_soon",
    "call_soon_threadsafe",
    "call_later",
    "call_at",
    "run_forever",
    "run_in_executor",
    "add_reader",
    "add_writer",
    "add_signal_handler",
]


@pytest.mark.parametrize("method", CLOSED_LOOP_METHODS)
def test_closed_loop_errors(loop, method):
    loop.close()
    call = _closed_loop_calls(loop)[method]
    with pytest.raises(RuntimeError) as info:
        call()
    assert type(info.value) is RuntimeError
    assert str(info.value) == "Event loop is closed"


@pytest.mark.parametrize("method", ["run_until_complete", "create_task"])
def test_closed_loop_errors_with_coroutine(loop, method):
    loop.close()
    coro = coro_result(1)
    try:
        with pytest.raises(RuntimeError, match=r"^Event loop is closed$"):
            getattr(loop, method)(coro)
    finally:
        coro.close()


def test_closed_loop_remove_methods_return_false(loop):
    loop.close()
    assert loop.remove_reader(0) is False
    assert loop.remove_writer(1) is False
    assert loop.remove_signal_handler(2) is False


def test_closed_loop_create_future_still_works(loop):
    loop.close()
    fut = loop.create_future()
    assert fut.get_loop() is loop
    fut.cancel()


def test_nested_run_forever(loop):
    errors = []

    def cb():
        try:
            loop.run_forever()
        except RuntimeError as exc:
            errors.append(str(exc))

    loop.call_soon(cb)
    run_briefly(loop)
    assert errors == ["This event loop is already running"]


def test_nested_run_until_complete(loop):
    errors = []

    def cb():
        coro = coro_result(1)
        try:
            loop.run_until_complete(coro)
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            coro.close()

    loop.call_soon(cb)
    run_briefly(loop)
    assert errors == ["This event loop is already running"]
    assert loop.is_running() is False


def test_nested_run_until_complete_from_coroutine(loop):
    async def main():
        inner = coro_result(1)
        try:
            with pytest.raises(RuntimeError, match=r"^This event loop is already running$"):
                loop.run_until_complete(inner)
        finally:
            inner.close()
        return "ok"

    assert loop.run_until_complete(main()) == "ok"


@pytest.mark.parametrize("other_name", list(LOOP_FACTORIES))
def test_run_other_loop_while_running(loop, other_name):
    other = LOOP_FACTORIES[other_name]()
    errors = []

    def cb():
        try:
            other.run_forever()
        except RuntimeError as exc:
            errors.append(str(exc))

    try:
        loop.call_soon(cb)
        run_briefly(loop)
    finally:
        other.close()
    assert errors == ["Cannot run the event loop while another loop is running"]


def test_run_after_exception_in_run_forever(loop):
    def boom():
        raise SystemExit(3)

    loop.call_soon(boom)
    with pytest.raises(SystemExit):
        loop.run_forever()
    assert not loop.is_running()
    assert asyncio.events._get_running_loop() is None
    assert loop.run_until_complete(coro_result("again")) == "again"


def test_loop_repr_mentions_state(loop):
    text = repr(loop)
    assert "running=False" in text
    assert "closed=False" in text
    loop.close()
    assert "closed=True" in repr(loop)


def test_run_until_complete_done_future_returns_immediately(loop):
    fut = loop.create_future()
    fut.set_result(5)
    assert loop.run_until_complete(fut) == 5


def test_run_until_complete_propagates_cancellation(loop):
    async def main():
        await asyncio.sleep(10)

    task = loop.create_task(main())
    loop.call_soon(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)


def test_set_event_loop_and_get_event_loop(loop):
    asyncio.set_event_loop(loop)
    try:
        assert asyncio.get_event_loop() is loop
    finally:
        asyncio.set_event_loop(None)
