"""An asyncio front for serving: add a request, iterate its output deltas, abort it.

One background task steps the engine in a worker thread while there is work. Requests
and aborts from the event loop are queued and applied between steps, so the engine is
only ever touched by one thread at a time.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Callable

from helios.config import EngineConfig
from helios.engine import LLMEngine, Prompt, RequestOutput
from helios.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called after every step and abort (metrics read the engine here)
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list = []
        self._pending_aborts: set[str] = set()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished() and not self._pending_adds:
                self._notify()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = await loop.run_in_executor(None, self.engine.step)
            except BaseException as exc:  # an engine fault fails every open request, loudly
                self._fail_all(exc)
                raise
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                if out.finished:
                    self._queues.pop(out.request_id, None)
            self._notify()
            await asyncio.sleep(0)  # let handlers run between steps

    def _notify(self) -> None:
        if self.on_step is not None:
            self.on_step(self.engine)

    def _apply_pending(self) -> None:
        for seq in self._pending_adds:
            self.engine.add_sequence(seq)
        self._pending_adds.clear()
        for request_id in self._pending_aborts:
            self.engine.abort(request_id)
        self._pending_aborts.clear()

    def _fail_all(self, exc: BaseException) -> None:
        self._error = exc
        for queue in self._queues.values():
            queue.put_nowait(exc)
        self._queues.clear()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield one output per step that changes the request; the last has finished=True.

        Bad input raises ValueError before anything is queued. Leaving the iteration early
        (a client that disconnects) aborts the request and frees its KV blocks.
        """
        self._ensure_loop()
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        # validation happens here, in the caller; the loop adds the sequence between steps
        seq = self.engine.make_sequence(prompt, params, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append(seq)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    @property
    def failed(self) -> BaseException | None:
        """The exception that stopped the engine loop, if one did."""
        return self._error

    @property
    def stats(self):
        return self.engine.stats
