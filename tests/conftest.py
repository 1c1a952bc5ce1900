"""Shared fixtures.

Parity first: every behaviour test runs on stdlib asyncio (the oracle) and on ferroloop,
through the ``loop`` fixture parametrized over the two loop factories. The fixture installs
an exception handler that records every context it is given; a test that expects the
handler to be called consumes the records from ``loop_errors`` (and clears it), and the
fixture fails the test at teardown if any unexpected record is left.

A loop method ferroloop does not implement yet raises NotImplementedError("ferroloop does
not implement loop.<name>() yet"); a test that runs into it (raised, chained, in an
exception group, or handed to the exception handler) is reported as an imperative xfail
naming the method, so each test runs for real as soon as its methods land.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from _util import LOOP_FACTORIES, TESTED_LOOPS, not_implemented_method

# Create the default policy now, so the guard below sees one policy throughout.
asyncio.events._init_event_loop_policy()


_BROKEN_LOOPS: list = []


@pytest.fixture(params=TESTED_LOOPS)
def loop_name(request) -> str:
    """``"asyncio"`` or ``"ferroloop"``: the loop implementation under test."""
    return request.param


@pytest.fixture
def loop_factory(loop_name):
    return LOOP_FACTORIES[loop_name]


@pytest.fixture
def loop_errors() -> list[dict]:
    """Contexts passed to the loop's exception handler. Tests that expect some must
    consume them (``loop_errors.clear()``); leftovers fail the test."""
    return []


@pytest.fixture
def loop(loop_factory, loop_errors):
    loop = loop_factory()

    def record(lp, context):
        assert lp is loop
        loop_errors.append(context)

    loop.set_exception_handler(record)
    yield loop
    if loop.is_running():
        # The loop claims to be running although run_forever() has returned: it can
        # be neither closed nor collected without a ResourceWarning that would surface
        # in a later test, so it is kept alive and this test fails.
        _BROKEN_LOOPS.append(loop)
        pytest.fail("loop.is_running() is still true after run_forever() returned")
    loop.close()
    assert not loop_errors, f"unexpected exception handler calls: {loop_errors!r}"


@pytest.fixture(autouse=True)
def _process_state_guard():
    """Fails a test that leaks process-wide state: the event loop policy, a running
    loop, a signal wake-up fd or a SIGINT handler."""
    policy = asyncio.events._event_loop_policy
    sigint = signal.getsignal(signal.SIGINT)
    yield
    leaked = []
    if asyncio.events._event_loop_policy is not policy:
        asyncio.events._event_loop_policy = policy
        leaked.append("event loop policy")
    if asyncio.events._get_running_loop() is not None:
        asyncio.events._set_running_loop(None)
        leaked.append("running loop")
    wakeup_fd = signal.set_wakeup_fd(-1)
    if wakeup_fd != -1:
        leaked.append(f"signal wake-up fd {wakeup_fd}")
    if signal.getsignal(signal.SIGINT) is not sigint:
        signal.signal(signal.SIGINT, sigint)
        leaked.append("SIGINT handler")
    assert not leaked, f"test leaked process state: {', '.join(leaked)}"


# ---- loop methods ferroloop does not implement yet ---------------------------------------


def _not_implemented_reason(item, exc: BaseException | None) -> str | None:
    """If ``exc`` (raised by the test), or an exception handed to the loop's exception
    handler, is a ferroloop placeholder's NotImplementedError, the xfail reason naming
    the method; else None. Any other error, including any other NotImplementedError,
    is left alone."""
    name = not_implemented_method(exc)
    errors = getattr(item, "funcargs", {}).get("loop_errors")
    if errors:
        for context in errors:
            name = name or not_implemented_method(context.get("exception"))
    if name is None:
        return None
    if errors:
        # Contexts caused by the missing method are not the test's concern.
        errors.clear()
    return f"ferroloop: loop.{name}() not implemented yet"


def _run_phase(item):
    """Body of the setup/call hook wrappers: a generator that yields to the phase and
    turns a missing ferroloop method into an imperative xfail (not subject to
    xfail_strict)."""
    try:
        result = yield
    except BaseException as exc:
        reason = _not_implemented_reason(item, exc)
        if reason is None:
            raise
        del exc
    else:
        reason = _not_implemented_reason(item, None)
        if reason is None:
            return result
    # Raised outside the except block, so that the xfail does not chain the original
    # traceback (pytest would format it, slowly, for every such test).
    pytest.xfail(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _run_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _run_phase(item))
