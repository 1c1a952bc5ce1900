"""Exception handlers: set/get/default/call_exception_handler, logging, BaseExceptions."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from _util import LOOP_FACTORIES, repr_args, run_briefly


def boom():
    raise ZeroDivisionError("boom")


def test_get_set_exception_handler(loop_factory):
    loop = loop_factory()
    try:
        assert loop.get_exception_handler() is None

        def handler(lp, ctx):
            pass

        loop.set_exception_handler(handler)
        assert loop.get_exception_handler() is handler
        loop.set_exception_handler(None)
        assert loop.get_exception_handler() is None
        with pytest.raises(TypeError, match=r"^A callable object or None is expected, got 1$"):
            loop.set_exception_handler(1)
    finally:
        loop.close()


def test_callback_exception_context(loop, loop_errors):
    loop.set_debug(False)
    h = loop.call_soon(boom)
    run_briefly(loop)
    assert len(loop_errors) == 1
    ctx = loop_errors.pop()
    assert set(ctx) == {"message", "exception", "handle"}
    assert ctx["message"] == f"Exception in callback boom() at {__file__}:{line_of(boom)}"
    assert type(ctx["exception"]) is ZeroDivisionError
    assert ctx["handle"] is h


def test_callback_exception_context_debug(loop, loop_errors):
    loop.set_debug(True)
    h = loop.call_soon(boom)
    lineno = current_line() - 1
    run_briefly(loop)
    assert len(loop_errors) == 1
    ctx = loop_errors.pop()
    assert set(ctx) == {"message", "exception", "handle", "source_traceback"}
    assert ctx["source_traceback"] is h._source_traceback
    assert ctx["source_traceback"][-1][:2] == (__file__, lineno)


def test_callback_exception_args_in_message(loop, loop_errors):
    loop.set_debug(False)

    def fails(a, b):
        raise ValueError(a)

    loop.call_soon(fails, 1, "two")
    run_briefly(loop)
    ctx = loop_errors.pop()
    args = repr_args("1, 'two'")
    assert ctx["message"] == (
        f"Exception in callback {fails.__qualname__}({args}) at {__file__}:{line_of(fails)}"
    )


def test_timer_callback_exception_context(loop, loop_errors):
    h = loop.call_later(0, boom)
    run_briefly(loop)
    ctx = loop_errors.pop()
    assert ctx["handle"] is h
    assert isinstance(ctx["handle"], asyncio.TimerHandle)
    assert type(ctx["exception"]) is ZeroDivisionError


def test_custom_handler_context(loop_factory):
    """Which contextvars context a custom handler runs in: the handle's own context on
    Python 3.12+, the loop's (outer) context before."""
    import contextvars

    var = contextvars.ContextVar("var", default="outer")
    loop = loop_factory()
    seen = []
    loop.set_exception_handler(lambda lp, ctx: seen.append(var.get()))
    cb_ctx = contextvars.Context()
    cb_ctx.run(var.set, "callback")
    try:
        loop.call_soon(boom, context=cb_ctx)
        run_briefly(loop)
    finally:
        loop.close()
    assert seen == ["callback" if sys.version_info >= (3, 12) else "outer"]


def test_handler_called_with_loop_and_context(loop_factory):
    loop = loop_factory()
    calls = []

    def handler(*args, **kwargs):
        calls.append((args, kwargs))

    loop.set_exception_handler(handler)
    try:
        loop.call_exception_handler({"message": "custom", "extra": 1})
        assert calls == [((loop, {"message": "custom", "extra": 1}), {})]
    finally:
        loop.close()


def test_default_exception_handler_logs(loop_factory, caplog):
    loop = loop_factory()
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            loop.default_exception_handler({"message": "my message", "extra": [1, 2]})
            loop.default_exception_handler({})
    finally:
        loop.close()
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.levelname, r.getMessage()) for r in records] == [
        ("asyncio", "ERROR", "my message\nextra: [1, 2]"),
        ("asyncio", "ERROR", "Unhandled exception in event loop"),
    ]
    assert not records[0].exc_info


def test_default_exception_handler_with_exception(loop_factory, caplog):
    loop = loop_factory()
    exc = ValueError("logged")
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.call_exception_handler({"message": "with exc", "exception": exc})
    finally:
        loop.close()
    (record,) = caplog.records
    assert record.getMessage() == "with exc"
    assert record.exc_info[1] is exc


def _log_callback_error(factory, debug):
    """Run a failing callback on a fresh loop with the default handler; return the
    asyncio log records (level, message, exception type)."""
    loop = factory()
    loop.set_debug(debug)
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                exc = record.exc_info[0] if record.exc_info else None
                records.append((record.levelname, record.getMessage(), exc))

    logger = logging.getLogger("asyncio")
    collector = Collect()
    logger.addHandler(collector)
    try:
        loop.call_soon(boom)
        run_briefly(loop)
    finally:
        logger.removeHandler(collector)
        loop.close()
    return records


@pytest.mark.parametrize("debug", [False, True], ids=["nodebug", "debug"])
def test_callback_error_log_record_identical(debug):
    results = {name: _log_callback_error(f, debug) for name, f in LOOP_FACTORIES.items()}
    assert results["asyncio"], "stdlib logged nothing"
    assert results["ferroloop"] == results["asyncio"]


