"""The controller as a named Ray actor: fed StepStats, it reassesses and switches.

Ray restarts it if it dies (`max_restarts=-1`); the new incarnation runs __init__ again with the
same arguments and resumes from the history file (controller/history.py), so it neither
redeploys nor forgets its last decision. Serving does not depend on it: replicas keep serving
while it is down, only reassessment pauses.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import ray

from controller import history
from controller.observe import BreachWindow, IntervalStats
from controller.reassess import ControllerState, Decision, reassess, start
from controller.repository import Repository
from controller.slo import SLOConfig
from helios.stats import StepStats

logger = logging.getLogger("helios.controller")
ACTOR_NAME = "helios-controller"
NAMESPACE = "helios"
Apply = Callable[[SLOConfig, Repository, str, int], object]


class Controller:
    """Plain class (tested without Ray); `ControllerActor` is the Ray actor around it."""

    def __init__(self, slo: SLOConfig, repository: Repository, apply: Apply | None = None):
        self.slo, self.repository, self.apply = slo, repository, apply
        self.lock = threading.Lock()
        resumed = history.resume_state(history.read(slo.history))
        if resumed is None:
            decision, self.state = start(slo, repository)
            self._record(decision, apply_now=True)
        else:
            self.state = resumed
            logger.info("resumed from %s: %s at %d layers, %d requests", slo.history, resumed.candidate,
                        resumed.depth, resumed.requests)
        self._new_interval()

    def _new_interval(self) -> None:
        self.window = BreachWindow(self.slo.breach_window.tokens)
        self.interval = IntervalStats(self.state.depth)

    def _record(self, decision: Decision, apply_now: bool) -> None:
        history.record_decision(self.slo.history, decision)
        logger.info("decision: %s %s@%d (%s)", decision.action, decision.candidate, decision.depth, decision.reason)
        if apply_now and self.apply is not None:
            self.apply(self.slo, self.repository, decision.candidate, decision.depth)

    def observe(self, steps: list[StepStats]) -> dict | None:
        """Feed engine steps of the serving replica; returns the decision when one was taken."""
        with self.lock:
            for step in steps:
                self.window.observe(step)
                self.interval.observe(step)
            over = self.window.exceeds(self.slo.breach_window.limit)
            if not over and self.interval.finished_requests < self.slo.reassess_every:
                return None
            decision, self.state = reassess(self.slo, self.repository, self.state, self.interval, self.window.count,
                                            "breaches" if over else "interval")
            self._record(decision, apply_now=decision.changed)
            self._new_interval()
            return decision.to_dict()

    def current(self) -> dict:
        return {"candidate": self.state.candidate, "depth": self.state.depth, "requests": self.state.requests,
                "breaches_in_window": self.window.count}

    def history(self, limit: int = 100) -> list[dict]:
        return history.read(self.slo.history)[-limit:]


ControllerActor = ray.remote(max_restarts=-1, max_task_retries=-1)(Controller)


def start_controller(slo: SLOConfig, repository: Repository, apply: Apply | None = None, detached: bool = False):
    """Create (or find) the named controller actor; `detached` lets it outlive the creating driver."""
    options = {"name": ACTOR_NAME, "namespace": NAMESPACE, "get_if_exists": True, "num_cpus": 0}
    if detached:
        options["lifetime"] = "detached"
    return ControllerActor.options(**options).remote(slo, repository, apply)


def get_controller():
    return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)


__all__ = ["Controller", "ControllerActor", "ControllerState", "start_controller", "get_controller"]
