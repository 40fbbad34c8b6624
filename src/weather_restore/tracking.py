"""MLflow set-up and run bookkeeping. The only module that reads MLFLOW_TRACKING_URI.

With no MLFLOW_TRACKING_URI, runs go to an embedded store in the project: `sqlite:///<project>/mlflow.db`, with
artifacts in `<project>/mlartifacts`. Both are set explicitly (MLflow's own default depends on the working
directory and on whether a `./mlruns` folder exists). Open it with
`mlflow ui --backend-store-uri sqlite:///mlflow.db` from the project root.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from weather_restore.config import TrackingConfig
from weather_restore.errors import ModelFileError
from weather_restore.outputs import atomic_write_text

log = logging.getLogger(__name__)

RUN_INFO_NAME = "run.json"
# The evidence a training's run holds, set only by the stages that worked on the training's own weights (the file
# `training.<model>.use` names): what `register` copies into a version and the promotion gate checks.
TEST_SET_TAG = "test.manifest_checksum"  # the test set `evaluate` measured the run's test metrics on
TESTED_WEIGHTS_TAG = "test.weights_sha256"  # the weights file those metrics were measured on
EXPORTED_WEIGHTS_TAG = "export.weights_sha256"  # the weights file `export` turned into the run's ONNX model
WEIGHTS_USE_TAG = "weights.use"  # last | best
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# MLflow 3's UI opens an experiment by this tag: on its runs table for model training, rather than on the GenAI
# overview (traces, token usage) it guesses for an experiment without it.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CONFIG_ARTIFACT = "config/params.yaml"  # a run's full namespaced config, as params.yaml spells it
DATASET_CONTEXT_TAG = "mlflow.data.context"  # `training` or `testing`: how the Dataset column labels an input
DATASET_NAME = "mwvd"  # the clips in the MWVD layout, whatever source they were made from
DATASET_SPLITS = {"training": "train", "testing": "test"}  # an input's context -> the split it names
DIGEST_LENGTH = 36  # the longest dataset digest MLflow stores: the manifest checksum's first 36 hex digits


class RunInfo(BaseModel):
    """`models/<model>/run.json`: where a training was tracked, so that evaluation and export log into its run.

    Written when a training starts (`complete: false`) and again once all its end-of-training logging is done and
    its MLflow run has ended (`complete: true`), so a rerun knows which run an interrupted training left behind
    and whether the finished checkpoint beside it still has logging to do. `training_id` is the checkpoint's.
    The MLflow fields are None when the training ran with tracking disabled; `model_uri` only in records of
    trainings that logged a PyTorch model (they no longer do: the registered model is export's ONNX graph)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str
    run_id: str | None = None
    experiment_id: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    model_uri: str | None = None
    training_id: str | None = None
    # Records written before this field existed were written only at the end of a training.
    complete: bool = True


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
    import mlflow

    uri = tracking_uri(cfg, project_root)
    experiment_id = ensure_experiment(cfg, project_root, uri)
    mlflow.set_tracking_uri(uri)
    return experiment_id


def ensure_experiment(cfg: TrackingConfig, project_root: Path, uri: str) -> str:
    """Create the store at `uri` and the experiment if needed (a local store's artifacts in the project), leaving
    the process's MLflow settings alone (a flow prepares the store a stage copy elsewhere logs into); returns the
    experiment id."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # A server decides where artifacts go; a local store is told, or it would use ./mlruns of the cwd.
        location = None if _is_server(uri) else (Path(project_root) / cfg.artifacts).resolve().as_uri()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        log.info("created MLflow experiment %r in %s", cfg.experiment, uri)
        return experiment_id
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag existed
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
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
    """(commit checked out in the project, whether tracked files differ from it); (None, False) outside git.

    dvc.lock does not count: `dvc repro` rewrites it after every stage, so a training run from a clean checkout
    would otherwise always be recorded as made with uncommitted changes."""

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
    return commit, bool(
        git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude,glob)**/dvc.lock")
    )


def write_run_info(path: Path, info: RunInfo) -> None:
    """Write run.json atomically."""
    atomic_write_text(Path(path), info.model_dump_json(indent=1) + "\n")


def read_run_info(path: Path, finished_only: bool = True) -> RunInfo:
    """The run record at `path`; with `finished_only`, one of a training that has not finished is refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no run record; train the model first (weather-restore train)")
    try:
        info = RunInfo.model_validate_json(path.read_text())
    except ValueError as error:
        first = str(error).splitlines()[0]
        raise ModelFileError(f"{path}: not a run record ({first}); train the model again to rewrite it") from None
    if finished_only and not info.complete:
        raise ModelFileError(
            f"{path}: the training of {info.model} did not finish (it was interrupted or failed); run "
            f"`weather-restore train --model {info.model}` again to finish it"
        )
    return info


def log_changed_metrics(client: Any, run_id: str, metrics: Mapping[str, float]) -> None:
    """Log `metrics` (step 0) into a run in one batch, without reopening it, leaving out those whose latest value
    there is the same: a stage rerun after a crash while it logged adds no duplicate rows."""
    from mlflow.entities import Metric

    latest = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items() if latest.get(key) != float(value)]
    if batch:
        client.log_batch(run_id, metrics=batch)


