"""Futures and tasks on the loop, and the asyncio library running on top of it."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import threading
import warnings

import ferroloop
import pytest
from _util import LOOP_FACTORIES, run_briefly

py311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="new in Python 3.11")
task_context = pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="asyncio.Task takes context= from Python 3.11; on 3.10 ferroloop passes it on "
    "and Task rejects it (TypeError), as the stdlib loop's create_task does",
)

var = contextvars.ContextVar("var", default="default")


async def double(x):
    await asyncio.sleep(0)
    return 2 * x


# ---- futures ---------------------------------------------------------------------------


def test_create_future(loop):
    fut = loop.create_future()
    assert isinstance(fut, asyncio.Future)
    assert fut.get_loop() is loop
    assert not fut.done()
    loop.call_soon(fut.set_result, 7)
    assert loop.run_until_complete(fut) == 7


def test_future_done_callbacks_run_via_loop(loop):
    fut = loop.create_future()
    order = []
    fut.add_done_callback(lambda f: order.append(("cb", f.result())))
    fut.set_result(1)
    order.append("set")
    run_briefly(loop)
    assert order == ["set", ("cb", 1)]


def test_wrap_concurrent_future(loop):
    import concurrent.futures

    cf = concurrent.futures.Future()
    fut = asyncio.wrap_future(cf, loop=loop)
    threading.Timer(0.01, cf.set_result, ("from-thread",)).start()
    assert loop.run_until_complete(fut) == "from-thread"


def test_futures_and_tasks_belong_to_the_loop_that_made_them(loop, loop_factory):
    # Made by a loop that is not running, from inside another running loop, and from
    # inside a loop whose running-loop slot was changed or cleared: always the creating
    # loop.
    other = loop_factory()
    try:

        async def coro():
            return 1

        def make():
            f, t = other.create_future(), other.create_task(coro())
            assert f.get_loop() is other and t.get_loop() is other
            t.cancel()
            return f

        async def inside():
            made = [make()]
            mine = loop.create_future()
            task = loop.create_task(coro())
            assert mine.get_loop() is loop and task.get_loop() is loop
            await task
            asyncio.events._set_running_loop(other)
            try:
                f2 = loop.create_future()
                t2 = loop.create_task(coro())
            finally:
                asyncio.events._set_running_loop(loop)
            assert f2.get_loop() is loop and t2.get_loop() is loop
            await t2
            asyncio.events._set_running_loop(None)
            try:
                f3 = loop.create_future()
                t3 = loop.create_task(coro())
            finally:
                asyncio.events._set_running_loop(loop)
            assert f3.get_loop() is loop and t3.get_loop() is loop
            await t3
            return made

        made = loop.run_until_complete(inside())
        assert made[0].get_loop() is other
        other.run_until_complete(asyncio.sleep(0))
    finally:
        other.close()


def test_loop_that_made_futures_is_collected(loop_factory):
    import gc
    import weakref

    lp = loop_factory()
    fut = lp.create_future()
    task = lp.create_task(double(1))
    lp.run_until_complete(task)
    del fut, task
    lp.close()
    ref = weakref.ref(lp)
    del lp
    gc.collect()
    assert ref() is None

    # Not closed: only the collector can find what refers back to the loop.
    lp = loop_factory()
    lp.run_until_complete(lp.create_task(double(1)))
    lp.create_future()
    ref = weakref.ref(lp)
    del lp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert ref() is None


# ---- tasks ---------------------------------------------------------------------------


def test_create_task(loop):
    task = loop.create_task(double(21))
    assert isinstance(task, asyncio.Task)
    assert task.get_loop() is loop
    assert task.get_name().startswith("Task-")
    assert loop.run_until_complete(task) == 42


def test_create_task_with_name(loop):
    task = loop.create_task(double(1), name="my-task")
    assert task.get_name() == "my-task"
    loop.run_until_complete(task)


@task_context
def test_create_task_with_context(loop):
    ctx = contextvars.Context()
    ctx.run(var.set, "task-ctx")

    async def read():
        await asyncio.sleep(0)
        value = var.get()
        var.set("changed")
        return value

    task = loop.create_task(read(), context=ctx)
    assert loop.run_until_complete(task) == "task-ctx"
    assert ctx[var] == "changed"
    assert var.get() == "default"


@task_context
def test_task_step_that_cannot_enter_its_context_goes_to_the_exception_handler(
    loop, loop_errors, caplog
):
    # The task's context is the one the loop runs in: entering it again for the step
    # fails, and the step's handle reports it (ferroloop queues C task steps without a
    # handle and makes one for the report). From 3.12 the handler runs in the handle's
    # context too, which fails the same way: the default handler logs both.
    ctx = contextvars.copy_context()

    async def child():
        return 1

    async def main():
        task = loop.create_task(child(), context=ctx)
        await asyncio.sleep(0.01)
        return task

    task = ctx.run(loop.run_until_complete, main())
    assert not task.done()
    # Nothing schedules the task again (on either loop): it stays pending.
    task._log_destroy_pending = False
    task.get_coro().close()
    if sys.version_info >= (3, 12):
        assert not loop_errors
        [message] = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("Unhandled error in exception handler")
        ]
        assert "'message': 'Exception in callback <_asyncio.TaskStepMethWrapper" in message
        assert "'handle': <Handle <_asyncio.TaskStepMethWrapper object" in message
        assert "is already entered" in message
        return
    [context] = loop_errors
    loop_errors.clear()
    assert context["message"].startswith("Exception in callback <TaskStepMethWrapper object")
    assert isinstance(context["exception"], RuntimeError)
    assert "is already entered" in str(context["exception"])
    assert isinstance(context["handle"], asyncio.Handle)
    assert not isinstance(context["handle"], asyncio.TimerHandle)
    assert repr(context["handle"]).startswith("<Handle <TaskStepMethWrapper object")


def test_c_task_steps_are_queued_without_a_handle():
    """ferroloop only: what the loop's queue holds for a C task's step, as the cycle
    collector sees it (the wrapper and the task's context, no Handle)."""
    loop = ferroloop.new_event_loop()
    loop.set_debug(False)  # (PYTHONASYNCIODEBUG turns it on)
    try:

        async def one():
            return 1

        task = loop.create_task(one())
        assert type(task) is asyncio.Task
        held = gc.get_referents(loop)
        assert [type(r).__name__ for r in held if "TaskStepMethWrapper" in repr(type(r))] == [
            "TaskStepMethWrapper"
        ]
        assert not [r for r in held if isinstance(r, asyncio.Handle)]
        assert loop.run_until_complete(task) == 1
        loop.set_debug(True)
        task = loop.create_task(one())
        assert [r for r in gc.get_referents(loop) if isinstance(r, asyncio.Handle)]
        assert loop.run_until_complete(task) == 1
    finally:
        loop.close()


def test_future_done_callbacks_run_in_order_in_their_context(loop, loop_errors):
    # A C future schedules each done callback with call_soon(cb, fut, context=ctx);
    # ferroloop queues those without a handle and makes one only for the report of a
    # callback that raises.
    var = contextvars.ContextVar("var", default="unset")
    order = []
    seen = []

    def cb(fut):
        order.append(("cb", var.get(), fut.result()))

    def bad(fut):
        order.append("bad")
        raise ValueError("boom")

    fut = loop.create_future()
    ctx = contextvars.copy_context()
    ctx.run(var.set, "in ctx")
    fut.add_done_callback(cb, context=ctx)
    fut.add_done_callback(cb)
    fut.add_done_callback(bad)
    fut.add_done_callback(seen.append)  # a bound method (it gets the future)

    async def main():
        loop.call_soon(order.append, "a")
        fut.set_result(42)
        loop.call_soon(order.append, "c")
        task = loop.create_task(asyncio.sleep(0, "r"))
        task.add_done_callback(seen.append)
        await task
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert order == ["a", ("cb", "in ctx", 42), ("cb", "unset", 42), "bad", "c"]
    assert seen[0] is fut and seen[1].result() == "r" and len(seen) == 2
    [context] = loop_errors
    loop_errors.clear()
    assert context["message"].startswith("Exception in callback ")
    # The callback's arguments are shown up to 3.12 and in debug mode (where the
    # future's repr, shortened, ends with where it was created); 3.13 shows `bad()`.
    shown = "bad(<Future finis"
    if sys.version_info >= (3, 13) and not loop.get_debug():
        shown = "bad()"
    assert shown in context["message"]
    assert isinstance(context["exception"], ValueError)
    handle = context["handle"]
    assert type(handle) is not asyncio.TimerHandle and isinstance(handle, asyncio.Handle)
    assert repr(handle).startswith("<Handle ")
    assert shown in repr(handle)
    assert handle._args == (fut,)


def test_c_future_done_callbacks_are_queued_without_a_handle():
    """ferroloop only: what the loop's queue holds for a C future's done callback, as the
    cycle collector sees it (the callback, the future and the context, no Handle)."""
    loop = ferroloop.new_event_loop()
    loop.set_debug(False)  # (PYTHONASYNCIODEBUG turns it on)
    try:
        calls = []

        def done(fut):
            calls.append(fut.result())

        for debug in (False, True):
            loop.set_debug(debug)
            fut = loop.create_future()
            fut.add_done_callback(done)
            fut.set_result(debug)
            held = gc.get_referents(loop)
            handles = [r for r in held if isinstance(r, asyncio.Handle)]
            if debug:
                assert handles and handles[0]._args == (fut,)
            else:
                assert not handles
                assert done in held and fut in held
            loop.call_soon(loop.stop)
            loop.run_forever()
        assert calls == [False, True]
    finally:
        loop.close()


def test_task_steps_and_callbacks_run_in_scheduling_order(loop):
    order = []

    async def step(name):
        order.append(name)
        await asyncio.sleep(0)
        order.append(name + "'")

    async def main():
        loop.call_soon(order.append, "a")
        loop.create_task(step("t1"))
        loop.call_soon(order.append, "b")
        loop.create_task(step("t2"))
        loop.call_soon(order.append, "c")
        for _ in range(4):
            await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert order == ["a", "t1", "b", "t2", "c", "t1'", "t2'"]


def test_debug_mode_switched_on_with_task_steps_queued(loop):
    async def work(i):
        await asyncio.sleep(0)
        return i

    tasks = [loop.create_task(work(i)) for i in range(3)]
    loop.set_debug(True)
    try:
        assert loop.run_until_complete(asyncio.gather(*tasks)) == [0, 1, 2]
    finally:
        loop.set_debug(False)


def test_create_task_copies_current_context(loop):
    token = var.set("outer")
    try:

        async def read():
            return var.get()

        task = loop.create_task(read())
    finally:
        var.reset(token)
    assert loop.run_until_complete(task) == "outer"


def test_create_task_unknown_keyword(loop):
    # The wording differs between Python versions (create_task vs Task rejecting it).
    coro = double(1)
    try:
        with pytest.raises(TypeError, match="'bogus'"):
            loop.create_task(coro, bogus=1)
    finally:
        coro.close()


def test_create_task_argument_shapes(loop):
    # create_task(coro, *, name=None, context=None): coro may be passed by keyword; a
    # second positional, a duplicate coro or no coro is a TypeError, as on asyncio.
    task = loop.create_task(coro=double(2), name="kw")
    assert task.get_name() == "kw"
    assert loop.run_until_complete(task) == 4
    task = loop.create_task(double(3), **{})
    assert loop.run_until_complete(task) == 6
    coro = double(1)
    try:
        with pytest.raises(TypeError, match="positional argument"):
            loop.create_task(coro, "name")
        with pytest.raises(TypeError, match="multiple values for argument 'coro'"):
            loop.create_task(coro, coro=coro)
    finally:
        coro.close()
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'coro'"):
        loop.create_task()
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'coro'"):
        loop.create_task(name="no-coro")
    assert not asyncio.all_tasks(loop)


def test_create_task_rejects_non_coroutine(loop):
    with pytest.raises(TypeError, match="a coroutine was expected, got 1"):
        loop.create_task(1)


def test_current_task_and_all_tasks(loop):
    async def main():
        me = asyncio.current_task()
        other = asyncio.create_task(asyncio.sleep(0.01))
        tasks = asyncio.all_tasks()
        await other
        return me, other, tasks

    task = loop.create_task(main())
    me, other, tasks = loop.run_until_complete(task)
    assert me is task
    assert tasks == {task, other}
    assert asyncio.current_task(loop) is None


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="a cancel message reaches the awaiting code from 3.11"
)
def test_task_cancel(loop):
    started = []

    async def sleeper():
        started.append(1)
        await asyncio.sleep(10)

    task = loop.create_task(sleeper())
    run_briefly(loop)
    assert started == [1]
    task.cancel("stop it")
    with pytest.raises(asyncio.CancelledError, match="stop it"):
        loop.run_until_complete(task)
    assert task.cancelled()


