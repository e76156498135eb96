"""A replica's engine steps, sent in batches to the HELIOS controller actor, off the engine's path.

The engine thread only appends each step to a bounded queue (`observe`); a thread of this
replica sends what piled up every `interval_s`, or sooner once `batch_steps` wait, as one
fire-and-forget `observe.remote(steps, tag)` call that is never awaited. Serving never depends on
the controller: while the actor is missing (not started yet, or dead) batches wait in a bounded
buffer (the oldest steps are dropped past `max_buffered`), and while it restarts at most
`max_in_flight` calls wait in Ray for it (Ray holds calls to a restarting actor until it is
back). Idle steps (no tokens, nothing finished) are not sent: they carry nothing the controller
counts.

The same thread asks the controller, every `check_every_s` from start-up on, whether this
replica's choice (its tag) has been superseded by one whose replicas are up (a question is also
how the controller sees that this replica is up: controller/handover.py). Each change of the
answer calls `on_superseded(answer)`: yes, the replica hands its unstarted requests to the new
choice; no again (that deploy failed), it takes requests as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import ray

from deployments.config import ControllerLink
from helios.stats import StepStats

logger = logging.getLogger("helios.serve")


class StatsForwarder:
    def __init__(self, link: ControllerLink, interval_s: float = 0.5, batch_steps: int = 64,
                 max_buffered: int = 4096, max_in_flight: int = 4, lookup_every_s: float = 2.0,
                 on_superseded: Callable[[bool], None] | None = None, check_every_s: float = 1.0):
        self.link, self.interval_s, self.batch_steps = link, interval_s, batch_steps
        self.on_superseded, self.check_every_s = on_superseded, check_every_s
        self._check, self._checked = None, float("-inf")  # the pending `superseded` call, when it was made
        self.superseded = False
        self.max_buffered, self.max_in_flight, self.lookup_every_s = max_buffered, max_in_flight, lookup_every_s
        self.queue: deque[StepStats] = deque()  # engine thread appends, sender thread pops (both atomic)
        self.pending: list[StepStats] = []  # taken from the queue, not sent yet (sender thread only)
        self.in_flight: list = []
        self.sent = self.dropped = 0
        self._actor, self._looked_up = None, float("-inf")
        self._wake, self._closed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="helios-stats-forwarder", daemon=True)
        self._thread.start()

    # ---- the engine thread: an append, nothing else --------------------------------------

    def observe(self, stats: StepStats) -> None:
        if not (stats.num_generation_tokens or stats.num_prompt_tokens or stats.finished):
            return
        self.queue.append(stats)
        if len(self.queue) >= self.batch_steps:
            self._wake.set()

    # ---- the sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                self.flush()
                self.check()
            except Exception:  # never let a Ray hiccup end the thread: the next round tries again
                logger.exception("talking to the controller failed")

    def flush(self) -> None:
        """Send what waits, if the actor is there and not too many calls are pending."""
        while self.queue:
            self.pending.append(self.queue.popleft())
        if len(self.pending) > self.max_buffered:
            self.dropped += len(self.pending) - self.max_buffered
            self.pending = self.pending[-self.max_buffered:]
        if not self.pending or self._busy():
            return
        actor = self._lookup()
        if actor is None:
            return
        self.in_flight.append(actor.observe.remote(self.pending, self.link.tag))
        self.sent += len(self.pending)
        self.pending = []

    def check(self) -> None:
        """Ask whether this replica's choice is superseded (one call at a time, never waited for)."""
        if self.on_superseded is None or not self.link.tag:
            return
        if self._check is not None:
            done, _ = ray.wait([self._check], timeout=0)
            if not done:
                return
            ref, self._check = self._check, None
            try:
                answer = bool(ray.get(ref, timeout=0))
            except Exception as exc:  # the controller died (Ray restarts it): look it up and ask again later
                logger.warning("could not ask the controller whether this replica is superseded: %r", exc)
                self._actor, answer = None, self.superseded
            if answer != self.superseded:
                self.superseded = answer
                self.on_superseded(answer)
        actor = self._lookup()
        if actor is not None and time.monotonic() - self._checked >= self.check_every_s:
            self._checked = time.monotonic()
            self._check = actor.superseded.remote(self.link.tag)

    def _busy(self) -> bool:
        """Whether `max_in_flight` calls still wait (e.g. for a restarting actor); collects the others."""
        if not self.in_flight:
            return False
        done, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)
        for ref in done:
            try:
                ray.get(ref, timeout=0)  # fetch the result only to see an error (then look the actor up again)
            except Exception as exc:
                logger.warning("the controller did not take a batch of engine steps: %r", exc)
                self._actor = None
        return len(self.in_flight) >= self.max_in_flight

    def _lookup(self):
        if self._actor is None and time.monotonic() - self._looked_up >= self.lookup_every_s:
            self._looked_up = time.monotonic()
            try:
                self._actor = ray.get_actor(self.link.actor, namespace=self.link.namespace)
            except ValueError:  # no such actor (yet): serve on, try again later
                self._actor = None
        return self._actor

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
