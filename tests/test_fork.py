"""A process made by ``os.fork()`` (pre-fork servers, multiprocessing's fork start
method) runs a new loop of its own: resolution, sockets, the executor, subprocesses and
signal handlers all work there, and the parent's loop goes on unaffected.

Each test runs a script in a subprocess that forks, so the test process itself never
forks with pytest's threads and state.
"""

from __future__ import annotations

import json
import sys

import pytest
from _util import python_subprocess

# argv: loop name, "outside" (fork with the parent's loop stopped) or "inside" (fork from
# a coroutine running on it). The parent's loop has used the resolver threads and has a
# signal handler when it forks; the child runs a workload on a new loop and prints what
# it got as JSON; the parent then checks its own loop still resolves, and prints the
# child's exit status and the parent's signal handler calls.
FORKING_SCRIPT = r"""
import asyncio, json, os, signal, sys
import ferroloop

kind, mode = sys.argv[1], sys.argv[2]
factory = ferroloop.new_event_loop if kind == "ferroloop" else asyncio.new_event_loop
run = ferroloop.run if kind == "ferroloop" else asyncio.run


async def workload():
    loop = asyncio.get_running_loop()
    out = {"same_loop_type": type(loop) is type(factory())}
    infos = await loop.getaddrinfo("localhost", 80, type=1)
    out["dns"] = sorted({info[4][1] for info in infos})

    async def echo(r, w):
        w.write(await r.read(100))
        await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    r, w = await asyncio.open_connection(*server.sockets[0].getsockname())
    w.write(b"ping")
    out["tcp"] = (await r.read(100)).decode()
    w.close()
    server.close()
    await server.wait_closed()
    out["executor"] = await loop.run_in_executor(None, sum, [1, 2])
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
    out["subprocess"] = await proc.wait()
    got = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, got.set_result, "usr1")
    os.kill(os.getpid(), signal.SIGUSR1)
    out["signal"] = await asyncio.wait_for(got, 10)
    loop.remove_signal_handler(signal.SIGUSR1)
    out["sleep"] = await asyncio.sleep(0.01, "ok")
    return out


def fork_and_wait():
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a hang in the child kills it (status 14) instead of the test
        try:
            print(json.dumps(run(workload())), flush=True)
        except BaseException as exc:
            print(json.dumps({"error": repr(exc)}), flush=True)
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


parent_signals = []


async def parent():
    loop = asyncio.get_running_loop()
    await loop.getaddrinfo("localhost", 81)  # the resolver threads exist now
    loop.add_signal_handler(signal.SIGUSR1, parent_signals.append, "usr1")
    status = fork_and_wait() if mode == "inside" else None
    await asyncio.sleep(0.05)
    return status


loop = factory()
status = loop.run_until_complete(parent())
if mode == "outside":
    status = fork_and_wait()
after = loop.run_until_complete(loop.getaddrinfo("localhost", 82, type=1))
loop.remove_signal_handler(signal.SIGUSR1)
loop.close()
result = {"status": status, "parent_dns": after[0][4][1], "parent_signals": parent_signals}
print(json.dumps(result))
"""


def _run_forking(loop_name: str, mode: str) -> tuple[dict, dict]:
    proc = python_subprocess(["-c", FORKING_SCRIPT, loop_name, mode])
    out, err = proc.communicate(timeout=90)
    lines = out.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, (out, err)
    return json.loads(lines[0]), json.loads(lines[1])


@pytest.mark.parametrize("mode", ["outside", "inside"])
def test_forked_child_runs_a_new_loop(loop_name, mode):
    """The child resolves a name (ferroloop used to queue it for resolver threads that
    exist only in the parent, and hang), serves and connects over TCP, uses the executor,
    waits for a subprocess and handles a signal; the parent's loop still resolves."""
    child, parent = _run_forking(loop_name, mode)
    assert child == {
        "same_loop_type": True,
        "dns": [80],
        "tcp": "ping",
        "executor": 3,
        "subprocess": 3,
        "signal": "usr1",
        "sleep": "ok",
    }
    assert parent == {"status": 0, "parent_dns": 82, "parent_signals": []}


