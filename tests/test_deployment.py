"""The deployment as a user runs it, against the session's real Prefect server (conftest's `prefect_api`; the team
set-up test runs `prefect server start` itself): a process work pool, `prefect deploy --all` from the repository's
own prefect.yaml with evaluate-champions' daily schedule off until turned on, `prefect deployment run` and a
worker that runs that one flow run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.servers import start, stop, tail

pytestmark = pytest.mark.slow

POOL = "weather-restore"
DEPLOYMENT = "weather-pipeline/weather-pipeline"
CHAMPIONS = "evaluate-champions/evaluate-champions"
CLI_S = 180
FLOW_RUN_S = 420  # inside the per-test limit (pyproject.toml), so a stuck run fails with the logs


@dataclass
class Server:
    url: str
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], cwd: Path, **env: str) -> tuple[subprocess.Popen, Path]:
        """Start a long-running command in its own process group, its output in logs/<name>.log."""
        log = self.logs / f"{name}.log"
        process = start(cmd, cwd, {**self.env, **env}, log)
        self.processes.append(process)
        return process, log

    def cli(self, *args: str, cwd: Path, **env: str) -> str:
        """A short `prefect` command against this server; fails the test with its output if it fails."""
        cmd = [str(Path(sys.executable).parent / "prefect"), *args]
        try:
            result = subprocess.run(
                cmd, cwd=cwd, env={**self.env, **env}, capture_output=True, text=True, timeout=CLI_S
            )
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"`{' '.join(cmd)}` ran past {CLI_S} s:\n{error.stdout}\n{error.stderr}\n{self.log_tails()}")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{output}"
        return output

    def log_tails(self) -> str:
        return "\n".join(tail(path) for path in sorted(self.logs.glob("*.log")))


def prefect_environment(home: Path, api_url: str) -> dict[str, str]:
    """This interpreter's tools first on PATH, Prefect pointed at the test server, every telemetry off."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "MLFLOW_"))}
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "ITERATIVE_DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


@pytest.fixture
def server(prefect_api, tmp_path) -> Iterator[Server]:
    """The session's Prefect server, for the `prefect` commands of a user with their own PREFECT_HOME; what the
    test starts against it is stopped at the end."""
    logs = tmp_path / "logs"
    logs.mkdir()
    server = Server(prefect_api, prefect_environment(tmp_path / "prefect-home", prefect_api), logs)
    try:
        yield server
    finally:
        for started in reversed(server.processes):
            stop(started)


def read_flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:  # the session's server (prefect_api sets PREFECT_API_URL)
        flow_run = client.read_flow_run(flow_run_id)
        deployment = client.read_deployment(flow_run.deployment_id)
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return flow_run, deployment, artifacts


def schedule_of(deployment: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        (schedule,) = client.read_deployment_by_name(deployment).schedules
    return schedule


def test_deployment_runs_on_a_process_worker_in_the_repository(server, built_tiny_repo, tmp_path):
    workspace = ("params.yaml", "dvc.lock", "models/dwgn/run.json", "models/dwgn/best.pt", "reports/dwgn/metrics.json")
    before = {path: (built_tiny_repo / path).read_bytes() for path in workspace}
    built_run = json.loads((built_tiny_repo / "models" / "dwgn" / "run.json").read_text())["run_id"]
    server.cli("work-pool", "create", POOL, "--type", "process", cwd=tmp_path)
    deployed = server.cli("deploy", "--all", "--no-prompt", cwd=built_tiny_repo)
    assert "weather-pipeline/weather-pipeline" in deployed and "evaluate-champions/evaluate-champions" in deployed
    # evaluate-champions comes with its daily schedule, off until turned on.
    schedule = schedule_of(CHAMPIONS)
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 6 * * *", "UTC", False)

    created = server.cli(
        "deployment",
        "run",
        DEPLOYMENT,
        "-p",
        'models=["dwgn"]',
        "-p",
        'params={"training.dwgn.iterations": 4}',
        cwd=tmp_path,
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", created)
    assert match, f"no flow run id in the output of `prefect deployment run`:\n{created}"
    flow_run_id = match.group(1)

    # The worker starts elsewhere: the deployment's pull step must move the flow run into the repository.
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    worker, worker_log = server.start(
        "worker",
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL, "--run-once", "--limit", "1"],
        elsewhere,
        WEATHER_RESTORE_REPO=str(built_tiny_repo),
    )
    try:
        worker.wait(timeout=FLOW_RUN_S)
    except subprocess.TimeoutExpired:
        stop(worker)
        pytest.fail(f"the worker did not finish the flow run within {FLOW_RUN_S} s\n{server.log_tails()}")

    flow_run, deployment, artifacts = read_flow_run(flow_run_id)
    assert flow_run.state.is_completed(), (
        f"flow run {flow_run.name} ended {flow_run.state.type.value}: {flow_run.state.message}\n"
        f"worker exit {worker.returncode}\n{server.log_tails()}"
    )
    assert worker.returncode == 0, tail(worker_log)
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $WEATHER_RESTORE_REPO }}"}}
    ]
    assert flow_run.parameters["models"] == ["dwgn"]
    assert flow_run.parameters["params"] == {"training.dwgn.iterations": 4}
    assert not (elsewhere / "models").exists() and not (elsewhere / "dvc.lock").exists()

    # The override ran as a DVC experiment beside the workspace, which stays as it was built: nothing ran in it ...
    assert {path: (built_tiny_repo / path).read_bytes() for path in workspace} == before
    # ... and its training, 4 iterations, and that training's evaluation went to the repository's MLflow store.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{built_tiny_repo / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    trainings = client.search_runs(experiments, "tags.stage = 'train' and tags.model = 'dwgn'")
    (tracked,) = [found for found in trainings if found.info.run_id != built_run]
    assert tracked.info.status == "FINISHED", f"MLflow run {tracked.info.run_id}: {tracked.info}"
    assert tracked.data.params["iterations"] == "4"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "loss")] == [1, 2, 3, 4]
    assert tracked.data.metrics["test_psnr"] > 0

    # The flow's artifact names the experiment and its MLflow run; `dvc exp show` lists the experiment, with the
    # override among its params.
    (artifact,) = [a for a in artifacts if a.key == "weather-pipeline"]
    assert artifact.type == "markdown"
    assert tracked.info.run_id in artifact.data
    name = re.search(r"DVC experiment `([^`]+)`", artifact.data).group(1)
    dvc = str(Path(sys.executable).parent / "dvc")
    listed = subprocess.run([dvc, "exp", "show", "--json"], cwd=built_tiny_repo, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)
    (experiment,) = [found for base in shown for found in base.get("experiments") or [] if found.get("name") == name]
    assert experiment["revs"][0]["data"]["params"]["params.yaml"]["data"]["training"]["dwgn"]["iterations"] == 4

    # The schedule, turned on as the README does (after the worker left: no worker takes its runs here).
    server.cli("deployment", "schedule", "resume", CHAMPIONS, str(schedule.id), cwd=tmp_path)
    assert schedule_of(CHAMPIONS).active is True
