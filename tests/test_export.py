"""The export stage on real tiny checkpoints and a real MWVD tree: ONNX graphs, parity, report, MLflow logging."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from weather_restore.checkpoint import load_model, save_checkpoint
from weather_restore.config import ExportConfig
from weather_restore.errors import ModelFileError
from weather_restore.export import ExportError, export_model, log_export, onnx_session, release_after_run
from weather_restore.models import build_model
from weather_restore.tracking import RunInfo, write_run_info

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ("dynstaticnet", "dwgn")
CONFIG = ExportConfig(latency_repeats=1)


def tiny_checkpoint(path, name: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, **config).eval()
    save_checkpoint(path, {"model": model.state_dict(), "model_name": name, "model_config": config})
    return model


@pytest.fixture(scope="module")
def exported(exported_models):
    """Per model: the eager model, the ONNX file and the report of the shared export_model run."""
    results = {}
    for name in MODELS:
        files = exported_models[name]
        model = load_model(files["pt"], "cpu", expected=name).eval()
        results[name] = (model, files["onnx"], files["report"], json.loads(files["report"].read_text()))
    return results


@pytest.mark.parametrize("name", MODELS)
def test_the_graph_passes_the_checker_and_names_its_model(exported, name, export_config):
    _, onnx_path, _, report = exported[name]
    graph = onnx.load(str(onnx_path))
    onnx.checker.check_model(graph, full_check=True)
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert metadata["model_name"] == name
    assert metadata["exporter"] == report["exporter"] == export_config.exporter_for(name)
    assert {report["exporter"] for *_, report in exported.values()} == {"dynamo", "torchscript"}  # both tested
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) == export_config.opset


@pytest.mark.parametrize("name", MODELS)
def test_parity_is_checked_on_a_real_test_clip_at_two_sizes(exported, name, tiny_mwvd, export_config):
    _, _, report_path, report = exported[name]
    assert json.loads(report_path.read_text()) == report
    first, second = report["parity"]
    manifest = json.loads((tiny_mwvd / "manifest.json").read_text())
    assert report["manifest_checksum"] == manifest["checksum"]
    assert first["shape"][-2:] == [32, 32] and second["shape"][-2:] != first["shape"][-2:]
    for row in report["parity"]:
        assert row["max_abs_diff"] <= export_config.atol
        assert row["psnr_diff_db"] <= export_config.psnr_tolerance_db
        assert row["psnr_pytorch"] == pytest.approx(row["psnr_onnxruntime"], abs=export_config.psnr_tolerance_db)
    assert report["latency"]["pytorch_s"] > 0 and report["latency"]["onnxruntime_s"] > 0


@pytest.mark.parametrize(
    ("name", "shapes"),
    [("dynstaticnet", [(1, 2, 3, 8, 70), (3, 4, 3, 41, 27)]), ("dwgn", [(1, 3, 64, 64), (3, 3, 45, 70)])],
)
def test_batch_frames_and_size_stay_dynamic(exported, name, shapes):
    model, onnx_path, _, _ = exported[name]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for shape in shapes:
        degraded = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(degraded).numpy()
        (restored,) = session.run(None, {"degraded": degraded.numpy()})
        assert restored.shape == shape
        np.testing.assert_allclose(restored, expected, rtol=0, atol=1e-4)


def test_a_parity_failure_fails_the_stage_says_by_how_much_and_removes_the_graph(
    tiny_mwvd, tmp_path, exportable_models
):
    tiny_checkpoint(tmp_path / "dwgn.pt", "dwgn", exportable_models["dwgn"])
    strict = ExportConfig(atol=1e-12, latency_repeats=1)  # float32 kernels differ by ~1e-7: nothing passes
    onnx_path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=r"max \|difference\| [0-9.e-]+ at input .* \(allowed 1e-12\)"):
        export_model("dwgn", tmp_path / "dwgn.pt", tiny_mwvd, onnx_path, tmp_path / "export.json", strict)
    assert not onnx_path.exists() and not (tmp_path / "export.json").exists()


def test_a_checkpoint_of_the_other_model_is_refused(tiny_mwvd, tmp_path, exportable_models):
    tiny_checkpoint(tmp_path / "dwgn.pt", "dwgn", exportable_models["dwgn"])
    with pytest.raises(ModelFileError, match="holds a DwGN model, not DynStaticNet"):
        export_model("dynstaticnet", tmp_path / "dwgn.pt", tiny_mwvd, tmp_path / "m.onnx", tmp_path / "e.json", CONFIG)


def test_the_onnx_model_is_logged_into_the_training_run(exported, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    model, onnx_path, report_path, report = exported["dwgn"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("export", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    write_run_info(tmp_path / "run.json", RunInfo(model="dwgn", run_id=run.info.run_id, tracking_uri=uri))

    model_uri = log_export(tmp_path / "run.json", report, onnx_path, report_path)

    logged = client.get_run(run.info.run_id)
    assert logged.data.metrics["onnx_max_abs_diff"] == pytest.approx(report["max_abs_diff"])
    assert logged.data.tags["onnx_model_uri"] == model_uri
    assert "export/export.json" in {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    frames = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(frames).numpy()
    (restored,) = pyfunc.predict(frames.numpy()).values()  # the ONNX flavour answers {output name: array}
    np.testing.assert_allclose(restored, expected, rtol=0, atol=1e-4)


def test_restore_runs_the_graph_in_the_session_export_checked_it_in(exported):
    """One home for the session options: all graph optimisations at load time, tensors from ORT's arena without a
    second, preplanned copy, and restore's runs hand the arena back when they end."""
    from weather_restore.model_loading import load_restorer

    _, onnx_path, _, _ = exported["dwgn"]
    options = onnx_session(onnx_path, threads=1).get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert (options.enable_cpu_mem_arena, options.enable_mem_pattern, options.intra_op_num_threads) == (True, False, 1)
    assert release_after_run().get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    frames = np.random.default_rng(3).random((1, 3, 24, 40), dtype=np.float32)
    (expected,) = onnx_session(onnx_path, threads=1).run(None, {"degraded": frames})
    restorer = load_restorer(str(onnx_path), threads=1)
    for _ in range(2):  # the second run after the arena was shrunk
        np.testing.assert_array_equal(restorer.forward(frames), expected)
