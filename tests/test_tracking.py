"""MLflow tracking against real stores: an embedded SQLite store, and a real `mlflow server` on 127.0.0.1."""

import json
import subprocess
from pathlib import Path

import pytest

from weather_restore.config import TrackingConfig, parse_params
from weather_restore.errors import ModelFileError
from weather_restore.tracking import RunInfo, flatten, git_commit, read_run_info, tracking_uri, write_run_info
from weather_restore.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("WEATHER_RESTORE_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_the_default_store_is_a_sqlite_file_in_the_project(tmp_path):
    assert tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_mlflow_tracking_uri_overrides_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(TrackingConfig(), tmp_path) == "http://127.0.0.1:5999"


def test_a_dvc_lock_rewritten_by_dvc_repro_does_not_make_the_checkout_dirty(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "sub").mkdir()
    for name in ("dvc.lock", "sub/dvc.lock", "train.py"):
        (tmp_path / name).write_text("v1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "one")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    (tmp_path / "dvc.lock").write_text("v2\n")
    (tmp_path / "sub" / "dvc.lock").write_text("v2\n")
    assert git_commit(tmp_path / "sub") == (commit, False)
    (tmp_path / "train.py").write_text("v2\n")  # code outside the folder asked about counts too
    assert git_commit(tmp_path / "sub") == (commit, True)


def test_flatten_names_nested_params_by_path():
    assert flatten({"training": {"dwgn": {"lr": 0.001, "betas": (0.9, 0.99)}}, "model": "dwgn"}) == {
        "training.dwgn.lr": "0.001",
        "training.dwgn.betas": "[0.9, 0.99]",
        "model": "dwgn",
    }


def test_run_info_round_trips(tmp_path):
    info = RunInfo(model="dwgn", run_id="abc", experiment_id="1", experiment="e", tracking_uri="sqlite:///x.db")
    write_run_info(tmp_path / "models" / "run.json", info)
    assert read_run_info(tmp_path / "models" / "run.json") == info
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["run.json"]


def test_a_record_written_before_the_completion_mark_existed_reads_as_complete(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"model": "dwgn", "run_id": "abc", "model_uri": "models:/m-1"}')
    info = read_run_info(path)
    assert info.complete and info.training_id is None and info.model_uri == "models:/m-1"


def test_the_record_of_an_unfinished_training_is_refused_to_its_readers(tmp_path):
    path = tmp_path / "run.json"
    write_run_info(path, RunInfo(model="dwgn", run_id="abc", training_id="t", complete=False))
    with pytest.raises(ModelFileError, match=r"run.json: the training of dwgn did not finish.*train --model dwgn"):
        read_run_info(path)
    assert read_run_info(path, finished_only=False).run_id == "abc"


def train_tracked(tiny_mwvd: Path, project: Path, params: dict, model: str = "dwgn"):
    summary = train(
        model,
        parse_params(params),
        data_root=tiny_mwvd,
        out_dir=project / "models" / model,
        reports_dir=project / "reports" / model,
        project_root=project,
    )
    return summary, read_run_info(project / "models" / model / "run.json")


def check_run(info: RunInfo, project: Path, model: str, params: dict, iterations: int) -> None:
    """The run holds the params, per-iteration metrics and the curves; run.json names it as complete."""
    import mlflow

    from weather_restore.checkpoint import load_checkpoint

    client = mlflow.MlflowClient(info.tracking_uri)
    run = client.get_run(info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == str(params["training"][model]["lr"])
    assert json.loads(run.data.params["architecture"])["dim"] == params["models"][model]["dim"]
    assert len(run.data.params["data.manifest_checksum"]) == 64
    assert [m.step for m in client.get_metric_history(info.run_id, "loss")] == list(range(1, iterations + 1))
    assert [m.step for m in client.get_metric_history(info.run_id, "val_psnr")] == [3, 6]
    assert [m.step for m in client.get_metric_history(info.run_id, "data_wait_fraction")] == [iterations]
    assert {"train.csv", "validation.csv"} <= {a.path for a in client.list_artifacts(info.run_id)}
    assert "model_format" not in run.data.tags  # the registered model is export's ONNX graph
    assert info.complete and info.model_uri is None
    state = load_checkpoint(project / "models" / model / "checkpoint.pt")
    assert (state["training_id"], state["mlflow_run_id"]) == (info.training_id, info.run_id)


def test_a_run_in_the_embedded_sqlite_store(tiny_mwvd, tmp_path, tiny_params_dict, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(tmp_path)  # the working directory must not matter: nothing lands in ./mlruns
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    (project / "README").write_text("test\n")
    subprocess.run(["git", "add", "README"], cwd=project, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "x"],
        cwd=project,
        check=True,
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()

    params = tiny_params_dict("dwgn", tracking=True)
    summary, info = train_tracked(tiny_mwvd, project, params)

    assert info.tracking_uri == f"sqlite:///{project.resolve()}/mlflow.db"
    assert info.run_id == summary.run_id
    check_run(info, project, "dwgn", params, 6)
    import mlflow

    run = mlflow.MlflowClient(info.tracking_uri).get_run(info.run_id)
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.info.artifact_uri.startswith((project / "mlartifacts").resolve().as_uri())
    assert not (project / "mlruns").exists() and not Path("mlruns").exists()


def test_a_run_on_a_real_mlflow_server(
    tiny_mwvd, tmp_path, tiny_params_dict, mlflow_server, mlflow_server_folder, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    project = tmp_path / "project"
    project.mkdir()
    params = tiny_params_dict("dynstaticnet", tracking=True)
    summary, info = train_tracked(tiny_mwvd, project, params, "dynstaticnet")

    assert info.tracking_uri == mlflow_server
    check_run(info, project, "dynstaticnet", params, 6)
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()
    # The curves went through the server into its artifact store (the session's server holds other runs too).
    assert list((mlflow_server_folder / "artifacts").glob(f"*/{info.run_id}/artifacts/train.csv"))


def test_a_resumed_training_logs_into_the_same_run(tiny_mwvd, tmp_path, tiny_params_dict):
    from weather_restore.checkpoint import load_checkpoint, save_checkpoint

    project = tmp_path / "project"
    params = tiny_params_dict("dwgn", tracking=True, iterations=4, checkpoint_every=2)
    _, first = train_tracked(tiny_mwvd, project, params)
    path = project / "models" / "dwgn" / "checkpoint.pt"
    save_checkpoint(path, {**load_checkpoint(path), "iteration": 2})  # as if killed after iteration 2
    summary, second = train_tracked(tiny_mwvd, project, params)

    assert summary.start_iteration == 2
    assert second.run_id == first.run_id
    import mlflow

    run = mlflow.MlflowClient(second.tracking_uri).get_run(second.run_id)
    assert run.data.tags["resumed_from_iteration"] == "2"
    assert run.info.status == "FINISHED"
