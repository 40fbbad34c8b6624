"""Serving the champion with MLflow's own server: `mlflow models serve -m models:/DwGN@champion --env-manager local`
answers `POST /invocations` with the restored tensor, the same as `restore` computes for the same input.

A real SQLite store in a temporary project holds each model's ONNX version (the export stage's graph of a real,
untrained tiny model, registered and promoted by the project's own functions); a real server runs on a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.servers import free_port, serving

from weather_restore.export import log_export
from weather_restore.model_loading import load_restorer
from weather_restore.models.facts import MODELS
from weather_restore.registry import connect, promote, register
from weather_restore.tracking import RunInfo, write_run_info

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def store(tmp_path_factory, exported_models) -> str:
    """A project's SQLite store where each model's exported ONNX graph is registered and is the champion."""
    import mlflow

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("serving", artifact_location=(root / "mlartifacts").as_uri())
    try:
        for model, files in exported_models.items():
            run_id = client.create_run(experiment).info.run_id
            client.log_metric(run_id, "test_psnr", 25.0)  # `register` takes evaluated runs only
            info = RunInfo(model=model, run_id=run_id, experiment_id=experiment, tracking_uri=uri)
            run_json = root / model / "run.json"
            write_run_info(run_json, info)
            log_export(run_json, json.loads(files["report"].read_text()), files["onnx"], files["report"])
            version = register(model, info, connect(uri)).version
            promote(model, connect(uri), version)
    finally:
        mlflow.set_tracking_uri(None)
    return uri


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, folder: Path) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on a free port of 127.0.0.1 in this environment; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # its uvicorn
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",  # as the README serves it: the ONNX model needs no pickle
    }
    command = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", model_uri,
        "--env-manager", "local",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with serving(command, folder, env, folder / "serve.log", f"{url}/ping", what="mlflow models serve"):
        yield url


def invoke(url: str, tensor: np.ndarray) -> dict:
    """POST /invocations with the tensor as MLflow's `inputs` JSON, as the README shows."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"inputs": tensor.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.mark.parametrize("model", list(MODELS))
def test_the_served_champion_restores_a_clip_as_restore_does(model, store, tmp_path):
    facts = MODELS[model]
    uri = f"models:/{facts.registered_name}@champion"
    # One clip of 3 frames at a size the export never saw: clips (1, 3, 3, H, W), or its frames (3, 3, H, W).
    clip = np.random.default_rng(7).random(facts.input_shape(1, 3, 24, 40), dtype=np.float32)
    expected = load_restorer(uri, tracking_uri=store).forward(clip)

    with served(uri, store, tmp_path) as url:
        answer = invoke(url, clip)
        with pytest.raises(urllib.error.HTTPError) as refused:  # a tensor of the other model's rank
            invoke(url, clip[0] if facts.video else clip[None])

    restored = np.asarray(answer["predictions"]["restored"], dtype=np.float32)
    assert restored.shape == clip.shape
    np.testing.assert_allclose(restored, expected, atol=1e-4)
    assert np.abs(restored - clip).max() > 0.1  # the model's work, not the input sent back
    assert refused.value.code == 400
