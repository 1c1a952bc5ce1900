"""call_soon: ordering, arguments, contexts, and the handles it returns."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import weakref

import ferroloop
import pytest
from _util import PY312, run_briefly

var = contextvars.ContextVar("var", default="default")


def test_call_soon_runs_in_fifo_order(loop):
    order = []
    for i in range(10):
        loop.call_soon(order.append, i)
    run_briefly(loop)
    assert order == list(range(10))


def test_call_soon_passes_positional_args(loop):
    calls = []

    def cb(*args):
        calls.append(args)

    loop.call_soon(cb)
    loop.call_soon(cb, 1)
    loop.call_soon(cb, 1, "two", None)
    run_briefly(loop)
    assert calls == [(), (1,), (1, "two", None)]


def test_call_soon_accepts_partial_and_bound_methods(loop):
    calls = []
    loop.call_soon(functools.partial(calls.append, "partial"))
    loop.call_soon(calls.append, "bound")
    loop.call_soon(lambda: calls.append("lambda"))
    run_briefly(loop)
    assert calls == ["partial", "bound", "lambda"]


def test_call_soon_rejects_keyword_arguments(loop):
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'x'"):
        loop.call_soon(print, x=1)


def test_callbacks_scheduled_by_callbacks_run_in_next_iteration(loop):
    order = []

    def first():
        order.append("first")
        loop.call_soon(order.append, "nested")

    loop.call_soon(first)
    loop.call_soon(order.append, "second")
    loop.call_soon(loop.stop)
    loop.run_forever()
    # stop() lets the current batch finish but not what it scheduled.
    assert order == ["first", "second"]
    run_briefly(loop)
    assert order == ["first", "second", "nested"]


def test_call_soon_returns_asyncio_handle(loop):
    h = loop.call_soon(print)
    assert isinstance(h, asyncio.Handle)
    assert not isinstance(h, asyncio.TimerHandle)
    assert type(h).__name__ == "Handle"
    h.cancel()


def test_handle_is_ferroloop_handle(loop_name, loop):
    """ferroloop-only: the handles are ferroloop's asyncio.Handle subclass."""
    if loop_name != "ferroloop":
        pytest.skip("ferroloop-only")
    h = loop.call_soon(print)
    assert type(h) is ferroloop.Handle
    assert issubclass(ferroloop.Handle, asyncio.Handle)
    h.cancel()


def test_handle_cancel(loop):
    called = []
    h = loop.call_soon(called.append, 1)
    assert not h.cancelled()
    h.cancel()
    assert h.cancelled()
    h.cancel()  # idempotent
    assert h.cancelled()
    run_briefly(loop)
    assert called == []


def test_cancel_later_handle_from_earlier_callback(loop):
    called = []
    h2 = None

    def first():
        called.append(1)
        h2.cancel()

    loop.call_soon(first)
    h2 = loop.call_soon(called.append, 2)
    loop.call_soon(called.append, 3)
    run_briefly(loop)
    assert called == [1, 3]


def test_callback_cancelling_its_own_handle_still_completes(loop):
    called = []
    h = None

    def cb(x):
        h.cancel()
        called.append(x)

    h = loop.call_soon(cb, "x")
    run_briefly(loop)
    assert called == ["x"]
    assert h.cancelled()


def test_cancel_releases_callback_and_args(loop):
    h = loop.call_soon(print, 1, 2)
    assert h._callback is print
    assert h._args == (1, 2)
    h.cancel()
    assert h._callback is None
    assert h._args is None


def test_handle_repr(loop):
    loop.set_debug(False)

    def noop(*args):
        pass

    h = loop.call_soon(noop, 1, "a")
    assert repr(h) == f"<Handle {noop.__qualname__}(1, 'a') at {__file__}:{noop_line(noop)}>"
    h.cancel()
    assert repr(h) == "<Handle cancelled>"


def noop_line(fn) -> int:
    return fn.__code__.co_firstlineno


def test_handle_repr_debug_keeps_callback_after_cancel(loop):
    loop.set_debug(True)
    h = loop.call_soon(print, 1)
    text = repr(h)
    assert text.startswith("<Handle print(1) created at ")
    assert f"{__file__}:" in text
    h.cancel()
    assert repr(h).startswith("<Handle cancelled print(1) created at ")


def test_call_soon_runs_in_copy_of_current_context(loop):
    seen = []
    token = var.set("outer")
    try:

        def cb():
            seen.append(var.get())
            var.set("changed-in-callback")

        loop.call_soon(cb)
        var.set("after-scheduling")
        run_briefly(loop)
        assert seen == ["outer"]
        assert var.get() == "after-scheduling"
    finally:
        var.reset(token)


def test_call_soon_with_explicit_context(loop):
    ctx = contextvars.Context()
    ctx.run(var.set, "in-ctx")
    seen = []

    def cb(tag):
        seen.append((tag, var.get()))
        var.set(tag)

    loop.call_soon(cb, "first", context=ctx)
    loop.call_soon(cb, "second", context=ctx)
    loop.call_soon(cb, "third")
    run_briefly(loop)
    # The explicit context is shared (and mutated) by both callbacks.
    assert seen == [("first", "in-ctx"), ("second", "first"), ("third", "default")]
    assert ctx[var] == "second"
    assert var.get() == "default"


def test_call_soon_context_none_means_current(loop):
    seen = []
    token = var.set("current")
    try:
        loop.call_soon(lambda: seen.append(var.get()), context=None)
        run_briefly(loop)
    finally:
        var.reset(token)
    assert seen == ["current"]


