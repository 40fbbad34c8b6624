"""Prefect flows over the DVC pipeline: DVC decides what is stale and caches; Prefect schedules, retries, reports.

    python -m pipelines.flows                      # the whole pipeline, Prefect's ephemeral mode
    python -m pipelines.flows --models dwgn --set training.dwgn.iterations=50 --promote

Each task runs one DVC stage (`dvc repro <stage>`) and streams DVC's and the stage's output into the Prefect
log, so an unchanged stage is skipped by DVC's cache and a failed stage fails the flow with its own message.
Stages of one repository run one after the other: DVC holds a lock on the repository while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from weather_restore.models.facts import MODEL_NAMES, MODELS

QUIET_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "DVC_STUDIO_OFFLINE": "1",
    "ITERATIVE_DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "WEATHER_RESTORE_PROGRESS": "0",
    "PYTHONUNBUFFERED": "1",
}


class StageFailed(RuntimeError):
    """A DVC stage or CLI command exited non-zero; the message holds the end of its output."""


@dataclass
class StageResult:
    stage: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _environment() -> dict[str, str]:
    # The flow's own interpreter first on PATH, so `dvc` and `weather-restore` are the ones installed with it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **QUIET_ENV, "PATH": path}


def stream(cmd: list[str], cwd: Path, timeout_s: float | None = None) -> tuple[int, list[str]]:
    """Run a command, sending each output line to the Prefect log as it comes; kill it past `timeout_s`.

    The command runs in its own process group, and a timeout (or a cancelled or interrupted flow) kills the whole
    group: killing DVC alone would leave its stage running, and an orphaned training would keep writing the
    checkpoint that the retry resumes from.
    """
    logger = get_run_logger()
    process = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        process_group=0,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    output: list[str] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    raise StageFailed(
                        f"{' '.join(cmd)} ran past its {timeout_s:.0f} s timeout and was stopped"
                    ) from None
                continue
            if line is None:
                break
            output.append(line)
            if line.strip():
                logger.info(line)
        return process.wait(), output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _failure(cmd: list[str], code: int, output: list[str]) -> StageFailed:
    tail = "\n".join(line for line in output[-25:] if line.strip())
    return StageFailed(f"`{' '.join(cmd)}` failed (exit {code}):\n{tail}")


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def repro(stage: str, repo: str, timeout_s: float | None = None, single_item: bool = False) -> StageResult:
    """`dvc repro <stage>`: runs the stage and whatever it depends on, if stale; skips it otherwise.
    `single_item`: the stage alone, its dependencies taken as they are."""
    cmd = ["dvc", "repro", *(["--single-item"] if single_item else []), stage]
    start = time.monotonic()
    code, output = stream(cmd, Path(repo), timeout_s)
    if code != 0:
        raise _failure(cmd, code, output)
    text = "\n".join(output)
    return StageResult(
        stage=stage,
        ran=re.findall(r"Running stage '([^']+)'", text),
        skipped=re.findall(r"Stage '([^']+)' didn't change, skipping", text),
        seconds=time.monotonic() - start,
    )


@task(name="weather-restore", task_run_name="weather-restore {args}")
def cli(
    args: list[str], repo: str, allowed_codes: tuple[int, ...] = (0,), timeout_s: float | None = None
) -> tuple[int, str]:
    """Run a `weather-restore` subcommand in the repository; exit codes outside `allowed_codes` fail."""
    cmd = ["weather-restore", *args]
    code, output = stream(cmd, Path(repo), timeout_s)
    if code not in allowed_codes:
        raise _failure(cmd, code, output)
    return code, "\n".join(output)


@task(name="set-params")
def set_params(overrides: dict[str, Any], repo: str) -> dict[str, Any]:
    """Write dotted overrides (`training.dwgn.iterations: 50`) into params.yaml, after validating the result.

    Comments and order are kept (ruamel round trip), and DVC then records the values in dvc.lock, as
    `dvc exp run --set-param` would.
    """
    from ruamel.yaml import YAML

    from weather_restore.config import parse_params
    from weather_restore.outputs import atomic_path

    path = Path(repo) / "params.yaml"
    yaml = YAML()
    document = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        node = document
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    plain = json.loads(json.dumps(document, default=list))
    parse_params(plain, f"{path} with overrides {overrides}")
    with atomic_path(path) as temporary, open(temporary, "w") as handle:
        yaml.dump(document, handle)
    get_run_logger().info("params.yaml updated: %s", overrides)
    return overrides


def pipeline_stages(repo: Path) -> set[str]:
    """Stage names defined in dvc.yaml (`train@dwgn` for foreach stages), so the flow follows the pipeline."""
    import yaml

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    names = set()
    for name, stage in stages.items():
        items = stage.get("foreach") if isinstance(stage, dict) else None
        if isinstance(items, list):
            names.update(f"{name}@{item}" for item in items)
        else:
            names.add(name)
    return names


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def registry_state(repo: Path, model: str) -> str:
    """`DwGN v4 from run 0a1b...; champion v3`: the newest registry version made from the model's MLflow run
    (models/<model>/run.json) and the version the `champion` alias points at, read from the registry itself."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run = _read_json(repo / "models" / model / "run.json") or {}
    if not run.get("run_id"):
        return "no MLflow run"
    name = MODELS[model].registered_name
    client = MlflowClient(run["tracking_uri"])
    ours = client.search_model_versions(f"name = '{name}' and run_id = '{run['run_id']}'")
    newest = max((int(version.version) for version in ours), default=None)
    try:
        champion = f"v{client.get_model_version_by_alias(name, 'champion').version}"
    except MlflowException:
        champion = "none"
    made = f"{name} v{newest} from run {run['run_id']}" if newest else f"no {name} version from run {run['run_id']}"
    return f"{made}; champion {champion}"


