"""Live profiling: a few served prompts, mirrored, run again on each shortlisted candidate.

The ingress offers finished requests (deployments/mirror.py; never answered twice: the client
only ever gets the served replica's answer, the profiler's replies go nowhere but the figures).
A round keeps at most `profiling_prompts` samples, then runs every shortlisted candidate
(selector.shortlist, each at its smallest safe depth, selector.choose_depth) on them greedily,
one candidate loaded at a time (loaded lazily, freed after), and appends one record per
candidate to the SLO's history file as kind "live_profile":

    {"kind": "live_profile", "candidate": "qwen", "depth": 4, "prompts": 5, "time": 1764681234.5,
     "served": {"candidate": "llama", "depth": 2, ...} | null,   # the controller's state at the round
     "throughput_tok_s": 41.0,      # output tokens/s, the samples generated together as one batch
     "ttft_s", "ttft_p95_s", "tpot_s", "tpot_p95_s", "latency_s",   # batch 1, per prompt (profile_command)
     "exit_distribution": {"2": 0.4, "4": 0.6}, "breach_share": 0.1, "generated_tokens": 60,
     "served_agreement": 0.8 | null, "reference": "qwen" | null, "reference_agreement": 1.0 | null}

A candidate that cannot run the samples (e.g. chat messages to a model without a chat template)
gets a record with "error" instead of figures.

The quality proxy, and why:
- `served_agreement`: word agreement (controller/profile_command.word_agreement: share of the
  served answer's whitespace words matched position by position) between the candidate's greedy
  reply and the answer the client actually got. It needs no labels and exists for every sample,
  and it says how much a switch would change what clients see. Words rather than tokens so that
  candidates with different tokenizers compare. Only samples that were served greedily count
  (a sampled answer is not a reference a greedy replay can match); null when none was.
- `reference_agreement`: word agreement with the strongest candidate's greedy reply on the same
  prompts, when the strongest (the repository's `reference`: best task accuracy, else the
  largest) is in the shortlist. It is the live counterpart of the repository's
  reference_agreement, which the selector holds against `constraints.min_quality`, so the two
  can be compared directly.

Run cost: the round runs in a thread of the profiler's own process at nice +10 (on Linux a
thread's niceness is its own, and the torch threads it starts inherit it) with one torch thread,
in an actor that reserves no CPU: it takes what serving leaves idle. Replies are capped at
`max_tokens` (chat requests without max_tokens would otherwise run to the context's end), and
rounds start at most every `min_interval_s`.

Pure parts (samples, the bound, lengths, the record, the quality figures) are plain functions;
the engine is imported lazily inside `run_candidate`, so importing this module loads no torch.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from controller import history
from controller.metrics import ControllerMetrics
from controller.profile_command import engine_options, greedy_run, latency_figures, word_agreement
from controller.repository import Repository
from controller.selector import shortlist
from controller.slo import Candidate, SLOConfig
from deployments.mirror import CONTROLLER_ACTOR, NAMESPACE, PROFILER_ACTOR, portable

logger = logging.getLogger("helios.live_profile")
KIND = "live_profile"
MAX_TOKENS = 64  # reply cap per sample while profiling
MIN_INTERVAL_S = 600.0  # between the starts of two rounds
KV_CACHE_MEMORY = 128 << 20  # the profiler's own engine: a few sequences, not the serving budget
NICENESS = 10


@dataclass(frozen=True)
class Sample:
    """One served choice, as deployments/mirror.py sends it."""

    prompt: str | list[dict]
    max_tokens: int
    greedy: bool
    text: str
    completion_tokens: int
    finish_reason: str


def parse_sample(data: dict) -> Sample | None:
    """A Sample, or None for anything a candidate cannot replay (token ids, unfinished, malformed)."""
    try:
        sample = Sample(data["prompt"], int(data["max_tokens"]), bool(data["greedy"]), str(data["text"]),
                        int(data["completion_tokens"]), str(data["finish_reason"]))
    except (KeyError, TypeError, ValueError):
        return None
    return sample if portable(sample.prompt) and sample.max_tokens >= 1 else None


def take(buffer: list[Sample], offered: list[dict], limit: int) -> int:
    """Add offered samples to `buffer` while it holds fewer than `limit`; return how many were taken."""
    taken = 0
    for data in offered:
        if len(buffer) >= limit:
            break
        sample = parse_sample(data)
        if sample is not None:
            buffer.append(sample)
            taken += 1
    return taken


def reply_lengths(samples: list[Sample], cap: int) -> list[int]:
    """Tokens each sample's replay may generate: what the client asked for, at most `cap`."""
    return [max(1, min(s.max_tokens, cap)) for s in samples]


