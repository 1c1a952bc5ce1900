"""Networking orchestration: ``create_connection``, ``create_server``, the Unix and
datagram variants, ``start_tls``, ``sendfile`` and the ``Server`` object.

Mirrors asyncio.base_events (create_*, sendfile, start_tls, Server),
asyncio.selector_events (_start_serving, _accept_connection, _sendfile_native) and
asyncio.unix_events (create_unix_*). This is the cold, coroutine-shaped part only: the
transports themselves (``_make_socket_transport``, ``_make_datagram_transport``) come
from the Rust core.

Python 3.14's asyncio is the model on every supported Python (3.10+): features newer than
the running Python (``all_errors=``, ``keep_alive=``, ``cleanup_socket=``,
``Server.close_clients()``...) are available everywhere. Where asyncio changed an
existing behaviour or message between versions, ferroloop follows the running Python's
asyncio (marked ``follows the running Python`` below), as the rest of ferroloop does.
"""

from __future__ import annotations

import builtins
import collections.abc
import errno
import itertools
import os
import socket
import stat
import sys
import warnings
import weakref
from asyncio import (
    base_events,
    constants,
    events,
    exceptions,
    protocols,
    sslproto,
    staggered,
    tasks,
    trsock,
)

from . import _ferroloop

try:
    import ssl as _ssl
except ImportError:  # pragma: no cover
    _ssl = None

__all__ = ["NetworkMixin", "Server"]


def _logger():
    # Looked up at each use, as asyncio's own module global is: tests and applications
    # patch ``asyncio.base_events.logger``.
    return base_events.logger


_HAS_IPv6 = hasattr(socket, "AF_INET6")

# An argument not given (Python 3.10's datagram ``reuse_address``).
_UNSET = object()

# Python 3.10 has no ExceptionGroup: there ``all_errors=True`` raises what
# ``all_errors=False`` raises (the single OSError or the "Multiple exceptions" one).
_ExceptionGroup = getattr(builtins, "ExceptionGroup", None)

# Python 3.10's SSLProtocol has no ssl_shutdown_timeout (TLS shutdown is not timed there).
_SSL_HAS_SHUTDOWN_TIMEOUT = sys.version_info >= (3, 11)

# Follows the running Python: from 3.13, create_server() skips an address it cannot
# bind for EADDRNOTAVAIL (assuming its family is not enabled); before, that fails it.
_BIND_SKIPS_UNAVAILABLE = sys.version_info >= (3, 13)

# Follows the running Python: from 3.13, create_server() and create_connection() report
# a failed bind with str(err) ("[errno 98] address already in use"), before with
# err.strerror.
_BIND_MESSAGE_WITH_ERRNO = sys.version_info >= (3, 13)

# Follows the running Python: cleanup_socket= is new in 3.13 with the default True;
# asyncio before 3.13 leaves the socket file behind, so that stays the default there.
_CLEANUP_SOCKET_DEFAULT = sys.version_info >= (3, 13)

# Follows the running Python: before 3.12.1, Server.wait_closed() returns immediately if
# the server is already closed, even with live connections; from 3.12.1 it waits for them.
_WAIT_CLOSED_WAITS_FOR_CLIENTS = sys.version_info >= (3, 12, 1)


def _datagram_sock_message() -> str:
    # NOTE: gh-114887 (3.13, backported to some 3.11/3.12 releases) made
    #       create_datagram_endpoint() reject only SOCK_STREAM sockets, with a new
    #       message. ferroloop always applies the new check and uses the message the
    #       running Python's asyncio uses, read from its code constants once.
    code = base_events.BaseEventLoop.create_datagram_endpoint.__code__
    if any(isinstance(c, str) and c.startswith("A UDP Socket") for c in code.co_consts):
        return "A UDP Socket was expected, got "
    return "A datagram socket was expected, got "


_DATAGRAM_SOCK_MESSAGE = _datagram_sock_message()


def _check_ssl_socket(sock) -> None:
    if _ssl is not None and isinstance(sock, _ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


def _set_reuseport(sock) -> None:
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port not supported by socket module")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        raise ValueError(
            "reuse_port not supported by socket module, SO_REUSEPORT defined but not implemented."
        ) from None


def _is_abstract_unix_path(path) -> bool:
    # str and bytes paths are supported; an abstract name starts with a NUL byte.
    return not path or path[0] in (0, "\x00")


