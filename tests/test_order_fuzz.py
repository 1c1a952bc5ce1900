"""Differential test: random callback programs run on stdlib asyncio and on ferroloop must
leave the same trace.

Each seed generates a small program: nested actions that schedule callbacks
(``call_soon``, ``call_soon_threadsafe``, ``call_at`` in the past, ``call_later`` with a
negative delay), cancel handles, make futures and complete them (result, exception,
cancellation), add and remove done callbacks, start tasks that switch with
``sleep(0)`` and await (or shield) those futures, cancel tasks (directly and from a
callback), raise from a callback, set a context variable, stop the loop, nest
``run_until_complete``, and watch one socket pair with ``add_reader`` / ``add_writer``
while writing to it. Every callback, task step, read and exception-handler call appends
to a trace, along with the value of the context variable it sees. The program then runs
for a fixed number of ``stop()``-bounded rounds on each loop, and the two traces, with
what reached the exception handler, must be equal.

Nothing here depends on time: every timer is scheduled for a fixed instant in the past
(distinct from every other timer's), and a socket pair's data is readable as soon as it is
written. Only one descriptor is watched,
because the order in which callbacks of *different* descriptors run within one iteration
is the order the selector reports them in, which asyncio leaves unspecified (it differs
between its own selectors).
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import socket

import _fuzz as fuzz
import pytest
from _util import LOOP_FACTORIES

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="-")

KINDS = [
    "soon",
    "soon",
    "task",
    "future",
    "soon_threadsafe",
    "past",
    "later_negative",
    "cancel",
    "future",
    "set_result",
    "set_exception",
    "cancel_future",
    "add_done_callback",
    "remove_done_callback",
    "task",
    "cancel_task",
    "cancel_task_soon",
    "raise",
    "stop",
    "run_until_complete",
    "write",
    "add_reader",
    "remove_reader",
    "add_writer",
    "remove_writer",
    "set_var",
]
# Kinds whose action carries a nested program (run by the callback or task it schedules).
NESTED = {"soon", "soon_threadsafe", "past", "later_negative", "task", "add_done_callback"}
MAX_ACTIONS = 120
ROUNDS = 30


def generate(rng: random.Random) -> list:
    return fuzz.generate(rng, KINDS, NESTED, top=(8, 16), deepest=4, limit=MAX_ACTIONS)


class Program:
    def __init__(self, loop: asyncio.AbstractEventLoop, trace: list) -> None:
        self.loop = loop
        self.trace = trace
        self.handles: list[asyncio.Handle] = []
        self.futures: list[asyncio.Future] = []
        self.tasks: list[asyncio.Task] = []
        self.count = 0
        self.past = 0
        self.t0 = loop.time()
        self.writer_calls = 0
        self.pair = socket.socketpair()
        for s in self.pair:
            s.setblocking(False)

    @staticmethod
    def pick(items: list, r: float):
        return items[int(r * len(items))] if items else None

    def run(self, actions: list) -> None:
        loop = self.loop
        sender, watched = self.pair
        for kind, r, nested in actions:
            self.count += 1
            name = f"{kind}{self.count}"
            if kind in ("soon", "soon_threadsafe"):
                self.handles.append(getattr(loop, f"call_{kind}")(self.callback, name, nested))
            elif kind == "past":
                self.past += 1
                when = self.t0 - 1000 + self.past * 0.5 * (1 + r)
                self.handles.append(loop.call_at(when, self.callback, name, nested))
            elif kind == "later_negative":
                # A delay that makes the deadline a fixed past instant: unlike `-r` it
                # does not depend on how long the program took to get here.
                delay = (self.t0 - 500 + self.count + r / 2) - loop.time()
                self.handles.append(loop.call_later(delay, self.callback, name, nested))
            elif kind == "cancel":
                handle = self.pick(self.handles, r)
                if handle is not None:
                    handle.cancel()
                    self.trace.append(("cancelled", handle.cancelled()))
            elif kind == "future":
                self.futures.append(loop.create_future())
            elif kind in ("set_result", "set_exception", "cancel_future"):
                fut = self.pick(self.futures, r)
                if fut is not None and not fut.done():
                    if kind == "set_result":
                        fut.set_result(name)
                    elif kind == "set_exception":
                        fut.set_exception(ValueError(name))
                    else:
                        fut.cancel(name)
                    self.trace.append(("done", self.futures.index(fut), kind))
            elif kind == "add_done_callback":
                fut = self.pick(self.futures, r)
                if fut is not None:
                    fut.add_done_callback(lambda f, n=name, a=nested: self.callback(n, a))
            elif kind == "remove_done_callback":
                fut = self.pick(self.futures, r)
                if fut is not None:
                    self.trace.append(("removed", fut.remove_done_callback(self.callback)))
            elif kind == "task":
                self.tasks.append(loop.create_task(self.coroutine(name, nested, r)))
            elif kind == "cancel_task":
                task = self.pick(self.tasks, r)
                if task is not None:
                    self.trace.append(("cancel_task", self.tasks.index(task), task.cancel()))
            elif kind == "cancel_task_soon":
                task = self.pick(self.tasks, r)
                if task is not None:
                    loop.call_soon(task.cancel, name)
            elif kind == "raise":
                self.handles.append(loop.call_soon(self.fail, name))
            elif kind == "stop":
                loop.stop()
                self.trace.append(("stop", name))
            elif kind == "run_until_complete":
                fut = self.pick(self.futures, r)
                if not loop.is_running() and fut is not None and not fut.done():
                    loop.call_soon(fut.set_result, name)
                    try:
                        self.trace.append(("complete", loop.run_until_complete(fut)))
                    except BaseException as exc:
                        self.trace.append(("complete", repr(exc)))
            elif kind == "write":
                sender.send(b"x" * (1 + int(r * 1000) % 50))
            elif kind == "add_reader":
                loop.add_reader(watched.fileno(), self.on_readable, 1 + int(r * 777) % 20)
                self.trace.append(("add_reader",))
            elif kind == "remove_reader":
                self.trace.append(("remove_reader", loop.remove_reader(watched.fileno())))
            elif kind == "add_writer":
                self.writer_calls = 1 + int(r * 555) % 4
                loop.add_writer(watched.fileno(), self.on_writable)
            elif kind == "remove_writer":
                self.trace.append(("remove_writer", loop.remove_writer(watched.fileno())))
            elif kind == "set_var":
                VAR.set(name)
            else:  # pragma: no cover - KINDS and this chain must agree
                raise AssertionError(kind)

    def callback(self, name: str, nested: list) -> None:
        self.trace.append(("callback", name, VAR.get()))
        self.run(nested)

    def fail(self, name: str) -> None:
        self.trace.append(("raise", name))
        raise KeyError(name)

    def on_readable(self, size: int) -> None:
        data = self.pair[1].recv(size)
        self.trace.append(("read", len(data), VAR.get()))

    def on_writable(self) -> None:
        self.trace.append(("writable", VAR.get()))
        self.writer_calls -= 1
        if self.writer_calls <= 0:
            self.loop.remove_writer(self.pair[1].fileno())

    async def coroutine(self, name: str, nested: list, r: float) -> None:
        self.trace.append(("task", name, VAR.get()))
        try:
            for i in range(int(r * 4)):
                if i % 2 == 0:
                    await asyncio.sleep(0)
                else:
                    fut = self.pick(self.futures, (r * 7 + i) % 1)
                    if fut is not None:
                        try:
                            value = await (asyncio.shield(fut) if i == 3 else fut)
                            self.trace.append(("awaited", name, str(value)))
                        except ValueError as exc:
                            self.trace.append(("awaited", name, repr(exc)))
                self.trace.append(("step", name, i, VAR.get()))
            self.run(nested)
        except asyncio.CancelledError as exc:
            self.trace.append(("task cancelled", name, exc.args))
            raise


def run_program(loop_name: str, seed: int, debug: bool) -> tuple[list, list]:
    """Runs seed's program on a new loop; returns its trace and the exception handler's calls."""
    trace: list = []
    handled: list = []

    def handler(lp: asyncio.AbstractEventLoop, context: dict) -> None:
        record = (context["message"][:40], repr(context.get("exception")))
        handled.append(record)
        if lp.is_running():
            trace.append(("handler", *record))

    execute(LOOP_FACTORIES[loop_name](), generate(random.Random(seed)), debug, handler, trace)
    fuzz.collect_garbage()  # (nothing of the program is left in a frame here)
    # (In the order of the trace while the loop runs; as a multiset afterwards, where the
    # collector's order of finalizers in one cycle decides.)
    return list(trace), sorted(handled)


def execute(
    loop: asyncio.AbstractEventLoop, actions: list, debug: bool, handler, trace: list
) -> None:
    loop.set_debug(debug)
    loop.set_exception_handler(handler)
    program = Program(loop, trace)
    try:
        program.run(actions)
        fuzz.run_iterations(loop, ROUNDS, trace)
        for task in program.tasks:
            state = task.done() and (task.cancelled() or repr(task.exception()))
            trace.append(("task state", state))
        # Cancel what is left until every task has finished (cancelled ones may start more).
        for _ in range(20):
            pending = [task for task in program.tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            loop.call_soon(loop.stop)
            loop.run_forever()
        trace.append(("unfinished tasks", sum(not task.done() for task in program.tasks)))
    finally:
        loop.remove_reader(program.pair[1].fileno())
        loop.remove_writer(program.pair[1].fileno())
        for s in program.pair:
            s.close()
        loop.close()


SEEDS_PER_CHUNK = 500
CHUNKS = [(chunk, False) for chunk in range(8)] + [(chunk, True) for chunk in range(2)]
CHUNK_IDS = [f"seeds{c * SEEDS_PER_CHUNK}-{'debug' if d else 'normal'}" for c, d in CHUNKS]


@pytest.mark.parametrize(("chunk", "debug"), CHUNKS, ids=CHUNK_IDS)
def test_random_programs_trace_like_asyncio(chunk: int, debug: bool) -> None:
    seeds = range(chunk * SEEDS_PER_CHUNK, (chunk + 1) * SEEDS_PER_CHUNK)
    fuzz.check_seeds(run_program, seeds, debug)


def test_programs_exercise_every_kind() -> None:
    """The generator reaches every action kind (so no kind silently stops being tested)."""
    seen = set()
    for seed in range(8 * SEEDS_PER_CHUNK):
        seen |= fuzz.kinds_in(generate(random.Random(seed)))
    assert seen == set(KINDS)
