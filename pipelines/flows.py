"""Prefect flows over the DVC pipeline: DVC decides what is stale and caches; Prefect schedules, retries, reports.

    python -m pipelines.flows                      # the whole pipeline, Prefect's ephemeral mode
    python -m pipelines.flows --models dwgn --promote
    python -m pipelines.flows --models dwgn --set training.dwgn.iterations=50   # a DVC experiment

Each task runs one DVC stage and what it depends on, asking DVC (`dvc status`) which of them are stale and
running those (`dvc repro --single-item`), and streams DVC's and the stage's output into the Prefect log: an
unchanged stage is skipped, a failed stage fails the flow with its own message. Stages of one repository run one
after the other: DVC holds a lock on the repository while it runs. Overrides (`--set`) never touch params.yaml:
they run as one `dvc exp run --temp --set-param` experiment beside the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from pipelines.schedules import claim, claimed_by, release_on_failure, run_slot
from weather_restore.data.records import WEATHERS
from weather_restore.models.facts import MODEL_NAMES, MODELS
from weather_restore.tracking import TEST_SET_TAG

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


def stream(
    cmd: list[str], cwd: Path, timeout_s: float | None = None, env: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Run a command, sending each output line to the Prefect log as it comes; kill it past `timeout_s`.

    The command runs in its own process group, and a timeout (or a cancelled or interrupted flow) kills the whole
    group: killing DVC alone would leave its stage running, and an orphaned training would keep writing the
    checkpoint that the retry resumes from.
    """
    logger = get_run_logger()
    process = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**_environment(), **(env or {})},
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


