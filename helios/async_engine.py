"""An asyncio front for serving: add a request, iterate its output deltas, abort it.

One background thread owns the engine: it applies queued adds and aborts, steps, and hands
each step's outputs to the event loop, then steps again at once. The event loop never
touches the engine, and the engine never waits for the event loop: whatever the consumers
do with an output (a Serve replica streams it to another process) overlaps the next step
instead of adding to it. Prompts are tokenized on a worker thread, so a large prompt never
holds up the event loop that streams other requests' tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from helios.config import EngineConfig
from helios.engine import LLMEngine
from helios.inputs import Prompt
from helios.outputs import RequestOutput
from helios.sampling_params import SamplingParams
from helios.stats import StepStats


class RequestFailed(RuntimeError):
    """One request ended by a fault of its own (its sampling, detokenization or stop check);
    the engine and the other requests go on."""


class RequestHandedOff(RuntimeError):
    """The engine was retired before this request produced anything: send it elsewhere."""


_HANDED_OFF = object()  # put in a request's queue when `retire` releases it


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[StepStats], None] | None = None):
        self.engine = engine
        # called in the engine thread with each step's record, and with an idle record when
        # the engine runs out of work (metrics, the controller)
        self.on_step = on_step
        self._queues: dict[str, asyncio.Queue] = {}
        # ("add", Sequence) | ("abort", id) | ("release", ids to keep) | ("stop",)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._work = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="helios-inputs")  # one: tokenizers are not re-entrant
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self.retired = False  # set by `retire`: requests that may be handed off are refused
        self._pinned: set[str] = set()  # open requests that must be served here (may_hand_off=False)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    @property
    def num_running(self) -> int:
        """Requests running in the last step (a plain read of the engine's last record)."""
        return self.engine.last_step.num_running

    # ---- the engine thread -----------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="helios-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while self._apply_commands():
            if not self.engine.has_unfinished():
                self._notify(self.engine.idle_stats())
                self._work.wait()
                self._work.clear()  # commands put before the matching set() are applied next
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # an engine fault fails every open request, loudly
                self._loop.call_soon_threadsafe(self._fail_all, exc)
                raise
            self._loop.call_soon_threadsafe(self._deliver, outputs)
            self._notify(self.engine.last_step)

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
            elif command[0] == "release":
                released = self.engine.release_unstarted(keep=command[1])
                self._loop.call_soon_threadsafe(self._hand_off, released)
            else:
                return False

    def _notify(self, stats: StepStats) -> None:
        if self.on_step is not None:
            self.on_step(stats)

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

    def _hand_off(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            stream = self._queues.pop(request_id, None)
            if stream is not None:
                stream.put_nowait(_HANDED_OFF)

    def _fail_all(self, exc: BaseException) -> None:
        self._error = exc
        for stream in self._queues.values():
            stream.put_nowait(exc)
        self._queues.clear()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       tokens_per_output: Callable[[], int] | None = None,
                       may_hand_off: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas; the last has finished=True and the whole result.

        The first token comes out at once. After it, deltas are merged until they hold
        `tokens_per_output()` tokens (default 1: every step's delta, or whatever piled up
        while the consumer was busy). Bad input raises ValueError before anything is
        queued. Leaving the iteration early (a client that disconnects) aborts the request
        and frees its KV blocks. A fault of this request's own raises RequestFailed (its blocks
        are already free); a fault of the engine's raises RuntimeError for every open request.
        With `may_hand_off`, a retired engine (see `retire`) raises RequestHandedOff instead of
        serving the request, at once or while it still waits with nothing produced.
        """
        if self._error is not None:
            raise RuntimeError("the engine failed") from self._error
        self._ensure_thread()
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_thread, self.engine.make_sequence, prompt, params, request_id)
        if self.retired and may_hand_off:  # checked after the await: `retire` may have run meanwhile
            raise RequestHandedOff(f"request {request_id}: this engine is retired")
        stream: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = stream
        if not may_hand_off:
            self._pinned.add(request_id)
        self._send("add", seq)
        finished, pending, sent = False, None, False
        try:
            while not finished:
                item = await stream.get()
                if item is _HANDED_OFF:
                    finished = True  # the engine has already dropped it
                    raise RequestHandedOff(f"request {request_id} was handed off: this engine is retired")
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed") from item
                if item.finish_reason == "error":
                    finished = True  # the engine has already dropped it: nothing to abort
                    raise RequestFailed(f"request {request_id} failed: {item.error}")
                pending = item if pending is None else pending.merged(item)
                finished = item.finished
                wanted = tokens_per_output() if tokens_per_output and sent else 1
                if finished or (len(pending.new_token_ids) >= wanted and stream.empty()):
                    yield pending
                    pending, sent = None, True
        finally:
            self._pinned.discard(request_id)
            if not finished:
                await self.abort(request_id)

    def retire(self, retired: bool = True) -> None:
        """This engine is being replaced (thread-safe): from now on refuse requests that may be handed
        off, and release those of them that wait with nothing produced; the others finish here.
        `retired=False` undoes it (the replacement went away): requests are taken again."""
        loop = self._loop
        if loop is None:  # never served: `generate` sees the flag before it queues anything
            self.retired = retired
        else:  # in call order, on the event loop
            loop.call_soon_threadsafe(self._set_retired, retired)

    def _set_retired(self, retired: bool) -> None:  # on the event loop: no add slips between flag and release
        self.retired = retired
        if retired:
            self._send("release", frozenset(self._pinned))

    async def abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._send("abort", request_id)

    def shutdown(self) -> None:
        """Stop the engine thread (open requests get no more output)."""
        if self._thread is not None:
            self._send("stop")
            self._thread.join()
            self._thread = None
        self._tokenizer_thread.shutdown(wait=False)

    @property
    def failed(self) -> BaseException | None:
        """The exception that stopped the engine thread, if one did."""
        return self._error

    @property
    def stats(self):
        return self.engine.stats
