"""No code runs through the registry or a model file. A registered version whose model unpickles (a payload that
writes a marker file, pickled by MLflow's PyTorch flavour and cloudpickled as a pyfunc) is refused, unloaded, by
every path that loads or promotes a version; the export stage's ONNX model loads. ONNX files without the export
stage's metadata, files that are not checkpoints, bad devices and a missing store each give one line and exit 2.

A real SQLite store in a temporary project (MLFLOW_TRACKING_URI), real MLflow models, no mocks.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from weather_restore.cli import main
from weather_restore.errors import RegistryError
from weather_restore.export import log_export
from weather_restore.model_loading import load_registered, load_restorer
from weather_restore.tracking import RunInfo, write_run_info

pytestmark = pytest.mark.usefixtures("one_thread")

PAYLOAD = "the payload ran"


def plant(marker: Path) -> tuple:
    """What unpickling runs: `exec` of a line writing `marker`."""
    return exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text({PAYLOAD!r})",)


class Payload(nn.Module):
    """A module whose unpickling writes `marker`: what a stranger's pickled model could do instead."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __reduce__(self):
        return plant(self.marker)


class PayloadPyfunc(mlflow.pyfunc.PythonModel):
    """The same payload as a pyfunc `python_model`, which MLflow cloudpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def predict(self, context, model_input, params=None):
        return model_input

    def __reduce__(self):
        return plant(self.marker)


@dataclass(frozen=True)
class Project:
    root: Path
    uri: str
    marker: Path
    client: mlflow.MlflowClient
    run_id: str  # of the pickled models


@pytest.fixture(scope="module")
def project(tmp_path_factory, exported_models):
    """A project with its SQLite store holding DwGN version 1 (a pickle of the PyTorch flavour) and 2 (a
    cloudpickled pyfunc), and DynStaticNet version 1 (the ONNX model the export stage logged; champion) and 2 (the
    pickle again). MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false, as a careful user would set it."""
    root = tmp_path_factory.mktemp("safety") / "project"
    root.mkdir()
    marker = root.parent / "marker"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (
            ("MLFLOW_TRACKING_URI", uri),
            ("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false"),
            ("MLFLOW_DISABLE_TELEMETRY", "true"),
            ("DO_NOT_TRACK", "true"),
            ("WEATHER_RESTORE_PROGRESS", "0"),
        ):
            patch.setenv(name, value)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        experiment = client.create_experiment("safety", artifact_location=(root / "mlartifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            pickled = mlflow.pytorch.log_model(
                Payload(marker), name="model", serialization_format="pickle", pip_requirements=[]
            )
            cloudpickled = mlflow.pyfunc.log_model(
                name="pyfunc", python_model=PayloadPyfunc(marker), pip_requirements=[]
            )
        # The ONNX model as the export stage logs it into a training's run.
        exported = exported_models["dynstaticnet"]
        run_json = root / "models" / "dynstaticnet" / "run.json"
        onnx_run = client.create_run(experiment).info.run_id
        info = RunInfo(model="dynstaticnet", run_id=onnx_run, experiment_id=experiment, tracking_uri=uri)
        write_run_info(run_json, info)
        report = json.loads(exported["report"].read_text())
        onnx_uri = log_export(run_json, report, exported["onnx"], exported["report"])
        for name, source, run_id in (
            ("DwGN", pickled.model_uri, run.info.run_id),
            ("DwGN", cloudpickled.model_uri, run.info.run_id),
            ("DynStaticNet", onnx_uri, onnx_run),
            ("DynStaticNet", pickled.model_uri, run.info.run_id),
        ):
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name)
            client.create_model_version(name, source, run_id=run_id, model_id=source.removeprefix("models:/"))
        client.set_registered_model_alias("DynStaticNet", "champion", "1")
        (root / "params.yaml").write_text(yaml.safe_dump({"registry": {"min_delta": 0.05, "weather_tolerance": 0.2}}))
        yield Project(root, uri, marker, client, run.info.run_id)
        mlflow.set_tracking_uri(None)


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.chdir(project.root)
    return project


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "rainy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def one_line(capsys, command: str) -> str:
    """The command's stderr: exactly one line, the CLI's error line (no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"weather-restore {command}: "), err
    return lines[0]


def untouched(project: Project) -> None:
    """The payload never ran and nobody switched pickle loading on."""
    assert not project.marker.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"


REFUSED = "not an ONNX model ({}); loading it could run code, so it is refused. Re-register it from a run exported by "


