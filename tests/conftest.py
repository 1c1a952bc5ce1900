"""Shared fixtures.

Parity first: every behaviour test runs on stdlib asyncio (the oracle) and on ferroloop,
through the ``loop`` fixture parametrized over the two loop factories. The fixture installs
an exception handler that records every context it is given; a test that expects the
handler to be called consumes the records from ``loop_errors`` (and clears it), and the
fixture fails the test at teardown if any unexpected record is left.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from _util import LOOP_FACTORIES

# Create the default policy now, so the guard below sees one policy throughout.
asyncio.events._init_event_loop_policy()


_BROKEN_LOOPS: list = []


@pytest.fixture(params=list(LOOP_FACTORIES))
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
