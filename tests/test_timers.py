"""call_later / call_at: ordering, TimerHandle, cancellation, the loop clock."""

from __future__ import annotations

import asyncio
import decimal
import random
import threading
import time

import pytest
from _util import repr_args, run_briefly, run_until


def test_call_later_returns_timer_handle(loop):
    h = loop.call_later(10, print)
    assert isinstance(h, asyncio.TimerHandle)
    assert type(h).__name__ == "TimerHandle"
    h2 = loop.call_at(loop.time() + 10, print)
    assert isinstance(h2, asyncio.TimerHandle)
    h.cancel()
    h2.cancel()


def test_timers_fire_in_deadline_order(loop):
    order = []
    for delay in (0.03, 0.01, 0.02, 0.0):
        loop.call_later(delay, order.append, delay)
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert order == [0.0, 0.01, 0.02, 0.03]


def test_zero_and_negative_delays_vs_call_soon(loop):
    """Due timers are appended to the ready queue after the callbacks already there,
    in deadline order, and run in the same iteration."""
    order = []
    loop.call_soon(order.append, "soon1")
    loop.call_later(0, order.append, "later0")
    loop.call_later(-1, order.append, "later-1")
    loop.call_soon(order.append, "soon2")
    loop.call_at(loop.time() - 5, order.append, "at-5")
    loop.call_later(-0.5, order.append, "later-0.5")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order == ["soon1", "soon2", "at-5", "later-1", "later-0.5", "later0"]


def test_zero_delay_scheduled_from_callback(loop):
    order = []

    def cb():
        order.append("cb")
        loop.call_later(0, order.append, "later0")
        loop.call_soon(order.append, "soon")

    loop.call_soon(cb)
    loop.call_soon(order.append, "batch")
    run_briefly(loop)
    assert order == ["cb", "batch"]
    run_briefly(loop)
    assert order == ["cb", "batch", "soon", "later0"]


def test_stop_does_not_wait_for_future_timers(loop):
    order = []
    loop.call_later(10, order.append, "late")
    t0 = time.monotonic()
    run_briefly(loop)
    assert time.monotonic() - t0 < 1
    assert order == []


def test_timer_handle_when(loop):
    before = loop.time()
    h = loop.call_later(5, print)
    after = loop.time()
    assert before + 5 <= h.when() <= after + 5
    assert isinstance(h.when(), float)
    h_at = loop.call_at(1234.5, print)
    assert h_at.when() == 1234.5
    h_int = loop.call_at(5, print)
    assert h_int.when() == 5
    assert type(h_int.when()) is int
    for x in (h, h_at, h_int):
        x.cancel()


def test_timer_handle_repr(loop):
    loop.set_debug(False)
    h = loop.call_at(5, print, 1)
    assert repr(h) == f"<TimerHandle when=5 print({repr_args('1')})>"
    h.cancel()
    assert repr(h) == "<TimerHandle cancelled when=5>"


def test_timer_handle_ordering_and_equality(loop):
    h1 = loop.call_at(10, print)
    h2 = loop.call_at(20, print)
    h1_same = loop.call_at(10, print)
    h1_other_args = loop.call_at(10, print, 1)
    assert h1 < h2
    assert h1 <= h2
    assert h2 > h1
    assert h2 >= h1
    assert h1 <= h1_same
    assert h1 >= h1_same
    assert not h1 < h1_same
    assert h1 == h1_same
    assert h1 != h2
    assert h1 != h1_other_args
    assert hash(h1) == hash(h1_same) == hash(10)
    assert sorted([h2, h1]) == [h1, h2]
    h1_same.cancel()
    assert h1 != h1_same
    for h in (h1, h2, h1_other_args):
        h.cancel()


def test_cancelled_timer_does_not_fire(loop):
    called = []
    h = loop.call_later(0.01, called.append, "cancelled")
    loop.call_later(0.02, called.append, "kept")
    assert not h.cancelled()
    h.cancel()
    assert h.cancelled()
    h.cancel()
    loop.call_later(0.03, loop.stop)
    loop.run_forever()
    assert called == ["kept"]


