"""Decisions applied in the background, one at a time, the latest winning; failures retried.

A redeploy takes tens of seconds (a new replica loads its model and warms up); the controller
must keep taking stats and answering `current()` meanwhile. `submit` only names the wanted
(candidate, depth); one thread applies it. A decision that arrives while another is applied
replaces any that still waits, so after a burst of decisions only the last is deployed.

A failed deploy (the old choice keeps serving) is tried again after a backoff (the SLO's
`apply_retry`: 5 s, 10 s, 20 s ... up to `attempts` tries). The retry waits as `pending`, so a
newer decision replaces it like any other; the wait is the thread's, never the caller's.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from controller.slo import ApplyRetry

logger = logging.getLogger("helios.controller")
Target = tuple[str, int]
Deploy = Callable[[str, int], object]
Done = Callable[[Target, float], None]
Failed = Callable[[Target], None]


def label(target: Target | None) -> str | None:
    return None if target is None else f"{target[0]}@{target[1]}"


class Applier:
    def __init__(self, deploy: Deploy, on_applied: Done, applied: Target | None = None,
                 retry: ApplyRetry | None = None, on_failed: Failed | None = None):
        """`deploy(candidate, depth)` redeploys; `on_applied(target, seconds)` runs after each success,
        `on_failed(target)` after each failed attempt; `applied`: what already runs (a controller
        resumed from its history); `retry`: attempts and backoff for a failed deploy."""
        self.deploy, self.on_applied, self.on_failed = deploy, on_applied, on_failed
        self.retry = retry or ApplyRetry()
        self.applied, self.applying, self.pending = applied, None, None
        self.error: str | None = None
        self.failures = 0  # failed attempts in a row at the latest target tried (0 once it is applied)
        self._made, self._due = 0, 0.0  # of `pending`: attempts already made, when it may start (monotonic)
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="helios-applier", daemon=True)
        self._thread.start()

    def submit(self, target: Target, force: bool = False) -> None:
        """Want `target` deployed. Already applying it, or (unless `force`) already running it: nothing
        waits. Already waiting for it (a retry included): it keeps its place and its backoff."""
        with self._changed:
            if target == self.applying or (target == self.applied and self.applying is None and not force):
                self.pending = None
            elif target != self.pending:
                self.pending, self._made, self._due = target, 0, 0.0
            self._changed.notify_all()

    def _next(self) -> Target:
        """Wait for a pending target whose backoff (if any) is over; it becomes `applying`."""
        with self._changed:
            while self.pending is None or time.monotonic() < self._due:
                self._changed.wait(None if self.pending is None else self._due - time.monotonic())
            self.applying, self.pending, self.failures = self.pending, None, self._made
            return self.applying

    def _run(self) -> None:
        while True:
            target = self._next()
            started = time.monotonic()
            try:
                self.deploy(*target)
            except Exception as exc:  # the old choice keeps serving
                self._failed(target, exc)
                continue
            seconds = time.monotonic() - started
            if self.failures:
                logger.info("applied %s at attempt %d", label(target), self.failures + 1)
            self.on_applied(target, seconds)
            with self._changed:
                self.applied, self.applying, self.error, self.failures = target, None, None, 0
                self._changed.notify_all()

    def _failed(self, target: Target, exc: Exception) -> None:
        """Retry after a backoff, unless attempts are used up or a newer decision waits."""
        if self.on_failed is not None:  # before the state changes, as on_applied: wait_idle sees it done
            self.on_failed(target)
        with self._changed:
            self.failures += 1
            attempt, self.error, self.applying = self.failures, f"{label(target)}: {exc!r}", None
            if self.pending is not None:
                outcome = f"a newer decision ({label(self.pending)}) replaces it"
            elif attempt >= self.retry.attempts:
                outcome = "giving up until the next decision"
            else:
                delay = self.retry.delay(attempt)
                self.pending, self._made, self._due = target, attempt, time.monotonic() + delay
                outcome = f"retrying in {delay:g} s"
            self._changed.notify_all()
        logger.error("applying %s failed (attempt %d of %d): %s", label(target), attempt, self.retry.attempts,
                     outcome, exc_info=exc)

    def state(self) -> dict:
        """`apply_failures`: failed attempts in a row at the latest target tried (after the last one:
        all attempts made; 0 once applied); `retry_in_s`: seconds until `pending` is tried again after
        a failure (None: no retry waits)."""
        with self._changed:
            retry_in = max(0.0, self._due - time.monotonic()) if self.pending is not None and self._made else None
            return {"applied": label(self.applied), "applying": label(self.applying), "pending": label(self.pending),
                    "apply_error": self.error, "apply_failures": self.failures,
                    "retry_in_s": None if retry_in is None else round(retry_in, 1)}

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is applied or waits (tests). A retry waiting out its backoff is pending:
        this returns once the target is applied or its last attempt failed (or at the timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.applying is not None or self.pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True