def test_gather_wait_shield_as_completed(loop):
    async def main():
        results = await asyncio.gather(double(1), double(2), double(3))
        done, pending = await asyncio.wait([asyncio.ensure_future(double(4))])
        shielded = await asyncio.shield(double(5))
        completed = [await f for f in asyncio.as_completed([double(6), double(7)])]
        return results, [t.result() for t in done], pending, shielded, sorted(completed)

    assert loop.run_until_complete(main()) == ([2, 4, 6], [8], set(), 10, [12, 14])


# ---- eager tasks ---------------------------------------------------------------------


@pytest.fixture
def eager_loop(loop_name, loop):
    """ferroloop supports loop.create_task(eager_start=) on every Python; stdlib only
    from 3.14 on (the parity oracle then)."""
    if loop_name == "asyncio" and sys.version_info < (3, 14):
        pytest.skip("stdlib loop.create_task(eager_start=) is new in Python 3.14")
    return loop


def test_eager_start_runs_first_step_synchronously(eager_loop):
    loop = eager_loop
    order = []

    async def body():
        order.append("body-start")
        await asyncio.sleep(0)
        order.append("body-end")
        return "result"

    async def main():
        task = loop.create_task(body(), eager_start=True)
        order.append("after-create")
        assert not task.done()
        return await task

    assert loop.run_until_complete(main()) == "result"
    assert order == ["body-start", "after-create", "body-end"]


