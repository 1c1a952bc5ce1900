"""``python -m ferroloop [script.py | -m module] [args...]``.

Runs an unmodified asyncio program with ferroloop behind ``asyncio.run``,
``asyncio.Runner`` and ``asyncio.new_event_loop``. With no arguments, opens the asyncio
REPL (as ``python -m asyncio``) running on ferroloop.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = """\
usage: python -m ferroloop [script.py | -m module] [args...]

Run an asyncio program with ferroloop as the event loop. With no arguments,
start the asyncio REPL on ferroloop.
"""


def _install() -> None:
    import ferroloop

    ferroloop._set_policy_quietly(ferroloop.EventLoopPolicy())


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
    if args[0] == "-m":
        if len(args) < 2:
            sys.stderr.write(USAGE)
            raise SystemExit(2)
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return
    script = args[0]
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
