"""The core of bench/controller.py: a phased workload, closed-loop clients, and a served choice
that the HELIOS controller may change while requests run (in one process, no Ray).

- Workload: phases of requests in order (chat, then GSM8K, then summarisation); a closed loop of
  `concurrency` clients, each sending the next request of the list when its previous one ends.
- Serving: one engine serves new requests. A decision loads the new (candidate, depth) in a
  background thread while the old engine keeps serving (as the switcher's surge does on Ray
  Serve); once loaded, new requests go to it and the old engine drains: its started requests
  finish there, and (`handoff`, as a replaced replica does) those still waiting with nothing
  produced move to the new engine, keeping their arrival time; none is dropped. The load's time
  and CPU fall inside the run's wall time.
- Controller: the pure functions of controller/ (start, ReassessLoop),
  fed the serving engine's StepStats exactly as controller.actor.Controller.observe does.
- Synthetic exits (the ceiling): an engine built with an exit_profile draws each token's exit
  from it; `phase_profiles` replaces the profile when the workload's phase changes, so the
  exits a workload needs move with its mix.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from controller.memory import prefix_engine
from controller.quality import answer_accuracy
from controller.reassess import Decision, ReassessLoop, start
from controller.repository import Repository
from controller.slo import SLOConfig
from helios import EngineConfig, LLMEngine, SamplingParams


@dataclass(frozen=True)
class Request:
    index: int
    phase: str
    prompt: str
    answer: str | None = None  # GSM8K: the reference solution ending with the final number


@dataclass
class Record:
    """One request as a client saw it (times: time.perf_counter())."""

    request: Request
    served_by: str  # candidate@depth of the engine that answered it
    arrival: float
    first_token: float | None = None
    finish: float | None = None
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    exit_layers: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish is not None and self.finish_reason in ("stop", "length")


def engine_config(slo: SLOConfig, repository: Repository, candidate_id: str, depth: int) -> EngineConfig:
    """The engine of `candidate_id` at `depth` with the KV cache the memory budget leaves (as the
    switcher deploys it)."""
    return prefix_engine(slo.candidate(candidate_id).engine_config(), repository.candidates[candidate_id], depth,
                         slo.memory_budget)


class Adaptive:
    """The controller's decisions from its pure loop (controller.reassess.ReassessLoop, as the actor runs it)."""

    def __init__(self, slo: SLOConfig, repository: Repository):
        decision, state = start(slo, repository)
        self.loop = ReassessLoop(slo, repository, state)
        self.decisions: list[Decision] = [decision]

    @property
    def choice(self) -> tuple[str, int]:
        return self.loop.state.candidate, self.loop.state.depth

    def observe(self, step) -> Decision | None:
        """Feed one step of the serving engine; the decision when a reassessment ran."""
        decision = self.loop.observe([step])
        if decision is not None:
            self.decisions.append(decision)
        return decision


class Replica:
    """One loaded engine and the requests it holds."""

    def __init__(self, engine: LLMEngine, name: str):
        self.engine, self.name = engine, name
        self.inflight: dict[str, Record] = {}
        self.swap_row: dict = {}  # the swap that retired it, told when it has drained
        self.synthetic = engine.config.exit_profile is not None
        use_chat = engine.tokenizer is not None and bool(getattr(engine.tokenizer, "chat_template", None))
        self.as_prompt = (lambda text: [{"role": "user", "content": text}]) if use_chat else (lambda text: text)

    def set_profile(self, profile: dict[int, float] | None) -> None:
        if self.synthetic and profile:
            self.engine.runner.exit_profile = profile

    def step(self, now: Callable[[], float]) -> list[Record]:
        """One engine step; the records it finished."""
        done = []
        for out in self.engine.step():
            record = self.inflight.get(out.request_id)
            if record is None:
                continue
            if record.first_token is None and out.new_token_ids:
                record.first_token = now()
            if out.finished:
                record.finish, record.finish_reason = now(), out.finish_reason
                record.token_ids, record.text = list(out.token_ids or []), out.text or ""
                record.exit_layers = list(out.exit_layers or [])
                done.append(self.inflight.pop(out.request_id))
        return done


