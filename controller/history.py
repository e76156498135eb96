"""The controller's history: one JSON object per line, appended, read back after a restart.

Each line is {"kind": "decision", ...Decision.to_dict()}, written before the decision is
applied, or {"kind": "applied", candidate, depth, seconds}, written once its redeploy is done
(live profiles add {"kind": "profile", ...}). A restarted controller takes its state from the
last decision: what is served, the request count, and when the last change happened; the
breach window and the interval figures start empty (they describe traffic the restart missed
anyway). A change decided but not recorded as applied (the controller died during the redeploy)
is applied again.
"""

from __future__ import annotations

import json
from pathlib import Path

from controller.reassess import SAFETY, ControllerState, Decision


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


def record_applied(path: str | Path, candidate: str, depth: int, seconds: float) -> None:
    append(path, "applied", {"candidate": candidate, "depth": depth, "seconds": round(seconds, 3)})


def applied_after_last_change(records: list[dict]) -> bool:
    """Whether the last decision that changed what is served (or the start) was applied after it."""
    last_change = None
    for index, record in enumerate(records):
        if record.get("kind") == "decision" and (record["candidate"], record["depth"]) != (
                record["previous_candidate"], record["previous_depth"]):
            last_change = index
    if last_change is None:
        return True
    target = (records[last_change]["candidate"], records[last_change]["depth"])
    return any(r.get("kind") == "applied" and (r["candidate"], r["depth"]) == target
               for r in records[last_change + 1:])


def resume_state(records: list[dict]) -> ControllerState | None:
    """The state after the last decision in `records` (None: no decision yet)."""
    decisions = [r for r in records if r.get("kind") == "decision"]
    if not decisions:
        return None
    last = decisions[-1]
    changes = [d for d in decisions if (d["candidate"], d["depth"]) != (d["previous_candidate"], d["previous_depth"])]
    last_change = changes[-1]["request_count"] if changes else 0
    # what safety changes left (reassess drops the marks once they expire)
    breached = tuple((d["previous_candidate"], d["previous_depth"], d["request_count"]) for d in changes
                     if d.get("reason", "").startswith(SAFETY) and d["previous_candidate"] is not None)
    return ControllerState(last["candidate"], last["depth"], requests=last["request_count"],
                           last_change_request=last_change, breached=breached)