def test_the_registered_pickles_hold_a_payload_that_runs_when_unpickled(project, tmp_path):
    """What makes the refusals below mean something: these versions would run the payload if unpickled."""
    for name, version in (("DwGN", "1"), ("DwGN", "2")):
        folder = mlflow.artifacts.download_artifacts(
            project.client.get_model_version_download_uri(name, version), dst_path=str(tmp_path / version)
        )
        pickles = [p for p in Path(folder).rglob("*") if p.suffix in (".pth", ".pkl")]
        assert pickles and any(PAYLOAD.encode() in p.read_bytes() for p in pickles)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.read_text() == PAYLOAD
    untouched(project)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("models:/DwGN/1", "its flavours are python_function, pytorch, not onnx"),
        ("models:/DwGN/2", "its python_function flavour loads through 'mlflow.pyfunc.model', not mlflow.onnx"),
    ],
)
def test_restore_refuses_a_pickled_version_unloaded(uri, problem, in_project, image, tmp_path, capsys):
    assert main(["restore", str(image), "-o", str(tmp_path / "out.png"), "--model", uri]) == 2
    line = one_line(capsys, "restore")
    assert f"{uri}: {REFUSED.format(problem)}`weather-restore export --model dwgn`" in line
    assert not (tmp_path / "out.png").exists()
    untouched(in_project)


def test_restore_by_alias_names_the_version_it_refuses(in_project, image, tmp_path, capsys):
    in_project.client.set_registered_model_alias("DwGN", "champion", "1")  # set outside the gate
    try:
        assert main(["restore", str(image), "-o", str(tmp_path / "out.png"), "--model", "models:/DwGN@champion"]) == 2
    finally:
        in_project.client.delete_registered_model_alias("DwGN", "champion")
    assert "models:/DwGN@champion (version 1): not an ONNX model" in one_line(capsys, "restore")
    untouched(in_project)


def test_evaluate_refuses_a_pickled_version_and_a_pickled_run_model(in_project, tiny_mwvd, tmp_path, capsys):
    runs_uri = f"runs:/{in_project.run_id}/model"
    for uri in ("models:/DwGN/1", "models:/DwGN/2", runs_uri):
        out = tmp_path / uri.replace("/", "_")
        args = ["evaluate", "--model", "dwgn", "--model-uri", uri, "--data", str(tiny_mwvd), "--out", str(out)]
        assert main(args) == 2
        assert f"{uri}: not an ONNX model (" in one_line(capsys, "evaluate")
        assert not out.exists()
    untouched(in_project)


def test_the_project_loaders_refuse_a_pickled_version(project):
    for load in (
        lambda: load_registered("models:/DwGN/1", project.uri),
        lambda: load_registered("models:/DynStaticNet/2", project.uri, "dynstaticnet"),
        lambda: load_restorer("models:/DwGN/2", tracking_uri=project.uri),
    ):
        with pytest.raises(RegistryError, match="not an ONNX model"):
            load()
    untouched(project)


@pytest.mark.parametrize(("model", "name", "version"), [("dwgn", "DwGN", "1"), ("dynstaticnet", "DynStaticNet", "2")])
def test_promote_refuses_a_pickled_version_and_changes_nothing(model, name, version, in_project, capsys):
    client = in_project.client
    aliases, tags = client.get_registered_model(name).aliases, client.get_model_version(name, version).tags
    assert main(["promote", "--model", model, "--version", version]) == 2
    said = one_line(capsys, "promote")
    assert said.startswith(f"weather-restore promote: {name} version {version}: not an ONNX model")
    assert client.get_registered_model(name).aliases == aliases
    assert client.get_model_version(name, version).tags == tags
    untouched(in_project)


def test_rollback_refuses_to_make_a_pickled_previous_version_the_champion(in_project, capsys):
    client = in_project.client
    client.set_registered_model_alias("DynStaticNet", "previous", "2")  # set outside the tool
    try:
        assert main(["rollback", "--model", "dynstaticnet"]) == 2
        assert "DynStaticNet version 2: not an ONNX model" in one_line(capsys, "rollback")
        assert client.get_registered_model("DynStaticNet").aliases == {"champion": 1, "previous": 2}
    finally:
        client.delete_registered_model_alias("DynStaticNet", "previous")
    untouched(in_project)


