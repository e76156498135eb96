"""Reassessment: stay, load more (or fewer) layers, or switch candidate; with hysteresis.

Pure: the caller feeds the last interval's live figures (controller/observe.py) and gets a
Decision record and the next state. Two kinds of change:

- Safety: the breach window is over its limit, or the serving choice now breaks a constraint.
  The cheaper of the two ways out is taken at once: the smallest safe deeper prefix of the same
  candidate (it loads only the extra layers) or the best safe other candidate, the switch only
  when its estimated objective beats the deeper load by hysteresis.min_gain.
- Gain: the serving choice is safe, but another option scores better. Made only when it scores
  at least min_gain x the current one, has been the best at `stable_reassessments`
  reassessments in a row and min_requests_between_changes requests have passed since the last
  change. A workload that alternates between easy and hard phases therefore deepens when the
  hard phase needs it and does not shrink back until easy traffic has lasted.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterable

from controller.observe import BreachWindow, IntervalStats
from controller.repository import Repository
from controller.selector import Estimate, allowed_depths, evaluate, fallback, initial_choice, rank, shortlist
from controller.slo import SLOConfig
from helios.stats import StepStats

TRIGGERS = ("start", "interval", "breaches")
ACTIONS = ("start", "stay", "deepen", "shrink", "switch")
# A candidate left for safety (breaches, or a broken constraint) is not chosen again at that depth or
# shallower for this many reassessment intervals: the controller has live figures only for what it serves, so
# the repository alone would rate the candidate it just left as good as before, and switch back.
BREACH_MEMORY_INTERVALS = 10
SAFETY = "safety: "  # how the reason of a change made for safety begins (history and metrics read it)


@dataclass(frozen=True)
class Decision:
    """One reassessment: what was served, what the controller saw, what it chose and why."""

    request_count: int
    trigger: str  # start | interval | breaches
    action: str  # start | stay | deepen | shrink | switch
    reason: str
    candidate: str  # serving after the decision
    depth: int
    previous_candidate: str | None
    previous_depth: int | None
    inputs: dict = field(default_factory=dict)  # live figures the decision used
    options: list[dict] = field(default_factory=list)  # every option estimated (Estimate.to_dict)
    time: float = field(default_factory=time.time)  # wall clock, for the history

    @property
    def changed(self) -> bool:
        return (self.candidate, self.depth) != (self.previous_candidate, self.previous_depth)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ControllerState:
    candidate: str
    depth: int
    requests: int = 0  # finished requests seen in all
    last_change_request: int = 0
    proposal: tuple[str, int] | None = None  # the gain change seen at the last reassessments
    proposal_count: int = 0
    breached: tuple[tuple[str, int, int], ...] = ()  # (candidate, depth, request count) left for safety


def recently_breached(state: ControllerState, estimate: Estimate) -> bool:
    """Whether `estimate` is another candidate left for safety at its depth or deeper (marks older
    than BREACH_MEMORY_INTERVALS are dropped by `reassess`)."""
    return estimate.candidate != state.candidate and any(
        candidate == estimate.candidate and estimate.depth <= depth for candidate, depth, _ in state.breached)


def start(slo: SLOConfig, repository: Repository) -> tuple[Decision, ControllerState]:
    """The first choice, from the repository alone."""
    choice = initial_choice(slo, repository)
    reason = "best of the shortlist" if choice.feasible else "no option meets the constraints: " + "; ".join(
        choice.violations)
    options = [e.to_dict() for e in shortlist(slo, repository)]
    decision = Decision(0, "start", "start", reason, choice.candidate, choice.depth, None, None, {}, options)
    return decision, ControllerState(choice.candidate, choice.depth)


def _action(state: ControllerState, choice: Estimate) -> str:
    if choice.candidate != state.candidate:
        return "switch"
    return "deepen" if choice.depth > state.depth else "shrink"


def _options(slo: SLOConfig, repository: Repository, state: ControllerState,
             live: IntervalStats) -> tuple[Estimate, list[Estimate], list[Estimate]]:
    """(current, the current candidate's other depths, the other shortlisted candidates at their depth)."""
    same = [evaluate(slo, repository, state.candidate, d, live) for d in allowed_depths(slo, repository, state.candidate)]
    current = next((e for e in same if e.depth == state.depth), None)
    if current is None:
        raise ValueError(f"no repository figures for {state.candidate} at depth {state.depth}")
    others = [e for e in shortlist(slo, repository)
              if e.candidate != state.candidate and not recently_breached(state, e)]
    return current, [e for e in same if e.depth != state.depth], others


def _safety_choice(slo: SLOConfig, state: ControllerState, deeper: list[Estimate],
                   others: list[Estimate]) -> tuple[Estimate | None, str]:
    deepen = next((e for e in deeper if e.feasible and e.depth > state.depth), None)
    switch = next(iter(rank([e for e in others if e.feasible])), None)
    if deepen and switch:
        if switch.score >= slo.hysteresis.min_gain * deepen.score:
            return switch, f"switch scores {switch.score / deepen.score:.2f}x the deeper load"
        return deepen, f"the deeper load is cheaper (switch only {switch.score / deepen.score:.2f}x)"
    if deepen or switch:
        return deepen or switch, "the only safe way out"
    return None, "no safe option"


def reassess(slo: SLOConfig, repository: Repository, state: ControllerState, live: IntervalStats,
             breaches_in_window: int, trigger: str = "interval") -> tuple[Decision, ControllerState]:
    """Decide after an interval (or a breach-window overflow); return the record and the next state."""
    if trigger not in TRIGGERS[1:]:
        raise ValueError(f"trigger must be interval or breaches, got {trigger!r}")
    requests = state.requests + live.finished_requests
    memory = BREACH_MEMORY_INTERVALS * slo.reassess_every
    state = dataclasses.replace(state, requests=requests,
                                breached=tuple(mark for mark in state.breached if requests - mark[2] < memory))
    current, same, others = _options(slo, repository, state, live)
    inputs = {"live_depth": live.depth, "live_tokens": live.generated_tokens, "live_breaches": live.breaches,
              "live_breach_share": live.breach_share(), "live_exit_distribution": live.exit_distribution(),
              "breaches_in_window": breaches_in_window, "finished_requests": live.finished_requests}
    options = [e.to_dict() for e in [current, *same, *others]]

    def decide(action: str, reason: str, choice: Estimate, next_state: ControllerState):
        decision = Decision(state.requests, trigger, action, reason, choice.candidate, choice.depth,
                            state.candidate, state.depth, inputs, options)
        return decision, next_state

    unsafe = breaches_in_window > slo.breach_window.limit or not current.feasible
    if unsafe:
        why = (f"{breaches_in_window} breaches in the last {slo.breach_window.tokens} tokens"
               if breaches_in_window > slo.breach_window.limit else "; ".join(current.violations))
        choice, how = _safety_choice(slo, state, same, others)
        if choice is None:
            choice = fallback(slo, repository)
            if (choice.candidate, choice.depth) == (state.candidate, state.depth):
                return decide("stay", f"{why}; {how}, already at the fallback", current, state)
        breached = state.breached + ((state.candidate, state.depth, state.requests),)
        changed = dataclasses.replace(state, candidate=choice.candidate, depth=choice.depth,
                                      last_change_request=state.requests, proposal=None, proposal_count=0,
                                      breached=breached)
        return decide(_action(state, choice), f"{SAFETY}{why}; {how}", choice, changed)

    best = rank([e for e in [current, *same, *others] if e.feasible])[0]
    if (best.candidate, best.depth) == (state.candidate, state.depth):
        return decide("stay", "the current choice scores best", current, dataclasses.replace(state, proposal=None,
                                                                                             proposal_count=0))
    gain = best.score / max(current.score, 1e-12)
    if gain < slo.hysteresis.min_gain:
        return decide("stay", f"best other option gains {gain:.2f}x < min_gain {slo.hysteresis.min_gain}", current,
                      dataclasses.replace(state, proposal=None, proposal_count=0))
    proposal = (best.candidate, best.depth)
    count = state.proposal_count + 1 if state.proposal == proposal else 1
    waiting = dataclasses.replace(state, proposal=proposal, proposal_count=count)
    since = state.requests - state.last_change_request
    if count < slo.hysteresis.stable_reassessments:
        return decide("stay", f"{_action(state, best)} to {best.candidate}@{best.depth} ({gain:.2f}x) seen "
                              f"{count}/{slo.hysteresis.stable_reassessments} times", current, waiting)
    if since < slo.hysteresis.min_requests_between_changes:
        return decide("stay", f"{_action(state, best)} ({gain:.2f}x) waits: {since} requests since the last "
                              f"change < {slo.hysteresis.min_requests_between_changes}", current, waiting)
    changed = dataclasses.replace(state, candidate=best.candidate, depth=best.depth,
                                  last_change_request=state.requests, proposal=None, proposal_count=0)
    return decide(_action(state, best), f"gain: {gain:.2f}x on {slo.objective}", best, changed)


class ReassessLoop:
    """Live steps in, a decision out every `reassess_every` finished requests or at once when the
    breach window overflows: the loop the controller actor runs (and the benchmark, without Ray)."""

    def __init__(self, slo: SLOConfig, repository: Repository, state: ControllerState):
        self.slo, self.repository, self.state = slo, repository, state
        self._new_interval()

    def _new_interval(self) -> None:
        self.window = BreachWindow(self.slo.breach_window.tokens)
        self.interval = IntervalStats(self.state.depth)

    def observe(self, steps: Iterable[StepStats]) -> Decision | None:
        """Feed engine steps; the decision when one was taken after them."""
        for step in steps:
            self.window.observe(step)
            self.interval.observe(step)
        over = self.window.exceeds(self.slo.breach_window.limit)
        if not over and self.interval.finished_requests < self.slo.reassess_every:
            return None
        decision, self.state = reassess(self.slo, self.repository, self.state, self.interval, self.window.count,
                                        "breaches" if over else "interval")
        self._new_interval()
        return decision
