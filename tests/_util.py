"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable

import ferroloop
import pytest

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "ferroloop": ferroloop.new_event_loop,
}
# The loops the ``loop`` fixture runs each parity test on. FERROLOOP_TEST_LOOPS=ferroloop
# leaves out the stdlib loop (`make test-pythons`: other Pythons' stdlib loops have bugs
# of their own); tests that compare both loops directly still use both.
TESTED_LOOPS = [
    name
    for name in LOOP_FACTORIES
    if name in os.environ.get("FERROLOOP_TEST_LOOPS", ",".join(LOOP_FACTORIES)).split(",")
]

PY312 = sys.version_info >= (3, 12)


def _reprs_show_args() -> bool:
    import inspect
    from asyncio import format_helpers

    params = inspect.signature(format_helpers._format_args_and_kwargs).parameters
    return "debug" not in params


# Python 3.13 stopped showing a callback's arguments in handle reprs and callback error
# messages outside debug mode (asyncio.format_helpers takes a ``debug`` flag there).
REPR_SHOWS_ARGS = _reprs_show_args()


def repr_args(text: str) -> str:
    """The argument list asyncio's non-debug handle repr shows for arguments ``text``."""
    return text if REPR_SHOWS_ARGS else ""


def run_briefly(loop, iterations: int = 1) -> None:
    """Run ``iterations`` loop iterations (as test_asyncio.utils.run_briefly)."""
    for _ in range(iterations):
        loop.call_soon(loop.stop)
        loop.run_forever()


def run_until(loop, predicate, timeout: float = 5.0) -> None:
    """Run the loop until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        loop.call_later(0.005, loop.stop)
        loop.run_forever()


def python_subprocess(
    args: list[str], *, env_extra: dict[str, str] | None = None, **kwargs
) -> subprocess.Popen:
    """Start ``sys.executable`` with ``args``; ferroloop importable, asyncio debug off
    unless ``env_extra`` turns it on."""
    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)
    env.pop("PYTHONDEVMODE", None)
    env["PYTHONUNBUFFERED"] = "1"
    if env_extra:
        env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        env=env,
        text=True,
        **kwargs,
    )


# ---- methods ferroloop does not implement yet ----------------------------------------------

# ferroloop's placeholder for a loop method that has not landed raises NotImplementedError
# with exactly this prefix (python/ferroloop/_loop.py); nothing else does.
NOT_IMPLEMENTED_PREFIX = "ferroloop does not implement loop."


def not_implemented_method(exc: BaseException | None) -> str | None:
    """The name of the ferroloop loop method whose placeholder raised ``exc`` (or an
    exception in its cause/context chain or, for an exception group, in one of its
    members), else None. Any other NotImplementedError gives None."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NotImplementedError):
            msg = str(e)
            if msg.startswith(NOT_IMPLEMENTED_PREFIX) and msg.endswith("() yet"):
                return msg[len(NOT_IMPLEMENTED_PREFIX) : -len("() yet")]
        members = getattr(e, "exceptions", None)  # BaseExceptionGroup (3.11+)
        if isinstance(members, tuple):
            stack.extend(members)
        stack.append(e.__cause__)
        stack.append(e.__context__)
    return None


def reraise_not_implemented(exc: BaseException) -> BaseException:
    """Return ``exc``, unless it is (or wraps) a ferroloop placeholder's
    NotImplementedError: then re-raise it, so that a test that captures exceptions to
    compare them reports the missing method instead of a mismatch."""
    if not_implemented_method(exc) is not None:
        raise exc
    return exc


def build_preload_shim(source: str, path, what: str):
    """Compiles the C ``source`` into the shared object ``path`` (for ``LD_PRELOAD``);
    skips the test, naming ``what``, without a C compiler."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip(f"no C compiler to build {what}")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(path), "-x", "c", "-", "-ldl"],
        input=source,
        text=True,
        check=True,
    )
    return path
