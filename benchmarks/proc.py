"""Subprocess and pipe side-by-side benchmarks: ferroloop vs stdlib asyncio, uvloop and rloop.

Measured the way run.py measures the loop core, with its helpers: a fresh worker
subprocess per (benchmark, loop, round), a warm-up, then ``--repeat`` timed runs each on a
new loop (the round keeps the fastest), rounds interleaved with the loop order rotated,
medians and spreads over the rounds, ferroloop's ratio to every peer. Every run checks its
results (exit statuses, byte counts) and fails loudly if one is wrong. A loop without
subprocess support (NotImplementedError) is reported as "not implemented", its ratios
as n/a, and is not counted as a failure.

    python benchmarks/proc.py [--rounds N] [--repeat K] [--only NAME ...] [--loops a,b,...]
                              [--smoke] [--markdown] [--no-gc]

Benchmarks (unit per second):
  spawn        create_subprocess_exec("true") + wait(), one at a time          processes
  spawn_x16    the same, 16 children at a time (gather)                        processes
  pipe_cat     parent -> cat -> parent through the stdin/stdout streams:       MiB
               256 KiB writes, drain() after each, while a task reads stdout
  communicate  communicate() of 10 MiB with cat (10 MiB in, 10 MiB back)       MiB
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import run as _run
from run import (
    Cell,
    Run,
    available,
    check,
    ferroloop_build,
    fmt_cell,
    fmt_rate,
    fmt_ratio,
    load_average,
    ratio,
    render,
    run_header,
    timed,
)

LOOPS = ("ferroloop", "uvloop", "rloop", "asyncio")
REQUIRED_LOOPS = ("ferroloop", "asyncio")
PEERS = ("uvloop", "rloop", "asyncio")  # ratio columns: ferroloop's rate over each peer's
NOT_IMPLEMENTED_EXIT = 3  # a worker's exit status when its loop lacks a method it needs

# A measurement subprocess that takes longer than this (per timed run) is killed and
# counted as a failure.
TIMEOUT_FULL = 300.0
TIMEOUT_SMOKE = 60.0

TRUE = shutil.which("true") or "/bin/true"
CAT = shutil.which("cat") or "/bin/cat"
PIPE = subprocess.PIPE
MIB = 1024 * 1024


# ---- benchmarks ----------------------------------------------------------------------------
#
# Each function runs its workload once on ``run.loop`` and returns (ops, seconds) as in
# run.py: ops counts the unit (processes, MiB), seconds is the wall time of the timed part.
# Payloads are built before the clock starts; checks run after it stops.


def bench_spawn(run: Run, n: int, concurrency: int) -> tuple[int, float]:
    """n children of /bin/true, ``concurrency`` at a time: create_subprocess_exec(), then
    wait()."""
    loop = run.loop

    async def one() -> int:
        proc = await asyncio.create_subprocess_exec(TRUE)
        return await proc.wait()

    async def spawn_all() -> list[int]:
        codes: list[int] = []
        for start in range(0, n, concurrency):
            batch = min(concurrency, n - start)
            codes += await asyncio.gather(*(one() for _ in range(batch)))
        return codes

    codes: list[int] = []
    seconds = timed(lambda: codes.extend(loop.run_until_complete(spawn_all())))
    check(codes == [0] * n, f"spawn: exit statuses {sorted(set(codes))}, expected all 0")
    return n, seconds


def bench_pipe_cat(run: Run, mib: int, chunk_kib: int) -> tuple[float, float]:
    """``mib`` MiB written to cat's stdin in ``chunk_kib`` KiB writes (drain() after each)
    while another task reads cat's stdout; timed from spawning cat until it exited."""
    loop = run.loop
    chunk = bytes(range(256)) * (chunk_kib * 4)
    chunks = mib * 1024 // chunk_kib
    total = chunks * len(chunk)

    async def through_cat() -> tuple[int, bytes, int]:
        proc = await asyncio.create_subprocess_exec(CAT, stdin=PIPE, stdout=PIPE)

        async def feed() -> None:
            write, drain = proc.stdin.write, proc.stdin.drain
            for _ in range(chunks):
                write(chunk)
                await drain()
            proc.stdin.close()

        feeder = asyncio.ensure_future(feed())
        received = 0
        head = b""
        read = proc.stdout.read
        while data := await read(MIB):
            if not head:
                head = data[:256]
            received += len(data)
        await feeder
        return received, head, await proc.wait()

    result: list = []
    seconds = timed(lambda: result.append(loop.run_until_complete(through_cat())))
    received, head, code = result[0]
    check(code == 0, f"pipe_cat: cat exited with {code}")
    check(received == total, f"pipe_cat: {received} bytes came back, expected {total}")
    check(bool(head) and head == chunk[: len(head)], "pipe_cat: the data came back altered")
    return total / MIB, seconds


