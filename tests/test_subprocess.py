"""Subprocesses: loop.subprocess_exec / subprocess_shell, the subprocess transport, the
SubprocessProtocol callbacks, asyncio.create_subprocess_exec/shell on top of them, and
the child watcher (no zombies, no leaked descriptors, no foreign children reaped).

stdlib reference: asyncio/base_events.py (subprocess_*), asyncio/base_subprocess.py,
asyncio/unix_events.py (_UnixSubprocessTransport, the child watchers) and
asyncio/subprocess.py. Children are small programs (sh, cat, sleep, true) rather than
Python interpreters wherever that is enough, to keep the module fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import zlib

import pytest
from _net import run
from _util import python_subprocess

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

SH = shutil.which("sh") or "/bin/sh"
CAT = shutil.which("cat") or "/bin/cat"
SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"
PY312 = sys.version_info >= (3, 12)


# ---- helpers -------------------------------------------------------------------------------


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def assert_reaped(pid: int) -> None:
    """``pid`` is not a child of this process any more: no zombie is left."""
    with pytest.raises(ChildProcessError):
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)


async def wait_reaped(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid`` has been reaped (by whoever watches it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        assert loop.time() < deadline, f"child {pid} not reaped within {timeout} s"
        await asyncio.sleep(0.005)


def wait_reaped_sync(pid: int, timeout: float = 5.0) -> None:
    """wait_reaped() for a closed loop: poll from the test's thread."""
    for _ in range(int(timeout / 0.005)):
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        threading.Event().wait(0.005)
    pytest.fail(f"child {pid} not reaped within {timeout} s")


@pytest.fixture
def no_leaks(loop):
    """Fails the test if it leaves a file descriptor open (pipes, pidfds) or a child
    unreaped. The loop's own descriptors exist before and after."""
    before = open_fds()
    pids: list[int] = []
    yield pids
    if not loop.is_closed():
        for _ in range(3):  # pending connection_lost() callbacks close the pipes
            loop.call_soon(loop.stop)
            loop.run_forever()
    leaked = {fd: _fd_target(fd) for fd in sorted(open_fds() - before)}
    assert not leaked, f"file descriptors left open: {leaked}"
    for pid in pids:
        assert_reaped(pid)


class Recorder(asyncio.SubprocessProtocol):
    """Records every SubprocessProtocol callback in ``events``: "made",
    ("data", fd) (consecutive chunks of one fd recorded once), ("pipe_lost", fd, exc),
    "exited", "lost". ``exited`` and ``lost`` are futures."""

    def __init__(self, loop=None):
        loop = loop or asyncio.get_running_loop()
        self.events: list = []
        self.data = {1: bytearray(), 2: bytearray()}
        self.transport = None
        self.made = loop.create_future()
        self.exited = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        self.made.set_result(None)

    def pipe_data_received(self, fd, data):
        assert isinstance(data, bytes)
        if self.events[-1] != ("data", fd):
            self.events.append(("data", fd))
        self.data[fd] += data

    def pipe_connection_lost(self, fd, exc):
        self.events.append(("pipe_lost", fd, exc))

    def process_exited(self):
        self.events.append("exited")
        self.exited.set_result(self.transport.get_returncode())

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost.set_result(exc)


async def exec_recorded(loop, *args, **kwargs):
    transport, proto = await loop.subprocess_exec(Recorder, *args, **kwargs)
    return transport, proto


# ---- subprocess_exec / subprocess_shell ----------------------------------------------------


