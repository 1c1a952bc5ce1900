"""Asynchronous generator hooks and shutdown_asyncgens."""

from __future__ import annotations

import asyncio
import gc
import sys

import pytest


def test_shutdown_asyncgens_finalizes_generators(loop):
    finalized = []

    async def agen(tag):
        try:
            yield 1
            yield 2
        finally:
            finalized.append(tag)

    gens = [agen("a"), agen("b")]

    async def start():
        for g in gens:
            assert await g.__anext__() == 1

    loop.run_until_complete(start())
    assert finalized == []
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert sorted(finalized) == ["a", "b"]


def test_shutdown_asyncgens_with_no_generators(loop):
    loop.run_until_complete(loop.shutdown_asyncgens())


def test_unreferenced_generator_is_closed_by_loop(loop):
    finalized = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)
            finalized.append(True)

    async def main():
        g = agen()
        await g.__anext__()
        del g
        gc.collect()
        for _ in range(10):
            if finalized:
                break
            await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert finalized == [True]


def test_firstiter_after_shutdown_warns(loop):
    async def agen():
        yield 1

    loop.run_until_complete(loop.shutdown_asyncgens())
    g = agen()

    async def main():
        with pytest.warns(ResourceWarning, match=r"was scheduled after loop\.shutdown_asyncgens"):
            await g.__anext__()

    loop.run_until_complete(main())
    loop.run_until_complete(g.aclose())


def test_error_during_shutdown_goes_to_handler(loop, loop_errors):
    async def agen():
        try:
            yield 1
        finally:
            raise ValueError("aclose failed")

    g = agen()

    async def start():
        await g.__anext__()

    loop.run_until_complete(start())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert len(loop_errors) == 1
    ctx = loop_errors.pop()
    assert ctx["message"].startswith("an error occurred during closing of asynchronous generator ")
    assert type(ctx["exception"]) is ValueError
    assert ctx["asyncgen"] is g


def test_asyncgen_hooks_restored_after_run(loop):
    before = sys.get_asyncgen_hooks()
    seen = []

    async def main():
        seen.append(sys.get_asyncgen_hooks())

    loop.run_until_complete(main())
    assert sys.get_asyncgen_hooks() == before
    assert seen[0].firstiter is not None
    assert seen[0].finalizer is not None
    assert seen[0] != before


def test_async_for_and_async_comprehension(loop):
    async def agen(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def main():
        return [i async for i in agen(5)]

    assert loop.run_until_complete(main()) == [0, 1, 2, 3, 4]