def _remove_stale_unix_socket(path) -> None:
    """Remove a socket file left at ``path`` (any other kind of file stays)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        # The directory may have permissions only to create the socket.
        _logger().error("Unable to check or remove stale UNIX socket %r: %r", path, err)


def _bind_error(sa, err: OSError) -> OSError:
    reason = str(err) if _BIND_MESSAGE_WITH_ERRNO else (err.strerror or str(err))
    return OSError(err.errno, f"error while attempting to bind on address {sa!r}: {reason.lower()}")


class _SSLProtocol310(sslproto.SSLProtocol):
    """Python 3.10's SSLProtocol with 3.11's ``ssl_shutdown_timeout``: a TLS shutdown
    (``close()``) that the peer has not answered in time ends the connection with
    ``TimeoutError("SSL shutdown timed out")``, as on 3.11 (3.10 waits for the peer)."""

    def __init__(self, *args, ssl_shutdown_timeout=None, **kwargs):
        if ssl_shutdown_timeout is None:
            ssl_shutdown_timeout = 30.0  # 3.11's constants.SSL_SHUTDOWN_TIMEOUT
        elif ssl_shutdown_timeout <= 0:
            raise ValueError(
                f"ssl_shutdown_timeout should be a positive number, got {ssl_shutdown_timeout}"
            )
        super().__init__(*args, **kwargs)
        self._ssl_shutdown_timeout = ssl_shutdown_timeout
        self._shutdown_timeout_handle = None

    def _start_shutdown(self):
        super()._start_shutdown()
        if (
            self._in_shutdown
            and self._shutdown_timeout_handle is None
            and self._transport is not None
        ):
            self._shutdown_timeout_handle = self._loop.call_later(
                self._ssl_shutdown_timeout, self._check_shutdown_timeout
            )

    def _check_shutdown_timeout(self):
        self._shutdown_timeout_handle = None
        if self._transport is not None:
            self._transport._force_close(TimeoutError("SSL shutdown timed out"))

    def connection_lost(self, exc):
        if self._shutdown_timeout_handle is not None:
            self._shutdown_timeout_handle.cancel()
            self._shutdown_timeout_handle = None
        super().connection_lost(exc)


# The SSL protocol the loop's TLS transports use (3.10: with 3.11's shutdown timer).
_SSLProtocol = sslproto.SSLProtocol if _SSL_HAS_SHUTDOWN_TIMEOUT else _SSLProtocol310


# ---- Server ----------------------------------------------------------------------------


class Server(events.AbstractServer):
    """A listening server: what ``create_server()`` / ``create_unix_server()`` return.

    asyncio 3.14's ``Server`` on every Python: ``close_clients()``, ``abort_clients()``
    and ``async with`` everywhere."""

    __module__ = "ferroloop"

    def __init__(
        self,
        loop,
        sockets,
        protocol_factory,
        ssl_context,
        backlog,
        ssl_handshake_timeout,
        ssl_shutdown_timeout=None,
    ):
        self._loop = loop
        self._sockets = sockets
        # Native stream transports (all that this loop makes) are only counted: the loop
        # finds them when they are to be closed (_server_clients), and one that is
        # collected unclosed detaches itself. Anything else is kept in a WeakSet, so that
        # an abandoned transport can still be detected (and warned about) by its own
        # finalizer.
        self._native_clients = 0
        self._clients = weakref.WeakSet()
        # Transports that attach without passing themselves (asyncio < 3.12 selector
        # transports call ``server._attach()`` with no argument): only counted.
        self._anonymous_clients = 0
        # close_clients() / abort_clients() raised for the closed loop (once, as asyncio).
        self._closed_loop_reported = False
        self._waiters = []
        self._protocol_factory = protocol_factory
        self._backlog = backlog
        self._ssl_context = ssl_context
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._ssl_shutdown_timeout = ssl_shutdown_timeout
        self._serving = False
        self._serving_forever_fut = None
        # Unix listening sockets whose file close() removes (cleanup_socket=True):
        # socket -> (path, inode at bind time).
        self._unix_cleanup = {}

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} sockets={self.sockets!r}>"

    def _client_count(self) -> int:
        return self._native_clients + len(self._clients) + self._anonymous_clients

    def _attach(self, transport=None) -> None:
        """Called by a transport accepted by this server, when it is created."""
        assert self._sockets is not None
        if transport is None:
            self._anonymous_clients += 1
        elif self._loop._is_native_stream(transport):
            self._native_clients += 1
        else:
            self._clients.add(transport)

    def _detach(self, transport=None) -> None:
        """Called by a transport accepted by this server, after connection_lost() (or
        when collected unclosed)."""
        if transport is None:
            self._anonymous_clients -= 1
        elif self._loop._is_native_stream(transport):
            self._native_clients -= 1
        else:
            self._clients.discard(transport)
        if self._client_count() == 0 and self._sockets is None:
            self._wakeup()

    def _wakeup(self) -> None:
        waiters = self._waiters
        self._waiters = None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def _start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        for sock in self._sockets:
            sock.listen(self._backlog)
            self._loop._start_serving(
                self._protocol_factory,
                sock,
                self._ssl_context,
                self,
                self._backlog,
                self._ssl_handshake_timeout,
                self._ssl_shutdown_timeout,
            )

    def get_loop(self):
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple:
        if self._sockets is None:
            return ()
        return tuple(trsock.TransportSocket(s) for s in self._sockets)

    def close(self) -> None:
        """Stop listening and close the listening sockets; accepted connections stay
        open. Idempotent."""
        sockets = self._sockets
        if sockets is None:
            return
        self._sockets = None
        for sock in sockets:
            self._loop._stop_serving(sock)
            cleanup = self._unix_cleanup.pop(sock, None)
            if cleanup is not None:
                _remove_unix_socket_file(*cleanup)
        self._serving = False
        fut = self._serving_forever_fut
        if fut is not None and not fut.done():
            fut.cancel()
            self._serving_forever_fut = None
        if self._client_count() == 0:
            self._wakeup()

    def _all_clients(self) -> list:
        clients = list(self._clients)
        if self._native_clients:
            if self._loop.is_closed():
                # The closed loop no longer lists its transports. Closing the first of
                # them raises this (its close() calls the closed loop's call_soon) and
                # leaves it closing, so asyncio raises once, then finds nothing to do.
                if self._closed_loop_reported:
                    return clients
                self._closed_loop_reported = True
                raise RuntimeError("Event loop is closed")
            clients += self._loop._server_clients(self)
        return clients

    def close_clients(self) -> None:
        """Close every connection accepted by this server."""
        for transport in self._all_clients():
            transport.close()

    def abort_clients(self) -> None:
        """Abort every connection accepted by this server."""
        for transport in self._all_clients():
            transport.abort()

    async def start_serving(self) -> None:
        """Start accepting connections (idempotent)."""
        self._start_serving()
        # Skip one loop iteration so that the listening sockets' readers are in place.
        await tasks.sleep(0)

    async def serve_forever(self) -> None:
        """Accept connections until cancelled; cancelling closes the server (not its
        connections) and waits for wait_closed()."""
        if self._serving_forever_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._serving_forever_fut = self._loop.create_future()
        try:
            await self._serving_forever_fut
        except exceptions.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever_fut = None

    async def wait_closed(self) -> None:
        """Wait until the server is closed and all its connections are dropped (before
        Python 3.12.1, as asyncio there: return at once if the server is closed)."""
        # _wakeup() sets _waiters to None once both conditions hold.
        if self._waiters is None:
            return
        if not _WAIT_CLOSED_WAITS_FOR_CLIENTS and self._sockets is None:
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter


def _remove_unix_socket_file(path, inode) -> None:
    """cleanup_socket: remove ``path`` if it is still the file the server bound."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        _logger().error("Unable to clean up listening UNIX socket %r: %r", path, err)


