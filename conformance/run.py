#!/usr/bin/env python3
"""Run CPython's own ``test.test_asyncio`` suite against ferroloop.

Each test module runs in its own subprocess (``run.py --child ...``) under a small unittest
harness that records, for every test id, its outcome and which event loops the test created
and ran.  The parent compares the outcomes with ``expected_failures.txt`` and prints a
summary.  ``--stdlib`` runs the very same harness on the stdlib loop (the oracle).

See conformance/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
EXPECTED_FILE = HERE / "expected_failures.txt"
PACKAGE = "test.test_asyncio"

# Longest first, so that --jobs 2 balances well.
MODULES = [
    "test_tasks",
    "test_ssl",
    "test_taskgroups",
    "test_sslproto",
    "test_events",
    "test_futures",
    "test_streams",
    "test_locks",
    "test_waitfor",
    "test_queues",
    "test_sendfile",
    "test_timeouts",
    "test_runners",
    "test_subprocess",
    "test_unix_events",
    "test_sock_lowlevel",
    "test_server",
    "test_pep492",
    "test_threads",
    "test_context",
    "test_buffered_proto",
    "test_futures2",
    "test_eager_task_factory",  # 3.12+
    "test_staggered",  # 3.13+
]

# Test classes whose loop factory hard-codes a stdlib loop.  Each one is replaced by a subclass
# named NEW whose FACTORY returns the loop under test (ferroloop; a stdlib SelectorEventLoop
# with --stdlib, so test ids are the same in both modes).  FACTORY is "create_event_loop" or
# "new_loop" (a method returning a loop), or "setUp" (a setUp that builds self.loop itself).
# The original class and its stdlib-selector siblings (DROP) are removed from the module, and
# so are the Windows-only Proactor classes (always skipped here).
_SELECTOR_VARIANTS = (
    "SelectEventLoopTests",
    "PollEventLoopTests",
    "EPollEventLoopTests",
    "KqueueEventLoopTests",
    "ProactorEventLoopTests",
)
# module: [(NEW, BASE, FACTORY, DROP)]
LOOP_CLASSES: dict[str, list[tuple[str, str, str, tuple[str, ...]]]] = {
    "test_events": [
        ("FerroloopEventLoopTests", "SelectEventLoopTests", "create_event_loop", _SELECTOR_VARIANTS)
    ],
    "test_sock_lowlevel": [
        ("FerroloopEventLoopTests", "SelectEventLoopTests", "create_event_loop", _SELECTOR_VARIANTS)
    ],
    "test_sendfile": [
        ("FerroloopEventLoopTests", "SelectEventLoopTests", "create_event_loop", _SELECTOR_VARIANTS)
    ],
    "test_server": [
        (
            "FerroloopStartServerTests",
            "SelectorStartServerTests",
            "new_loop",
            ("ProactorStartServerTests",),
        ),
    ],
    "test_buffered_proto": [
        (
            "BufferedProtocolFerroloopTests",
            "BufferedProtocolSelectorTests",
            "new_loop",
            ("BufferedProtocolProactorTests",),
        ),
    ],
    "test_sslproto": [
        ("FerroloopStartTLSTests", "SelectorStartTLSTests", "new_loop", ("ProactorStartTLSTests",)),
    ],
    "test_unix_events": [
        ("FerroloopUnixSocketTests", "SelectorEventLoopUnixSocketTests", "setUp", ()),
    ],
}

# Test classes left out of a module: in test_unix_events, everything but the Unix-socket
# classes.  The signal tests hard-code SelectorEventLoop and mock asyncio.unix_events.signal;
# the pipe-transport tests drive the stdlib's own transport classes over a mocked TestLoop
# (ferroloop's pipe transports are covered by test_events and test_subprocess); the
# child-watcher tests and PolicyTests exercise the stdlib's watchers, which ferroloop does not
# use (it watches children with pidfds).
DROP_CLASSES: dict[str, tuple[str, ...]] = {
    "test_unix_events": (
        "SelectorEventLoopSignalTests",
        "UnixReadPipeTransportTests",
        "UnixWritePipeTransportTests",
        "AbstractChildWatcherTests",
        "BaseChildWatcherTests",
        "SafeChildWatcherTests",
        "FastChildWatcherTests",
        "PolicyTests",
    ),
}


def inject_loop_classes(module, modname: str, new_target_loop) -> None:
    """Replace the stdlib-loop test classes of LOOP_CLASSES[modname] (see there)."""
    for new, base_name, factory, drop in LOOP_CLASSES.get(modname, ()):
        base = getattr(module, base_name)
        if factory == "setUp":

            def setUp(self, base=base):
                super(base, self).setUp()  # skip base.setUp, which builds a stdlib loop
                self.loop = new_target_loop()
                self.set_event_loop(self.loop)

            attrs = {"setUp": setUp}
        else:
            attrs = {factory: lambda self: new_target_loop()}
        cls = type(new, (base,), attrs)
        cls.__module__ = module.__name__
        cls.__qualname__ = new
        for name in (base_name, *drop):
            if hasattr(module, name):
                delattr(module, name)
        setattr(module, new, cls)


# ferroloop loop methods that are not implemented yet, by the issue they belong to.  A test that
# fails because it awaited one of them is listed with the reason "<issue>: loop.<method>()".
NETWORKING = "needs networking (issue 3)"
PIPES = "needs pipes/subprocess (issue 4)"
PENDING_REASONS = dict.fromkeys(
    (
        "create_connection create_server create_unix_connection create_unix_server "
        "create_datagram_endpoint connect_accepted_socket start_tls sendfile sock_recv "
        "sock_recv_into sock_recvfrom sock_recvfrom_into sock_sendall sock_sendto sock_connect "
        "sock_accept sock_sendfile getaddrinfo getnameinfo"
    ).split(),
    NETWORKING,
)
PENDING_REASONS.update(
    dict.fromkeys(
        "connect_read_pipe connect_write_pipe subprocess_exec subprocess_shell".split(), PIPES
    )
)
PENDING_METHODS = list(PENDING_REASONS)

FAILING = {"fail", "error", "crash", "hang"}
MAX_RESTARTS = 25  # per module: restarts after a crashed or hung test

# Loop usage categories recorded per test (see Harness.loop_category).
CAT_TARGET = "target"  # a loop under test (ferroloop; stdlib SelectorEventLoop with --stdlib) ran
CAT_MIXED = "mixed"  # the loop under test ran, and so did another loop
CAT_OTHER = "other"  # only another loop ran (test_utils.TestLoop, a mocked BaseEventLoop, ...)
CAT_TARGET_IDLE = "target-idle"  # a loop under test was created but never ran
CAT_OTHER_IDLE = "other-idle"  # only another loop was created, none ran
CAT_NONE = "none"  # no event loop was created


# =====================================================================================
# Child side: runs one module in-process and streams JSON lines to a file.
# =====================================================================================


def _child_main(config_path: str) -> int:
    import faulthandler
    import functools
    import importlib
    import unittest

    with open(config_path) as f:
        cfg = json.load(f)
    mode = cfg["mode"]
    out = open(cfg["out"], "a", buffering=1)

    def emit(**record):
        out.write(json.dumps(record) + "\n")
        out.flush()

    import asyncio
    from asyncio import base_events, unix_events

    if mode == "ferroloop":
        import ferroloop

        target_types: tuple[type, ...] = (ferroloop.Loop,)

        # ferroloop's own policy, plus the Unix child-watcher API that 3.11's test suite
        # (and asyncio.set_child_watcher) expects of the default policy.
        unix_policy = getattr(unix_events, "_UnixDefaultEventLoopPolicy", None)
        bases = (ferroloop.EventLoopPolicy,) + ((unix_policy,) if unix_policy else ())
        ConformancePolicy = type("ConformancePolicy", bases, {})

        # test_asyncio modules reset the policy to None in tearDownModule(); a fresh default
        # policy is built from asyncio.DefaultEventLoopPolicy, so it must be ours too.
        asyncio.DefaultEventLoopPolicy = ConformancePolicy
        unix_events.DefaultEventLoopPolicy = ConformancePolicy
        asyncio.set_event_loop_policy(ConformancePolicy())

        def new_target_loop():
            return ferroloop.new_event_loop()

        loop_classes = [base_events.BaseEventLoop, ferroloop.Loop]
    else:
        target_types = (asyncio.SelectorEventLoop,)

        def new_target_loop():
            return asyncio.SelectorEventLoop()

        loop_classes = [base_events.BaseEventLoop]

    # ---- record which loops each test creates and runs ------------------------------
    usage: dict[str, set[str]] = {"ran": set(), "created": set()}
    usage_lock = threading.Lock()

    def note(kind, loop):
        is_target = isinstance(loop, target_types)
        name = ("T:" if is_target else "O:") + type(loop).__qualname__
        with usage_lock:
            usage[kind].add(name)

    for cls in loop_classes:
        orig_run_forever = cls.run_forever
        orig_init = cls.__init__

        def make(orig_run_forever=orig_run_forever, orig_init=orig_init):
            @functools.wraps(orig_run_forever)
            def run_forever(self):
                note("ran", self)
                return orig_run_forever(self)

            @functools.wraps(orig_init)
            def __init__(self, *args, **kwargs):
                note("created", self)
                return orig_init(self, *args, **kwargs)

            return run_forever, __init__

        cls.run_forever, cls.__init__ = make()

    # ---- record which not-yet-implemented loop methods each test awaited ---------------
    # ferroloop's placeholders for pending methods (networking, pipes, subprocesses) are
    # coroutine functions raising NotImplementedError, documented "Not implemented yet".  They
    # are wrapped so that a test's record names the methods it needed, even when the error was
    # swallowed or the test hung afterwards.  An implemented method is left alone.
    needs: list[str] = []
    current = {"id": None}
    if mode == "ferroloop":
        import inspect

        for name in PENDING_METHODS:
            stub = getattr(ferroloop.Loop, name, None)
            doc = getattr(stub, "__doc__", None) or ""
            if not (inspect.iscoroutinefunction(stub) and doc.startswith("Not implemented yet")):
                continue

            def make_stub(name=name, stub=stub):
                @functools.wraps(stub)
                async def pending(self, *args, **kwargs):
                    with usage_lock:
                        new = name not in needs
                        if new:
                            needs.append(name)
                    if new:
                        emit(event="needs", id=current["id"], method=name)
                    return await stub(self, *args, **kwargs)

                return pending

            setattr(ferroloop.Loop, name, make_stub())

    # ---- import the module and adapt the stdlib-loop-only fixtures ------------------
    from test.test_asyncio import utils as test_utils

    adapt = cfg["adapt"]
    if adapt:
        orig_new_test_loop = test_utils.TestCase.new_test_loop

        def new_test_loop(self, gen=None):
            # TestLoop with a time generator drives a virtual clock: keep it.  Without one
            # it is just a loop: use the loop under test.
            if gen is not None:
                return orig_new_test_loop(self, gen)
            loop = new_target_loop()
            self.set_event_loop(loop)
            return loop

        test_utils.TestCase.new_test_loop = new_test_loop

    modname = cfg["module"]
    try:
        # A dotted name is imported as is (handy for testing the harness itself).
        module = importlib.import_module(modname if "." in modname else f"{PACKAGE}.{modname}")
    except unittest.SkipTest as exc:
        emit(event="result", id=f"{modname} (import)", outcome="skip", detail=str(exc), loops=[])
        emit(event="done")
        return 0
    except Exception as exc:
        import traceback

        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.endswith(modname):
            outcome, detail = "skip", f"not in this Python's test suite ({exc})"
        else:
            outcome, detail = "error", traceback.format_exc()
        emit(event="result", id=f"{modname} (import)", outcome=outcome, detail=detail, loops=[])
        emit(event="done")
        return 0

    inject_loop_classes(module, modname, new_target_loop)
    for name in DROP_CLASSES.get(modname, ()):
        if hasattr(module, name):
            delattr(module, name)

    if adapt and modname == "test_runners":
        # BaseTest.new_loop builds a BaseEventLoop with a mocked selector; use the loop under
        # test instead, keeping the shutdown_asyncgens() bookkeeping tearDown checks.
        def new_loop(self):
            loop = new_target_loop()
            loop.shutdown_ag_run = False
            orig_shutdown_asyncgens = loop.shutdown_asyncgens

            async def shutdown_asyncgens():
                loop.shutdown_ag_run = True
                await orig_shutdown_asyncgens()

            loop.shutdown_asyncgens = shutdown_asyncgens
            return loop

        module.BaseTest.new_loop = new_loop

    if adapt and modname == "test_tasks":
        # GatherTestsBase._run_loop polls the private loop._ready deque of the loop that
        # new_test_loop() returned; run the loop a fixed number of iterations instead.
        def _run_loop(self, loop):
            for _ in range(10):
                test_utils.run_briefly(loop)

        module.GatherTestsBase._run_loop = _run_loop

    if adapt and modname == "test_pep492":
        # BaseTest.setUp builds a BaseEventLoop with a mocked selector.
        def setUp(self):
            test_utils.TestCase.setUp(self)
            self.loop = new_target_loop()
            self.set_event_loop(self.loop)

        module.BaseTest.setUp = setUp

    suite = unittest.defaultTestLoader.loadTestsFromModule(module)

    def flatten(s):
        for t in s:
            if isinstance(t, unittest.TestSuite):
                yield from flatten(t)
            else:
                yield t

    skip_ids = set(cfg["skip"])
    patterns = cfg["patterns"]
    only = set(cfg["only"]) if cfg["only"] is not None else None

    def short(test_id: str) -> str:
        prefix = PACKAGE + "."
        return test_id[len(prefix) :] if test_id.startswith(prefix) else test_id

    selected = []
    for t in flatten(suite):
        tid = short(t.id())
        if tid in skip_ids or (only is not None and tid not in only):
            continue
        if patterns and not any(fnmatch.fnmatchcase(tid, p) for p in patterns):
            continue
        selected.append(t)
    emit(event="loaded", count=len(selected))

    test_timeout = cfg["test_timeout"]
    listed = set(cfg["listed"])
    listed_timeout = min(cfg["listed_timeout"] or test_timeout, test_timeout or float("inf"))
    err_file = sys.__stderr__

    # ---- side effects a test leaves behind (reported, not counted as failures) -----------
    import gc
    import logging

    from test import support

    env_notes: list[str] = []

    def note_env(text: str) -> None:
        if len(env_notes) < 5:
            env_notes.append(text.strip().splitlines()[0][:300] if text.strip() else text)

    orig_unraisablehook = sys.unraisablehook

    def unraisablehook(unraisable):
        exc = unraisable.exc_value
        what = f"{type(exc).__name__}: {exc}" if exc is not None else repr(unraisable.exc_type)
        note_env(f"unraisable exception ({unraisable.err_msg or 'Exception ignored'}): {what}")
        orig_unraisablehook(unraisable)

    sys.unraisablehook = unraisablehook

    class ErrorLogHandler(logging.Handler):
        def emit(self, record):
            note_env(f"asyncio logged {record.levelname}: {record.getMessage()}")

    logging.getLogger("asyncio").addHandler(ErrorLogHandler(logging.ERROR))

    class Result(unittest.TestResult):
        def __init__(self):
            super().__init__()
            self.cur = None

        def _tb(self, err, test):
            text = self._exc_info_to_string(err, test)
            return text if len(text) < 8000 else text[:2000] + "\n[...]\n" + text[-5000:]

        def startTest(self, test):
            super().startTest(test)
            with usage_lock:
                usage["ran"].clear()
                usage["created"].clear()
                needs.clear()
            tid = short(test.id())
            current["id"] = tid
            self.cur = {"id": tid, "outcome": None, "detail": "", "t0": time.monotonic()}
            emit(event="start", id=tid)
            env_notes.clear()
            support.environment_altered = False
            limit = listed_timeout if tid in listed else test_timeout
            if limit:
                faulthandler.dump_traceback_later(limit, exit=True, file=err_file)

        def _set(self, test, outcome, detail=""):
            tid = short(test.id())
            if self.cur is None or self.cur["id"] != tid:
                # An error outside a test (setUpClass, setUpModule, tearDownModule, ...).
                emit(event="result", id=tid, outcome=outcome, detail=detail, loops=[])
                return
            rank = {"pass": 0, "skip": 1, "xfail": 2, "uxpass": 2, "fail": 3, "error": 3}
            cur = self.cur
            if cur["outcome"] is None or rank[outcome] > rank[cur["outcome"]]:
                cur["outcome"] = outcome
            if detail:
                cur["detail"] = (cur["detail"] + "\n" + detail).strip("\n")

        def addSuccess(self, test):
            self._set(test, "pass")

        def addFailure(self, test, err):
            self._set(test, "fail", self._tb(err, test))

        def addError(self, test, err):
            self._set(test, "error", self._tb(err, test))

        def addSkip(self, test, reason):
            if isinstance(test, unittest.case._SubTest):
                return  # a skipped subtest does not make the test skipped
            self._set(test, "skip", reason)

        def addExpectedFailure(self, test, err):
            self._set(test, "xfail", self._tb(err, test))

        def addUnexpectedSuccess(self, test):
            self._set(test, "uxpass", "unexpected success (@expectedFailure in CPython)")

        def addSubTest(self, test, subtest, err):
            if err is not None:
                kind = "fail" if issubclass(err[0], test.failureException) else "error"
                self._set(test, kind, f"{subtest.id()}:\n" + self._tb(err, test))

        def stopTest(self, test):
            faulthandler.cancel_dump_traceback_later()
            cur, self.cur = self.cur, None
            if cur is not None:
                gc.collect()  # run the finalizers of this test's objects now
                if support.environment_altered:
                    note_env("test.support: environment altered (leaked threads/processes?)")
                with usage_lock:
                    created = ["created " + n for n in sorted(usage["created"])]
                    loops = sorted(usage["ran"]) + created
                    needed = list(needs)
                emit(
                    event="result",
                    id=cur["id"],
                    outcome=cur["outcome"] or "pass",
                    detail=cur["detail"],
                    loops=loops,
                    env=list(env_notes),
                    needs=needed,
                    secs=round(time.monotonic() - cur["t0"], 3),
                )
            super().stopTest(test)

    result = Result()
    unittest.TestSuite(selected).run(result)
    emit(event="done")
    out.close()
    # Skip interpreter teardown: a crash in a loop's finalizer at exit is not a test result.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# =====================================================================================
# Parent side.
# =====================================================================================


def loop_category(loops: list[str]) -> str:
    ran = [x for x in loops if not x.startswith("created ")]
    created = [x[len("created ") :] for x in loops if x.startswith("created ")]
    ran_t = any(x.startswith("T:") for x in ran)
    ran_o = any(x.startswith("O:") for x in ran)
    if ran_t and ran_o:
        return CAT_MIXED
    if ran_t:
        return CAT_TARGET
    if ran_o:
        return CAT_OTHER
    if any(x.startswith("T:") for x in created):
        return CAT_TARGET_IDLE
    if created:
        return CAT_OTHER_IDLE
    return CAT_NONE


def load_expected(path: Path) -> dict[str, str]:
    expected: dict[str, str] = {}
    if not path.exists():
        return expected
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tid, sep, reason = line.partition(" # ")
        tid = tid.strip()
        if not sep or not reason.strip():
            sys.exit(f"{path}:{lineno}: expected '<test id> # <reason>', got {raw!r}")
        if tid in expected:
            sys.exit(f"{path}:{lineno}: duplicate entry {tid}")
        expected[tid] = reason.strip()
    return expected


class ModuleRun:
    """Drives the child process(es) for one module; restarts after a crashed test."""

    def __init__(
        self,
        module: str,
        args,
        workdir: Path,
        mode: str,
        only: list[str] | None = None,
        listed: set[str] | None = None,
    ):
        self.module = module
        self.args = args
        self.mode = mode
        self.only = only  # exact test ids to run (the oracle re-run), or None
        # tests in expected_failures.txt: they get the shorter --listed-timeout
        self.listed = sorted(t for t in listed or () if t.startswith(module + "."))
        self.workdir = workdir
        self.results: dict[str, dict] = {}
        self.module_error: str | None = None  # timed out / could not run at all
        self.restarts = 0
        self.secs = 0.0
        self.log = workdir / f"{module}.log"

    def run(self) -> ModuleRun:
        t0 = time.monotonic()
        deadline = t0 + self.args.timeout
        jsonl = self.workdir / f"{self.module}.jsonl"
        cfg_path = self.workdir / f"{self.module}.json"
        patterns = [p if any(c in p for c in "*?[") else f"*{p}*" for p in self.args.k]
        with open(self.log, "w") as log:
            while True:
                jsonl.write_text("")
                cfg = {
                    "mode": self.mode,
                    "only": self.only,
                    "module": self.module,
                    "out": str(jsonl),
                    "skip": sorted(self.results),
                    "patterns": patterns,
                    "test_timeout": self.args.test_timeout,
                    "listed": self.listed,
                    "listed_timeout": self.args.listed_timeout,
                    "adapt": not self.args.no_adapt,
                }
                cfg_path.write_text(json.dumps(cfg))
                cwd = tempfile.mkdtemp(prefix=f"{self.module}-", dir=self.workdir)
                env = dict(os.environ)
                env.pop("PYTHONASYNCIODEBUG", None)
                if self.args.asyncio_debug:
                    env["PYTHONASYNCIODEBUG"] = "1"
                env["PYTHONFAULTHANDLER"] = "1"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(cfg_path)]
                log.write(f"$ {' '.join(cmd)}   (cwd {cwd})\n")
                log.flush()
                proc = subprocess.Popen(
                    cmd,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                timed_out = False
                try:
                    rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    rc = proc.wait()
                shutil.rmtree(cwd, ignore_errors=True)

                started = None
                needs: list[str] = []  # pending loop methods the started test awaited
                done = False
                for line in jsonl.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a crash
                    if rec["event"] == "start":
                        started = rec["id"]
                        needs = []
                    elif rec["event"] == "needs":
                        needs.append(rec["method"])
                    elif rec["event"] == "result":
                        self.results[rec["id"]] = rec
                        if rec["id"] == started:
                            started = None
                    elif rec["event"] == "done":
                        done = True
                if done and rc == 0:
                    break
                if timed_out:
                    self.module_error = f"module timed out after {self.args.timeout:.0f}s" + (
                        f" (in {started})" if started else ""
                    )
                    if started:
                        self.results[started] = {
                            "id": started,
                            "outcome": "hang",
                            "detail": "module timeout reached while this test ran",
                            "loops": [],
                            "needs": needs,
                        }
                    break
                if started is None:
                    self.module_error = f"child exited with status {rc} outside any test"
                    break
                if rc < 0:
                    try:
                        signame = signal.Signals(-rc).name
                    except ValueError:
                        signame = str(-rc)
                    outcome, detail = "crash", f"process killed by {signame} during this test"
                elif rc == 1:
                    # faulthandler.dump_traceback_later(exit=True) exits with status 1.
                    outcome = "hang"
                    if started in self.listed:
                        limit = f"--listed-timeout ({self.args.listed_timeout:.0f}s)"
                    else:
                        limit = f"--test-timeout ({self.args.test_timeout:.0f}s)"
                    detail = f"no result within {limit}"
                else:
                    outcome, detail = "crash", f"process exited with status {rc} during this test"
                detail += f"; see {rel(self.log)}"
                self.results[started] = {
                    "id": started,
                    "outcome": outcome,
                    "detail": detail,
                    "loops": [],
                    "needs": needs,
                }
                self.restarts += 1
                if self.restarts > MAX_RESTARTS:
                    self.module_error = f"gave up after {MAX_RESTARTS} restarts"
                    break
                log.write(f"\n### restarting after {outcome} in {started}\n")
                log.flush()
        self.secs = time.monotonic() - t0
        return self


def needed_methods(rec: dict) -> list[str]:
    """The not-yet-implemented loop methods a test awaited, in order (see the child)."""
    needs = list(rec.get("needs") or [])
    detail = rec.get("detail", "")
    for m in re.finditer(r"does not implement loop\.(\w+)\(\)", detail):
        if m.group(1) not in needs:
            needs.append(m.group(1))
    return needs


_PRIVATE_ATTR = re.compile(r"AttributeError: '(\w+)' object has no attribute '(_\w+)'")


def suggest_reason(rec: dict) -> str:
    """A reason for an expected_failures.txt line (the lead still has to check it)."""
    needs = needed_methods(rec)
    if needs:
        method = needs[0]
        reason = PENDING_REASONS.get(method, NETWORKING)
        return f"{reason}: loop.{method}()"
    detail = rec.get("detail", "")
    m = _PRIVATE_ATTR.search(detail)
    frames = re.findall(r'^\s*File "([^"]+)"', detail, re.M)
    if m and frames and "/test_asyncio/" in frames[-1]:  # the test itself used the attribute
        obj = "loop" if m.group(1) in ("Loop", "ConformancePolicy") else m.group(1)
        return f"private internals: uses {obj}.{m.group(2)}"
    last = tb_summary(detail, 3)
    return f"TODO: {last[-1][:80] if last else rec['outcome']}"


_LISTED_NEED = re.compile(r"^needs [^:]*: loop\.(\w+)\(\)")


def stale_need(reason: str, rec: dict) -> str | None:
    """For a listed failure whose reason names a pending loop method that the test no longer
    awaited: that method (it landed, or the test now fails before reaching it)."""
    m = _LISTED_NEED.match(reason)
    if m and m.group(1) not in needed_methods(rec):
        return m.group(1)
    return None


def print_list_failures(
    unexpected_fail: list[dict], unexpected_pass: list[dict], stale_reason: list[dict]
) -> None:
    """Paste-ready expected_failures.txt lines, grouped like the file's sections."""
    groups: dict[str, list[str]] = {}
    for rec in sorted(unexpected_fail, key=lambda r: r["id"]):
        reason = suggest_reason(rec)
        key = next(
            (g for g in ("private internals", NETWORKING, PIPES) if reason.startswith(g)), ""
        )
        groups.setdefault(key, []).append(f"{rec['id']} # {reason}")
    titles = {
        "private internals": "(a) private internals of the stdlib loop, or mocks of them",
        NETWORKING: f"(b) {NETWORKING}",
        PIPES: f"(b) {PIPES}",
        "": "not classified: a ferroloop bug unless the test uses private internals (check!)",
    }
    print("\n# ==== for expected_failures.txt: only private-internals/mock tests and, for now,")
    print("# ==== networking/pipes/subprocess tests belong there; anything else is a bug")
    for key, title in titles.items():
        if groups.get(key):
            print(f"# ---- {title}")
            print("\n".join(groups[key]))
    if stale_reason:
        print("# ---- replace these lines (the listed method no longer makes the test fail)")
        for rec in sorted(stale_reason, key=lambda r: r["id"]):
            print(f"{rec['id']} # {suggest_reason(rec)}")
    if unexpected_pass:
        print("# ---- delete these lines (the tests pass now)")
        for rec in sorted(unexpected_pass, key=lambda r: r["id"]):
            print(f"# {rec['id']}")


