"""Differential test: random sequences of pipe-transport calls and peer actions must make
the same protocol callbacks, in the same order, on stdlib asyncio and on ferroloop.

Even seeds drive a write pipe transport (``connect_write_pipe``: ``write`` /
``writelines`` of 1 B to 200 KB, ``write_eof``, ``close``, ``abort``,
``set_write_buffer_limits``) whose read end the test holds; odd seeds a read pipe
transport (``connect_read_pipe``: ``pause_reading`` / ``resume_reading``, ``close``) whose
write end the test holds. The peer reads, writes and closes its end; callbacks run more of
the program an iteration later. One transport per program: the order of callbacks for
*different* descriptors in one iteration is the selector's (see test_order_fuzz). The
trace records every protocol callback with sizes and exception types, the transport's
state after each call, what the peer's calls returned, asyncio's log and the exception
handler's calls. Pipes move data within the writing call, so the trace depends on nothing
but the program.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

import _fuzz as fuzz
import pytest
from _util import LOOP_FACTORIES

WRITE_KINDS = ["write", "write", "writelines", "write_eof", "close", "abort", "limits"]
WRITE_KINDS += ["peer_read", "peer_read", "peer_close"]
READ_KINDS = ["pause_reading", "resume_reading", "close"]
READ_KINDS += ["peer_write", "peer_write", "peer_close"]
COMMON_KINDS = ["soon", "soon", "state"]
SIZES = [1, 10, 1000, 4096, 65536, 200_000]
ROUNDS = 25


class Program:
    def __init__(self, loop: asyncio.AbstractEventLoop, trace: list, writing: bool) -> None:
        self.loop = loop
        self.trace = trace
        self.writing = writing
        self.transport: asyncio.Transport
        self.lost = False
        self.keep_open = False  # (eof_received's answer; a read pipe closes anyway)
        # The transport's end (a file object, as applications pass pipes) and the peer's.
        r, w = os.pipe()
        if writing:
            self.pipe, self.peer = os.fdopen(w, "wb", buffering=0), r
        else:
            self.pipe, self.peer = os.fdopen(r, "rb", buffering=0), w
        os.set_blocking(self.peer, False)
        self.peer_open = True

    def reading(self) -> bool | None:
        # (is_reading() of asyncio's read pipe transport came with 3.11.)
        return self.transport.is_reading() if sys.version_info >= (3, 11) else None

    def run(self, actions: list) -> None:
        fuzz.run_actions(self, actions, SIZES)

    def act(self, kind: str, size: int, nested: list) -> None:
        t, trace = self.transport, self.trace
        if kind.startswith("peer_"):
            if not self.peer_open:
                return
            try:
                if kind == "peer_read":
                    trace.append(("peer read", len(os.read(self.peer, size))))
                elif kind == "peer_write":
                    trace.append(("peer wrote", os.write(self.peer, b"p" * size)))
                else:
                    os.close(self.peer)
                    self.peer_open = False
            except BlockingIOError:
                trace.append((kind, "would block"))
            except OSError as exc:
                trace.append((kind, exc.errno))
        elif kind in fuzz.WRITE_SIDE_KINDS:
            fuzz.write_side(self, kind, size, abort_when_closing=False)
        elif kind in ("pause_reading", "resume_reading"):
            getattr(t, kind)()
            trace.append(("reading", self.reading()))
        elif kind == "close":
            t.close()
            trace.append(("closing", t.is_closing()))
        elif kind == "soon":
            self.loop.call_soon(self.callback, nested)
        elif kind == "state":
            if self.writing:
                trace.append(("state", t.is_closing(), t.get_write_buffer_size()))
            else:
                trace.append(("state", t.is_closing(), self.reading()))
        else:  # pragma: no cover - the kind lists and this chain must agree
            raise AssertionError(kind)

    def callback(self, nested: list) -> None:
        self.trace.append(("callback",))
        self.run(nested)


def program_for(seed: int) -> tuple[bool, list]:
    writing = seed % 2 == 0
    kinds = (WRITE_KINDS if writing else READ_KINDS) + COMMON_KINDS
    rng = random.Random(seed)
    return writing, fuzz.generate(rng, kinds, {"soon"}, top=(6, 14), deepest=3, limit=80)


def run_program(loop_name: str, seed: int) -> tuple[list, list]:
    """Runs seed's program on a new loop; returns its trace and the exception handler's calls."""
    writing, actions = program_for(seed)
    trace: list = []
    handled: list = []
    with fuzz.asyncio_log_into(trace):
        execute(LOOP_FACTORIES[loop_name](), writing, actions, trace, handled)
    fuzz.collect_garbage()
    return list(trace), sorted(handled)


def execute(
    loop: asyncio.AbstractEventLoop, writing: bool, actions: list, trace: list, handled: list
) -> None:
    fuzz.record_handler_calls(loop, handled)
    program = Program(loop, trace, writing)
    connect = loop.connect_write_pipe if writing else loop.connect_read_pipe
    try:
        program.transport, _ = loop.run_until_complete(
            connect(lambda: fuzz.Recorder(program), program.pipe)
        )
        program.run(actions)
        fuzz.run_iterations(loop, ROUNDS, trace)
        if not program.lost:
            (program.transport.abort if writing else program.transport.close)()
        fuzz.run_iterations(loop, 3)
    finally:
        if program.peer_open:
            os.close(program.peer)
        program.pipe.close()
        loop.close()


SEEDS_PER_CHUNK = 500


@pytest.mark.parametrize("chunk", range(4), ids=lambda c: f"seeds{c * SEEDS_PER_CHUNK}")
def test_random_pipe_programs_trace_like_asyncio(chunk: int) -> None:
    fuzz.check_seeds(run_program, range(chunk * SEEDS_PER_CHUNK, (chunk + 1) * SEEDS_PER_CHUNK))


def test_programs_reach_every_kind_and_callback() -> None:
    """The programs use every action kind and reach every protocol callback."""
    seen, events = set(), set()
    with fuzz.frozen_heap():
        for seed in range(4 * SEEDS_PER_CHUNK):
            seen |= fuzz.kinds_in(program_for(seed)[1])
            events.update(entry[0] for entry in run_program("ferroloop", seed)[0])
    assert seen == set(WRITE_KINDS + READ_KINDS + COMMON_KINDS)
    assert fuzz.PROTOCOL_CALLBACKS <= events, fuzz.PROTOCOL_CALLBACKS - events
