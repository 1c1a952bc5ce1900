"""Network side-by-side benchmarks: ferroloop vs uvloop, rloop, stdlib asyncio and a native
(Rust, epoll) echo server.

For every benchmark case, loop and round, a fresh server subprocess runs a small asyncio
server on that loop (``net.py --server KIND LOOP``; the native column runs netload's
``echo-server``) and netload's ``load`` client (one thread, epoll) loads it over 127.0.0.1 or
a Unix socket: warm-up, then a measured interval during which the server's CPU time is read
from /proc. Rounds are interleaved and the order of the servers rotates, as in run.py. Every
echo is checked byte for byte; a wrong echo, a server error or a hung server fails the run,
while a loop raising NotImplementedError is reported as "not implemented".

    python benchmarks/net.py [--rounds N] [--duration S] [--only KIND ...] [--loops a,b,...]
                             [--matrix] [--smoke] [--markdown] [--no-wrk]

See benchmarks/README.md ("Network benchmarks") for what each benchmark measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import glob
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from run import (
    available,
    ferroloop_build,
    fmt_rate,
    load_average,
    new_loop,
    run_header,
    spread_pct,
)

LOOPS = ("ferroloop", "uvloop", "rloop", "asyncio")
REQUIRED_LOOPS = ("ferroloop", "asyncio")
NATIVE = "native"

HERE = Path(__file__).resolve().parent
NETLOAD = HERE / "netload"
TARGET_DIR = NETLOAD / "target"
LOAD_BIN = TARGET_DIR / "release" / "load"
ECHO_BIN = TARGET_DIR / "release" / "echo-server"

HOST = "127.0.0.1"
KIB = 1024
NOT_IMPLEMENTED_EXIT = 3  # a server's exit status when its loop lacks a method
START_TIMEOUT = 30.0  # a server that has not printed its port by then is hung
STOP_TIMEOUT = 10.0  # ... or not exited after its stdin was closed
REQUEST_TIMEOUT = 10.0  # load: a request without a complete response this long is an error
LOST_LIMIT = 0.01  # UDP: more datagrams than this share of the requests unanswered is a failure

HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!"
)


# ---- the servers (subprocess side: net.py --server KIND LOOP) -------------------------------
#
# Each prints one JSON line once it listens ({"port": N}; {"not_implemented": "..."} and exit
# status 3 if the loop lacks a method it needs), serves until its stdin is closed, then prints
# {"errors": N, "error": "..."} and exits (status 1 if anything reached the loop's exception
# handler or a handler failed). A client going away (ConnectionError) is not an error.


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Recorder:
    """Errors seen by a server; NotImplementedError ends the server at once (exit 3)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, message: str, exc: BaseException | None = None) -> None:
        if isinstance(exc, NotImplementedError):
            emit({"not_implemented": str(exc) or f"{message}: NotImplementedError"})
            sys.stderr.flush()
            os._exit(NOT_IMPLEMENTED_EXIT)
        if isinstance(exc, ConnectionError):
            return  # the client went away (wrk closes with requests in flight)
        text = f"{message}: {exc!r}" if exc is not None else message
        self.errors.append(text)
        print(f"server error: {text}", file=sys.stderr, flush=True)

    def loop_handler(self, _loop: asyncio.AbstractEventLoop, context: dict) -> None:
        self(str(context.get("message")), context.get("exception"))


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class HttpProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive: one fixed 200 response per request head."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
        count = data.count(b"\r\n\r\n")
        if count:
            self.transport.write(HTTP_RESPONSE * count if count > 1 else HTTP_RESPONSE)
            data = data[data.rindex(b"\r\n\r\n") + 4 :]
        self.pending = data


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, record: Recorder) -> None:
        self.record = record

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.record("UDP error_received", exc)


