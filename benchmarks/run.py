"""Side-by-side benchmarks: ferroloop vs stdlib asyncio, uvloop and rloop.

Every measurement runs in a fresh subprocess (one per benchmark, loop and round): a warm-up,
then ``--repeat`` timed runs, each on a new event loop; the round keeps the fastest. Rounds
are interleaved: within a round each benchmark runs once on every loop, in an order rotated
by one position per round, so slow drifts of a noisy machine hit all loops alike. Every
benchmark checks its counts at the end and fails loudly if one is wrong.

    python benchmarks/run.py [--rounds N] [--repeat K] [--only NAME ...] [--loops a,b,...]
                             [--smoke] [--markdown] [--no-gc]

See benchmarks/README.md for what each benchmark measures and how the numbers are computed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

LOOPS = ("ferroloop", "uvloop", "rloop", "asyncio")
REQUIRED_LOOPS = ("ferroloop", "asyncio")
PEERS = ("rloop", "uvloop", "asyncio")  # ratio columns: ferroloop ops/s over each peer's

# A measurement subprocess that takes longer than this is killed and counted as a failure.
TIMEOUT_FULL = 300.0
TIMEOUT_SMOKE = 60.0


class CheckFailed(AssertionError):
    """A benchmark's end-of-run count check failed: the numbers would be meaningless."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---- loops ---------------------------------------------------------------------------------


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "asyncio":
        return asyncio.new_event_loop()
    module = importlib.import_module(name)
    return module.new_event_loop()


def loop_version(name: str) -> str:
    if name == "asyncio":
        return f"stdlib (Python {platform.python_version()})"
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module(name), "__version__", "unknown")


def ferroloop_build() -> tuple[str, tuple[int, int] | None]:
    """Where the ferroloop being measured comes from (path, git commit), and the extension
    module's (mtime, size): a rebuild in the middle of a run would mix two builds."""
    try:
        ext = importlib.util.find_spec("ferroloop._ferroloop")
    except ImportError:
        ext = None
    if ext is None or not ext.origin:
        return "unknown", None
    where = os.path.dirname(ext.origin)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "describe", "--always", "--dirty"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        where += f", git {commit}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        st = os.stat(ext.origin)
    except OSError:
        return where, None
    return where, (st.st_mtime_ns, st.st_size)


def available(name: str) -> str | None:
    """None if the loop can be used here, else why not."""
    if name == "asyncio":
        return None
    try:
        importlib.import_module(name).new_event_loop().close()
    except (ImportError, AttributeError, OSError, RuntimeError) as exc:  # missing or broken
        return f"{type(exc).__name__}: {exc}"
    return None


class Run:
    """One fresh loop for one benchmark run; records anything reaching its exception
    handler (a callback that raised) so the run fails instead of silently logging."""

    def __init__(self, loop_name: str) -> None:
        self.loop = new_loop(loop_name)
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        asyncio.set_event_loop(self.loop)

    def close(self) -> None:
        asyncio.set_event_loop(None)
        self.loop.close()
        if self.errors:
            context = self.errors[0]
            exc = context.get("exception")
            raise CheckFailed(
                f"{len(self.errors)} error(s) reached the loop's exception handler; first: "
                f"{context.get('message')!r} {exc!r}"
            ) from exc


# Set by the worker from --no-gc: keep the cyclic garbage collector off while timing.
GC_OFF = False


def timed(fn: Callable[[], None]) -> float:
    """Wall time of fn(), after a full collection so earlier garbage is not billed to it."""
    gc.collect()
    if GC_OFF:
        gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


# ---- benchmarks ----------------------------------------------------------------------------
#
# Each function runs its workload once on ``run.loop`` and returns (ops, seconds): the number
# of operations the benchmark counts and the wall time of the timed part. Setup that is the
# same for every loop (random delays, lists) happens before the clock starts; verification
# happens after it stops.


