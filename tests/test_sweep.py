"""The `sweep` flow: a grid of params overrides queued as DVC experiments and run one at a time from DVC's queue, under
Prefect's test harness (a real temporary server), on the built tiny repository: only the swept model's stages run,
each experiment and its MLflow run name each other, and the workspace stays as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.sweep import main, sweep, waiting_experiments
from weather_restore.data.records import WEATHERS

REPO = Path(__file__).resolve().parents[1]


def dvc_json(args: list[str], repo: Path):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args, "--json"], cwd=repo, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_two_point_sweep_runs_dvc_experiments_that_name_their_mlflow_runs(prefect_api, built_tiny_repo, run):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    params_before = (built_tiny_repo / "params.yaml").read_bytes()
    metrics_before = (built_tiny_repo / "reports" / "dwgn" / "metrics.json").read_bytes()
    head = run(["git", "rev-parse", "HEAD"], built_tiny_repo).strip()

    result = sweep(grid={"training.dwgn.lr": [1e-4, 3e-4]}, repo=str(built_tiny_repo), promote=True)

    rows = result["experiments"]
    assert [(row["model"], row["training.dwgn.lr"]) for row in rows] == [("dwgn", "0.0001"), ("dwgn", "0.0003")]
    names = [row["experiment"] for row in rows]

    # DVC: both experiments, on the workspace's commit, with their value of lr and the MLflow run in metrics.json.
    (baseline,) = [found for found in dvc_json(["exp", "show"], built_tiny_repo) if found.get("rev") == head]
    shown = {found["name"]: found["revs"][0] for found in baseline["experiments"]}
    assert set(names) <= set(shown)
    client = MlflowClient(f"sqlite:///{built_tiny_repo / 'mlflow.db'}")
    for row in rows:
        data = shown[row["experiment"]]["data"]
        assert data["params"]["params.yaml"]["data"]["training"]["dwgn"]["lr"] == float(row["training.dwgn.lr"])
        metrics = data["metrics"]["reports/dwgn/metrics.json"]["data"]
        assert metrics["mlflow_run_id"] == row["mlflow_run_id"]
        assert metrics["overall"]["psnr"] == pytest.approx(row["test_psnr"])
        assert [metrics["per_weather"][w]["psnr"] for w in WEATHERS] == [row[f"test_psnr_{w}"] for w in WEATHERS]
        # MLflow: the run the experiment names carries the experiment's name, baseline and lr; it was evaluated.
        tracked = client.get_run(row["mlflow_run_id"]).data
        assert tracked.tags["dvc.experiment"] == row["experiment"]
        assert tracked.tags["dvc.baseline_rev"] == head
        assert (tracked.params["model"], float(tracked.params["lr"])) == ("dwgn", float(row["training.dwgn.lr"]))
        assert tracked.metrics["test_psnr"] == pytest.approx(row["test_psnr"])

    # Only the swept model trained: two runs tagged with the sweep's experiments, none of DynStaticNet.
    swept = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`dvc.experiment` LIKE 'sweep-%'"
    )
    assert sorted(r.info.run_id for r in swept) == sorted(row["mlflow_run_id"] for row in rows)

    # --promote: the point of the best validation PSNR, registered and through the gate (the first champion).
    best = max(rows, key=lambda row: row["val_psnr"])
    champion = client.get_model_version_by_alias("DwGN", "champion")
    assert champion.run_id == best["mlflow_run_id"]
    assert result["decisions"]["dwgn"].startswith(f"{best['experiment']} (best val PSNR")
    assert "promoted DwGN version" in result["decisions"]["dwgn"]

    # The artifact: the grid with its test PSNR per weather.
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep"])))
    assert artifact.type == "table"
    assert json.loads(artifact.data) == json.loads(json.dumps(rows))

    # The workspace: params.yaml and the workspace's own results as they were, nothing uncommitted.
    assert (built_tiny_repo / "params.yaml").read_bytes() == params_before
    assert (built_tiny_repo / "reports" / "dwgn" / "metrics.json").read_bytes() == metrics_before
    assert run(["git", "status", "--porcelain"], built_tiny_repo) == ""


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_an_experiment_that_fails_in_the_queue_fails_the_sweep_with_its_own_error(prefect_api, built_tiny_repo, run):
    from pipelines.flows import StageFailed

    # Valid for the config, too large for the tiny repository's 32-pixel frames: the training stops at its start.
    with pytest.raises(StageFailed, match="1 of 1 experiments failed") as failed:
        sweep(grid={"training.dwgn.crop": [64]}, repo=str(built_tiny_repo))

    assert "smaller than the crop 64; lower training.*.crop" in str(failed.value)  # the stage's own message
    assert waiting_experiments(built_tiny_repo) == []  # nothing left in the queue for the next sweep
    assert run(["git", "status", "--porcelain"], built_tiny_repo) == ""


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_sweep_past_its_timeout_stops_the_queue_and_empties_it(prefect_api, built_tiny_repo, run):
    from pipelines.flows import StageFailed

    with pytest.raises(StageFailed, match="timeout"):
        sweep(grid={"training.dwgn.lr": [1e-4, 3e-4]}, repo=str(built_tiny_repo), timeout_s=8)

    assert waiting_experiments(built_tiny_repo) == []
    assert run(["git", "status", "--porcelain"], built_tiny_repo) == ""


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["training.dwgn.lrr=[1e-4]"], "sweep: sweep grid training.dwgn.lrr: not a key of"),
        (["training.dwgn.lr=[]"], "sweep: sweep grid training.dwgn.lr: [] is not a non-empty list"),
        (["training.dwgn.lr=[1e-4,-1]"], "sweep: sweep grid: 'training.dwgn.lr' = -1 is not allowed"),
        (["training.dwgn.loss=[l1,l2]"], "sweep: sweep grid: 'training.dwgn.loss' = 'l2' is not allowed"),
    ],
)
def test_a_bad_grid_is_refused_at_the_door_in_one_line_naming_the_key(grid, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([*grid, "--repo", str(REPO)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.startswith(message) and err.count("\n") == 1
