"""An asyncio front for serving: add a request, iterate its output deltas, abort it.

One background thread owns the engine: it applies queued adds and aborts, steps, and hands
each step's outputs to the event loop, then steps again at once. The event loop never
touches the engine, and the engine never waits for the event loop: whatever the consumers
do with an output (a Serve replica streams it to another process) overlaps the next step
instead of adding to it.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import AsyncIterator, Callable

from helios.config import EngineConfig
from helios.engine import LLMEngine, Prompt, RequestOutput
from helios.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called in the engine thread after every step and when idle (metrics)
        self._queues: dict[str, asyncio.Queue] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Sequence) | ("abort", id) | ("stop",)
        self._work = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    # ---- the engine thread -----------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="helios-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while self._apply_commands():
            if not self.engine.has_unfinished():
                self._notify()
                self._work.wait()
                self._work.clear()  # commands put before the matching set() are applied next
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # an engine fault fails every open request, loudly
                self._loop.call_soon_threadsafe(self._fail_all, exc)
                raise
            self._loop.call_soon_threadsafe(self._deliver, outputs)
            self._notify()

    def _apply_commands(self) -> bool:
        """Apply queued adds and aborts; False once asked to stop."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command[0] == "add":
                self.engine.add_sequence(command[1])
            elif command[0] == "abort":
                self.engine.abort(command[1])
            else:
                return False

    def _notify(self) -> None:
        if self.on_step is not None:
            self.on_step(self.engine)

    def _send(self, *command) -> None:
        self._commands.put(command)
        self._work.set()

    # ---- the event loop ----------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._queues.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
            if out.finished:
                self._queues.pop(out.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        self._error = exc
        for stream in self._queues.values():
            stream.put_nowait(exc)
        self._queues.clear()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield an output per step that changes the request; the last has finished=True.

        A consumer that falls behind gets what piled up merged into one output. Bad input
        raises ValueError before anything is queued. Leaving the iteration early (a client
        that disconnects) aborts the request and frees its KV blocks.
        """
        if self._error is not None:
            raise RuntimeError("the engine failed") from self._error
        self._ensure_thread()
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = self.engine.make_sequence(prompt, params, request_id)  # validates; touches no engine state
        stream: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = stream
        self._send("add", seq)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                while not stream.empty() and isinstance(item, RequestOutput) and not item.finished:
                    later = stream.get_nowait()
                    item = item.followed_by(later) if isinstance(later, RequestOutput) else later
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._send("abort", request_id)

    def shutdown(self) -> None:
        """Stop the engine thread (open requests get no more output)."""
        if self._thread is not None:
            self._send("stop")
            self._thread.join()
            self._thread = None

    @property
    def failed(self) -> BaseException | None:
        """The exception that stopped the engine thread, if one did."""
        return self._error

    @property
    def stats(self):
        return self.engine.stats