# The parent's loop, running with a SIGUSR1 handler, forks; the child runs a new loop
# with no handler of its own and sends itself SIGUSR1, which the Python-level handler it
# inherited catches. Prints whether the child's new loop installed a wake-up fd of its own
# and which handler calls the parent saw.
WAKEUP_SCRIPT = r"""
import asyncio, json, os, signal, sys
import ferroloop

kind = sys.argv[1]
factory = ferroloop.new_event_loop if kind == "ferroloop" else asyncio.new_event_loop
run = ferroloop.run if kind == "ferroloop" else asyncio.run
parent_signals = []


async def child_main(inherited):
    os.kill(os.getpid(), signal.SIGUSR1)
    await asyncio.sleep(0.05)
    current = signal.set_wakeup_fd(-1)
    return current != inherited


async def parent():
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, parent_signals.append, "usr1")
    inherited = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(inherited)
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        try:
            print(json.dumps({"own_fd": run(child_main(inherited))}), flush=True)
        finally:
            os._exit(0)
    status = os.waitpid(pid, 0)[1]
    await asyncio.sleep(0.1)  # a wake-up byte the child wrote would be read by now
    loop.remove_signal_handler(signal.SIGUSR1)
    return status


loop = factory()
status = loop.run_until_complete(parent())
loop.close()
print(json.dumps({"status": status, "parent_signals": parent_signals}))
"""


def test_forked_child_does_not_signal_its_parents_loop(loop_name):
    """The child inherits the signal wake-up fd, a socket of its parent's loop; a signal
    the child gets must not run the parent's handler. asyncio resets the wake-up fd in
    every forked child from Python 3.12 on; ferroloop does on every Python."""
    if loop_name == "asyncio" and sys.version_info < (3, 12):
        pytest.skip("asyncio before 3.12 leaves the parent's wake-up fd to the child")
    proc = python_subprocess(["-c", WAKEUP_SCRIPT, loop_name])
    out, err = proc.communicate(timeout=60)
    lines = out.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, (out, err)
    child, parent = json.loads(lines[0]), json.loads(lines[1])
    assert parent == {"status": 0, "parent_signals": []}
    # asyncio's new loop has no handler, so leaves the fd at -1; ferroloop's installs
    # its own while it runs (so Ctrl+C wakes it): either way not the parent's.
    assert child == {"own_fd": True}


# The parent's loop serves (a listener and one accepted connection) when it forks; the
# child lets go of its copy of that loop in one of three ways and exits; then the parent
# must still hear from both descriptors. argv: loop name, how the child lets go.
INHERITED_SCRIPT = r"""
import asyncio, os, socket, sys
import ferroloop

kind, how = sys.argv[1], sys.argv[2]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


server = loop.run_until_complete(loop.create_server(Echo, "127.0.0.1", 0))
addr = server.sockets[0].getsockname()
old = socket.create_connection(addr)
loop.run_until_complete(asyncio.sleep(0.05))
pid = os.fork()
if pid == 0:
    if how == "close-server":
        server.close()  # closes the accepted transport's copy too
    if how in ("close", "close-server"):
        loop.close()
    sys.exit(0)  # the interpreter's exit collects what is left
os.waitpid(pid, 0)


async def check():
    old.setblocking(False)
    await loop.sock_sendall(old, b"old")
    got_old = await asyncio.wait_for(loop.sock_recv(old, 100), 5)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), 5)
    writer.write(b"new")
    got_new = await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    return got_old.decode(), got_new.decode()


print(*loop.run_until_complete(check()))
old.close()
server.close()
loop.run_until_complete(server.wait_closed())
loop.close()
"""


@pytest.mark.parametrize("how", ["exit", "close", "close-server"])
def test_child_letting_go_of_an_inherited_loop_leaves_the_parents_alone(loop_name, how):
    """A forked child shares its parent's epoll instance. ferroloop used to remove the
    parent's descriptors from it when the child collected the inherited transports (even
    at a plain exit), so the parent's loop stopped hearing from them. Closing the server
    in the child does the same on asyncio, which removes the listener there."""
    if loop_name == "asyncio" and how == "close-server":
        pytest.skip("asyncio's server.close() in the child unregisters the parent's listener")
    proc = python_subprocess(["-c", INHERITED_SCRIPT, loop_name, how])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert out == "old new\n"


