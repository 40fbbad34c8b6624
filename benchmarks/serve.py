"""What a frame costs through `mlflow models serve` on this machine's CPU, for each model's registered ONNX version.

The models have their default configs and random weights (seed 0): speed does not depend on the weights. Each is
exported with the export stage's own exporter (`export_onnx`), logged with the export stage's signature, registered
as a version of DwGN or DynStaticNet with the alias `champion` in a temporary SQLite store, and served by
`mlflow models serve -m models:/NAME@champion --env-manager local` on 127.0.0.1. A request is one clip of 10
frames at the given size (DynStaticNet: [1, 10, 3, H, W]; DwGN: its frames [10, 3, H, W]) as MLflow's `inputs`
JSON. Per model: the median seconds per request (after one warm-up) over the frames it carries, and the same for
ONNX Runtime on the same input in this process, so that the difference is the HTTP and JSON overhead.

Run: python benchmarks/serve.py [--size 128] [--repeats 3] [--threads N]   (writes reports/bench/serve.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from weather_restore.config import ExportConfig
from weather_restore.export import export_onnx
from weather_restore.model_loading import load_restorer
from weather_restore.models import build_model
from weather_restore.models.facts import MODEL_NAMES, model_facts

OUTPUT = Path("reports/bench/serve.json")
FRAMES = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def register(model: str, folder: Path, uri: str, size: int) -> str:
    """Export the default-config model, log it as the export stage does and make it the champion; its URI."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    facts = model_facts(model)
    torch.manual_seed(0)
    network = build_model(model).eval()
    example = np.random.default_rng(0).random(facts.input_shape(1, 3, size, size), dtype=np.float32)
    path = folder / f"{model}.onnx"
    export_onnx(network, model, example, path, ExportConfig())
    spec = Schema([TensorSpec(np.dtype(np.float32), facts.dynamic_shape)])
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    with mlflow.start_run(experiment_id=client.create_experiment(model, (folder / model).as_uri())) as run:
        logged = mlflow.onnx.log_model(
            onnx.load(str(path)),
            name="onnx",
            signature=ModelSignature(inputs=spec, outputs=spec),
            pip_requirements=[],
            save_as_external_data=False,
        )
    client.create_registered_model(facts.registered_name)
    version = client.create_model_version(
        facts.registered_name, logged.model_uri, run_id=run.info.run_id, model_id=logged.model_id
    )
    client.set_registered_model_alias(facts.registered_name, "champion", str(version.version))
    return f"models:/{facts.registered_name}@champion"


def timed_requests(url: str, clip: np.ndarray, repeats: int) -> tuple[float, int]:
    """Median seconds of a POST /invocations of `clip` (after a warm-up), and the request's bytes."""
    body = json.dumps({"inputs": clip.tolist()}).encode()
    times = []
    for attempt in range(repeats + 1):
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=3600) as response:
            restored = np.asarray(json.load(response)["predictions"]["restored"], dtype=np.float32)
        if attempt:
            times.append(time.perf_counter() - started)
    assert restored.shape == clip.shape, restored.shape
    return statistics.median(times), len(body)


def serve_and_time(model_uri: str, uri: str, clip: np.ndarray, repeats: int, folder: Path) -> tuple[float, int]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = "3600"  # the default 60 s is less than one request here
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(folder / "serve.log", "a") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if process.poll() is not None:
                    raise SystemExit(f"mlflow models serve failed: see {folder / 'serve.log'}") from None
                time.sleep(0.5)
        return timed_requests(url, clip, repeats)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="frame height and width (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per model (median)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: every core)")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    args = parser.parse_args()
    os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="weather-restore-serve-") as name:
        folder = Path(name)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        for model in args.models:
            model_uri = register(model, folder, uri, args.size)
            clip = np.random.default_rng(1).random(
                model_facts(model).input_shape(1, FRAMES, args.size, args.size), dtype=np.float32
            )
            served, request_bytes = serve_and_time(model_uri, uri, clip, args.repeats, folder)
            local = load_restorer(model_uri, tracking_uri=uri, threads=args.threads)
            local.forward(clip)
            in_process = statistics.median(_seconds(local.forward, clip) for _ in range(args.repeats))
            rows.append(
                {
                    "model": model,
                    "input": list(clip.shape),
                    "request_mb": request_bytes / 1e6,
                    "served_s_per_frame": served / FRAMES,
                    "onnxruntime_s_per_frame": in_process / FRAMES,
                }
            )
            print(
                f"{model:13s} {'x'.join(map(str, clip.shape)):>18s}  request {request_bytes / 1e6:6.1f} MB  "
                f"served {served / FRAMES:7.3f} s/frame  ONNX Runtime alone {in_process / FRAMES:7.3f} s/frame",
                flush=True,
            )
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "threads": args.threads,
        "size": args.size,
        "frames_per_request": FRAMES,
        "repeats": args.repeats,
        "rows": rows,
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")


def _seconds(call, x: np.ndarray) -> float:
    started = time.perf_counter()
    call(x)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
