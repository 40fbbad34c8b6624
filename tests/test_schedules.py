"""`evaluate-champions` on a schedule: the flow evaluates a schedule slot once, however many runs Prefect makes for
it, and a run that fails gives its slot back. Real flow runs (Prefect's test harness), a real built repository and
registry. (`prefect deploy` giving the deployment its daily cron, off until turned on, is checked on a real server
with the other deployments, in tests/test_deployment.py.)
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from dvc.exceptions import NotDvcRepoError
from prefect.client.schemas.objects import FlowRun

from pipelines.flows import evaluate_champions
from pipelines.schedules import claim_path, run_slot
from weather_restore.data.records import WEATHERS
from weather_restore.registry import connect, promote, register
from weather_restore.tracking import read_run_info

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SLOT = "20261202T0600Z"


def test_two_runs_for_one_slot_evaluate_once_and_a_failed_run_gives_its_slot_back(
    prefect_api, built_tiny_repo, tmp_path
):
    info = read_run_info(built_tiny_repo / "models" / "dwgn" / "run.json")
    registry = connect(info.tracking_uri)
    version = register("dwgn", info, registry).version
    promote("dwgn", registry, version)
    registered = registry.get_model_version("DwGN", version).tags
    metrics = built_tiny_repo / "reports" / "champion" / "dwgn" / "metrics.json"

    first = evaluate_champions(models=["dwgn"], repo=str(built_tiny_repo), slot=SLOT)
    evaluated = metrics.stat().st_mtime_ns
    second = evaluate_champions(models=["dwgn"], repo=str(built_tiny_repo), slot=SLOT)

    assert set(first) == {"dwgn"} and first["dwgn"]["overall"]["psnr"] > 0
    assert second == {}
    assert metrics.stat().st_mtime_ns == evaluated  # the second run evaluated nothing

    # The drift of the champion from the figures registered with its version, per weather, read back from Prefect:
    # one artifact (the second run made none). The same weights on the same clips, as ONNX now: no drift.
    (artifact,) = drift_artifacts()
    rows = {row["weather"]: row for row in json.loads(artifact.data)}
    assert set(rows) == {"overall", *WEATHERS}
    for weather, row in rows.items():
        now = first["dwgn"]["overall" if weather == "overall" else "per_weather"]
        now = now["psnr"] if weather == "overall" else now[weather]["psnr"]
        key = "test_psnr" if weather == "overall" else f"test_psnr_{weather}"
        assert (row["model"], row["version"], row["same test set"]) == ("dwgn", str(version), True)
        assert row["registered test PSNR"] == pytest.approx(float(registered[key]), abs=1e-4)
        assert row["now"] == pytest.approx(now, abs=1e-4)
        assert row["delta"] == pytest.approx(row["now"] - row["registered test PSNR"], abs=2e-4)
        assert abs(row["delta"]) < 0.05
    record = json.loads(claim_path(built_tiny_repo, "evaluate-champions", SLOT).read_text())
    assert record["slot"] == SLOT and record["flow_run_id"]

    # A run that fails (here: in a folder that is no DVC repository) gives its slot back for the next run.
    with pytest.raises(NotDvcRepoError):
        evaluate_champions(models=["dwgn"], repo=str(tmp_path), slot=SLOT)
    assert not claim_path(tmp_path, "evaluate-champions", SLOT).exists()
    assert claim_path(built_tiny_repo, "evaluate-champions", SLOT).exists()


def drift_artifacts() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["champion-drift"])))


def test_a_scheduled_run_takes_its_slot_from_its_scheduled_time_and_a_run_by_hand_has_none():
    when = datetime(2026, 12, 2, 6, 0, 41, tzinfo=UTC)
    scheduled = FlowRun(flow_id=uuid.uuid4(), auto_scheduled=True, expected_start_time=when)
    by_hand = FlowRun(flow_id=uuid.uuid4(), auto_scheduled=False, expected_start_time=when)

    assert run_slot({}, scheduled) == SLOT
    assert run_slot({"slot": None}, by_hand) is None
    assert run_slot({"slot": "monthly-1"}, by_hand) == "monthly-1"