# ---- sendfile fallback -------------------------------------------------------------------


class _SendfileFallbackProtocol(protocols.Protocol):
    """Stands in for the transport's protocol while loop.sendfile() writes the file
    through transport.write(): reading is paused and pause/resume_writing drive
    drain(). asyncio's own (base_events._SendfileFallbackProtocol) requires an
    asyncio ``_FlowControlMixin`` transport; this one only uses the Transport API (and
    ``_protocol_paused`` when the transport has it)."""

    def __init__(self, loop, transport):
        self._loop = loop
        self._transport = transport
        self._proto = transport.get_protocol()
        self._should_resume_reading = transport.is_reading()
        self._should_resume_writing = bool(getattr(transport, "_protocol_paused", False))
        transport.pause_reading()
        transport.set_protocol(self)
        self._write_ready_fut = loop.create_future() if self._should_resume_writing else None

    async def drain(self) -> None:
        if self._transport.is_closing():
            raise ConnectionError("Connection closed by peer")
        fut = self._write_ready_fut
        if fut is not None:
            await fut

    def connection_made(self, transport):
        raise RuntimeError("Invalid state: connection should have been established already.")

    def connection_lost(self, exc):
        fut = self._write_ready_fut
        if fut is not None and not fut.done():
            # The whole file was not sent: a disconnection is always an error here.
            fut.set_exception(
                exc if exc is not None else ConnectionError("Connection is closed by peer")
            )
        self._proto.connection_lost(exc)

    def pause_writing(self):
        if self._write_ready_fut is None:
            self._write_ready_fut = self._loop.create_future()

    def resume_writing(self):
        fut = self._write_ready_fut
        if fut is None:
            return
        if not fut.done():
            fut.set_result(False)
        self._write_ready_fut = None

    def data_received(self, data):
        raise RuntimeError("Invalid state: reading should be paused")

    def eof_received(self):
        raise RuntimeError("Invalid state: reading should be paused")

    def restore(self) -> None:
        self._transport.set_protocol(self._proto)
        if self._should_resume_reading:
            self._transport.resume_reading()
        if self._write_ready_fut is not None:
            # Nobody waits for it any more: the protocol is switched back.
            self._write_ready_fut.cancel()
        if self._should_resume_writing:
            self._proto.resume_writing()


# ---- the loop methods --------------------------------------------------------------------


