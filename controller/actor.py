"""The controller as a named Ray actor: fed StepStats, it reassesses and switches.

Replicas send it their engine steps in batches (deployments/stats_forwarder.py); a decision is
written to the history, then applied by a background thread (controller/applier.py), so stats
and `current()` are answered during the tens of seconds a redeploy takes.

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
from controller.applier import Applier
from controller.handover import Handover
from controller.metrics import ControllerMetrics
from controller.reassess import ControllerState, Decision, ReassessLoop, start
from controller.repository import Repository
from controller.slo import SLOConfig
from controller.switcher import tag as switcher_tag
from deployments.config import ACTORS_NAMESPACE, CONTROLLER_ACTOR
from helios.stats import StepStats

logger = logging.getLogger("helios.controller")
ACTOR_NAME, NAMESPACE = CONTROLLER_ACTOR, ACTORS_NAMESPACE
Apply = Callable[[SLOConfig, Repository, str, int], object]


class Controller:
    """Plain class (tested without Ray); `ControllerActor` is the Ray actor around it."""

    def __init__(self, slo: SLOConfig, repository: Repository, apply: Apply | None = None):
        self.slo, self.repository, self.apply = slo, repository, apply
        self.lock = threading.Lock()
        self.ignored_steps = 0  # from replicas of an earlier choice (still draining)
        self.handover = Handover()
        self.metrics = ControllerMetrics(slo.model) if ray.is_initialized() else None
        records = history.read(slo.history)
        resumed = history.resume_state(records)
        if resumed is None:
            decision, state = start(slo, repository)
            self.loop = ReassessLoop(slo, repository, state)
            self.applier = self._applier(None)
            self._record(decision)
        else:
            self.loop = ReassessLoop(slo, repository, resumed)
            deployed = history.applied_after_last_change(records)
            logger.info("resumed from %s: %s at %d layers, %d requests%s", slo.history, resumed.candidate,
                        resumed.depth, resumed.requests, "" if deployed else " (applying it again)")
            self.applier = self._applier(self._target() if deployed else None)
            if deployed and self.metrics is not None:
                self.metrics.serving(*self._target())
            else:
                self.applier.submit(self._target())  # died during that redeploy: finish it

    @property
    def state(self) -> ControllerState:
        return self.loop.state

    def _target(self) -> tuple[str, int]:
        return self.state.candidate, self.state.depth

    def _applier(self, applied: tuple[str, int] | None) -> Applier:
        def deploy(candidate: str, depth: int) -> None:
            with self.lock:
                self.handover.deploying(switcher_tag(candidate, depth))
            if self.apply is not None:
                self.apply(self.slo, self.repository, candidate, depth)

        return Applier(deploy, self._applied, applied, self.slo.apply_retry, self._apply_failed)

    def _applied(self, target: tuple[str, int], seconds: float) -> None:
        """In the applier's thread, once a redeploy is done."""
        with self.lock:
            history.record_applied(self.slo.history, *target, seconds)
        logger.info("applied %s@%d in %.1f s", *target, seconds)
        if self.metrics is not None:
            self.metrics.serving(*target)

    def _apply_failed(self, target: tuple[str, int]) -> None:
        """In the applier's thread, after each failed attempt (the applier logs it and retries)."""
        if self.metrics is not None:
            self.metrics.apply_failed(*target)

    def _record(self, decision: Decision) -> None:
        """History first, then (for a change) the redeploy, in the background."""
        history.record_decision(self.slo.history, decision)
        logger.info("decision: %s %s@%d (%s)", decision.action, decision.candidate, decision.depth, decision.reason)
        if decision.changed:
            if self.metrics is not None and decision.action != "start":
                self.metrics.switched(decision.reason)
            self.applier.submit((decision.candidate, decision.depth))

    def observe(self, steps: list[StepStats], tag: str | None = None) -> dict | None:
        """Feed engine steps of the serving replicas; returns the decision when one was taken.

        `tag`: the choice the sending replica serves (controller/switcher.py); steps of any other
        choice (replicas still draining after a change) describe what no longer serves and are
        ignored. None: take them (direct calls, tests).
        """
        with self.lock:
            if self.metrics is not None:
                self.metrics.refresh()
            if tag is not None and tag != switcher_tag(*self._target()):
                self.ignored_steps += len(steps)
                return None
            decision = self.loop.observe(steps)
            if decision is None:
                return None
            self._record(decision)
            return decision.to_dict()

    def superseded(self, tag: str) -> bool:
        """Asked every second by each replica of a linked model: whether its choice has been replaced
        by the one being (or else last) deployed, and a replica of that one is up (it has asked too;
        controller/handover.py). Then the replica hands its unstarted requests on."""
        state = self.applier.state()
        with self.lock:
            return self.handover.superseded(tag, state["applying"] or state["applied"])

    def deploy(self) -> None:
        """Deploy the current choice even if the history says it runs (a fresh `helios serve` over an
        old history file: the new Serve instance runs nothing yet)."""
        self.applier.submit(self._target(), force=True)

    def current(self) -> dict:
        """The choice (candidate, depth), requests seen, breaches in the window, and the deployment:
        `applied` (what runs), `applying` (a redeploy under way), `pending` (the next one, or a failed one
        waiting `retry_in_s` to be tried again), `apply_error` (the last failure, cleared by a success),
        `apply_failures` (failed attempts in a row at the latest target tried; 0 once applied)."""
        with self.lock:
            return {"candidate": self.state.candidate, "depth": self.state.depth, "requests": self.state.requests,
                    "breaches_in_window": self.loop.window.count, **self.applier.state()}

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
