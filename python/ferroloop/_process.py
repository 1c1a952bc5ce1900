"""Pipes and subprocesses: ``ProcessMixin``, mixed into ferroloop's ``Loop``.

Mirrors ``asyncio.base_events.BaseEventLoop`` (``connect_read_pipe``, ``connect_write_pipe``,
``subprocess_exec``, ``subprocess_shell``) and ``asyncio.unix_events`` (the subprocess
transport and the pidfd child watcher), with Python 3.14 semantics on Python 3.10-3.14.

The pipe transports themselves come from the loop's ``_make_read_pipe_transport`` /
``_make_write_pipe_transport`` (native in ferroloop; ``_UnixSelectorEventLoop``'s have the
same contract). Only cold, coroutine-shaped orchestration lives here.

Child processes are watched without a thread: after ``Popen`` the loop opens a pidfd
(``os.pidfd_open``, Linux 5.3+) and registers it with ``add_reader``; the pidfd becomes
readable when the child exits, and the loop reaps exactly that pid with
``waitpid(pid, WNOHANG)``. Where pidfds are unavailable, one thread per child blocks in
``waitpid(pid, 0)`` and reports through ``call_soon_threadsafe`` (asyncio's
``ThreadedChildWatcher``). The loop never waits for a pid it did not start, and asyncio's
child watchers (``events.get_child_watcher()``) are not used on any Python version.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from asyncio import base_events, base_subprocess, unix_events

__all__ = ["ProcessMixin"]

# ``os.pidfd_open`` (Linux 5.3+, Python 3.9+); looked up through this module so that tests
# can exercise the thread fallback.
_pidfd_open = getattr(os, "pidfd_open", None)

# Set once pidfd_open() fails in a way that will not change for this process (an old
# kernel, or a seccomp filter): every later child goes straight to the thread fallback.
_pidfd_unusable = False
_PIDFD_PERMANENT_ERRNOS = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL})

_HAS_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")


def _exitcode(status: int) -> int:
    """The returncode asyncio reports for a wait status (``unix_events.waitstatus_to_exitcode``):
    the exit status, or minus the signal number that killed the child."""
    try:
        return os.waitstatus_to_exitcode(status)
    except ValueError:
        # A status we do not understand (cannot happen without WUNTRACED): report it as is.
        return status


def _child_has_exited(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has exited, without reaping it (the loop's watcher does that).

    DEVIATION(asyncio): asyncio's close() asks ``Popen.poll()``, which reaps a child that
    has exited but whose exit the watcher has not processed yet; the watcher then finds no
    child and reports returncode 255 with a warning. ``waitid(WNOWAIT)`` answers the same
    question and leaves the exit status to the watcher, which reports the real one."""
    if proc.returncode is not None:
        return True  # reaped by Popen.wait()/poll() (the caller's own doing)
    if not _HAS_WAITID:  # pragma: no cover (every Linux has waitid)
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # reaped elsewhere


