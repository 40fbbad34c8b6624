"""The Prefect flows over a real DVC pipeline, under Prefect's test harness (a real temporary server)."""

import json
import subprocess
import time

import pytest
import yaml
from mlflow import MlflowClient
from prefect import flow

from pipelines.flows import StageFailed, registry_state, stream, weather_pipeline
from weather_restore.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def test_the_flow_promotes_runs_the_stale_stages_skips_them_then_completes_with_the_gates_refusal(built_tiny_repo):
    # One built repository for both stories (a retraining of DwGN costs a stage per step): the flow registers and
    # promotes what the workspace holds; after an edit of params.yaml it reruns only the stages the edit made
    # stale, then none; the gate refusing the new version is a decision, and the flow completes.
    first = weather_pipeline(models=["dwgn"], promote=True, repo=str(built_tiny_repo))
    assert all(not result["ran"] for result in first["stages"])  # the build left nothing stale
    assert first["decisions"]["dwgn"].startswith("promoted: DwGN v1 from run ")
    assert first["decisions"]["dwgn"].endswith("; champion v1; gate: no champion yet")

    # A new training, so a new version, that cannot gain the 100 dB the gate now asks for. The user edits
    # params.yaml (promote registers what the workspace holds; overrides would run beside it).
    params = yaml.safe_load((built_tiny_repo / "params.yaml").read_text())
    params["training"]["dwgn"]["iterations"] += 1
    params["registry"]["min_delta"] = 100
    (built_tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    compared = (built_tiny_repo / "reports" / "compare.md").stat().st_mtime_ns

    stale = weather_pipeline(models=["dynstaticnet", "dwgn"], repo=str(built_tiny_repo))
    ran = {stage for result in stale["stages"] for stage in result["ran"]}
    skipped = {stage for result in stale["stages"] for stage in result["skipped"]}
    assert ran == {"train@dwgn", "evaluate@dwgn", "export@dwgn", "card@dwgn", "compare"}
    unchanged = {"train@dynstaticnet", "evaluate@dynstaticnet", "export@dynstaticnet", "card@dynstaticnet"}
    assert {"assemble", "split", *unchanged} <= skipped
    assert (built_tiny_repo / "reports" / "compare.md").stat().st_mtime_ns > compared

    again = weather_pipeline(models=["dynstaticnet", "dwgn"], repo=str(built_tiny_repo))
    assert all(not result["ran"] for result in again["stages"])
    assert {stage for result in again["stages"] for stage in result["skipped"]} >= {"train@dwgn", "compare"}

    refused = weather_pipeline(models=["dwgn"], promote=True, repo=str(built_tiny_repo))
    assert all(not result["ran"] for result in refused["stages"])
    assert refused["decisions"]["dwgn"].startswith("refused: DwGN v2 from run ")
    # The gate's reason, as promote recorded it on version 2 in the registry.
    assert "; champion v1; gate: a gain of " in refused["decisions"]["dwgn"]
    assert "less than the 100.00 dB required (registry.min_delta)" in refused["decisions"]["dwgn"]


def test_bad_overrides_and_overrides_with_promote_are_refused_before_anything_runs(tiny_repo):
    # An override that passes runs as a DVC experiment beside the workspace: tests/test_deployment.py runs one through
    # a deployment and a worker (the same flow), and checks the experiment, its MLflow runs and the workspace.
    before = (tiny_repo / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="training.dwgn.iterations"):
        weather_pipeline(models=["dwgn"], params={"training.dwgn.iterations": -1}, repo=str(tiny_repo))
    with pytest.raises(ValueError, match="dvc exp apply"):
        weather_pipeline(models=["dwgn"], params={"training.dwgn.iterations": 3}, promote=True, repo=str(tiny_repo))
    assert (tiny_repo / "params.yaml").read_bytes() == before
    assert not (tiny_repo / "dvc.lock").exists()  # nothing ran


def test_a_failing_stage_fails_the_flow_with_its_message(tiny_repo):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    photographs = params["data"]["synthetic"]["photographs"]
    params["data"]["synthetic"]["photographs"] = ["no_such_photo", *photographs[1:]]  # as many videos as before
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = weather_pipeline(models=["dwgn"], repo=str(tiny_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="no_such_photo.*not available"):
        state.result()


def test_a_stage_past_its_timeout_is_stopped_with_everything_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"

    @flow
    def slow_stage() -> tuple[int, list[str]]:
        # The shell stands for DVC, the sleep for the stage command DVC runs.
        return stream(["sh", "-c", f"sleep 120 & echo $! > {pid_file}; wait"], tmp_path, timeout_s=2)

    start = time.monotonic()
    with pytest.raises(StageFailed, match="ran past its 2 s timeout"):
        slow_stage()
    assert time.monotonic() - start < 30
    child = int(pid_file.read_text())
    ps = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True)
    assert ps.returncode != 0 or ps.stdout.strip().startswith("Z"), f"the stage's child {child} still runs"


def test_registry_state_names_the_version_of_this_run_and_the_champion(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("flows", artifact_location=(tmp_path / "artifacts").as_uri())
    old, new = (client.create_run(experiment).info.run_id for _ in range(2))
    client.create_registered_model("DwGN")
    for run_id in (old, new, new):
        client.create_model_version("DwGN", source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("DwGN", "champion", "1")
    run_json = tmp_path / "models" / "dwgn" / "run.json"
    run_json.parent.mkdir(parents=True)
    run_json.write_text(json.dumps({"model": "dwgn", "run_id": new, "tracking_uri": uri}))

    assert registry_state(tmp_path, "dwgn") == f"DwGN v3 from run {new}; champion v1"
