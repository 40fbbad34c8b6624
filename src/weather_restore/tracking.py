"""MLflow set-up and run bookkeeping. The only module that reads MLFLOW_TRACKING_URI.

With no MLFLOW_TRACKING_URI, runs go to an embedded store in the project: `sqlite:///<project>/mlflow.db`, with
artifacts in `<project>/mlartifacts`. Both are set explicitly (MLflow's own default depends on the working
directory and on whether a `./mlruns` folder exists). Open it with
`mlflow ui --backend-store-uri sqlite:///mlflow.db` from the project root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from weather_restore.config import TrackingConfig
from weather_restore.errors import ModelFileError

log = logging.getLogger(__name__)

RUN_INFO_NAME = "run.json"
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


class RunInfo(BaseModel):
    """`models/<model>/run.json`: where a training was tracked, so that evaluation and export log into its run.
    Every field but `model` is None when the training ran with tracking disabled."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str
    run_id: str | None = None
    experiment_id: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    model_uri: str | None = None


def tracking_uri(cfg: TrackingConfig, project_root: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the project's embedded SQLite store (an absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(project_root) / cfg.store).resolve()}"


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def prepare(cfg: TrackingConfig, project_root: Path) -> str:
    """Point MLflow at the store, create the store and the experiment if needed; returns the experiment id.

    Call it once in one process before anything runs in parallel: opening a new SQLite store runs migrations,
    and several processes doing that at once can crash.
    """
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    import mlflow

    uri = tracking_uri(cfg, project_root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # A server decides where artifacts go; a local store is told, or it would use ./mlruns of the cwd.
        location = None if _is_server(uri) else (Path(project_root) / cfg.artifacts).resolve().as_uri()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=location)
        log.info("created MLflow experiment %r in %s", cfg.experiment, uri)
        return experiment_id
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def run_exists(run_id: str) -> bool:
    """Whether the current store holds the run (a resumed training may have been tracked elsewhere)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> `{"training.dwgn.lr": "0.0002", ...}`; sequences are written as `[a, b]`."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = "[" + ", ".join(str(v) for v in value) + "]"
        else:
            flat[name] = str(value)
    return flat


def git_commit(project_root: Path) -> tuple[str | None, bool]:
    """(commit checked out in the project, whether tracked files differ from it); (None, False) outside git."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", *args], cwd=project_root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, False
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


def write_run_info(path: Path, info: RunInfo) -> None:
    """Write run.json atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(info.model_dump_json(indent=1) + "\n")
    os.replace(tmp, path)


def read_run_info(path: Path) -> RunInfo:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no run record; train the model first (weather-restore train)")
    try:
        return RunInfo.model_validate_json(path.read_text())
    except ValueError as error:
        raise ModelFileError(f"{path}: not a run record ({error})") from None


@contextlib.contextmanager
def own_pickles_allowed() -> Iterator[None]:
    """Let MLflow unpickle a model while inside: the models this project logs in the pickle format (when
    torch.export cannot keep their shapes dynamic) were written by this project."""
    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous


def load_logged_model(model_uri: str) -> Any:
    """Load a model this project logged (a torch.export graph, or a pickled module when export could not keep
    its shapes dynamic)."""
    import mlflow

    with own_pickles_allowed():
        return mlflow.pytorch.load_model(model_uri)
