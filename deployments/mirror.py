"""The serving side's link to the controller's actors: mirroring, and the controller's admin view.

Mirroring: finished requests offered to the live profiler (controller/live_profile.py).

The ingress calls `Mirror.offer(jobs, states)` once a request has finished, streamed or not.
Nothing here may change what the client receives, or hold it up:
- fire-and-forget: `profiler.offer.remote(...)` is submitted and never awaited;
- sampled: only while the profiler asks for samples (its `wants()`), a flag read at most every
  `refresh_s` seconds by a background task, so no request waits on Ray's name service;
- a no-op when no profiler actor exists (plain `helios serve`): the lookup fails, the flag stays
  off, and it is looked up again `refresh_s` later;
- only what another candidate can run: text and chat prompts (token ids belong to the served
  model's tokenizer), choices that finished. The profiler keeps prompts in memory for one round;
  the history it writes holds figures only, never text.

The names of the controller's actors live here, the one place both sides import: deployments/
may not import controller/ (controller/ imports deployments/).
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from deployments.config import ACTORS_NAMESPACE as NAMESPACE, CONTROLLER_ACTOR, PROFILER_ACTOR

logger = logging.getLogger("ray.serve.helios.mirror")
REFRESH_S = 2.0  # how stale the "profiler wants samples" flag may be
WANTS_TIMEOUT_S = 5.0


def portable(prompt) -> bool:
    """Text or chat messages: what any candidate's tokenizer can take."""
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                       and all(isinstance(m, dict) for m in prompt))


def samples(jobs: list, states: list) -> list[dict]:
    """One sample per finished choice of a request: `jobs` are its (prompt, SamplingParams), `states`
    its ChoiceStates (deployments/responses.py), in the same order."""
    found = []
    for (prompt, params), state in zip(jobs, states):
        if state.finish_reason is None or not portable(prompt):
            continue
        found.append({"prompt": prompt, "max_tokens": params.max_tokens, "greedy": params.greedy,
                      "stop": list(params.stop), "text": state.text, "completion_tokens": state.completion_tokens,
                      "finish_reason": state.finish_reason})
    return found


class Mirror:
    """One per ingress replica."""

    def __init__(self, refresh_s: float = REFRESH_S):
        self.refresh_s = refresh_s
        self._actor = None
        self._wanted = False
        self._checked = float("-inf")
        self._refreshing: asyncio.Task | None = None
        self.offered = 0  # samples sent to the profiler (for tests and debugging)

    def offer(self, jobs: list, states: list) -> None:
        """Send a finished request's samples to the profiler if it wants some; never raises, never waits."""
        try:
            self._maybe_refresh()
            if not self._wanted or self._actor is None:
                return
            found = samples(jobs, states)
            if found:
                self._actor.offer.remote(found)  # fire-and-forget: the reference is dropped unread
                self.offered += len(found)
        except Exception:  # mirroring must never fail a request
            logger.debug("mirroring a request failed", exc_info=True)

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if self._refreshing is not None or now - self._checked < self.refresh_s:
            return
        self._checked = now
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            if not ray.is_initialized():  # in-process use (tests): nothing to look up, and no Ray to start
                return
            if self._actor is None:  # a name lookup blocks: off the event loop
                self._actor = await asyncio.to_thread(ray.get_actor, PROFILER_ACTOR, namespace=NAMESPACE)
            self._wanted = bool(await asyncio.wait_for(self._actor.wants.remote(), WANTS_TIMEOUT_S))
        except Exception:  # no profiler (plain `helios serve`), or it died: off until the next look
            self._actor, self._wanted = None, False
        finally:
            self._refreshing = None


class NoController(Exception):
    """No controller actor answers (plain `helios serve`, or it is restarting)."""


async def controller_view(limit: int) -> dict:
    """The controller's state and its newest `limit` history records (decisions and live profiles),
    newest last, for the admin route."""
    try:
        actor = await asyncio.to_thread(ray.get_actor, CONTROLLER_ACTOR, namespace=NAMESPACE)
        state, records = await asyncio.gather(actor.current.remote(), actor.history.remote(limit))
    except Exception as exc:  # not found (ValueError), or dead and being restarted (RayActorError)
        raise NoController(f"no HELIOS controller answers ({type(exc).__name__})") from None
    return {"state": state, "history": records}
