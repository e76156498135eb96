"""Pure selection: estimate each (candidate, depth) for the SLO, shortlist, pick the smallest safe prefix.

Inputs are the SLO, the model repository and, for the serving candidate, the live figures of
the last interval; nothing here touches Ray, the engine or a clock.

- Objective scores are "higher is better" so that one gain ratio (hysteresis.min_gain) serves
  every objective: throughput = output tokens/s at the largest profiled batch the memory
  budget holds; latency = 1 / mean response time; energy = 1 / joules per token where the
  repository has a power reading, else tokens/s as throughput (constant power); memory =
  sequences the budget holds.
- Expected breaches at depth d = breach_window.tokens x the share of tokens that would run past
  d (from the live exits where they say it, else the repository's full-depth exit distribution).
- A (candidate, depth) that breaks a constraint is never chosen: its `violations` say why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from controller.memory import sequences_held
from controller.observe import IntervalStats
from controller.repository import CandidateProfile, DepthProfile, Repository
from controller.slo import SLOConfig


@dataclass(frozen=True)
class Estimate:
    candidate: str
    depth: int
    score: float  # the objective, higher is better
    objective_value: float  # in the objective's unit: tok/s, s, J/token or sequences
    quality: float | None  # the SLO's quality proxy (reference agreement or task accuracy)
    agreement: float  # with the candidate's own full depth
    breach_share: float  # expected share of tokens forced out at `depth`
    expected_breaches: float  # per breach window
    sequences: int  # held by the memory budget at this depth
    weight_bytes: int
    violations: tuple[str, ...] = ()

    @property
    def feasible(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {**asdict(self), "violations": list(self.violations), "feasible": self.feasible}


def tail_share(distribution: dict[int, float], depth: int) -> float:
    """Share of tokens that ran (or want to run) more than `depth` layers."""
    return sum(share for layer, share in distribution.items() if layer > depth)


def expected_breach_share(profile: CandidateProfile, depth: int, live: IntervalStats | None = None) -> float:
    """Share of tokens that would be forced out at `depth`; full depth forces none out."""
    if depth >= profile.num_layers:
        return 0.0
    full = profile.full_exit_distribution()
    if live is None or live.generated_tokens == 0:
        return tail_share(full, depth)
    if depth < live.depth:  # exact: each token that ran past `depth` live would be forced out there
        return tail_share(live.exit_distribution(), depth)
    if depth == live.depth:
        return live.breach_share()
    # deeper than the live load: live says how many tokens wanted more than it ran; the
    # repository's full-depth distribution says how far past it they go
    beyond_live = tail_share(full, live.depth)
    if beyond_live == 0:  # the repository saw none go past: assume they all want full depth
        return live.breach_share()
    return live.breach_share() * min(1.0, tail_share(full, depth) / beyond_live)


def throughput_at(profile: DepthProfile, sequences: int) -> float:
    """Tokens/s at the largest profiled batch the budget holds (pro rata below the smallest)."""
    held = [batch for batch in profile.throughput if batch <= sequences]
    if held:
        return profile.throughput[max(held)]
    smallest = min(profile.throughput)
    return profile.throughput[smallest] * sequences / smallest


def objective_figures(objective: str, profile: DepthProfile, sequences: int) -> tuple[float, float]:
    """(value in the objective's unit, score where higher is better)."""
    if objective == "throughput":
        value = throughput_at(profile, sequences)
        return value, value
    if objective == "latency":
        return profile.latency_s, 1.0 / max(profile.latency_s, 1e-9)
    if objective == "energy":
        if profile.energy_j_per_token is not None:
            return profile.energy_j_per_token, 1.0 / max(profile.energy_j_per_token, 1e-12)
        value = throughput_at(profile, sequences)  # constant power: energy per token ~ 1 / tokens/s
        return value, value
    if objective == "memory":
        return float(sequences), float(sequences)
    raise ValueError(f"unknown objective {objective!r}")


def quality_figure(slo: SLOConfig, profile: DepthProfile) -> float | None:
    if slo.constraints.quality_proxy == "task_accuracy":
        return profile.task_accuracy
    return profile.reference_agreement


def _violations(slo: SLOConfig, profile: DepthProfile, quality: float | None, sequences: int,
                expected_breaches: float) -> tuple[str, ...]:
    limits = slo.constraints
    found = []
    if quality is None and limits.min_quality > 0:
        found.append(f"{limits.quality_proxy} not measured")
    elif quality is not None and quality < limits.min_quality:
        found.append(f"{limits.quality_proxy} {quality:.3f} < {limits.min_quality}")
    if profile.agreement < limits.min_agreement:
        found.append(f"agreement {profile.agreement:.3f} < {limits.min_agreement}")
    if limits.p95_ttft_s is not None and profile.ttft_p95_s > limits.p95_ttft_s:
        found.append(f"p95 TTFT {profile.ttft_p95_s:.3f}s > {limits.p95_ttft_s}s")
    if limits.p95_tpot_s is not None and profile.tpot_p95_s > limits.p95_tpot_s:
        found.append(f"p95 TPOT {profile.tpot_p95_s:.4f}s > {limits.p95_tpot_s}s")
    if sequences < 1:
        found.append("the memory budget holds no sequence at this depth")
    if expected_breaches > slo.breach_window.limit:
        found.append(f"expected breaches {expected_breaches:.1f} > {slo.breach_window.limit} per window")
    return tuple(found)


def evaluate(slo: SLOConfig, repository: Repository, candidate_id: str, depth: int,
             live: IntervalStats | None = None) -> Estimate:
    """Estimate one (candidate, depth); `live` = the serving candidate's last interval, if it is this one."""
    profile = repository.candidates[candidate_id]
    at_depth = profile.depths[depth]
    block_size = slo.candidate(candidate_id).engine.block_size
    sequences = sequences_held(profile, depth, slo.memory_budget, slo.tokens_per_sequence, block_size)
    share = expected_breach_share(profile, depth, live)
    expected = share * slo.breach_window.tokens
    value, score = objective_figures(slo.objective, at_depth, sequences)
    quality = quality_figure(slo, at_depth)
    return Estimate(candidate_id, depth, score, value, quality, at_depth.agreement, share, expected, sequences,
                    profile.weight_bytes(depth), _violations(slo, at_depth, quality, sequences, expected))


def allowed_depths(slo: SLOConfig, repository: Repository, candidate_id: str) -> list[int]:
    """Depths the SLO allows and the repository has figures for, ascending."""
    profiled = repository.candidates[candidate_id].depths if candidate_id in repository.candidates else {}
    return [d for d in slo.candidate(candidate_id).depths if d in profiled]


def choose_depth(slo: SLOConfig, repository: Repository, candidate_id: str,
                 live: IntervalStats | None = None) -> Estimate | None:
    """Greedy partial load: the smallest allowed depth that meets every constraint (None: none does)."""
    for depth in allowed_depths(slo, repository, candidate_id):
        estimate = evaluate(slo, repository, candidate_id, depth, live)
        if estimate.feasible:
            return estimate
    return None


def rank(estimates: list[Estimate]) -> list[Estimate]:
    """Best score first; ties go to the smaller load."""
    return sorted(estimates, key=lambda e: (-e.score, e.weight_bytes, e.candidate))


def shortlist(slo: SLOConfig, repository: Repository) -> list[Estimate]:
    """The K candidates whose smallest safe prefix scores best, each at that prefix."""
    chosen = [choose_depth(slo, repository, c.id) for c in slo.candidates if c.id in repository.candidates]
    return rank([e for e in chosen if e is not None])[: slo.shortlist_size]


def initial_choice(slo: SLOConfig, repository: Repository) -> Estimate:
    """What to deploy first: the best of the shortlist; with no safe option, a fallback that keeps quality."""
    best = shortlist(slo, repository)
    return best[0] if best else fallback(slo, repository)


def fallback(slo: SLOConfig, repository: Repository) -> Estimate:
    """No option meets every constraint: serve the highest-quality candidate at full depth (it breaks
    the fewest promises; the decision record says which it still breaks)."""
    options = [evaluate(slo, repository, c.id, max(allowed_depths(slo, repository, c.id)))
               for c in slo.candidates if allowed_depths(slo, repository, c.id)]
    if not options:
        raise ValueError("the model repository has no figures for any candidate at an allowed depth")
    return max(options, key=lambda e: (len(e.violations) == 0, e.quality or 0.0, e.agreement, e.score))
