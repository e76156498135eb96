"""The quality proxy: pure functions on token lists and answer texts.

Which proxy, and why:
- Depth choice: token agreement of a prefix load's greedy output with the same candidate's
  full-depth greedy output on the same prompts (share of reference positions holding the same
  token). A prefix load can only lose what full depth would have said, so full depth is the
  right reference, needs no labels and can be measured on live prompts.
- Model choice: agreement with the strongest candidate's full-depth greedy output
  (`reference_agreement`; the strongest is the one with the best task accuracy, else the
  largest), or task accuracy where the prompts carry answers (GSM8K: the last number of the
  reply against the reference's final number). Agreement is reference-free for the live
  traffic, as HELIOS's proxies are; accuracy is the honest figure where answers exist.
"""

from __future__ import annotations

import re
from typing import Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def token_agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Share of reference tokens matched position by position, over all prompts (1.0 = identical).

    Positions past the end of a shorter output count as misses; extra tokens of a longer output
    are not counted (the reference sets the length).
    """
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    total = sum(len(r) for r in references)
    if total == 0:
        return 1.0
    matched = sum(sum(a == b for a, b in zip(out, ref)) for out, ref in zip(outputs, references))
    return matched / total


def final_number(text: str) -> str | None:
    """The last number in a text, commas dropped (GSM8K answers end with it: '#### 72')."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def answer_accuracy(replies: Sequence[str], answers: Sequence[str]) -> float:
    """Share of replies whose final number equals the answer's final number."""
    if len(replies) != len(answers):
        raise ValueError(f"{len(replies)} replies for {len(answers)} answers")
    if not answers:
        return 0.0
    right = sum(final_number(r) is not None and final_number(r) == final_number(a) for r, a in zip(replies, answers))
    return right / len(answers)


def exit_distribution(exit_layers: Sequence[Sequence[int]]) -> dict[int, float]:
    """Share of generated tokens by decoder layers run, from each output's `exit_layers`."""
    counts: dict[int, int] = {}
    for layers in exit_layers:
        for layer in layers:
            counts[layer] = counts.get(layer, 0) + 1
    total = sum(counts.values())
    return {layer: counts[layer] / total for layer in sorted(counts)} if total else {}
