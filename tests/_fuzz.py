"""Shared parts of the differential tests (test_*_fuzz.py): random programs run on stdlib
asyncio and on ferroloop must leave the same trace."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import random
from collections.abc import Callable, Iterable, Iterator


def generate(
    rng: random.Random,
    kinds: list[str],
    nesting: set[str],
    *,
    top: tuple[int, int],
    deepest: int,
    limit: int,
    depth: int = 0,
    budget: list[int] | None = None,
) -> list:
    """A program: a list of (kind, r, nested program), r in [0, 1) for the action to pick
    targets and sizes with. `top` actions (a range) at the top level, then 1 to
    `deepest + 1 - depth` in the nested program of a kind in `nesting`, down to `deepest`
    levels; `limit` actions in all."""
    budget = [0] if budget is None else budget
    actions = []
    count = rng.randint(*top) if depth == 0 else rng.randint(1, deepest + 1 - depth)
    for _ in range(count):
        budget[0] += 1
        if budget[0] > limit:
            break
        kind = rng.choice(kinds)
        nested = []
        if kind in nesting and depth < deepest:
            nested = generate(
                rng,
                kinds,
                nesting,
                top=top,
                deepest=deepest,
                limit=limit,
                depth=depth + 1,
                budget=budget,
            )
        actions.append((kind, rng.random(), nested))
    return actions


def kinds_in(actions: list) -> set[str]:
    """Every action kind in a program, nested programs included."""
    kinds = set()
    for kind, _r, nested in actions:
        kinds.add(kind)
        kinds |= kinds_in(nested)
    return kinds


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leaves the test process's heap so far out of the collections that every run ends
    with (`collect_garbage`): they take microseconds instead of milliseconds."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def collect_garbage() -> None:
    """Collects until nothing is left, so that what finalizers report (a future's
    unretrieved exception, a pending task) reaches the handler of the run that made it, not
    during the other loop's run. A finalizer's garbage can need another pass."""
    for _ in range(10):
        if not gc.collect():
            break


class _LogRecorder(logging.Handler):
    def __init__(self, trace: list) -> None:
        super().__init__()
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        self.trace.append(("log", record.getMessage()[:40]))


@contextlib.contextmanager
def asyncio_log_into(trace: list) -> Iterator[None]:
    """Appends what asyncio's logger gets to `trace` (and only there) meanwhile."""
    logger = logging.getLogger("asyncio")
    recorder = _LogRecorder(trace)
    logger.addHandler(recorder)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(recorder)
        logger.propagate = propagate


def first_difference(expected: tuple[list, list], got: tuple[list, list]) -> str:
    for what, a, b in (("trace", expected[0], got[0]), ("handler calls", expected[1], got[1])):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return f"{what}[{i}]: asyncio {x!r}, ferroloop {y!r}"
        if len(a) != len(b):
            return f"{what}: asyncio has {len(a)} entries, ferroloop {len(b)}"
    return "no difference"


def check_seeds(
    run_program: Callable[..., tuple[list, list]],
    seeds: Iterable[int],
    *args,
    oracle_failed: Callable[[tuple[list, list]], bool] = lambda expected: False,
) -> int:
    """Runs each seed's program on asyncio and on ferroloop (each in a context of its own)
    and asserts that their traces and handler calls are equal. Seeds whose asyncio run
    `oracle_failed` (asyncio's own bug) are not compared; returns how many were."""
    compared = 0
    with frozen_heap():
        for seed in seeds:
            expected = contextvars.Context().run(run_program, "asyncio", seed, *args)
            if oracle_failed(expected):
                continue
            compared += 1
            got = contextvars.Context().run(run_program, "ferroloop", seed, *args)
            assert got == expected, f"seed {seed}: {first_difference(expected, got)}"
    return compared


def record_handler_calls(loop: asyncio.AbstractEventLoop, handled: list) -> None:
    """Makes `loop`'s exception handler append (message, exception type) to `handled`."""
    loop.set_exception_handler(
        lambda lp, context: handled.append(
            (context["message"][:50], type(context.get("exception")).__name__)
        )
    )


def run_iterations(loop: asyncio.AbstractEventLoop, n: int, trace: list | None = None) -> None:
    """Runs `n` loop iterations, each followed by ("round", i) in `trace` if given."""
    for i in range(n):
        loop.call_soon(loop.stop)
        loop.run_forever()
        if trace is not None:
            trace.append(("round", i))


