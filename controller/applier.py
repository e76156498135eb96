"""Decisions applied in the background, one at a time, the latest winning.

A redeploy takes tens of seconds (a new replica loads its model and warms up); the controller
must keep taking stats and answering `current()` meanwhile. `submit` only names the wanted
(candidate, depth); one thread applies it. A decision that arrives while another is applied
replaces any that still waits, so after a burst of decisions only the last is deployed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger("helios.controller")
Target = tuple[str, int]
Deploy = Callable[[str, int], object]
Done = Callable[[Target, float], None]


def label(target: Target | None) -> str | None:
    return None if target is None else f"{target[0]}@{target[1]}"


class Applier:
    def __init__(self, deploy: Deploy, on_applied: Done, applied: Target | None = None):
        """`deploy(candidate, depth)` redeploys; `on_applied(target, seconds)` runs after each success;
        `applied`: what already runs (a controller resumed from its history)."""
        self.deploy, self.on_applied = deploy, on_applied
        self.applied, self.applying, self.pending = applied, None, None
        self.error: str | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="helios-applier", daemon=True)
        self._thread.start()

    def submit(self, target: Target, force: bool = False) -> None:
        """Want `target` deployed. Already applying it, or (unless `force`) already running it: nothing waits."""
        with self._changed:
            if target == self.applying or (target == self.applied and self.applying is None and not force):
                self.pending = None
            else:
                self.pending = target
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self.pending is None:
                    self._changed.wait()
                self.applying, self.pending = self.pending, None
            started = time.monotonic()
            try:
                self.deploy(*self.applying)
            except Exception as exc:  # the old choice keeps serving; the next decision tries again
                logger.exception("applying %s failed", label(self.applying))
                with self._changed:
                    self.error, self.applying = f"{label(self.applying)}: {exc!r}", None
                    self._changed.notify_all()
                continue
            seconds = time.monotonic() - started
            self.on_applied(self.applying, seconds)
            with self._changed:
                self.applied, self.applying, self.error = self.applying, None, None
                self._changed.notify_all()

    def state(self) -> dict:
        with self._changed:
            return {"applied": label(self.applied), "applying": label(self.applying), "pending": label(self.pending),
                    "apply_error": self.error}

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is applied or waits (tests; the serve command's first deployment)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.applying is not None or self.pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True
