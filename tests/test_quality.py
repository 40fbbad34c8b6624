"""No-reference quality (NIQE, flicker) of footage without ground truth, and the commands that report it."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from weather_restore.checkpoint import save_checkpoint
from weather_restore.cli import main
from weather_restore.data.footage import available_photographs, render_clean_video
from weather_restore.models import build_model
from weather_restore.quality import NiqeModel, builtin_model, fit_model, niqe

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Clean 128-pixel frames of the built-in footage, as the generator renders them: (4, 128, 128, 3) in [0, 1]."""
    return render_clean_video("chelsea", 4, (128, 128), np.random.default_rng(7))[0]


def noisy(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    return np.clip(frames + np.random.default_rng(seed).normal(0, sigma, frames.shape), 0, 1).astype(np.float32)


def test_heavier_degradation_of_the_same_frames_scores_worse(frames):
    for frame in frames[:2]:
        by_noise = [niqe(noisy(frame, sigma)) for sigma in (0.0, 0.03, 0.1)]
        by_blur = [niqe(gaussian_filter(frame, (s, s, 0))) for s in (0.0, 1.0, 2.0)]
        assert by_noise == sorted(by_noise) and by_noise[-1] > by_noise[0] + 3, by_noise
        assert by_blur == sorted(by_blur) and by_blur[-1] > by_blur[0] + 3, by_blur


def test_the_score_is_deterministic_and_the_same_for_uint8_and_float_frames(frames):
    frame = frames[0]
    assert niqe(frame) == niqe(frame.copy())
    as_bytes = np.round(frame * 255).astype(np.uint8)
    assert niqe(as_bytes) == pytest.approx(niqe(as_bytes.astype(np.float32) / 255), abs=1e-6)


def test_the_shipped_pristine_model_was_fitted_on_the_builtin_footage_and_round_trips(frames):
    model = builtin_model()
    assert len(model.fitted_on["photographs"]) >= 8
    assert set(model.fitted_on["photographs"]) <= set(available_photographs())
    assert model.mean.shape == (36,) and model.cov.shape == (36, 36)
    np.testing.assert_allclose(model.cov, model.cov.T)
    assert np.linalg.eigvalsh(model.cov).min() > 0  # a proper Gaussian: the sharp patches span all 36 features
    again = NiqeModel.from_json(model.to_json())
    assert niqe(frames[0], again) == niqe(frames[0], model)
    # Fitting is deterministic too, and a model fitted on these very frames finds them more natural than noise.
    own = fit_model(list(frames))
    np.testing.assert_array_equal(own.mean, fit_model(list(frames)).mean)
    assert niqe(frames[3], own) < niqe(noisy(frames[3], 0.05), own)


def test_frames_smaller_than_two_patches_are_refused_with_the_size(frames):
    from weather_restore.errors import DataError

    with pytest.raises(DataError, match=r"at least 64x64 pixels, got \(32, 128\)"):
        niqe(frames[0][:32])


def write_video(path: Path, frames: np.ndarray) -> Path:
    """An H.264 file (near-lossless) of float frames in [0, 1]."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"crf": "4"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            rgb = np.round(frame * 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_score_reports_a_cleaner_output_as_better_per_frame_from_real_videos(tmp_path, frames, capsys):
    rainy = write_video(tmp_path / "rainy.mp4", noisy(frames, 0.08))
    clean = write_video(tmp_path / "clean.mp4", frames)
    report = tmp_path / "report.json"
    assert main(["score", str(rainy), str(clean), "--report", str(report)]) == 0
    line = capsys.readouterr().out
    assert "no-reference quality over 4 frames" in line and f"wrote {report}" in line
    scores = json.loads(report.read_text())
    rows, summary = scores["frames"], scores["summary"]
    assert [row["frame"] for row in rows] == [0, 1, 2, 3]
    assert all(row["output_niqe"] < row["input_niqe"] for row in rows)
    assert "input_flicker" not in rows[0] and all(row["output_flicker"] < row["input_flicker"] for row in rows[1:])
    assert summary["output_niqe"] < summary["input_niqe"] and summary["frames"] == 4
    # A second run replaces its own report; a file it did not write is refused, with the fix, before any work.
    assert main(["score", str(rainy), str(clean), "--report", str(report), "--report-every", "2"]) == 0
    assert [row["output_niqe"] is None for row in json.loads(report.read_text())["frames"]] == [0, 1, 0, 1]
    other = tmp_path / "notes.json"
    other.write_text("{}")
    assert main(["score", str(rainy), str(clean), "--report", str(other)]) == 2
    assert "pass --force to replace it" in capsys.readouterr().err and other.read_text() == "{}"


def test_restore_report_writes_the_scores_of_its_input_and_output(tmp_path, frames, tiny_models, capsys):
    torch.manual_seed(0)
    model = build_model("dwgn", **tiny_models["dwgn"])
    checkpoint = tmp_path / "dwgn.pt"
    config = tiny_models["dwgn"]
    save_checkpoint(checkpoint, {"model": model.state_dict(), "model_name": "dwgn", "model_config": config})
    rainy = write_video(tmp_path / "rainy.mp4", noisy(frames[:2, :64, :96], 0.08))
    out, report = tmp_path / "restored.mp4", tmp_path / "quality.json"
    args = ["--params", str(PARAMS), "restore", str(rainy), "-o", str(out), "--model", "dwgn"]
    assert main([*args, "--checkpoint", str(checkpoint), "--tile", "64", "--report", str(report)]) == 0
    assert "restored 2 frames (96x64)" in capsys.readouterr().out
    scores = json.loads(report.read_text())
    assert scores["summary"]["output"] == str(out) and len(scores["frames"]) == 2
    assert all(isinstance(row["output_niqe"], float) for row in scores["frames"])


def test_an_output_of_other_footage_is_refused_with_one_line(tmp_path, frames, capsys):
    rainy = write_video(tmp_path / "rainy.mp4", noisy(frames, 0.08))
    shorter = write_video(tmp_path / "short.mp4", frames[:2])
    assert main(["score", str(rainy), str(shorter)]) == 2
    assert f"{rainy}: has more frames than {shorter} (2): score an output of this input" in capsys.readouterr().err
    smaller = write_video(tmp_path / "small.mp4", frames[:, :64, :64])
    assert main(["score", str(rainy), str(smaller)]) == 2
    assert "frame 0 is 64x64, the input's 128x128" in capsys.readouterr().err