def end_interrupted_runs(run_ids: Iterable[str | None]) -> list[str]:
    """Mark KILLED those of the runs that the current store holds as RUNNING: their process died (a training
    that supersedes them, or resumes another, is starting); returns them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    ended = []
    for run_id in dict.fromkeys(r for r in run_ids if r):
        try:
            status = client.get_run(run_id).info.status
        except MlflowException:
            continue  # tracked in another store
        if status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            log.warning("MLflow run %s was left running by an interrupted training: marked KILLED", run_id)
            ended.append(run_id)
    return ended


def dvc_experiment_tags() -> dict[str, str]:
    """Inside `dvc exp run`, the experiment's name and baseline commit as run tags (`dvc.experiment`,
    `dvc.baseline_rev`: DVC gives them to the stages it runs as DVC_EXP_NAME and DVC_EXP_BASELINE_REV), so the
    run and `dvc exp show` name each other; {} outside an experiment."""
    found = {
        "dvc.experiment": os.environ.get("DVC_EXP_NAME"),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
    }
    return {key: value for key, value in found.items() if value}


def comparable_params(
    model: str,
    training: Mapping[str, Any],
    architecture: Mapping[str, Any],
    data: Mapping[str, Any],
    config_hash: str,
) -> dict[str, str]:
    """A training run's params under names every model shares, so that MLflow's comparison view lines the runs of
    both models up column by column: `model`, each training field by its own name (`lr`, `batch_size`, `crop`,
    `iterations`, `loss`, `ema_decay`, ...), the model's constructor arguments as one `architecture` value (they
    differ from model to model), the data (`data.manifest_checksum`, `data.clips.*`) and `config_hash`."""
    return {
        "model": model,
        **flatten(training),
        "architecture": json.dumps(dict(architecture), sort_keys=True, separators=(",", ":")),
        **flatten(data, "data."),
        "config_hash": config_hash,
    }


def log_training_config(
    client: Any,
    run_id: str,
    model: str,
    *,
    training: Mapping[str, Any],
    architecture: Mapping[str, Any],
    data: Mapping[str, Any],
    config_hash: str,
    params_count: int,
) -> None:
    """Log a new training run's config: its params under shared names (`comparable_params`), the model's parameter
    count (metric `params_count`) and the whole config namespaced as params.yaml spells it (CONFIG_ARTIFACT)."""
    from mlflow.entities import Metric, Param

    params = comparable_params(model, training, architecture, data, config_hash)
    namespaced = {
        "model": model,
        "models": {model: dict(architecture)},
        "training": {model: dict(training)},
        "data": dict(data),
        "config_hash": config_hash,
    }
    client.log_batch(
        run_id,
        metrics=[Metric("params_count", float(params_count), int(time.time() * 1000), 0)],
        params=[Param(key, value) for key, value in params.items()],
    )
    client.log_text(run_id, yaml.safe_dump(namespaced, sort_keys=False), CONFIG_ARTIFACT)


def log_dataset_input(
    client: Any, run_id: str, manifest_checksum: str, context: str, data_root: Path | str | None, clips: int
) -> None:
    """Record the clips a run trained on (`context` "training": dataset `mwvd/train`) or was tested on ("testing":
    `mwvd/test`) as an MLflow dataset input, its digest the manifest checksum (cut to MLflow's limit; the whole
    one and the number of clips in its profile), its source the data folder. The store keeps one input per
    dataset and run: logging it again adds nothing."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=f"{DATASET_NAME}/{DATASET_SPLITS[context]}",
        digest=manifest_checksum[:DIGEST_LENGTH],
        source_type="local",
        source=json.dumps({"uri": str(Path(data_root).resolve()) if data_root is not None else None}),
        profile=json.dumps({"manifest_checksum": manifest_checksum, "clips": clips}),
    )
    client.log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])])
