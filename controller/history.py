"""The controller's history: one JSON object per line, appended, read back after a restart.

Each line is {"kind": "decision", ...Decision.to_dict()} (live profiles will add
{"kind": "profile", ...}). A restarted controller takes its state from the last decision: what
is served, the request count, and when the last change happened; the breach window and the
interval figures start empty (they describe traffic the restart missed anyway).
"""

from __future__ import annotations

import json
from pathlib import Path

from controller.reassess import ControllerState, Decision


def append(path: str | Path, kind: str, record: dict) -> None:
    with Path(path).open("a") as file:  # one write per line: a crash leaves at most a torn last line
        file.write(json.dumps({"kind": kind, **record}, sort_keys=True) + "\n")


def read(path: str | Path) -> list[dict]:
    """Every complete record (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def record_decision(path: str | Path, decision: Decision) -> None:
    append(path, "decision", decision.to_dict())


def resume_state(records: list[dict]) -> ControllerState | None:
    """The state after the last decision in `records` (None: no decision yet)."""
    decisions = [r for r in records if r.get("kind") == "decision"]
    if not decisions:
        return None
    last = decisions[-1]
    changes = [d for d in decisions if (d["candidate"], d["depth"]) != (d["previous_candidate"], d["previous_depth"])]
    last_change = changes[-1]["request_count"] if changes else 0
    return ControllerState(last["candidate"], last["depth"], requests=last["request_count"],
                           last_change_request=last_change)
