"""Async plumbing shared by the server's routes: an engine stream's last output, cancel-on-failure gathering,
merging streams, cancelling work when the client leaves, and the SSE response around an event generator."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from step3vl.engine.async_llm import EngineDeadError
from step3vl.engine.outputs import RequestOutput
from step3vl.serve.protocol import RequestError, error_body, rejected
from step3vl.serve.responses import sse


async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The final output; the engine refusing the request (a ValueError before any output) is a 400."""
    out = None
    try:
        async with contextlib.aclosing(stream):
            async for out in stream:
                pass
    except ValueError as e:
        if out is not None:
            raise
        raise rejected(e) from None
    if out is None:
        raise EngineDeadError("the engine ended a request without any output")
    return out


async def gather_or_cancel(coros: list) -> list:
    """All results in order; the first failure cancels (and so aborts) the rest and is raised as it is (no
    ExceptionGroup, so the error handlers see a RequestError)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Items of several streams as they come, tagged with the stream's index; closing it closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    await queue.put((i, out, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                live -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run a handler, cancelling it (and so aborting its engine requests) if the client goes away first.
    Streaming responses are returned at once; Starlette closes their generators on disconnect itself."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(events):
                async for chunk in events:
                    yield chunk
        except EngineDeadError as e:  # mid-stream: the status line is already sent
            yield sse(error_body(str(e), "EngineDeadError", None, 503))
        except ValueError as e:  # RequestError included
            err = e if isinstance(e, RequestError) else rejected(e)
            yield sse(error_body(str(err), err.kind, err.param, err.status))
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream")
