"""`AsyncLLM`: an `LLM` stepped by one engine thread, driven from asyncio (vLLM's AsyncLLM, in-process).

The engine is not thread-safe, so exactly one thread touches it: the engine thread. Callers hand it commands
(add, abort, call) through a queue; it steps while any request is unfinished and posts each request's newest
output to that request's stream on the caller's event loop. Prompts are tokenized and their images
preprocessed on worker threads (`LLM.prepare`), so a big image never stalls the other requests' decoding.

A stream keeps only its newest output (outputs are cumulative): a slow reader costs no memory and sees the
latest text when it next reads. Leaving a stream before it finishes (a client disconnect) aborts the request,
which frees its KV at once.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from step3vl.engine.beam_search import BeamSearchOutput, BeamSearchParams
from step3vl.engine.llm import LLM
from step3vl.engine.outputs import RequestOutput
from step3vl.engine.prompts import PreparedPrompt
from step3vl.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine thread failed or was shut down; no request can make progress."""


def _post(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    """Schedule fn(*args) on a caller's loop from the engine thread; a closed loop has nobody left to tell."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class _Stream:
    """One request's outputs, read on the caller's loop; written only through `loop.call_soon_threadsafe`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.latest: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:  # runs on the caller's loop
        self.latest = item
        self.ready.set()

    def post(self, item: RequestOutput | BaseException) -> None:  # runs on the engine thread
        _post(self.loop, self.put, item)

    async def next(self) -> RequestOutput:
        await self.ready.wait()
        self.ready.clear()
        item, self.latest = self.latest, None
        if isinstance(item, BaseException):
            raise item
        self.finished = item.finished
        return item


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams
    stream: _Stream
    final_only: bool
    priority: int = 0


@dataclass(slots=True)
class _Call:
    fn: Callable[[LLM], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _snapshot(out: RequestOutput) -> RequestOutput:
    """Token-id lists are the engine's live lists; the reader gets copies that the engine will not extend."""
    return replace(out, outputs=[replace(c, token_ids=list(c.token_ids)) for c in out.outputs])


class AsyncLLM:
    """Async access to one `LLM` from any number of coroutines (and event loops), through its engine thread."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._final_only: set[str] = set()  # engine thread only
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="step3vl-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model: str, **engine_args: Any) -> "AsyncLLM":
        return cls(LLM(model, **engine_args))

    # -- caller side ---------------------------------------------------------------------------------

    async def generate(self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None,
                       final_only: bool = False, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative output as it grows; the last one has `finished=True`. A bad prompt
        raises ValueError (naming the problem) before anything is yielded; closing the iterator early aborts.
        final_only: yield only the finished output (no per-step copies for a caller that does not stream).
        priority: for an engine with scheduling_policy='priority' (lower first)."""
        self._check_alive()
        prepared = await asyncio.to_thread(self.llm.prepare, prompt)
        params = params or self.llm.get_default_sampling_params()
        params = await asyncio.to_thread(self.llm.prepare_params, params)  # grammar compile
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop())
        self._submit(_Add(rid, prepared, params, stream, final_only, priority), stream.put)
        try:
            while True:
                out = await stream.next()
                yield out
                if out.finished:
                    return
        finally:
            if not stream.finished:  # only this stream's request: a refused duplicate id must not abort the other
                self._commands.put(("abort", rid, stream))

    async def beam_search(self, prompt: Any, params: BeamSearchParams) -> BeamSearchOutput:
        """One prompt's beam search (engine/beam_search.py); each step's beams run as requests batched with
        everything else on the engine, so other requests keep decoding meanwhile."""
        self._check_alive()
        prepared = await asyncio.to_thread(self.llm.prepare, prompt)
        search = self.llm.new_beam_search([prepared], params)
        while not search.finished:
            search.advance(await asyncio.gather(*(self._final(p, search.step_params) for p in search.requests())))
        return search.results(self.llm.get_tokenizer())[0]

    async def _final(self, prompt: Any, params: SamplingParams) -> RequestOutput:
        async for out in self.generate(prompt, params, final_only=True):
            if out.finished:
                return out
        raise EngineDeadError("the engine ended a request without finishing it")

    async def call(self, fn: Callable[[LLM], Any]) -> Any:
        """Run `fn(llm)` on the engine thread between two steps (stats, pins, weight updates)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(_Call(fn, future, loop), lambda e: future.done() or future.set_exception(e))
        return await future

    async def sleep(self, level: int = 1) -> int:
        """LLM.sleep on the engine thread (no request may be in flight); returns the device bytes freed."""
        return await self.call(lambda llm: llm.sleep(level))

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self.call(lambda llm: llm.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return self.llm.is_sleeping()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; requests still running end with EngineDeadError."""
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}") from self._dead

    def _submit(self, cmd, fail: Callable[[BaseException], Any]) -> None:
        """Queue a command; if the engine died meanwhile (it may have drained the queue already), fail it here.
        `_die` sets `_dead` before draining, so a command is always answered by one side or both."""
        self._commands.put(cmd)
        if self._dead is not None:
            fail(self._dead)

    # -- engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._drain(block=not self.llm.has_unfinished_requests()):
                if self.llm.has_unfinished_requests():
                    self._step()
            self._die(EngineDeadError("the engine was shut down"))
        except BaseException as e:  # noqa: BLE001 - every waiter must hear why the engine stopped
            self._die(EngineDeadError(f"the engine thread failed: {type(e).__name__}: {e}"), cause=e)

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once asked to stop."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Call):
                self._call(cmd)
            elif cmd[0] == "abort":
                self._abort(cmd[1], cmd[2])
            elif cmd[0] == "stop":
                return False

    def _add(self, cmd: _Add) -> None:
        if cmd.request_id in self._streams:
            cmd.stream.post(ValueError(f"request id {cmd.request_id!r} is already in use"))
            return
        try:
            self.llm.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id, priority=cmd.priority)
        except Exception as e:  # noqa: BLE001 - a rejected prompt is that caller's error, not the engine's
            cmd.stream.post(e)
            return
        self._streams[cmd.request_id] = cmd.stream
        if cmd.final_only:
            self._final_only.add(cmd.request_id)

    def _call(self, cmd: _Call) -> None:
        def settle(ok: bool, value: Any) -> None:
            if not cmd.future.done():
                (cmd.future.set_result if ok else cmd.future.set_exception)(value)

        try:
            result, ok = cmd.fn(self.llm), True
        except Exception as e:  # noqa: BLE001
            result, ok = e, False
        _post(cmd.loop, settle, ok, result)

    def _abort(self, request_id: str, owner: _Stream | None) -> None:
        if owner is not None and self._streams.get(request_id) is not owner:
            return  # that stream's request was refused or has ended: the id may belong to another request now
        stream = self._streams.pop(request_id, None)
        self._final_only.discard(request_id)
        out = self.llm.abort(request_id)
        if stream is not None and out is not None:
            stream.post(_snapshot(out))

    def _step(self) -> None:
        for out in self.llm.step():
            stream = self._streams.get(out.request_id)
            if stream is None or (not out.finished and out.request_id in self._final_only):
                continue
            stream.post(_snapshot(out))
            if out.finished:
                del self._streams[out.request_id]
                self._final_only.discard(out.request_id)

    def _die(self, error: EngineDeadError, cause: BaseException | None = None) -> None:
        if cause is not None:
            error.__cause__ = cause
        self._dead = error
        for stream in self._streams.values():
            stream.post(error)
        self._streams.clear()
        while True:  # commands that arrived too late
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                cmd.stream.post(error)
            elif isinstance(cmd, _Call):
                _post(cmd.loop, lambda f=cmd.future: f.done() or f.set_exception(error))
