"""Crash safety of training and of the stages that log into its MLflow run: real `weather-restore` processes
killed with SIGKILL at a chosen point, then run again, against one uninterrupted reference training.

The kill points are chosen in test code only: the killed process runs the CLI through a small wrapper that
replaces one function so that its n-th call kills the process. The product code knows nothing of it.
"""

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests.stores import all_runs, client
from tests.stores import own_store_environment as environment

from weather_restore.checkpoint import load_checkpoint
from weather_restore.config import parse_params
from weather_restore.tracking import read_run_info
from weather_restore.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ITERATIONS = 8

# Runs the CLI with `<module>.<attribute>` replaced by a function whose n-th call SIGKILLs the process.
KILL_ON_CALL = """
import importlib, os, signal, sys

module, attribute, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
calls = 0


def killing(*args, **kwargs):
    global calls
    calls += 1
    if calls == count:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


setattr(owner, name, killing)
sys.argv = ["weather-restore", *sys.argv[4:]]
from weather_restore.cli import main

sys.exit(main())
"""


@pytest.fixture(scope="module")
def params_dict(tiny_params_dict) -> dict:
    """Tracked tiny DwGN training: a checkpoint and a validation at 4 and 8, a loss row at every iteration."""
    params = tiny_params_dict(
        "dwgn", tracking=True, iterations=ITERATIONS, checkpoint_every=4, validate_every=4, log_every=1
    )
    return {**params, "evaluation": {"max_clips": 0, "lpips": False, "flops_size": [32, 32]}}


def new_project(root: Path, params: dict) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage(project: Path, data: Path, command: str) -> list[str]:
    # `data` is the project's default test set (data/mwvd links to it): evaluation logs into the training's run only
    # for its own weights on that set.
    default = project / "data" / "mwvd"
    if not default.exists():
        default.parent.mkdir(parents=True, exist_ok=True)
        default.symlink_to(data)
    return ["--params", str(project / "params.yaml"), command, "--model", "dwgn", "--data", str(data)]