# A pre-fork server on one inherited loop: the parent listens, forks two children, and all
# three run the same loop object. Each child first has a thread wake its loop with
# call_soon_threadsafe, then serves until SIGTERM, reporting its SIGUSR1 handler calls.
# The parent, its loop running too, makes 60 connections one after another (each answered
# with the pid that served it), signals the children and waits for them. argv: loop name.
PREFORK_SCRIPT = r"""
import asyncio, json, os, signal, socket, sys, threading, time
import ferroloop

kind = sys.argv[1]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()


class Who(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(str(os.getpid()).encode())
        self.transport.close()


server = loop.run_until_complete(loop.create_server(Who, "127.0.0.1", 0, backlog=128))
addr = server.sockets[0].getsockname()
usr1 = []
loop.add_signal_handler(signal.SIGUSR1, usr1.append, "usr1")


def child():
    signal.alarm(60)
    try:
        woken = loop.create_future()

        def wake():
            time.sleep(0.2)
            loop.call_soon_threadsafe(woken.set_result, "woken")

        threading.Thread(target=wake).start()
        t0 = time.monotonic()
        loop.run_until_complete(asyncio.wait_for(woken, 10))
        wake_s = time.monotonic() - t0
        done = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, done.set_result, None)
        loop.run_until_complete(done)
        out = {"woken_in_time": wake_s < 5, "usr1": usr1}
    except BaseException as exc:
        out = {"error": repr(exc)}
    os.write(1, (json.dumps(out) + "\n").encode())  # one write: the children run at once
    os._exit(0)


pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        child()
    pids.append(pid)


def clients():
    time.sleep(0.5)  # the children are serving by now
    failures, servers = 0, set()
    for _ in range(60):
        try:
            with socket.create_connection(addr, timeout=5) as c:
                c.sendall(b"?")
                servers.add(int(c.recv(100)))
        except OSError:
            failures += 1
    return failures, servers


async def parent():
    failures, servers = await loop.run_in_executor(None, clients)
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    await asyncio.sleep(0.3)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    statuses = [(await loop.run_in_executor(None, os.waitpid, pid, 0))[1] for pid in pids]
    return {
        "failures": failures,
        "served_by_known_pids": servers <= {os.getpid(), *pids},
        "statuses": statuses,
        "usr1": usr1,
    }


result = loop.run_until_complete(parent())
server.close()
loop.run_until_complete(server.wait_closed())
loop.remove_signal_handler(signal.SIGUSR1)
loop.close()
print(json.dumps(result))
"""


def test_pre_fork_server_on_one_inherited_loop(loop_name):
    """Parent and children run the loop the parent made. A child shares its parent's
    epoll instance; ferroloop's registrations are edge-triggered, so an event could go to
    a process that does not own the descriptor and be lost (connections hung). A child
    now gives the loop an epoll instance, waker and signal socket of its own when it
    first runs it, as libuv does after uv_loop_fork."""
    if loop_name == "asyncio":
        pytest.skip(
            "asyncio's children share the parent's self-pipe: the parent's loop reads the "
            "signals sent to a child, which then never sees its SIGTERM"
        )
    proc = python_subprocess(["-c", PREFORK_SCRIPT, loop_name])
    out, err = proc.communicate(timeout=120)
    lines = out.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, (out, err)
    children = sorted(lines[:2])
    parent = json.loads(lines[2])
    assert parent["failures"] == 0 and parent["served_by_known_pids"], parent
    assert parent["statuses"] == [0, 0]
    assert [json.loads(c) for c in children] == [{"woken_in_time": True, "usr1": ["usr1"]}] * 2
    assert parent["usr1"] == []


