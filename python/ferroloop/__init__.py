"""ferroloop: a fast drop-in asyncio event loop written in Rust.

Use it with ``ferroloop.run(main())``, ``asyncio.Runner(loop_factory=ferroloop.new_event_loop)``,
``asyncio.run(main(), loop_factory=ferroloop.new_event_loop)`` (Python 3.12+), or run an
unmodified program with ``python -m ferroloop app.py``.
"""

from __future__ import annotations

import asyncio as _asyncio
import atexit as _atexit
import os as _os
import sys as _sys
import warnings as _warnings

from ._ferroloop import (
    ReadPipeTransport,
    TCPTransport,
    UDPTransport,
    UnixTransport,
    WritePipeTransport,
    __version__,
    _after_fork_child,
    _stop_loop_threads,
)
from ._handles import Handle, TimerHandle
from ._loop import Loop, new_event_loop
from ._net import Server

# A forked child must not send its signals to its parent's loop (asyncio does the same
# from Python 3.12 on; this covers every Python).
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_child)
# Loops still running in other (daemon) threads at exit stop at their next callback, before
# Python 3.10-3.13 would end those threads in a way that aborts Rust code.
_atexit.register(_stop_loop_threads)

__all__ = [
    "EventLoopPolicy",
    "Handle",
    "Loop",
    "ReadPipeTransport",
    "Server",
    "TCPTransport",
    "TimerHandle",
    "UDPTransport",
    "UnixTransport",
    "WritePipeTransport",
    "__version__",
    "install",
    "new_event_loop",
    "run",
]


def run(main, *, loop_factory=None, debug=None, **run_kwargs):
    """Run a coroutine on a new ferroloop loop, as :func:`asyncio.run` does.

    As ``uvloop.run``: ``loop_factory`` makes the loop (default :func:`new_event_loop`)
    and, on Python 3.12+, any other keyword goes to :func:`asyncio.run`."""
    if loop_factory is None:
        loop_factory = new_event_loop
    if _asyncio.events._get_running_loop() is not None:
        # Checked before the runner exists, with asyncio.run's message.
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    if _sys.version_info >= (3, 12):
        return _asyncio.run(main, debug=debug, loop_factory=loop_factory, **run_kwargs)
    if run_kwargs:
        raise TypeError(f"run() got an unexpected keyword argument {next(iter(run_kwargs))!r}")
    if _sys.version_info >= (3, 11):
        with _asyncio.Runner(debug=debug, loop_factory=loop_factory) as runner:
            return runner.run(main)
    from ._compat import run as _run_310

    return _run_310(main, debug=debug, loop_factory=loop_factory)


def _base_policy():
    # The Unix default policy where it exists: on Pythons with child watchers (< 3.14)
    # asyncio.get_child_watcher() & co. go through the policy.
    unix = getattr(_asyncio, "unix_events", None)
    events = _asyncio.events
    return (
        getattr(unix, "_UnixDefaultEventLoopPolicy", None)
        or getattr(events, "_BaseDefaultEventLoopPolicy", None)
        or getattr(events, "BaseDefaultEventLoopPolicy", None)
    )


_BasePolicy = _base_policy()

if _BasePolicy is not None:

    class EventLoopPolicy(_BasePolicy):
        """An asyncio event loop policy whose loops are ferroloop loops."""

        def _loop_factory(self):
            return new_event_loop()

        def __repr__(self):
            return f"<{self.__class__.__name__}>"


def _set_policy_quietly(policy) -> None:
    setter = getattr(_asyncio.events, "_set_event_loop_policy", None)
    if setter is not None:  # Python 3.14+: the public setter is deprecated
        setter(policy)
    else:
        _asyncio.set_event_loop_policy(policy)


def install() -> None:
    """Make ferroloop the loop behind ``asyncio.new_event_loop()`` and ``asyncio.run()``
    by installing :class:`EventLoopPolicy` (Pythons that still have policies)."""
    if _BasePolicy is None:
        raise RuntimeError("this Python has no event loop policies; use ferroloop.run()")
    if _sys.version_info >= (3, 12):
        _warnings.warn(
            "ferroloop.install() is deprecated in favor of ferroloop.run() "
            "starting with Python 3.12.",
            DeprecationWarning,
            stacklevel=2,
        )
    _asyncio.set_event_loop_policy(EventLoopPolicy())
