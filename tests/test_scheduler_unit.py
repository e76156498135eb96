"""The scheduler on its own: a BlockManager and fake sequences, no model."""

from helios.block_manager import BlockManager
from helios.sampling_params import SamplingParams
from helios.scheduler import FCFSPolicy, SampledToken, Scheduler
from helios.sequence import Sequence, SequenceStatus


def seq(name: str, prompt_len: int, predicted: int | None = None) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100), predicted_length=predicted)


def run_step(scheduler: Scheduler, finish: set[str] = frozenset()) -> list[str]:
    """Schedule, 'run', and give every sampled sequence token 7; return the scheduled ids."""
    batch = scheduler.schedule()
    sampled = [SampledToken(c.seq, 7, 1, None, "stop" if c.seq.request_id in finish else None)
               for c in batch.chunks if c.sample]
    scheduler.update(batch, sampled, now=1.0)
    return [c.seq.request_id for c in batch.chunks]


def test_admission_in_arrival_order_within_budget_and_decodes_first():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    for s in (seq("a", 6), seq("b", 6), seq("c", 3)):
        scheduler.add(s)
    batch = scheduler.schedule()
    assert [(c.seq.request_id, c.start, c.end) for c in batch.chunks] == [("a", 0, 6), ("b", 0, 4)]
    scheduler.update(batch, [SampledToken(batch.chunks[0].seq, 7, 1, None, None)], now=1.0)
    batch = scheduler.schedule()  # a decodes first, then b's rest, then c
    assert [(c.seq.request_id, c.start, c.end) for c in batch.chunks] == [("a", 6, 7), ("b", 4, 6), ("c", 0, 3)]


def test_update_appends_advances_and_finishes_with_a_record():
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(blocks, 8, 64)
    a, b = seq("a", 5), seq("b", 3)
    scheduler.add(a), scheduler.add(b)
    run_step(scheduler)
    assert a.output_ids == [7] and a.num_computed_tokens == 5 and a.first_token_time == 1.0
    run_step(scheduler, finish={"a"})
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "stop" and a.block_table == []
    assert scheduler.running == [b] and blocks.usage == 1 / 16  # b's 5 tokens fit one block
    (record,) = scheduler.take_finished()
    assert (record.request_id, record.num_output_tokens, record.finish_reason) == ("a", 2, "stop")
    assert scheduler.take_finished() == []


class LongestPredictedFirstOut(FCFSPolicy):
    """Preempt the sequence with the most predicted work left."""

    def preemption_victim(self, candidates):
        return max(candidates, key=lambda s: s.predicted_length - len(s.output_ids))


def test_policy_chooses_the_preemption_victim_and_nothing_is_lost():
    blocks = BlockManager(3, 4)  # 12 tokens
    scheduler = Scheduler(blocks, 8, 64, policy=LongestPredictedFirstOut())
    short, long = seq("short", 4, predicted=5), seq("long", 4, predicted=500)
    scheduler.add(long), scheduler.add(short)
    run_step(scheduler)  # both prompts in; 2 blocks used
    run_step(scheduler)  # both need a second block: one is free
    run_step(scheduler)
    assert long.status is SequenceStatus.WAITING and long.num_preemptions == 1 and long.num_computed_tokens == 0
    assert short.status is SequenceStatus.RUNNING and list(scheduler.waiting) == [long]
    assert long.output_ids  # its tokens are kept and recomputed later, never lost
    for _ in range(3):
        run_step(scheduler, finish={"short"})
    assert short.finished and long.status is SequenceStatus.RUNNING


def test_fcfs_preempts_the_latest_admitted():
    scheduler = Scheduler(BlockManager(3, 4), 8, 64)
    first, second = seq("first", 4), seq("second", 4)
    scheduler.add(first), scheduler.add(second)
    for _ in range(3):
        run_step(scheduler)
    assert second.num_preemptions == 1 and first.num_preemptions == 0


class SkipOdd(FCFSPolicy):
    def can_admit(self, seq, running):
        return not seq.request_id.endswith("odd")


def test_a_policy_can_pass_over_a_waiting_sequence():
    scheduler = Scheduler(BlockManager(32, 4), 8, 64, policy=SkipOdd())
    for name in ("a", "b-odd", "c"):
        scheduler.add(seq(name, 3))
    assert run_step(scheduler) == ["a", "c"]
    assert [s.request_id for s in scheduler.waiting] == ["b-odd"]


def test_finish_of_a_waiting_sequence_removes_it():
    scheduler = Scheduler(BlockManager(32, 4), 8, 64)
    a = seq("a", 3)
    scheduler.add(a)
    scheduler.finish(a, "abort")
    assert len(scheduler.waiting) == 0 and not scheduler.has_work()
    assert scheduler.take_finished()[0].finish_reason == "abort"
