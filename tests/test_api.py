"""ferroloop's public API: classes, run(), the policy, ``python -m ferroloop``."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import re
import subprocess
import sys
import textwrap

import ferroloop
import pytest
from _util import python_subprocess
from ferroloop._ferroloop import LoopCore

# ---- classes and functions -----------------------------------------------------------


def test_loop_class():
    assert issubclass(ferroloop.Loop, asyncio.AbstractEventLoop)
    assert issubclass(ferroloop.Loop, LoopCore)
    loop = ferroloop.new_event_loop()
    try:
        assert type(loop) is ferroloop.Loop
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_loop_implements_every_abstract_method():
    """ferroloop-only: no AbstractEventLoop stub (a bare NotImplementedError) is left."""
    inherited = [
        name
        for name, value in vars(asyncio.AbstractEventLoop).items()
        if not name.startswith("__") and getattr(ferroloop.Loop, name) is value
    ]
    assert inherited == []


# Methods whose signature is the same on every supported Python (create_task and
# shutdown_default_executor gained parameters in later versions).
SIGNATURE_METHODS = [
    "call_soon",
    "call_soon_threadsafe",
    "call_later",
    "call_at",
    "time",
    "stop",
    "is_running",
    "is_closed",
    "close",
    "run_forever",
    "run_until_complete",
    "create_future",
    "get_debug",
    "set_debug",
    "add_reader",
    "add_writer",
    "remove_reader",
    "remove_writer",
    "add_signal_handler",
    "remove_signal_handler",
    "run_in_executor",
    "set_default_executor",
    "set_task_factory",
    "get_task_factory",
    "get_exception_handler",
    "set_exception_handler",
    "default_exception_handler",
    "call_exception_handler",
    "shutdown_asyncgens",
]


@pytest.mark.parametrize("method", SIGNATURE_METHODS)
def test_method_signatures_match_asyncio(method):
    """inspect.signature() works on every method and gives asyncio's parameters."""

    def params(loop):
        sig = inspect.signature(getattr(loop, method))
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    stdlib, ferro = asyncio.new_event_loop(), ferroloop.new_event_loop()
    try:
        assert params(ferro) == params(stdlib)
    finally:
        stdlib.close()
        ferro.close()


def test_handle_classes():
    assert issubclass(ferroloop.Handle, asyncio.Handle)
    assert issubclass(ferroloop.TimerHandle, asyncio.TimerHandle)
    loop = ferroloop.new_event_loop()
    try:
        h = loop.call_soon(print)
        t = loop.call_later(1, print)
        assert type(h) is ferroloop.Handle
        assert type(t) is ferroloop.TimerHandle
        h.cancel()
        t.cancel()
    finally:
        loop.close()


def test_version():
    assert isinstance(ferroloop.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([-.+].*)?", ferroloop.__version__)
    assert ferroloop.__version__ == importlib.metadata.version("ferroloop")


def test_all():
    for name in ferroloop.__all__:
        assert hasattr(ferroloop, name), name
    for name in ("Loop", "new_event_loop", "run", "EventLoopPolicy", "install", "__version__"):
        assert name in ferroloop.__all__


# ---- run() ---------------------------------------------------------------------------


def test_run_returns_result_on_ferroloop():
    async def main():
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()), asyncio.get_running_loop().get_debug()

    assert ferroloop.run(main(), debug=False) == (ferroloop.Loop, False)
    assert ferroloop.run(main(), debug=True) == (ferroloop.Loop, True)


def test_run_takes_loop_factory_and_asyncio_run_keywords_as_uvloop_run():
    """ferroloop.run(main, *, loop_factory=..., debug=None, **run_kwargs), as uvloop.run:
    the factory makes the loop; other keywords go to asyncio.run (3.12+) or are refused."""
    made = []

    class Sub(ferroloop.Loop):
        pass

    def factory():
        made.append(Sub())
        return made[-1]

    async def main():
        return asyncio.get_running_loop()

    loop = ferroloop.run(main(), loop_factory=factory)
    assert made == [loop] and type(loop) is Sub and loop.is_closed()
    coro = main()
    try:
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            ferroloop.run(coro, bogus=1)
    finally:
        coro.close()


