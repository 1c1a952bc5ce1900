"""Hello World with call_soon(), on a ferroloop loop."""

import ferroloop


def hello_world(loop):
    print("Hello World from", type(loop).__module__ + "." + type(loop).__name__)
    loop.stop()


loop = ferroloop.new_event_loop()
loop.call_soon(hello_world, loop)
try:
    loop.run_forever()
finally:
    loop.close()
