"""Shared fixtures: a tiny real MWVD tree (PNG frames, manifest) written by the split stage's own code, and a real
`mlflow server` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from tests.servers import free_port, serving

from weather_restore.config import ClipsConfig, ExportConfig, ExportExporters
from weather_restore.data.clips import write_clips
from weather_restore.data.frames import write_frame
from weather_restore.data.records import WEATHERS, VideoRecord

TINY_SIZE = 32
TINY_FRAMES = 12  # two 6-frame clips per video


def share_the_cores() -> None:
    """Under pytest-xdist, each test process, and the stages it starts, gets its share of the cores: OpenMP's
    threads spin while they wait, so two processes of two threads on two cores stall each other (measured on a clean
    clone's CI: the DwGN overfitting test took 116 s beside the other test process, 8 s alone). An OMP_NUM_THREADS
    set by the caller wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


share_the_cores()

# What the pipeline writes into a project; a test writes its own into temporary folders, never into this checkout.
PROJECT_OUTPUTS = ("mlruns", "mlartifacts", "mlflow.db", "data", "models/dwgn", "models/dynstaticnet")


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched() -> Iterator[None]:
    """Fail the session if a test left pipeline outputs in the checkout pytest runs from (an MLflow experiment made
    without an artifact location puts its artifacts in ./mlruns of the current folder, for instance)."""
    root = Path.cwd()
    before = {name for name in PROJECT_OUTPUTS if (root / name).exists()}
    yield
    left = sorted(name for name in PROJECT_OUTPUTS if (root / name).exists() and name not in before)
    assert not left, f"tests left {', '.join(left)} in {root}: a test must write into its own temporary folder"


@pytest.fixture(autouse=True)
def tracking_uri_restored() -> Iterator[None]:
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to os.environ: a test that tracks in-process must
    not send later tests' subprocesses (or a session fixture built after it, such as the tiny pipeline) to its store.
    What a module fixture set on purpose is what this test started with, and stays.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") == before:
        return
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before)  # MLflow's own global too
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def degrade(clean: np.ndarray, weather: str, t: int, rng: np.random.Generator) -> np.ndarray:
    """Simple, learnable stand-ins for the weathers: a haze veil, bright vertical streaks, white flakes."""
    if weather == "haze":
        return 0.55 * clean + 0.45 * 0.9
    degraded = 0.85 * clean + 0.1
    if weather == "rain":
        columns = (np.arange(clean.shape[1]) + 3 * t) % 7 == 0
        degraded[:, columns] = np.minimum(degraded[:, columns] + 0.5, 1.0)
    else:
        flakes = rng.random(clean.shape[:2]) < 0.05
        degraded[flakes] = 1.0
    return degraded


def make_tiny_video(root: Path, weather: str, scene: int) -> VideoRecord:
    """A smooth colour pattern drifting one pixel per frame, and its degraded twin, as PNG files."""
    rng = np.random.default_rng([scene, WEATHERS.index(weather)])
    y, x = np.mgrid[0:TINY_SIZE, 0:TINY_SIZE] / TINY_SIZE
    phase = rng.random(3) * 2 * np.pi
    video_id = f"tiny/{weather}/scene{scene}"
    inputs, gts = [], []
    for t in range(TINY_FRAMES):
        clean = np.stack(
            [0.5 + 0.4 * np.sin(2 * np.pi * (x + t / TINY_SIZE) * (c + 1) + phase[c] + 3 * y) for c in range(3)],
            axis=-1,
        ).astype(np.float32)
        for kind, frame, paths in (("gt", clean, gts), ("input", degrade(clean, weather, t, rng), inputs)):
            path = root / video_id / kind / f"{t:04d}.png"
            write_frame(path, np.clip(frame, 0, 1))
            paths.append(path)
    return VideoRecord(
        video_id=video_id,
        weather=weather,
        source="tiny",
        source_video=f"scene{scene}",
        input_frames=inputs,
        gt_frames=gts,
    )


@pytest.fixture(scope="session")
def tiny_mwvd(tmp_path_factory) -> Path:
    """An MWVD tree of 32x32 frames: per weather 4 train, 2 val and 2 test clips of 6 frames, split by scene."""
    root = tmp_path_factory.mktemp("tiny_mwvd")
    videos = [make_tiny_video(root / "videos", w, s) for s in range(4) for w in WEATHERS]
    cfg = ClipsConfig(clip_len=6, train_per_weather=4, val_per_weather=2, test_per_weather=2, test_fraction=0.25)
    write_clips(videos, cfg, root / "mwvd")
    return root / "mwvd"


