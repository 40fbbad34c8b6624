"""Schedule slots: a scheduled flow does its work once per slot, however many flow runs Prefect makes for it.

Prefect's scheduler can create two flow runs for one slot of a schedule (after an upgrade that changed how it keys
scheduled runs, for one). A flow that must not repeat its work claims its slot before it starts: the time its
schedule gave the run (`scheduled_start_time`, to the minute, UTC), or a slot given explicitly. The claim is a file
`reports/slots/<flow>/<slot>.json` in the repository, created exclusively, so of two runs at once one wins; a run
whose slot is claimed does nothing. A run that fails or crashes gives its claim back (the flow's state hooks), so a
retry of the slot does the work; a claim left by a killed worker is removed by hand (the file names the flow run).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SLOTS = Path("reports") / "slots"


def slot_of(when: datetime) -> str:
    """`2026-12-02 06:00:41+00:00` -> `20261202T0600Z`: the minute a run was scheduled for, in UTC."""
    return when.astimezone(UTC).strftime("%Y%m%dT%H%MZ")


def claim_path(repo: Path, flow_name: str, slot: str) -> Path:
    return Path(repo) / SLOTS / flow_name / f"{slot}.json"


def claim(repo: Path, flow_name: str, slot: str, flow_run_id: str | None) -> bool:
    """Claim `slot` of `flow_name` for this run; False when a run claimed it before (nothing is changed then)."""
    path = claim_path(repo, flow_name, slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    record = {"flow": flow_name, "slot": slot, "flow_run_id": flow_run_id, "claimed": datetime.now(UTC).isoformat()}
    with os.fdopen(descriptor, "w") as file:
        file.write(json.dumps(record) + "\n")
    return True


def claimed_by(repo: Path, flow_name: str, slot: str) -> str | None:
    """The flow run id recorded in the slot's claim; None when the slot is free."""
    path = claim_path(repo, flow_name, slot)
    try:
        return json.loads(path.read_text()).get("flow_run_id")
    except FileNotFoundError:
        return None
    except ValueError:  # a claim cut short by a crash while it was written: still a claim, of no known run
        return ""


def release(repo: Path, flow_name: str, slot: str, flow_run_id: str) -> None:
    """Give the slot back if this run holds it (a duplicate run that found it claimed holds nothing)."""
    if claimed_by(repo, flow_name, slot) == flow_run_id:
        claim_path(repo, flow_name, slot).unlink(missing_ok=True)
        log.info("gave back slot %s of %s (flow run %s did not complete)", slot, flow_name, flow_run_id)


def run_slot(parameters: dict[str, Any], flow_run: Any) -> str | None:
    """The slot of a flow run: its `slot` parameter, else, for a run its schedule made, the time it was scheduled
    for; None for a run started by hand (it always does the work)."""
    if parameters.get("slot"):
        return str(parameters["slot"])
    return slot_of(flow_run.expected_start_time) if flow_run.auto_scheduled else None


def release_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """A Prefect on_failure / on_crashed hook: the failed run's slot goes back, so a retry does the work. The flow
    takes `repo` and `slot` parameters."""
    slot = run_slot(flow_run.parameters, flow_run)
    if slot is not None:
        release(Path(flow_run.parameters.get("repo") or ".").resolve(), flow.name, slot, str(flow_run.id))