def served_agreement(replies: list[str], samples: list[Sample], cap: int) -> float | None:
    """Word agreement with the served answers, over the samples served greedily (None: none was).

    A served answer longer than the replay's cap is scored only as far as the replay went (its
    last, perhaps cut, word left out): the cap, not the candidate, ended the replay there."""
    pairs = []
    for reply, sample in zip(replies, samples):
        if not sample.greedy:
            continue
        served = sample.text
        if sample.completion_tokens > cap:
            served = " ".join(served.split()[: max(0, len(reply.split()) - 1)])
        pairs.append((reply, served))
    if not pairs:
        return None
    return word_agreement([p[0] for p in pairs], [p[1] for p in pairs])


def quality_figures(replies: list[str], samples: list[Sample], cap: int, reference: str | None,
                    reference_replies: list[str] | None) -> dict:
    return {"served_agreement": served_agreement(replies, samples, cap),
            "reference": reference if reference_replies is not None else None,
            "reference_agreement": word_agreement(replies, reference_replies) if reference_replies is not None
            else None}


def live_record(candidate: str, depth: int, samples: list[Sample], figures: dict, served: dict | None,
                now: float) -> dict:
    """The history record of one candidate's run on one round's samples."""
    return {"candidate": candidate, "depth": depth, "prompts": len(samples), "time": now, "served": served,
            **figures}


def run_candidate(candidate: Candidate, depth: int, samples: list[Sample], cap: int,
                  kv_cache_memory: int) -> tuple[dict, list[str]]:
    """Load `candidate` at `depth`, replay `samples` greedily, free it; (speed and exit figures, replies)."""
    from helios import LLM
    from helios.sampling_params import SamplingParams

    llm = LLM(candidate.source, max_layers=depth, **engine_options(candidate, kv_cache_memory))
    try:
        prompts, lengths = [s.prompt for s in samples], reply_lengths(samples, cap)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up, out of the timings
        # together, as a batch: replies beyond a shorter served answer are not scored (the reference
        # sets the length), so one length for all changes no quality figure
        outputs, figures, seconds = greedy_run(llm, prompts, SamplingParams(max_tokens=max(lengths), temperature=0))
        generated = sum(len(o.token_ids) for o in outputs)
        figures.update(latency_figures(llm, prompts, lengths), generated_tokens=generated,
                       throughput_tok_s=generated / seconds if seconds > 0 else 0.0)
        return figures, [o.text for o in outputs]
    finally:
        del llm
        gc.collect()


def profile_round(slo: SLOConfig, repository: Repository, samples: list[Sample], served: dict | None = None,
                  cap: int = MAX_TOKENS, kv_cache_memory: int = KV_CACHE_MEMORY,
                  clock: Callable[[], float] = time.time) -> list[dict]:
    """Run every shortlisted candidate on `samples`, the reference first when shortlisted; append
    and return one record each."""
    chosen = shortlist(slo, repository)
    reference = repository.reference if any(e.candidate == repository.reference for e in chosen) else None
    chosen.sort(key=lambda e: e.candidate != reference)  # stable: the reference first, the rest in rank order
    records, reference_replies = [], None
    for estimate in chosen:
        try:
            figures, replies = run_candidate(slo.candidate(estimate.candidate), estimate.depth, samples, cap,
                                             kv_cache_memory)
            if estimate.candidate == reference:
                reference_replies = replies
            figures.update(quality_figures(replies, samples, cap, reference, reference_replies))
        except Exception as exc:  # one candidate that cannot run the samples does not end the round
            logger.warning("live profile of %s@%d failed: %r", estimate.candidate, estimate.depth, exc)
            figures = {"error": repr(exc)}
        record = live_record(estimate.candidate, estimate.depth, samples, figures, served, clock())
        history.append(slo.history, KIND, record)
        records.append(record)
    return records