def test_eager_task_done_immediately(eager_loop):
    loop = eager_loop

    async def immediate():
        return 42

    async def main():
        task = loop.create_task(immediate(), eager_start=True)
        assert task.done()
        return task.result()

    assert loop.run_until_complete(main()) == 42


def test_eager_task_exception_set_immediately(eager_loop):
    loop = eager_loop

    async def failing():
        raise ValueError("eager failure")

    async def main():
        task = loop.create_task(failing(), eager_start=True)
        assert task.done()
        with pytest.raises(ValueError, match="eager failure"):
            task.result()

    loop.run_until_complete(main())


def test_eager_task_current_task(eager_loop):
    loop = eager_loop
    seen = {}

    async def child():
        seen["inside"] = asyncio.current_task()
        await asyncio.sleep(0)
        seen["inside-later"] = asyncio.current_task()

    async def main():
        me = asyncio.current_task()
        task = loop.create_task(child(), eager_start=True)
        seen["after"] = asyncio.current_task()
        await task
        return me, task

    me, task = loop.run_until_complete(main())
    assert seen == {"inside": task, "after": me, "inside-later": task}


def test_eager_start_from_callback_outside_task(eager_loop):
    loop = eager_loop
    order = []

    async def child():
        order.append(("child", asyncio.current_task() is not None))

    def cb():
        task = loop.create_task(child(), eager_start=True)
        order.append(("created", task.done(), asyncio.current_task()))

    loop.call_soon(cb)
    run_briefly(loop)
    assert order == [("child", True), ("created", True, None)]


