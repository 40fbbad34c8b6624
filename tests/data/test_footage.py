"""Clean footage: photographs shipped by installed packages, moved by a smooth camera path, with depth."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from skimage.registration import phase_cross_correlation

from weather_restore.data import footage
from weather_restore.data.footage import (
    available_photographs,
    camera_path,
    depth_from_disparity,
    load_photograph,
    prior_depth,
    render_clean_video,
)
from weather_restore.errors import DataError

SKIMAGE_PHOTOGRAPHS = ["astronaut", "chelsea", "coffee", "motorcycle", "rocket"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any network connection fails, and nothing loaded earlier is reused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    footage._load.cache_clear()
    footage.photograph_depth.cache_clear()


def test_photographs_ship_with_the_installed_packages(offline: None) -> None:
    names = available_photographs()
    assert set(SKIMAGE_PHOTOGRAPHS) <= set(names)
    assert names == [name for name in footage.PHOTOGRAPHS if name in names]  # fixed order
    for name in names:
        image, depth = load_photograph(name)
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.05
        if name == "motorcycle":
            assert depth is not None and depth.shape == image.shape[:2]
            assert depth.min() == 0.0 and depth.max() == 1.0
        else:
            assert depth is None


def test_unknown_photograph_is_a_data_error() -> None:
    with pytest.raises(DataError, match="'lena' is not available.*astronaut"):
        load_photograph("lena")


def test_depth_from_disparity_is_farther_where_disparity_is_small() -> None:
    disparity = np.tile(np.linspace(60.0, 6.0, 50), (20, 1))
    disparity[5, 5] = np.inf  # no ground truth: filled from its neighbours
    depth = depth_from_disparity(disparity)
    assert depth.dtype == np.float32 and np.isfinite(depth).all()
    assert depth.min() >= 0.0 and depth.max() <= 1.0
    assert np.all(np.diff(depth, axis=1) >= 0)
    assert abs(depth[5, 5] - depth[5, 4]) < 0.05


def test_depth_priors_put_the_top_and_the_border_farther() -> None:
    image = np.random.default_rng(0).random((60, 80, 3)).astype(np.float32)
    vertical = prior_depth(image, "vertical")
    radial = prior_depth(image, "radial")
    for depth in (vertical, radial):
        assert depth.shape == (60, 80) and depth.dtype == np.float32
        assert depth.min() == 0.0 and depth.max() == 1.0
    assert vertical[:10].mean() > vertical[-10:].mean() + 0.5
    assert radial[:5, :5].mean() > radial[25:35, 35:45].mean() + 0.5


def test_clean_video_shape_dtype_and_range() -> None:
    frames, depth = render_clean_video("chelsea", 6, (40, 56), np.random.default_rng(0))
    assert frames.shape == (6, 40, 56, 3) and frames.dtype == np.float32
    assert depth.shape == (6, 40, 56) and depth.dtype == np.float32
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    assert depth.min() >= 0.0 and depth.max() <= 1.0
    assert frames.std() > 0.05 and depth.std() > 0.01


def test_same_seed_same_bytes_and_other_seeds_differ() -> None:
    first = render_clean_video("coffee", 4, (32, 32), np.random.default_rng(7))
    again = render_clean_video("coffee", 4, (32, 32), np.random.default_rng(7))
    other = render_clean_video("coffee", 4, (32, 32), np.random.default_rng(8))
    assert first[0].tobytes() == again[0].tobytes() and first[1].tobytes() == again[1].tobytes()
    assert first[0].tobytes() != other[0].tobytes()


@pytest.mark.parametrize("seed", range(5))
def test_camera_path_is_smooth_and_stays_inside_the_photograph(seed: int) -> None:
    photo, size, n_frames = (300, 451), (64, 80), 40
    path = camera_path(photo, n_frames, size, np.random.default_rng(seed), parallax=True)
    steps = np.linalg.norm(np.diff(path.centre, axis=0), axis=1) / path.scale[1:]  # output px per frame
    assert steps.max() < 2.5 and steps.sum() > 0.3 * (n_frames - 1)
    assert np.abs(np.diff(np.log(path.scale))).max() < 0.01
    assert np.abs(np.rad2deg(np.diff(path.angle))).max() < 0.2
    assert np.abs(np.diff(path.parallax)).max() <= 0.2
    accel = np.linalg.norm(np.diff(path.centre, 2, axis=0), axis=1) / path.scale[2:]
    assert accel.max() < 0.1  # no jerks
    coords = footage.sample_coordinates(path, size, None)
    assert coords[0].min() >= 0 and coords[0].max() <= photo[0] - 1
    assert coords[1].min() >= 0 and coords[1].max() <= photo[1] - 1


def test_a_pan_that_fills_all_the_room_does_not_fail_on_rounding() -> None:
    """The rocket at 32 px, 30 frames, with the generator's seed (0, 0, 4): the pan spans exactly the room left
    around the crop, where the slack came out as -1e-13 and numpy refused the draw."""
    rng = np.random.default_rng(np.random.SeedSequence([0, 0, 4]))
    frames, depth = render_clean_video("rocket", 30, (32, 32), rng)
    assert frames.shape == (30, 32, 32, 3) and depth.shape == (30, 32, 32)


def test_video_moves_smoothly() -> None:
    frames, _ = render_clean_video("astronaut", 16, (48, 48), np.random.default_rng(3))
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert steps.max() < 0.08
    assert np.abs(frames[-1] - frames[0]).mean() > 2 * steps.mean()


def test_depth_moves_with_the_frames() -> None:
    """Motorcycle (real depth, sharp edges): image and depth shift alike between the first and last frame."""
    frames, depth = render_clean_video("motorcycle", 12, (96, 96), np.random.default_rng(1))
    grey = frames.mean(axis=-1)
    image_shift = phase_cross_correlation(grey[0], grey[-1], upsample_factor=4)[0]
    depth_shift = phase_cross_correlation(depth[0], depth[-1], upsample_factor=4)[0]
    assert np.linalg.norm(image_shift) > 3
    assert np.linalg.norm(image_shift - depth_shift) < 2.0
    assert np.abs(np.diff(depth, axis=0)).mean() < 0.05
