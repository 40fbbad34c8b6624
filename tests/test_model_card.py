"""Model cards: a registered version's card in a real SQLite registry, the pipeline's card from the stages' files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image

from weather_restore.data.clips import read_manifest
from weather_restore.evaluate import evaluate_model, logged_metrics
from weather_restore.model_card import CARD_FOLDER, CARD_NAME, from_files, write_pipeline_card
from weather_restore.registry import connect, promote, register
from weather_restore.tracking import RunInfo

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = hashlib.sha256(b"best.pt").hexdigest()
TRAINING = {"iterations": 6, "batch_size": 2, "crop": 16, "lr": 0.001, "loss": "psnr", "seed": 0}


@pytest.fixture(scope="module")
def evaluated(tiny_mwvd, tmp_path_factory) -> tuple[dict, Path]:
    """metrics.json of a restorer that returns its input, measured by the evaluate stage on the tiny test clips."""
    reports = tmp_path_factory.mktemp("card") / "reports" / "dwgn"
    return evaluate_model(torch.nn.Identity(), "dwgn", tiny_mwvd, reports, use_lpips=False), reports


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A real SQLite MLflow store, and MLflow's global URI reset afterwards."""
    import mlflow

    path = tmp_path_factory.mktemp("registry") / "mlflow.db"
    uri = f"sqlite:///{path}"
    mlflow.MlflowClient(uri).search_experiments()  # creates the store's tables
    yield uri
    mlflow.set_tracking_uri(None)


def trained_run(uri: str, evaluated: tuple[dict, Path], exported_models, tiny_mwvd) -> RunInfo:
    """What train, evaluate and export leave in a DwGN run: recipe params, test metrics, samples, ONNX model."""
    import mlflow

    metrics, reports = evaluated
    mlflow.set_tracking_uri(uri)
    name = f"card-{len(mlflow.search_experiments())}"
    # Artifacts beside the store: with no location, MLflow puts them in ./mlruns of the folder pytest runs in.
    artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name
    experiment = mlflow.MlflowClient(uri).create_experiment(name, artifact_location=artifacts.as_uri())
    checksum, _ = read_manifest(tiny_mwvd)
    with mlflow.start_run(experiment_id=experiment) as run:
        graph = onnx.load(str(exported_models["dwgn"]["onnx"]))
        logged = mlflow.onnx.log_model(graph, name="onnx", pip_requirements=[], save_as_external_data=False)
        mlflow.set_tag("onnx_model_uri", logged.model_uri)
        mlflow.log_params({**TRAINING, "config_hash": "c" * 64, "data.manifest_checksum": checksum})
        mlflow.log_params({"architecture": json.dumps({"dim": 16, "window": 4})})
        export = json.loads(exported_models["dwgn"]["report"].read_text())
        onnx_figures = {
            "onnx_max_abs_diff": export["max_abs_diff"],
            "onnx_psnr_diff_db": export["psnr_diff_db"],
            "onnx_latency_s": export["latency"]["onnxruntime_s"],
            "pytorch_latency_s": export["latency"]["pytorch_s"],
        }
        mlflow.log_metrics({**logged_metrics(metrics), **onnx_figures, "params_count": 1234.0})
        mlflow.set_tags(
            {
                "test.manifest_checksum": checksum,
                "data.manifest_checksum": checksum,
                "test.weights_sha256": WEIGHTS,
                "export.weights_sha256": WEIGHTS,
            }
        )
        mlflow.log_artifact(str(reports / "samples.png"), artifact_path="evaluation")
    return RunInfo(model="dwgn", run_id=run.info.run_id, experiment_id=experiment, tracking_uri=uri)


def test_register_attaches_a_card_that_names_the_manifest_and_the_metrics_and_shows_the_samples(
    registry, evaluated, exported_models, tiny_mwvd, tmp_path
):
    client = connect(registry)
    info = trained_run(registry, evaluated, exported_models, tiny_mwvd)
    registration = register("dwgn", info, client, name="carded", data_root=tiny_mwvd)
    card_path = Path(client.download_artifacts(info.run_id, CARD_FOLDER, str(tmp_path)))
    card = (card_path / CARD_NAME).read_text()

    metrics, _ = evaluated
    checksum, clips = read_manifest(tiny_mwvd)
    assert card.startswith(f"# Model card: carded version {registration.version}")
    assert f"Data manifest: `{checksum}`" in card
    assert f"test {sum(c.split == 'test' for c in clips)} (haze 2, rain 2, snow 2)" in card
    assert "synthetic" not in card.split("## Training data")[1].split("##")[0]  # the tiny tree's source is `tiny`
    assert "iterations 6, batch_size 2, crop 16, lr 0.001, loss psnr, seed 0" in card
    rain = metrics["per_weather"]["rain"]
    row = next(line for line in card.splitlines() if line.startswith("| rain |"))
    assert f"{rain['psnr']:.2f} (input {rain['input_psnr']:.2f})" in row
    warp = [1e3 * rain[key] for key in ("warp_error", "input_warp_error", "clean_warp_error")]
    assert f"{warp[0]:.3f} (input {warp[1]:.3f}, clean {warp[2]:.3f})" in row
    assert "max |difference|" in card and f"--model models:/carded/{registration.version}" in card
    # The picture the card links is beside it in the run, and opens.
    (link,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    with Image.open(card_path / link) as picture:
        assert picture.size[0] > 0
    # The version's description carries the card.
    description = client.get_model_version("carded", registration.version).description
    assert card in description

    # A promotion decision is appended to the card of the version it concerns, in the run and the description.
    assert promote("dwgn", client, registration.version, name="carded").decision == "first"
    card = (Path(client.download_artifacts(info.run_id, f"{CARD_FOLDER}/{CARD_NAME}", str(tmp_path / "b")))).read_text()
    assert "## Promotion decision" in card and ": first" in card and "no champion yet" in card
    assert "## Promotion decision" in client.get_model_version("carded", registration.version).description


def test_the_pipeline_card_reads_the_stages_files(evaluated, exported_models, tiny_mwvd):
    metrics, reports = evaluated
    (reports / "export.json").write_text(exported_models["dwgn"]["report"].read_text())
    facts = from_files("dwgn", reports, tiny_mwvd, reports / "absent-run.json", TRAINING, {"dim": 16})
    card = write_pipeline_card(facts, reports / "model_card.md").read_text()
    checksum, _ = read_manifest(tiny_mwvd)
    assert card.startswith("# Model card: DwGN (the pipeline's current model)")
    assert f"`{checksum}`" in card and "Clips of 6 frames of 32x32" in card
    assert f"| overall | {metrics['overall']['psnr']:.2f} (input {metrics['overall']['input_psnr']:.2f})" in card
    assert "![input, output and ground truth per weather](samples.png)" in card
    assert "models:/DwGN@champion" in card


def test_the_card_of_a_model_not_evaluated_yet_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from weather_restore.cli import main

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["--params", str(params), "card", "--model", "dwgn"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "reports/dwgn/metrics.json: no such file: evaluate the model first (weather-restore evaluate --model dwgn)"
    )
    assert len(error.splitlines()) == 1 and not (tmp_path / "reports").exists()
