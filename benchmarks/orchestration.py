"""Orchestration overhead of the Prefect pipeline flow: its wall time minus the time its stage commands ran.

    OMP_NUM_THREADS=1 python benchmarks/orchestration.py [--params tiny|quickstart|PATH] [--models dwgn ...]
                                                         [--out reports/bench/orchestration.json]

Runs `weather_pipeline` in Prefect's ephemeral mode (no PREFECT_API_URL, a PREFECT_HOME of its own) on a temporary
git copy of the project, twice: a full run (every stage runs) and a rerun (DVC finds nothing stale). In the copy's
dvc.yaml every stage command is wrapped by this script's `--time-stage` mode, which records how long the command
itself ran, so that the overhead splits into

    Prefect = flow wall time - time of the `dvc repro` subprocesses  (tasks, states, logs, params, artifact)
    DVC     = time of the `dvc repro` subprocesses - time of the stage commands  (start-up, hashing, locks, skips)

The ephemeral server's start-up is timed on its own, with a flow that does nothing, before the pipeline runs.
`--params tiny` (default) is a tiny setting like the tests' tiny repository (32x32 frames, models of a few thousand
parameters, 6 iterations; about two minutes here); `--params quickstart` the repository's own params.yaml (20+
minutes on a 2-core CPU); a path, any params file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from weather_restore.models.facts import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DVC_STUDIO_OFFLINE": "1",
    "ITERATIVE_DO_NOT_TRACK": "1",
    "WEATHER_RESTORE_PROGRESS": "0",
}


def time_stage(log: str, stage: str, command: list[str]) -> int:
    """The wrapper DVC runs instead of a stage command: run it, append its duration to `log`, pass its exit on."""
    start = time.monotonic()
    code = subprocess.call(command)
    with open(log, "a") as handle:
        handle.write(json.dumps({"stage": stage, "seconds": time.monotonic() - start, "exit": code}) + "\n")
    return code


# A tiny setting like the tests' tiny repository (tests/conftest.py), kept here: a benchmark never imports the tests.
TINY_MODELS = {
    "dynstaticnet": {"dim": 8, "blocks": [1, 1, 1], "refinement_blocks": 1, "heads": [1, 1, 1], "refinement_heads": 1},
    "dwgn": {
        "dim": 16,
        "head_dim": 16,
        "window": 4,
        "encoder_blocks": [1, 0, 0],
        "bottleneck_blocks": 0,
        "decoder_blocks": [0, 0, 1],
    },
}
TINY_TRAINING = {"iterations": 6, "batch_size": 2, "crop": 16, "clip_frames": 3, "lr": 1e-3, "workers": 0}


def tiny_params(params: dict[str, Any]) -> dict[str, Any]:
    """32x32 frames, 3 videos per weather, models of a few thousand parameters, 6 iterations."""
    params["data"]["synthetic"].update(videos_per_weather=3, frames_per_video=20, frame_size=[32, 32])
    params["data"]["clips"].update(train_per_weather=2, val_per_weather=1, test_per_weather=1)
    params["models"] = TINY_MODELS
    params["training"] = {name: {**TINY_TRAINING, "checkpoint_every": 3, "validate_every": 3} for name in TINY_MODELS}
    params["evaluation"] = {"max_clips": 0, "lpips": False, "flops_size": [32, 32]}
    return params


def timed_pipeline(dvc_yaml: Path, log: Path) -> None:
    """Wrap every stage command of a dvc.yaml in `--time-stage`, named as DVC names the stage."""
    pipeline = yaml.safe_load(dvc_yaml.read_text())
    for name, stage in pipeline["stages"].items():
        body, stage_name = (stage["do"], f"{name}@${{item}}") if "foreach" in stage else (stage, name)
        wrapper = [sys.executable, str(SCRIPT), "--time-stage", str(log), stage_name]
        body["cmd"] = f"{shlex.join(wrapper)} {body['cmd']}"
    dvc_yaml.write_text(yaml.safe_dump(pipeline, sort_keys=False))


def make_copy(root: Path, params_choice: str, log: Path) -> None:
    """A git repository holding the project as `git ls-files` sees it, with the chosen params, no dvc.lock."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    if params_choice == "tiny":
        params = tiny_params(yaml.safe_load((root / "params.yaml").read_text()))
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    elif params_choice != "quickstart":
        shutil.copy2(params_choice, root / "params.yaml")
    (root / "dvc.lock").unlink(missing_ok=True)
    timed_pipeline(root / "dvc.yaml", log)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark copy"]):
        subprocess.run([*git, *cmd], cwd=root, check=True, capture_output=True)