def test_handle_context_slot(loop):
    ctx = contextvars.Context()
    h = loop.call_soon(print, context=ctx)
    assert h._context is ctx
    h.cancel()


def test_handle_get_context(loop_name, loop):
    if loop_name == "asyncio" and not PY312:
        pytest.skip("asyncio.Handle.get_context() is new in Python 3.12")
    ctx = contextvars.Context()
    h = loop.call_soon(print, context=ctx)
    assert h.get_context() is ctx
    h2 = loop.call_soon(print)
    assert isinstance(h2.get_context(), contextvars.Context)
    h.cancel()
    h2.cancel()


def test_same_context_cannot_be_entered_twice(loop):
    """A callback that runs in the context it was given cannot re-enter it."""
    ctx = contextvars.Context()
    errors = []

    def cb():
        try:
            ctx.run(print)
        except RuntimeError as exc:
            errors.append(str(exc))

    loop.call_soon(cb, context=ctx)
    run_briefly(loop)
    assert len(errors) == 1
    assert "is already entered" in errors[0]


def test_callback_context_already_entered(loop, loop_errors):
    """A handle whose context is the one the loop runs in cannot enter it: the error is
    reported like an exception raised by the callback. (From Python 3.12 on, a custom
    handler runs in the handle's context too, so it cannot be entered either.)"""
    if PY312:
        pytest.skip("Python 3.12+ cannot call the custom handler in this context either")
    ctx = contextvars.Context()
    called = []
    h = loop.call_soon(called.append, 1, context=ctx)
    ctx.run(run_briefly, loop)
    assert called == []
    assert len(loop_errors) == 1
    err = loop_errors.pop()
    assert err["handle"] is h
    assert type(err["exception"]) is RuntimeError
    assert str(err["exception"]) == f"cannot enter context: {ctx!r} is already entered"


def test_callback_with_invalid_context_object(loop, loop_errors):
    """asyncio calls ``context.run(...)``: a non-Context fails when the handle runs."""
    h = loop.call_soon(print, context=42)
    run_briefly(loop)
    assert len(loop_errors) == 1
    err = loop_errors.pop()
    assert err["handle"] is h
    assert type(err["exception"]) is AttributeError
    assert str(err["exception"]) == "'int' object has no attribute 'run'"


def test_callback_exception_does_not_stop_the_batch(loop, loop_errors):
    order = []

    def boom():
        order.append("boom")
        raise ZeroDivisionError("nope")

    loop.call_soon(boom)
    loop.call_soon(order.append, "after")
    run_briefly(loop)
    assert order == ["boom", "after"]
    assert len(loop_errors) == 1
    assert isinstance(loop_errors[0]["exception"], ZeroDivisionError)
    loop_errors.clear()


def test_non_callable_without_debug_fails_when_run(loop, loop_errors):
    loop.set_debug(False)
    h = loop.call_soon(1)
    run_briefly(loop)
    assert len(loop_errors) == 1
    ctx = loop_errors.pop()
    assert ctx["handle"] is h
    assert type(ctx["exception"]) is TypeError
    assert str(ctx["exception"]) == "'int' object is not callable"
    assert ctx["message"] == "Exception in callback 1()"


def test_handle_keeps_callback_after_running(loop):
    loop.set_debug(False)
    calls = []
    h = loop.call_soon(calls.append, "ran")
    run_briefly(loop)
    assert calls == ["ran"]
    assert h._callback == calls.append
    assert h._args == ("ran",)
    assert not h.cancelled()
    assert repr(h) == "<Handle list.append('ran')>"


def test_weakref_to_handle(loop):
    h = loop.call_soon(print, "weak")
    ref = weakref.ref(h)
    del h
    assert ref() is not None  # the loop still holds it
    run_briefly(loop)
    assert ref() is None
    # New handles (possibly reusing memory) do not revive the dead reference.
    keep = [loop.call_soon(len, ()) for _ in range(10)]
    assert ref() is None
    run_briefly(loop)
    del keep
    assert ref() is None


def test_many_callbacks(loop):
    n = 10_000
    count = 0

    def inc():
        nonlocal count
        count += 1

    for _ in range(n):
        loop.call_soon(inc)
    run_briefly(loop)
    assert count == n


def test_weak_references_to_handles_die_with_them(loop):
    """A handle's weak references are cleared when it is freed (and not carried over to a
    handle recycled from the same memory)."""
    h = loop.call_soon(lambda: None)
    ref = weakref.ref(h)
    run_briefly(loop)
    del h
    assert ref() is None
    h2 = loop.call_soon(lambda: None)
    assert weakref.getweakrefcount(h2) == 0
    run_briefly(loop)


def test_timer_cancel_accounting_rejects_foreign_objects():
    """ferroloop-only: the private hook asyncio's TimerHandle.cancel() calls must not read
    timer slots of objects that are not ferroloop timer handles."""
    loop = ferroloop.new_event_loop()
    try:
        plain = asyncio.Handle(lambda: None, (), loop)
        with pytest.raises(AttributeError):
            loop._timer_handle_cancelled(plain)  # asyncio looks up ._scheduled too
        with pytest.raises(AttributeError):
            loop._timer_handle_cancelled(42)
        timer = asyncio.TimerHandle(loop.time() + 10, lambda: None, (), loop)
        loop._timer_handle_cancelled(timer)  # not scheduled: nothing counted, no error
        timer.cancel()
    finally:
        loop.close()
