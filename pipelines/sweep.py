"""The `sweep` flow: a grid of parameter overrides run as DVC experiments through DVC's queue, driven by Prefect.

    python -m pipelines.sweep training.dwgn.lr=[1e-4,3e-4] training.dwgn.crop=[48,64]   # 4 experiments
    python -m pipelines.sweep training.dwgn.lr=[1e-4,3e-4] --promote

Each point of the grid is queued as one `dvc exp run --queue --set-param ...` of the stages the grid touches (a
`training.dwgn.*` key: DwGN's training and evaluation, not DynStaticNet's), then the queue runs one experiment at a
time (`dvc exp run --run-all --jobs 1`), each in a temporary copy of the repository: params.yaml and the workspace
stay as they are. DVC's queue workers can fail an experiment without failing the command, so every experiment is
checked afterwards and a failed one fails the flow with the end of its own log (`dvc queue logs`).

Each experiment's MLflow run (in the workspace's store) carries the tags `dvc.experiment` and `dvc.baseline_rev`,
and its metrics.json names the run (`mlflow_run_id`, a column of `dvc exp show`). The flow's artifact is the grid
with the test PSNR per weather. `--promote` also exports each point, registers the point with the best validation
PSNR (the test split never picks a model) and puts it through the promotion gate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from pipelines.flows import StageFailed, _environment, _failure, _tracking_uri, check_overrides, stream
from weather_restore.data.records import WEATHERS
from weather_restore.errors import ConfigError, PromotionRefused, WeatherRestoreError
from weather_restore.models.facts import MODEL_NAMES

# Stages of one model that a sweep reruns: its training comes with them (a dependency of both).
SWEPT_STAGES = ("evaluate",)
PROMOTED_STAGES = ("evaluate", "export")


def parse_grid(items: list[str]) -> dict[str, Any]:
    """`["training.dwgn.lr=[1e-4,3e-4]"]` -> `{"training.dwgn.lr": [0.0001, 0.0003]}`. Values are JSON, else YAML
    (`[l1,psnr]`): JSON first, as YAML reads `1e-4` as a string."""
    import yaml

    grid: dict[str, Any] = {}
    for item in items:
        key, sign, text = item.partition("=")
        if not sign or not key.strip():
            raise ConfigError(f"sweep grid {item!r}: not KEY=[VALUES] (e.g. training.dwgn.lr=[1e-4,3e-4])")
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(f"sweep grid {key}: {text!r} is not a list of values like [1e-4,3e-4]") from None
        grid[key.strip()] = value
    return grid


def _holds(document: Any, key: str) -> bool:
    node = document
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_grid(grid: Mapping[str, Any], repo: Path) -> list[dict[str, Any]]:
    """The points of the grid (every combination of its values), each checked against params.yaml with the
    config's own validation; a key params.yaml lacks, an empty or repeated list or a bad value is refused in one
    line naming the key."""
    import yaml

    params = Path(repo) / "params.yaml"
    if not grid:
        raise ConfigError("sweep grid: empty; give at least one KEY=[VALUES] (e.g. training.dwgn.lr=[1e-4,3e-4])")
    document = yaml.safe_load(params.read_text())
    for key, values in grid.items():
        if not _holds(document, key):
            raise ConfigError(f"sweep grid {key}: not a key of {params} (a sweep changes the values params.yaml holds)")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid {key}: {values!r} is not a non-empty list of values (e.g. [1e-4,3e-4])")
        repeated = [value for i, value in enumerate(values) if value in values[:i]]
        if repeated:
            raise ConfigError(f"sweep grid {key}: {repeated[0]!r} is listed twice")
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    for point in points:
        try:
            check_overrides(point, Path(repo), source="sweep grid")
        except ConfigError as error:  # one line per bad key, naming it and what it allows: the first is enough
            raise ConfigError(str(error).splitlines()[0]) from None
    return points


def swept_models(keys: list[str]) -> list[str]:
    """The models whose stages the grid's keys change: `training.<model>.*` and `models.<model>.*` touch one
    model; any other key (evaluation, data) touches every model."""
    touched = []
    for key in keys:
        section, _, rest = key.partition(".")
        model = rest.partition(".")[0]
        if section not in ("training", "models") or model not in MODEL_NAMES:
            return list(MODEL_NAMES)
        touched.append(model)
    return [model for model in MODEL_NAMES if model in touched]


def waiting_experiments(repo: Path) -> list[str]:
    """Experiments already in DVC's queue, queued or running: `--run-all` would run them with the sweep's."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        queue = dvc.experiments.celery_queue
        return [entry.name or entry.stash_rev[:7] for entry in (*queue.iter_active(), *queue.iter_queued())]


