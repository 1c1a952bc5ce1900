"""call_soon: ordering, arguments, contexts, and the handles it returns."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import weakref

import ferroloop
import pytest
from _util import PY312, repr_args, run_briefly

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


def test_instances_with_call_as_callbacks(loop, loop_errors):
    # Objects whose type has tp_call but no vectorcall (as asyncio's C task-step
    # wrapper): with and without args, in a given context, and raising.
    class Counter:
        def __init__(self):
            self.calls = []

        def __call__(self, *args):
            self.calls.append((args, var.get()))
            var.set("set by callback")
            return "ignored"

    class Boom:
        def __call__(self):
            raise ZeroDivisionError("boom")

    c = Counter()
    ctx = contextvars.copy_context()
    ctx.run(var.set, "given")
    loop.call_soon(c)
    loop.call_soon(c, 1)
    loop.call_soon(c, context=ctx)
    boom = Boom()
    h = loop.call_soon(boom)
    loop.call_soon(c, 2)
    run_briefly(loop)
    assert c.calls == [((), "default"), ((1,), "default"), ((), "given"), ((2,), "default")]
    assert ctx[var] == "set by callback"
    assert var.get() == "default"
    assert len(loop_errors) == 1
    err = loop_errors.pop()
    assert err["handle"] is h
    assert type(err["exception"]) is ZeroDivisionError


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
    args = repr_args("1, 'a'")
    assert repr(h) == f"<Handle {noop.__qualname__}({args}) at {__file__}:{noop_line(noop)}>"
    h.cancel()
    assert repr(h) == "<Handle cancelled>"


def test_handle_methods_have_signatures(loop):
    """inspect.signature() works on handle methods (METH_NOARGS methods need a text
    signature for it before Python 3.13)."""
    import inspect

    handle = loop.call_soon(print)
    timer = loop.call_later(10, print)
    methods = [handle.cancel, handle.cancelled, timer.cancel, timer.when]
    if hasattr(handle, "get_context"):  # asyncio's from 3.12
        methods.append(handle.get_context)
    try:
        assert [str(inspect.signature(m)) for m in methods] == ["()"] * len(methods)
    finally:
        handle.cancel()
        timer.cancel()


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


def test_callbacks_from_one_context_each_run_in_their_own_copy(loop):
    """Every callback scheduled without ``context=`` runs in its own copy of the context
    it was scheduled from: a variable one of them sets is seen neither by the others
    nor by the caller, whichever scheduling method created it."""
    import threading

    seen = []
    token = var.set("origin")
    try:

        def cb(tag):
            seen.append((tag, var.get()))
            var.set(f"set-by-{tag}")
            seen.append((tag, var.get()))

        for tag in ("a", "b"):
            loop.call_soon(cb, tag)
        loop.call_later(0, cb, "later")
        loop.call_at(loop.time(), cb, "at")
        t = threading.Thread(target=loop.call_soon_threadsafe, args=(cb, "thread"))
        t.start()  # a new thread starts with an empty context
        t.join()
        var.set("changed")
        loop.call_soon(cb, "c")
        run_briefly(loop, 3)
        assert var.get() == "changed"
    finally:
        var.reset(token)
    for tag, origin in [
        ("a", "origin"),
        ("b", "origin"),
        ("later", "origin"),
        ("at", "origin"),
        ("thread", "default"),
        ("c", "changed"),
    ]:
        i = seen.index((tag, origin))
        assert seen[i + 1] == (tag, f"set-by-{tag}")
    assert len(seen) == 12


def test_kept_handle_keeps_the_changes_of_its_callback(loop):
    """A handle the caller kept still has the context its callback ran in afterwards,
    variables it set included; handles nobody kept do not leak theirs."""

    def cb(value):
        var.set(value)

    h = loop.call_soon(cb, "kept")
    loop.call_soon(cb, "dropped")
    timer = loop.call_later(0, cb, "timer")
    seen = []
    loop.call_soon(lambda: seen.append(var.get()))
    run_briefly(loop, 2)
    assert seen == ["default"]
    ctx = h._context
    assert isinstance(ctx, contextvars.Context)
    assert ctx is h._context
    assert ctx[var] == "kept"
    assert timer._context[var] == "timer"
    assert var.get() == "default"


def test_context_read_inside_callback_is_the_one_it_runs_in(loop):
    """``handle._context`` read by the callback itself is its running context: later
    changes show in it, and it is still that object afterwards."""
    got = {}

    def cb():
        ctx = got["ctx"] = h._context
        got["before"] = ctx.get(var)
        var.set("inside")
        got["after"] = ctx.get(var)

    token = var.set("outer")
    try:
        h = loop.call_soon(cb)
    finally:
        var.reset(token)
    loop.call_soon(lambda: got.setdefault("next", var.get()))
    run_briefly(loop, 2)
    assert got["before"] == "outer"
    assert got["after"] == "inside"
    assert h._context is got["ctx"]
    assert got["next"] == "default"


def test_context_read_before_the_run_is_the_one_it_runs_in(loop):
    token = var.set("outer")
    try:
        h = loop.call_soon(var.set, "by-callback")
    finally:
        var.reset(token)
    ctx = h._context
    assert ctx[var] == "outer"
    run_briefly(loop)
    assert h._context is ctx
    assert ctx[var] == "by-callback"


def test_context_replaced_before_the_run_is_used(loop):
    ctx = contextvars.Context()
    ctx.run(var.set, "replacement")
    seen = []
    h = loop.call_soon(lambda: seen.append(var.get()))
    h._context = ctx
    run_briefly(loop)
    assert seen == ["replacement"]
    assert h._context is ctx


def test_reader_callback_keeps_its_context_between_runs(loop):
    """A reader's handle runs every time in the one copy made by add_reader: what the
    callback sets is there on its next run."""
    import socket

    a, b = socket.socketpair()
    try:
        seen = []

        def on_readable():
            a.recv(1)
            seen.append(var.get())
            var.set(var.get() + "+")
            if len(seen) < 3:
                b.send(b"x")

        token = var.set("r")
        try:
            loop.add_reader(a, on_readable)
        finally:
            var.reset(token)
        b.send(b"x")
        run_briefly(loop, 6)
        loop.remove_reader(a)
        assert seen == ["r", "r+", "r++"]
        assert var.get() == "default"
    finally:
        a.close()
        b.close()


def test_nested_loop_callbacks_keep_their_contexts(loop_factory):
    """A callback of one loop that runs another loop (on another thread) to completion:
    both loops' callbacks see the context they were scheduled from."""
    import threading

    outer = loop_factory()
    seen = []

    def inner_thread():
        inner = loop_factory()
        try:
            token = var.set("inner")
            inner.call_soon(lambda: seen.append(("inner", var.get())))
            var.reset(token)
            inner.call_soon(inner.stop)
            inner.run_forever()
        finally:
            inner.close()

    def cb():
        seen.append(("outer", var.get()))
        var.set("outer-set")
        t = threading.Thread(target=inner_thread)
        t.start()
        t.join()
        seen.append(("outer-after", var.get()))

    try:
        token = var.set("outer")
        outer.call_soon(cb)
        var.reset(token)
        outer.call_soon(lambda: seen.append(("outer-next", var.get())))
        outer.call_soon(outer.stop)
        outer.run_forever()
    finally:
        outer.close()
    assert seen == [
        ("outer", "outer"),
        ("inner", "inner"),
        ("outer-after", "outer-set"),
        ("outer-next", "default"),
    ]