def bench_call_soon(run: Run, n: int, batch: int, with_args: bool) -> tuple[int, float]:
    """n callbacks via call_soon, scheduled from inside the loop in batches of ``batch``: a
    driver callback schedules one batch and then itself, so it runs again after that batch."""
    loop = run.loop
    call_soon = loop.call_soon
    count = 0
    total = 0
    scheduled = 0

    def cb() -> None:
        nonlocal count
        count += 1

    def cb_args(a: int, b: int) -> None:
        nonlocal count, total
        count += 1
        total += a + b

    def driver() -> None:
        nonlocal scheduled
        k = min(batch, n - scheduled)
        if with_args:
            for _ in range(k):
                call_soon(cb_args, 1, 2)
        else:
            for _ in range(k):
                call_soon(cb)
        scheduled += k
        call_soon(driver if scheduled < n else loop.stop)

    call_soon(driver)
    seconds = timed(loop.run_forever)
    check(count == n, f"call_soon: {count} callbacks ran, expected {n}")
    if with_args:
        check(total == 3 * n, f"call_soon: callback args summed to {total}, expected {3 * n}")
    return n, seconds


def bench_sleep0(run: Run, tasks: int, iterations: int) -> tuple[int, float]:
    """``tasks`` tasks, each awaiting asyncio.sleep(0) ``iterations`` times."""
    loop = run.loop
    switches = 0

    async def worker() -> int:
        nonlocal switches
        for _ in range(iterations):
            await asyncio.sleep(0)
            switches += 1
        return iterations

    async def main() -> list[int]:
        return await asyncio.gather(*[worker() for _ in range(tasks)])

    results: list[int] = []
    seconds = timed(lambda: results.extend(loop.run_until_complete(main())))
    expected = tasks * iterations
    check(switches == expected, f"sleep0: {switches} switches, expected {expected}")
    check(results == [iterations] * tasks, "sleep0: wrong task results")
    return expected, seconds