def bench_communicate(run: Run, kib: int, calls: int) -> tuple[float, float]:
    """``calls`` times: spawn cat, communicate(``kib`` KiB of random bytes)."""
    loop = run.loop
    block = os.urandom(64 * 1024)
    payload = block * (kib // 64) + block[: kib % 64 * 1024]

    async def communicate_all() -> list[tuple[bool, int]]:
        results = []
        for _ in range(calls):
            proc = await asyncio.create_subprocess_exec(CAT, stdin=PIPE, stdout=PIPE)
            out, _ = await proc.communicate(payload)
            results.append((out == payload, proc.returncode))
        return results

    results: list = []
    seconds = timed(lambda: results.extend(loop.run_until_complete(communicate_all())))
    check(
        results == [(True, 0)] * calls,
        f"communicate: (output intact, exit status) per call: {results}",
    )
    return calls * len(payload) / MIB, seconds


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    func: Callable[..., tuple[float, float]]
    full: dict
    smoke: dict
    unit: str
    # The targets: (peer, minimum ratio of ferroloop's median rate over the peer's).
    targets: tuple[tuple[str, float], ...] = ()


BENCHMARKS = (
    Benchmark(
        "spawn",
        bench_spawn,
        {"n": 500, "concurrency": 1},
        {"n": 3, "concurrency": 1},
        "processes",
        (("uvloop", 1.0),),
    ),
    Benchmark(
        "spawn_x16",
        bench_spawn,
        {"n": 1000, "concurrency": 16},
        {"n": 4, "concurrency": 2},
        "processes",
        (("uvloop", 1.0),),
    ),
    Benchmark(
        "pipe_cat",
        bench_pipe_cat,
        {"mib": 512, "chunk_kib": 256},
        {"mib": 1, "chunk_kib": 256},
        "MiB",
        (("asyncio", 1.5), ("uvloop", 1.0)),
    ),
    Benchmark(
        "communicate",
        bench_communicate,
        {"kib": 10 * 1024, "calls": 10},
        {"kib": 64, "calls": 1},
        "MiB",
    ),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


def run_once(bench: Benchmark, loop_name: str, params: dict) -> tuple[float, float]:
    run = Run(loop_name)
    try:
        return bench.func(run, **params)
    finally:
        run.close()


def worker(bench_name: str, loop_name: str, smoke: bool, gc_off: bool, repeat: int) -> int:
    """Subprocess entry point, as run.py's: a warm-up at smoke size, then ``repeat`` timed
    runs, each on a fresh loop; prints one JSON line with their times. A loop without
    subprocess support prints {"not_implemented": ...} and exits NOT_IMPLEMENTED_EXIT."""
    _run.GC_OFF = gc_off
    bench = BY_NAME[bench_name]
    try:
        run_once(bench, loop_name, bench.smoke)
    except NotImplementedError as exc:
        print(json.dumps({"not_implemented": str(exc) or type(exc).__name__}), flush=True)
        return NOT_IMPLEMENTED_EXIT
    params = bench.smoke if smoke else bench.full
    ops, times = 0.0, []
    for _ in range(repeat):
        ops, seconds = run_once(bench, loop_name, params)
        times.append(seconds)
    print(json.dumps({"ops": ops, "seconds": times}), flush=True)
    return 0


# ---- the runner ----------------------------------------------------------------------------


class NotImplementedLoop(Exception):
    """The loop raised NotImplementedError for a method the benchmark needs."""


def measure(bench: str, loop: str, args: argparse.Namespace) -> tuple[float | None, str | None]:
    """Run one worker subprocess: its rate (from the fastest timed run) or an error.
    Raises NotImplementedLoop if the loop lacks subprocess support."""
    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)  # debug mode would measure something else
    env["PYTHONHASHSEED"] = "0"
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", bench, loop]
    cmd += ["--repeat", str(args.repeat)]
    if args.smoke:
        cmd.append("--smoke")
    if args.no_gc:
        cmd.append("--no-gc")
    timeout = (TIMEOUT_SMOKE if args.smoke else TIMEOUT_FULL) * args.repeat
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    if proc.returncode == NOT_IMPLEMENTED_EXIT:
        raise NotImplementedLoop(proc.stdout.strip())
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return None, f"exit code {proc.returncode}:\n{tail}"
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return result["ops"] / min(result["seconds"]), None
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as exc:
        return None, f"unreadable worker output ({exc!r}): {proc.stdout[-500:]!r}"


def judge(bench: Benchmark, cells: dict[str, Cell], smoke: bool) -> str:
    """ferroloop against the issue's targets, on the ratios of medians (informational)."""
    parts = []
    for peer, goal in bench.targets:
        r = ratio(cells, peer)
        if r is None:
            verdict = "n/a"
        elif smoke:
            verdict = "(smoke)"
        else:
            verdict = "met" if r[0] >= goal else f"NOT met ({r[0]:.2f}x)"
        parts.append(f">={goal:g}x {peer}: {verdict}")
    return "; ".join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare subprocess and pipe performance of ferroloop with asyncio, "
        "uvloop and rloop, rounds interleaved.",
    )
    parser.add_argument("--rounds", type=int, help="rounds per benchmark (default 5; smoke 1)")
    parser.add_argument(
        "--repeat",
        type=int,
        help="timed runs per round, each on a fresh loop; a round counts its fastest "
        "(default 3; smoke 1)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="benchmarks to run: " + ", ".join(BY_NAME)
    )
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        help=f"comma-separated loops (default {','.join(LOOPS)})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 1 round: checks the benchmarks still work (timings meaningless)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--no-gc",
        action="store_true",
        help="disable the cyclic garbage collector during the timed part (default: enabled)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("BENCH", "LOOP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 5
    if args.repeat is None:
        args.repeat = 1 if args.smoke else 3
    if args.rounds < 1 or args.repeat < 1:
        parser.error("--rounds and --repeat must be at least 1")
    names = [n for item in args.only or [] for n in item.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.benchmarks = [b for b in BENCHMARKS if not names or b.name in names]
    args.loop_names = [n.strip() for n in args.loops.split(",") if n.strip()]
    unknown = [n for n in args.loop_names if n not in LOOPS]
    if unknown:
        parser.error(f"unknown loop(s): {', '.join(unknown)}; choose from {', '.join(LOOPS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # "±" on an ASCII-only terminal
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.smoke, args.no_gc, args.repeat)

    loops: list[str] = []
    for name in dict.fromkeys(args.loop_names):
        reason = available(name)
        if reason is None:
            loops.append(name)
        elif name in REQUIRED_LOOPS:
            print(f"error: {name} is required but cannot be used: {reason}", file=sys.stderr)
            return 2
        else:
            print(f"notice: skipping {name}: {reason}", file=sys.stderr)

    build_where, build_stamp = ferroloop_build()
    header = [
        *run_header(args.markdown, loops, build_where),
        f"load average at start: {load_average()}",
        (
            f"rounds: {args.rounds} x best of {args.repeat}"
            f"{' (smoke sizes)' if args.smoke else ''}, "
            f"garbage collector {'off' if args.no_gc else 'on'} while timing"
        ),
    ]
    for line in header:
        print(("- " if args.markdown else "") + line)
    print(flush=True)

    results = {b.name: {n: Cell() for n in loops} for b in args.benchmarks}
    missing: set[tuple[str, str]] = set()  # (benchmark, loop): not implemented by the loop
    started = time.perf_counter()
    for rnd in range(args.rounds):
        for i, bench in enumerate(args.benchmarks):
            # Rotate the loop order every round (and per benchmark), as run.py does.
            shift = (rnd + i) % len(loops)
            for name in loops[shift:] + loops[:shift]:
                if (bench.name, name) in missing:
                    continue  # not started again in later rounds
                error = None
                try:
                    rate, error = measure(bench.name, name, args)
                except NotImplementedLoop:
                    missing.add((bench.name, name))
                    status = "not implemented"
                else:
                    cell = results[bench.name][name]
                    cell.rates.append(rate)
                    status = f"{fmt_rate(rate)} {bench.unit}/s" if rate is not None else "FAILED"
                    if error is not None:
                        cell.failures.append(error)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {bench.name:<12} {name:<10} {status}",
                    file=sys.stderr,
                    flush=True,
                )
                if error is not None:
                    print(f"  {bench.name} on {name} failed: {error}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    rebuilt = "ferroloop" in loops and ferroloop_build()[1] != build_stamp
    if rebuilt:
        print(
            "WARNING: ferroloop's extension module changed during the run (rebuilt?): "
            "these results mix two builds; run again.",
            file=sys.stderr,
        )

    peers = [p for p in PEERS if p in loops] if "ferroloop" in loops else []
    headers = ["benchmark", "unit", *(f"{n} /s" for n in loops)]
    headers += [f"ferro/{p}" for p in peers]
    headers.append("target (ferroloop)")
    rows = []
    for bench in args.benchmarks:
        # A loop that does not implement the benchmark has no rates: its cell and every
        # ratio involving it show "not implemented" / n/a.
        cells = {n: c for n, c in results[bench.name].items() if (bench.name, n) not in missing}
        row = [bench.name, bench.unit]
        row += [
            "not implemented" if (bench.name, n) in missing else fmt_cell(cells.get(n))
            for n in loops
        ]
        row += [fmt_ratio(ratio(cells, p)) for p in peers]
        row.append(judge(bench, cells, args.smoke))
        rows.append(row)
    print(render(headers, rows, args.markdown))
    print()
    print(
        f"rates: median over rounds (each round: the fastest of {args.repeat} timed run(s)) "
        "± half the min-max range over rounds; ratios: ferroloop's median rate over the "
        "peer's (>1 = ferroloop faster), in parentheses the range of the per-round ratios; "
        "n/a where a loop does not implement subprocesses."
    )
    print(f"wall time: {elapsed:.0f}s; load average at end: {load_average()}")
    if rebuilt:
        print("WARNING: ferroloop was rebuilt during this run; the results mix two builds.")

    failed = [
        (b, n, err) for b, cells in results.items() for n, c in cells.items() for err in c.failures
    ]
    if failed:
        print(f"\n{len(failed)} measurement(s) FAILED:", file=sys.stderr)
        for b, n, err in failed:
            print(f"- {b} on {n}: {err.strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