def test_eager_start_when_loop_not_running_is_lazy(eager_loop):
    loop = eager_loop
    order = []

    async def child():
        order.append("child")

    task = loop.create_task(child(), eager_start=True)
    assert order == []
    assert not task.done()
    loop.run_until_complete(task)
    assert order == ["child"]


def test_eager_start_false(eager_loop):
    loop = eager_loop
    order = []

    async def child():
        order.append("child")

    async def main():
        task = loop.create_task(child(), eager_start=False)
        order.append("created")
        await task

    loop.run_until_complete(main())
    assert order == ["created", "child"]


@task_context
def test_eager_start_with_context(eager_loop):
    loop = eager_loop
    ctx = contextvars.Context()
    ctx.run(var.set, "eager-ctx")

    async def child():
        return var.get()

    async def main():
        task = loop.create_task(child(), eager_start=True, context=ctx)
        assert task.done()
        return task.result()

    assert loop.run_until_complete(main()) == "eager-ctx"


# ---- task factory --------------------------------------------------------------------


def test_task_factory_default_none(loop):
    assert loop.get_task_factory() is None


@task_context
def test_task_factory_receives_kwargs(loop):
    calls = []

    def factory(lp, coro, **kwargs):
        calls.append((lp, kwargs))
        return asyncio.Task(coro, loop=lp, **kwargs)

    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory
    ctx = contextvars.Context()
    ctx.run(var.set, "factory-ctx")

    async def read():
        return var.get()

    task = loop.create_task(read(), context=ctx, name="named")
    assert task.get_name() == "named"
    assert loop.run_until_complete(task) == "factory-ctx"
    assert len(calls) == 1
    assert calls[0][0] is loop
    assert calls[0][1]["context"] is ctx
    loop.set_task_factory(None)
    assert loop.get_task_factory() is None
    task = loop.create_task(read())
    loop.run_until_complete(task)
    assert len(calls) == 1


