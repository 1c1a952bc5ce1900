"""ferroloop's handle classes: asyncio's own, with the loop filling their slots natively."""

from __future__ import annotations

import asyncio

from . import _ferroloop

__all__ = ["Handle", "TimerHandle"]


class Handle(asyncio.Handle):
    """A callback scheduled by :meth:`Loop.call_soon` (an :class:`asyncio.Handle`)."""

    __slots__ = ()

    if not hasattr(asyncio.Handle, "get_context"):

        def get_context(self):
            """The :class:`contextvars.Context` the callback runs in (Python 3.12 API)."""
            return self._context


class TimerHandle(asyncio.TimerHandle):
    """A callback scheduled by :meth:`Loop.call_later` / :meth:`Loop.call_at`."""

    __slots__ = ()

    if not hasattr(asyncio.TimerHandle, "get_context"):

        def get_context(self):
            """The :class:`contextvars.Context` the callback runs in (Python 3.12 API)."""
            return self._context


_ferroloop._install_handle_types(Handle, TimerHandle)