def read_log(log: Path) -> dict[str, float]:
    seconds: dict[str, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            seconds[entry["stage"]] = seconds.get(entry["stage"], 0.0) + entry["seconds"]
    return seconds


def measure(name: str, run: Any, log: Path) -> dict[str, Any]:
    """One pipeline run: the flow's wall time against its `dvc repro` tasks and the stage commands they ran."""
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    commands = read_log(log)
    stages = [
        {
            "task": f"dvc repro {stage['stage']}",
            "ran": stage["ran"],
            "dvc_s": stage["seconds"],
            "commands_s": sum(commands.get(ran, 0.0) for ran in stage["ran"]),
        }
        for stage in result["stages"]
    ]
    dvc_s = sum(stage["dvc_s"] for stage in stages)
    commands_s = sum(commands.values())
    return {
        "run": name,
        "tasks": len(stages),
        "wall_s": wall,
        "dvc_s": dvc_s,
        "commands_s": commands_s,
        "prefect_overhead_s": wall - dvc_s,
        "dvc_overhead_s": dvc_s - commands_s,
        "overhead_s": wall - commands_s,
        "stages": stages,
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"ephemeral Prefect server start-up (a flow that does nothing): {report['ephemeral_startup_s']:.1f} s")
    for run in report["runs"]:
        print(f"\n{run['run']}")
        print(f"  {'task':<32} {'dvc repro s':>11} {'commands s':>10} {'DVC s':>7}  ran")
        for stage in run["stages"]:
            print(
                f"  {stage['task']:<32} {stage['dvc_s']:11.2f} {stage['commands_s']:10.2f} "
                f"{stage['dvc_s'] - stage['commands_s']:7.2f}  {', '.join(stage['ran']) or '-'}"
            )
    print(
        f"\n{'run':<11} {'tasks':>5} {'flow s':>8} {'commands s':>10} {'Prefect s':>9} {'DVC s':>7} {'overhead s':>10}"
        f" {'share':>6}"
    )
    for run in report["runs"]:
        share = run["overhead_s"] / run["wall_s"]
        print(
            f"{run['run']:<11} {run['tasks']:>5} {run['wall_s']:8.1f} {run['commands_s']:10.1f} "
            f"{run['prefect_overhead_s']:9.1f} {run['dvc_overhead_s']:7.1f} {run['overhead_s']:10.1f} {share:6.0%}"
        )


def main() -> None:
    if sys.argv[1:2] == ["--time-stage"]:
        log, stage, *command = sys.argv[2:]
        sys.exit(time_stage(log, stage, command))
    sys.path.insert(0, str(ROOT))  # pipelines/, when run as a script
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="tiny", help="tiny (default), quickstart, or a params file")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "orchestration.json")
    args = parser.parse_args()
    if args.params not in ("tiny", "quickstart"):
        args.params = str(Path(args.params).resolve())

    with tempfile.TemporaryDirectory(prefix="orchestration-") as tmp:
        work = Path(tmp)
        # Ephemeral mode: no server to talk to, a database of this run's own.
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.update(QUIET, PREFECT_HOME=str(work / "prefect-home"))
        from prefect import flow

        from pipelines.flows import weather_pipeline

        log = work / "stages.jsonl"
        repo = work / "repo"
        make_copy(repo, args.params, log)

        @flow(name="noop")
        def noop() -> None:
            """Nothing: its run time is the ephemeral server's start-up and one flow run's bookkeeping."""

        start = time.perf_counter()
        noop()
        startup = time.perf_counter() - start

        def pipeline() -> dict[str, Any]:
            return weather_pipeline(models=args.models, repo=str(repo))

        runs = [measure("full", pipeline, log), measure("no-op rerun", pipeline, log)]

    report = {
        "params": args.params if args.params in ("tiny", "quickstart") else "file",
        "models": args.models,
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "ephemeral_startup_s": startup,
        "runs": runs,
    }
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