TINY_MODELS = {
    "dynstaticnet": {"dim": 8, "blocks": [1, 1, 1], "refinement_blocks": 1, "heads": [1, 1, 1], "refinement_heads": 1},
    # DwGN needs dim >= 16 (its mixing layer has dim/16 channels); window 4 halves the padding of 16-pixel crops;
    # one block at the top of the encoder and one at the top of the decoder keep a training step near 0.05 s.
    "dwgn": {
        "dim": 16,
        "head_dim": 16,
        "window": 4,
        "encoder_blocks": [1, 0, 0],
        "bottleneck_blocks": 0,
        "decoder_blocks": [0, 0, 1],
    },
}
TINY_TRAINING = {
    "iterations": 6,
    "batch_size": 2,
    "crop": 16,
    "clip_frames": 3,
    "lr": 1e-3,
    "workers": 0,
    "checkpoint_every": 3,
    "validate_every": 3,
    "val_clips": 2,
    "val_frames": 2,
    "deterministic": True,
    "use": "best",  # the default, spelt out: dvc.yaml's evaluate and export stages depend on it in params.yaml
}


# Fewer blocks than TINY_MODELS: the ONNX exporters' tracing time grows with every block.
EXPORTABLE_MODELS = {
    "dynstaticnet": {"dim": 8, "blocks": [1, 0, 0], "refinement_blocks": 0, "heads": [1, 1, 1]},
    "dwgn": {**TINY_MODELS["dwgn"], "decoder_blocks": [0, 0, 0]},
}


@pytest.fixture(scope="session")
def exportable_models() -> dict:
    """Constructor arguments of models small enough to export to ONNX in seconds."""
    return EXPORTABLE_MODELS


# One exporter per model, so that the tests go through both (params.yaml traces both models: dynamo's export takes
# minutes on the full ones, seconds on these).
EXPORT_CONFIG = ExportConfig(exporter=ExportExporters(dynstaticnet="dynamo", dwgn="torchscript"), latency_repeats=1)


@pytest.fixture(scope="session")
def export_config() -> ExportConfig:
    """The export settings of `exported_models`."""
    return EXPORT_CONFIG


@pytest.fixture(scope="session")
def exported_models(tmp_path_factory, tiny_mwvd) -> dict[str, dict[str, Path]]:
    """Per model: an untrained (seed 0) exportable checkpoint and its ONNX graph made by the export stage with
    EXPORT_CONFIG (stamped with the metadata restore and the registry require, parity checked), with the stage's
    report. The one export of each model the tests share."""
    import torch

    from weather_restore.checkpoint import save_checkpoint
    from weather_restore.export import export_model
    from weather_restore.models import build_model

    root = tmp_path_factory.mktemp("exported")
    files = {}
    for name, config in EXPORTABLE_MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, **config).eval()
        checkpoint = root / name / "checkpoint.pt"  # the stage's own file names, which it logs to MLflow
        save_checkpoint(checkpoint, {"model": model.state_dict(), "model_name": name, "model_config": config})
        onnx_path, report = root / name / "model.onnx", root / name / "export.json"
        export_model(name, checkpoint, tiny_mwvd, onnx_path, report, EXPORT_CONFIG)
        files[name] = {"pt": checkpoint, "onnx": onnx_path, "report": report}
    return files


@pytest.fixture
def tiny_models() -> dict:
    """Constructor arguments of tiny versions of both models (seconds to train on a CPU)."""
    return TINY_MODELS


@pytest.fixture(scope="session")
def tiny_params_dict():
    """A factory of params mappings with tiny models and a few-iteration training of `model`, MLflow off."""

    def make(model: str, tracking: bool = False, **training) -> dict:
        return {
            "models": TINY_MODELS,
            "training": {model: {**TINY_TRAINING, **training}},
            "tracking": {"enabled": tracking},
        }

    return make


@pytest.fixture
def one_thread():
    """One torch thread: two spinning threads stall badly when a 2-core machine is busy with other work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a temporary copy of the repository with tiny parameters, for real dvc repro and Prefect runs -------------

REPO = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what a clean clone of this change holds."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


def run_command(cmd: list[str], cwd: Path, **env_vars: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "ITERATIVE_DO_NOT_TRACK": "1",
        "WEATHER_RESTORE_PROGRESS": "0",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        **env_vars,
    }
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def make_tiny_repo(root: Path, models: dict) -> Path:
    """A git repository at `root` holding this project with tiny data parameters and `models`, nothing run yet."""
    for name in project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    # Three photographs for three videos per weather: each source video is filmed in every weather, so each one
    # can go to train, val or test whole.
    synthetic = params["data"]["synthetic"]
    synthetic.update(videos_per_weather=3, frames_per_video=20, frame_size=[32, 32])
    synthetic["photographs"] = synthetic["photographs"][:3]
    params["data"]["clips"].update(train_per_weather=2, val_per_weather=1, test_per_weather=1)
    params["models"] = models
    # Over the file's own settings: dvc.yaml names some of them (training.<model>.use) as stage parameters.
    params["training"] = {name: {**params["training"].get(name, {}), **TINY_TRAINING} for name in models}
    params["evaluation"] = {"max_clips": 0, "lpips": False, "flops_size": [32, 32]}
    params["export"] = {**params.get("export", {}), "latency_repeats": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.lock").unlink(missing_ok=True)
    run_command(["git", "init", "-q"], root)
    run_command(["git", "add", "-A"], root)
    run_command(["git", "commit", "-qm", "test copy"], root)
    return root


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    """A git repository holding this project with tiny data parameters, nothing run yet."""
    return make_tiny_repo(tmp_path / "repo", TINY_MODELS)


# Every Python process started with this folder on PYTHONPATH appends its argv and each package module it
# imports to <log>/<pid>.log; a forked worker writes into its parent's log.
IMPORT_LOGGER = """
import os
import sys