class BackgroundLoad:
    """Loads an engine in a thread while the loop keeps serving on the old one."""

    def __init__(self, load: Callable[[str, int], LLMEngine], candidate: str, depth: int):
        self.candidate, self.depth, self.engine, self.error = candidate, depth, None, None
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self.thread = threading.Thread(target=self._run, args=(load,), daemon=True)
        self.thread.start()

    def _run(self, load) -> None:
        try:
            self.engine = load(self.candidate, self.depth)
        except Exception as exc:  # reported with the swap; serving stays on the old engine
            self.error = f"{type(exc).__name__}: {exc}"
        self.seconds = time.perf_counter() - self.started

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


@dataclass
class LoopResult:
    records: list[Record]
    wall_s: float
    decisions: list[dict]
    swaps: list[dict]


def _decision_row(decision: Decision, at_request: int) -> dict:
    return {"finished_requests": at_request, "trigger": decision.trigger, "action": decision.action,
            "reason": decision.reason, "candidate": decision.candidate, "depth": decision.depth,
            "previous": None if decision.previous_candidate is None
            else f"{decision.previous_candidate}@{decision.previous_depth}",
            "inputs": {k: v for k, v in decision.inputs.items() if k != "live_exit_distribution"},
            "options": [{k: o[k] for k in ("candidate", "depth", "score", "expected_breaches", "quality",
                                          "agreement", "violations")} for o in decision.options]}


class ServeLoop:
    """Run a workload against a served choice; `adaptive` (optional) may change it while it runs."""

    def __init__(self, workload: list[Request], concurrency: int, max_tokens: int,
                 load: Callable[[str, int], LLMEngine], adaptive: Adaptive | None = None,
                 phase_profiles: dict[str, dict[int, float]] | None = None,
                 progress: Callable[[str], None] = print, progress_every: int = 8, run_id: str = "run",
                 handoff: bool = True):
        self.workload, self.concurrency, self.load, self.adaptive = workload, concurrency, load, adaptive
        self.handoff = handoff
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0)
        self.phase_profiles = phase_profiles or {}
        self.progress, self.progress_every, self.run_id = progress, progress_every, run_id
        self.phase: str | None = None

    def run(self, replica: Replica) -> LoopResult:
        self.current, self.draining, self.pending_load = replica, [], None
        self.records, self.done, self.swaps, self.decision_rows = [], 0, [], []
        if self.adaptive is not None:
            self.decision_rows.append(_decision_row(self.adaptive.decisions[0], 0))
        queue = list(reversed(self.workload))
        self.started = time.perf_counter()
        while queue or self._inflight():
            while queue and self._inflight() < self.concurrency:
                self._submit(queue.pop())
            self._finish_load()
            self._step_current()
            for old in list(self.draining):
                self._finish(old.step(time.perf_counter))
                if not old.inflight:
                    self.draining.remove(old)
                    old.swap_row["drained_at_s"] = round(time.perf_counter() - self.started, 2)
        wall = time.perf_counter() - self.started
        if self.pending_load is not None:  # the run ended before the load did: recorded, never used
            self.pending_load.thread.join()
            self.swaps.append({"to": f"{self.pending_load.candidate}@{self.pending_load.depth}",
                               "load_s": self.pending_load.seconds, "used": False})
        return LoopResult(self.records, wall, self.decision_rows, self.swaps)

    def _inflight(self) -> int:
        return len(self.current.inflight) + sum(len(r.inflight) for r in self.draining)

    def _submit(self, request: Request) -> None:
        if request.phase != self.phase:
            self.phase = request.phase
            self.current.set_profile(self.phase_profiles.get(request.phase))
        record = Record(request, self.current.name, time.perf_counter())
        self._add(record, f"{self.run_id}-{request.index}")

    def _add(self, record: Record, request_id: str) -> None:
        record.served_by = self.current.name
        try:
            self.current.engine.add_request(self.current.as_prompt(record.request.prompt), self.params, request_id)
        except ValueError as exc:  # refused: counted as failed, never silently dropped
            record.error = str(exc)
            self.records.append(record)
            return
        self.current.inflight[request_id] = record

    def _step_current(self) -> None:
        if not self.current.engine.has_unfinished():
            if self.pending_load is not None:
                time.sleep(0.005)  # only the load is running: let it have the CPU
            return
        self._finish(self.current.step(time.perf_counter))
        if self.adaptive is None or self.pending_load is not None:
            return  # no reassessment while a change is being applied (as the actor's apply thread)
        decision = self.adaptive.observe(self.current.engine.last_step)
        if decision is None:
            return
        self.decision_rows.append(_decision_row(decision, self.done))
        self.progress(f"  [{self.run_id}] decision after {self.done} requests: {decision.action} "
                      f"{decision.candidate}@{decision.depth} ({decision.reason})")
        if decision.changed:
            self.pending_load = BackgroundLoad(self.load, decision.candidate, decision.depth)

    def _finish_load(self) -> None:
        load = self.pending_load
        if load is None or not load.done:
            return
        self.pending_load = None
        swap = {"from": self.current.name, "to": f"{load.candidate}@{load.depth}", "load_s": round(load.seconds, 2),
                "at_s": round(time.perf_counter() - self.started, 2), "at_request": self.done,
                "inflight_on_old": len(self.current.inflight), "used": load.error is None, "error": load.error}
        self.swaps.append(swap)
        if load.error is not None:
            self.progress(f"  [{self.run_id}] loading {swap['to']} failed ({load.error}); {swap['from']} serves on")
            return
        old, self.current = self.current, Replica(load.engine, swap["to"])
        self.current.set_profile(self.phase_profiles.get(self.phase))
        handed = old.engine.release_unstarted() if self.handoff else []
        for request_id in handed:  # nothing of theirs was produced: the new engine serves them whole
            self._add(old.inflight.pop(request_id), request_id)
        swap["handed_off"] = len(handed)
        self.progress(f"  [{self.run_id}] swap to {swap['to']} after {swap['load_s']} s of loading; "
                      f"{len(handed)} waiting requests handed to it, {len(old.inflight)} finish on {swap['from']}")
        if old.inflight:
            old.swap_row = swap
            self.draining.append(old)
        else:
            swap["drained_at_s"] = swap["at_s"]

    def _finish(self, records: list[Record]) -> None:
        for record in records:
            self.records.append(record)
            self.done += 1
            if self.done % self.progress_every == 0:
                elapsed = time.perf_counter() - self.started
                tokens = sum(len(r.token_ids) for r in self.records)
                self.progress(f"  [{self.run_id}] {self.done}/{len(self.workload)} done ({record.request.phase}, "
                              f"{record.served_by}), {tokens / elapsed:.1f} tok/s so far")