def test_cancel_timer_from_earlier_timer(loop):
    called = []
    victim = None

    def killer():
        called.append("killer")
        victim.cancel()

    loop.call_later(0.01, killer)
    victim = loop.call_later(0.01, called.append, "victim")
    run_until(loop, lambda: called)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert called == ["killer"]


def test_many_timers_half_cancelled(loop):
    """10k timers, every other one cancelled (lazy cancel: they stay in the queue)."""
    n = 10_000
    fired = []
    now = loop.time()
    handles = []
    for i in range(n):
        handles.append(loop.call_at(now + 0.001 + i * 1e-5, fired.append, i))
    for h in handles[::2]:
        h.cancel()
    last = handles[-1]
    run_until(loop, lambda: len(fired) == n // 2)
    assert fired == list(range(1, n, 2))
    assert last.when() <= loop.time() + 1e-6


def test_many_timers_mostly_cancelled_in_random_order(loop):
    """More than half cancelled: the queue is compacted; the survivors still fire in
    deadline order."""
    n = 10_000
    rng = random.Random(42)
    whens = [rng.uniform(0.001, 0.1) for _ in range(n)]
    now = loop.time()
    fired = []
    handles = [loop.call_at(now + w, fired.append, i) for i, w in enumerate(whens)]
    cancelled = set(rng.sample(range(n), 7_000))
    for i in cancelled:
        handles[i].cancel()
    survivors = sorted(set(range(n)) - cancelled, key=lambda i: whens[i])
    run_until(loop, lambda: len(fired) >= len(survivors))
    run_briefly(loop)
    assert fired == survivors


def test_timers_cancelled_while_running(loop):
    n = 2_000
    fired = []
    now = loop.time()
    handles = []

    def cb(i):
        fired.append(i)
        # Each timer cancels the one three places after it.
        if i + 3 < n:
            handles[i + 3].cancel()

    for i in range(n):
        handles.append(loop.call_at(now + 0.001 + i * 1e-5, cb, i))
    expected = []
    cancelled = set()
    for i in range(n):
        if i in cancelled:
            continue
        expected.append(i)
        cancelled.add(i + 3)
    run_until(loop, lambda: fired and fired[-1] >= expected[-1])
    assert fired == expected


def test_timer_does_not_fire_early(loop):
    seen = []
    h = loop.call_later(0.05, lambda: seen.append(loop.time()))
    t0 = time.monotonic()
    run_until(loop, lambda: seen)
    assert time.monotonic() - t0 >= 0.05 - 0.002
    assert seen[0] >= h.when() - 0.001


def test_sleep_duration(loop):
    async def main():
        t0 = loop.time()
        await asyncio.sleep(0.05)
        return loop.time() - t0

    elapsed = loop.run_until_complete(main())
    assert 0.049 <= elapsed < 0.5


def test_loop_time_is_monotonic_clock(loop):
    for _ in range(100):
        a = time.monotonic()
        t = loop.time()
        b = time.monotonic()
        assert a <= t <= b


@pytest.mark.parametrize(
    ("delay", "exc_type", "message"),
    [
        (None, TypeError, "delay must not be None"),
        ("1", TypeError, "unsupported operand type(s) for +: 'float' and 'str'"),
        (
            decimal.Decimal("0.1"),
            TypeError,
            "unsupported operand type(s) for +: 'float' and 'decimal.Decimal'",
        ),
        (10**400, OverflowError, "int too large to convert to float"),
    ],
    ids=["None", "str", "Decimal", "huge-int"],
)
def test_call_later_bad_delay(loop, delay, exc_type, message):
    with pytest.raises(exc_type) as info:
        loop.call_later(delay, print)
    assert type(info.value) is exc_type
    assert str(info.value) == message


def test_call_at_none(loop):
    with pytest.raises(TypeError, match=r"^when cannot be None$"):
        loop.call_at(None, print)


def test_far_future_timers_do_not_block_stop(loop):
    hs = [loop.call_later(d, print) for d in (1e9, float("inf"))]
    hs.append(loop.call_at(1e300, print))
    t0 = time.monotonic()
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert time.monotonic() - t0 < 1
    for h in hs:
        h.cancel()


@pytest.mark.timeout(10)
def test_nan_delay(loop):
    """asyncio treats a NaN deadline as due (it never compares >= the end time)."""
    fired = []
    loop.call_later(float("nan"), fired.append, "nan")
    stopper = threading.Timer(0.3, loop.call_soon_threadsafe, (loop.stop,))
    stopper.start()
    try:
        loop.run_forever()
    finally:
        stopper.join()
    assert fired == ["nan"]


# ---- the application's clock and methods ---------------------------------------------------


def _loop_class(loop_factory):
    loop = loop_factory()
    loop.close()
    return type(loop)


def test_subclass_clock_is_the_one_call_at_deadlines_are_on(loop_factory):
    """asyncio's call_at() compares `when` with `self.time()`, so a subclass with a clock
    of its own (a virtual clock in a test tool) gets its deadlines: asyncio.timeout()
    fires. ferroloop compared with its own clock, and the timeout never fired."""

    class Shifted(_loop_class(loop_factory)):
        def time(self):
            return time.monotonic() + 1000.0

    async def main():
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await asyncio.sleep(5)
        return time.monotonic() - t0

    loop = Shifted()
    try:
        if hasattr(asyncio, "timeout"):  # Python 3.11+
            assert loop.run_until_complete(main()) < 2
        fired = []
        handle = loop.call_at(loop.time() + 0.01, fired.append, "at")
        assert handle.when() == pytest.approx(loop.time() + 0.01, abs=0.5)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert fired == ["at"]
    finally:
        loop.close()


def test_replaced_monotonic_is_the_loop_clock(loop_factory):
    """asyncio's time() calls time.monotonic(), so mocking it moves the loop clock (as
    time-travel test tools do), and call_at() deadlines follow."""
    from unittest import mock

    loop = loop_factory()
    try:
        with mock.patch("time.monotonic", lambda: 5000.0 + time.perf_counter()):
            assert loop.time() - time.perf_counter() == pytest.approx(5000.0, abs=1)
            fired = []
            loop.call_at(loop.time() + 0.01, fired.append, "at")
            loop.run_until_complete(asyncio.sleep(0.05))
            assert fired == ["at"]
        assert abs(loop.time() - time.monotonic()) < 1
    finally:
        loop.close()


def test_timer_comes_due_on_a_patched_loop_time(loop):
    """asyncio's run loop tests deadlines against self.time(): a test that patches the
    loop's `time` to a timer's deadline sees it fire at the next iteration (aiohttp's
    keep-alive test does this)."""
    from unittest import mock

    async def main():
        fired = []
        deadline = loop.time() + 30
        loop.call_at(deadline, fired.append, "at")
        with mock.patch.object(loop, "time", return_value=deadline):
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        return fired

    assert loop.run_until_complete(main()) == ["at"]


def test_call_later_reads_a_patched_loop_time(loop):
    """asyncio's call_later() is on self.time(): with `time` patched ahead (a test moving
    its clock forward), a new timer's when() is on that clock, it is not due at once, and
    it comes due when the patched clock reaches it."""
    from unittest import mock

    async def main():
        fired = []
        base = loop.time()
        with mock.patch.object(loop, "time", return_value=base + 100.0) as clock:
            h = loop.call_later(0.5, fired.append, "later")
            assert h.when() == pytest.approx(base + 100.5)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert fired == []
            clock.return_value = base + 100.6
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        return fired

    assert loop.run_until_complete(main()) == ["later"]


def test_loop_wakes_for_a_timer_due_soon_on_a_patched_loop_time(loop):
    """With nothing else to do, asyncio's loop sleeps until the first deadline as
    self.time() puts it: a timer 30 s off on the real clock and 0.1 s off on the patched
    one fires after ~0.1 s."""
    from unittest import mock

    real = loop.time

    async def main():
        fut = loop.create_future()
        loop.call_at(real() + 30.0, fut.set_result, "due")
        with mock.patch.object(loop, "time", side_effect=lambda: real() + 29.9):
            t0 = time.monotonic()
            assert await asyncio.wait_for(fut, 10) == "due"
            return time.monotonic() - t0

    assert loop.run_until_complete(main()) < 5


def test_loop_time_written_into_the_instance_dict_is_the_clock(loop):
    """An instance `time` that did not go through setattr (stored straight into the
    loop's `__dict__`) is found at the next iteration: a timer 30 s off on the real clock
    comes due on it, as on asyncio's loop, which calls self.time() every iteration.
    (ferroloop's call_later reads such a clock from that next iteration on, hence the
    sleep(0) before wait_for schedules its timeout.)"""
    real = loop.time

    async def main():
        fut = loop.create_future()
        loop.call_at(real() + 30.0, fut.set_result, "due")
        await asyncio.sleep(0)
        loop.__dict__["time"] = lambda: real() + 29.95
        try:
            await asyncio.sleep(0)
            t0 = time.monotonic()
            assert await asyncio.wait_for(fut, 10) == "due"
            return time.monotonic() - t0
        finally:
            del loop.__dict__["time"]

    assert loop.run_until_complete(main()) < 5
    assert loop.time() == pytest.approx(time.monotonic(), abs=1)


def test_running_loop_keeps_its_instance_dict_unmade():
    """ferroloop-only: the loop keeps its own state in slots and checks for a replaced
    `time` without asking for its `__dict__`, so a loop nobody set an attribute on never
    gets an instance dict, and C Task's `loop.call_soon` lookup for each step skips it."""
    import gc

    import ferroloop

    def instance_dicts(lp):
        # The loop's only dict referent besides the instance dict is the non-empty
        # {"loop": loop} keyword dict it keeps for creating futures.
        return [r for r in gc.get_referents(lp) if type(r) is dict and "loop" not in r]

    loop = ferroloop.new_event_loop()
    try:

        async def main():
            await asyncio.sleep(0)
            await asyncio.sleep(0.001)
            return 1

        assert loop.run_until_complete(main()) == 1
        assert instance_dicts(loop) == []
        loop.marker = 1  # attributes can still be set on the loop
        assert vars(loop) == {"marker": 1}
        assert loop.run_until_complete(main()) == 1
        assert loop.marker == 1 and vars(loop) == {"marker": 1}
        del loop.marker
        assert loop.run_until_complete(main()) == 1
        assert vars(loop) == {}
        loop.marker = 2
        assert vars(loop) == {"marker": 2}
    finally:
        loop.close()

    class Tagged(type(loop)):
        def __init__(self):
            self.tag = "before"
            super().__init__()
            self.after = "after"

    loop = Tagged()
    try:
        assert loop.run_until_complete(main()) == 1
        assert vars(loop) == {"tag": "before", "after": "after"}
    finally:
        loop.close()


def test_call_later_goes_through_a_subclass_call_at(loop_factory):
    """asyncio's call_later() is self.call_at(self.time() + delay, ...), so a subclass
    that instruments call_at sees every timer, asyncio.sleep's included."""
    seen = []

    class Spy(_loop_class(loop_factory)):
        def call_at(self, when, callback, *args, context=None):
            seen.append((round(when - self.time(), 1), callback))
            return super().call_at(when, callback, *args, context=context)

    loop = Spy()
    try:
        fired = []
        loop.call_later(0.01, fired.append, "later")
        loop.run_until_complete(asyncio.sleep(0.2))
        assert fired == ["later"]
        assert [delay for delay, _ in seen] == [0.0, 0.2]
        assert seen[0][1] == fired.append
    finally:
        loop.close()
