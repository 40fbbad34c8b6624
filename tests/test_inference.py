"""Windowed and tiled forward passes (windows.py), and loading every model kind: PyTorch checkpoint, ONNX, registry
(model_loading.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from weather_restore.checkpoint import save_checkpoint
from weather_restore.errors import ConfigError, ModelFileError
from weather_restore.model_loading import LoadedModel, load_restorer
from weather_restore.models import build_model
from weather_restore.windows import (
    WINDOW,
    WINDOW_STRIDE,
    mirror_index,
    restore_frames,
    temporal_weights,
    tile_starts,
    tiled_forward,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def frames(count: int, height: int = 24, width: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def model_files(exported_models) -> dict[str, dict]:
    """Per model: a .pt checkpoint and the same weights exported to .onnx by the export stage (once a session)."""
    return exported_models


def identity(name: str, calls: list | None = None) -> LoadedModel:
    def forward(x: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(x.copy())
        return x

    return LoadedModel(name, "test", forward, "identity")


# --- Windows over time -----------------------------------------------------------------------------------------


def window_starts(count: int) -> range:
    """Where restore_frames starts its windows: the first before frame 0, so that frame 0 sits where later frames
    sit (covered by WINDOW / WINDOW_STRIDE windows), the frames before it mirrored in."""
    return range(WINDOW_STRIDE - WINDOW, count, WINDOW_STRIDE)


@pytest.mark.parametrize("count", [1, 3, 9, 10, 11, 23])
def test_window_weights_of_every_frame_sum_to_one(count):
    weights = temporal_weights()
    total = np.zeros(count)
    for start in window_starts(count):
        for position, index in enumerate(range(start, start + WINDOW)):
            if 0 <= index < count:
                total[index] += weights[position]
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_mirror_index_reflects_at_both_ends_and_bounces_in_short_clips():
    assert [mirror_index(i, 5) for i in range(-4, 9)] == [4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0]
    assert [mirror_index(i, 2) for i in range(-2, 4)] == [0, 1, 0, 1, 0, 1]
    assert [mirror_index(i, 1) for i in range(-3, 3)] == [0] * 6
    assert [mirror_index(i, None) for i in (-3, 0, 7)] == [3, 0, 7]


def test_every_frame_of_a_23_frame_clip_is_restored_exactly_once_in_order():
    clip = frames(23)
    calls: list[np.ndarray] = []
    restored = list(restore_frames(clip, identity("dynstaticnet", calls), tile=0))
    assert len(restored) == 23
    for original, result in zip(clip, restored, strict=True):
        np.testing.assert_array_equal(result, original)  # blending weights sum to 1 for every frame
    assert [c.shape[:2] for c in calls] == [(1, WINDOW)] * len(window_starts(23))


def test_windows_stream_frames_without_reading_the_whole_clip():
    read = []

    def source():
        for index, frame in enumerate(frames(40, 8, 8)):
            read.append(index)
            yield frame

    stream = restore_frames(source(), identity("dynstaticnet"), tile=0)
    next(stream)
    assert len(read) <= WINDOW  # frame 0 is out once the second window (frames 0..9) is restored
    assert len(list(stream)) == 39


@pytest.mark.parametrize("count", [1, 2, 7])
def test_clips_shorter_than_a_window_are_mirrored_into_full_windows(count):
    clip = frames(count)
    calls: list[np.ndarray] = []
    restored = list(restore_frames(clip, identity("dynstaticnet", calls), tile=0))
    assert len(restored) == count
    for original, result in zip(clip, restored, strict=True):
        np.testing.assert_array_equal(result, original)
    assert all(c.shape[1] == WINDOW for c in calls)


def test_window_stride_that_is_not_half_a_window_still_restores_each_frame_once():
    clip = frames(17)
    restored = list(restore_frames(clip, identity("dynstaticnet"), tile=0, stride=3))
    for original, result in zip(clip, restored, strict=True):
        np.testing.assert_array_equal(result, original)


def test_image_model_sees_one_frame_at_a_time():
    calls: list[np.ndarray] = []
    restored = list(restore_frames(frames(4), identity("dwgn", calls), tile=0))
    assert len(restored) == 4 and [c.shape for c in calls] == [(1, 3, 24, 40)] * 4


# --- Tiles -----------------------------------------------------------------------------------------------------


def test_tiles_cover_the_frame_and_the_last_one_is_flush_with_the_edge():
    assert tile_starts(1080, 256, 32) == [0, 224, 448, 672, 824]
    assert tile_starts(200, 256, 32) == [0]
    assert tile_starts(256, 256, 32) == [0]
    assert tile_starts(300, 0, 32) == [0]


def test_tiled_equals_untiled_for_a_model_whose_reach_is_within_the_overlap():
    torch.manual_seed(0)
    local = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return local(torch.from_numpy(x)).numpy()

    x = np.random.default_rng(0).random((2, 3, 100, 150), dtype=np.float32)
    tiled = tiled_forward(forward, x, tile=48, overlap=16)
    # Tiles are cut from the frame, so only the frame's own border is zero-padded, as in the untiled pass.
    np.testing.assert_allclose(tiled, forward(x), atol=1e-5)


@pytest.mark.parametrize("name", ["dynstaticnet", "dwgn"])
def test_tiled_model_equals_untiled_within_tolerance(name, tiny_models):
    torch.manual_seed(0)
    model = build_model(name, **tiny_models[name]).eval()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    rng = np.random.default_rng(0)
    # A smooth scene: tiles of white noise would have nothing in common for the models to agree on.
    y, x = np.mgrid[0:96, 0:128] / 96
    scene = np.stack([0.5 + 0.3 * np.sin(5 * x + 3 * y + c) for c in range(3)]).astype(np.float32)
    shape = (1, 3, 3, 96, 128) if name == "dynstaticnet" else (2, 3, 96, 128)
    degraded = np.clip(scene + 0.05 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    untiled = forward(degraded)
    tiled = tiled_forward(forward, degraded, tile=64, overlap=16)
    # Random weights make corrections far larger than a trained model's (about 0.37 mean for DynStaticNet); the
    # tiles still agree with the whole frame to over 40 dB (measured 46.6 and 57.1 dB at this overlap).
    psnr = -10 * np.log10(np.mean((tiled - untiled) ** 2))
    assert psnr > 40 and np.abs(tiled - untiled).max() < 0.05, psnr


def test_tile_overlap_beyond_half_a_tile_is_refused():
    with pytest.raises(ConfigError, match="overlap"):
        tiled_forward(lambda x: x, np.zeros((1, 3, 80, 80), np.float32), tile=64, overlap=40)


# --- Loading every kind of model --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dynstaticnet", "dwgn"])
def test_onnx_and_pytorch_backends_agree(name, model_files):
    clip = frames(12, 32, 40)
    results = {}
    for kind in ("pt", "onnx"):
        model = load_restorer(name, model_files[name][kind])
        assert model.name == name
        results[model.backend] = np.stack(list(restore_frames(clip, model, tile=32, overlap=8)))
    difference = np.abs(results["pytorch"].astype(int) - results["onnxruntime"].astype(int))
    assert difference.max() <= 1  # float32 rounding may tip a value over a uint8 step


@pytest.mark.parametrize("name", ["dynstaticnet", "dwgn"])
def test_the_stage_restores_a_video_with_an_onnx_model(name, model_files, tmp_path):
    import av

    from weather_restore.restore import restore

    with av.open(str(tmp_path / "in.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = 32, 40, "yuv420p"
        for frame in frames(6, 32, 40):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    summary = restore(tmp_path / "in.mp4", tmp_path / "out.mp4", load_restorer(str(model_files[name]["onnx"])))
    assert (summary.frames, summary.backend) == (6, "onnxruntime")
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert len(list(container.decode(video=0))) == 6


def test_model_files_load_by_path_and_tell_their_kind(model_files):
    assert load_restorer(str(model_files["dynstaticnet"]["onnx"])).video
    assert not load_restorer(str(model_files["dwgn"]["onnx"])).video
    loaded = load_restorer(str(model_files["dwgn"]["pt"]))
    assert (loaded.name, loaded.backend) == ("dwgn", "pytorch")


@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_a_model_file_that_does_not_match_the_model_name_is_refused(kind, model_files):
    with pytest.raises(ModelFileError, match="holds a DynStaticNet model, not DwGN"):
        load_restorer("dwgn", model_files["dynstaticnet"][kind])


def test_unusable_model_arguments_say_what_is_wrong(tmp_path, model_files):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="garbage.pt: not a weather-restore checkpoint"):
        load_restorer(str(garbage))
    garbage_onnx = tmp_path / "garbage.onnx"
    garbage_onnx.write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="not a loadable ONNX model"):
        load_restorer(str(garbage_onnx))
    with pytest.raises(ModelFileError, match="no such model file"):
        load_restorer("dwgn", tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="needs --checkpoint"):
        load_restorer("dwgn")
    with pytest.raises(ConfigError, match="unknown model 'unet'"):
        load_restorer("unet", model_files["dwgn"]["pt"])


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path, tiny_models):
    model = build_model("dwgn", **tiny_models["dwgn"])
    path = tmp_path / "bad.pt"
    config = {**tiny_models["dwgn"], "dim": 32}
    save_checkpoint(path, {"model": model.state_dict(), "model_name": "dwgn", "model_config": config})
    with pytest.raises(ModelFileError, match="weights do not fit a DwGN model"):
        load_restorer(str(path))


PYFUNC_CODE = """
import pathlib