def test_legacy_two_argument_task_factory_with_name(loop):
    """A ``factory(loop, coro)`` keeps working with ``create_task(coro, name=...)``:
    the loop sets the name itself instead of passing it (Python 3.13.3 and 3.14+ pass
    name= to the factory instead)."""
    if sys.version_info >= (3, 14) or sys.version_info[:3] == (3, 13, 3):
        pytest.skip("this Python passes name= to the task factory")

    def factory(lp, coro):
        return asyncio.Task(coro, loop=lp)

    loop.set_task_factory(factory)
    coro = double(1)
    try:
        task = loop.create_task(coro, name="legacy")
    except BaseException:
        coro.close()
        raise
    assert task.get_name() == "legacy"
    assert loop.run_until_complete(task) == 2


def test_task_factory_result_without_set_name(loop):
    """Before Python 3.13 asyncio names the factory's task through
    tasks._set_task_name(), which lets one without set_name() pass (with a
    DeprecationWarning from 3.11); 3.13 calls set_name(). ferroloop raised
    AttributeError on every Python."""

    class Wrapper(asyncio.Future):
        def __init__(self, coro, loop):
            super().__init__(loop=loop)
            self.task = asyncio.Task(coro, loop=loop)
            self.task.add_done_callback(lambda t: self.set_result(t.result()))

    loop.set_task_factory(lambda lp, coro: Wrapper(coro, lp))
    coro = double(21)
    if sys.version_info >= (3, 13):
        with pytest.raises(AttributeError, match="set_name"):
            loop.create_task(coro, name="worker")
        # (The factory has started the task: let it finish.)
        loop.run_until_complete(asyncio.sleep(0))
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper = loop.create_task(coro, name="worker")
    assert [w.category for w in caught] == (
        [DeprecationWarning] if sys.version_info >= (3, 11) else []
    )
    assert loop.run_until_complete(wrapper) == 42


def test_task_factory_used_by_asyncio_create_task(loop):
    created = []

    def factory(lp, coro, **kwargs):
        task = asyncio.Task(coro, loop=lp, **kwargs)
        created.append(task)
        return task

    loop.set_task_factory(factory)

    async def main():
        return await asyncio.create_task(double(4))

    assert loop.run_until_complete(main()) == 8
    assert len(created) == 2  # main() itself and the inner task


def test_set_task_factory_rejects_non_callable(loop):
    with pytest.raises(TypeError, match=r"^task factory must be a callable or None$"):
        loop.set_task_factory(1)
    assert loop.get_task_factory() is None


# ---- the asyncio library on top ------------------------------------------------------


@py311
def test_task_group(loop):
    async def fail():
        await asyncio.sleep(0.01)
        raise ValueError("in group")

    cancelled = []

    async def long():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(long())
            tg.create_task(fail())

    with pytest.raises(BaseExceptionGroup) as info:  # noqa: F821 (3.11+ builtin)
        loop.run_until_complete(main())
    assert [type(e) for e in info.value.exceptions] == [ValueError]
    assert cancelled == [True]


@py311
def test_task_group_results(loop):
    async def main():
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(double(i)) for i in range(5)]
        return [t.result() for t in tasks]

    assert loop.run_until_complete(main()) == [0, 2, 4, 6, 8]