class _SubprocessTransport(unix_events._UnixSubprocessTransport):
    """asyncio's Unix subprocess transport (``_start``: ``Popen`` with the caller's
    arguments) with the ``BaseSubprocessTransport`` behaviour of Python 3.14 on every
    supported Python:

    - signals go straight to the pid (``os.kill``), never through ``Popen.send_signal``,
      which polls and so could reap the child behind the watcher's back (3.13+);
    - ``wait()`` (``_wait``) returns once the child exited *and* its pipes are closed
      (3.12+), and does not hang when connecting the pipes failed or was cancelled (3.14);
    - ``close()`` after the loop closed leaves the pipe transports alone (3.13+).
    """

    def __init__(self, *args, **kwargs) -> None:
        # Set before the base class starts the child and schedules _connect_pipes().
        self._pipes_connected = False
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        for proto in self._pipes.values():
            if proto is None:
                continue
            # Closing a pipe transport schedules a callback: impossible on a closed loop.
            if loop is not None and not loop.is_closed():
                proto.pipe.close()
        proc = self._proc
        if proc is not None and self._returncode is None and not _child_has_exited(proc):
            if loop.get_debug():
                base_subprocess.logger.warning("Close running child process: kill %r", self)
            try:
                # Through the Popen object, as asyncio (tests replace proc.kill).
                proc.kill()
            except (ProcessLookupError, PermissionError):
                # The child may have exited meanwhile, or run setuid.
                pass

    def send_signal(self, signal) -> None:
        self._check_proc()
        # DEVIATION(asyncio): once the child has been reaped its pid may belong to another
        # process, so a child known to have exited gets no signal. asyncio calls os.kill()
        # anyway; it usually fails with ProcessLookupError, which asyncio ignores too.
        if self._returncode is not None or self._proc.returncode is not None:
            return
        try:
            os.kill(self._proc.pid, signal)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def _connect_pipes(self, waiter) -> None:
        try:
            proc = self._proc
            loop = self._loop
            if proc.stdin is not None:
                _, self._pipes[0] = await loop.connect_write_pipe(
                    lambda: base_subprocess.WriteSubprocessPipeProto(self, 0), proc.stdin
                )
            if proc.stdout is not None:
                _, self._pipes[1] = await loop.connect_read_pipe(
                    lambda: base_subprocess.ReadSubprocessPipeProto(self, 1), proc.stdout
                )
            if proc.stderr is not None:
                _, self._pipes[2] = await loop.connect_read_pipe(
                    lambda: base_subprocess.ReadSubprocessPipeProto(self, 2), proc.stderr
                )
            assert self._pending_calls is not None
            loop.call_soon(self._protocol.connection_made, self)
            for callback, data in self._pending_calls:
                loop.call_soon(callback, *data)
            self._pending_calls = None
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if waiter is not None and not waiter.cancelled():
                waiter.set_exception(exc)
        else:
            if waiter is not None and not waiter.cancelled():
                waiter.set_result(None)
            self._pipes_connected = True

    def _process_exited(self, returncode: int) -> None:
        assert returncode is not None, returncode
        assert self._returncode is None, self._returncode
        if self._loop.get_debug():
            base_subprocess.logger.info("%r exited with return code %r", self, returncode)
        self._returncode = returncode
        if self._proc.returncode is None:
            # The loop reaped the child: tell the Popen object (it would warn otherwise).
            self._proc.returncode = returncode
        self._call(self._protocol.process_exited)
        self._try_finish()

    def _try_finish(self) -> None:
        assert not self._finished
        if self._returncode is None:
            return
        if not self._pipes_connected:
            # Connecting the pipes failed or was cancelled: they will never all report
            # connection_lost, so wait() would hang. Wake its waiters now.
            for waiter in self._exit_waiters:
                if not waiter.done():
                    waiter.set_result(self._returncode)
        if all(p is not None and p.disconnected for p in self._pipes.values()):
            self._finished = True
            self._call(self._call_connection_lost, None)

    def _call_connection_lost(self, exc) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            for waiter in self._exit_waiters:
                if not waiter.done():
                    waiter.set_result(self._returncode)
            self._exit_waiters = None
            self._loop = None
            self._proc = None
            self._protocol = None


class _ChildWatch:
    """One child the loop started and has not reaped yet."""

    __slots__ = ("detached", "pid", "pidfd", "proc", "reaped", "transport")

    def __init__(self, transport: _SubprocessTransport) -> None:
        self.transport: _SubprocessTransport | None = transport
        self.proc: subprocess.Popen = transport._proc
        self.pid: int = self.proc.pid
        # The pidfd registered with add_reader, or None while a waiter thread watches.
        self.pidfd: int | None = None
        # Set (on the loop thread) when the loop closed before the child exited: the
        # waiter thread then only reaps.
        self.detached = False
        # The exit code, once a waiter thread reaped the child (before it hands it over).
        self.reaped: int | None = None


