"""Prompt files for benchmarks and tuning: Alpaca JSON, JSON lines, ShareGPT."""

from __future__ import annotations

import json
from pathlib import Path

# ../shared/data beside the checkout, when present
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # helios/tuning/ -> checkout -> ..
DEFAULT_DATASET = SHARED_DATA / "gpteacher_roleplay.json"


def _records(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else data.get("data", [])


def _user_text(record: dict) -> str | None:
    if "conversations" in record:  # ShareGPT: the first human turn
        turns = [t for t in record["conversations"] if t.get("from") in ("human", "user")]
        return turns[0]["value"] if turns else None
    if "instruction" in record:  # Alpaca, or self-instruct seeds with instances[0].input
        extra = record.get("input") or (record.get("instances") or [{}])[0].get("input", "")
        return record["instruction"] + (f"\n\n{extra}" if extra else "")
    return record.get("prompt")


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """User prompts from a data file, in file order (default: the shared roleplay set)."""
    path = Path(path) if path else DEFAULT_DATASET
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}: pass --dataset PATH (Alpaca JSON, JSONL or ShareGPT)")
    prompts = [p for p in (_user_text(r) for r in _records(path)) if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts found (expected Alpaca, JSONL prompt/instruction, or ShareGPT records)")
    return prompts[:limit] if limit else prompts


def as_requests(texts: list[str], tokenizer) -> list:
    """Prompts as one-turn chats when the model has a chat template, else as plain text (base models)."""
    if tokenizer is not None and tokenizer.chat_template:
        return [[{"role": "user", "content": t}] for t in texts]
    return list(texts)


def sample_requests(files: list[str], limit: int, tokenizer) -> list:
    """`limit` prompts drawn evenly from the start of each file, formatted by `as_requests`."""
    per_file = -(-limit // len(files))
    return as_requests([p for f in files for p in load_prompts(f, per_file)][:limit], tokenizer)