def tcp_port(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


async def start_protocol(loop, record, opts) -> int:
    return tcp_port(await loop.create_server(EchoProtocol, HOST, 0, backlog=1024))


async def start_http(loop, record, opts) -> int:
    return tcp_port(await loop.create_server(HttpProtocol, HOST, 0, backlog=1024))


async def start_tls(loop, record, opts) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(opts.cert, opts.key)
    return tcp_port(await loop.create_server(EchoProtocol, HOST, 0, ssl=ctx, backlog=1024))


async def start_unix(loop, record, opts) -> int:
    await loop.create_unix_server(EchoProtocol, opts.path, backlog=1024)
    return 0


async def start_udp(loop, record, opts) -> int:
    transport, _ = await loop.create_datagram_endpoint(
        lambda: UdpEcho(record), local_addr=(HOST, 0)
    )
    return transport.get_extra_info("sockname")[1]


async def start_streams(loop, record, opts) -> int:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except Exception as exc:
            record("stream handler failed", exc)
        finally:
            writer.close()

    return tcp_port(await asyncio.start_server(handle, HOST, 0, backlog=1024))


async def start_sock(loop, record, opts) -> int:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(1024)
    listener.setblocking(False)

    async def echo(conn: socket.socket) -> None:
        try:
            with conn:
                while True:
                    data = await loop.sock_recv(conn, 65536)
                    if not data:
                        break
                    await loop.sock_sendall(conn, data)
        except Exception as exc:
            record("sock_recv/sock_sendall handler failed", exc)

    async def accept_forever() -> None:
        try:
            while True:
                conn, _ = await loop.sock_accept(listener)
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                loop.create_task(echo(conn))
        except Exception as exc:
            record("sock_accept loop failed", exc)

    loop.create_task(accept_forever())
    await asyncio.sleep(0.01)  # a missing sock_accept surfaces before the port is reported
    return listener.getsockname()[1]


SERVERS: dict[str, Callable] = {
    "protocol": start_protocol,
    "streams": start_streams,
    "sock": start_sock,
    "unix": start_unix,
    "udp": start_udp,
    "http": start_http,
    "tls": start_tls,
    "idle": start_protocol,
}


def serve(kind: str, loop_name: str, opts: argparse.Namespace) -> int:
    """Subprocess entry point: run one server until stdin is closed."""
    record = Recorder()
    loop = new_loop(loop_name)
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(record.loop_handler)
    try:
        port = loop.run_until_complete(SERVERS[kind](loop, record, opts))
    except Exception as exc:
        record("server start failed", exc)  # exits here if NotImplementedError
        emit({"errors": len(record.errors), "error": record.errors[0]})
        return 1
    emit({"port": port})

    def stop_on_eof() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=stop_on_eof, name="stdin-eof", daemon=True).start()
    loop.run_forever()
    emit({"errors": len(record.errors), "error": record.errors[0] if record.errors else None})
    sys.stderr.flush()
    # Skip interpreter teardown: open transports and handler tasks are not what is measured.
    os._exit(1 if record.errors else 0)


# ---- benchmark cases -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # a key of SERVERS; also what --only selects
    size: int  # message bytes (http: 0, idle: 1)
    conns: int

    @property
    def name(self) -> str:
        if self.kind == "idle":
            return f"idle x{self.conns}"
        if self.kind == "http":
            return f"http x{self.conns}"
        return f"{self.kind} {self.size // KIB}KiB x{self.conns}"

    def native_key(self) -> tuple:
        """Cases the native server serves identically share one native measurement a round."""
        transport = {"protocol": "tcp", "streams": "tcp", "sock": "tcp"}.get(self.kind, self.kind)
        return (transport, self.size, self.conns)


KINDS = {
    # kind: (what it measures, cases in a default run)
    "protocol": ("TCP echo, asyncio.Protocol (create_server)", None),
    "streams": ("TCP echo, asyncio.start_server reader/writer", [(1, 50), (100, 1)]),
    "sock": ("TCP echo, sock_accept + sock_recv/sock_sendall", [(1, 50), (100, 1)]),
    "unix": ("Unix-socket echo, asyncio.Protocol", [(1, 50), (100, 1)]),
    "udp": ("UDP echo, DatagramProtocol", [(1, 50), (10, 1)]),
    "http": ("HTTP/1.1 keep-alive GET, minimal Protocol server", None),
    "tls": ("TLS echo, asyncio.Protocol with ssl=", [(1, 50), (100, 1)]),
    "idle": ("RSS per idle connection (Protocol echo server)", None),
}

# The targets (informational): server CPU time per request over native's, on the
# headline case (1 KiB x 50; HTTP: x 50) ...
CPU_TARGETS = {"protocol": 1.05, "streams": 1.5, "sock": 1.6, "udp": 1.05, "http": 1.1}
# ... RSS per idle Protocol connection, bytes ...
RSS_TARGET = 700
# ... and throughput at least uvloop's for every TLS case and every 100 KiB case.
UVLOOP_TARGET_SIZE = 100 * KIB


def cases_for(kind: str, smoke: bool, matrix: bool, idle_conns: int) -> list[Case]:
    if kind == "idle":
        return [Case("idle", 1, idle_conns)]
    if kind == "http":
        return [Case("http", 0, 1 if smoke else 50)]
    if smoke:
        return [Case(kind, KIB, 1)]
    sizes = (1, 10) if kind == "udp" else (1, 10, 100)  # a datagram holds at most 65,507 bytes
    default = KINDS[kind][1]
    if matrix or default is None:
        pairs = [(s, c) for s in sizes for c in (1, 50)]
    else:
        pairs = default
    return [Case(kind, s * KIB, c) for s, c in pairs]


def is_headline(case: Case, smoke: bool) -> bool:
    return smoke or (case.conns == 50 and case.size in (KIB, 0))