def test_callback_error_logged_by_default(loop_factory, caplog):
    loop = loop_factory()
    loop.set_debug(False)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.call_soon(boom)
            run_briefly(loop)
    finally:
        loop.close()
    (record,) = caplog.records
    assert record.name == "asyncio"
    assert record.levelname == "ERROR"
    msg = record.getMessage()
    assert msg.startswith(f"Exception in callback boom() at {__file__}:")
    assert "\nhandle: <Handle boom() at " in msg
    assert record.exc_info[0] is ZeroDivisionError


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_propagate_from_callback(loop, exc_type):
    order = []

    def raiser():
        order.append("raiser")
        raise exc_type

    loop.call_soon(raiser)
    loop.call_soon(order.append, "after")
    with pytest.raises(exc_type):
        loop.run_forever()
    assert order == ["raiser"]
    assert not loop.is_running()
    # The rest of the batch is still queued and runs on the next iteration.
    run_briefly(loop)
    assert order == ["raiser", "after"]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_propagate_from_timer(loop, exc_type):
    def raiser():
        raise exc_type

    loop.call_later(0.001, raiser)
    guard = loop.call_later(5, loop.stop)
    with pytest.raises(exc_type):
        loop.run_forever()
    guard.cancel()
    assert not loop.is_running()


def test_error_in_custom_handler_is_logged(loop_factory, caplog):
    loop = loop_factory()

    def bad_handler(lp, ctx):
        raise RuntimeError("handler broke")

    loop.set_exception_handler(bad_handler)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.call_soon(boom)
            run_briefly(loop)
    finally:
        loop.close()
    (record,) = caplog.records
    assert record.levelname == "ERROR"
    msg = record.getMessage()
    assert msg.startswith("Unhandled error in exception handler\ncontext: {'message': ")
    assert record.exc_info[0] is RuntimeError


def test_error_in_custom_handler_log_identical():
    def scenario(factory):
        loop = factory()
        loop.set_debug(False)
        records = []

        class Collect(logging.Handler):
            def emit(self, record):
                records.append((record.levelname, record.getMessage().split("\n")[0]))

        def bad_handler(lp, ctx):
            raise RuntimeError("handler broke")

        loop.set_exception_handler(bad_handler)
        logger = logging.getLogger("asyncio")
        collector = Collect()
        logger.addHandler(collector)
        try:
            loop.call_exception_handler({"message": "original"})
        finally:
            logger.removeHandler(collector)
            loop.close()
        return records

    results = {name: scenario(f) for name, f in LOOP_FACTORIES.items()}
    assert results["asyncio"] == [("ERROR", "Unhandled error in exception handler")]
    assert results["ferroloop"] == results["asyncio"]


def test_keyboard_interrupt_in_custom_handler_propagates(loop):
    def handler(lp, ctx):
        raise KeyboardInterrupt

    loop.set_exception_handler(handler)
    loop.call_soon(boom)
    with pytest.raises(KeyboardInterrupt):
        run_briefly(loop)


def test_exception_in_task_reported_on_gc(loop, loop_errors):
    import gc

    async def fail():
        raise ValueError("never retrieved")

    task = loop.create_task(fail())
    run_briefly(loop)
    assert task.done()
    del task
    gc.collect()
    assert len(loop_errors) == 1
    ctx = loop_errors.pop()
    assert ctx["message"] == "Task exception was never retrieved"
    assert type(ctx["exception"]) is ValueError


def line_of(fn) -> int:
    return fn.__code__.co_firstlineno


def current_line() -> int:
    return sys._getframe(1).f_lineno


class _FailingProtocol(asyncio.Protocol):
    def data_received(self, data):
        raise KeyError("data_received")


def test_custom_handler_runs_while_the_exception_is_handled(loop):
    """asyncio calls the exception handler from the `except` block that caught the
    error: `sys.exc_info()` is that exception there, so a handler's `logger.exception()`
    or `traceback.print_exc()` shows it, and an error the handler raises chains to it.
    ferroloop's handler used to run with no exception active."""
    seen = []

    def handler(lp, ctx):
        seen.append(sys.exc_info()[1])
        if len(seen) == 2:
            raise RuntimeError("handler broke")

    async def main():
        loop.set_exception_handler(handler)
        loop.call_soon(boom)
        await asyncio.sleep(0.01)
        loop.call_later(0.001, boom)  # this time the handler raises
        await asyncio.sleep(0.05)
        server = await loop.create_server(_FailingProtocol, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*server.sockets[0].getsockname())
        w.write(b"x")
        await r.read()  # the failing transport is closed
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()
        # Nothing is left handled afterwards.
        return sys.exc_info()[1]

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("asyncio")
    collector = Collect()
    logger.addHandler(collector)
    try:
        assert loop.run_until_complete(main()) is None
    finally:
        logger.removeHandler(collector)
    assert [type(e) for e in seen] == [ZeroDivisionError, ZeroDivisionError, KeyError]
    assert str(seen[2]) == "'data_received'"
    (record,) = [r for r in records if r.getMessage().startswith("Unhandled error")]
    raised = record.exc_info[1]
    assert isinstance(raised, RuntimeError)
    assert raised.__context__ is seen[1]
