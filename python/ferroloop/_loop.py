"""The ``Loop`` class: the Rust core combined with :class:`asyncio.AbstractEventLoop`.

Only cold, coroutine-shaped code lives here; every hot path (scheduling, timers, the run
loop, file descriptors, signals) is implemented by ``ferroloop._ferroloop.LoopCore``.
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import functools
import socket
import sys
import threading
import traceback
import warnings
import weakref
from asyncio import base_events, coroutines, events, futures, tasks, unix_events

from . import (
    _ferroloop,
    _handles,  # noqa: F401  (installs the handle classes)
)
from ._ferroloop import LoopCore
from ._net import NetworkMixin
from ._process import ProcessMixin

__all__ = ["Loop", "new_event_loop"]


type_of = type


def _socket_function(name: str):
    """The socket module's own ``name`` function, or None if it was already replaced."""
    fn = getattr(socket, name)
    return fn if getattr(fn, "__module__", None) == "socket" else None


# While these are the socket module's functions, ferroloop resolves natively. A program
# or library that replaces them (dnspython's override_system_resolver(), tests patching
# socket.getaddrinfo) gets what asyncio does: the replacement, run in the executor.
_SOCKET_GETADDRINFO = _socket_function("getaddrinfo")
_SOCKET_GETNAMEINFO = _socket_function("getnameinfo")

# The native sock_* operations are coroutines as far as asyncio can tell.
collections.abc.Coroutine.register(_ferroloop._SockOperation)


def _logger():
    # Looked up at each use, as asyncio's own module global is: tests and applications
    # patch ``asyncio.base_events.logger``.
    return base_events.logger


_DEBUG_STACK_DEPTH = asyncio.constants.DEBUG_STACK_DEPTH
# Python 3.14 deprecates the public name; its asyncio uses the private one.
_iscoroutinefunction = getattr(coroutines, "_iscoroutinefunction", coroutines.iscoroutinefunction)

# asyncio runs a custom exception handler in the failing task's or handle's context from
# Python 3.12 on; before, in the loop's. ferroloop follows the running Python's asyncio.
_HANDLER_IN_CONTEXT = sys.version_info >= (3, 12)