def _dvc_json(args: list[str], repo: Path) -> Any:
    """A DVC command's `--json` answer."""
    done = subprocess.run(["dvc", *args, "--json"], cwd=repo, env=_environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise StageFailed(f"`dvc {' '.join(args)} --json` failed (exit {done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout or "{}")


def _target(repo: Path, stage: str) -> str:
    # The Repo API resolves targets against the process's working directory: name the dvc.yaml in full.
    return f"{repo / 'dvc.yaml'}:{stage}"


def pipeline_of(stage: str, repo: Path) -> list[str]:
    """`stage` and every stage it depends on, dependencies first (`train@dwgn` for a foreach item), from DVC's
    graph of the pipeline (`collect(..., with_deps=True)` gives the same stages as a set, in no order)."""
    from dvc.repo import Repo
    from dvc.repo.graph import collect_pipeline

    with Repo(str(repo)) as dvc:
        (target,) = dvc.stage.collect(_target(repo, stage))
        return [found.name for found in collect_pipeline(target, dvc.index.graph)]


def is_stale(stage: str, repo: Path) -> bool:
    """Whether DVC would run `stage` now (`dvc status <stage>` lists it): a dependency, parameter or output of it
    changed since dvc.lock recorded it, or it never ran."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        return bool(dvc.status(targets=[_target(repo, stage)]))


def pipeline_stages(repo: Path) -> set[str]:
    """Every stage of the repository's dvc.yaml, as DVC reads it, so the flow follows the pipeline."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        return {found.name for found in dvc.index.stages if Path(found.path).resolve() == (repo / "dvc.yaml").resolve()}


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def repro(stage: str, repo: str, timeout_s: float | None = None, single_item: bool = False) -> StageResult:
    """`dvc repro <stage>`: runs the stage and whatever it depends on, if stale; skips it otherwise.
    `single_item`: the stage alone, its dependencies taken as they are.

    The stages run one by one, dependencies first, each after asking DVC whether it is stale, so what ran and
    what was skipped is DVC's own answer."""
    root = Path(repo)
    result = StageResult(stage=stage)
    start = time.monotonic()
    logger = get_run_logger()
    stages = [stage] if single_item else pipeline_of(stage, root)
    logger.info("%s and what it depends on: %s", stage, ", ".join(stages))
    for name in stages:
        if not is_stale(name, root):
            logger.info("%s: up to date (dvc status), skipped", name)
            result.skipped.append(name)
            continue
        cmd = ["dvc", "repro", "--single-item", name]
        left = None if timeout_s is None else max(timeout_s - (time.monotonic() - start), 1.0)
        code, output = stream(cmd, root, left)
        if code != 0:
            raise _failure(cmd, code, output)
        result.ran.append(name)
    result.seconds = time.monotonic() - start
    return result


@task(name="dvc-exp-run", task_run_name="dvc exp run {name}")
def experiment(
    name: str,
    models: list[str],
    targets: list[str],
    overrides: dict[str, Any],
    repo: str,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """`dvc exp run --temp --set-param ...`: the stages as one DVC experiment named `name`, run in a temporary
    copy of the repository, so the workspace (params.yaml, dvc.lock, outputs) stays as it is; its MLflow runs go
    to the workspace's store. Returns the experiment's params as `dvc exp show` has them and, per model, the
    MLflow run of its training (models/<model>/run.json as the experiment holds it), where its metrics are."""
    import dvc.api

    root = Path(repo)
    settings = [f"--set-param={key}={json.dumps(value)}" for key, value in overrides.items()]
    cmd = ["dvc", "exp", "run", "--temp", "--name", name, *settings, *targets]
    code, output = stream(cmd, root, timeout_s, {"MLFLOW_TRACKING_URI": _tracking_uri(root)})
    if code != 0:
        raise _failure(cmd, code, output)
    shown = [
        found
        for baseline in _dvc_json(["exp", "show", "--no-fetch"], root)
        for found in baseline.get("experiments") or []
    ]
    params = next((found["revs"][0]["data"]["params"] for found in shown if found.get("name") == name), None)
    if params is None:
        raise StageFailed(f"dvc exp show does not list the experiment {name} that `{' '.join(cmd)}` ran")
    runs = {
        model: json.loads(dvc.api.read(f"models/{model}/run.json", repo=str(root), rev=name)).get("run_id")
        for model in models
    }
    return {"name": name, "params": params, "runs": runs}


def _tracking_uri(root: Path) -> str:
    """The workspace's MLflow store, made ready (experiment and artifact folder) before a copy logs into it."""
    from weather_restore.config import load_params
    from weather_restore.tracking import ensure_experiment, tracking_uri

    params = load_params(root / "params.yaml")
    uri = tracking_uri(params.tracking, root)
    ensure_experiment(params.tracking, root, uri)
    return uri


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


def check_overrides(overrides: dict[str, Any], repo: Path, source: str | None = None) -> None:
    """Validate dotted overrides (`training.dwgn.iterations: 50`) against params.yaml, which stays as it is; a
    problem is reported as found in `source` (default: params.yaml with the overrides)."""
    import yaml

    from weather_restore.config import parse_params

    path = repo / "params.yaml"
    document = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        node = document
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    parse_params(document, source or f"{path} with overrides {overrides}")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def registry_state(repo: Path, model: str) -> str:
    """`DwGN v4 from run 0a1b...; champion v3; gate: ...`: the newest registry version made from the model's MLflow
    run (models/<model>/run.json), the version the `champion` alias points at and the promotion gate's verdict on
    the newest version (its `promotion.gate` tag, when promote judged it), read from the registry itself."""
    from mlflow import MlflowClient

    from weather_restore.registry import champion_version

    run = _read_json(repo / "models" / model / "run.json") or {}
    if not run.get("run_id"):
        return "no MLflow run"
    name = MODELS[model].registered_name
    client = MlflowClient(run["tracking_uri"])
    ours = client.search_model_versions(f"name = '{name}' and run_id = '{run['run_id']}'")
    newest = max(ours, key=lambda version: int(version.version), default=None)
    current = champion_version(client, name)
    champion = f"v{current.version}" if current else "none"
    if newest is None:
        return f"no {name} version from run {run['run_id']}; champion {champion}"
    gate = newest.tags.get("promotion.gate")
    return f"{name} v{newest.version} from run {run['run_id']}; champion {champion}" + (
        f"; gate: {gate}" if gate else ""
    )


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
    """Data, then per model train, evaluate, export and its model card; the comparison; optionally register and
    promote.

    A retried training resumes from its last checkpoint (the train stage does that for the same config).
    """
    models = list(models or MODEL_NAMES)
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODEL_NAMES)}")
    root = Path(repo).resolve()
    defined = pipeline_stages(root)
    kinds = ("evaluate", "export", "card")
    per_model = [stage for model in models for kind in kinds if (stage := f"{kind}@{model}") in defined]
    if params:
        if promote:
            raise ValueError(
                "overrides run as a DVC experiment beside the workspace, and promote registers what the workspace "
                "holds: run the overrides, `dvc exp apply` the experiment, then run again with promote"
            )
        check_overrides(params, root)
        # `compare` would train the models left out of the experiment: it runs only when they are all in.
        whole = set(models) == set(MODEL_NAMES) and "compare" in defined
        name = f"flow-{datetime.now():%Y%m%d-%H%M%S}"
        targets = [*(f"train@{model}" for model in models), *per_model, *(["compare"] if whole else [])]
        found = experiment(name, models, targets, params, str(root), train_timeout_s)
        runs = ", ".join(f"{model}: MLflow run {run}" for model, run in found["runs"].items())
        markdown = f"DVC experiment `{name}` with {params} ({runs}): `dvc exp show`, `dvc exp apply {name}`\n"
        create_markdown_artifact(markdown=markdown, key="weather-pipeline", description="the experiment run")
        return {"experiment": found, "stages": [], "decisions": {}}

    results = [repro("split", str(root), stage_timeout_s)]
    train = repro.with_options(retries=train_retries, retry_delay_seconds=10)
    for model in models:
        results.append(train(f"train@{model}", str(root), train_timeout_s))
        results += [repro(stage, str(root), stage_timeout_s) for stage in per_model if stage.endswith(f"@{model}")]
    if "compare" in defined:
        # `dvc repro compare` would train and evaluate the models left out of this run: compare only the
        # metrics those already have, or skip the table until they have some.
        others = [model for model in MODEL_NAMES if model not in models]
        missing = [model for model in others if not (root / "reports" / model / "metrics.json").is_file()]
        if missing:
            get_run_logger().info("compare skipped: no reports/<model>/metrics.json yet for %s", missing)
        else:
            results.append(repro("compare", str(root), stage_timeout_s, single_item=bool(others)))
    decisions: dict[str, str] = {}
    if promote:
        for model in models:
            cli(["register", "--model", model], str(root), timeout_s=stage_timeout_s)
            # The gate refusing a version (exit 3) is a decision, not a failure of the run; its reasons are
            # recorded on the version, where registry_state reads them.
            code, _ = cli(["promote", "--model", model], str(root), allowed_codes=(0, 3), timeout_s=stage_timeout_s)
            decisions[model] = f"{'promoted' if code == 0 else 'refused'}: {registry_state(root, model)}"
    markdown = summary_markdown(root, models, results, decisions)
    create_markdown_artifact(markdown=markdown, key="weather-pipeline", description="models compared per weather")
    return {"stages": [asdict(r) for r in results], "decisions": decisions}


@flow(name="evaluate-champions", log_prints=True, on_failure=[release_on_failure], on_crashed=[release_on_failure])
def evaluate_champions(
    models: list[str] | None = None, repo: str = ".", stage_timeout_s: float = 3600, slot: str | None = None
) -> dict[str, Any]:
    """Evaluate each model's `champion` registry version on the current test split and report its drift from the
    test PSNR registered with the version (artifact `champion-drift`). Once per schedule slot (`slot`, default the
    time its schedule gave the run): a run for a slot evaluated before does nothing and returns {}
    (pipelines/schedules.py)."""
    models = list(models or MODEL_NAMES)
    root = str(Path(repo).resolve())
    run = FlowRunContext.get().flow_run
    slot = run_slot({"slot": slot}, run)
    if slot is not None and not claim(Path(root), "evaluate-champions", slot, str(run.id)):
        print(f"slot {slot} was evaluated by flow run {claimed_by(Path(root), 'evaluate-champions', slot)}: skipped")
        return {}
    repro("split", root, stage_timeout_s)
    rows = ["| model | version | PSNR | SSIM | input PSNR |", "|---|---|---|---|---|"]
    results, drift = {}, []
    for model in models:
        champion = current_champion(model, Path(root))
        out = Path(root) / "reports" / "champion" / model
        # The version the alias named when the run began, though promote may move the alias meanwhile.
        uri = f"models:/{champion.name}/{champion.version}"
        cli(["evaluate", "--model", model, "--model-uri", uri, "--out", str(out)], root, timeout_s=stage_timeout_s)
        metrics = json.loads((out / "metrics.json").read_text())
        overall = metrics["overall"]
        results[model] = metrics
        drift += champion_drift(model, str(champion.version), champion.tags, metrics)
        rows.append(
            f"| {model} | {uri} (champion) | {overall['psnr']:.2f} | {overall['ssim']:.4f} "
            f"| {overall['input_psnr']:.2f} |"
        )
    create_markdown_artifact(markdown="\n".join(rows) + "\n", key="champions", description="champions on test")
    create_table_artifact(
        table=drift,
        key="champion-drift",
        description="each champion's test PSNR (dB) now against the figures registered with its version",
    )
    for row in drift:
        print(", ".join(f"{key} {value}" for key, value in row.items()))
    return results


def current_champion(model: str, repo: Path) -> Any:
    """The registry version the `champion` alias of `model` names now, from the repository's MLflow store."""
    from weather_restore.errors import RegistryError
    from weather_restore.registry import CHAMPION, champion_version, connect

    name = MODELS[model].registered_name
    client = connect(_tracking_uri(repo))
    if (version := champion_version(client, name)) is None:
        raise RegistryError(
            f"{name} has no {CHAMPION} in {client.tracking_uri}: promote a version first "
            f"(weather-restore promote --model {model})"
        )
    return version


def champion_drift(model: str, version: str, tags: dict[str, str], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the drift table: overall and per weather, the test PSNR registered with the version (its tags,
    copied from its training's evaluation), the PSNR measured now (metrics.json) and the difference; `same test
    set` says whether both were measured on the same clips (the manifest checksum), without which a drift is the
    data's, not the model's."""
    same = tags.get(TEST_SET_TAG) == metrics.get("manifest_checksum")
    scopes = [("overall", "test_psnr", metrics["overall"])]
    scopes += [(w, f"test_psnr_{w}", metrics["per_weather"][w]) for w in WEATHERS if w in metrics["per_weather"]]
    rows = []
    for scope, key, figures in scopes:
        registered = float(tags[key]) if key in tags else None
        now = figures.get("psnr")
        delta = None if registered is None or now is None else now - registered
        rows.append(
            {
                "model": model,
                "version": version,
                "weather": scope,
                "registered test PSNR": None if registered is None else round(registered, 4),
                "now": None if now is None else round(now, 4),
                "delta": None if delta is None else round(delta, 4),
                "same test set": same,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the weather-restore pipeline flow (Prefect).")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="params override (YAML): a DVC experiment"
    )
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