def controller_state() -> dict | None:
    """Which candidate and depth answer now, from the controller actor (None: it does not run)."""
    import ray

    try:
        state = ray.get(ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE).current.remote(), timeout=10)
    except Exception:
        return None
    return {"candidate": state["candidate"], "depth": state["depth"]}


class LiveProfiler:
    """Collects samples and runs rounds in a background thread; `ProfilerActor` is the Ray actor around it."""

    def __init__(self, slo: SLOConfig, repository: Repository, max_tokens: int = MAX_TOKENS,
                 min_interval_s: float = MIN_INTERVAL_S, kv_cache_memory: int = KV_CACHE_MEMORY,
                 threads: int = 1, served: Callable[[], dict | None] | None = controller_state,
                 metrics: bool = False):
        self.slo, self.repository = slo, repository
        # helios_profiling_runs_total, where a Ray metrics exporter runs (the actor, not unit tests)
        self.metrics = ControllerMetrics(slo.model) if metrics else None
        self.max_tokens, self.min_interval_s, self.kv_cache_memory = max_tokens, min_interval_s, kv_cache_memory
        self.threads, self.served = threads, served
        self.lock = threading.Lock()
        self.buffer: list[Sample] = []
        self.busy = False
        self.last_start = float("-inf")
        self.rounds = 0
        self.worker: threading.Thread | None = None

    def wants(self) -> bool:
        """Whether samples are wanted now: no round running, the buffer not full, the interval over."""
        with self.lock:
            return self._wants()

    def _wants(self) -> bool:
        return (not self.busy and len(self.buffer) < self.slo.profiling_prompts
                and time.monotonic() - self.last_start >= self.min_interval_s)

    def offer(self, samples: list[dict]) -> int:
        """Take what the round still needs (the rest is dropped); a full buffer starts the round."""
        with self.lock:
            if not self._wants():
                return 0
            taken = take(self.buffer, samples, self.slo.profiling_prompts)
            if len(self.buffer) >= self.slo.profiling_prompts:
                round_samples, self.buffer = self.buffer, []
                self.busy, self.last_start = True, time.monotonic()
                self.worker = threading.Thread(target=self._round, args=(round_samples,), daemon=True,
                                               name="helios-live-profile")
                self.worker.start()
            return taken

    def _round(self, samples: list[Sample]) -> None:
        try:
            os.nice(NICENESS)  # this thread only (Linux): serving keeps its priority
            import torch

            torch.set_num_threads(self.threads)
            served = self.served() if self.served else None
            records = profile_round(self.slo, self.repository, samples, served, self.max_tokens, self.kv_cache_memory)
            if self.metrics is not None:
                self.metrics.profiled(sum("error" not in record for record in records))
        except Exception:
            logger.exception("live profiling round failed")
        finally:
            with self.lock:
                self.busy = False
                self.rounds += 1

    def status(self) -> dict:
        with self.lock:
            return {"buffered": len(self.buffer), "busy": self.busy, "rounds": self.rounds, "wants": self._wants()}


def _actor_class():
    import ray

    # max_concurrency > 1: `wants`/`offer` answer while another call waits; rounds run in their own thread
    return ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=4)(LiveProfiler)


def start_profiler(slo: SLOConfig, repository: Repository, detached: bool = False, **options):
    """Create (or find) the named profiler actor; `detached` lets it outlive the creating driver.

    Keep the returned handle for as long as serving runs: Ray destroys an actor that is not
    detached once no handle to it is left, named or not. `options`: LiveProfiler's keywords."""
    actor_options = {"name": PROFILER_ACTOR, "namespace": NAMESPACE, "get_if_exists": True}
    if detached:
        actor_options["lifetime"] = "detached"
    return _actor_class().options(**actor_options).remote(slo, repository, **{"metrics": True, **options})


def get_profiler():
    import ray

    return ray.get_actor(PROFILER_ACTOR, namespace=NAMESPACE)