def summary_markdown(repo: Path, models: list[str], stages: list[StageResult], decisions: dict[str, str]) -> str:
    """The run's artifact: the comparison table, MLflow run ids, registry decisions and what DVC ran."""
    compare = repo / "reports" / "compare.md"
    lines = [compare.read_text() if compare.is_file() else "_no comparison table (reports/compare.md)_", ""]
    lines += ["## MLflow", "", "| model | run id | experiment | registry |", "|---|---|---|---|"]
    for model in models:
        run = _read_json(repo / "models" / model / "run.json") or {}
        lines.append(
            f"| {model} | {run.get('run_id', 'n/a')} | {run.get('experiment', 'n/a')} "
            f"| {decisions.get(model, 'not registered in this run')} |"
        )
    lines += ["", "## Stages", "", "| dvc repro | ran | skipped | seconds |", "|---|---|---|---|"]
    for result in stages:
        lines.append(
            f"| {result.stage} | {', '.join(result.ran) or '-'} | {', '.join(result.skipped) or '-'} "
            f"| {result.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


@flow(name="weather-pipeline", log_prints=True)
def weather_pipeline(
    models: list[str] | None = None,
    params: dict[str, Any] | None = None,
    promote: bool = False,
    repo: str = ".",
    train_retries: int = 2,
    train_timeout_s: float = 6 * 3600,
    stage_timeout_s: float = 3600,
) -> dict[str, Any]:
    """Data, then per model train, evaluate and export; the comparison; optionally register and promote.

    A retried training resumes from its last checkpoint (the train stage does that for the same config).
    """
    models = list(models or MODEL_NAMES)
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODEL_NAMES)}")
    root = str(Path(repo).resolve())
    if params:
        set_params(params, root)
    defined = pipeline_stages(Path(root))
    results = [repro("split", root, stage_timeout_s)]
    train = repro.with_options(retries=train_retries, retry_delay_seconds=10)
    for model in models:
        results.append(train(f"train@{model}", root, train_timeout_s))
        for stage in (f"evaluate@{model}", f"export@{model}"):
            if stage in defined:
                results.append(repro(stage, root, stage_timeout_s))
    if "compare" in defined:
        # `dvc repro compare` would train and evaluate the models left out of this run: compare only the
        # metrics those already have, or skip the table until they have some.
        others = [model for model in MODEL_NAMES if model not in models]
        missing = [model for model in others if not (Path(root) / "reports" / model / "metrics.json").is_file()]
        if missing:
            get_run_logger().info("compare skipped: no reports/<model>/metrics.json yet for %s", missing)
        else:
            results.append(repro("compare", root, stage_timeout_s, single_item=bool(others)))
    decisions: dict[str, str] = {}
    if promote:
        for model in models:
            cli(["register", "--model", model], root, timeout_s=stage_timeout_s)
            # The gate refusing a version (exit 3) is a decision, not a failure of the run.
            code, verdict = cli(["promote", "--model", model], root, allowed_codes=(0, 3), timeout_s=stage_timeout_s)
            lines = [line for line in verdict.splitlines() if line.strip()]
            # A refusal prints its reasons first, then the gate's table; a promotion ends with what it did.
            said = [line for line in lines if line.startswith("weather-restore promote:")][:1] or lines[-1:]
            decisions[model] = "; ".join(
                [f"{'promoted' if code == 0 else 'refused'}: {registry_state(Path(root), model)}", *said]
            )
    markdown = summary_markdown(Path(root), models, results, decisions)
    create_markdown_artifact(markdown=markdown, key="weather-pipeline", description="models compared per weather")
    return {"stages": [asdict(r) for r in results], "decisions": decisions}


@flow(name="evaluate-champions", log_prints=True)
def evaluate_champions(
    models: list[str] | None = None, repo: str = ".", stage_timeout_s: float = 3600
) -> dict[str, Any]:
    """Evaluate each model's `champion` registry version on the current test split and report."""
    models = list(models or MODEL_NAMES)
    root = str(Path(repo).resolve())
    repro("split", root, stage_timeout_s)
    rows = ["| model | version | PSNR | SSIM | input PSNR |", "|---|---|---|---|---|"]
    results = {}
    for model in models:
        out = Path(root) / "reports" / "champion" / model
        uri = f"models:/{MODELS[model].registered_name}@champion"
        cli(["evaluate", "--model", model, "--model-uri", uri, "--out", str(out)], root, timeout_s=stage_timeout_s)
        metrics = json.loads((out / "metrics.json").read_text())
        overall = metrics["overall"]
        results[model] = metrics
        rows.append(
            f"| {model} | {uri} | {overall['psnr']:.2f} | {overall['ssim']:.4f} | {overall['input_psnr']:.2f} |"
        )
    create_markdown_artifact(markdown="\n".join(rows) + "\n", key="champions", description="champions on test")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the weather-restore pipeline flow (Prefect).")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (YAML)")
    parser.add_argument("--promote", action="store_true", help="register and promote behind the gate")
    parser.add_argument("--repo", default=".")
    args = parser.parse_args(argv)
    import yaml

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    weather_pipeline(models=args.models, params=overrides or None, promote=args.promote, repo=args.repo)


if __name__ == "__main__":
    main()