def test_values_a_callback_sets_are_released_after_it(loop):
    """asyncio drops a callback's context copy with its handle: what the callback set
    in a variable is freed as soon as it returns."""
    freed = []

    class Value:
        def __del__(self):
            freed.append(True)

    def cb():
        var.set(Value())
        loop.stop()

    loop.call_soon(cb)
    loop.run_forever()
    assert freed == [True]


def test_unclosed_loop_held_by_a_context_variable_is_collected(loop_factory):
    """A callback's context that refers back to the loop does not keep an unclosed,
    unreferenced loop alive."""
    import gc
    import warnings

    def run_and_forget():
        loop = loop_factory()

        def cb():
            var.set(loop)
            loop.stop()

        def schedule():
            var.set(loop)  # the context callbacks are scheduled from refers to the loop
            loop.call_soon(len, ())
            loop.call_soon(cb)

        contextvars.Context().run(schedule)
        loop.run_forever()
        return weakref.ref(loop)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        ref = run_and_forget()
        gc.collect()
        gc.collect()
    assert ref() is None


def test_running_the_loop_inside_any_live_context(loop):
    """Entering any Context found by the collector (including one the loop may reuse)
    and running the loop inside it: callbacks see their own variables, nothing
    crashes."""
    import gc

    def cb():
        var.set(["set-by-callback"])
        loop.stop()

    loop.call_soon(cb)
    loop.run_forever()
    seen = []

    def inside():
        before = var.get()
        other = contextvars.Context()
        other.run(loop.call_soon, lambda: seen.append(var.get()))
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert var.get() == before

    for ctx in [o for o in gc.get_objects() if type(o) is contextvars.Context]:
        try:
            ctx.run(inside)
        except RuntimeError as exc:
            assert "already entered" in str(exc)
    assert seen and all(v == "default" for v in seen)


def test_weak_reference_to_a_callbacks_context(loop):
    refs = []
    kept = {}

    def cb():
        refs.append(weakref.ref(kept["h"]._context))
        var.set("in-callback")

    kept["h"] = loop.call_soon(cb)
    run_briefly(loop)
    assert refs[0]() is kept["h"]._context
    assert kept["h"]._context[var] == "in-callback"
    kept.clear()
    loop.call_soon(var.set, "next")
    run_briefly(loop)
    assert refs[0]() is None


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
    args = repr_args("'ran'")
    assert repr(h) == f"<Handle list.append({args})>"


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