# A callback forks while the loop runs, and parent and child both go on running it. (A
# coroutine could not: asyncio's get_running_loop() refuses in a child.) Each process then
# watches a socket pair of its own with add_reader, which a thread writes to, and waits
# for a thread's call_soon_threadsafe and a timer, with the other process polling too.
# Prints one JSON line per process. argv: loop name.
FORK_WHILE_RUNNING_SCRIPT = r"""
import asyncio, json, os, signal, socket, sys, threading
import ferroloop

kind = sys.argv[1]
loop = ferroloop.new_event_loop() if kind == "ferroloop" else asyncio.new_event_loop()
state = {}
r0, w0 = socket.socketpair()  # watched before the fork: the child inherits the registration
loop.add_reader(r0, lambda: None)


def forked():
    state["pid"] = os.fork()
    state["who"] = "child" if state["pid"] == 0 else "parent"
    if state["pid"] == 0:
        signal.alarm(60)
    loop.remove_reader(r0)
    r, w = socket.socketpair()
    got = []

    def readable():
        got.append(r.recv(100).decode())
        loop.remove_reader(r)
        threading.Timer(0.1, loop.call_soon_threadsafe, (woken,)).start()

    def woken():
        state["woken"] = True
        loop.call_later(0.05, finish)

    def finish():
        state["read"] = got
        r.close()
        w.close()
        loop.stop()

    loop.add_reader(r, readable)
    threading.Timer(0.1, w.send, (state["who"].encode(),)).start()
    state["timeout"] = loop.call_later(10, loop.stop)


loop.call_soon(forked)
loop.run_forever()
state.pop("timeout").cancel()
pid = state.pop("pid")
if pid == 0:
    os.write(1, (json.dumps(state) + "\n").encode())
    os._exit(0)
state["status"] = os.waitpid(pid, 0)[1]
r0.close()
w0.close()
loop.close()
print(json.dumps(state))
"""


def test_fork_from_a_callback_and_both_processes_go_on(loop_name):
    """os.fork() from a callback, the child going on with the running loop. The child
    gets its own epoll instance and waker at its next iteration: before, the parent's
    poll could take the child's events (the child hung until its timeout)."""
    if loop_name == "asyncio":
        pytest.skip(
            "asyncio's parent and child register their new socket pairs, which have the "
            "same descriptor numbers, in the epoll instance they share: either process "
            "can get the other's events (the test fails about one run in five)"
        )
    proc = python_subprocess(["-c", FORK_WHILE_RUNNING_SCRIPT, loop_name])
    out, err = proc.communicate(timeout=120)
    lines = sorted((json.loads(line) for line in out.splitlines()), key=lambda d: d["who"])
    assert proc.returncode == 0 and len(lines) == 2, (out, err)
    child, parent = lines
    assert child == {"who": "child", "woken": True, "read": ["child"]}
    assert parent == {"who": "parent", "woken": True, "read": ["parent"], "status": 0}


# Forks 150 times while resolver threads deliver answers to the parent's loop; each child
# closes the loop it inherited (a SIGALRM ends a child that hangs). Prints the number of
# children that did not exit normally.
CLOSE_WHILE_RESOLVING_SCRIPT = r"""
import asyncio, os, signal, sys, time, warnings
import ferroloop

warnings.simplefilter("ignore")
factory = ferroloop.new_event_loop if sys.argv[1] == "ferroloop" else asyncio.new_event_loop
loop = factory()
failed = 0
for i in range(150):
    lookups = [loop.create_task(loop.getaddrinfo("localhost", 80)) for _ in range(100)]
    loop.run_until_complete(asyncio.sleep(0))
    time.sleep(0.0005 * (i % 7))
    pid = os.fork()
    if pid == 0:
        signal.alarm(5)
        loop.close()
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    failed += not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
    loop.run_until_complete(asyncio.gather(*lookups, return_exceptions=True))
loop.close()
print(failed)
"""


def test_child_closes_an_inherited_loop_while_answers_arrive(loop_name):
    """A resolver thread of the parent's may hold the loop's answer queue locked at the
    fork: the child's close() must not wait for it (that thread does not exist there).
    The race is narrow: this catches it in some runs only."""
    if loop_name == "asyncio":
        pytest.skip(
            "about ferroloop's resolver threads; asyncio's 15,000 lookups through its "
            "executor take over a minute here"
        )
    proc = python_subprocess(["-c", CLOSE_WHILE_RESOLVING_SCRIPT, loop_name])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "0", err
