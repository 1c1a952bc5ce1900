"""Type stubs for the native core of ferroloop."""

import asyncio
import contextvars
import socket
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from typing_extensions import Buffer, disjoint_base, final

_T = TypeVar("_T")

__all__ = [
    "Handle",
    "LoopCore",
    "ReadPipeTransport",
    "TCPTransport",
    "TimerHandle",
    "UDPTransport",
    "UnixTransport",
    "WritePipeTransport",
    "_Acceptor",
    "_DatagramCore",
    "_SockOperation",
    "_StreamCore",
    "__version__",
    "_after_fork_child",
    "_sighandler_noop",
    "_stop_loop_threads",
    "_streams_fed_natively",
    "_threadsafe_waits",
]

__version__: str

@final
class Handle(asyncio.Handle):
    """A callback scheduled with call_soon() (an asyncio.Handle)."""

    def get_context(self) -> contextvars.Context: ...

@final
class TimerHandle(asyncio.TimerHandle):
    """A callback scheduled with call_later() / call_at() (an asyncio.TimerHandle)."""

    def get_context(self) -> contextvars.Context: ...

@final
class _StreamCore:
    """The native state and behaviour behind a stream transport (private)."""

@final
class _Acceptor:
    """The reader of a listening socket: accepts connections natively (private)."""

    def __new__(
        cls,
        lp: LoopCore,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        server: object,
        backlog: int,
    ) -> _Acceptor: ...
    def __call__(self, *args: object, **kwargs: object) -> None: ...
    @property
    def __qualname__(self) -> str: ...  # type: ignore[override]

@final
class _DatagramCore:
    """The native state and behaviour behind a datagram transport (private)."""

@final
class TCPTransport(asyncio.Transport):
    """A TCP connection (an asyncio.Transport)."""

    def _make_empty_waiter(self) -> asyncio.Future[None]: ...
    def _reset_empty_waiter(self) -> None: ...
    def _force_close(self, exc: BaseException | None = None) -> None: ...
    def _fatal_error(self, exc: BaseException, message: str = ...) -> None: ...

@final
class UnixTransport(asyncio.Transport):
    """A Unix stream socket connection (an asyncio.Transport)."""

    def _make_empty_waiter(self) -> asyncio.Future[None]: ...
    def _reset_empty_waiter(self) -> None: ...
    def _force_close(self, exc: BaseException | None = None) -> None: ...
    def _fatal_error(self, exc: BaseException, message: str = ...) -> None: ...

@final
class ReadPipeTransport(asyncio.ReadTransport):
    """The read end of a pipe (an asyncio.ReadTransport)."""

    def _force_close(self, exc: BaseException | None = None) -> None: ...
    def _fatal_error(self, exc: BaseException, message: str = ...) -> None: ...

@final
class WritePipeTransport(asyncio.Transport):
    """The write end of a pipe (an asyncio.Transport, as asyncio's)."""

    def _force_close(self, exc: BaseException | None = None) -> None: ...
    def _fatal_error(self, exc: BaseException, message: str = ...) -> None: ...

@final
class UDPTransport(asyncio.Transport, asyncio.DatagramTransport):
    """A datagram socket (an asyncio.DatagramTransport)."""

    def _force_close(self, exc: BaseException | None = None) -> None: ...
    def _fatal_error(self, exc: BaseException, message: str = ...) -> None: ...

def _sighandler_noop(_signum: Any, _frame: Any) -> None:
    """Dummy Python-level signal handler used with add_signal_handler()."""

def _after_fork_child() -> None:
    """In a forked child: drop a signal wake-up fd that is a ferroloop loop's."""

def _stop_loop_threads() -> None:
    """At exit: stop loops running in other threads at their next callback."""

def _threadsafe_waits() -> tuple[int, int]:
    """Waits of threads posting with call_soon_threadsafe for a loop's batch to end, and
    how many of them were given up (process-wide counts)."""

def _streams_fed_natively() -> int:
    """How many reads this process fed to asyncio's StreamReaders natively, without
    running StreamReaderProtocol.data_received (for tests)."""

@final
class _SockOperation(Coroutine[Any, Any, Any]):
    """The native coroutine returned by the ``sock_*`` methods."""

    @property
    def __name__(self) -> str: ...
    @property
    def __qualname__(self) -> str: ...  # type: ignore[override]
    def __await__(self) -> Generator[Any, None, Any]: ...
    def __next__(self) -> Any: ...
    def send(self, value: Any) -> Any: ...
    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any: ...  # type: ignore[override]
    def close(self) -> None: ...

@disjoint_base
class LoopCore:
    """The native core of :class:`ferroloop.Loop`."""

    slow_callback_duration: float
    @property
    def _clock_resolution(self) -> float: ...
    @property
    def _thread_id(self) -> int | None: ...
    @property
    def _stopping(self) -> bool: ...
    @property
    def _current_handle(self) -> asyncio.Handle | None: ...
    def __new__(cls, *_args: Any, **_kwargs: Any) -> LoopCore: ...
    def time(self) -> float: ...
    def call_soon(
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle: ...
    def call_soon_threadsafe(
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle: ...
    def call_later(
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle: ...
    def call_at(
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle: ...
    def _clock_maybe_replaced(self) -> None: ...
    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None: ...
    def _run_forever_core(self) -> None: ...
    def stop(self) -> None: ...
    def is_running(self) -> bool: ...
    def is_closed(self) -> bool: ...
    def _check_closed(self) -> None: ...
    def close(self) -> None: ...
    def get_debug(self) -> bool: ...
    def set_debug(self, enabled: object) -> None: ...
    def create_future(self) -> asyncio.Future[Any]: ...
    def create_task(self, coro: Coroutine[Any, Any, _T], **kwargs: Any) -> asyncio.Task[_T]: ...
    def set_task_factory(self, factory: Callable[..., Any] | None) -> None: ...
    def get_task_factory(self) -> Callable[..., Any] | None: ...
    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None: ...
    def add_writer(self, fd: Any, callback: Callable[..., object], *args: Any) -> None: ...
    def remove_reader(self, fd: Any) -> bool: ...
    def remove_writer(self, fd: Any) -> bool: ...
    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None: ...
    def remove_signal_handler(self, sig: int) -> bool: ...
    def sock_recv(self, sock: socket.socket, n: int) -> _SockOperation: ...
    def sock_recv_into(self, sock: socket.socket, buf: Buffer) -> _SockOperation: ...
    def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> _SockOperation: ...
    def sock_recvfrom_into(
        self, sock: socket.socket, buf: Buffer, nbytes: int = 0
    ) -> _SockOperation: ...
    def sock_sendall(self, sock: socket.socket, data: Buffer) -> _SockOperation: ...
    def sock_sendto(self, sock: socket.socket, data: Buffer, address: Any) -> _SockOperation: ...
    def sock_accept(self, sock: socket.socket) -> _SockOperation: ...
