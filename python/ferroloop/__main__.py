"""``python -m ferroloop [script.py | -m module | -c command | -] [args...]``.

Runs an unmodified asyncio program with ferroloop behind ``asyncio.run``,
``asyncio.Runner`` and ``asyncio.new_event_loop``, as ``python`` itself would run it: the
program's ``__main__`` module stays in ``sys.modules`` after its top level (atexit
handlers and threads can still pickle its classes), a script's ``__file__`` is absolute,
and ``sys.argv`` / ``sys.path[0]`` are what ``python`` sets. With no arguments, opens the
asyncio REPL (as ``python -m asyncio``) running on ferroloop.
"""

from __future__ import annotations

import os
import runpy
import sys
import types

USAGE = """\
usage: python -m ferroloop [script.py | -m module | -c command | -] [args...]

Run an asyncio program with ferroloop as the event loop. With no arguments,
start the asyncio REPL on ferroloop.
"""


def _install() -> None:
    import ferroloop

    ferroloop._set_policy_quietly(ferroloop.EventLoopPolicy())


def _fresh_main(**attrs) -> dict:
    """A new ``__main__`` module in ``sys.modules`` (left there, as python's own);
    returns its namespace."""
    module = types.ModuleType("__main__")
    module.__dict__.update(__builtins__=__builtins__, __spec__=None, __package__=None, **attrs)
    sys.modules["__main__"] = module
    return module.__dict__


def _run_source(source, filename: str, namespace: dict) -> None:
    exec(compile(source, filename, "exec"), namespace)


def _run_script(script: str) -> None:
    path = os.path.abspath(script)
    if os.path.isdir(path) or (not path.endswith(".py") and _is_zip(path)):
        # A directory or zip file with a __main__.py: as python runs it, its __main__
        # module found first on sys.path.
        sys.path[0] = path
        _fresh_main()
        runpy._run_module_as_main("__main__", alter_argv=False)
        return
    sys.path[0] = os.path.dirname(path)
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        sys.stderr.write(
            f"{sys.executable}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}\n"
        )
        raise SystemExit(2) from None
    from importlib.machinery import SourceFileLoader

    namespace = _fresh_main(
        __file__=path, __cached__=None, __loader__=SourceFileLoader("__main__", path)
    )
    _run_source(source, path, namespace)


def _is_zip(path: str) -> bool:
    import zipfile

    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return
    _install()
    if not args:
        sys.argv = [sys.argv[0]]
        runpy.run_module("asyncio", run_name="__main__", alter_sys=True)
        return
    if args[0] in ("-m", "-c") and len(args) < 2:
        sys.stderr.write(f"Argument expected for the {args[0]} option\n{USAGE}")
        raise SystemExit(2)
    if args[0] == "-m":
        sys.argv = args[1:]
        _fresh_main()
        # As `python -m`: run in the __main__ module just made, which stays.
        runpy._run_module_as_main(args[1], alter_argv=True)
        return
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[0] = ""
        _run_source(args[1], "<string>", _fresh_main(__loader__=None))
        return
    if args[0] == "-":
        sys.argv = args
        sys.path[0] = ""
        _run_source(sys.stdin.read(), "<stdin>", _fresh_main(__file__="<stdin>", __loader__=None))
        return
    sys.argv = args
    _run_script(args[0])


if __name__ == "__main__":
    main()
