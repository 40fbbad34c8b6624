"""The temporal metrics on hand-made clips whose right answer is known."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data

from weather_restore.metrics import flicker_error, temporal_reference, warping_error
from weather_restore.temporal import FlowCache, gate_reasons

SIZE, FRAMES = 48, 5


@pytest.fixture(scope="module")
def scene():
    """A smooth real photograph (scikit-image's astronaut), larger than the frames so it can pan."""
    image = data.astronaut()[::4, ::4].astype(np.float64) / 255
    return np.stack([gaussian_filter(image[..., c], 1.0) for c in range(3)])  # (3, 128, 128)


def clip(scene, step: int) -> torch.Tensor:
    """FRAMES crops of the scene, the camera moving `step` pixels right per frame: (T, 3, H, W)."""
    frames = [scene[:, 30 : 30 + SIZE, 20 + t * step : 20 + t * step + SIZE] for t in range(FRAMES)]
    return torch.from_numpy(np.stack(frames))


def flicker(frames: torch.Tensor, amount: float = 0.08) -> torch.Tensor:
    """Each frame brighter or darker in turn, as an unstable restorer's output flickers."""
    gain = 1 + amount * torch.tensor([(-1) ** t for t in range(len(frames))], dtype=frames.dtype)
    return (frames * gain.view(-1, 1, 1, 1)).clamp(0, 1)


def test_a_static_scene_restored_identically_has_zero_error(scene):
    clean = clip(scene, step=0)
    reference = temporal_reference(clean)
    assert reference.masks.all()
    assert warping_error(clean, reference) == 0.0
    assert flicker_error(clean, clean) == 0.0


def test_flicker_scores_worse_than_the_same_clip_without_it(scene):
    clean = clip(scene, step=2)
    reference = temporal_reference(clean)
    steady, flickering = warping_error(clean, reference), warping_error(flicker(clean), reference)
    assert flickering > 10 * steady
    assert flicker_error(flicker(clean), clean) > 0.01
    assert flicker_error(flicker(clean), clean) > 10 * flicker_error(clean, clean)


def test_the_warping_error_is_invariant_to_a_global_translation_the_flow_recovers(scene):
    static, moving = clip(scene, step=0), clip(scene, step=2)
    moving_reference = temporal_reference(moving)
    # The flow recovers the pan: two pixels per frame, to the left of each pixel of the next frame.
    inside = moving_reference.masks
    np.testing.assert_allclose(moving_reference.flows[:, 1][inside].mean(), 2.0, atol=0.1)
    on_static = warping_error(flicker(static), temporal_reference(static))
    on_moving = warping_error(flicker(moving), moving_reference)
    assert on_moving == pytest.approx(on_static, rel=0.1)
    # Without motion compensation the pan alone would look like a large temporal error.
    unwarped = float(((moving[1:] - moving[:-1]) ** 2).mean())
    assert warping_error(moving, moving_reference) < 0.05 * unwarped


def test_frame_changes_that_follow_the_clean_clip_cost_nothing_in_the_flow_free_error(scene):
    clean = clip(scene, step=2)
    offset = (clean + 0.05).clamp(0, 1)  # a constant bias changes no frame-to-frame difference
    assert flicker_error(offset[:, :, :, :], clean) < 1e-3
    assert flicker_error(clean[:1], clean[:1]) == 0.0


# --- the cache of clean flows, evaluate and the promotion gate ------------------------------------------------------


def test_the_flow_cache_computes_a_clip_once_and_gives_back_the_same_reference(scene, tmp_path):
    clean = clip(scene, step=2)
    first, second = FlowCache(tmp_path), FlowCache(tmp_path)
    computed, reused = first.reference(clean), second.reference(clean)
    assert (first.computed, first.reused, second.computed, second.reused) == (1, 0, 0, 1)
    np.testing.assert_allclose(reused.flows, computed.flows, atol=1e-5)  # kept as float32
    np.testing.assert_array_equal(reused.masks, computed.masks)
    assert len(list(tmp_path.iterdir())) == 1
    # Another clip (a different pan) is another entry, never the cached one.
    FlowCache(tmp_path).reference(clip(scene, step=1))
    assert len(list(tmp_path.iterdir())) == 2


def test_a_damaged_cache_file_is_recomputed(scene, tmp_path):
    clean = clip(scene, step=0)
    (tmp_path / f"{FlowCache.key(clean)}.npz").write_bytes(b"not an npz")
    cache = FlowCache(tmp_path)
    assert cache.reference(clean).masks.all() and cache.computed == 1
    assert FlowCache(tmp_path).reference(clean).masks.all()


def test_evaluate_reports_both_temporal_errors_per_weather_and_reuses_the_clean_flows(tiny_mwvd, tmp_path):
    from weather_restore.evaluate import evaluate_model

    # A restorer that returns its input: its temporal errors are the degraded clip's, to the last digit.
    identity = torch.nn.Identity()
    cache = tmp_path / "flows"
    first = evaluate_model(identity, "dynstaticnet", tiny_mwvd, tmp_path / "a", use_lpips=False, flow_cache=cache)
    second = evaluate_model(identity, "dwgn", tiny_mwvd, tmp_path / "b", use_lpips=False, flow_cache=cache)
    clips = first["clips"]
    assert first["temporal"]["flows_computed"] == clips and second["temporal"]["flows_reused"] == clips
    assert second["temporal"]["flows_computed"] == 0
    for metrics in (first, second):
        for weather, row in {"overall": metrics["overall"], **metrics["per_weather"]}.items():
            assert row["warp_error"] == row["input_warp_error"], weather
            assert row["flicker_error"] == row["input_flicker_error"] > 0, weather
    # Rain streaks that move against the scene are temporal noise the clean clip does not have.
    rain = first["per_weather"]["rain"]
    assert rain["input_warp_error"] > 100 * rain["clean_warp_error"]
    assert second["per_weather"] == first["per_weather"]


def test_the_temporal_gate_rule_is_off_by_default_and_names_the_weather_that_got_worse():
    champion = {"test_warp_error_rain": 0.010, "test_flicker_error_rain": 0.020, "test_warp_error_snow": 0.010}
    candidate = {"test_warp_error_rain": 0.0125, "test_flicker_error_rain": 0.019, "test_warp_error_snow": 0.0109}
    weathers = ("haze", "rain", "snow")
    assert gate_reasons(candidate, champion, weathers, None) == []
    (reason,) = gate_reasons(candidate, champion, weathers, 0.1)
    assert reason.startswith("rain warp_error 0.0125 is +25% of the champion's 0.01")
    assert "registry.temporal_tolerance" in reason
    assert gate_reasons(candidate, champion, weathers, 0.25) == []
    # A champion measured before temporal metrics existed cannot be lost against; a candidate without them can.
    assert gate_reasons(candidate, {}, weathers, 0.0) == []
    assert "snow: the candidate has no warp_error" in gate_reasons({}, champion, weathers, 0.1)[-1]
