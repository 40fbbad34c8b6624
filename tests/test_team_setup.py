"""The team set-up of docs/deploy.md on real servers, loopback only: PostgreSQL (Debian's, started here as an
unprivileged user with its own data folder and a free port), an S3-compatible server (moto), an MLflow tracking
server with its store in PostgreSQL and its artifacts in S3, a DVC remote on the same S3, and Prefect's server on
the same PostgreSQL with a process worker. The project's code sees what a team member's machine gives it: a
tracking URL, an `s3://` artifact root, MLFLOW_S3_ENDPOINT_URL and AWS_* credentials in the environment.

Only DwGN goes through train -> evaluate -> export -> register -> promote against the servers: it is the cheaper
model, and both models make the same calls to the servers. The rest of the repository comes built from the
session's tiny pipeline, so the DVC round trip pushes and pulls every stage's outputs, both models'."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from tests.servers import free_port, stop, tail

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
BUCKET = "weather-restore"
REMOTE = "team"  # the DVC remote's name
# Any values do for the S3 stand-in; a real team's never reach git (only the environment, or .dvc/config.local).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "team-key-id",
    "AWS_SECRET_ACCESS_KEY": "team-secret-never-committed",
    "AWS_DEFAULT_REGION": "us-east-1",
}
DB_USER, DB_PASSWORD = "team", "team-db-password"
PG_OS_USER = "postgres"  # PostgreSQL refuses to run as root: as root, the server runs as this user
POOL = "weather-restore"  # prefect.yaml's work pool
START_S = 180
CLI_S = 300
FLOW_RUN_S = 300
IDLE_LIMIT_MIB = 1536  # each server's idle RSS stays under this (MLflow's job runner alone would exceed it)


def sh(cmd: list, cwd: Path, env: dict[str, str], timeout_s: float = CLI_S) -> str:
    """A command that must succeed; its output (stdout and stderr)."""
    cmd = [str(part) for part in cmd]
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"`{' '.join(cmd)}` ran past {timeout_s} s:\n{error.stdout}\n{error.stderr}")
    assert result.returncode == 0, (
        f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout + result.stderr


def quiet_environment() -> dict[str, str]:
    """This interpreter's tools first on PATH, no server of the caller's, every telemetry off."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "ITERATIVE_DO_NOT_TRACK": "1",
        "WEATHER_RESTORE_PROGRESS": "0",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }


def responds(url: str) -> bool:
    """Whether anything answers HTTP at `url` now (an error status counts: the server is up)."""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


# --- PostgreSQL ---------------------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest PostgreSQL under /usr/lib/postgresql/<major>/bin (Debian's layout), else initdb's on PATH."""
    found = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb") if path.parts[-3].isdigit()]
    if found:
        return max(found, key=lambda folder: int(folder.parts[-2]))
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