def test_exec_cat_round_trip(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(loop, CAT)
        no_leaks.append(transport.get_pid())
        assert isinstance(transport, asyncio.SubprocessTransport)
        assert proto.events == ["made"]  # connection_made() before subprocess_exec returns
        popen = transport.get_extra_info("subprocess")
        assert isinstance(popen, subprocess.Popen)
        assert popen.pid == transport.get_pid()
        assert transport.get_returncode() is None
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        assert isinstance(transport.get_pipe_transport(1), asyncio.ReadTransport)
        assert isinstance(transport.get_pipe_transport(2), asyncio.ReadTransport)
        assert transport.get_pipe_transport(3) is None
        stdin.write(b"hello ")
        stdin.writelines([b"cat", b"\n"])
        stdin.write_eof()
        assert await proto.lost is None
        assert bytes(proto.data[1]) == b"hello cat\n"
        assert proto.data[2] == b""
        assert transport.get_returncode() == 0
        assert popen.returncode == 0  # the loop reaped it and told the Popen object
        assert await proto.exited == 0
        transport.close()
        assert transport.is_closing()

    run(loop, main())


def test_protocol_callback_order(loop, no_leaks):
    """connection_made first; per pipe, data before pipe_connection_lost; process_exited
    before connection_lost, which comes last, once every pipe is closed."""

    async def main():
        transport, proto = await exec_recorded(
            loop, SH, "-c", "printf out; printf err >&2; exit 3", stdin=DEVNULL
        )
        no_leaks.append(transport.get_pid())
        assert await proto.lost is None
        transport.close()
        events = proto.events
        assert events[0] == "made"
        assert events[-1] == "lost"
        assert events.count("exited") == 1
        assert set(events[1:-1]) == {
            ("data", 1),
            ("data", 2),
            ("pipe_lost", 1, None),
            ("pipe_lost", 2, None),
            "exited",
        }
        for fd in (1, 2):
            assert events.index(("data", fd)) < events.index(("pipe_lost", fd, None))
        assert bytes(proto.data[1]) == b"out"
        assert bytes(proto.data[2]) == b"err"
        assert await proto.exited == 3
        assert transport.get_pipe_transport(0) is None

    run(loop, main())


def test_no_pipes(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(
            loop, SH, "-c", "exit 5", stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL
        )
        no_leaks.append(transport.get_pid())
        for fd in (0, 1, 2):
            assert transport.get_pipe_transport(fd) is None
        assert await proto.lost is None
        assert proto.events == ["made", "exited", "lost"]
        assert transport.get_returncode() == 5
        transport.close()

    run(loop, main())


def test_shell(loop, no_leaks):
    async def main():
        transport, proto = await loop.subprocess_shell(Recorder, "echo $((6 * 7)); exit 7")
        no_leaks.append(transport.get_pid())
        assert await proto.lost is None
        assert bytes(proto.data[1]) == b"42\n"
        assert transport.get_returncode() == 7
        transport.close()

    run(loop, main())


def test_shell_bytes_command(loop, no_leaks):
    async def main():
        transport, proto = await loop.subprocess_shell(Recorder, b"printf bytes")
        no_leaks.append(transport.get_pid())
        assert await proto.lost is None
        assert bytes(proto.data[1]) == b"bytes"
        transport.close()

    run(loop, main())


def test_shell_missing_command_exits_127(loop, no_leaks):
    async def main():
        transport, proto = await loop.subprocess_shell(
            Recorder, "no-such-command-ferroloop", stderr=DEVNULL
        )
        no_leaks.append(transport.get_pid())
        assert await proto.exited == 127
        await proto.lost
        transport.close()

    run(loop, main())


def test_stderr_to_stdout(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(
            loop, SH, "-c", "printf 1; printf 2 >&2; printf 3", stdin=DEVNULL, stderr=STDOUT
        )
        no_leaks.append(transport.get_pid())
        assert transport.get_pipe_transport(2) is None
        assert await proto.lost is None
        assert bytes(proto.data[1]) == b"123"
        assert proto.data[2] == b""
        transport.close()

    run(loop, main())


def test_stdin_devnull(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(loop, CAT, stdin=DEVNULL)
        no_leaks.append(transport.get_pid())
        assert transport.get_pipe_transport(0) is None
        assert await proto.lost is None
        assert proto.data[1] == b""
        transport.close()

    run(loop, main())


def test_stdio_file_object_and_fd(loop, tmp_path, no_leaks):
    """stdout to a file object, stderr to a raw fd, stdin from a file: no pipe transports."""
    (tmp_path / "in").write_bytes(b"input file\n")

    async def main():
        with (
            open(tmp_path / "in", "rb") as fin,
            open(tmp_path / "out", "wb") as fout,
        ):
            err_fd = os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                transport, proto = await exec_recorded(
                    loop,
                    SH,
                    "-c",
                    "cat; printf oops >&2",
                    stdin=fin,
                    stdout=fout,
                    stderr=err_fd,
                )
            finally:
                os.close(err_fd)
            no_leaks.append(transport.get_pid())
            for fd in (0, 1, 2):
                assert transport.get_pipe_transport(fd) is None
            assert await proto.exited == 0
            await proto.lost
            transport.close()
        assert (tmp_path / "out").read_bytes() == b"input file\n"
        assert (tmp_path / "err").read_bytes() == b"oops"

    run(loop, main())


def test_stdout_to_pipe_read_by_another_transport(loop, no_leaks):
    """The documented pattern: a pipe's write end given to the child, its read end
    connected with connect_read_pipe()."""

    async def main():
        r, w = os.pipe()
        reader = asyncio.StreamReader()
        with open(r, "rb", 0) as rpipe:
            try:
                await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rpipe)
                transport, proto = await exec_recorded(
                    loop, SH, "-c", "echo via fd", stdin=DEVNULL, stdout=w
                )
            finally:
                os.close(w)
            no_leaks.append(transport.get_pid())
            assert await reader.read() == b"via fd\n"
            await proto.lost
            transport.close()

    run(loop, main())


# ---- Popen keyword arguments ---------------------------------------------------------------


async def _output(loop, *args, **kwargs) -> tuple[bytes, int]:
    transport, proto = await exec_recorded(loop, *args, stdin=DEVNULL, **kwargs)
    try:
        await proto.lost
        return bytes(proto.data[1]), transport.get_returncode()
    finally:
        transport.close()


def test_kwarg_cwd(loop, tmp_path, no_leaks):
    out, code = run(loop, _output(loop, SH, "-c", "pwd -P", cwd=tmp_path))
    assert (out, code) == (os.fsencode(os.path.realpath(tmp_path)) + b"\n", 0)


def test_kwarg_env(loop, no_leaks):
    out, _ = run(loop, _output(loop, SH, "-c", "printf %s:%s $FERRO $HOME", env={"FERRO": "x"}))
    assert out == b"x:"


def test_kwarg_pass_fds(loop, no_leaks):
    r, w = os.pipe()
    to_w = f"/proc/self/fd/{w}"
    try:
        out, code = run(
            loop, _output(loop, SH, "-c", f"printf passed > {to_w}; printf ok", pass_fds=(w,))
        )
        assert (out, code) == (b"ok", 0)
        assert os.read(r, 100) == b"passed"
        # Without pass_fds, the descriptor is closed in the child.
        out, code = run(loop, _output(loop, SH, "-c", f"printf x > {to_w}", stderr=DEVNULL))
        assert code != 0
    finally:
        os.close(r)
        os.close(w)


def test_kwarg_start_new_session(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(
            loop, SLEEP, "30", stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        pid = transport.get_pid()
        no_leaks.append(pid)
        assert os.getsid(pid) == pid != os.getsid(0)
        transport.kill()
        assert await proto.exited == -signal.SIGKILL
        await proto.lost
        transport.close()

    run(loop, main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Popen(process_group=) is new in 3.11")
def test_kwarg_process_group(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(
            loop, SLEEP, "30", stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL, process_group=0
        )
        pid = transport.get_pid()
        no_leaks.append(pid)
        assert os.getpgid(pid) == pid != os.getpgid(0)
        transport.close()  # kills the still running child
        assert await proto.exited == -signal.SIGKILL

    run(loop, main())


def test_kwarg_umask(loop, no_leaks):
    out, _ = run(loop, _output(loop, SH, "-c", "umask", umask=0o027))
    assert out.strip() == b"0027"


def test_kwarg_preexec_fn_user_group(loop, no_leaks):
    out, code = run(
        loop,
        _output(
            loop,
            SH,
            "-c",
            "printf '%s %s' $(id -u) $(id -g); exit 0",
            preexec_fn=lambda: os.umask(0o022),
            user=os.getuid(),
            group=os.getgid(),
        ),
    )
    assert (out, code) == (f"{os.getuid()} {os.getgid()}".encode(), 0)


def test_kwarg_executable(loop, no_leaks):
    out, _ = run(loop, _output(loop, "argv0-name", "-c", 'printf "$0"', executable=SH))
    assert out == b"argv0-name"


# ---- argument errors -----------------------------------------------------------------------

EXEC_ERRORS = [
    ({"universal_newlines": True}, "universal_newlines must be False"),
    ({"shell": True}, "shell must be False"),
    ({"bufsize": 4096}, "bufsize must be 0"),
    ({"text": True}, "text must be False"),
    ({"encoding": "utf-8"}, "encoding must be None"),
    ({"errors": "strict"}, "errors must be None"),
    ({"bufsize": 1, "text": True}, "bufsize must be 0"),
]


@pytest.mark.parametrize(("kwargs", "message"), EXEC_ERRORS)
def test_exec_argument_errors(loop, kwargs, message, no_leaks):
    made = []

    def factory():
        made.append(1)
        return asyncio.SubprocessProtocol()

    with pytest.raises(ValueError) as info:
        run(loop, loop.subprocess_exec(factory, TRUE, **kwargs))
    assert str(info.value) == message
    assert made == []  # checked before the protocol is created


SHELL_ERRORS = [
    ("true", {"universal_newlines": True}, "universal_newlines must be False"),
    ("true", {"shell": False}, "shell must be True"),
    ("true", {"bufsize": 4096}, "bufsize must be 0"),
    ("true", {"text": True}, "text must be False"),
    ("true", {"encoding": "utf-8"}, "encoding must be None"),
    ("true", {"errors": "strict"}, "errors must be None"),
    (["ls", "-l"], {}, "cmd must be a string"),
    (None, {}, "cmd must be a string"),
]


@pytest.mark.parametrize(("cmd", "kwargs", "message"), SHELL_ERRORS)
def test_shell_argument_errors(loop, cmd, kwargs, message, no_leaks):
    with pytest.raises(ValueError) as info:
        run(loop, loop.subprocess_shell(asyncio.SubprocessProtocol, cmd, **kwargs))
    assert str(info.value) == message


def test_create_subprocess_text_mode_fails(loop, no_leaks):
    async def main():
        with pytest.raises(ValueError, match="text must be False"):
            await asyncio.create_subprocess_exec(TRUE, text=True)
        with pytest.raises(ValueError, match="text must be False"):
            await asyncio.create_subprocess_shell("true", text=True)

    run(loop, main())


def test_missing_program(loop, tmp_path, no_leaks):
    async def main():
        made = []
        with pytest.raises(FileNotFoundError) as info:
            await loop.subprocess_exec(lambda: made.append(1) or Recorder(), "/no/such/program")
        assert info.value.errno == errno.ENOENT
        assert info.value.filename == "/no/such/program"
        with pytest.raises(FileNotFoundError):
            await asyncio.create_subprocess_exec("no-such-program-ferroloop")
        with pytest.raises(FileNotFoundError):
            await asyncio.create_subprocess_exec(TRUE, cwd=tmp_path / "missing")
        with pytest.raises(PermissionError):
            await asyncio.create_subprocess_exec(tmp_path)  # a directory

    run(loop, main())


def test_popen_error_closes_transport_silently(loop, monkeypatch, no_leaks):
    """Popen raising: the exception propagates, no ResourceWarning, nothing leaks."""

    class Boom(Exception):
        pass

    def popen(*args, **kwargs):
        raise Boom

    monkeypatch.setattr(subprocess, "Popen", popen)

    async def main():
        for stdin in (None, PIPE):
            with pytest.raises(Boom):
                await asyncio.create_subprocess_exec(TRUE, stdin=stdin)

    run(loop, main())


# ---- transport methods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args", "returncode"),
    [
        ("send_signal", (signal.SIGHUP,), -signal.SIGHUP),
        ("send_signal", (signal.SIGUSR1,), -signal.SIGUSR1),
        ("terminate", (), -signal.SIGTERM),
        ("kill", (), -signal.SIGKILL),
    ],
)
def test_signals(loop, method, args, returncode, no_leaks):
    async def main():
        transport, proto = await exec_recorded(loop, SLEEP, "30")
        no_leaks.append(transport.get_pid())
        getattr(transport, method)(*args)
        assert await proto.exited == returncode
        assert await proto.lost is None
        assert transport.get_returncode() == returncode
        transport.close()

    # The child inherits signal dispositions: make sure they are the defaults.
    old = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        run(loop, main())
    finally:
        signal.signal(signal.SIGHUP, old)


def test_signal_after_exit_is_ignored_then_process_lookup_error(loop, no_leaks):
    """After the child exited, signals are dropped silently; once the transport is done
    (connection_lost ran), send_signal/terminate/kill raise ProcessLookupError."""

    async def main():
        transport, proto = await exec_recorded(loop, SH, "-c", "read x", stderr=DEVNULL)
        no_leaks.append(transport.get_pid())
        stdout = transport.get_pipe_transport(1)
        stdout.pause_reading()  # no EOF seen: the transport cannot finish
        transport.get_pipe_transport(0).write_eof()  # the child exits
        await proto.exited
        transport.send_signal(signal.SIGTERM)  # exited, not finished: no error
        transport.kill()
        stdout.resume_reading()
        await proto.lost
        for call in (
            lambda: transport.send_signal(signal.SIGTERM),
            transport.terminate,
            transport.kill,
        ):
            with pytest.raises(ProcessLookupError):
                call()
        transport.close()

    run(loop, main())


def test_close_kills_running_child(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(loop, SLEEP, "30")
        no_leaks.append(transport.get_pid())
        popen = transport.get_extra_info("subprocess")
        killed = []
        original_kill = popen.kill

        def kill():
            killed.append(1)
            original_kill()

        popen.kill = kill  # asyncio kills through the Popen object
        transport.close()
        assert transport.is_closing()
        transport.close()  # idempotent
        assert killed == [1]
        assert await asyncio.wait_for(transport._wait(), 5) == -signal.SIGKILL
        assert await proto.lost is None
        # Closing the transport closed its pipes.
        assert all(transport.get_pipe_transport(fd).is_closing() for fd in (0, 1, 2))
        assert ("pipe_lost", 0, None) in proto.events

    run(loop, main())


def test_close_after_exit_does_not_kill(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(loop, SH, "-c", "exit 4")
        no_leaks.append(transport.get_pid())
        await proto.lost
        transport.close()
        assert transport.get_returncode() == 4

    run(loop, main())


def test_close_exited_but_not_yet_reported_does_not_kill(loop, loop_name, caplog, no_leaks):
    """The child exited (and someone reaped it) before the loop noticed: close() must
    not kill; the loop then reports returncode 255 with a warning."""

    async def main():
        transport, proto = await exec_recorded(
            loop, SLEEP, "30", stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL
        )
        no_leaks.append(transport.get_pid())
        popen = transport.get_extra_info("subprocess")
        popen.kill()
        popen.wait()  # reaps it behind the loop's back
        killed = []
        popen.kill = lambda: killed.append(1)
        assert transport.get_returncode() is None
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            transport.close()
            assert killed == []
            returncode = await proto.exited
            await proto.lost
        return returncode

    returncode = run(loop, main())
    if loop_name == "asyncio" and not PY312:
        # asyncio 3.10/3.11's threaded watcher races popen.wait() for the status.
        assert returncode in (255, -signal.SIGKILL)
    else:
        assert returncode == 255
        assert any("255" in r.getMessage() for r in caplog.records if r.name == "asyncio")


def test_repr(loop, no_leaks):
    async def main():
        transport, proto = await exec_recorded(loop, SLEEP, "30", stdin=DEVNULL)
        pid = transport.get_pid()
        no_leaks.append(pid)
        text = repr(transport)
        assert f"pid={pid}" in text and "running" in text and "stdout=" in text
        transport.close()
        await proto.lost
        text = repr(transport)
        assert "closed" in text and f"returncode={-signal.SIGKILL}" in text

    run(loop, main())


def test_get_pipe_transport_flow_control_reaches_protocol(loop, no_leaks):
    """The stdin pipe's pause_writing/resume_writing reach the SubprocessProtocol."""

    class FlowRecorder(Recorder):
        def pause_writing(self):
            self.events.append("pause_writing")

        def resume_writing(self):
            self.events.append("resume_writing")

    async def main():
        transport, proto = await loop.subprocess_exec(FlowRecorder, CAT, stdout=DEVNULL)
        no_leaks.append(transport.get_pid())
        stdin = transport.get_pipe_transport(0)
        stdin.set_write_buffer_limits(high=1024, low=0)
        stdin.write(b"x" * 1_000_000)
        assert proto.events == ["made", "pause_writing"]
        while "resume_writing" not in proto.events:
            await asyncio.sleep(0.001)
        stdin.close()
        assert await proto.lost is None
        assert proto.events[:3] == ["made", "pause_writing", "resume_writing"]
        transport.close()

    run(loop, main())


def test_stdin_peer_closed_reports_broken_pipe(loop, no_leaks):
    """The child closes its stdin while data is buffered: pipe_connection_lost(0, exc)."""

    async def main():
        transport, proto = await exec_recorded(
            loop, SH, "-c", "read x; exec 0<&-; sleep 0.05", stdout=DEVNULL, stderr=DEVNULL
        )
        no_leaks.append(transport.get_pid())
        stdin = transport.get_pipe_transport(0)
        stdin.write(b"go\n" + b"x" * 200_000)  # more than the pipe holds
        assert await proto.lost is None
        (lost,) = [e for e in proto.events if e[:2] == ("pipe_lost", 0)]
        assert isinstance(lost[2], BrokenPipeError)
        assert transport.get_returncode() == 0
        transport.close()

    run(loop, main())


# ---- asyncio.create_subprocess_* -----------------------------------------------------------


def test_create_subprocess_exec_communicate(loop, no_leaks):
    async def main():
        proc = await asyncio.create_subprocess_exec(CAT, stdin=PIPE, stdout=PIPE, stderr=PIPE)
        no_leaks.append(proc.pid)
        assert proc.returncode is None
        out, err = await proc.communicate(b"communicated")
        assert (out, err, proc.returncode) == (b"communicated", b"", 0)
        assert await proc.wait() == 0

    run(loop, main())


def test_create_subprocess_shell_wait_and_streams(loop, no_leaks):
    async def main():
        proc = await asyncio.create_subprocess_shell(
            'while read line; do echo "got $line"; done; echo done >&2; exit 9',
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
        )
        no_leaks.append(proc.pid)
        for i in range(3):
            proc.stdin.write(b"%d\n" % i)
            await proc.stdin.drain()
            assert await proc.stdout.readline() == b"got %d\n" % i
        proc.stdin.close()
        if PY312:
            await proc.stdin.wait_closed()
        assert await proc.stdout.read() == b""
        assert await proc.stderr.read() == b"done\n"
        assert await proc.wait() == 9
        assert proc.returncode == 9

    run(loop, main())


def test_communicate_large_output_both_pipes(loop, no_leaks):
    async def main():
        proc = await asyncio.create_subprocess_exec(
            SH,
            "-c",
            "head -c 3000000 /dev/zero; head -c 2000000 /dev/zero >&2",
            stdout=PIPE,
            stderr=PIPE,
        )
        no_leaks.append(proc.pid)
        out, err = await proc.communicate()
        assert (len(out), len(err), proc.returncode) == (3_000_000, 2_000_000, 0)

    run(loop, main())


def test_communicate_ignores_broken_pipe(loop, no_leaks):
    """The child exits without reading its stdin: communicate(input) still returns."""

    async def main():
        proc = await asyncio.create_subprocess_exec(TRUE, stdin=PIPE, stdout=PIPE)
        no_leaks.append(proc.pid)
        out, _ = await proc.communicate(b"x" * 1_000_000)
        assert (out, proc.returncode) == (b"", 0)

    run(loop, main())


def test_hundred_mib_through_cat(loop, no_leaks):
    """100 MiB parent -> cat -> parent with flow control on both sides; nothing lost."""
    chunk = bytes(range(256)) * 4096  # 1 MiB
    total = 100 * len(chunk)

    async def main():
        proc = await asyncio.create_subprocess_exec(CAT, stdin=PIPE, stdout=PIPE)
        no_leaks.append(proc.pid)

        async def feed():
            for i in range(100):
                proc.stdin.write(chunk[i:] + chunk[:i])
                await proc.stdin.drain()
            proc.stdin.close()

        feeder = asyncio.ensure_future(feed())
        crc, n = 0, 0
        while data := await proc.stdout.read(1 << 20):
            crc = zlib.crc32(data, crc)
            n += len(data)
        await feeder
        assert await proc.wait() == 0
        return crc, n

    expected = 0
    for i in range(100):
        expected = zlib.crc32(chunk[i:] + chunk[:i], expected)
    assert run(loop, main(), timeout=60) == (expected, total)


def test_kill_child_that_ignores_its_pipes(loop, no_leaks):
    """A child that neither reads stdin nor writes stdout: a drain() blocked on its full
    stdin pipe fails once it is killed, and wait() returns -SIGKILL."""

    async def main():
        proc = await asyncio.create_subprocess_exec(SLEEP, "30", stdin=PIPE, stdout=PIPE)
        no_leaks.append(proc.pid)
        proc.stdin.write(b"x" * 1_000_000)
        drain = asyncio.ensure_future(proc.stdin.drain())
        await asyncio.sleep(0.02)
        assert not drain.done()
        proc.kill()
        assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            await drain
        assert await proc.stdout.read() == b""

    run(loop, main())


def test_terminate_ignored_then_kill(loop, no_leaks):
    async def main():
        proc = await asyncio.create_subprocess_exec(
            SH, "-c", "trap '' TERM; echo ready; exec sleep 30", stdout=PIPE
        )  # an ignored signal stays ignored across exec
        no_leaks.append(proc.pid)
        assert await proc.stdout.readline() == b"ready\n"
        proc.terminate()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.05)
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL

    run(loop, main())


def test_cancel_wait(loop, no_leaks):
    async def main():
        proc = await asyncio.create_subprocess_exec(SLEEP, "30")
        no_leaks.append(proc.pid)
        task = asyncio.ensure_future(proc.wait())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL

    run(loop, main())


def test_concurrent_waits(loop, no_leaks):
    async def main():
        proc = await asyncio.create_subprocess_exec(SH, "-c", "exit 2")
        no_leaks.append(proc.pid)
        assert await asyncio.gather(proc.wait(), proc.wait(), proc.wait()) == [2, 2, 2]

    run(loop, main())


def test_many_children_concurrently(loop, no_leaks):
    async def one(i):
        proc = await asyncio.create_subprocess_exec(
            SH, "-c", f"printf {i}; exit {i % 7}", stdout=PIPE
        )
        no_leaks.append(proc.pid)
        out, _ = await proc.communicate()
        return out, proc.returncode

    async def main():
        return await asyncio.gather(*(one(i) for i in range(40)))

    assert run(loop, main()) == [(b"%d" % i, i % 7) for i in range(40)]


def test_cancel_during_creation_kills_and_reaps(loop, no_leaks):
    """Cancelled while the pipes are being connected: the child is killed and reaped,
    its pipes closed (asyncio logs the failure; nothing reaches the exception handler)."""
    spawned = []
    real_popen = subprocess.Popen

    class Popen(real_popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spawned.append(self.pid)

    async def main():
        subprocess.Popen = Popen
        try:
            task = asyncio.ensure_future(loop.subprocess_exec(Recorder, SLEEP, "30"))
            loop.call_soon(task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            subprocess.Popen = real_popen
        assert len(spawned) == 1
        await wait_reaped(spawned[0])

    run(loop, main())
    no_leaks.extend(spawned)


# ---- the child watcher ---------------------------------------------------------------------


def test_no_zombies_after_spawn_and_wait(loop, no_leaks):
    async def main():
        for _ in range(20):
            proc = await asyncio.create_subprocess_exec(TRUE)
            no_leaks.append(proc.pid)
            assert await proc.wait() == 0
            assert_reaped(proc.pid)

    run(loop, main())


def test_foreign_children_are_not_reaped(loop, no_leaks):
    """A child started outside the loop stays a zombie for its owner to reap."""
    foreign = subprocess.Popen([TRUE])
    try:

        async def main():
            while os.waitid(os.P_PID, foreign.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                await asyncio.sleep(0.002)
            for _ in range(3):
                proc = await asyncio.create_subprocess_exec(TRUE)
                no_leaks.append(proc.pid)
                await proc.wait()
            await asyncio.sleep(0.02)
            # Still there, exit status intact.
            assert os.waitid(os.P_PID, foreign.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)

        run(loop, main())
    finally:
        assert foreign.wait() == 0


def test_loop_closed_with_running_child(loop, loop_name, no_leaks):
    """The loop closes while a child runs: no descriptor stays open (ferroloop closes
    the pidfd), the child keeps running, and once killed (transport.close() after the
    loop closed) it is reaped: no zombie."""
    if loop_name == "asyncio" and PY312:
        pytest.skip("asyncio's PidfdChildWatcher leaks the pidfd when the loop closes first")
    transport, _ = run(
        loop, exec_recorded(loop, SLEEP, "30", stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
    )
    pid = transport.get_pid()
    no_leaks.append(pid)
    loop.close()
    assert os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None  # running
    popen = transport.get_extra_info("subprocess")
    transport.close()  # kills it
    wait_reaped_sync(pid)
    if loop_name == "asyncio":
        # asyncio's threaded watcher reaps it but leaves Popen.returncode unset (Popen's
        # __del__ would warn "still running").
        popen.returncode = -signal.SIGKILL
    for _ in range(500):  # ferroloop reaps it with Popen.wait() on a thread
        if popen.returncode is not None:
            break
        threading.Event().wait(0.01)
    assert popen.returncode == -signal.SIGKILL


@pytest.mark.parametrize("watcher", ["default", "thread", "pidfd-reaped"])
def test_loop_closed_after_child_exited_unreported(loop, loop_name, no_leaks, watcher, monkeypatch):
    if loop_name == "asyncio" and PY312:
        pytest.skip("asyncio's PidfdChildWatcher leaks the pidfd when the loop closes first")
    if watcher == "pidfd-reaped":
        _ferroloop_only(loop_name)
        from ferroloop import _process

        if _process._pidfd_open is None or _process._pidfd_unusable:
            pytest.skip("pidfd_open() is not usable here")
    if watcher == "thread":
        # ferroloop's waiter-thread fallback: the thread may reap the child and hand the
        # exit to a callback just before the loop closes (which never runs it).
        _ferroloop_only(loop_name)
        from ferroloop import _process

        monkeypatch.setattr(_process, "_pidfd_unusable", True)
    transport, _ = run(
        loop, exec_recorded(loop, TRUE, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
    )
    pid = transport.get_pid()
    no_leaks.append(pid)
    if watcher == "thread":
        # The thread reaps the child and queues the exit for the loop, which closes
        # before running it.
        wait_reaped_sync(pid)
        threading.Event().wait(0.05)
    with contextlib.suppress(ChildProcessError):  # (asyncio 3.11 may have reaped it)
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            threading.Event().wait(0.002)
    if watcher == "pidfd-reaped":
        # One iteration: the pidfd reports the exit, the child is reaped and its exit
        # queued for the next iteration, which never comes.
        loop.call_soon(loop.stop)
        loop.run_forever()
    loop.close()  # before the loop processed the exit
    wait_reaped_sync(pid)
    transport.close()
    # Set by close() or, when a waiter thread watched the child, by that thread right
    # after it reaped it.
    popen = transport.get_extra_info("subprocess")
    for _ in range(1000):
        if popen.returncode is not None:
            break
        threading.Event().wait(0.005)
    assert popen.returncode == 0


# ---- ferroloop's watcher specifically ------------------------------------------------------


def _ferroloop_only(loop_name: str) -> None:
    if loop_name != "ferroloop":
        pytest.skip("how ferroloop watches children (asyncio's watchers are private)")


def _pidfds() -> list[int]:
    return [fd for fd in open_fds() if _fd_target(fd) == "anon_inode:[pidfd]"]


def test_child_watched_with_pidfd_no_thread(loop, loop_name, no_leaks):
    _ferroloop_only(loop_name)
    from ferroloop import _process

    if _process._pidfd_open is None or _process._pidfd_unusable:
        pytest.skip("pidfd_open() is not usable here")

    async def main():
        threads = threading.active_count()
        pidfds = len(_pidfds())
        procs = [await asyncio.create_subprocess_exec(SLEEP, "30") for _ in range(5)]
        no_leaks.extend(p.pid for p in procs)
        assert threading.active_count() == threads  # no thread per child
        assert len(_pidfds()) == pidfds + 5
        for p in procs:
            p.kill()
        assert [await p.wait() for p in procs] == [-signal.SIGKILL] * 5
        assert len(_pidfds()) == pidfds  # closed when reaped

    run(loop, main())


def test_thread_fallback_without_pidfd(loop, loop_name, monkeypatch, no_leaks):
    _ferroloop_only(loop_name)
    from ferroloop import _process

    def pidfd_open(pid, flags=0):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(_process, "_pidfd_open", pidfd_open)
    monkeypatch.setattr(_process, "_pidfd_unusable", False)

    async def main():
        proc = await asyncio.create_subprocess_exec(SH, "-c", "exit 6", stdout=PIPE)
        no_leaks.append(proc.pid)
        assert _process._pidfd_unusable  # not tried again for later children
        assert await proc.communicate() == (b"", None)
        assert proc.returncode == 6
        proc = await asyncio.create_subprocess_exec(SLEEP, "30")
        no_leaks.append(proc.pid)
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL

    run(loop, main())
    for thread in threading.enumerate():
        if thread.name.startswith("ferroloop-waitpid"):
            thread.join(5)  # each ends once it handed its child's status to the loop
            assert not thread.is_alive()


def test_thread_fallback_loop_closed_first(loop, loop_name, monkeypatch, no_leaks):
    _ferroloop_only(loop_name)
    from ferroloop import _process

    monkeypatch.setattr(_process, "_pidfd_unusable", True)
    transport, _ = run(
        loop, exec_recorded(loop, SLEEP, "30", stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
    )
    no_leaks.append(transport.get_pid())
    loop.close()
    popen = transport.get_extra_info("subprocess")
    transport.close()  # kills it; the waiter thread reaps it and tells the Popen object
    for _ in range(500):
        if popen.returncode is not None:
            break
        threading.Event().wait(0.01)
    assert popen.returncode == -signal.SIGKILL


# A child still running when asyncio.run returns, its Process object dropped; the script
# then collects garbage and waits for the child to finish its work. argv: loop name,
# marker file the child writes.
LEFT_RUNNING_SCRIPT = r"""
import asyncio, gc, os, sys, time
import ferroloop

kind, marker = sys.argv[1], sys.argv[2]


async def main():
    await asyncio.create_subprocess_exec(
        "sh", "-c", f"sleep 0.5; echo done > {marker}", start_new_session=True
    )


(ferroloop.run if kind == "ferroloop" else asyncio.run)(main())
gc.collect()
time.sleep(1.5)
print(os.path.exists(marker))
"""


def test_child_left_running_when_the_loop_closes(loop_name, tmp_path):
    """What happens to a child still running when the loop closes follows the running
    Python's asyncio: on 3.10/3.11 its watcher thread keeps the transport until the child
    exits, so the child finishes; from 3.12 the collected transport kills it. ferroloop
    killed it on every Python."""
    marker = tmp_path / "done"
    proc = python_subprocess(["-W", "ignore", "-c", LEFT_RUNNING_SCRIPT, loop_name, str(marker)])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert out.strip() == str(sys.version_info < (3, 12))
