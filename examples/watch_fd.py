"""Watch a file descriptor for read events with add_reader()."""

import asyncio
import socket

import ferroloop


async def main():
    loop = asyncio.get_running_loop()
    rsock, wsock = socket.socketpair()
    received = loop.create_future()

    def reader():
        data = rsock.recv(100)
        print("Received:", data.decode())
        loop.remove_reader(rsock)
        received.set_result(data)

    loop.add_reader(rsock, reader)
    loop.call_soon(wsock.send, b"abc")
    try:
        await received
    finally:
        rsock.close()
        wsock.close()


ferroloop.run(main())