def test_run_closes_loop_and_cleans_up():
    seen = {}
    finalized = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            finalized.append("agen")

    async def forever():
        try:
            await asyncio.sleep(100)
        finally:
            finalized.append("task")

    async def main():
        seen["loop"] = asyncio.get_running_loop()
        seen["task"] = asyncio.create_task(forever())
        g = agen()
        seen["agen"] = g
        await g.__anext__()
        await asyncio.sleep(0)

    ferroloop.run(main())
    assert seen["loop"].is_closed()
    assert sorted(finalized) == ["agen", "task"]
    assert asyncio.events._get_running_loop() is None


def test_run_propagates_exception():
    async def main():
        raise ValueError("from main")

    with pytest.raises(ValueError, match=r"^from main$"):
        ferroloop.run(main())


def test_run_rejects_non_coroutine():
    with pytest.raises(ValueError, match=r"^a coroutine was expected, got 1$"):
        ferroloop.run(1)


def test_run_inside_running_loop_like_asyncio_run():
    messages = {}

    async def main():
        for name, run in (("asyncio", asyncio.run), ("ferroloop", ferroloop.run)):
            coro = asyncio.sleep(0)
            try:
                run(coro)
            except RuntimeError as exc:
                messages[name] = str(exc)
            finally:
                coro.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert messages["asyncio"] == "asyncio.run() cannot be called from a running event loop"
    assert messages["ferroloop"] == messages["asyncio"]


# ---- policy --------------------------------------------------------------------------


def test_event_loop_policy():
    policy = ferroloop.EventLoopPolicy()
    assert isinstance(policy, asyncio.AbstractEventLoopPolicy)
    loop = policy.new_event_loop()
    try:
        assert isinstance(loop, ferroloop.Loop)
    finally:
        loop.close()


def _install():
    if sys.version_info >= (3, 12):
        with pytest.warns(DeprecationWarning):
            ferroloop.install()
    else:
        ferroloop.install()


def test_install_makes_asyncio_use_ferroloop():
    old = asyncio.events._event_loop_policy
    try:
        _install()
        assert isinstance(asyncio.events._event_loop_policy, ferroloop.EventLoopPolicy)
        loop = asyncio.new_event_loop()
        try:
            assert isinstance(loop, ferroloop.Loop)
        finally:
            loop.close()

        async def main():
            return type(asyncio.get_running_loop())

        assert asyncio.run(main()) is ferroloop.Loop
    finally:
        asyncio.events._event_loop_policy = old
    loop = asyncio.new_event_loop()
    try:
        assert not isinstance(loop, ferroloop.Loop)
    finally:
        loop.close()


# ---- completeness ----------------------------------------------------------------------


def test_every_abstract_method_is_implemented():
    """ferroloop-only: no method of asyncio.AbstractEventLoop is left to the abstract
    class's NotImplementedError."""
    missing = [
        name
        for name, value in vars(asyncio.AbstractEventLoop).items()
        if callable(value) and not name.startswith("__") and getattr(ferroloop.Loop, name) is value
    ]
    assert missing == []


# ---- python -m ferroloop -------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import sys


    async def main():
        print(type(asyncio.get_running_loop()))
        print(sys.argv)


    asyncio.run(main())
    """
)


def run_ferroloop_main(args, cwd, stdin=None):
    proc = python_subprocess(["-m", "ferroloop", *args], cwd=cwd, stdin=subprocess.PIPE)
    out, err = proc.communicate(stdin, timeout=30)
    return proc.returncode, out, err


def test_main_runs_script(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    rc, out, err = run_ferroloop_main([str(script), "a", "--b"], cwd=tmp_path)
    assert rc == 0, err
    assert out.splitlines() == [
        "<class 'ferroloop.Loop'>",
        repr([str(script), "a", "--b"]),
    ]


def test_main_runs_module(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "app.py").write_text(SCRIPT)
    rc, out, err = run_ferroloop_main(["-m", "mypkg.app", "x", "y"], cwd=tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "<class 'ferroloop.Loop'>"
    argv = eval(lines[1])
    assert argv[0] == str(pkg / "app.py")
    assert argv[1:] == ["x", "y"]


def test_main_script_exception_exit_code(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import asyncio\nasync def main():\n    raise SystemExit(3)\nasyncio.run(main())\n"
    )
    rc, _out, err = run_ferroloop_main([str(script)], cwd=tmp_path)
    assert rc == 3, err


MAIN_MODULE_SCRIPT = """\
import atexit, os, pickle, sys