def finished_experiments(repo: Path) -> set[str]:
    """Names of the experiments DVC holds results of (`dvc exp list`: an experiment that failed has none)."""
    listed = subprocess.run(
        ["dvc", "exp", "list", "--name-only", "--all-commits"],
        cwd=repo,
        env=_environment(),
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        raise StageFailed(f"`dvc exp list` failed (exit {listed.returncode}): {listed.stderr.strip()}")
    return {line.strip() for line in listed.stdout.splitlines() if line.strip()}


def experiment_log(name: str, repo: Path) -> str:
    """The end of an experiment's own output (`dvc queue logs NAME`), or why DVC has none."""
    logs = subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=_environment(), capture_output=True, text=True)
    lines = [line for line in (logs.stdout + logs.stderr).splitlines() if line.strip()]
    return "\n".join(lines[-25:]) or "no output logged"


@task(name="dvc-exp-queue", task_run_name="dvc exp run --queue {name}")
def enqueue(name: str, point: dict[str, Any], targets: list[str], repo: str) -> str:
    """Queue one point of the grid as the experiment `name` (nothing runs yet)."""
    settings = [f"--set-param={key}={json.dumps(value)}" for key, value in point.items()]
    cmd = ["dvc", "exp", "run", "--queue", "--name", name, *settings, *targets]
    code, output = stream(cmd, Path(repo))
    if code != 0:
        raise _failure(cmd, code, output)
    return name


@task(name="dvc-exp-run-all", task_run_name="dvc exp run --run-all --jobs 1")
def run_queue(names: list[str], repo: str, tracking_uri: str, timeout_s: float | None = None) -> list[str]:
    """Run the queue one experiment at a time, then check that each of `names` finished: the first failure is
    raised with the experiment's own log. The worker DVC starts passes its environment on to the stages, so the
    experiments log into the workspace's MLflow store, not into their temporary copies."""
    root = Path(repo)
    cmd = ["dvc", "exp", "run", "--run-all", "--jobs", "1"]
    try:
        code, output = stream(cmd, root, timeout_s, {"MLFLOW_TRACKING_URI": tracking_uri})
    except StageFailed:
        # Past the timeout: the worker DVC started outlives the killed command, so stop it with the experiment it
        # runs, and take the rest of the sweep out of the queue.
        for stop in (["dvc", "queue", "stop", "--kill"], ["dvc", "queue", "remove", *names]):
            subprocess.run(stop, cwd=root, env=_environment(), capture_output=True)
        raise
    finished = finished_experiments(root)
    failed = [name for name in names if name not in finished]
    if failed:
        logs = "\n".join(f"--- {name} (dvc queue logs {name}):\n{experiment_log(name, root)}" for name in failed)
        raise StageFailed(f"{len(failed)} of {len(names)} experiments failed: {', '.join(failed)}\n{logs}")
    if code != 0:  # every experiment finished, yet DVC complained: say so, keep the results
        get_run_logger().warning("`%s` exited %d after every experiment finished", " ".join(cmd), code)
    return names


def _read(path: str, repo: Path, rev: str) -> str:
    import dvc.api

    return dvc.api.read(path, repo=str(repo), rev=rev)


@task(name="collect", task_run_name="collect {name}")
def collect(name: str, point: dict[str, Any], models: list[str], repo: str) -> list[dict[str, Any]]:
    """One row per model of the experiment: its values of the grid, its MLflow run (checked to carry the
    experiment's name), validation PSNR, test PSNR overall and per weather (the experiment's metrics.json)."""
    from mlflow import MlflowClient

    from weather_restore.tracking import RunInfo

    root = Path(repo)
    rows = []
    for model in models:
        info = RunInfo.model_validate_json(_read(f"models/{model}/run.json", root, name))
        metrics = json.loads(_read(f"reports/{model}/metrics.json", root, name))
        run = MlflowClient(info.tracking_uri).get_run(info.run_id)
        tagged = run.data.tags.get("dvc.experiment")
        if tagged != name or metrics.get("mlflow_run_id") != info.run_id:
            raise StageFailed(
                f"experiment {name}: its MLflow run {info.run_id} is tagged dvc.experiment={tagged!r} and its "
                f"metrics.json names run {metrics.get('mlflow_run_id')!r}; they should name each other"
            )
        row: dict[str, Any] = {"experiment": name, "model": model, **{key: str(v) for key, v in point.items()}}
        row["mlflow_run_id"] = info.run_id
        row["val_psnr"] = run.data.metrics.get("best_val_psnr")
        row["test_psnr"] = metrics["overall"]["psnr"]
        row.update({f"test_psnr_{w}": metrics["per_weather"].get(w, {}).get("psnr") for w in WEATHERS})
        rows.append(row)
    return rows