# ---- running servers and the load generator -------------------------------------------------


class Lines:
    """Line reader over a subprocess pipe, with timeouts."""

    def __init__(self, pipe) -> None:
        self.fd = pipe.fileno()
        self.buf = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line (without newline); None at end of file; TimeoutError if none."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536)
                self.eof = not chunk
                self.buf += chunk
        if not self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


LIVE: set[subprocess.Popen] = set()  # every child still running; killed on the way out


class Child:
    """A subprocess with piped stdin/stdout and stderr in a temporary file."""

    def __init__(self, cmd: list[str], env: dict | None = None) -> None:
        self.cmd = cmd
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env
        )
        LIVE.add(self.proc)
        self.out = Lines(self.proc.stdout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()

    def read_json(self, timeout: float) -> dict | None:
        line = self.out.readline(timeout)
        if line is None:
            return None
        try:
            return json.loads(line)
        except ValueError:
            raise Failure(f"unreadable output {line[:300]!r}") from None

    def stderr_tail(self, lines: int = 12) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip()
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        LIVE.discard(self.proc)
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            with contextlib.suppress(OSError):
                f.close()


def kill_all() -> None:
    for proc in list(LIVE):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    LIVE.clear()


class Failure(Exception):
    """A measurement failed: wrong echo, server error, crash or hang."""


class NotImplementedCell(Exception):
    """The loop raised NotImplementedError for a method the benchmark needs."""


def server_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process: the sum of its threads' scheduler run time
    (/proc/PID/task/*/schedstat, nanoseconds), or utime + stime from /proc/PID/stat (clock
    ticks) where schedstat is not available."""
    if SCHEDSTAT:
        total = 0
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(path) as f:
                    total += int(f.read().split()[0])
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _schedstat_works() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat") as f:
            return int(f.read().split()[0]) > 0
    except (OSError, ValueError, IndexError):
        return False


SCHEDSTAT = _schedstat_works()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise Failure("no VmRSS in /proc/PID/status")


def server_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)  # debug mode would measure something else
    env["PYTHONHASHSEED"] = "0"
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


@dataclasses.dataclass
class Setup:
    """What every measurement needs: options, certificate, scratch directory."""

    args: argparse.Namespace
    tmpdir: str
    cert: tuple[str, str] | None
    wrk: str | None


class Server:
    """One server process (a loop's or the native one), started and listening."""

    def __init__(self, case: Case, column: str, setup: Setup) -> None:
        self.path = os.path.join(setup.tmpdir, f"{column}-{case.kind}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if column == NATIVE:
            cmd = [str(ECHO_BIN)]
            if case.kind == "unix":
                cmd += ["--unix", self.path]
            elif case.kind == "udp":
                cmd += ["--udp", f"{HOST}:0"]
            else:
                cmd += ["--tcp", f"{HOST}:0"]
            if case.kind == "http":
                cmd.append("--http")
            if case.kind == "tls":
                cmd += ["--tls", *setup.cert]
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--server", case.kind, column]
            if case.kind == "unix":
                cmd += ["--path", self.path]
            if case.kind == "tls":
                cmd += ["--cert", setup.cert[0], "--key", setup.cert[1]]
        self.child = Child(cmd, server_env())
        try:
            first = self.child.read_json(START_TIMEOUT)
            if first is None or ("port" not in first and "path" not in first):
                self.check_exit(first)
                raise Failure(f"server did not start: {first!r}\n{self.child.stderr_tail()}")
        except TimeoutError:
            self.child.kill()
            raise Failure(f"server did not report its port within {START_TIMEOUT:.0f}s") from None
        except BaseException:
            self.child.kill()
            raise
        self.port = first.get("port", 0)

    @property
    def pid(self) -> int:
        return self.child.pid

    def check_exit(self, line: dict | None = None) -> None:
        """If the server exited because its loop lacks a method, say so."""
        if line is None and self.child.proc.poll() is not None:
            with contextlib.suppress(TimeoutError, Failure):
                line = self.child.read_json(1.0)
        if line and "not_implemented" in line:
            raise NotImplementedCell(line["not_implemented"])
        if self.child.wait(1.0) == NOT_IMPLEMENTED_EXIT:
            raise NotImplementedCell("NotImplementedError")

    def alive(self) -> None:
        """Fails (or reports not implemented) if the server has exited."""
        if self.child.proc.poll() is not None:
            self.check_exit()
            raise Failure(
                f"server exited with status {self.child.proc.returncode}:\n"
                f"{self.child.stderr_tail()}"
            )

    def stop(self) -> None:
        """Closes stdin (the server's signal to stop) and checks it reported no errors."""
        self.alive()
        self.child.close_stdin()
        try:
            last = None
            while (line := self.child.read_json(STOP_TIMEOUT)) is not None:
                last = line
        except TimeoutError:
            raise Failure(f"server did not stop within {STOP_TIMEOUT:.0f}s (hung?)") from None
        status = self.child.wait(STOP_TIMEOUT)
        if status is None:
            raise Failure(f"server did not exit within {STOP_TIMEOUT:.0f}s (hung?)")
        if last and "not_implemented" in last:
            raise NotImplementedCell(last["not_implemented"])
        if status != 0 or not last or last.get("errors"):
            error = (last or {}).get("error")
            raise Failure(
                f"server exited with status {status}: {error}\n{self.child.stderr_tail()}"
            )

    def address_args(self, case: Case) -> list[str]:
        if case.kind == "unix":
            return ["--unix", self.path]
        if case.kind == "udp":
            return ["--udp", f"{HOST}:{self.port}"]
        return ["--tcp", f"{HOST}:{self.port}"]


@dataclasses.dataclass
class Sample:
    """One measurement of one case on one server."""

    req_per_s: float = 0.0
    mib_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    cpu_us: float = 0.0  # server CPU time per request, microseconds
    requests: int = 0
    lost: int = 0  # UDP datagrams without a reply (resent)
    rss_per_conn: float = 0.0  # idle: server RSS growth per connection, bytes


def load_cmd(case: Case, server: Server, extra: list[str]) -> list[str]:
    cmd = [str(LOAD_BIN), *server.address_args(case), "--timeout", str(REQUEST_TIMEOUT)]
    if case.kind == "http":
        cmd.append("--http")
    elif case.kind == "tls":
        cmd.append("--tls")
    return cmd + extra


def check_load_result(result: dict | None, load: Child, server: Server) -> dict:
    if result is None or "requests" not in result:
        server.alive()
        raise Failure(f"load produced no result (status {load.wait(5)}):\n{load.stderr_tail()}")
    if result.get("errors") or not result.get("requests"):
        server.alive()  # a server that died of NotImplementedError is reported as such
        tail = server.child.stderr_tail(6)
        raise Failure(
            f"load: {result.get('error') or 'no request completed'}"
            + (f"\nserver stderr:\n{tail}" if tail else "")
        )
    return result


def run_load(case: Case, server: Server, setup: Setup) -> Sample:
    """Warm-up, then the measured interval with the server's CPU time read around it."""
    args = setup.args
    extra = ["--conns", str(case.conns), "--duration", str(args.duration), "--sync"]
    extra += ["--warmup", str(args.warmup)]
    if case.kind != "http":
        extra += ["--size", str(case.size)]
    load = Child(load_cmd(case, server, extra))
    budget = args.warmup + args.duration + REQUEST_TIMEOUT + 30
    try:
        try:
            ready = load.read_json(budget)
            if ready is None or not ready.get("ready"):
                check_load_result(ready, load, server)
                raise Failure(f"load did not get ready: {ready!r}")
            server.alive()
            cpu0 = server_cpu_seconds(server.pid)
            load.send("go")
            result = load.read_json(budget)
            cpu1 = server_cpu_seconds(server.pid)
        except TimeoutError:
            server.alive()
            raise Failure(f"load did not finish within {budget:.0f}s (server hung?)") from None
        result = check_load_result(result, load, server)
        load.wait(10)
    finally:
        load.kill()
    requests, lost = result["requests"], result.get("lost", 0)
    if lost > requests * LOST_LIMIT:
        # Loopback does not drop datagrams with one in flight per socket: the server does.
        raise Failure(f"{lost} datagrams without a reply ({requests} echoed)")
    return Sample(
        req_per_s=result["req_per_s"],
        mib_per_s=result["mib_per_s"],
        p50_us=result["p50_us"],
        p99_us=result["p99_us"],
        cpu_us=(cpu1 - cpu0) / requests * 1e6,
        requests=requests,
        lost=lost,
    )


_WRK_TIME = re.compile(r"([\d.]+)(us|ms|s|m)\b")
_WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_WRK_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _wrk_time(text: str) -> float:
    m = _WRK_TIME.fullmatch(text)
    if not m:
        raise Failure(f"unreadable wrk time {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    """requests, seconds, bytes, p50/p99 (s) and errors from wrk --latency output."""
    m = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+)(\w+) read", out)
    if not m:
        raise Failure(f"unreadable wrk output:\n{out[-800:]}")
    result = {
        "requests": int(m.group(1)),
        "seconds": _wrk_time(m.group(2)),
        "bytes": float(m.group(3)) * _WRK_BYTES.get(m.group(4), 1),
    }
    for pct in ("50", "99"):
        p = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", out, re.MULTILINE)
        if not p:
            raise Failure(f"no {pct}% latency in wrk output:\n{out[-800:]}")
        result[f"p{pct}"] = _wrk_time(p.group(1))
    errors = 0
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if e:
        errors += sum(int(x) for x in e.groups())
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n:
        errors += int(n.group(1))
    result["errors"] = errors
    return result


def run_wrk(case: Case, server: Server, setup: Setup) -> Sample:
    """HTTP through wrk: a short warm-up with load --http, then wrk (whole seconds)."""
    args = setup.args
    if args.warmup > 0:
        warm_args = ["--conns", str(case.conns), "--duration", str(args.warmup)]
        warm = Child(load_cmd(case, server, warm_args))
        try:
            warm.proc.stdin.close()
            check_load_result(warm.read_json(args.warmup + 60), warm, server)
        except TimeoutError:
            raise Failure("HTTP warm-up did not finish (server hung?)") from None
        finally:
            warm.kill()
    seconds = max(1, round(args.duration))
    cmd = [setup.wrk, "-t1", f"-c{case.conns}", f"-d{seconds}s", "--latency"]
    cmd += ["--timeout", f"{REQUEST_TIMEOUT:.0f}s", f"http://{HOST}:{server.port}/"]
    server.alive()
    cpu0 = server_cpu_seconds(server.pid)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise Failure("wrk did not finish (server hung?)") from None
    cpu1 = server_cpu_seconds(server.pid)
    server.alive()
    if proc.returncode != 0:
        raise Failure(f"wrk exited with status {proc.returncode}: {proc.stderr.strip()[-500:]}")
    r = parse_wrk(proc.stdout)
    if r["errors"] or not r["requests"]:
        raise Failure(f"wrk: {r['errors']} errors, {r['requests']} requests:\n{proc.stdout}")
    return Sample(
        req_per_s=r["requests"] / r["seconds"],
        mib_per_s=r["bytes"] / r["seconds"] / 1024**2,
        p50_us=r["p50"] * 1e6,
        p99_us=r["p99"] * 1e6,
        cpu_us=(cpu1 - cpu0) / r["requests"] * 1e6,
        requests=r["requests"],
    )


def run_idle(case: Case, server: Server, setup: Setup) -> Sample:
    """RSS growth of the server per idle connection: after a warm-up with a few short-lived
    connections, ``case.conns`` connections each echo one byte and stay open, then
    ``case.conns`` more do. The figure is the second group's growth: the first one fills
    memory the server already had resident (freed at start-up or in the warm-up), which
    would otherwise be counted as free, and by how much depends on the server's history
    (the same ferroloop build measured 283 B or 840 B per connection that way, depending
    on whether its modules were compiled at start-up)."""
    warm = Child(load_cmd(case, server, ["--conns", "20", "--requests", "200", "--size", "1024"]))
    try:
        warm.proc.stdin.close()
        check_load_result(warm.read_json(60), warm, server)
        warm.wait(10)
    except TimeoutError:
        raise Failure("warm-up did not finish (server hung?)") from None
    finally:
        warm.kill()
    time.sleep(0.05)  # let the server finish closing the warm-up connections
    server.alive()
    n = str(case.conns)
    holds: list[Child] = []
    rss: list[int] = []
    try:
        for _ in range(2):
            hold = Child(
                load_cmd(case, server, ["--conns", n, "--requests", n, "--size", "1", "--hold"])
            )
            holds.append(hold)
            try:
                result = check_load_result(hold.read_json(120), hold, server)
            except TimeoutError:
                raise Failure(f"{n} idle connections did not all echo (server hung?)") from None
            rss.append(rss_bytes(server.pid))
        for hold in holds:
            hold.send("done")
        for hold in holds:
            hold.wait(10)
    finally:
        for hold in holds:
            hold.kill()
    return Sample(requests=result["requests"], rss_per_conn=(rss[1] - rss[0]) / case.conns)


def measure(case: Case, column: str, setup: Setup) -> Sample:
    """One measurement in fresh processes; raises Failure or NotImplementedCell."""
    server = Server(case, column, setup)
    try:
        if case.kind == "idle":
            sample = run_idle(case, server, setup)
        elif case.kind == "http" and setup.wrk:
            sample = run_wrk(case, server, setup)
        else:
            sample = run_load(case, server, setup)
        server.stop()
        return sample
    finally:
        server.child.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(server.path)


# ---- setup: netload build, certificate, limits --------------------------------------------------


def build_netload() -> str:
    """cargo build --release of benchmarks/netload (cargo skips it when up to date)."""
    cargo = shutil.which("cargo")
    cmd = ["cargo", "build", "--release", "--manifest-path", str(NETLOAD / "Cargo.toml")]
    if cargo is None:
        if LOAD_BIN.exists() and ECHO_BIN.exists():
            return "cargo not found; using the existing build"
        raise SystemExit("error: cargo not found and benchmarks/netload is not built")
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"error: building netload failed: {shlex.join(cmd)}")
    compiled = "Compiling netload" in proc.stderr
    return f"{'built' if compiled else 'up to date'} ({took:.1f}s)"


def make_cert(tmpdir: str) -> tuple[tuple[str, str] | None, str]:
    """A throwaway self-signed certificate: openssl if installed, else CPython's test cert."""
    cert, key = os.path.join(tmpdir, "cert.pem"), os.path.join(tmpdir, "key.pem")
    openssl = shutil.which("openssl")
    if openssl:
        cmd = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt"]
        cmd += ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost"]
        cmd += ["-keyout", key, "-out", cert]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return (cert, key), "self-signed EC P-256, generated with openssl"
    for rel in ("test/certdata/keycert.pem", "test/keycert.pem"):
        path = os.path.join(os.path.dirname(os.__file__), rel)
        if os.path.exists(path):
            return (path, path), f"CPython's {rel}"
    return None, "none (no openssl, no CPython test certificate)"


def raise_nofile_limit(need: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return str(soft)


def wrk_version(path: str) -> str:
    proc = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).split("Copyright")[0].strip() or "wrk"


# ---- results ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """All rounds of one (case, server column)."""

    samples: list[Sample | None] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    not_implemented: str | None = None

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s is not None]

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.ok())

    def spread(self, attr: str) -> str:
        values = [getattr(s, attr) for s in self.ok()]
        if len(values) < 2 or statistics.median(values) == 0:
            return ""
        return f" ±{spread_pct(values):.0f}%"


def paired_ratio(a: Cell, b: Cell, attr: str) -> tuple[float, float, float] | None:
    """(ratio of medians, min and max of the per-round ratios) of a's attr over b's."""
    if not a.ok() or not b.ok():
        return None
    paired = [
        getattr(x, attr) / getattr(y, attr)
        for x, y in zip(a.samples, b.samples, strict=False)
        if x is not None and y is not None and getattr(y, attr)
    ]
    base = b.median(attr)
    if not base:
        return None
    med = a.median(attr) / base
    return med, min(paired, default=med), max(paired, default=med)


def fmt_ratio(r: tuple[float, float, float] | None) -> str:
    if r is None:
        return ""
    med, lo, hi = r
    return f"{med:.2f}x" if lo == hi else f"{med:.2f}x ({lo:.2f}-{hi:.2f})"


def fmt_num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 10 else f"{value:.2f}"


def target_text(case: Case, cells: dict[str, Cell], smoke: bool) -> str:
    """The issue's targets that apply to this case, judged for ferroloop (informational)."""
    ferro = cells.get("ferroloop")
    checks: list[tuple[str, Callable[[], str]]] = []
    if case.kind == "idle":
        checks.append((f"RSS/conn <={RSS_TARGET} B", lambda: judge_rss(ferro)))
    if case.kind in CPU_TARGETS and is_headline(case, smoke):
        goal = CPU_TARGETS[case.kind]
        checks.append(
            (f"CPU/native <={goal}x", lambda: judge_ratio(ferro, cells.get(NATIVE), goal))
        )
    if case.kind == "tls" or case.size >= UVLOOP_TARGET_SIZE:
        checks.append(("req/s vs uvloop >=1x", lambda: judge_uvloop(ferro, cells.get("uvloop"))))
    texts = []
    for label, judge in checks:
        if ferro is None:
            verdict = "n/a"
        elif ferro.not_implemented:
            verdict = "not implemented"
        elif not ferro.ok():
            verdict = "FAILED"
        elif smoke:
            verdict = "(smoke)"
        else:
            verdict = judge()
        texts.append(f"{label}: {verdict}")
    return "; ".join(texts)


def judge_ratio(ferro: Cell, native: Cell | None, goal: float) -> str:
    r = paired_ratio(ferro, native, "cpu_us") if native else None
    if r is None:
        return "n/a"
    return f"{'met' if r[0] <= goal else 'NOT met'} ({r[0]:.2f}x)"


def judge_uvloop(ferro: Cell, uv: Cell | None) -> str:
    r = paired_ratio(ferro, uv, "req_per_s") if uv else None
    if r is None:
        return "n/a"
    return f"{'met' if r[0] >= 1.0 else 'NOT met'} ({r[0]:.2f}x)"


def judge_rss(ferro: Cell) -> str:
    value = ferro.median("rss_per_conn")
    return f"{'met' if value <= RSS_TARGET else 'NOT met'} ({value:.0f} B)"


def status_text(cell: Cell | None) -> str | None:
    """A whole-row text for cells without numbers, else None."""
    if cell is None:
        return "skipped"
    if cell.not_implemented:
        return "not implemented"
    if not cell.ok():
        return "FAILED"
    return None


def tables(
    cases: list[Case], columns: list[str], results: dict, smoke: bool
) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    headers = ["benchmark", "server", "req/s", "MiB/s", "p50 µs", "p99 µs"]
    headers += ["server CPU µs/req", "CPU/native", "target (ferroloop)"]
    idle_headers = ["benchmark", "server", "RSS per idle conn (B)", "target (ferroloop)"]
    rows, idle_rows = [], []
    for case in cases:
        cells = results[case]
        for i, column in enumerate(columns):
            cell = cells.get(column)
            label = case.name if i == 0 else ""
            target = target_text(case, cells, smoke) if column == "ferroloop" else ""
            status = status_text(cell)
            if case.kind == "idle":
                if not status:
                    status = f"{cell.median('rss_per_conn'):.0f}{cell.spread('rss_per_conn')}"
                idle_rows.append([label, column, status, target])
                continue
            if status:
                rows.append([label, column, status, "", "", "", "", "", target])
                continue
            failed = f" ({len(cell.failures)} failed)" if cell.failures else ""
            native = cells.get(NATIVE)
            ratio = paired_ratio(cell, native, "cpu_us") if native else None
            rows.append(
                [
                    label,
                    column,
                    fmt_rate(cell.median("req_per_s")) + cell.spread("req_per_s") + failed,
                    fmt_num(cell.median("mib_per_s")),
                    fmt_num(cell.median("p50_us")),
                    fmt_num(cell.median("p99_us")),
                    fmt_num(cell.median("cpu_us")) + cell.spread("cpu_us"),
                    fmt_ratio(ratio),
                    target,
                ]
            )
    return headers, rows, idle_headers, idle_rows


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A table: the first two columns (benchmark, server) and the last (target) left-aligned,
    the numbers right-aligned."""
    left = {0, 1, len(headers) - 1}
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        aligns = ["---" if i in left else "---:" for i in range(len(headers))]
        lines.append("|" + "|".join(aligns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


# ---- the runner ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Network benchmarks: ferroloop vs uvloop, rloop, asyncio and a native "
        "echo server, rounds interleaved.",
    )
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3; smoke 1)")
    parser.add_argument(
        "--duration", type=float, help="measured seconds per run (default 2; smoke 0.2)"
    )
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds of load before (default 0.5; smoke 0.05)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="KIND",
        help="benchmarks to run (space- or comma-separated): "
        + "; ".join(f"{k} = {what}" for k, (what, _) in KINDS.items()),
    )
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        help=f"comma-separated loops (default {','.join(LOOPS)}); the native server always "
        "runs too (unless --no-native)",
    )
    parser.add_argument("--no-native", action="store_true", help="skip the native echo server")
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="every stream/UDP benchmark over the full size x connections matrix (default: "
        "only protocol; the others 1 KiB x 50 and 100 KiB x 1)",
    )
    parser.add_argument(
        "--idle-conns", type=int, help="connections for the idle RSS case (default 1000; smoke 100)"
    )
    parser.add_argument(
        "--no-wrk", action="store_true", help="load HTTP with `load --http` even if wrk is there"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="each benchmark once, 1 KiB x 1 connection, ~0.2 s of load: checks that every "
        "server still works and echoes right (timings meaningless)",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--server", nargs=2, metavar=("KIND", "LOOP"), help=argparse.SUPPRESS
    )  # subprocess mode
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.server:
        return args
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 3
    if args.duration is None:
        args.duration = 0.2 if args.smoke else 2.0
    if args.warmup is None:
        args.warmup = 0.05 if args.smoke else 0.5
    if args.idle_conns is None:
        args.idle_conns = 100 if args.smoke else 1000
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.idle_conns < 1:
        parser.error("--rounds, --duration and --idle-conns must be positive")
    kinds = [k for item in args.only or [] for k in item.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    args.kinds = kinds or list(KINDS)
    args.loop_names = [n.strip() for n in args.loops.split(",") if n.strip()]
    unknown = [n for n in args.loop_names if n not in LOOPS]
    if unknown:
        parser.error(f"unknown loop(s): {', '.join(unknown)}; choose from {', '.join(LOOPS)}")
    return args


def describe(sample: Sample | None, case: Case, error: str | None) -> str:
    if sample is None:
        return error or "FAILED"
    if case.kind == "idle":
        return f"{sample.rss_per_conn:.0f} B RSS per idle connection"
    lost = f", {sample.lost} lost" if sample.lost else ""
    return (
        f"{fmt_rate(sample.req_per_s)} req/s, p50 {sample.p50_us:.0f} µs, "
        f"CPU {sample.cpu_us:.1f} µs/req{lost}"
    )


def run(args: argparse.Namespace) -> int:
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
    columns = loops + ([] if args.no_native else [NATIVE])

    wall_start = time.perf_counter()
    build = build_netload()
    nofile = raise_nofile_limit(2 * args.idle_conns + 200)
    tmpdir = tempfile.mkdtemp(prefix="ferroloop-net-")
    cert, cert_source = make_cert(tmpdir)
    wrk = None if args.no_wrk else shutil.which("wrk")
    kinds = list(args.kinds)
    if cert is None and "tls" in kinds:
        print("notice: skipping tls: no way to make a certificate here", file=sys.stderr)
        kinds.remove("tls")
    if "http" in kinds and wrk is None:
        print("notice: wrk not found; HTTP is loaded with `load --http`", file=sys.stderr)
    setup = Setup(args, tmpdir, cert, wrk)
    cases = [c for k in kinds for c in cases_for(k, args.smoke, args.matrix, args.idle_conns)]

    build_where, build_stamp = ferroloop_build()
    header = [
        *run_header(args.markdown, loops, build_where),
        f"netload: {build}; HTTP load: {wrk_version(wrk) + ' -t1' if wrk else 'load --http'}",
        f"TLS certificate: {cert_source}; open files limit: {nofile}",
        (
            f"rounds: {args.rounds} x ({args.warmup:g}s warm-up + {args.duration:g}s measured)"
            f"{' (smoke)' if args.smoke else ''}; server CPU from "
            f"{'/proc/PID/task/*/schedstat' if SCHEDSTAT else '/proc/PID/stat utime+stime'}"
        ),
        f"load average at start: {load_average()}",
    ]
    for line in header:
        print(("- " if args.markdown else "") + line)
    print(flush=True)

    results: dict[Case, dict[str, Cell]] = {c: {n: Cell() for n in columns} for c in cases}
    try:
        for rnd in range(args.rounds):
            native_done: dict[tuple, Sample | None] = {}  # shared within the round
            for i, case in enumerate(cases):
                shift = (rnd + i) % len(columns)
                for column in columns[shift:] + columns[:shift]:
                    cell = results[case][column]
                    shared = column == NATIVE and case.native_key() in native_done
                    sample, error = None, None
                    if shared:
                        sample = native_done[case.native_key()]
                        error = None if sample else "FAILED (shared native run)"
                    elif cell.not_implemented is None:
                        try:
                            sample = measure(case, column, setup)
                        except NotImplementedCell as exc:
                            cell.not_implemented = str(exc)
                        except Failure as exc:
                            error = str(exc)
                            cell.failures.append(error)
                    if column == NATIVE and not shared:
                        native_done[case.native_key()] = sample
                    cell.samples.append(sample)
                    status = (
                        f"not implemented: {cell.not_implemented}"
                        if cell.not_implemented
                        else describe(sample, case, error)
                    )
                    if shared:
                        status += " (shared)"
                    print(
                        f"[round {rnd + 1}/{args.rounds}] {case.name:<18} {column:<10} "
                        f"{status.splitlines()[0]}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        kill_all()
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.perf_counter() - wall_start
    rebuilt = "ferroloop" in loops and ferroloop_build()[1] != build_stamp
    if rebuilt:
        print("WARNING: ferroloop's extension module changed during the run", file=sys.stderr)

    headers, rows, idle_headers, idle_rows = tables(cases, columns, results, args.smoke)
    if rows:
        print(render(headers, rows, args.markdown))
        print()
    if idle_rows:
        print(render(idle_headers, idle_rows, args.markdown))
        print()
    print(
        "req/s, latency and CPU: median over rounds (± half the min-max range over rounds); "
        "server CPU µs/req: the server process's CPU time during the measured interval / "
        "requests; CPU/native: that over the native echo server's, ratio of medians (range "
        "of the per-round ratios). Latency: send of a message to the last byte of its echo."
    )
    lost = [
        f"{c.name} on {n}: {sum(s.lost for s in cell.ok())} datagrams lost and resent"
        for c in cases
        for n, cell in results[c].items()
        if any(s.lost for s in cell.ok())
    ]
    for line in lost:
        print(f"note: {line}")
    print(f"wall time: {elapsed:.0f}s; load average at end: {load_average()}")
    if rebuilt:
        print("WARNING: ferroloop was rebuilt during this run; the results mix two builds.")

    failed = [
        (c.name, n, err) for c in cases for n, cell in results[c].items() for err in cell.failures
    ]
    if failed:
        print(f"\n{len(failed)} measurement(s) FAILED:", file=sys.stderr)
        for name, column, err in failed:
            print(f"- {name} on {column}: {err.strip()}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # "µ" on an ASCII-only terminal
    if args.server:
        return serve(args.server[0], args.server[1], args)

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise SystemExit(143)  # unwinds through run()'s cleanup: no stray servers

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run(args)
    finally:
        kill_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