def test_the_exported_onnx_version_loads_through_the_project_and_mlflow_pyfunc(
    in_project, exported_models, tmp_path, capsys
):
    clip = np.random.default_rng(1).random((1, 4, 3, 24, 40), dtype=np.float32)  # not the export's sizes
    expected = load_restorer(str(exported_models["dynstaticnet"]["onnx"])).forward(clip)
    loaded = load_restorer("models:/DynStaticNet@champion", tracking_uri=in_project.uri)
    assert (loaded.name, loaded.backend, loaded.source) == (
        "dynstaticnet",
        "onnxruntime",
        "models:/DynStaticNet@champion (version 1)",
    )
    np.testing.assert_allclose(loaded.forward(clip), expected, atol=1e-5)
    pyfunc = mlflow.pyfunc.load_model("models:/DynStaticNet@champion")
    np.testing.assert_allclose(pyfunc.predict(clip)["restored"], expected, atol=1e-5)  # outputs by name

    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(3):
        Image.fromarray(np.full((16, 24, 3), 40 * index, dtype=np.uint8)).save(frames / f"{index:04d}.png")
    uri = "models:/DynStaticNet@champion"
    assert main(["restore", str(frames), "-o", str(tmp_path / "restored"), "--model", uri]) == 0
    assert "with dynstaticnet (onnxruntime)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "restored").glob("*.png")) == ["0000.png", "0001.png", "0002.png"]
    untouched(in_project)


def test_evaluating_another_models_version_is_one_line(in_project, tiny_mwvd, tmp_path, capsys):
    uri = "models:/DynStaticNet@champion"
    args = ["evaluate", "--model", "dwgn", "--model-uri", uri, "--data", str(tiny_mwvd), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert one_line(capsys, "evaluate") == (  # said from the URI, before the store is opened
        f"weather-restore evaluate: {uri}: names a DynStaticNet version, not DwGN; use --model dynstaticnet, or a "
        "URI of DwGN (models:/DwGN@champion)"
    )
    assert not (tmp_path / "r").exists()


# --- model files and devices ------------------------------------------------------------------------------------


def test_an_onnx_file_without_the_export_stages_metadata_is_refused(image, tmp_path, capsys):
    """A 4-D Identity graph would pass for DwGN by its input's rank alone."""
    frames = helper.make_tensor_value_info("degraded", TensorProto.FLOAT, ["b", 3, "h", "w"])
    restored = helper.make_tensor_value_info("restored", TensorProto.FLOAT, ["b", 3, "h", "w"])
    identity = helper.make_node("Identity", ["degraded"], ["restored"])
    graph = helper.make_graph([identity], "identity", [frames], [restored])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))

    assert main(["restore", str(image), "-o", str(tmp_path / "out.png"), "--model", str(path), "--device", "cpu"]) == 2
    assert one_line(capsys, "restore") == (
        f"weather-restore restore: {path}: not an ONNX model of weather-restore (no model_name and exporter in its "
        "metadata, which `weather-restore export` writes); export the checkpoint with `weather-restore export "
        "--model NAME`"
    )
    assert not (tmp_path / "out.png").exists()


def test_a_file_that_is_not_a_checkpoint_says_so_without_torchs_advice(image, tmp_path, capsys):
    random_file, pickled = tmp_path / "random.pt", tmp_path / "payload.pt"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    marker = tmp_path / "marker"
    torch.save({"format": 1, "model": Payload(marker)}, pickled)
    for path in (random_file, pickled):
        assert main(["restore", str(image), "-o", str(tmp_path / "out.png"), "--model", str(path)]) == 2
        line = one_line(capsys, "restore")
        assert line.startswith(f"weather-restore restore: {path}: not a weather-restore checkpoint (")
        assert "weights_only" not in line and "Re-running" not in line
    assert not marker.exists() and not (tmp_path / "out.png").exists()


def unusable_cuda() -> tuple[str, str]:
    """A CUDA device this machine lacks, and what restore says about it."""
    if not torch.cuda.is_available():
        return "cuda", "--device cuda: CUDA is not available on this machine; use --device cpu"
    count = torch.cuda.device_count()
    said = f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return f"cuda:{count}", f"--device cuda:{count}: {said}"


@pytest.mark.parametrize(
    ("device", "message"),
    [("bogus", "--device bogus: not a device; use cpu, cuda or cuda:N"), unusable_cuda()],
)
def test_a_device_problem_is_said_before_the_checkpoint_is_read(device, message, image, tmp_path, capsys):
    random_file = tmp_path / "random.pt"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    args = ["restore", str(image), "-o", str(tmp_path / "out.png"), "--model", str(random_file), "--device", device]
    assert main(args) == 2
    assert one_line(capsys, "restore") == f"weather-restore restore: {message}"


def test_a_registry_uri_in_a_folder_without_a_store_says_which_uri_and_creates_nothing(
    image, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    for args in (
        ["restore", str(image), "-o", str(tmp_path / "out.png"), "--model", "models:/DwGN@champion"],
        ["promote", "--model", "dwgn"],
    ):
        assert main(args) == 2
        line = one_line(capsys, args[0])
        assert f"no MLflow store at {store} (the tracking URI used)" in line and "set MLFLOW_TRACKING_URI" in line
    assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"]
    assert not (tmp_path / "out.png").exists()
