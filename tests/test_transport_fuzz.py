"""Differential test: random sequences of transport calls and peer actions on a Unix
socket pair must make the same protocol callbacks, in the same order and with the same
sizes, on stdlib asyncio and on ferroloop.

One end of a ``socket.socketpair()`` becomes a transport (``create_unix_connection(sock=)``)
with a recording protocol; the test holds the other end, non-blocking. A seed generates a
program of transport calls (``write`` / ``writelines`` of 1 B to 300 KB, ``write_eof``,
``pause_reading`` / ``resume_reading``, ``close``, ``abort``, ``set_write_buffer_limits``),
peer actions (send, receive, read everything, shut down writing, close) and callbacks that
run more of them an iteration later. The trace records every protocol callback (``data_received``
with its size, ``eof_received``, ``pause_writing`` / ``resume_writing`` with the buffer
size, ``connection_lost`` with the exception type), the transport's state after each
call, what the peer's calls returned and what asyncio's logger and the exception handler
got. A Unix socket pair moves data within the sending call, so the trace depends on
nothing but the program.
"""

from __future__ import annotations

import asyncio
import random
import socket

import _fuzz as fuzz
import pytest
from _util import LOOP_FACTORIES

KINDS = [
    "peer_send",
    "peer_send",
    "peer_recv",
    "peer_recv",
    "peer_drain",
    "peer_shutdown",
    "peer_close",
    "write",
    "write",
    "writelines",
    "write_eof",
    "pause_reading",
    "resume_reading",
    "close",
    "abort",
    "limits",
    "soon",
    "soon",
    "state",
]
SIZES = [1, 10, 1000, 4096, 65536, 300_000]
ROUNDS = 25


def generate(rng: random.Random) -> list:
    return fuzz.generate(rng, KINDS, {"soon"}, top=(6, 14), deepest=3, limit=80)


class Program:
    def __init__(self, loop: asyncio.AbstractEventLoop, trace: list, keep_open: bool) -> None:
        self.loop = loop
        self.trace = trace
        self.keep_open = keep_open
        self.transport: asyncio.Transport
        self.lost = False
        self.sock, self.peer = socket.socketpair()
        self.peer.setblocking(False)
        self.peer_open = True

    def run(self, actions: list) -> None:
        fuzz.run_actions(self, actions, SIZES)

    def act(self, kind: str, size: int, nested: list) -> None:
        t, peer, trace = self.transport, self.peer, self.trace
        if kind.startswith("peer_"):
            if not self.peer_open:
                return
            try:
                if kind == "peer_send":
                    trace.append(("peer sent", peer.send(b"p" * size)))
                elif kind == "peer_recv":
                    trace.append(("peer received", len(peer.recv(size))))
                elif kind == "peer_drain":
                    received = 0
                    try:
                        while chunk := peer.recv(1 << 20):
                            received += len(chunk)
                    finally:
                        trace.append(("peer drained", received))
                elif kind == "peer_shutdown":
                    peer.shutdown(socket.SHUT_WR)
                else:
                    peer.close()
                    self.peer_open = False
            except BlockingIOError:
                trace.append((kind, "would block"))
            except OSError as exc:
                trace.append((kind, exc.errno))
        elif kind in fuzz.WRITE_SIDE_KINDS:
            fuzz.write_side(self, kind, size)
        elif kind == "pause_reading":
            t.pause_reading()
            trace.append(("reading", t.is_reading()))
        elif kind == "resume_reading":
            t.resume_reading()
            trace.append(("reading", t.is_reading()))
        elif kind == "close":
            t.close()
            trace.append(("closing", t.is_closing()))
        elif kind == "soon":
            self.loop.call_soon(self.callback, nested)
        elif kind == "state":
            trace.append(("state", t.is_closing(), t.is_reading(), t.get_write_buffer_size()))
        else:  # pragma: no cover - KINDS and this chain must agree
            raise AssertionError(kind)

    def callback(self, nested: list) -> None:
        self.trace.append(("callback",))
        self.run(nested)


def run_program(loop_name: str, seed: int) -> tuple[list, list]:
    """Runs seed's program on a new loop; returns its trace and the exception handler's calls."""
    rng = random.Random(seed)
    actions = generate(rng)
    keep_open = rng.random() < 0.5
    trace: list = []
    handled: list = []
    with fuzz.asyncio_log_into(trace):
        execute(LOOP_FACTORIES[loop_name](), actions, keep_open, trace, handled)
    fuzz.collect_garbage()
    return list(trace), sorted(handled)


def execute(
    loop: asyncio.AbstractEventLoop, actions: list, keep_open: bool, trace: list, handled: list
) -> None:
    fuzz.record_handler_calls(loop, handled)
    program = Program(loop, trace, keep_open)
    try:
        program.transport, _ = loop.run_until_complete(
            loop.create_unix_connection(lambda: fuzz.Recorder(program), sock=program.sock)
        )
        program.run(actions)
        fuzz.run_iterations(loop, ROUNDS, trace)
        if not program.lost:  # (a transport closing with data the peer never reads, too)
            program.transport.abort()
        fuzz.run_iterations(loop, 3)
    finally:
        if program.peer_open:
            program.peer.close()
        loop.close()


SEEDS_PER_CHUNK = 500


@pytest.mark.parametrize("chunk", range(4), ids=lambda c: f"seeds{c * SEEDS_PER_CHUNK}")
def test_random_transport_programs_trace_like_asyncio(chunk: int) -> None:
    fuzz.check_seeds(run_program, range(chunk * SEEDS_PER_CHUNK, (chunk + 1) * SEEDS_PER_CHUNK))


def test_programs_reach_every_kind_and_callback() -> None:
    """The generator reaches every action kind, and the programs every protocol callback."""
    seen, events = set(), set()
    with fuzz.frozen_heap():
        for seed in range(4 * SEEDS_PER_CHUNK):
            seen |= fuzz.kinds_in(generate(random.Random(seed)))
            events.update(entry[0] for entry in run_program("ferroloop", seed)[0])
    assert seen == set(KINDS)
    assert fuzz.PROTOCOL_CALLBACKS <= events, fuzz.PROTOCOL_CALLBACKS - events
