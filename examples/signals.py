"""Signal handlers with add_signal_handler(): the program signals itself."""

import asyncio
import functools
import os
import signal

import ferroloop


def ask_exit(signame, loop, stop):
    print(f"got signal {signame}: exit")
    stop.set()


async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signame in ("SIGINT", "SIGTERM"):
        loop.add_signal_handler(
            getattr(signal, signame), functools.partial(ask_exit, signame, loop, stop)
        )
    print(f"pid {os.getpid()}: sending SIGTERM to myself in 0.2 s")
    loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
    await stop.wait()


ferroloop.run(main())
