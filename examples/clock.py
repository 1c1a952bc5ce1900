"""Display the current date a few times with call_later().

Run through `python -m ferroloop examples/clock.py`: the unmodified asyncio program gets
ferroloop as its loop.
"""

import asyncio
import datetime


def display_date(end_time, loop, done):
    print(datetime.datetime.now().isoformat(timespec="milliseconds"))
    if loop.time() + 0.25 >= end_time:
        done.set_result(None)
        return
    loop.call_later(0.25, display_date, end_time, loop, done)


async def main():
    loop = asyncio.get_running_loop()
    print("loop:", type(loop).__module__)
    done = loop.create_future()
    loop.call_soon(display_date, loop.time() + 1.0, loop, done)
    await done


asyncio.run(main())
