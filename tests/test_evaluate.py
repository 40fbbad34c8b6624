"""evaluate_model as a unit, on the tiny MWVD tree: with a model that returns its input, every figure is known."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from weather_restore.data.clips import load_clip, read_manifest
from weather_restore.data.records import WEATHERS
from weather_restore.evaluate import evaluate_model
from weather_restore.metrics import psnr, ssim


class Identity(nn.Module):
    """Returns its input, and records the shape of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x


def clips_of_the_test_split(root) -> list:
    return [clip for clip in read_manifest(root)[1] if clip.split == "test"]


def frames(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)  # (T, 3, H, W)


@pytest.mark.parametrize(("name", "layout"), [("dynstaticnet", (1, 6, 3, 32, 32)), ("dwgn", (6, 3, 32, 32))])
def test_a_model_that_restores_nothing_scores_exactly_the_degraded_input(tiny_mwvd, tmp_path, name, layout):
    model = Identity()
    metrics = evaluate_model(model, name, tiny_mwvd, tmp_path, use_lpips=False, temporal=False)

    clips = clips_of_the_test_split(tiny_mwvd)
    assert model.shapes == [layout] * len(clips)  # the video model sees whole clips, the image model frames
    with open(tmp_path / "clips.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["clip"] for row in rows] == [clip.id for clip in clips]
    for clip, row in zip(clips, rows, strict=True):
        degraded, clean = (frames(a) for a in load_clip(tiny_mwvd, clip))
        assert float(row["psnr"]) == float(row["input_psnr"]) == pytest.approx(psnr(degraded, clean).mean().item())
        assert float(row["ssim"]) == float(row["input_ssim"]) == pytest.approx(ssim(degraded, clean).mean().item())
        assert row["weather"] == clip.weather and row["lpips"] == ""

    overall = metrics["overall"]
    assert overall["psnr"] == overall["input_psnr"] and overall["ssim"] == overall["input_ssim"]
    assert overall["psnr"] == pytest.approx(np.mean([float(row["psnr"]) for row in rows]))
    assert set(metrics["per_weather"]) == set(WEATHERS)
    for weather, summary in metrics["per_weather"].items():
        ours = [float(row["psnr"]) for row in rows if row["weather"] == weather]
        assert summary["psnr"] == pytest.approx(np.mean(ours))
    assert overall["lpips"] is None and metrics["lpips_note"]
    assert (metrics["clips"], metrics["params"], metrics["gflops"]) == (len(clips), 0, None)
    assert metrics["manifest_checksum"] == read_manifest(tiny_mwvd)[0]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_max_clips_evaluates_the_first_test_clips_only(tiny_mwvd, tmp_path):
    metrics = evaluate_model(Identity(), "dwgn", tiny_mwvd, tmp_path, max_clips=2, use_lpips=False, temporal=False)
    with open(tmp_path / "clips.csv", newline="") as handle:
        evaluated = [row["clip"] for row in csv.DictReader(handle)]
    assert metrics["clips"] == 2
    assert evaluated == [clip.id for clip in clips_of_the_test_split(tiny_mwvd)[:2]]
