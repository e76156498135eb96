"""Length-aware policies with fake sequences: SPF order, the aging bound against an adversarial
stream of short jobs (in the waiting queue, and for a parked prefilled job), fresh arrivals
ranked after their prefill, longest-remaining preemption, and KV reservation preventing preemption."""

from helios.block_manager import BlockManager
from helios.policies import ReservingSPFPolicy, SPFPolicy, make_policy, remaining_work
from helios.sampling_params import SamplingParams
from helios.scheduler import FCFSPolicy, SampledToken, Scheduler
from helios.sequence import Sequence


def seq(name: str, prompt_len: int, predicted: int | None, arrival: float, max_tokens: int = 1000) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                    arrival_time=arrival, predicted_length=predicted)


def step(scheduler: Scheduler, lengths: dict[str, int]) -> list[str]:
    """One step; every sampled sequence gets a token and stops at its true length. Returns newly admitted ids."""
    before = set(id(s) for s in scheduler.running)
    batch = scheduler.schedule()
    sampled = [SampledToken(c.seq, 7, 1, None, "stop" if len(c.seq.output_ids) + 1 >= lengths[c.seq.request_id]
                            else None) for c in batch.chunks if c.sample]
    scheduler.update(batch, sampled, now=0.0)
    return [c.seq.request_id for c in batch.chunks if id(c.seq) not in before]


def test_spf_admits_shortest_predicted_first_and_fcfs_among_unknowns():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64, policy=SPFPolicy(aging=0))
    for s in (seq("long", 2, 50, 0.0), seq("short", 2, 3, 1.0), seq("mid", 2, 10, 2.0)):
        scheduler.add(s)
    assert [s.request_id for s in scheduler.waiting] == ["short", "mid", "long"]
    fresh = SPFPolicy(aging=0).new_queue()
    for s in (seq("a", 2, None, 0.0), seq("b", 2, None, 1.0)):
        fresh.push(s)
    assert [s.request_id for s in fresh] == ["a", "b"]


def _admission_time_of_long(aging: float, steps: int = 300) -> int | None:
    """One long job waits while a short job (predicted 1) arrives every step, forever; one slot, no lookahead."""
    scheduler = Scheduler(BlockManager(256, 4), max_num_seqs=1, max_num_batched_tokens=64,
                          policy=SPFPolicy(aging, lookahead=0))
    lengths = {"long": 1}
    scheduler.add(seq("long", 2, 100, arrival=0.0))
    for t in range(steps):
        name = f"short{t}"
        lengths[name] = 1
        scheduler.add(seq(name, 2, 1, arrival=float(t + 1)))
        if "long" in step(scheduler, lengths):
            return t
    return None


def test_aging_bounds_the_wait_of_a_long_job_in_an_adversarial_stream():
    # without aging the long job starves; with aging a it is overtaken only by the jobs arriving
    # within (100 - 1) / a seconds after it: here a = 2 -> arrivals at t <= 49.5, i.e. 49 of them
    assert _admission_time_of_long(aging=0.0) is None
    admitted = _admission_time_of_long(aging=2.0)
    assert admitted is not None and admitted <= (100 - 1) / 2.0 + 1
    assert admitted >= 40  # SPF still ran the short ones first for a while


def decoded(scheduler: Scheduler, lengths: dict[str, int], predictions: dict[str, int] = {}) -> list[str]:
    """One step, as `step`, a first token bringing its sequence's prediction (as the length head's
    does, from the prefill); returns the ids that got a decode chunk."""
    batch = scheduler.schedule()
    sampled = [SampledToken(c.seq, 7, 1, None,
                            "stop" if len(c.seq.output_ids) + 1 >= lengths[c.seq.request_id] else None,
                            predictions.get(c.seq.request_id) if not c.seq.output_ids else None)
               for c in batch.chunks if c.sample]
    decodes = [c.seq.request_id for c in batch.chunks if c.is_decode]  # before update moves num_tokens
    scheduler.update(batch, sampled, now=0.0)
    return decodes