def run_cli(project: Path, args: list[str]) -> None:
    command = [sys.executable, "-c", "import sys; from weather_restore.cli import main; sys.exit(main())", *args]
    result = subprocess.run(command, cwd=project, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def kill_on_call(project: Path, target: str, count: int, args: list[str]) -> None:
    """Run the CLI with `args`, SIGKILLed at the `count`-th call of `target` (`module:attribute`)."""
    module, attribute = target.split(":")
    command = [sys.executable, "-c", KILL_ON_CALL, module, attribute, str(count), *args]
    result = subprocess.run(command, cwd=project, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, f"not killed at call {count} of {target}:\n{result.stderr}"


def losses(project: Path, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(project).get_metric_history(run_id, "loss")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mwvd, params_dict) -> Path:
    """The uninterrupted training every interrupted one must end up equal to."""
    project = new_project(tmp_path_factory.mktemp("crash") / "reference", params_dict)
    run_cli(project, stage(project, tiny_mwvd, "train"))
    return project


def check_like_reference(project: Path, reference: Path, killed: tuple[str, ...] = ()) -> str:
    """The same weights bit for bit, one finished MLflow run (beside the `killed` ones, marked KILLED) holding each
    loss step once with the reference's values, and a complete run.json naming that run; returns the run id."""
    whole = load_checkpoint(reference / "models/dwgn/checkpoint.pt")
    state = load_checkpoint(project / "models/dwgn/checkpoint.pt")
    assert state["iteration"] == ITERATIONS
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, state["model"][name]), name
    statuses = {r.info.run_id: r.info.status for r in all_runs(project)}
    assert [statuses.pop(run_id) for run_id in killed] == ["KILLED"] * len(killed)
    ((run_id, status),) = statuses.items()
    assert status == "FINISHED"
    (reference_run,) = all_runs(reference)
    assert losses(project, run_id) == losses(reference, reference_run.info.run_id)
    assert [step for step, _ in losses(project, run_id)] == list(range(1, ITERATIONS + 1))
    info = read_run_info(project / "models/dwgn/run.json")
    assert info.complete and info.run_id == run_id == state["mlflow_run_id"]
    return run_id


def test_the_reference_training_is_one_finished_run(reference):
    check_like_reference(reference, reference)


def test_killed_before_the_first_checkpoint_then_mid_iterations_a_rerun_resumes_without_repeating_a_step(
    tmp_path, tiny_mwvd, params_dict, reference
):
    project = new_project(tmp_path / "project", params_dict)
    train_args = stage(project, tiny_mwvd, "train")
    # Killed as iteration 2 starts, before any checkpoint: nothing to resume from.
    kill_on_call(project, "weather_restore.train:train_step", 2, train_args)
    assert not (project / "models/dwgn/checkpoint.pt").exists()
    (first,) = all_runs(project)

    # The next training starts afresh, in a new run, and marks the one left RUNNING as KILLED. It is killed in
    # turn as iteration 7 starts: the checkpoint is at 4, the rows of 5 and 6 were computed after it.
    kill_on_call(project, "weather_restore.train:train_step", 7, train_args)
    assert load_checkpoint(project / "models/dwgn/checkpoint.pt")["iteration"] == 4
    statuses = {r.info.run_id: r.info.status for r in all_runs(project)}
    assert statuses.pop(first.info.run_id) == "KILLED"
    ((second, status),) = statuses.items()
    assert status == "RUNNING"
    assert [step for step, _ in losses(project, second)] == [1, 2, 3, 4]

    run_cli(project, train_args)

    assert check_like_reference(project, reference, killed=(first.info.run_id,)) == second


def test_killed_while_training_then_evaluation_log_into_the_run_reruns_finish_the_logging_without_duplicates(
    tmp_path, tiny_mwvd, params_dict, reference
):
    project = new_project(tmp_path / "project", params_dict)
    # Killed as the finished training sends its curves to MLflow, after the final checkpoint.
    kill_on_call(project, "mlflow:log_artifact", 1, stage(project, tiny_mwvd, "train"))
    checkpoint = project / "models/dwgn/checkpoint.pt"
    assert load_checkpoint(checkpoint)["iteration"] == ITERATIONS
    assert not read_run_info(project / "models/dwgn/run.json", finished_only=False).complete
    trained, curves = digest(checkpoint), (project / "reports/dwgn/train.csv").read_text()

    run_cli(project, stage(project, tiny_mwvd, "train"))  # finishes the logging without training again

    run_id = check_like_reference(project, reference)
    assert digest(checkpoint) == trained and (project / "reports/dwgn/train.csv").read_text() == curves
    artifacts = {a.path for a in client(project).list_artifacts(run_id)}
    assert {"train.csv", "validation.csv"} <= artifacts

    # Killed as evaluation uploads its reports, after it logged its metrics: the run stays FINISHED.
    kill_on_call(project, "mlflow:MlflowClient.log_artifact", 1, stage(project, tiny_mwvd, "evaluate"))
    (run,) = all_runs(project)
    assert run.info.status == "FINISHED" and "test_psnr" in run.data.metrics

    run_cli(project, stage(project, tiny_mwvd, "evaluate"))

    assert check_like_reference(project, reference) == run_id
    assert len(client(project).get_metric_history(run_id, "test_psnr")) == 1
    assert {"evaluation/metrics.json", "evaluation/clips.csv"} <= {
        a.path for a in client(project).list_artifacts(run_id, "evaluation")
    }


def test_a_tracking_error_at_the_end_fails_the_run_and_a_rerun_finishes_it(
    tmp_path, tiny_mwvd, params_dict, reference, monkeypatch
):
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("WEATHER_RESTORE_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"

    def train_here():
        return train(
            "dwgn",
            parse_params(params_dict),
            data_root=tiny_mwvd,
            out_dir=project / "models/dwgn",
            reports_dir=project / "reports/dwgn",
            project_root=project,
        )

    def unreachable(*args, **kwargs):
        raise MlflowException("API request failed: the tracking server is unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "log_artifact", unreachable)
        with pytest.raises(MlflowException, match="unreachable"):
            train_here()
    (failed,) = all_runs(project)
    assert failed.info.status == "FAILED"
    trained = digest(project / "models/dwgn/checkpoint.pt")

    summary = train_here()

    assert summary.start_iteration == ITERATIONS and summary.run_id == failed.info.run_id
    assert check_like_reference(project, reference) == failed.info.run_id
    assert digest(project / "models/dwgn/checkpoint.pt") == trained
