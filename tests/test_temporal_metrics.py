"""The temporal metrics on hand-made clips whose right answer is known."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data

from weather_restore.metrics import flicker_error, temporal_reference, warping_error

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