if folder := os.environ.get("WEATHER_RESTORE_IMPORT_LOG"):
    log = os.path.join(folder, f"{os.getpid()}.log")

    def record(event, args):
        if event == "import" and args[0].startswith("weather_restore"):
            if not os.path.exists(log):
                with open(log, "a") as file:
                    file.write("\\0".join(sys.argv) + "\\n")
            with open(log, "a") as file:
                file.write(args[0] + "\\n")

    sys.addaudithook(record)
"""


@dataclass(frozen=True)
class TinyPipeline:
    """The tiny repository after one `dvc repro` of the whole pipeline (built once per test session)."""

    pristine: Path  # the built repository as `dvc repro` left it, never changed afterwards
    root: Path  # where `built_tiny_repo` puts a fresh copy of it for each test
    output: str  # what that `dvc repro` printed
    imports: Path  # per process of the build: its argv, then the package modules it imported (IMPORT_LOGGER)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    """`dvc repro` of every stage of a tiny repository with the exportable models (EXPORTABLE_MODELS), run once;
    its tracked outputs sit in the repository's DVC cache, its MLflow runs in the repository's own store."""
    base = tmp_path_factory.mktemp("tiny_pipeline")
    root = make_tiny_repo(base / "repo", EXPORTABLE_MODELS)
    (base / "site").mkdir()
    (base / "site" / "sitecustomize.py").write_text(IMPORT_LOGGER)
    (base / "imports").mkdir()
    pythonpath = os.pathsep.join(filter(None, [str(base / "site"), os.environ.get("PYTHONPATH")]))
    output = run_command(
        ["dvc", "repro"], root, PYTHONPATH=pythonpath, WEATHER_RESTORE_IMPORT_LOG=str(base / "imports")
    )
    run_command(["git", "add", "dvc.lock"], root)
    run_command(["git", "commit", "-qm", "dvc repro"], root)
    shutil.copytree(root, base / "pristine", symlinks=True)
    return TinyPipeline(pristine=base / "pristine", root=root, output=output, imports=base / "imports")


def close_mlflow_connections() -> None:
    """MLflow keeps one SQLAlchemy engine per store URI for the life of the process, with pooled connections to the
    SQLite file it first opened. A store replaced on disk at the same path (the copy below) must be reopened, or an
    in-process registration writes into the deleted file while the CLI's subprocesses read the new one."""
    if "mlflow" not in sys.modules:
        return
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for engine in [*TrackingStore._engine_map.values(), *RegistryStore._engine_map.values()]:
        engine.dispose()


@pytest.fixture
def built_tiny_repo(tiny_pipeline) -> Path:
    """A fresh copy of the built tiny repository (`tiny_pipeline`), every stage up to date, for a test to change.

    The copy always lands at the path the pipeline was built in: run.json and MLflow's store record absolute
    paths (the tracking URI, artifact locations), so a copy elsewhere would log into the pristine build."""
    close_mlflow_connections()
    shutil.rmtree(tiny_pipeline.root, ignore_errors=True)
    shutil.copytree(tiny_pipeline.pristine, tiny_pipeline.root, symlinks=True)
    return tiny_pipeline.root


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """Prefect's test harness (a real temporary server, its own database), started once for every test that runs
    flows in-process; its API URL. PREFECT_HOME points into the session's temporary folder while it runs."""
    home = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()
    finally:
        if home is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = home


@pytest.fixture
def run():
    """run(cmd, cwd) -> output: a command with this interpreter's tools on PATH; a non-zero exit fails the test."""
    return run_command


# --- a real MLflow tracking server ------------------------------------------------------------------------------


@contextlib.contextmanager
def running_mlflow_server(folder: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with its SQLite store and artifacts in `folder`; yields its URL."""
    port = free_port()
    folder.mkdir(parents=True)
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with serving(command, folder, env, folder / "server.log", f"{url}/health", what="mlflow server"):
        yield url


@pytest.fixture(scope="session")
def mlflow_server_folder(tmp_path_factory) -> Path:
    """Where `mlflow_server` keeps its SQLite store (server.db) and its artifacts (artifacts/)."""
    return tmp_path_factory.mktemp("mlflow") / "server"


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_folder) -> Iterator[str]:
    """One server for the whole session (starting one takes seconds); tests keep apart by their own names and runs."""
    with running_mlflow_server(mlflow_server_folder) as url:
        yield url
