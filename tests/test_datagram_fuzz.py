"""Differential test: random sequences of datagram-transport calls and peer actions must
make the same protocol callbacks, in the same order, on stdlib asyncio and on ferroloop.

The transport is ``create_datagram_endpoint(sock=)`` on one end of a connected Unix
datagram socket pair; the test holds the other end. The program calls ``sendto`` (1 B to
250 KB: the largest is more than a Unix datagram can hold, EMSGSIZE), ``close``,
``abort`` and ``set_write_buffer_limits``; the peer receives one or all queued
datagrams, sends a few and closes its end (later sends fail: ECONNREFUSED). A send that
finds the peer's queue full (the sender's buffer holds what the peer has not read) is
buffered, and the transport's writer sends it once the peer has read: the buffer, flow
control, ``error_received`` and when ``connection_lost`` comes are what is compared.

What the transport *receives* is checked apart: ferroloop delivers up to 32 queued
datagrams per readiness event where asyncio delivers one per loop iteration (a
documented difference), so the order of ``datagram_received`` among other callbacks
differs by design. Each loop's received datagrams must be, in order, a prefix of what
the peer sent, and all of it when the transport stayed open.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import random
import socket
import tempfile

import _fuzz as fuzz
import pytest
from _util import LOOP_FACTORIES

KINDS = ["sendto"] * 5 + ["close", "abort", "limits", "limits", "state"]
KINDS += ["peer_recv", "peer_recv", "peer_drain", "peer_send", "peer_send", "peer_close"]
KINDS += ["soon"] * 3
SIZES = [1, 100, 4096, 65536, 150_000, 250_000]
PEER_SENDS = 8  # at most, per program: the transport's queue never fills
ROUNDS = 25


class Recorder(fuzz.Recorder, asyncio.DatagramProtocol):
    """fuzz.Recorder's callbacks, and the datagram ones: what arrives goes to
    `program.received` (compared apart, see the module's note)."""

    def datagram_received(self, data: bytes, addr) -> None:
        self.program.received.append(len(data))

    def error_received(self, exc: Exception) -> None:
        self.program.trace.append(("error_received", type(exc).__name__, exc.errno))


class Program:
    def __init__(self, loop: asyncio.AbstractEventLoop, trace: list) -> None:
        self.loop = loop
        self.trace = trace
        self.transport: asyncio.DatagramTransport
        self.lost = False
        self.closed = False  # close() or abort() was called
        self.aborted = False
        self.received: list[int] = []
        self.sent_by_peer: list[int] = []
        # Bound and connected to each other (the unnamed ends of a socketpair have an
        # empty peer name, on which asyncio's transport calls sendto(data, None)).
        self.dir = tempfile.TemporaryDirectory()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        paths = [os.path.join(self.dir.name, name) for name in ("t", "p")]
        self.sock.bind(paths[0])
        self.peer.bind(paths[1])
        self.sock.connect(paths[1])
        self.peer.connect(paths[0])
        self.peer.setblocking(False)
        self.peer_open = True

    def run(self, actions: list) -> None:
        fuzz.run_actions(self, actions, SIZES)

    def act(self, kind: str, size: int, nested: list) -> None:
        t, trace = self.transport, self.trace
        if kind.startswith("peer_"):
            self.peer_act(kind, size)
        elif kind == "sendto":
            if self.closed:
                # NOTE: a transport made with sock= (no remote address) still sends after
                #       close() or abort() on asyncio, and what it buffers then can reach
                #       its writer after connection_lost let go of the socket
                #       (AttributeError in the writer). Not a case to compare.
                return
            t.sendto(b"d" * size)
            trace.append(("buffered", t.get_write_buffer_size()))
        elif kind in ("close", "abort"):
            if self.lost:
                return
            getattr(t, kind)()
            self.closed = True
            self.aborted |= kind == "abort"
            trace.append(("closing", t.is_closing()))
        elif kind == "limits":
            if self.aborted:
                # NOTE: asyncio's abort() empties the buffer but leaves its size, which
                #       get_write_buffer_size() reports and flow control (pause_writing
                #       here) still counts; ferroloop's is 0. Not a case to compare.
                return
            t.set_write_buffer_limits(high=size)
            trace.append(("limits", t.get_write_buffer_limits()))
        elif kind == "state":
            size = None if self.aborted else t.get_write_buffer_size()
            trace.append(("state", t.is_closing(), size))
        elif kind == "soon":
            self.loop.call_soon(self.callback, nested)
        else:  # pragma: no cover - KINDS and this chain must agree
            raise AssertionError(kind)

    def peer_act(self, kind: str, size: int) -> None:
        if not self.peer_open:
            return
        trace = self.trace
        if kind == "peer_close":
            self.peer.close()
            self.peer_open = False
            trace.append(("peer closed",))
            return
        try:
            if kind == "peer_recv":
                trace.append(("peer got", len(self.peer.recv(1 << 20))))
            elif kind == "peer_drain":
                sizes = []
                while True:
                    try:
                        sizes.append(len(self.peer.recv(1 << 20)))
                    except BlockingIOError:
                        break
                trace.append(("peer drained", sizes))
            elif len(self.sent_by_peer) < PEER_SENDS:  # peer_send
                n = size % 5000 + 1
                self.peer.send(b"p" * n)
                self.sent_by_peer.append(n)
        except BlockingIOError:
            trace.append((kind, "would block"))
        except OSError as exc:
            trace.append((kind, exc.errno))

    def callback(self, nested: list) -> None:
        self.trace.append(("callback",))
        self.run(nested)


def program_for(seed: int) -> list:
    return fuzz.generate(random.Random(seed), KINDS, {"soon"}, top=(6, 16), deepest=3, limit=90)


def run_program(loop_name: str, seed: int) -> tuple[list, list]:
    """Runs seed's program on a new loop; returns its trace and the exception handler's calls."""
    trace: list = []
    handled: list = []
    with fuzz.asyncio_log_into(trace):
        execute(LOOP_FACTORIES[loop_name](), program_for(seed), trace, handled)
    fuzz.collect_garbage()
    return list(trace), sorted(handled)


def execute(loop: asyncio.AbstractEventLoop, actions: list, trace: list, handled: list) -> None:
    fuzz.record_handler_calls(loop, handled)
    program = Program(loop, trace)
    try:
        program.transport, _ = loop.run_until_complete(
            loop.create_datagram_endpoint(lambda: Recorder(program), sock=program.sock)
        )
        program.run(actions)
        fuzz.run_iterations(loop, ROUNDS, trace)
        got, sent = program.received, program.sent_by_peer
        # (A send to a closed peer also empties the sender's receive queue, which
        # asyncio, reading one datagram per iteration, has read less of.)
        complete = not program.closed and program.peer_open
        trace.append(("received a prefix", got == sent[: len(got)], complete and got == sent))
        if not program.lost:
            program.transport.abort()
        fuzz.run_iterations(loop, 3)
    finally:
        if program.peer_open:
            program.peer.close()
        program.sock.close()
        program.dir.cleanup()
        loop.close()


SEEDS_PER_CHUNK = 500


def _asyncio_keeps_sent_headers() -> bool:
    """asyncio 3.13 counts 8 bytes of header per buffered datagram; before the fix for
    CPython gh-135444 it took only the data's length off again when the datagram was
    sent, so its get_write_buffer_size() grows by 8 with every buffered datagram sent.
    ferroloop counts as the fixed version does: every size would differ."""
    from asyncio import selector_events

    source = inspect.getsource(selector_events._SelectorDatagramTransport)
    return "len(data) + 8" in source and "-= len(data) + 8" not in source


needs_sound_oracle = pytest.mark.skipif(
    _asyncio_keeps_sent_headers(),
    reason="this asyncio miscounts its datagram write buffer (CPython gh-135444)",
)


def asyncio_failed(expected: tuple[list, list]) -> bool:
    """NOTE: asyncio's datagram transport can call its writer after close() removed it
    and connection_lost twice (error_received, then close() in the same iteration):
    AttributeError inside asyncio, reported to the exception handler. Such seeds (a few
    in a thousand) are not compared."""
    return any(kind == "AttributeError" for _message, kind in expected[1])


@needs_sound_oracle
@pytest.mark.parametrize("chunk", range(4), ids=lambda c: f"seeds{c * SEEDS_PER_CHUNK}")
def test_random_datagram_programs_trace_like_asyncio(chunk: int) -> None:
    seeds = range(chunk * SEEDS_PER_CHUNK, (chunk + 1) * SEEDS_PER_CHUNK)
    compared = fuzz.check_seeds(run_program, seeds, oracle_failed=asyncio_failed)
    assert compared >= 0.98 * len(seeds)


def test_programs_reach_every_kind_and_callback() -> None:
    """The programs use every action kind, reach every protocol callback, fill the
    peer's queue (a buffered send) and get both errors a connected send can get."""
    seen, events = set(), set()
    with fuzz.frozen_heap():
        for seed in range(4 * SEEDS_PER_CHUNK):
            seen |= fuzz.kinds_in(program_for(seed))
            events.update(
                entry[:3] if entry[0] == "error_received" else entry[:1]
                for entry in run_program("ferroloop", seed)[0]
            )
    assert seen == set(KINDS)
    want = {("connection_made",), ("pause_writing",), ("resume_writing",), ("connection_lost",)}
    want |= {("error_received", "OSError", errno.EMSGSIZE)}
    want |= {("error_received", "ConnectionRefusedError", errno.ECONNREFUSED)}
    assert want <= events, want - events
    assert any(e[0] == "buffered" for e in events)