@py311
def test_timeout(loop):
    async def main():
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await asyncio.sleep(10)
        elapsed = loop.time() - t0
        async with asyncio.timeout(1):
            await asyncio.sleep(0)
        return elapsed

    elapsed = loop.run_until_complete(main())
    assert 0.019 <= elapsed < 1


def test_wait_for(loop):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), 0.01)
        return await asyncio.wait_for(double(3), 1)

    assert loop.run_until_complete(main()) == 6


def test_lock_event_semaphore_condition(loop):
    order = []

    async def worker(i, lock, sem, event):
        await event.wait()
        async with sem, lock:
            order.append(i)
            await asyncio.sleep(0)

    async def main():
        lock = asyncio.Lock()
        sem = asyncio.Semaphore(2)
        event = asyncio.Event()
        cond = asyncio.Condition()
        tasks = [asyncio.create_task(worker(i, lock, sem, event)) for i in range(5)]
        await asyncio.sleep(0)
        event.set()
        await asyncio.gather(*tasks)

        async def waiter():
            async with cond:
                await cond.wait()
                return "notified"

        w = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        async with cond:
            cond.notify_all()
        return await w

    assert loop.run_until_complete(main()) == "notified"
    assert order == [0, 1, 2, 3, 4]


def test_queue(loop):
    async def producer(q):
        for i in range(100):
            await q.put(i)
        await q.put(None)

    async def consumer(q):
        items = []
        while (item := await q.get()) is not None:
            items.append(item)
            q.task_done()
        q.task_done()
        return items

    async def main():
        q = asyncio.Queue(maxsize=3)
        prod = asyncio.create_task(producer(q))
        items = await consumer(q)
        await prod
        await q.join()
        return items

    assert loop.run_until_complete(main()) == list(range(100))


def test_to_thread(loop):
    token = var.set("to-thread")
    try:

        async def main():
            return await asyncio.to_thread(lambda x: (x, var.get(), threading.get_ident()), 5)

        x, value, ident = loop.run_until_complete(main())
    finally:
        var.reset(token)
    assert (x, value) == (5, "to-thread")
    assert ident != threading.get_ident()
    loop.run_until_complete(loop.shutdown_default_executor())


@py311
@pytest.mark.parametrize("name", list(LOOP_FACTORIES))
def test_runner_with_loop_factory(name):
    async def main():
        return asyncio.get_running_loop(), await double(5)

    with asyncio.Runner(loop_factory=LOOP_FACTORIES[name]) as runner:
        loop = runner.get_loop()
        running, result = runner.run(main())
        assert running is loop
        assert result == 10
        assert runner.run(double(1)) == 2
    assert loop.is_closed()
    assert isinstance(loop, ferroloop.Loop) == (name == "ferroloop")


def test_ferroloop_run():
    async def main():
        return type(asyncio.get_running_loop())

    assert ferroloop.run(main()) is ferroloop.Loop


# ---- how tasks reach loop.call_soon --------------------------------------------------


def _counting_wrapper(calls, original):
    def call_soon(self, callback, *args, **kwargs):
        calls.append(callback)
        return original(self, callback, *args, **kwargs)

    return call_soon


async def _switch_a_few_times():
    for _ in range(3):
        await asyncio.sleep(0)
    fut = asyncio.get_running_loop().create_future()
    fut.add_done_callback(lambda f: None)
    fut.set_result(None)
    await fut


def test_tasks_use_a_call_soon_overridden_in_a_subclass(loop_factory):
    # Task and Future schedule through whatever `loop.call_soon` is: a subclass's
    # override must be seen, including by the C Task's per-step lookup.
    probe = loop_factory()
    base = type(probe)
    probe.close()
    calls = []

    class Sub(base):
        call_soon = _counting_wrapper(calls, base.call_soon)

    lp = Sub()
    try:
        lp.run_until_complete(_switch_a_few_times())
    finally:
        lp.close()
    assert len(calls) >= 5