import mlflow

pathlib.Path(MARKER).write_text("the model's code ran")


class Restorer(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Restorer())
"""


def test_a_registered_pyfunc_made_of_code_is_refused_without_running_it(tmp_path, monkeypatch):
    """A models-from-code pyfunc runs its file when loaded: only the ONNX flavour loads from the registry."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service import utils
    from mlflow.types import Schema, TensorSpec

    from weather_restore.errors import RegistryError

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # put MLflow's global URI back afterwards
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient().create_experiment("restore-test", (tmp_path / "artifacts").as_uri())
    code = tmp_path / "code" / "restorer.py"
    code.parent.mkdir()
    marker = tmp_path / "marker"
    code.write_text(PYFUNC_CODE.replace("MARKER", repr(str(marker))))
    frame = TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            signature=ModelSignature(inputs=Schema([frame]), outputs=Schema([frame])),
            pip_requirements=[],
        )
    version = mlflow.register_model(info.model_uri, "DwGN").version
    mlflow.MlflowClient().set_registered_model_alias("DwGN", "champion", version)
    marker.unlink(missing_ok=True)  # logging may run the file once, to check it
    stored = list((tmp_path / "artifacts").rglob("restorer.py"))
    assert stored and "write_text" in stored[0].read_text()  # what a load would run

    with pytest.raises(RegistryError, match=r"models:/DwGN@champion \(version 1\): not an ONNX model \(its python_"):
        load_restorer("models:/DwGN@champion", tracking_uri=uri)
    assert not marker.exists()
    with pytest.raises(RegistryError, match="models:/DwGN@nobody: cannot load"):
        load_restorer("models:/DwGN@nobody", tracking_uri=uri)