def bench_call_later(run: Run, n: int, max_delay: float, seed: int) -> tuple[int, float]:
    """n timers at random delays in [0, max_delay], half of them (chosen at random) cancelled
    in a pass right after all are scheduled; runs until every remaining timer has fired."""
    loop = run.loop
    rng = random.Random(seed)
    delays = [rng.uniform(0.0, max_delay) for _ in range(n)]
    cancelled = sorted(rng.sample(range(n), n // 2))
    expected = n - len(cancelled)
    fired = bytearray(n)
    count = 0

    def cb(i: int) -> None:
        nonlocal count
        fired[i] += 1
        count += 1
        if count == expected:
            loop.stop()

    def start() -> None:
        call_later = loop.call_later
        handles = [call_later(d, cb, i) for i, d in enumerate(delays)]
        for i in cancelled:
            handles[i].cancel()

    loop.call_soon(start)
    seconds = timed(loop.run_forever)
    check(count == expected, f"call_later: {count} timers fired, expected {expected}")
    # Untimed: run past the longest delay, then check no cancelled timer fired and every
    # other one fired exactly once.
    loop.run_until_complete(asyncio.sleep(max_delay * 2 + 0.005))
    want = bytearray([1]) * n
    for i in cancelled:
        want[i] = 0
    if fired != want:
        late = sum(1 for i in cancelled if fired[i])
        twice = sum(1 for v in fired if v > 1)
        raise CheckFailed(
            f"call_later: {late} cancelled timers fired, {twice} timers fired more than once, "
            f"{sum(fired)} callbacks in all (expected {expected})"
        )
    return n, seconds


def bench_future_chain(run: Run, chains: int, length: int) -> tuple[int, float]:
    """``chains`` concurrent coroutines, each ``length`` times: create_future(), have a
    call_soon callback set_result() on it, and await it."""
    loop = run.loop
    resolved = 0

    async def chain(c: int) -> int:
        nonlocal resolved
        create_future = loop.create_future
        call_soon = loop.call_soon
        acc = 0
        for i in range(length):
            fut = create_future()
            call_soon(fut.set_result, i)
            acc += await fut
            resolved += 1
        return acc

    async def main() -> list[int]:
        return await asyncio.gather(*[chain(c) for c in range(chains)])

    results: list[int] = []
    seconds = timed(lambda: results.extend(loop.run_until_complete(main())))
    expected = chains * length
    check(resolved == expected, f"future_chain: {resolved} futures resolved, expected {expected}")
    want = length * (length - 1) // 2
    check(results == [want] * chains, "future_chain: awaited values do not add up")
    return expected, seconds


def bench_gather(run: Run, n: int) -> tuple[int, float]:
    """create_task() for n trivial coroutines, then gather() them all."""
    loop = run.loop
    ran = 0

    async def trivial(i: int) -> int:
        nonlocal ran
        ran += 1
        return i

    async def main() -> list[int]:
        create_task = loop.create_task
        tasks = [create_task(trivial(i)) for i in range(n)]
        return await asyncio.gather(*tasks)

    results: list[int] = []
    seconds = timed(lambda: results.extend(loop.run_until_complete(main())))
    check(ran == n, f"gather: {ran} coroutines ran, expected {n}")
    check(results == list(range(n)), "gather: results missing or out of order")
    return n, seconds


def bench_threadsafe(run: Run, n: int, timeout: float) -> tuple[int, float]:
    """A second thread calls call_soon_threadsafe(cb) n times in a tight loop; the loop runs
    until cb has run n times. Timed from starting the thread until the loop stops."""
    loop = run.loop
    count = 0
    producer_done = False
    timed_out = False

    def cb() -> None:
        nonlocal count
        count += 1
        if count == n:
            loop.stop()

    def producer() -> None:
        nonlocal producer_done
        try:
            call_soon_threadsafe = loop.call_soon_threadsafe
            for _ in range(n):
                call_soon_threadsafe(cb)
            producer_done = True
        finally:
            if not producer_done:  # it raised (the traceback goes to stderr): stop the loop
                loop.call_soon_threadsafe(loop.stop)

    def on_timeout() -> None:
        nonlocal timed_out
        timed_out = True
        loop.stop()

    thread = threading.Thread(target=producer, name="producer", daemon=True)
    loop.call_soon(thread.start)
    watchdog = loop.call_later(timeout, on_timeout)
    seconds = timed(loop.run_forever)
    watchdog.cancel()
    thread.join(timeout)
    check(not thread.is_alive(), "threadsafe: producer thread did not finish")
    check(producer_done, "threadsafe: the producer thread raised (see its traceback above)")
    check(not timed_out, f"threadsafe: gave up after {timeout}s with {count}/{n} callbacks run")
    # Untimed: let anything still queued run, then check nothing ran twice or extra.
    loop.run_until_complete(asyncio.sleep(0.01))
    check(count == n, f"threadsafe: {count} callbacks ran, expected {n}")
    return n, seconds


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    group: str  # what --only also accepts, and the key of TARGETS
    func: Callable[..., tuple[int, float]]
    full: dict
    smoke: dict
    unit: str


BENCHMARKS = (
    Benchmark(
        "call_soon",
        "call_soon",
        bench_call_soon,
        {"n": 1_000_000, "batch": 1000, "with_args": False},
        {"n": 1000, "batch": 100, "with_args": False},
        "callbacks",
    ),
    Benchmark(
        "call_soon_args",
        "call_soon",
        bench_call_soon,
        {"n": 1_000_000, "batch": 1000, "with_args": True},
        {"n": 1000, "batch": 100, "with_args": True},
        "callbacks",
    ),
    Benchmark(
        "sleep0",
        "sleep0",
        bench_sleep0,
        {"tasks": 1000, "iterations": 1000},
        {"tasks": 100, "iterations": 5},
        "switches",
    ),
    Benchmark(
        "call_later",
        "call_later",
        bench_call_later,
        {"n": 100_000, "max_delay": 0.010, "seed": 1234},
        {"n": 100, "max_delay": 0.010, "seed": 1234},
        "timers scheduled",
    ),
    Benchmark(
        "future_chain",
        "future_chain",
        bench_future_chain,
        {"chains": 100, "length": 5000},
        {"chains": 10, "length": 50},
        "futures resolved",
    ),
    Benchmark(
        "gather",
        "gather",
        bench_gather,
        {"n": 100_000},
        {"n": 100},
        "tasks",
    ),
    Benchmark(
        "threadsafe",
        "threadsafe",
        bench_threadsafe,
        {"n": 500_000, "timeout": 120.0},
        {"n": 200, "timeout": 20.0},
        "calls",
    ),
)
BY_NAME = {b.name: b for b in BENCHMARKS}

# The targets: ferroloop ops/s over rloop's, same run.
TARGETS = {
    "call_soon": 1.5,
    "call_later": 1.5,
    "threadsafe": 1.3,
    "sleep0": 1.2,
    "future_chain": 1.2,
    "gather": 1.1,
}


def run_once(bench: Benchmark, loop_name: str, params: dict) -> tuple[int, float]:
    run = Run(loop_name)
    try:
        return bench.func(run, **params)
    finally:
        run.close()


def worker(bench_name: str, loop_name: str, smoke: bool, gc_off: bool, repeat: int) -> int:
    """Subprocess entry point: one warm-up run at smoke size, then ``repeat`` timed runs,
    each on a fresh loop. Prints one JSON line with the time of every timed run; exits
    non-zero (with a traceback) if any run's checks fail."""
    global GC_OFF
    GC_OFF = gc_off
    bench = BY_NAME[bench_name]
    run_once(bench, loop_name, bench.smoke)  # imports, first-call paths, allocator
    params = bench.smoke if smoke else bench.full
    ops, times = 0, []
    for _ in range(repeat):
        ops, seconds = run_once(bench, loop_name, params)
        times.append(seconds)
    print(json.dumps({"ops": ops, "seconds": times}), flush=True)
    return 0


# ---- the runner ----------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """All rounds of one (benchmark, loop): ops/s per round, None where a round failed."""

    rates: list[float | None] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)

    def ok(self) -> list[float]:
        return [r for r in self.rates if r is not None]


def measure(bench: str, loop: str, args: argparse.Namespace) -> tuple[float | None, str | None]:
    """Run one worker subprocess; its ops/s (from the fastest of its timed runs) or an error."""
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
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return None, f"exit code {proc.returncode}:\n{tail}"
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return result["ops"] / min(result["seconds"]), None
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as exc:
        return None, f"unreadable worker output ({exc!r}): {proc.stdout[-500:]!r}"


def fmt_rate(rate: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= div:
            return f"{rate / div:.3g}{suffix}"
    return f"{rate:.3g}"


def spread_pct(rates: list[float]) -> float:
    """Half the min-max range, as a percentage of the median."""
    return (max(rates) - min(rates)) / 2 / statistics.median(rates) * 100


def fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return "skipped"
    rates = cell.ok()
    if not rates:
        return "FAILED"
    text = fmt_rate(statistics.median(rates))
    if len(rates) > 1:
        text += f" ±{spread_pct(rates):.0f}%"
    if cell.failures:
        text += f" ({len(cell.failures)} failed)"
    return text


def ratio(results: dict[str, Cell], peer: str) -> tuple[float, float, float] | None:
    """(ratio of medians, min and max of the per-round paired ratios) of ferroloop over peer."""
    ferro, other = results.get("ferroloop"), results.get(peer)
    if ferro is None or other is None or not ferro.ok() or not other.ok():
        return None
    paired = [
        a / b
        for a, b in zip(ferro.rates, other.rates, strict=True)
        if a is not None and b is not None
    ]
    med = statistics.median(ferro.ok()) / statistics.median(other.ok())
    return med, min(paired, default=med), max(paired, default=med)


def fmt_ratio(r: tuple[float, float, float] | None) -> str:
    if r is None:
        return "n/a"
    med, lo, hi = r
    if lo == hi:
        return f"{med:.2f}x"
    return f"{med:.2f}x ({lo:.2f}-{hi:.2f})"


def fmt_target(group: str, r: tuple[float, float, float] | None, smoke: bool) -> str:
    target = TARGETS.get(group)
    if target is None:
        return ""
    if r is None:
        return f">={target}x: n/a"
    if smoke:
        return f">={target}x: (smoke)"
    return f">={target}x: {'met' if r[0] >= target else 'NOT met'}"


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run_header(markdown: bool, loops: list[str], build_where: str) -> list[str]:
    """The first lines of a report: date, command, Python, loop versions, ferroloop build."""
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    return [
        f"date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"command: `{command}`" if markdown else f"command: {command}",
        (
            f"python: {platform.python_version()} ({platform.python_implementation()}, "
            f"{sys.platform}, {platform.machine()}, {os.cpu_count()} CPUs)"
        ),
        "loops: " + ", ".join(f"{n} {loop_version(n)}" for n in loops),
        f"ferroloop from: {build_where}",
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare ferroloop with asyncio, uvloop and rloop, rounds interleaved.",
    )
    parser.add_argument("--rounds", type=int, help="rounds per benchmark (default 5; smoke 1)")
    parser.add_argument(
        "--repeat",
        type=int,
        help="timed runs per round, each on a fresh loop; a round counts its fastest "
        "(default 3; smoke 1)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="benchmarks (or groups) to run: "
        + ", ".join(dict.fromkeys([b.name for b in BENCHMARKS] + [b.group for b in BENCHMARKS])),
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
        help="disable the cyclic garbage collector during the timed part (default: enabled, "
        "as in real programs)",
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
    if names:
        unknown = [n for n in names if n not in BY_NAME and n not in TARGETS]
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
        args.benchmarks = [b for b in BENCHMARKS if b.name in names or b.group in names]
    else:
        args.benchmarks = list(BENCHMARKS)
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

    results: dict[str, dict[str, Cell]] = {
        b.name: {n: Cell() for n in loops} for b in args.benchmarks
    }
    started = time.perf_counter()
    for rnd in range(args.rounds):
        for i, bench in enumerate(args.benchmarks):
            # Rotate the loop order every round (and per benchmark), so no loop always runs
            # first or right after another one.
            shift = (rnd + i) % len(loops)
            for name in loops[shift:] + loops[:shift]:
                rate, error = measure(bench.name, name, args)
                cell = results[bench.name][name]
                cell.rates.append(rate)
                status = f"{fmt_rate(rate)} {bench.unit}/s" if rate is not None else "FAILED"
                print(
                    f"[round {rnd + 1}/{args.rounds}] {bench.name:<15} {name:<10} {status}",
                    file=sys.stderr,
                    flush=True,
                )
                if error is not None:
                    cell.failures.append(error)
                    print(f"  {bench.name} on {name} failed: {error}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    rebuilt = "ferroloop" in loops and ferroloop_build()[1] != build_stamp
    if rebuilt:
        print(
            "WARNING: ferroloop's extension module changed during the run (rebuilt?): "
            "these results mix two builds; run again.",
            file=sys.stderr,
        )

    headers = ["benchmark", *(f"{n} ops/s" for n in loops)]
    peers = [p for p in PEERS if p in loops] if "ferroloop" in loops else []
    for peer in peers:
        headers.append(f"ferro/{peer}")
        if peer == "rloop":
            headers.append("target (ferro/rloop)")
    rows = []
    for bench in args.benchmarks:
        row = [bench.name, *(fmt_cell(results[bench.name].get(n)) for n in loops)]
        for peer in peers:
            r = ratio(results[bench.name], peer)
            row.append(fmt_ratio(r))
            if peer == "rloop":
                row.append(fmt_target(bench.group, r, args.smoke))
        rows.append(row)
    print(render(headers, rows, args.markdown))
    print()
    print(
        f"ops/s: median over rounds (each round: the fastest of {args.repeat} timed run(s)) "
        "± half the min-max range over rounds; ratios: ferroloop's median ops/s over the "
        "peer's (>1 = ferroloop faster), in parentheses the range of the per-round ratios."
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