def test_tasks_use_call_soon_patched_on_the_class_or_the_instance(loop):
    cls = type(loop)
    calls = []
    cls.call_soon = _counting_wrapper(calls, cls.call_soon)
    try:
        loop.run_until_complete(_switch_a_few_times())
    finally:
        del cls.call_soon
    assert len(calls) >= 5

    calls.clear()
    original = loop.call_soon
    loop.call_soon = lambda *a, **k: (calls.append(a[0]), original(*a, **k))[1]
    try:
        loop.run_until_complete(_switch_a_few_times())
    finally:
        del loop.call_soon
    assert len(calls) >= 5
    # Back to the class's own method.
    calls.clear()
    loop.run_until_complete(_switch_a_few_times())
    assert calls == []


def test_call_soon_as_an_attribute(loop):
    import inspect

    cls = type(loop)
    assert cls.call_soon.__name__ == "call_soon"
    assert "callback" in str(inspect.signature(loop.call_soon))
    assert loop.call_soon.__self__ is loop
    seen = []
    cls.call_soon(loop, seen.append, 1)
    loop.call_soon(seen.append, 2)
    bound = loop.call_soon
    bound(seen.append, 3)
    loop.run_until_complete(asyncio.sleep(0))
    assert seen == [1, 2, 3]
    # Not a loop: asyncio's Python method fails on the missing attribute, ferroloop's
    # descriptor on the type check.
    with pytest.raises((TypeError, AttributeError)):
        cls.call_soon(object(), print)
    with pytest.raises(TypeError):
        cls.call_soon()


def test_call_soon_type_check_across_types(loop_factory):
    # ferroloop remembers the last loop type it checked: other types must still be
    # checked, and a subclass changed after the check must still be accepted.
    base_loop = loop_factory()
    base = type(base_loop)
    sub_cls = type("SubLoop", (base,), {})
    sub = sub_cls()
    try:
        seen = []
        for _ in range(3):
            for lp in (base_loop, sub):
                base.call_soon(lp, seen.append, type(lp).__name__)
                lp.call_soon(seen.append, 0)
                for bad in (object(), object(), 3, 3):
                    with pytest.raises((TypeError, AttributeError)) as info:
                        base.call_soon(bad, print)
                    if info.type is TypeError:  # ferroloop: worded as CPython's descriptors
                        assert str(info.value) == (
                            "descriptor 'call_soon' for 'ferroloop._ferroloop.LoopCore' "
                            f"objects doesn't apply to a '{type(bad).__name__}' object"
                        )
            sub_cls.marker = len(seen)  # changes the class
        for lp in (base_loop, sub):
            lp.run_until_complete(asyncio.sleep(0))
        assert seen.count(0) == 6
        assert seen.count(base.__name__) == 3
        assert seen.count("SubLoop") == 3
    finally:
        base_loop.close()
        sub.close()


def test_call_soon_descriptor_cannot_be_made_or_changed_and_pickles(loop):
    import copy
    import pickle

    cls = type(loop)
    descr = cls.__dict__.get("call_soon") or next(
        k.__dict__["call_soon"] for k in cls.__mro__ if "call_soon" in k.__dict__
    )
    kind = type(descr)
    if kind.__module__ == "ferroloop._ferroloop":
        with pytest.raises(TypeError):
            kind()
        with pytest.raises(TypeError):
            object.__new__(kind)
        with pytest.raises(TypeError):
            kind.__get__ = lambda *a: None
    assert pickle.loads(pickle.dumps(descr)) is descr
    assert copy.deepcopy(descr) is descr


def test_futures_keep_their_loop_if_the_loops_internals_are_tampered_with(loop):
    import gc

    other = asyncio.new_event_loop()
    try:
        loop.create_future()
        for obj in gc.get_referents(loop):
            if type(obj) is dict and obj.get("loop") is loop and len(obj) == 1:
                obj["loop"] = other
                obj["extra"] = 1
        assert loop.create_future().get_loop() is loop
        assert loop.create_task(double(1)).get_loop() is loop
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        other.close()


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="Python 3.10 only")
def test_create_task_context_on_310_is_a_clear_error(loop_name, loop):
    if loop_name != "ferroloop":
        pytest.skip("ferroloop's message; the stdlib loop has no context= here at all")

    async def coro():
        return 1

    c = coro()
    with pytest.raises(TypeError, match=r"needs Python 3\.11 or later"):
        loop.create_task(c, context=contextvars.copy_context())
    c.close()
    # context=None is what leaving it out means.
    assert loop.run_until_complete(loop.create_task(coro(), context=None)) == 1