def _finish_order(policy) -> tuple[list[str], dict[str, int]]:
    """A long answer arrives just before a short one; one decode slot. (finish order, preemptions)."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64, policy=policy)
    lengths = {"long": 30, "short": 4}
    jobs = [seq("long", 3, None, 0.0), seq("short", 3, None, 0.1)]  # predicted in their prefill
    for job in jobs:
        scheduler.add(job)
    order = []
    for _ in range(100):
        if not scheduler.has_work():
            break
        decoded(scheduler, lengths, predictions=lengths)
        order += [record.request_id for record in scheduler.take_finished()]
    return order, {job.request_id: job.num_preemptions for job in jobs}


def test_spf_ranks_fresh_arrivals_after_their_prefill():
    # FCFS: the long answer holds the only slot; SPF with lookahead prefills both, and the short
    # one decodes first while the long one is parked with its KV (no preemption, no recompute)
    assert _finish_order(FCFSPolicy())[0] == ["long", "short"]
    assert _finish_order(SPFPolicy(aging=0, lookahead=0))[0] == ["long", "short"]
    assert _finish_order(SPFPolicy(aging=0, lookahead=4)) == (["short", "long"], {"long": 0, "short": 0})


def _first_decode_of_parked_long(aging: float, steps: int = 300) -> int | None:
    """A long job (predicted 100) is prefilled at step 0; a short one (predicted 2) arrives every
    step and wants the one decode slot. The step at which the long job first decodes."""
    scheduler = Scheduler(BlockManager(1024, 4), max_num_seqs=1, max_num_batched_tokens=64,
                          policy=SPFPolicy(aging, lookahead=4))
    lengths = {"long": 1000}
    scheduler.add(seq("long", 2, 100, arrival=0.0))
    for t in range(steps):
        lengths[f"short{t}"] = 2
        scheduler.add(seq(f"short{t}", 2, 2, arrival=float(t + 1)))
        if "long" in decoded(scheduler, lengths):
            return t
    return None


def test_aging_bounds_the_wait_of_a_parked_job():
    # the parked long job's key is 99 (remaining) + 0; short{t}'s is 1 + a (t + 1): it is overtaken
    # only by arrivals within 98 / a seconds after it (a = 2: 49 of them), then it decodes
    assert _first_decode_of_parked_long(aging=0.0) is None
    first = _first_decode_of_parked_long(aging=2.0)
    assert first is not None and 40 <= first <= 98 / 2.0 + 2


def test_preemption_takes_the_longest_predicted_remaining_work():
    policy = SPFPolicy()
    a, b, c = seq("a", 2, 100, 0.0), seq("b", 2, 30, 0.0), seq("c", 2, None, 0.0, max_tokens=50)
    a.output_ids = [7] * 90  # 10 left
    assert policy.preemption_victim([a, b, c]).request_id == "c"  # 50 left: no prediction -> max_tokens
    assert policy.preemption_victim([a, b]).request_id == "b"
    assert policy.preemption_victim([b, seq("b2", 2, 30, 0.0)]).request_id == "b2"  # ties: the latest
    a.output_ids = [7] * 120  # outran its 100: expected to make as many again, capped by max_tokens
    assert remaining_work(a) == 120 and policy.preemption_victim([a, b, c]).request_id == "a"
    a.params = SamplingParams(max_tokens=150)
    assert remaining_work(a) == 30


def test_reservation_prevents_preemption_in_a_memory_tight_case():
    def run(policy):
        blocks = BlockManager(16, 4)
        if isinstance(policy, type):
            policy = policy(blocks) if policy is ReservingSPFPolicy else policy()
        scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64, policy=policy)
        lengths = {f"j{i}": 20 for i in range(3)}
        jobs = [seq(f"j{i}", 2, 20, float(i)) for i in range(3)]
        for job in jobs:
            scheduler.add(job)
        finished = []
        for _ in range(200):
            if not scheduler.has_work():
                break
            step(scheduler, lengths)
            finished += scheduler.take_finished()
        return len(finished), sum(job.num_preemptions for job in jobs)

    # three jobs that each end at 22 tokens (6 blocks) do not fit 16 blocks together
    done, preemptions = run(FCFSPolicy)
    assert done == 3 and preemptions > 0
    assert run(ReservingSPFPolicy) == (3, 0)


def test_make_policy_names():
    blocks = BlockManager(4, 4)
    assert type(make_policy("fcfs", blocks)) is FCFSPolicy
    assert type(make_policy("spf", blocks)) is SPFPolicy
    assert isinstance(make_policy("spf-reserve", blocks), ReservingSPFPolicy)