class Thing:
    pass


@atexit.register
def at_exit():
    # The program's __main__ module is still there once its top level returned.
    print("pickled", len(pickle.dumps(Thing())) > 0)


print("file", __file__ if "__file__" in globals() else None)
print("argv", sys.argv, "path0", sys.path[0])
"""


def test_main_runs_the_program_as_python_does(tmp_path):
    """``python -m ferroloop X`` runs X with the ``__main__`` module, ``__file__``,
    ``sys.argv`` and ``sys.path[0]`` that ``python X`` gives it."""
    script = tmp_path / "prog.py"
    script.write_text(MAIN_MODULE_SCRIPT)
    (tmp_path / "progdir").mkdir()
    (tmp_path / "progdir" / "__main__.py").write_text(MAIN_MODULE_SCRIPT)
    cases = [
        (["prog.py", "a"], None),
        (["progdir", "a"], None),
        (["-m", "prog", "a"], None),
        (["-c", MAIN_MODULE_SCRIPT, "a"], None),
        (["-", "a"], MAIN_MODULE_SCRIPT),
    ]
    for args, stdin in cases:
        plain = python_subprocess(args, cwd=tmp_path, stdin=subprocess.PIPE)
        expected = plain.communicate(stdin, timeout=30)
        rc, out, err = run_ferroloop_main(args, cwd=tmp_path, stdin=stdin)
        assert (plain.returncode, expected[0]) == (rc, out), (args, err)
        assert "pickled True" in out, args


def test_main_missing_script(tmp_path):
    rc, _out, err = run_ferroloop_main(["nope.py"], cwd=tmp_path)
    assert rc == 2
    assert f"can't open file {str(tmp_path / 'nope.py')!r}" in err
    assert "Traceback" not in err


def test_main_help(tmp_path):
    rc, out, _err = run_ferroloop_main(["--help"], cwd=tmp_path)
    assert rc == 0
    assert out.startswith("usage: python -m ferroloop")


def test_main_repl(tmp_path):
    stdin = (
        "import asyncio; print(type(asyncio.get_running_loop()).__module__)\n"
        "await asyncio.sleep(0.01)\n"
        "print('after await')\n"
        "exit()\n"
    )
    rc, out, err = run_ferroloop_main([], cwd=tmp_path, stdin=stdin)
    assert rc == 0, err
    assert "ferroloop" in out
    assert "after await" in out
    assert "asyncio REPL" in err


SUBINTERPRETER_SCRIPT = r"""
import asyncio, sys
try:
    import _xxsubinterpreters as interpreters
except ImportError:
    raise SystemExit("no _xxsubinterpreters")
order = sys.argv[1]
if order == "main-first":
    import ferroloop
iid = interpreters.create()
try:
    interpreters.run_string(iid, "import ferroloop")
except interpreters.RunFailedError as exc:
    print("sub-interpreter:", "ImportError" in str(exc))
interpreters.destroy(iid)
import ferroloop
loop = ferroloop.new_event_loop()
print("main:", loop.run_until_complete(asyncio.sleep(0.01, "ok")))
loop.close()
"""


@pytest.mark.parametrize("order", ["main-first", "sub-first"])
def test_sub_interpreters_cannot_import_ferroloop(order):
    """ferroloop keeps process-wide caches of Python objects, so a sub-interpreter gets an
    ImportError (Python 3.12+ refuses the module itself; 3.10 and 3.11 ran it there and
    mixed the interpreters' objects, which broke the main interpreter's loops)."""
    proc = python_subprocess(["-c", SUBINTERPRETER_SCRIPT, order])
    out, err = proc.communicate(timeout=60)
    if "no _xxsubinterpreters" in err:
        pytest.skip("this Python has no _xxsubinterpreters")
    assert (proc.returncode, out) == (0, "sub-interpreter: True\nmain: ok\n"), err
