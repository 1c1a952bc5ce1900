"""run_in_executor, the default executor, and its shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import sys
import threading
import time

import pytest
from _util import PY312


def test_default_executor_created_lazily(loop):
    assert loop._default_executor is None

    async def main():
        return await loop.run_in_executor(None, lambda: threading.current_thread().name)

    name = loop.run_until_complete(main())
    assert name.startswith("asyncio_")
    assert isinstance(loop._default_executor, concurrent.futures.ThreadPoolExecutor)
    loop.run_until_complete(loop.shutdown_default_executor())


def test_run_in_executor_result_and_args(loop):
    async def main():
        return await loop.run_in_executor(None, pow, 2, 10)

    assert loop.run_until_complete(main()) == 1024
    loop.run_until_complete(loop.shutdown_default_executor())


def test_run_in_executor_exception(loop):
    def fail():
        raise ValueError("in executor")

    async def main():
        await loop.run_in_executor(None, fail)

    with pytest.raises(ValueError, match="in executor"):
        loop.run_until_complete(main())
    loop.run_until_complete(loop.shutdown_default_executor())


def test_run_in_executor_returns_asyncio_future(loop):
    fut = loop.run_in_executor(None, time.sleep, 0)
    assert isinstance(fut, asyncio.Future)
    assert fut.get_loop() is loop
    loop.run_until_complete(fut)
    loop.run_until_complete(loop.shutdown_default_executor())


def test_thread_pool_executor(loop):
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mine") as ex:

        async def main():
            return await asyncio.gather(
                *(loop.run_in_executor(ex, lambda: threading.current_thread().name) for _ in "ab")
            )

        names = loop.run_until_complete(main())
    assert all(n.startswith("mine") for n in names)
    assert loop._default_executor is None


def test_process_pool_executor(loop):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:

        async def main():
            return await loop.run_in_executor(ex, pow, 3, 4)

        assert loop.run_until_complete(main()) == 81


def test_set_default_executor(loop):
    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="default-mine")
    loop.set_default_executor(ex)

    async def main():
        return await loop.run_in_executor(None, lambda: threading.current_thread().name)

    assert loop.run_until_complete(main()).startswith("default-mine")
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(print)


def test_set_default_executor_rejects_other_executors(loop):
    """From Python 3.11; 3.10's asyncio takes them with a DeprecationWarning (ferroloop
    raised on 3.10 too)."""
    ctx = multiprocessing.get_context("spawn")
    ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx)
    try:
        if sys.version_info < (3, 11):
            with pytest.warns(DeprecationWarning, match="not an instance of ThreadPoolExecutor"):
                loop.set_default_executor(ex)
            assert loop._default_executor is ex
            assert loop.run_until_complete(loop.run_in_executor(None, abs, -3)) == 3
            return
        with pytest.raises(TypeError, match=r"^executor must be ThreadPoolExecutor instance$"):
            loop.set_default_executor(ex)
        with pytest.raises(TypeError, match=r"^executor must be ThreadPoolExecutor instance$"):
            loop.set_default_executor(object())
    finally:
        ex.shutdown()
    assert loop._default_executor is None


def test_shutdown_default_executor_waits(loop):
    finished = []

    def slow():
        time.sleep(0.05)
        finished.append(True)

    async def main():
        loop.run_in_executor(None, slow)
        await loop.shutdown_default_executor()
        return list(finished)

    assert loop.run_until_complete(main()) == [True]


def test_run_in_executor_after_shutdown(loop):
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError, match=r"^Executor shutdown has been called$"):
        loop.run_in_executor(None, print)


def test_shutdown_default_executor_without_executor(loop):
    loop.run_until_complete(loop.shutdown_default_executor())
    assert loop._default_executor is None


def test_shutdown_default_executor_timeout(loop_name, loop):
    if loop_name == "asyncio" and not PY312:
        pytest.skip("shutdown_default_executor(timeout=) is new in Python 3.12")
    release = threading.Event()

    async def main():
        loop.run_in_executor(None, release.wait)
        t0 = loop.time()
        with pytest.warns(RuntimeWarning, match="did not finishing joining its threads within"):
            await loop.shutdown_default_executor(timeout=0.05)
        return loop.time() - t0

    try:
        elapsed = loop.run_until_complete(main())
    finally:
        release.set()
    assert 0.04 <= elapsed < 1


def test_close_shuts_executor_down_without_waiting(loop):
    release = threading.Event()
    ex = concurrent.futures.ThreadPoolExecutor(1)
    loop.set_default_executor(ex)
    job = loop.run_in_executor(None, release.wait, 5)
    try:
        t0 = time.monotonic()
        loop.close()
        elapsed = time.monotonic() - t0
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            ex.submit(print)
        assert elapsed < 0.5
    finally:
        release.set()
        ex.shutdown(wait=True)
    assert loop._default_executor is None
    assert not job.done()  # its loop is closed: the result never arrives


def test_run_in_executor_debug_rejects_coroutine_function(loop):
    loop.set_debug(True)

    async def coro_fn():
        pass

    with pytest.raises(TypeError, match=r"^coroutines cannot be used with run_in_executor\(\)$"):
        loop.run_in_executor(None, coro_fn)


def test_run_in_executor_debug_rejects_non_callable(loop):
    loop.set_debug(True)
    with pytest.raises(
        TypeError, match=r"^a callable object was expected by run_in_executor\(\), got 1$"
    ):
        loop.run_in_executor(None, 1)