def run_modules(module_runs: list[ModuleRun], jobs: int) -> dict[str, ModuleRun]:
    runs: dict[str, ModuleRun] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = [pool.submit(mr.run) for mr in module_runs]
        for fut in concurrent.futures.as_completed(futs):
            r = fut.result()
            runs[r.module] = r
            bad = sum(1 for x in r.results.values() if x["outcome"] in FAILING)
            extra = f", {r.restarts} restart(s)" if r.restarts else ""
            err = f"  [{r.module_error}]" if r.module_error else ""
            print(
                f"  {r.module:<19} {len(r.results):5d} tests {bad:4d} failed (incl. listed)  "
                f"{r.secs:6.1f}s{extra}{err}",
                flush=True,
            )
    return runs


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def tb_summary(detail: str, max_lines: int = 4) -> list[str]:
    """The innermost frame and the exception line(s) of a traceback text."""
    lines = [x for x in detail.splitlines() if x.strip()]
    if not lines:
        return []
    last_file = None
    for i, x in enumerate(lines):
        if x.lstrip().startswith('File "'):
            last_file = i
    if last_file is None:
        return lines[:max_lines]
    frame = lines[last_file : last_file + 2]
    rest = lines[last_file + 2 :]
    # Skip the "~~~^^^" markers 3.11 prints below the code line.
    rest = [x for x in rest if set(x.strip()) - set("~^")]
    return [x.strip() for x in frame] + rest[: max(1, max_lines - len(frame))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Run CPython's test.test_asyncio against ferroloop (or, --stdlib, "
        "against the stdlib loop as an oracle)."
    )
    parser.add_argument("--stdlib", action="store_true", help="run on the stdlib loop (oracle)")
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this module (repeatable), e.g. test_tasks or tasks",
    )
    parser.add_argument(
        "-k",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only tests whose id matches (substring, or fnmatch pattern if it has *?[; "
        "repeatable)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="per-module timeout in seconds (300)"
    )
    parser.add_argument(
        "--test-timeout",
        type=float,
        default=60,
        help="per-test timeout in seconds; a hung test is recorded and the module resumes (60)",
    )
    parser.add_argument(
        "--listed-timeout",
        type=float,
        default=15,
        help="per-test timeout for the tests in expected_failures.txt (15); they hang when a "
        "not-yet-implemented method fails inside a callback",
    )
    parser.add_argument("--jobs", "-j", type=int, default=2, help="parallel modules (2)")
    parser.add_argument(
        "--list-failures",
        action="store_true",
        help="print unexpected failures/passes in paste-ready expected_failures.txt form",
    )
    parser.add_argument(
        "--expected",
        type=Path,
        default=EXPECTED_FILE,
        help="expected-failure list (default: conformance/expected_failures.txt)",
    )
    parser.add_argument(
        "--no-adapt",
        action="store_true",
        help="do not swap the loop under test into TestLoop()/mocked-BaseEventLoop fixtures",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=WORK,
        help="logs and scratch files; its MODE/ subdirectory is emptied first (conformance/_work)",
    )
    parser.add_argument("--json", type=Path, help="also write all per-test results to this file")
    parser.add_argument(
        "--asyncio-debug",
        action="store_true",
        help="run the tests with PYTHONASYNCIODEBUG=1 (asyncio debug mode)",
    )
    parser.add_argument(
        "--no-oracle",
        action="store_true",
        help="do not re-run unexpected failures on the stdlib loop (spots tests failing there too)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        try:
            return _child_main(args.child)
        except Exception:
            # Setting up the harness failed (e.g. ferroloop does not import): one error result.
            import traceback

            cfg = json.loads(Path(args.child).read_text())
            with open(cfg["out"], "a") as out:
                rec = {
                    "event": "result",
                    "id": f"{cfg['module']} (harness setup)",
                    "outcome": "error",
                    "detail": traceback.format_exc(),
                    "loops": [],
                }
                out.write(json.dumps(rec) + "\n" + json.dumps({"event": "done"}) + "\n")
            return 0

    args.mode = "stdlib" if args.stdlib else "ferroloop"
    modules = MODULES
    if args.module:
        modules = []
        for name in args.module:
            if "." not in name and not name.startswith("test_"):
                name = f"test_{name}"
            if name not in MODULES:
                print(f"note: {name} is not in the default module list", file=sys.stderr)
            modules.append(name)
    expected = load_expected(args.expected) if args.mode == "ferroloop" else {}

    args.work_dir.mkdir(parents=True, exist_ok=True)
    workdir = args.work_dir / args.mode
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    target = "ferroloop" if args.mode == "ferroloop" else "stdlib SelectorEventLoop"
    print(f"test.test_asyncio on {target}: {len(modules)} modules, {args.jobs} jobs", flush=True)
    t0 = time.monotonic()
    runs = run_modules(
        [ModuleRun(m, args, workdir, args.mode, listed=set(expected)) for m in modules], args.jobs
    )

    # ---- classify ----------------------------------------------------------------------
    columns = ["tests", "pass", "fail", "xfail", "xpass", "both", "skip", "crash", "on-other"]
    columns.append("secs")
    table: dict[str, dict[str, float]] = {}
    unexpected_fail: list[dict] = []
    unexpected_pass: list[dict] = []
    stale_reason: list[dict] = []
    cats_pass: dict[str, int] = {}
    all_results: dict[str, dict] = {}
    for m in modules:
        r = runs[m]
        row = dict.fromkeys(columns, 0)
        row["secs"] = r.secs
        for tid, rec in sorted(r.results.items()):
            rec["module"] = m
            outcome = rec["outcome"]
            cat = loop_category(rec.get("loops", []))
            rec["category"] = cat
            all_results[tid] = rec
            row["tests"] += 1
            if outcome in ("crash", "hang"):
                row["crash"] += 1
            listed = tid in expected
            if outcome in FAILING:
                rec["stale_need"] = stale_need(expected[tid], rec) if listed else None
                if listed and rec["stale_need"]:
                    # Listed as needing loop.X(), but X is no longer what makes it fail.
                    row["fail"] += 1
                    rec["verdict"] = "STALE REASON"
                    stale_reason.append(rec)
                elif listed:
                    row["xfail"] += 1
                    rec["verdict"] = "expected failure"
                else:
                    row["fail"] += 1
                    rec["verdict"] = "UNEXPECTED FAILURE"
                    unexpected_fail.append(rec)
            elif outcome == "skip":
                row["skip"] += 1
                rec["verdict"] = "skip"
            elif listed:
                row["xpass"] += 1
                rec["verdict"] = "UNEXPECTED PASS"
                unexpected_pass.append(rec)
            else:
                # pass, or CPython's own @expectedFailure / unexpected success
                row["pass"] += 1
                rec["verdict"] = "pass"
                cats_pass[cat] = cats_pass.get(cat, 0) + 1
                if cat in (CAT_OTHER, CAT_OTHER_IDLE):
                    row["on-other"] += 1
        table[m] = row

    # ---- oracle: do the unexpected failures also fail on the stdlib loop? ----------------
    both_fail: list[dict] = []
    by_module: dict[str, list[str]] = {}
    if args.mode == "ferroloop" and not args.no_oracle:
        for rec in unexpected_fail:
            if rec["id"].startswith(rec["module"] + "."):  # not a fixture or harness error
                by_module.setdefault(rec["module"], []).append(rec["id"])
    if by_module:
        print(f"re-running {sum(map(len, by_module.values()))} failing tests on the stdlib loop")
        oracle_dir = args.work_dir / "oracle"
        shutil.rmtree(oracle_dir, ignore_errors=True)
        oracle_dir.mkdir(parents=True)
        oracle = run_modules(
            [ModuleRun(m, args, oracle_dir, "stdlib", ids) for m, ids in by_module.items()],
            args.jobs,
        )
        oracle_results = {tid: rec for r in oracle.values() for tid, rec in r.results.items()}
        for rec in list(unexpected_fail):
            o = oracle_results.get(rec["id"])
            if o is not None and o["outcome"] in FAILING:
                rec["verdict"] = "fails on stdlib too"
                rec["stdlib_detail"] = o.get("detail", "")
                unexpected_fail.remove(rec)
                both_fail.append(rec)
                table[rec["module"]]["fail"] -= 1
                table[rec["module"]]["both"] += 1
    wall = time.monotonic() - t0

    # ---- report ------------------------------------------------------------------------
    print()
    header = f"{'module':<19}" + "".join(f"{c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    totals = dict.fromkeys(columns, 0)
    for m in modules:
        row = table[m]
        print(
            f"{m:<19}"
            + "".join(f"{row[c]:>9.1f}" if c == "secs" else f"{row[c]:>9d}" for c in columns)
            + (f"  {runs[m].module_error}" if runs[m].module_error else "")
        )
        for c in columns:
            totals[c] += row[c]
    print("-" * len(header))
    print(
        f"{'total':<19}"
        + "".join(f"{totals[c]:>9.1f}" if c == "secs" else f"{totals[c]:>9d}" for c in columns)
    )
    other = "stdlib TestLoop/mocked loop" if args.mode == "ferroloop" else "TestLoop/mocked loop"
    print(
        "pass: passed, not listed | fail: unexpected failures (incl. crashes and hangs) | "
        "xfail: listed in\nexpected_failures.txt and failed | xpass: listed but passed | "
        "both: failed on the stdlib loop too\n(not counted) | crash: crashed or hung "
        f"(also in fail/xfail/both) | on-other: passes that ran on\n{other} only"
    )

    names = {
        CAT_TARGET: f"ran on {target}",
        CAT_MIXED: f"ran on {target} and on another loop",
        CAT_TARGET_IDLE: f"created a {target} loop, never ran it",
        CAT_OTHER: f"ran on {other} only (virtual time / mocks)",
        CAT_OTHER_IDLE: f"created a {other} only, never ran it",
        CAT_NONE: "used no event loop",
    }
    print("\nloop used by the passing tests:")
    for cat in (CAT_TARGET, CAT_MIXED, CAT_TARGET_IDLE, CAT_OTHER, CAT_OTHER_IDLE, CAT_NONE):
        print(f"  {cats_pass.get(cat, 0):6d}  {names[cat]}")

    crashed_modules = [m for m in modules if runs[m].module_error]
    if unexpected_fail:
        print(f"\nUNEXPECTED FAILURES ({len(unexpected_fail)}):")
        for rec in unexpected_fail:
            print(f"  {rec['id']}  [{rec['outcome']}, {names[rec['category']]}]")
            for line in tb_summary(rec.get("detail", "")):
                print(f"      {line[:200]}")
    if unexpected_pass:
        print(f"\nUNEXPECTED PASSES ({len(unexpected_pass)}) - remove from {args.expected.name}:")
        for rec in unexpected_pass:
            print(f"  {rec['id']}  # {expected[rec['id']]}")
    if stale_reason:
        print(
            f"\nSTALE REASONS ({len(stale_reason)}) - listed as needing a loop method that this "
            "test no longer\nawaits (it landed?); the test fails for another reason (a bug, or "
            "a next missing method):"
        )
        for rec in stale_reason:
            print(f"  {rec['id']}  # {expected[rec['id']]}")
            now = needed_methods(rec)
            print(f"      awaited: {', '.join(f'loop.{m}()' for m in now) or 'no pending method'}")
            for line in tb_summary(rec.get("detail", ""))[-2:]:
                print(f"      {line[:200]}")
    for m in crashed_modules:
        print(f"\nMODULE {m}: {runs[m].module_error} (log: {rel(runs[m].log)})")
    side_effects = [
        rec for rec in all_results.values() if rec.get("env") and rec["verdict"] in ("pass", "skip")
    ]
    if side_effects:
        print(
            f"\nSIDE EFFECTS of {len(side_effects)} passing tests (unraisable exceptions, asyncio "
            "error logs,\nleaked threads; not counted, the stdlib loop leaves none):"
        )
        for rec in sorted(side_effects, key=lambda r: r["id"])[:40]:
            print(f"  {rec['id']}")
            for note in rec["env"][:2]:
                print(f"      {note[:200]}")
        if len(side_effects) > 40:
            print(f"  ... and {len(side_effects) - 40} more (see --json)")
    if both_fail:
        print(f"\nFAIL ON THE STDLIB LOOP TOO ({len(both_fail)}, not counted):")
        for rec in both_fail:
            print(f"  {rec['id']}  [{rec['outcome']}]")
            for line in tb_summary(rec.get("stdlib_detail", ""), 2)[-1:]:
                print(f"      stdlib: {line[:200]}")

    full_run = not args.k and set(modules) == set(MODULES)
    if full_run and expected:
        stale = sorted(set(expected) - set(all_results))
        if stale:
            print(f"\nwarning: {len(stale)} entries of {args.expected.name} match no test:")
            for tid in stale:
                print(f"  {tid}")

    if args.list_failures and (unexpected_fail or unexpected_pass or stale_reason):
        print_list_failures(unexpected_fail, unexpected_pass, stale_reason)

    if args.json:
        args.json.write_text(json.dumps(all_results, indent=1, sort_keys=True))

    ferro_passes = cats_pass.get(CAT_TARGET, 0) + cats_pass.get(CAT_MIXED, 0)
    n_failed = (
        len(unexpected_fail) + len(unexpected_pass) + len(stale_reason) + len(crashed_modules)
    )
    print(
        f"\n{target}: {ferro_passes} passes ran on it, {totals['pass'] - ferro_passes} other "
        f"passes, {totals['xfail']} expected failures, {totals['skip']} skipped; "
        f"wall time {wall:.0f}s; logs in {rel(workdir)}/"
    )
    print(f"{ferro_passes} passed, {n_failed} failed")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