def unavailable(message: str) -> None:
    """CI installs what this module needs (.ci/run): there a missing piece fails; elsewhere it skips."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Postgres:
    bin: Path
    folder: Path  # the data folder, the server's log and its socket, owned by PG_OS_USER when run as root
    port: int
    as_owner: list[str]  # runs a command as the folder's owner

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def client(self, tool: str, *args: str) -> list[str]:
        return [str(self.bin / tool), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, *args]

    def query(self, database: str, sql: str) -> str:
        """One value (or rows, one a line), read with psql as a team's administrator would."""
        env = {**quiet_environment(), "PGPASSWORD": DB_PASSWORD}
        return sh(self.client("psql", "-d", database, "-tA", "-c", sql), self.folder, env).strip()

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server of the module's own: `initdb` (password authentication, an administrator DB_USER) and
    `pg_ctl start` on 127.0.0.1 and a free port, its socket in its own folder; stopped and deleted at the end."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        unavailable(
            "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin): "
            "apt-get install postgresql"
        )
    as_owner: list[str] = []
    if os.geteuid() == 0:
        # runuser lives in /usr/sbin, which a non-login root shell's PATH may lack.
        runuser = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
        if runuser is None or not _user_exists(PG_OS_USER):
            unavailable(
                f"PostgreSQL refuses to run as root and this machine has no user {PG_OS_USER!r} to run it "
                "(Debian's postgresql package creates it) or no runuser"
            )
        as_owner = [runuser, "-u", PG_OS_USER, "--"]
    # Not under pytest's root-only temporary folder: the server's user must reach it.
    folder = Path(tempfile.mkdtemp(prefix="weather-restore-pg-"))
    (folder / "password").write_text(DB_PASSWORD)
    if as_owner:
        for path in (folder, folder / "password"):
            shutil.chown(path, PG_OS_USER)
    db = Postgres(bin_dir, folder, free_port(), as_owner)
    env = quiet_environment()
    log = folder / "server.log"
    try:
        sh(
            [
                *as_owner,
                bin_dir / "initdb",
                "-D",
                db.data,
                "-U",
                DB_USER,
                "--pwfile",
                folder / "password",
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--no-locale",
            ],
            folder,
            env,
        )
        with open(folder / "pg_ctl.log", "w") as out:  # the server keeps none of pg_ctl's pipes
            started = subprocess.run(
                [
                    *as_owner,
                    bin_dir / "pg_ctl",
                    "-D",
                    db.data,
                    "-l",
                    log,
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    f"-h 127.0.0.1 -p {db.port} -k {folder}",
                    "start",
                ],
                cwd=folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        if started.returncode != 0:
            pytest.fail(f"PostgreSQL did not start\n{tail(folder / 'pg_ctl.log')}\n{tail(log)}")
        yield db
    finally:
        if (db.data / "postmaster.pid").exists():
            subprocess.run(
                [*as_owner, bin_dir / "pg_ctl", "-D", db.data, "-m", "fast", "-w", "stop"],
                cwd=folder,
                env=env,
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# --- the servers --------------------------------------------------------------------------------------------------


@dataclass
class Team:
    postgres: Postgres
    s3_url: str
    mlflow_url: str
    prefect_api: str
    prefect_home: Path
    logs: Path
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def member_env(self) -> dict[str, str]:
        """What a team member's machine sets: the tracking server, the S3 endpoint and the S3 credentials."""
        return {
            **quiet_environment(),
            **CREDENTIALS,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
        }

    def prefect_env(self) -> dict[str, str]:
        return {
            **self.member_env(),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_CLI_PROMPT": "false",
        }

    def prefect(self, *args: str, cwd: Path) -> str:
        return sh([BIN / "prefect", *args], cwd, self.prefect_env())

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def log_tails(self) -> str:
        return "\n".join(tail(path) for path in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory) -> Iterator[Team]:
    """The S3 server, the MLflow tracking server and Prefect's server, started together (each waits on its own
    start-up), on PostgreSQL's databases `mlflow` and `prefect`."""
    folder = tmp_path_factory.mktemp("team-servers")
    env = {**quiet_environment(), "PGPASSWORD": DB_PASSWORD}
    for database in ("mlflow", "prefect"):
        sh(postgres.client("createdb", database), folder, env)
    ports = {name: free_port() for name in ("s3", "mlflow", "prefect")}
    team = Team(
        postgres=postgres,
        s3_url=f"http://127.0.0.1:{ports['s3']}",
        mlflow_url=f"http://127.0.0.1:{ports['mlflow']}",
        prefect_api=f"http://127.0.0.1:{ports['prefect']}/api",
        prefect_home=folder / "prefect-home",
        logs=folder / "logs",
    )
    team.logs.mkdir()
    server_env = team.member_env()
    commands = {
        "s3": ([BIN / "moto_server", "-H", "127.0.0.1", "-p", ports["s3"]], server_env),
        "mlflow": (
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                ports["mlflow"],
                "--workers",
                "1",
                "--backend-store-uri",
                postgres.url("mlflow"),
                "--default-artifact-root",
                f"s3://{BUCKET}/mlflow",
                "--no-serve-artifacts",
            ],
            {**server_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        ),
        "prefect": (
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", ports["prefect"]],
            {
                **team.prefect_env(),
                "PREFECT_SERVER_UI_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url("prefect", "postgresql+asyncpg"),
            },
        ),
    }
    health = {"s3": team.s3_url, "mlflow": f"{team.mlflow_url}/health", "prefect": f"{team.prefect_api}/health"}
    try:
        for name, (cmd, cmd_env) in commands.items():
            with open(team.logs / f"{name}.log", "w") as log:
                team.servers[name] = subprocess.Popen(
                    [str(part) for part in cmd],
                    cwd=folder,
                    env=cmd_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + START_S
        for name, url in health.items():
            while not responds(url):
                if team.servers[name].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the {name} server did not answer {url}\n{tail(team.logs / f'{name}.log')}")
                time.sleep(0.5)
        team.s3().create_bucket(Bucket=BUCKET)
        yield team
    finally:
        for process in team.servers.values():
            stop(process)


# --- the quickstart against the servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(team, tiny_pipeline, tmp_path_factory) -> Path:
    """A team member's checkout: the session's built tiny repository with a DVC remote on the team's S3, DwGN
    trained, evaluated and exported again against the tracking server, registered and promoted there; the
    card and the comparison brought up to date, dvc.lock committed."""
    root = tmp_path_factory.mktemp("member") / "repo"
    shutil.copytree(tiny_pipeline.pristine, root, symlinks=True)
    env = team.member_env()
    # The remote and its endpoint are the team's shared settings (committed); the credentials stay in the env.
    sh(["dvc", "remote", "add", "--default", REMOTE, f"s3://{BUCKET}/dvc"], root, env)
    sh(["dvc", "remote", "modify", REMOTE, "endpointurl", team.s3_url], root, env)
    # A finished checkpoint would only finish its logging: train afresh, into a run on the server.
    shutil.rmtree(root / "models" / "dwgn")
    sh(["dvc", "repro", "--force", "--single-item", "train@dwgn", "evaluate@dwgn", "export@dwgn"], root, env)
    sh(["dvc", "repro"], root, env)
    sh(["git", "add", "dvc.lock", ".dvc/config"], root, env)
    sh(["git", "commit", "-qm", "DwGN trained against the team's servers"], root, env)
    sh(["weather-restore", "register", "--model", "dwgn"], root, env)
    sh(["weather-restore", "promote", "--model", "dwgn"], root, env)
    return root


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def test_the_quickstart_tracks_into_postgresql_and_s3_and_the_champion_loads_from_there(team, quickstart, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(team.mlflow_url)
    run_id = json.loads((quickstart / "models" / "dwgn" / "run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/"), run.info.artifact_uri
    assert {"test_psnr", "onnx_max_abs_diff"} <= set(run.data.metrics)
    champion = client.get_model_version_by_alias("DwGN", "champion")
    assert (champion.version, champion.run_id) == ("1", run_id)
    # The runs and the registry are rows of PostgreSQL; the files, objects in S3.
    assert team.postgres.query("mlflow", f"select status from runs where run_uuid = '{run_id}'") == "FINISHED"
    assert (
        team.postgres.query(
            "mlflow", "select version from registered_model_aliases where name = 'DwGN' and alias = 'champion'"
        )
        == "1"
    )
    onnx_objects = [key for key in team.keys("mlflow/") if key.endswith(".onnx")]
    assert onnx_objects, f"no ONNX file under s3://{BUCKET}/mlflow/"

    # `models:/DwGN@champion` from a folder with no repository: fetched from S3, it restores as the file does.
    frame = next(path for path in sorted((quickstart / "data").rglob("*.png")) if {"test", "input"} <= set(path.parts))
    env = team.member_env()
    sh(
        ["weather-restore", "restore", frame, "-o", tmp_path / "champion.png", "--model", "models:/DwGN@champion"],
        tmp_path,
        env,
    )
    local = quickstart / "models" / "dwgn" / "model.onnx"
    sh(["weather-restore", "restore", frame, "-o", tmp_path / "local.png", "--model", local], tmp_path, env)
    restored = read_png(tmp_path / "champion.png")
    assert restored.shape == read_png(frame).shape
    np.testing.assert_array_equal(restored, read_png(tmp_path / "local.png"))


def history(version) -> list[dict]:
    return json.loads(version.tags.get("history", "[]"))


def test_two_promotions_racing_from_two_processes_apply_one_after_the_other(team, quickstart):
    from mlflow import MlflowClient

    client = MlflowClient(team.mlflow_url)
    first = client.get_model_version_by_alias("DwGN", "champion")
    # Two more versions of the champion's model with its evidence: the race is about the aliases, not the gate.
    evidence = {key: value for key, value in first.tags.items() if not key.startswith(("promotion.", "history"))}
    model_id = first.source.removeprefix("models:/")  # the logged model the versions are made from
    contenders = [
        client.create_model_version("DwGN", first.source, first.run_id, tags=evidence, model_id=model_id).version
        for _ in range(2)
    ]
    env = team.member_env()
    racing = [
        subprocess.Popen(
            ["weather-restore", "promote", "--model", "dwgn", "--version", version, "--force", "--reason", "race"],
            cwd=quickstart,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for version in contenders
    ]
    outputs = [process.communicate(timeout=CLI_S)[0] for process in racing]
    assert [process.returncode for process in racing] == [0, 0], outputs

    aliases = client.get_registered_model("DwGN").aliases
    winner = str(aliases["champion"])
    (loser,) = [version for version in contenders if version != winner]
    # The one applied second saw the first one's champion: champion <- previous <- the first champion.
    assert str(aliases["previous"]) == loser
    assert history(client.get_model_version("DwGN", winner))[-1]["champion"] == loser
    assert history(client.get_model_version("DwGN", loser))[-1]["champion"] == first.version
    assert not client.search_registered_models("name = 'DwGN.aliases-lock'"), "the lock was left behind"


def test_a_lock_left_by_a_dead_process_is_reported_with_its_holder(team, quickstart):
    from mlflow import MlflowClient

    from weather_restore.errors import RegistryError
    from weather_restore.registry import aliases_locked

    client = MlflowClient(team.mlflow_url)
    client.create_registered_model("DwGN.aliases-lock", tags={"holder": "ci@elsewhere pid 4242", "since": "then"})
    try:
        with (
            pytest.raises(RegistryError, match=r"locked by ci@elsewhere pid 4242 since then"),
            aliases_locked(client, "DwGN", wait_s=0.5),
        ):
            pytest.fail("the lock was taken twice")
    finally:
        client.delete_registered_model("DwGN.aliases-lock")


# --- the DVC remote -----------------------------------------------------------------------------------------------


def test_a_fresh_clone_pulls_every_output_from_the_remote_and_has_nothing_to_rerun(team, quickstart, tmp_path):
    env = team.member_env()
    sh(["dvc", "push"], quickstart, env)
    assert team.keys("dvc/"), f"nothing under s3://{BUCKET}/dvc/ after dvc push"
    committed = sh(["git", "show", "HEAD:.dvc/config"], quickstart, env)
    assert f"s3://{BUCKET}/dvc" in committed and team.s3_url in committed
    assert not any(value in committed for value in CREDENTIALS.values() if value != "us-east-1")

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", quickstart, clone], tmp_path, env)
    assert not (clone / "models" / "dwgn").exists()
    sh(["dvc", "pull"], clone, env)
    for path in (
        "models/dwgn/best.pt",
        "models/dwgn/model.onnx",
        "models/dynstaticnet/model.onnx",
        "reports/dwgn/metrics.json",
        "reports/dwgn/model_card.md",
        "reports/compare.md",
    ):
        assert (clone / path).read_bytes() == (quickstart / path).read_bytes(), path
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], clone, env)
    repro = sh(["dvc", "repro"], clone, env)
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro, repro


# --- Prefect ------------------------------------------------------------------------------------------------------


def test_prefect_on_postgresql_runs_the_deployment_on_a_process_worker(team, quickstart, tmp_path):
    team.prefect("work-pool", "create", POOL, "--type", "process", cwd=tmp_path)
    deployed = team.prefect("deploy", "--name", "evaluate-champions", "--no-prompt", cwd=quickstart)
    assert "evaluate-champions/evaluate-champions" in deployed
    created = team.prefect(
        "deployment", "run", "evaluate-champions/evaluate-champions", "-p", 'models=["dwgn"]', cwd=tmp_path
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", created)
    assert match, f"no flow run id in the output of `prefect deployment run`:\n{created}"
    flow_run_id = match.group(1)

    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    with open(team.logs / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [BIN / "prefect", "worker", "start", "--pool", POOL, "--type", "process", "--run-once", "--limit", "1"],
            cwd=elsewhere,
            env={**team.prefect_env(), "WEATHER_RESTORE_REPO": str(quickstart)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        worker.wait(timeout=FLOW_RUN_S)
    except subprocess.TimeoutExpired:
        stop(worker)
        pytest.fail(f"the worker did not finish the flow run within {FLOW_RUN_S} s\n{team.log_tails()}")

    with urllib.request.urlopen(f"{team.prefect_api}/flow_runs/{flow_run_id}", timeout=30) as response:
        flow_run = json.load(response)
    assert flow_run["state"]["type"] == "COMPLETED", f"{flow_run['state']}\n{team.log_tails()}"
    assert worker.returncode == 0, tail(team.logs / "worker.log")
    # Prefect's state lives in PostgreSQL, not in a SQLite file of its home.
    assert team.postgres.query("prefect", f"select state_type from flow_run where id = '{flow_run_id}'") == "COMPLETED"
    assert not list(team.prefect_home.rglob("*.db"))
    # The flow evaluated the champion fetched from the tracking server and S3: the ONNX graph of the weights
    # that the quickstart's evaluation measured.
    champion = json.loads((quickstart / "reports" / "champion" / "dwgn" / "metrics.json").read_text())["overall"]
    trained = json.loads((quickstart / "reports" / "dwgn" / "metrics.json").read_text())["overall"]
    assert champion["psnr"] == pytest.approx(trained["psnr"], abs=0.01)


# --- what each server costs at idle -------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over the processes: RSS counts pages they share once per process, PSS divides them."""
    rss = pss = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        values = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.endswith("kB")}
        rss, pss = rss + values.get("Rss", 0), pss + values.get("Pss", 0)
    return rss, pss


def test_each_server_stays_small_at_idle(team):
    time.sleep(2)  # the last requests' work settled
    roots = {
        "postgresql (all processes)": team.postgres.postmaster_pid(),
        **{f"{name} server": process.pid for name, process in team.servers.items()},
    }
    rows = []
    for name, pid in roots.items():
        pids = process_tree(pid)
        rss, pss = memory_kib(pids)
        rows.append(f"{name:28} {len(pids):3d} processes  RSS {rss / 1024:7.1f} MiB  PSS {pss / 1024:7.1f} MiB")
        assert 0 < pss <= rss < IDLE_LIMIT_MIB * 1024, rows[-1]
    print("\nidle memory of the team's servers\n" + "\n".join(rows))