def _p95(values: list[float]) -> float | None:
    return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))] if values else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(result: LoopResult, workload: list[Request]) -> dict:
    """Speed, latency, accuracy and request accounting of one run (quality is added by the caller)."""
    by_index = {r.request.index: r for r in result.records}
    ok = [r for r in result.records if r.ok]
    lost = [q.index for q in workload if q.index not in by_index]
    failed = [r.request.index for r in result.records if not r.ok]
    latencies = [r.finish - r.arrival for r in ok]
    ttfts = [r.first_token - r.arrival for r in ok if r.first_token is not None]
    tokens = sum(len(r.token_ids) for r in ok)
    gsm = [r for r in ok if r.request.answer is not None]
    layers = [layer for r in ok for layer in r.exit_layers]
    return {"requests": len(workload), "finished": len(ok), "failed": len(failed) + len(lost),
            "failed_requests": sorted(failed + lost), "output_tokens": tokens, "wall_s": result.wall_s,
            "tokens_per_s": tokens / result.wall_s if result.wall_s else 0.0,
            "mean_response_s": _mean(latencies), "p95_response_s": _p95(latencies),
            "mean_ttft_s": _mean(ttfts), "p95_ttft_s": _p95(ttfts),
            "mean_exit_layer": _mean(layers),
            "gsm8k_accuracy": answer_accuracy([r.text for r in gsm], [r.request.answer for r in gsm]) if gsm else None,
            "served_by": dict(Counter(r.served_by for r in result.records)),
            "phases": _phase_figures(ok), "decisions": result.decisions, "swaps": result.swaps}


def _phase_figures(records: list[Record]) -> dict:
    phases: dict[str, list[Record]] = {}
    for r in records:
        phases.setdefault(r.request.phase, []).append(r)
    return {phase: {"requests": len(rs), "output_tokens": sum(len(r.token_ids) for r in rs),
                    "mean_response_s": _mean([r.finish - r.arrival for r in rs]),
                    "mean_exit_layer": _mean([layer for r in rs for layer in r.exit_layers])}
            for phase, rs in phases.items()}