class NetworkMixin:
    """The networking methods of ``ferroloop.Loop`` (asyncio 3.14 semantics).

    Relies on the loop providing ``_make_socket_transport``, ``_make_datagram_transport``,
    ``_ensure_resolved``, ``_check_closed`` and the public loop API."""

    # ---- TCP client ------------------------------------------------------------------

    async def _connect_sock(self, exceptions, addr_info, local_addr_infos=None):
        """Create, bind and connect one socket. Its OSErrors are appended to a list
        of its own in ``exceptions``; the socket is closed on every failure."""
        my_exceptions = []
        exceptions.append(my_exceptions)
        family, type_, proto, _, address = addr_info
        sock = None
        try:
            sock = socket.socket(family=family, type=type_, proto=proto)
            sock.setblocking(False)
            if local_addr_infos is not None:
                for lfamily, _, _, _, laddr in local_addr_infos:
                    if lfamily != family:  # local addresses of another family
                        continue
                    try:
                        sock.bind(laddr)
                        break
                    except OSError as exc:
                        my_exceptions.append(_bind_error(laddr, exc))
                else:  # every bind failed, or no local address of this family
                    if my_exceptions:
                        raise my_exceptions.pop()
                    raise OSError(f"no matching local address with {family=} found")
            await self.sock_connect(sock, address)
            return sock
        except OSError as exc:
            my_exceptions.append(exc)
            if sock is not None:
                sock.close()
            raise
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        finally:
            # Break the reference cycle through the traceback.
            exceptions = my_exceptions = None

    async def _happy_eyeballs(self, exceptions, infos, laddr_infos, delay):
        """Race the connection attempts with asyncio.staggered.staggered_race (RFC 8305);
        return the connected socket or None."""
        connected = []

        async def attempt(addrinfo):
            sock = await self._connect_sock(exceptions, addrinfo, laddr_infos)
            connected.append(sock)
            return sock

        winner = None
        try:
            winner = (
                await staggered.staggered_race(
                    # (a lambda, not functools.partial: that would keep a reference
                    # to the attempt's arguments)
                    (lambda addrinfo=addrinfo: attempt(addrinfo) for addrinfo in infos),
                    delay,
                    loop=self,
                )
            )[0]
            return winner
        finally:
            # NOTE: a socket connected by an attempt that did not win (the race
            #       cancelled, or two attempts finishing in the same iteration on
            #       Pythons whose staggered_race does not cancel them) is closed here.
            for sock in connected:
                if sock is not winner:
                    sock.close()
            connected.clear()

    async def create_connection(
        self,
        protocol_factory,
        host=None,
        port=None,
        *,
        ssl=None,
        family=0,
        proto=0,
        flags=0,
        sock=None,
        local_addr=None,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        happy_eyeballs_delay=None,
        interleave=None,
        all_errors=False,
    ):
        """Open a streaming transport connection to ``host``:``port`` (or over
        ``sock``) and return ``(transport, protocol)``."""
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        if server_hostname is None and ssl:
            # The host is the default server_hostname; without a host one must be
            # given (server_hostname="" skips the hostname check).
            if not host:
                raise ValueError("You must set server_hostname when using ssl without a host")
            server_hostname = host
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if sock is not None:
            _check_ssl_socket(sock)
        if happy_eyeballs_delay is not None and interleave is None:
            # Happy Eyeballs interleaves the address families by default.
            interleave = 1

        owned = False
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            infos = await self._ensure_resolved(
                (host, port),
                family=family,
                type=socket.SOCK_STREAM,
                proto=proto,
                flags=flags,
                loop=self,
            )
            if not infos:
                raise OSError("getaddrinfo() returned empty list")
            if local_addr is not None:
                laddr_infos = await self._ensure_resolved(
                    local_addr,
                    family=family,
                    type=socket.SOCK_STREAM,
                    proto=proto,
                    flags=flags,
                    loop=self,
                )
                if not laddr_infos:
                    raise OSError("getaddrinfo() returned empty list")
            else:
                laddr_infos = None
            if interleave:
                infos = base_events._interleave_addrinfos(infos, interleave)

            exceptions = []
            try:
                if happy_eyeballs_delay is None:
                    for addrinfo in infos:
                        try:
                            sock = await self._connect_sock(exceptions, addrinfo, laddr_infos)
                            break
                        except OSError:
                            continue
                else:
                    sock = await self._happy_eyeballs(
                        exceptions, infos, laddr_infos, happy_eyeballs_delay
                    )
                if sock is None:
                    raise _connection_error([e for sub in exceptions for e in sub], all_errors)
            finally:
                exceptions = None
            owned = True
        else:
            if sock is None:
                raise ValueError("host and port was not specified and no sock specified")
            if sock.type != socket.SOCK_STREAM:
                # Any stream socket, AF_UNIX included (create_unix_connection's job,
                # but asyncio has always accepted it here).
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")

        transport, protocol = await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            _close_sock=owned,
        )
        if self.get_debug():
            # The transport's socket: a TLS transport does not expose the raw one.
            sock = transport.get_extra_info("socket")
            _logger().debug(
                "%r connected to %s:%r: (%r, %r)", sock, host, port, transport, protocol
            )
        return transport, protocol

    async def _create_connection_transport(
        self,
        sock,
        protocol_factory,
        ssl,
        server_hostname,
        server_side=False,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        *,
        _close_sock=False,
    ):
        """Wrap a connected socket in a (TLS) transport; wait for connection_made()
        (and the handshake). ``_close_sock``: the socket is ours, close it if no
        transport takes it over."""
        transport = None
        try:
            sock.setblocking(False)
            protocol = protocol_factory()
            waiter = self.create_future()
            if ssl:
                sslcontext = None if isinstance(ssl, bool) else ssl
                transport = self._make_ssl_transport(
                    sock,
                    protocol,
                    sslcontext,
                    waiter,
                    server_side=server_side,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=ssl_handshake_timeout,
                    ssl_shutdown_timeout=ssl_shutdown_timeout,
                )
            else:
                transport = self._make_socket_transport(sock, protocol, waiter)
        except BaseException:
            if _close_sock:
                sock.close()
            raise
        try:
            await waiter
        except BaseException:
            # The transport owns the socket now: closing it closes the socket.
            transport.close()
            raise
        return transport, protocol

    async def connect_accepted_socket(
        self,
        protocol_factory,
        sock,
        *,
        ssl=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Wrap an already accepted connection in a transport (the server side)."""
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        _check_ssl_socket(sock)
        transport, protocol = await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            "",
            server_side=True,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        if self.get_debug():
            sock = transport.get_extra_info("socket")
            _logger().debug("%r handled: (%r, %r)", sock, transport, protocol)
        return transport, protocol

    # ---- TLS ---------------------------------------------------------------------------

    def _make_ssl_transport(
        self,
        rawsock,
        protocol,
        sslcontext,
        waiter=None,
        *,
        server_side=False,
        server_hostname=None,
        extra=None,
        server=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """A TLS transport: asyncio's SSLProtocol over a plain socket transport."""
        ssl_protocol = _SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    async def start_tls(
        self,
        transport,
        protocol,
        sslcontext,
        *,
        server_side=False,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Upgrade ``transport`` to TLS; return the new transport ``protocol`` must use
        from now on."""
        if _ssl is None:  # pragma: no cover
            raise RuntimeError("Python ssl module is not available")
        if not isinstance(sslcontext, _ssl.SSLContext):
            raise TypeError(
                f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
            )
        if not getattr(transport, "_start_tls_compatible", False):
            raise TypeError(f"transport {transport!r} is not supported by start_tls()")

        waiter = self.create_future()
        ssl_protocol = _SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=False,
        )
        # Pause first, so that ssl_protocol.data_received() cannot run before
        # ssl_protocol.connection_made().
        transport.pause_reading()
        transport.set_protocol(ssl_protocol)
        conmade_cb = self.call_soon(ssl_protocol.connection_made, transport)
        resume_cb = self.call_soon(transport.resume_reading)
        try:
            await waiter
        except BaseException:
            transport.close()
            conmade_cb.cancel()
            resume_cb.cancel()
            raise
        return ssl_protocol._app_transport

    # ---- TCP server ----------------------------------------------------------------------

    async def _create_server_getaddrinfo(self, host, port, family, flags):
        infos = await self._ensure_resolved(
            (host, port), family=family, type=socket.SOCK_STREAM, flags=flags, loop=self
        )
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        return infos

    async def create_server(
        self,
        protocol_factory,
        host=None,
        port=None,
        *,
        family=socket.AF_UNSPEC,
        flags=socket.AI_PASSIVE,
        sock=None,
        backlog=100,
        ssl=None,
        reuse_address=None,
        reuse_port=None,
        keep_alive=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        start_serving=True,
    ):
        """Create a TCP server listening on every address ``host`` (a name, a
        sequence of names, or None/"" for all interfaces) resolves to, or on ``sock``.
        Return a :class:`Server`."""
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and ssl is None:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and ssl is None:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if sock is not None:
            _check_ssl_socket(sock)

        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            if reuse_address is None:
                reuse_address = os.name == "posix" and sys.platform != "cygwin"
            if host == "":
                hosts = [None]
            elif isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
                hosts = [host]
            else:
                hosts = host
            infos = await tasks.gather(
                *[self._create_server_getaddrinfo(h, port, family, flags) for h in hosts]
            )
            infos = set(itertools.chain.from_iterable(infos))
            sockets = self._bind_server_sockets(infos, reuse_address, reuse_port, keep_alive)
        else:
            if sock is None:
                raise ValueError("Neither host/port nor sock were specified")
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")
            sockets = [sock]

        server = Server(
            self,
            sockets,
            protocol_factory,
            ssl,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )
        await _start_server(server, sockets, start_serving)
        if self.get_debug():
            _logger().info("%r is serving", server)
        return server

    def _bind_server_sockets(self, infos, reuse_address, reuse_port, keep_alive) -> list:
        """One bound (not yet listening) socket per address; all closed on failure."""
        sockets = []
        completed = False
        try:
            for af, socktype, proto, _canonname, sa in infos:
                try:
                    sock = socket.socket(af, socktype, proto)
                except OSError:
                    # Assume a bad family/type/protocol combination.
                    if self.get_debug():
                        _logger().warning(
                            "create_server() failed to create socket.socket(%r, %r, %r)",
                            af,
                            socktype,
                            proto,
                            exc_info=True,
                        )
                    continue
                sockets.append(sock)
                if reuse_address:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
                # Linux 6.12.9+ refuses SO_REUSEPORT on families other than INET/INET6.
                if reuse_port and af in (socket.AF_INET, socket.AF_INET6):
                    _set_reuseport(sock)
                if keep_alive:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
                # No dual-stack: an IPv6 socket does not also take the IPv4 traffic
                # (Linux's default), which has a socket of its own.
                if _HAS_IPv6 and af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
                try:
                    sock.bind(sa)
                except OSError as err:
                    error = _bind_error(sa, err)
                    if _BIND_SKIPS_UNAVAILABLE and err.errno == errno.EADDRNOTAVAIL:
                        # Assume the address family is not enabled (bpo-30945).
                        sockets.pop()
                        sock.close()
                        if self.get_debug():
                            _logger().warning(error.strerror)
                        continue
                    raise error from None
            if not sockets:
                raise OSError(
                    f"could not bind on any address out of {[info[4] for info in infos]!r}"
                )
            completed = True
        finally:
            if not completed:
                for sock in sockets:
                    sock.close()
        return sockets

    # ---- Unix sockets --------------------------------------------------------------------

    async def create_unix_connection(
        self,
        protocol_factory,
        path=None,
        *,
        ssl=None,
        sock=None,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Open a Unix stream connection to ``path`` (or over ``sock``)."""
        assert server_hostname is None or isinstance(server_hostname, str)
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")

        owned = False
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
            owned = True
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            sock.setblocking(False)

        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            _close_sock=owned,
        )

    async def create_unix_server(
        self,
        protocol_factory,
        path=None,
        *,
        sock=None,
        backlog=100,
        ssl=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        start_serving=True,
        cleanup_socket=_CLEANUP_SOCKET_DEFAULT,
    ):
        """Create a Unix stream server on ``path`` (a socket file left there is
        replaced; a name starting with NUL is in Linux's abstract namespace) or on
        ``sock``. With ``cleanup_socket``, Server.close() removes the socket file if it
        is still the one bound here."""
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")

        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if not _is_abstract_unix_path(path):
                    _remove_stale_unix_socket(path)
                try:
                    sock.bind(path)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        # Say which address is in use.
                        raise OSError(
                            errno.EADDRINUSE, f"Address {path!r} is already in use"
                        ) from None
                    raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")

        cleanup = None
        if cleanup_socket:
            name = sock.getsockname()
            if not _is_abstract_unix_path(name):
                try:
                    cleanup = (name, os.stat(name).st_ino)
                except FileNotFoundError:
                    pass

        server = Server(
            self,
            [sock],
            protocol_factory,
            ssl,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )
        if cleanup is not None:
            server._unix_cleanup[sock] = cleanup
        await _start_server(server, [sock], start_serving)
        return server

    # ---- serving: accepting connections ----------------------------------------------------

    def _start_serving(
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        if sslcontext is None:
            # Plain connections are accepted natively (no socket object, task or extra
            # dict per connection until asked for).
            self.add_reader(
                sock.fileno(), _ferroloop._Acceptor(self, sock, protocol_factory, server, backlog)
            )
            return
        self.add_reader(
            sock.fileno(),
            self._accept_connection,
            protocol_factory,
            sock,
            sslcontext,
            server,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )

    def _resume_accepting(self, protocol_factory, sock, *args):
        # The server may have been closed during the retry delay.
        if sock.fileno() != -1:
            self._start_serving(protocol_factory, sock, *args)

    def _accept_exhausted(
        self,
        exc,
        protocol_factory,
        sock,
        server=None,
        backlog=100,
        sslcontext=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """accept() failed for want of a system resource (EMFILE & co.): there is nowhere
        to send the error but the exception handler. The socket stays readable (Linux), so
        stop watching it for a while (asyncio's ACCEPT_RETRY_DELAY)."""
        self.call_exception_handler(
            {
                "message": "socket.accept() out of system resource",
                "exception": exc,
                "socket": trsock.TransportSocket(sock),
            }
        )
        self.remove_reader(sock.fileno())
        self.call_later(
            constants.ACCEPT_RETRY_DELAY,
            self._resume_accepting,
            protocol_factory,
            sock,
            sslcontext,
            server,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )

    def _accept_connection(
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """The listening socket of a TLS server is readable: accept up to ``backlog``
        connections (bpo-27906) and build a transport for each in a task."""
        for _ in range(backlog):
            try:
                conn, addr = sock.accept()
                if self.get_debug():
                    _logger().debug("%r got a new connection from %r: %r", server, addr, conn)
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # the accept queue is empty
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise  # the loop reports it and goes on
                self._accept_exhausted(
                    exc,
                    protocol_factory,
                    sock,
                    server,
                    backlog,
                    sslcontext,
                    ssl_handshake_timeout,
                    ssl_shutdown_timeout,
                )
                return
            else:
                self.create_task(
                    self._accept_connection2(
                        protocol_factory,
                        conn,
                        {"peername": addr},
                        sslcontext,
                        server,
                        ssl_handshake_timeout,
                        ssl_shutdown_timeout,
                    )
                )

    async def _accept_connection2(
        self,
        protocol_factory,
        conn,
        extra,
        sslcontext=None,
        server=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        protocol = None
        transport = None
        try:
            protocol = protocol_factory()
            waiter = self.create_future()
            if sslcontext:
                transport = self._make_ssl_transport(
                    conn,
                    protocol,
                    sslcontext,
                    waiter=waiter,
                    server_side=True,
                    extra=extra,
                    server=server,
                    ssl_handshake_timeout=ssl_handshake_timeout,
                    ssl_shutdown_timeout=ssl_shutdown_timeout,
                )
            else:
                transport = self._make_socket_transport(
                    conn, protocol, waiter=waiter, extra=extra, server=server
                )
            try:
                await waiter
            except BaseException:
                transport.close()
                # gh-109534: the exception in the waiter would keep the protocol alive.
                waiter = None
                raise
            # From here on the connection is the protocol's business.
        except (SystemExit, KeyboardInterrupt):
            if transport is None:
                conn.close()
            raise
        except BaseException as exc:
            # A transport owns the socket once made: it closes it when its connection is
            # lost, which forgets the descriptor number (closing it here first could let
            # a new descriptor take the number and be forgotten instead).
            if transport is None:
                conn.close()
            if self.get_debug():
                context = {
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc,
                }
                if protocol is not None:
                    context["protocol"] = protocol
                if transport is not None:
                    context["transport"] = transport
                self.call_exception_handler(context)

    def _stop_serving(self, sock):
        fd = sock.fileno()
        if fd != -1:
            self.remove_reader(fd)
        sock.close()

    # ---- UDP -------------------------------------------------------------------------------

    async def create_datagram_endpoint(
        self,
        protocol_factory,
        local_addr=None,
        remote_addr=None,
        *,
        family=0,
        proto=0,
        flags=0,
        reuse_port=None,
        allow_broadcast=None,
        sock=None,
    ):
        """Create a datagram endpoint bound to ``local_addr`` and/or connected to
        ``remote_addr`` (or over ``sock``)."""
        return await self._create_datagram_endpoint(
            protocol_factory,
            local_addr,
            remote_addr,
            family=family,
            proto=proto,
            flags=flags,
            reuse_port=reuse_port,
            allow_broadcast=allow_broadcast,
            sock=sock,
        )

    if sys.version_info < (3, 11):

        async def create_datagram_endpoint(
            self,
            protocol_factory,
            local_addr=None,
            remote_addr=None,
            *,
            family=0,
            proto=0,
            flags=0,
            reuse_address=_UNSET,
            reuse_port=None,
            allow_broadcast=None,
            sock=None,
        ):
            """Create a datagram endpoint bound to ``local_addr`` and/or connected to
            ``remote_addr`` (or over ``sock``). ``reuse_address`` (3.10 only) must be
            false: SO_REUSEADDR on UDP lets other processes take the port's traffic."""
            return await self._create_datagram_endpoint(
                protocol_factory,
                local_addr,
                remote_addr,
                family=family,
                proto=proto,
                flags=flags,
                reuse_address=reuse_address,
                reuse_port=reuse_port,
                allow_broadcast=allow_broadcast,
                sock=sock,
            )

    async def _create_datagram_endpoint(
        self,
        protocol_factory,
        local_addr,
        remote_addr,
        *,
        family,
        proto,
        flags,
        reuse_address=_UNSET,
        reuse_port,
        allow_broadcast,
        sock,
    ):
        owned = False
        if sock is not None:
            if sock.type == socket.SOCK_STREAM:
                raise ValueError(f"{_DATAGRAM_SOCK_MESSAGE}{sock!r}")
            if (
                local_addr
                or remote_addr
                or family
                or proto
                or flags
                or reuse_port
                or allow_broadcast
            ):
                # Name the offending arguments.
                opts = {
                    "local_addr": local_addr,
                    "remote_addr": remote_addr,
                    "family": family,
                    "proto": proto,
                    "flags": flags,
                    "reuse_port": reuse_port,
                    "allow_broadcast": allow_broadcast,
                }
                problems = ", ".join(f"{k}={v}" for k, v in opts.items() if v)
                raise ValueError(
                    "socket modifier keyword arguments can not be used "
                    f"when sock is specified. ({problems})"
                )
            sock.setblocking(False)
            r_addr = None
        else:
            addr_pairs_info = await self._datagram_addr_pairs(
                local_addr, remote_addr, family, proto, flags
            )
            if reuse_address is not _UNSET:  # Python 3.10's argument (bpo-37228)
                if reuse_address:
                    raise ValueError(
                        "Passing `reuse_address=True` is no longer supported, as the "
                        "usage of SO_REUSEPORT in UDP poses a significant security concern."
                    )
                warnings.warn(
                    "The *reuse_address* parameter has been deprecated as of 3.5.10 and "
                    "is scheduled for removal in 3.11.",
                    DeprecationWarning,
                    stacklevel=3,
                )
            errors = []
            for (fam, pro), (local_address, remote_address) in addr_pairs_info:
                sock = None
                r_addr = None
                try:
                    sock = socket.socket(family=fam, type=socket.SOCK_DGRAM, proto=pro)
                    if reuse_port:
                        _set_reuseport(sock)
                    if allow_broadcast:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                    sock.setblocking(False)
                    if local_addr:
                        sock.bind(local_address)
                    if remote_addr:
                        # A broadcast endpoint is not connected: sendto() without an
                        # address goes to remote_addr.
                        if not allow_broadcast:
                            await self.sock_connect(sock, remote_address)
                        r_addr = remote_address
                except OSError as exc:
                    if sock is not None:
                        sock.close()
                    errors.append(exc)
                except BaseException:
                    if sock is not None:
                        sock.close()
                    raise
                else:
                    break
            else:
                try:
                    raise errors[0]
                finally:
                    errors = None
            owned = True

        try:
            protocol = protocol_factory()
            waiter = self.create_future()
            transport = self._make_datagram_transport(sock, protocol, r_addr, waiter)
        except BaseException:
            if owned:
                sock.close()
            raise
        if self.get_debug():
            if local_addr:
                _logger().info(
                    "Datagram endpoint local_addr=%r remote_addr=%r created: (%r, %r)",
                    local_addr,
                    remote_addr,
                    transport,
                    protocol,
                )
            else:
                _logger().debug(
                    "Datagram endpoint remote_addr=%r created: (%r, %r)",
                    remote_addr,
                    transport,
                    protocol,
                )
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def _datagram_addr_pairs(self, local_addr, remote_addr, family, proto, flags):
        """The ((family, proto), (local address, remote address)) candidates to try."""
        if not (local_addr or remote_addr):
            if family == 0:
                raise ValueError("unexpected address family")
            return (((family, proto), (None, None)),)
        if hasattr(socket, "AF_UNIX") and family == socket.AF_UNIX:
            for addr in (local_addr, remote_addr):
                if addr is not None and not isinstance(addr, str):
                    raise TypeError("string is expected")
            if local_addr and not _is_abstract_unix_path(local_addr):
                _remove_stale_unix_socket(local_addr)
            return (((family, proto), (local_addr, remote_addr)),)

        # Addresses joined by (family, protocol), in resolution order.
        addr_infos = {}
        for idx, addr in ((0, local_addr), (1, remote_addr)):
            if addr is None:
                continue
            if not (isinstance(addr, tuple) and len(addr) == 2):
                if sys.version_info < (3, 11):
                    raise AssertionError("2-tuple is expected")  # 3.10's assert
                raise TypeError("2-tuple is expected")
            infos = await self._ensure_resolved(
                addr, family=family, type=socket.SOCK_DGRAM, proto=proto, flags=flags, loop=self
            )
            if not infos:
                raise OSError("getaddrinfo() returned empty list")
            for fam, _, pro, _, address in infos:
                addr_infos.setdefault((fam, pro), [None, None])[idx] = address
        # Each address given must have an entry for the (family, proto) pair.
        pairs = [
            (key, pair)
            for key, pair in addr_infos.items()
            if not ((local_addr and pair[0] is None) or (remote_addr and pair[1] is None))
        ]
        if not pairs:
            raise ValueError("can not get address information")
        return pairs

    # ---- sendfile --------------------------------------------------------------------------

    async def sendfile(self, transport, file, offset=0, count=None, *, fallback=True):
        """Send ``file`` over ``transport``; return the number of bytes sent.

        os.sendfile() on a plain socket transport; with ``fallback``, the file is read
        and written through the transport otherwise (TLS, or a file os.sendfile() cannot
        take). The file position is updated, also on error."""
        if transport.is_closing():
            raise RuntimeError("Transport is closing")
        mode = getattr(transport, "_sendfile_compatible", constants._SendfileMode.UNSUPPORTED)
        if mode is constants._SendfileMode.UNSUPPORTED:
            raise RuntimeError(f"sendfile is not supported for transport {transport!r}")
        if mode is constants._SendfileMode.TRY_NATIVE:
            try:
                return await self._sendfile_native(transport, file, offset, count)
            except exceptions.SendfileNotAvailableError:
                if not fallback:
                    raise
        if not fallback:
            raise RuntimeError(
                "fallback is disabled and native sendfile is not supported "
                f"for transport {transport!r}"
            )
        return await self._sendfile_fallback(transport, file, offset, count)

    async def _sendfile_native(self, transp, file, offset, count):
        """os.sendfile() on the transport's socket, once its write buffer is empty and
        with reading paused; transp.write() is refused meanwhile (the empty waiter)."""
        sock = transp.get_extra_info("socket")
        sock = getattr(sock, "_sock", sock)  # the socket inside a TransportSocket
        resume_reading = transp.is_reading()
        transp.pause_reading()
        try:
            empty = transp._make_empty_waiter()
        except BaseException:
            if resume_reading:
                transp.resume_reading()
            raise
        try:
            await empty
            return await self.sock_sendfile(sock, file, offset, count, fallback=False)
        finally:
            transp._reset_empty_waiter()
            if resume_reading:
                transp.resume_reading()

    async def _sendfile_fallback(self, transp, file, offset, count):
        if offset:
            file.seek(offset)
        blocksize = min(count, 16384) if count else 16384
        buf = bytearray(blocksize)
        total_sent = 0
        proto = _SendfileFallbackProtocol(self, transp)
        try:
            while True:
                if count:
                    blocksize = min(count - total_sent, blocksize)
                    if blocksize <= 0:
                        return total_sent
                view = memoryview(buf)[:blocksize]
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    return total_sent  # EOF
                # As asyncio: the wait comes before the write, so a chunk is counted
                # (and the file position set past it) exactly when it was written.
                await proto.drain()
                # NOTE: a copy, as the buffer is refilled next round while the
                #       transport may still hold what it could not send yet.
                transp.write(bytes(view[:read]))
                total_sent += read
        finally:
            if total_sent > 0 and hasattr(file, "seek"):
                file.seek(offset + total_sent)
            proto.restore()


def _connection_error(excs: list, all_errors: bool) -> BaseException:
    """What create_connection() raises when no address could be connected."""
    if all_errors and excs and _ExceptionGroup is not None:
        return _ExceptionGroup("create_connection failed", excs)
    if len(excs) == 1:
        return excs[0]
    if excs:
        # All with the same message: raise one of them.
        model = str(excs[0])
        if all(str(exc) == model for exc in excs):
            return excs[0]
        # Otherwise a combined error, so that the user sees every message.
        return OSError("Multiple exceptions: {}".format(", ".join(str(exc) for exc in excs)))
    # No attempt reported an error (they were all cancelled).
    return TimeoutError("create_connection failed")


async def _start_server(server: Server, sockets: list, start_serving: bool) -> None:
    """Make the listening sockets non-blocking and (if asked) start serving; on any
    failure, including cancellation, the server and its sockets are closed."""
    try:
        for sock in sockets:
            sock.setblocking(False)
        if start_serving:
            server._start_serving()
            # Skip one loop iteration so that the listening sockets' readers are in place.
            await tasks.sleep(0)
    except BaseException:
        server.close()
        raise
