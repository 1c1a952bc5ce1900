"""ferroloop's handle classes.

``Handle`` and ``TimerHandle`` are native subclasses of :class:`asyncio.Handle` and
:class:`asyncio.TimerHandle` with exactly their layout: every handle the loop returns is a
real asyncio handle, filled and run natively.
"""

from __future__ import annotations

from ._ferroloop import Handle, TimerHandle

__all__ = ["Handle", "TimerHandle"]