@task(name="promote-best", task_run_name="promote the best {model}")
def promote_best(model: str, rows: list[dict[str, Any]], repo: str) -> str:
    """Register the experiment of `model` with the best validation PSNR and put it through the promotion gate
    (registry.promote, with params.yaml's registry settings): a refusal is a decision, returned with its reasons."""
    from weather_restore.config import load_params
    from weather_restore.registry import connect, promote, register
    from weather_restore.tracking import RunInfo, tracking_uri

    root = Path(repo)
    ranked = [row for row in rows if row["model"] == model and row["val_psnr"] is not None]
    if not ranked:
        return f"{model}: no experiment with a validation PSNR to promote"
    best = max(ranked, key=lambda row: row["val_psnr"])
    params = load_params(root / "params.yaml")
    client = connect(tracking_uri(params.tracking, root))
    info = RunInfo.model_validate_json(_read(f"models/{model}/run.json", root, best["experiment"]))
    version = register(model, info, client, data_root=root / params.data.root / "mwvd").version
    registry = params.registry
    try:
        result = promote(
            model,
            client,
            version,
            min_delta=registry.min_delta,
            weather_tolerance=registry.weather_tolerance,
            temporal_tolerance=registry.temporal_tolerance,
        )
    except PromotionRefused as refused:
        return f"{best['experiment']} (best val PSNR {best['val_psnr']:.2f} dB): {str(refused).splitlines()[0]}"
    return f"{best['experiment']} (best val PSNR {best['val_psnr']:.2f} dB): {result.summary()}"


@flow(name="sweep", log_prints=True)
def sweep(
    grid: dict[str, list[Any]], repo: str = ".", promote: bool = False, timeout_s: float = 6 * 3600
) -> dict[str, Any]:
    """Run every point of `grid` (`{"training.dwgn.lr": [1e-4, 3e-4]}`) as a DVC experiment, one at a time;
    report the grid with its test PSNR per weather; with `promote`, register the point of the best validation
    PSNR per model and put it through the promotion gate."""
    root = Path(repo).resolve()
    points = check_grid(grid, root)
    models = swept_models(list(grid))
    waiting = waiting_experiments(root)
    if waiting:
        raise ConfigError(
            f"DVC's queue already holds {', '.join(waiting)}: a sweep runs the whole queue; run them "
            "(`dvc exp run --run-all`) or remove them (`dvc queue remove --queued`) first"
        )
    kinds = PROMOTED_STAGES if promote else SWEPT_STAGES
    targets = [f"{kind}@{model}" for model in models for kind in kinds]
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    names = [f"sweep-{stamp}-{number}" for number in range(1, len(points) + 1)]
    uri = _tracking_uri(root)
    for name, point in zip(names, points, strict=True):
        enqueue(name, point, targets, str(root))
    run_queue(names, str(root), uri, timeout_s)
    rows = [row for name, point in zip(names, points, strict=True) for row in collect(name, point, models, str(root))]
    decisions = {model: promote_best(model, rows, str(root)) for model in models} if promote else {}
    description = f"sweep of {', '.join(grid)}: test PSNR (dB) per weather; `dvc exp show`, `dvc exp apply NAME`"
    if decisions:
        description += "; " + "; ".join(decisions.values())
    create_table_artifact(table=rows, key="sweep", description=description)
    return {"experiments": rows, "decisions": decisions}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run a grid of params overrides as DVC experiments, one at a time (Prefect flow `sweep`)."
    )
    parser.add_argument("grid", nargs="+", metavar="KEY=[VALUES]", help="e.g. training.dwgn.lr=[1e-4,3e-4]")
    parser.add_argument("--promote", action="store_true", help="register the best point and put it through the gate")
    parser.add_argument("--repo", default=".")
    args = parser.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        check_grid(grid, Path(args.repo))
    except WeatherRestoreError as error:
        parser.exit(2, f"sweep: {error}\n")
    result = sweep(grid=grid, repo=args.repo, promote=args.promote)
    for row in result["experiments"]:
        print("  ".join(f"{key}={value}" for key, value in row.items()))
    for decision in result["decisions"].values():
        print(decision)


if __name__ == "__main__":
    main()