def run_actions(program, actions: list, sizes: list[int]) -> None:
    """Runs `actions` with `program.act(kind, size, nested)`, the size picked from `sizes`
    by the action's r; what an action raises goes to `program.trace`."""
    for kind, r, nested in actions:
        try:
            program.act(kind, sizes[int(r * len(sizes))], nested)
        except Exception as exc:
            program.trace.append(("raised", kind, type(exc).__name__, str(exc)[:60]))


PROTOCOL_CALLBACKS = {
    "connection_made",
    "data_received",
    "eof_received",
    "pause_writing",
    "resume_writing",
    "connection_lost",
}


class Recorder(asyncio.Protocol):
    """Appends every protocol callback to `program.trace`: sizes of data, the write
    buffer's size at pause_writing / resume_writing, connection_lost's exception type.
    `program` has `trace`, `transport` (for the buffer size), `lost` (set here) and
    `keep_open` (eof_received's answer)."""

    def __init__(self, program) -> None:
        self.program = program

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.program.trace.append(("connection_made",))

    def data_received(self, data: bytes) -> None:
        self.program.trace.append(("data_received", len(data)))

    def eof_received(self) -> bool:
        self.program.trace.append(("eof_received",))
        return self.program.keep_open

    def pause_writing(self) -> None:
        self.program.trace.append(("pause_writing", self.program.transport.get_write_buffer_size()))

    def resume_writing(self) -> None:
        self.program.trace.append(
            ("resume_writing", self.program.transport.get_write_buffer_size())
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.program.lost = True
        self.program.trace.append(("connection_lost", type(exc).__name__ if exc else None))


WRITE_SIDE_KINDS = ("write", "writelines", "write_eof", "abort", "limits")


def write_side(program, kind: str, size: int, *, abort_when_closing: bool = True) -> None:
    """The calls on a transport's writing side, for `program` (see `Recorder`) with
    `loop`; the state they leave goes to the trace. `kind` is one of WRITE_SIDE_KINDS."""
    t, trace = program.transport, program.trace
    if kind in ("write", "writelines", "abort") and program.lost:
        # NOTE: after connection_lost, asyncio 3.11-3.13 can raise AttributeError or
        #       TypeError from write(), writelines() and abort(): a socket transport
        #       closed with data buffered lets go of its socket and loop without counting
        #       the loss, a write pipe transport schedules connection_lost again. ferroloop
        #       ignores these calls; not a case to compare.
        return
    if kind == "write":
        t.write(b"w" * size)
        trace.append(("buffered", t.get_write_buffer_size()))
    elif kind == "writelines":
        # NOTE: the writelines() of asyncio 3.12+'s socket transport (no longer write() of
        #       the joined data) differs from its write() in ways ferroloop does not copy:
        #       it buffers data given after close() or abort() (write() drops it), and it
        #       tries to send even behind buffered data (write() leaves that to the writer
        #       callback). It is called here where the two agree.
        if t.is_closing() or t.get_write_buffer_size():
            return
        t.writelines([b"l" * size, b"7" * 7])
        # NOTE: it also did not pause the protocol until the fix for CPython gh-127655
        #       (December 2024); ferroloop does, as asyncio does since. The oracle gets
        #       the call it misses (a no-op where it has the fix).
        maybe_pause = getattr(t, "_maybe_pause_protocol", None)
        if maybe_pause is not None and type(program.loop).__module__.startswith("asyncio"):
            maybe_pause()
        trace.append(("buffered", t.get_write_buffer_size()))
    elif kind == "write_eof":
        t.write_eof()
        trace.append(("wrote eof", t.get_write_buffer_size()))
    elif kind == "abort":
        # (asyncio's write pipe transport fails when aborted after close() or abort().)
        if t.is_closing() and not abort_when_closing:
            return
        t.abort()
        trace.append(("closing", t.is_closing()))
    elif kind == "limits":
        t.set_write_buffer_limits(high=size)
        trace.append(("limits", t.get_write_buffer_limits()))
    else:  # pragma: no cover - WRITE_SIDE_KINDS and this chain must agree
        raise AssertionError(kind)