class Loop(LoopCore, NetworkMixin, ProcessMixin, asyncio.AbstractEventLoop):
    """An asyncio event loop implemented in Rust."""

    __module__ = "ferroloop"
    # The loop's own state lives in slots, so a loop nobody set an attribute on has an
    # empty instance dict (asyncio.AbstractEventLoop gives every loop one) and every
    # method lookup on the loop, such as C Task's `loop.call_soon` for each step, misses
    # it sooner. callgrind, instructions per sleep(0) switch / per gathered task: 3.10
    # 6,100 -> 5,965 / 25,248 -> 24,869; 3.13 5,357 -> 5,213 / 20,973 -> 20,562; 3.11
    # and 3.12 even.
    __slots__ = (
        "_asyncgens",
        "_asyncgens_shutdown_called",
        "_coroutine_origin_tracking_enabled",
        "_coroutine_origin_tracking_saved_depth",
        "_default_executor",
        "_exception_handler",
        "_executor_shutdown_called",
    )

    def __init__(self) -> None:
        self._exception_handler = None
        self._default_executor = None
        self._executor_shutdown_called = False
        self._asyncgens = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._coroutine_origin_tracking_enabled = False
        self._coroutine_origin_tracking_saved_depth = None
        self.set_debug(coroutines._is_debug_mode())

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "time":
            # A replaced clock (mock.patch.object(loop, "time")): asyncio's call_later
            # and run loop read self.time(), so ferroloop's do too from now on.
            self._clock_maybe_replaced()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name == "time":
            self._clock_maybe_replaced()

    @property
    def _debug(self) -> bool:
        # asyncio's own helpers that ferroloop reuses read ``self._debug``.
        return self.get_debug()

    def __repr__(self) -> str:
        return (
            f"<{self.__class__.__name__} running={self.is_running()} "
            f"closed={self.is_closed()} debug={self.get_debug()}>"
        )

    def __del__(self, _warn=warnings.warn) -> None:
        try:
            closed = self.is_closed()
        except Exception:
            return
        if not closed:
            _warn(f"unclosed event loop {self!r}", ResourceWarning, source=self)
            if not self.is_running():
                self.close()

    # ---- running and stopping ------------------------------------------------------

    def _check_running(self) -> None:
        if self.is_running():
            raise RuntimeError("This event loop is already running")
        if events._get_running_loop() is not None:
            raise RuntimeError("Cannot run the event loop while another loop is running")

    def run_forever(self) -> None:
        """Run until stop() is called."""
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self.get_debug())
        old_agen_hooks = sys.get_asyncgen_hooks()
        try:
            sys.set_asyncgen_hooks(
                firstiter=self._asyncgen_firstiter_hook,
                finalizer=self._asyncgen_finalizer_hook,
            )
            events._set_running_loop(self)
            self._run_forever_core()
        finally:
            events._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*old_agen_hooks)

    def run_until_complete(self, future):
        """Run until the future (or coroutine) is done and return its result."""
        self._check_closed()
        self._check_running()
        new_task = not futures.isfuture(future)
        future = tasks.ensure_future(future, loop=self)
        if new_task:
            # An exception is raised if the future didn't complete, so there is no need
            # to log the "destroy pending task" message.
            future._log_destroy_pending = False
        future.add_done_callback(base_events._run_until_complete_cb)
        try:
            self.run_forever()
        except BaseException:
            if new_task and future.done() and not future.cancelled():
                # The coroutine raised a BaseException: consume it so it is not logged.
                future.exception()
            raise
        finally:
            future.remove_done_callback(base_events._run_until_complete_cb)
        if not future.done():
            raise RuntimeError("Event loop stopped before Future completed.")
        return future.result()

    def close(self) -> None:
        """Close the loop: drop pending callbacks, release the reactor, shut the
        default executor down without waiting. Idempotent."""
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if self.get_debug():
            _logger().debug("Close %r", self)
        try:
            try:
                self._process_close()
            finally:
                LoopCore.close(self)
        finally:
            self._executor_shutdown_called = True
            executor = self._default_executor
            if executor is not None:
                self._default_executor = None
                executor.shutdown(wait=False)

    def _set_coroutine_origin_tracking(self, enabled: bool) -> None:
        if bool(enabled) == bool(self._coroutine_origin_tracking_enabled):
            return
        if enabled:
            self._coroutine_origin_tracking_saved_depth = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(_DEBUG_STACK_DEPTH)
        else:
            sys.set_coroutine_origin_tracking_depth(self._coroutine_origin_tracking_saved_depth)
        self._coroutine_origin_tracking_enabled = enabled

    # ---- async generators ----------------------------------------------------------

    def _asyncgen_finalizer_hook(self, agen) -> None:
        self._asyncgens.discard(agen)
        if not self.is_closed():
            self.call_soon_threadsafe(self.create_task, agen.aclose())

    def _asyncgen_firstiter_hook(self, agen) -> None:
        if self._asyncgens_shutdown_called:
            warnings.warn(  # noqa: B028 (asyncio gives no stacklevel here)
                f"asynchronous generator {agen!r} was scheduled after "
                f"loop.shutdown_asyncgens() call",
                ResourceWarning,
                source=self,
            )
        self._asyncgens.add(agen)

    async def shutdown_asyncgens(self) -> None:
        """Shutdown all active asynchronous generators."""
        self._asyncgens_shutdown_called = True
        if not len(self._asyncgens):
            return
        closing_agens = list(self._asyncgens)
        self._asyncgens.clear()
        results = await tasks.gather(*[ag.aclose() for ag in closing_agens], return_exceptions=True)
        for result, agen in zip(results, closing_agens, strict=True):
            if isinstance(result, Exception):
                self.call_exception_handler(
                    {
                        "message": f"an error occurred during closing of "
                        f"asynchronous generator {agen!r}",
                        "exception": result,
                        "asyncgen": agen,
                    }
                )

    # ---- executors -----------------------------------------------------------------

    def _check_callback(self, callback, method: str) -> None:
        if coroutines.iscoroutine(callback) or _iscoroutinefunction(callback):
            raise TypeError(f"coroutines cannot be used with {method}()")
        if not callable(callback):
            raise TypeError(f"a callable object was expected by {method}(), got {callback!r}")

    def _check_default_executor(self) -> None:
        if self._executor_shutdown_called:
            raise RuntimeError("Executor shutdown has been called")

    def run_in_executor(self, executor, func, *args):
        """Run ``func(*args)`` in ``executor`` (the default thread pool if None)."""
        self._check_closed()
        if self.get_debug():
            self._check_callback(func, "run_in_executor")
        if executor is None:
            executor = self._default_executor
            self._check_default_executor()
            if executor is None:
                executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
                self._default_executor = executor
        return futures.wrap_future(executor.submit(func, *args), loop=self)

    def set_default_executor(self, executor) -> None:
        if not isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            if sys.version_info >= (3, 11):
                raise TypeError("executor must be ThreadPoolExecutor instance")
            # Python 3.10's asyncio still takes it, with this (outdated) warning.
            warnings.warn(
                "Using the default executor that is not an instance of "
                "ThreadPoolExecutor is deprecated and will be prohibited "
                "in Python 3.9",
                DeprecationWarning,
                2,
            )
        self._default_executor = executor

    async def shutdown_default_executor(self, timeout=None) -> None:
        """Schedule the shutdown of the default executor; wait at most ``timeout``
        seconds for its threads to join (Python 3.13's semantics; 3.12.1's asyncio waits
        for the shutdown whatever the timeout)."""
        self._executor_shutdown_called = True
        if self._default_executor is None:
            return
        future = self.create_future()
        thread = threading.Thread(target=self._do_shutdown, args=(future,))
        thread.start()
        try:
            await _wait_with_timeout(future, timeout)
        except (TimeoutError, asyncio.TimeoutError):  # distinct types on Python 3.10
            warnings.warn(
                f"The executor did not finishing joining its threads within {timeout} seconds.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._default_executor.shutdown(wait=False)
        else:
            thread.join()

    def _do_shutdown(self, future) -> None:
        try:
            self._default_executor.shutdown(wait=True)
            if not self.is_closed():
                self.call_soon_threadsafe(futures._set_result_unless_cancelled, future, None)
        except Exception as ex:
            if not self.is_closed() and not future.cancelled():
                self.call_soon_threadsafe(future.set_exception, ex)

    # ---- sockets -------------------------------------------------------------------
    # sock_recv, sock_recv_into, sock_recvfrom, sock_recvfrom_into, sock_sendall,
    # sock_sendto and sock_accept are native: each returns a native coroutine that tries
    # the operation at its first step (asyncio's selector-loop semantics).

    async def sock_connect(self, sock, address):
        """Connect a non-blocking socket, resolving a non-numeric address first."""
        base_events._check_ssl_socket(sock)
        if self.get_debug() and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if sock.family == socket.AF_INET or (
            base_events._HAS_IPv6 and sock.family == socket.AF_INET6
        ):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            _, _, _, _, address = resolved[0]
        await self._sock_connect(sock, address)

    # asyncio's address helper: the numeric fast path, else loop.getaddrinfo().
    _ensure_resolved = base_events.BaseEventLoop._ensure_resolved

    # NOTE: sock_sendfile is asyncio's own code: zero-copy os.sendfile() driven by
    #       add_writer(), with its parameter checks and read/sock_sendall fallback. The
    #       copying happens in the kernel; the per-chunk orchestration is cold.
    sock_sendfile = base_events.BaseEventLoop.sock_sendfile
    _check_sendfile_params = base_events.BaseEventLoop._check_sendfile_params
    _sock_sendfile_fallback = base_events.BaseEventLoop._sock_sendfile_fallback
    _sock_sendfile_native = unix_events._UnixSelectorEventLoop._sock_sendfile_native
    _sock_sendfile_native_impl = unix_events._UnixSelectorEventLoop._sock_sendfile_native_impl
    _sock_sendfile_update_filepos = unix_events._UnixSelectorEventLoop._sock_sendfile_update_filepos
    _sock_add_cancellation_callback = (
        unix_events._UnixSelectorEventLoop._sock_add_cancellation_callback
    )

    # ---- name resolution -----------------------------------------------------------

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        """Asynchronous ``socket.getaddrinfo()``: the same result list and errors.

        Numeric hosts are answered at once; names are resolved on ferroloop's resolver
        threads without holding the GIL."""
        if socket.getaddrinfo is not _SOCKET_GETADDRINFO:
            # Replaced: call it as asyncio does.
            if self.get_debug():
                resolve = functools.partial(base_events.BaseEventLoop._getaddrinfo_debug, self)
            else:
                resolve = socket.getaddrinfo
            return await self.run_in_executor(None, resolve, host, port, family, type, proto, flags)
        if not self.get_debug():
            res = self._getaddrinfo(host, port, family, type, proto, flags)
            return res if type_of(res) is list else await res
        # asyncio's debug logging (BaseEventLoop._getaddrinfo_debug).
        msg = [f"{host}:{port!r}"]
        if family:
            msg.append(f"family={family!r}")
        if type:
            msg.append(f"type={type!r}")
        if proto:
            msg.append(f"proto={proto!r}")
        if flags:
            msg.append(f"flags={flags!r}")
        msg = ", ".join(msg)
        _logger().debug("Get address info %s", msg)
        t0 = self.time()
        res = self._getaddrinfo(host, port, family, type, proto, flags)
        addrinfo = res if type_of(res) is list else await res
        dt = self.time() - t0
        msg = f"Getting address info {msg} took {dt * 1e3:.3f}ms: {addrinfo!r}"
        if dt >= self.slow_callback_duration:
            _logger().info(msg)
        else:
            _logger().debug(msg)
        return addrinfo

    async def getnameinfo(self, sockaddr, flags=0):
        """Asynchronous ``socket.getnameinfo()``: the same result and errors."""
        if socket.getnameinfo is not _SOCKET_GETNAMEINFO:
            return await self.run_in_executor(None, socket.getnameinfo, sockaddr, flags)
        res = self._getnameinfo(sockaddr, flags)
        return res if type_of(res) is tuple else await res

    # ---- error handling ------------------------------------------------------------

    def get_exception_handler(self):
        return self._exception_handler

    def set_exception_handler(self, handler) -> None:
        if handler is not None and not callable(handler):
            raise TypeError(f"A callable object or None is expected, got {handler!r}")
        self._exception_handler = handler

    def default_exception_handler(self, context) -> None:
        """Log ``context`` on the ``asyncio`` logger, as asyncio's default handler does."""
        message = context.get("message")
        if not message:
            message = "Unhandled exception in event loop"
        exception = context.get("exception")
        if exception is not None:
            exc_info = (type(exception), exception, exception.__traceback__)
        else:
            exc_info = False
        current = self._current_handle
        if "source_traceback" not in context and current is not None and current._source_traceback:
            context["handle_traceback"] = current._source_traceback
        log_lines = [message]
        for key in sorted(context):
            if key in {"message", "exception"}:
                continue
            value = context[key]
            if key == "source_traceback":
                tb = "".join(traceback.format_list(value))
                value = "Object created at (most recent call last):\n" + tb.rstrip()
            elif key == "handle_traceback":
                tb = "".join(traceback.format_list(value))
                value = "Handle created at (most recent call last):\n" + tb.rstrip()
            else:
                value = repr(value)
            log_lines.append(f"{key}: {value}")
        _logger().error("\n".join(log_lines), exc_info=exc_info)

    def call_exception_handler(self, context) -> None:
        """Call the current exception handler. From Python 3.12 on (as asyncio there), a
        custom handler runs in the context of the task or handle the error came from."""
        if self._exception_handler is None:
            try:
                self.default_exception_handler(context)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                _logger().error("Exception in default exception handler", exc_info=True)
            return
        try:
            ctx = None
            if _HANDLER_IN_CONTEXT:
                thing = context.get("task")
                if thing is None:
                    # A task reported under "future" ("exception was never retrieved").
                    thing = context.get("future")
                if thing is None:
                    thing = context.get("handle")
                get_context = getattr(thing, "get_context", None)
                if get_context is not None:
                    ctx = get_context()
            if ctx is None or not hasattr(ctx, "run"):
                self._exception_handler(self, context)
            else:
                ctx.run(self._exception_handler, self, context)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            try:
                self.default_exception_handler(
                    {
                        "message": "Unhandled error in exception handler",
                        "exception": exc,
                        "context": context,
                    }
                )
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                _logger().error(
                    "Exception in default exception handler while handling an "
                    "unexpected error in custom exception handler",
                    exc_info=True,
                )


async def _wait_with_timeout(future, timeout):
    if timeout is None:
        await future
    elif hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            await future
    else:  # Python 3.10
        await asyncio.wait_for(future, timeout)


def new_event_loop() -> Loop:
    """Return a new ferroloop event loop."""
    return Loop()