class ProcessMixin:
    """Pipe and subprocess methods of the event loop (see the module docstring).

    Needs from the loop: ``create_future``, ``create_task``, ``call_soon``,
    ``call_soon_threadsafe``, ``add_reader``/``remove_reader``, ``get_debug``,
    ``is_closed``, ``is_running`` and the two ``_make_*_pipe_transport`` methods.
    ``_process_close()`` must run when the loop closes (``close()`` below does that when
    this class precedes the loop core in the MRO).
    """

    # pid -> _ChildWatch of every child started by this loop and not reaped yet. Created on
    # first use: the loop's __init__ does not chain to this class.
    _process_watches: dict[int, _ChildWatch] | None = None

    # ---- pipes -----------------------------------------------------------------------

    async def connect_read_pipe(self, protocol_factory, pipe):
        """Register the read end of ``pipe`` (a file-like object) in the event loop;
        return ``(transport, protocol)``."""
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = self._make_read_pipe_transport(pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        if self.get_debug():
            base_events.logger.debug(
                "Read pipe %r connected: (%r, %r)", pipe.fileno(), transport, protocol
            )
        return transport, protocol

    async def connect_write_pipe(self, protocol_factory, pipe):
        """Register the write end of ``pipe`` (a file-like object) in the event loop;
        return ``(transport, protocol)``."""
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = self._make_write_pipe_transport(pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        if self.get_debug():
            base_events.logger.debug(
                "Write pipe %r connected: (%r, %r)", pipe.fileno(), transport, protocol
            )
        return transport, protocol

    # ---- subprocesses ----------------------------------------------------------------

    # asyncio's debug-log line for a new child ("execute program 'x' stdin=<pipe> ...").
    _log_subprocess = base_events.BaseEventLoop._log_subprocess

    async def subprocess_shell(
        self,
        protocol_factory,
        cmd,
        *,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=False,
        shell=True,
        bufsize=0,
        encoding=None,
        errors=None,
        text=None,
        **kwargs,
    ):
        """Run ``cmd`` in the shell; return ``(transport, protocol)``. Other keyword
        arguments go to ``subprocess.Popen``."""
        if not isinstance(cmd, (bytes, str)):
            raise ValueError("cmd must be a string")
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if not shell:
            raise ValueError("shell must be True")
        _check_binary_unbuffered(bufsize, text, encoding, errors)
        protocol = protocol_factory()
        debug_log = None
        if self.get_debug():
            # As asyncio: the command's arguments are not logged (passwords, length).
            debug_log = f"run shell command {cmd!r}"
            self._log_subprocess(debug_log, stdin, stdout, stderr)
        transport = await self._make_subprocess_transport(
            protocol, cmd, True, stdin, stdout, stderr, bufsize, **kwargs
        )
        if self.get_debug() and debug_log is not None:
            base_events.logger.info("%s: %r", debug_log, transport)
        return transport, protocol

    async def subprocess_exec(
        self,
        protocol_factory,
        program,
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=False,
        shell=False,
        bufsize=0,
        encoding=None,
        errors=None,
        text=None,
        **kwargs,
    ):
        """Run ``program`` with ``args``; return ``(transport, protocol)``. Other keyword
        arguments go to ``subprocess.Popen``."""
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if shell:
            raise ValueError("shell must be False")
        _check_binary_unbuffered(bufsize, text, encoding, errors)
        popen_args = (program, *args)
        protocol = protocol_factory()
        debug_log = None
        if self.get_debug():
            debug_log = f"execute program {program!r}"
            self._log_subprocess(debug_log, stdin, stdout, stderr)
        transport = await self._make_subprocess_transport(
            protocol, popen_args, False, stdin, stdout, stderr, bufsize, **kwargs
        )
        if self.get_debug() and debug_log is not None:
            base_events.logger.info("%s: %r", debug_log, transport)
        return transport, protocol

    async def _make_subprocess_transport(
        self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
    ):
        """Start the child (``Popen``), watch it, connect its pipes; on failure or
        cancellation kill it and wait for it before re-raising (as asyncio)."""
        waiter = self.create_future()
        transport = _SubprocessTransport(
            self,
            protocol,
            args,
            shell,
            stdin,
            stdout,
            stderr,
            bufsize,
            waiter=waiter,
            extra=extra,
            **kwargs,
        )
        try:
            self._watch_child(transport)
        except BaseException:
            transport.close()
            raise
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transport.close()
            await transport._wait()
            raise
        return transport

    # ---- the child watcher -----------------------------------------------------------

    def _watch_child(self, transport: _SubprocessTransport) -> None:
        """Report the exit of ``transport``'s child to ``transport._process_exited()``."""
        global _pidfd_unusable
        watch = _ChildWatch(transport)
        watches = self._process_watches
        if watches is None:
            watches = self._process_watches = {}
        if _pidfd_open is not None and not _pidfd_unusable:
            try:
                # A child that already exited is a zombie until reaped: its pidfd opens.
                pidfd = _pidfd_open(watch.pid)
            except OSError as exc:
                if exc.errno in _PIDFD_PERMANENT_ERRNOS:
                    _pidfd_unusable = True
                # Otherwise (ESRCH: reaped by someone else, EMFILE...) the waiter thread
                # reports it: returncode 255 with asyncio's warning, or the real status.
            else:
                try:
                    self.add_reader(pidfd, self._on_pidfd_readable, watch)
                except BaseException:
                    os.close(pidfd)
                    raise
                watch.pidfd = pidfd
                watches[watch.pid] = watch
                return
        # Fallback, as asyncio's ThreadedChildWatcher: one thread per child, blocked in
        # waitpid(pid, 0).
        thread = threading.Thread(
            target=self._wait_child_in_thread,
            args=(watch,),
            name=f"ferroloop-waitpid-{watch.pid}",
            daemon=True,
        )
        watches[watch.pid] = watch
        try:
            thread.start()
        except BaseException:
            del watches[watch.pid]
            raise

    def _on_pidfd_readable(self, watch: _ChildWatch) -> None:
        try:
            pid, status = os.waitpid(watch.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else called waitpid() for this pid (asyncio's watchers say the same).
            returncode = 255
            unix_events.logger.warning(
                "child process pid %d exit status already read:  will report returncode 255",
                watch.pid,
            )
        else:
            if pid == 0:
                return  # not exited after all: keep watching
            returncode = _exitcode(status)
        # Reaped: the pidfd goes, the watch stays (with the exit code) until the exit is
        # reported, so a loop that closes first still sets Popen.returncode
        # (_process_close).
        watch.reaped = returncode
        self._release_pidfd(watch)
        # One iteration later, as asyncio's watchers hand the exit over: a pipe whose
        # end-of-file came in the same poll reports pipe_connection_lost() first there.
        self.call_soon(self._on_child_reaped, watch, returncode)

    def _wait_child_in_thread(self, watch: _ChildWatch) -> None:
        """Waiter thread body: block in waitpid() for one child, then hand the result
        to the loop thread."""
        try:
            _, status = os.waitpid(watch.pid, 0)
        except ChildProcessError:
            returncode = 255
            unix_events.logger.warning(
                "Unknown child process pid %d, will report returncode 255", watch.pid
            )
        else:
            returncode = _exitcode(status)
        # Recorded first: a loop closing from here on finds it (_process_close), one that
        # closed before is seen as `detached` below.
        watch.reaped = returncode
        if watch.detached:
            _set_popen_returncode(watch.proc, returncode)
            return
        try:
            self.call_soon_threadsafe(self._on_child_reaped, watch, returncode)
        except RuntimeError:
            # The loop closed while this thread waited (and before _process_close()
            # detached the watch: a loop whose close() does not call it).
            _set_popen_returncode(watch.proc, returncode)

    def _on_child_reaped(self, watch: _ChildWatch, returncode: int) -> None:
        transport = self._unwatch(watch)
        if transport is not None:
            transport._process_exited(returncode)
        elif watch.detached:
            _set_popen_returncode(watch.proc, returncode)

    def _unwatch(self, watch: _ChildWatch) -> _SubprocessTransport | None:
        """Forget ``watch``; close its pidfd. Returns its transport (None if detached)."""
        watches = self._process_watches
        if watches is not None and watches.get(watch.pid) is watch:
            del watches[watch.pid]
        self._release_pidfd(watch)
        transport, watch.transport = watch.transport, None
        return transport

    def _release_pidfd(self, watch: _ChildWatch) -> None:
        """Stop watching ``watch``'s pidfd, if it has one, and close it."""
        pidfd, watch.pidfd = watch.pidfd, None
        if pidfd is not None:
            try:
                self.remove_reader(pidfd)
            finally:
                os.close(pidfd)

    def _process_close(self) -> None:
        """Stop watching children because the loop is closing. Idempotent.

        Every pidfd is unregistered and closed. The children are neither killed nor
        reported (the loop can no longer run callbacks): one that already exited is reaped
        now, a running one by a daemon thread (``Popen.wait()``) when it exits. Either way
        ``Popen.returncode`` gets set, no zombie is left behind and a later
        ``transport.close()`` (which kills a child still running, as asyncio) does not
        signal a reaped pid.

        DEVIATION(asyncio): asyncio's PidfdChildWatcher (3.12+) leaves the pidfd open and
        the child unreaped when the loop closes first; its ThreadedChildWatcher (3.10/3.11,
        or without pidfds) reaps the child later, logs that the loop is closed and leaves
        ``Popen.returncode`` unset.
        """
        watches = self._process_watches
        if not watches:
            return
        self._process_watches = {}
        for watch in list(watches.values()):
            watch.detached = True
            transport, watch.transport = watch.transport, None
            pidfd, watch.pidfd = watch.pidfd, None
            if pidfd is None:
                # Its waiter thread reaps it and sees `detached`, or the child was reaped
                # (by that thread or at its pidfd) and its exit handed to a callback this
                # loop will never run.
                if watch.reaped is not None:
                    _set_popen_returncode(watch.proc, watch.reaped)
                continue
            try:
                self.remove_reader(pidfd)
            except (RuntimeError, OSError, ValueError):  # pragma: no cover (defensive)
                pass
            finally:
                os.close(pidfd)
            proc = watch.proc
            try:
                pid, status = os.waitpid(watch.pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if pid:
                _set_popen_returncode(proc, _exitcode(status))
            elif not sys.is_finalizing():
                # (An unclosed loop collected at exit: no thread can start any more, 3.10
                # and 3.11 would block for good, so the child is left to init.)
                # On 3.10/3.11 the thread also keeps the transport alive until the child
                # exits, as asyncio's ThreadedChildWatcher does there: collected, the
                # transport would close itself and kill the child (what 3.12+ does).
                keep = transport if sys.version_info < (3, 12) else None
                threading.Thread(
                    target=_reap, args=(proc, keep), name=f"ferroloop-reap-{watch.pid}", daemon=True
                ).start()

    def close(self) -> None:
        """Stop watching children (``_process_close``), then close the loop."""
        if not self.is_running():
            self._process_close()
        super().close()


def _check_binary_unbuffered(bufsize, text, encoding, errors) -> None:
    # asyncio's checks, in asyncio's order (after universal_newlines and shell).
    if bufsize != 0:
        raise ValueError("bufsize must be 0")
    if text:
        raise ValueError("text must be False")
    if encoding is not None:
        raise ValueError("encoding must be None")
    if errors is not None:
        raise ValueError("errors must be None")


def _reap(proc, transport) -> None:
    """A reaper thread's body: waits for the child; `transport` is only held."""
    proc.wait()


def _set_popen_returncode(proc: subprocess.Popen, returncode: int) -> None:
    if proc.returncode is None:
        proc.returncode = returncode
