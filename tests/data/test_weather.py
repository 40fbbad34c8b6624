"""Weather physics: haze, rain and snow as pure functions of (clean frames, depth, parameters, generator)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from weather_restore.config import HazeConfig, RainConfig, SnowConfig, SyntheticConfig
from weather_restore.data.footage import render_clean_video
from weather_restore.data.weather import (
    FlakeLayer,
    StreakLayer,
    WeatherSample,
    beta_drift,
    haze,
    rain,
    rain_layers,
    render_weather,
    snow,
    snow_layers,
)
from weather_restore.errors import DataError

WEATHERS = ("haze", "rain", "snow")
CONFIG = SyntheticConfig()
AIRLIGHT = np.array([0.8, 0.82, 0.85], dtype=np.float32)


@pytest.fixture(scope="module")
def video() -> tuple[np.ndarray, np.ndarray]:
    """A real 8-frame clean video with its depth, 64 x 80."""
    return render_clean_video("china", 8, (64, 80), np.random.default_rng(0))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-12))


def moved_corr(before: np.ndarray, after: np.ndarray, reach: int = 14) -> float:
    """The best correlation of `after` with `before` moved down by 0..reach and sideways by +-reach/2 px."""
    height, width = before.shape
    best = -1.0
    for dy in range(reach + 1):
        for dx in range(-reach // 2, reach // 2 + 1):
            moved = before[: height - dy, max(0, -dx) : width - max(0, dx)]
            best = max(best, corr(moved, after[dy:, max(0, dx) : width + min(0, dx)]))
    return best


def render(weather: str, video: tuple[np.ndarray, np.ndarray], seed: int, cfg=CONFIG) -> WeatherSample:
    return render_weather(weather, *video, cfg, np.random.default_rng(seed))


# --- the physics' exact properties ----------------------------------------------------------------------------


def test_zero_density_haze_is_identity(video) -> None:
    clean, depth = video
    degraded, t = haze(clean, depth, 0.0, AIRLIGHT)
    assert degraded.dtype == np.float32 and degraded.tobytes() == clean.tobytes()
    assert np.all(t == 1.0)


def test_zero_density_rain_and_snow_are_identity(video) -> None:
    clean, depth = video
    streaks = rain_layers(8, (64, 80), [StreakLayer(30, 0.0, 0.5, 0.8, 10)], 5.0, np.zeros(8), np.random.default_rng(0))
    flakes = snow_layers(8, (64, 80), [FlakeLayer(0.0, 3.0, 1.0, 5.0, 1.0)], np.random.default_rng(0))
    assert not streaks.any() and not flakes.any()
    assert rain(clean, depth, streaks, 0.0, AIRLIGHT)[0].tobytes() == clean.tobytes()
    assert snow(clean, depth, flakes, 0.0, AIRLIGHT, 0.9)[0].tobytes() == clean.tobytes()


def test_zero_weather_configs_reproduce_the_clean_video(video) -> None:
    clean, _ = video
    cfg = SyntheticConfig(
        haze=HazeConfig(beta=(0.0, 0.0)),
        rain=RainConfig(density=(0.0, 0.0), veil_beta=(0.0, 0.0)),
        snow=SnowConfig(density=(0.0, 0.0), veil_beta=(0.0, 0.0)),
    )
    for weather in WEATHERS:
        sample = render(weather, video, 1, cfg)
        assert sample.degraded.tobytes() == clean.tobytes(), weather
        assert np.all(sample.transmission == 1.0) and not sample.layer.any()


def test_with_the_veil_off_rain_and_snow_only_brighten(video) -> None:
    clean, depth = video
    rng = np.random.default_rng(2)
    streaks = rain_layers(8, (64, 80), [StreakLayer(30, 0.004, 0.6, 0.8, 10)], 5.0, np.ones(8), rng)
    flakes = snow_layers(8, (64, 80), [FlakeLayer(0.01, 3.0, 1.0, 5.0, 1.0)], rng)
    for degraded, _ in (
        rain(clean, depth, streaks, 0.0, AIRLIGHT),
        snow(clean, depth, flakes, 0.0, AIRLIGHT, 0.85),
    ):
        assert np.all(degraded >= clean)
        assert (degraded > clean + 0.1).mean() > 0.01


def test_the_veil_moves_each_pixel_towards_the_airlight(video) -> None:
    clean, depth = video
    degraded, t = haze(clean, depth, 3.0, AIRLIGHT)
    low, high = np.minimum(clean, AIRLIGHT), np.maximum(clean, AIRLIGHT)
    assert np.all(degraded >= low - 1e-6) and np.all(degraded <= high + 1e-6)
    assert np.all(np.abs(degraded - AIRLIGHT) <= np.abs(clean - AIRLIGHT) + 1e-6)
    far = depth > np.percentile(depth, 80)
    assert np.abs(degraded - AIRLIGHT)[far].mean() < 0.5 * np.abs(clean - AIRLIGHT)[far].mean()


@pytest.mark.parametrize("weather", WEATHERS)
def test_outputs_are_in_range_and_complete(video, weather: str) -> None:
    clean, _ = video
    sample = render(weather, video, 3)
    assert sample.degraded.shape == clean.shape and sample.degraded.dtype == np.float32
    assert sample.degraded.min() >= 0.0 and sample.degraded.max() <= 1.0
    assert sample.transmission.shape == clean.shape[:3] and sample.transmission.dtype == np.float32
    assert sample.transmission.min() > 0.0 and sample.transmission.max() <= 1.0
    assert sample.airlight.shape == (3,) and np.all((sample.airlight >= 0) & (sample.airlight <= 1))
    assert sample.layer.shape == clean.shape[:3] and sample.layer.dtype == np.float32
    assert sample.layer.min() >= 0.0 and sample.layer.max() <= 1.0
    assert json.loads(json.dumps(sample.params)) == sample.params
    assert np.abs(sample.degraded - clean).mean() > 0.02  # the weather is visible


@pytest.mark.parametrize("weather", WEATHERS)
def test_same_seed_same_bytes(video, weather: str) -> None:
    first, again, other = render(weather, video, 5), render(weather, video, 5), render(weather, video, 6)
    for field in ("degraded", "transmission", "airlight", "layer"):
        assert getattr(first, field).tobytes() == getattr(again, field).tobytes()
    assert first.params == again.params
    assert first.degraded.tobytes() != other.degraded.tobytes()


def test_unknown_weather_is_a_data_error(video) -> None:
    with pytest.raises(DataError, match="unknown weather 'fog'"):
        render("fog", video, 0)


# --- moving weather -----------------------------------------------------------------------------------------------


def test_rain_streaks_move_down_with_the_rain() -> None:
    layer = StreakLayer(length=20, density=0.004, opacity=0.5, width=0.7, speed=6.0)
    streaks = rain_layers(6, (64, 64), [layer], 0.0, np.zeros(6), np.random.default_rng(0))
    for k in range(5):
        assert corr(streaks[k][:-6], streaks[k + 1][6:]) > 0.95  # frame k+1 is frame k moved 6 px down
        assert corr(streaks[k], streaks[k + 1]) > 0.5  # streaks overlap their previous position


def test_rain_streaks_are_long_and_near_vertical(video) -> None:
    layer = render("rain", video, 4).layer
    assert corr(layer[:, :-4], layer[:, 4:]) > 3 * abs(corr(layer[:, :, :-4], layer[:, :, 4:]))


def test_snow_flakes_move_down_with_the_wind() -> None:
    layer = FlakeLayer(density=0.01, radius=3.0, opacity=1.0, speed=4.0, wind=0.0)
    flakes = snow_layers(6, (64, 64), [layer], np.random.default_rng(0))
    for k in range(5):
        assert corr(flakes[k][:-4], flakes[k + 1][4:]) > 0.8  # up to each flake's own speed and flutter
        assert corr(flakes[k], flakes[k + 1]) < corr(flakes[k][:-4], flakes[k + 1][4:])


@pytest.mark.parametrize("weather", ["rain", "snow"])
def test_consecutive_frames_are_correlated_unrelated_seeds_are_not(video, weather: str) -> None:
    layer, other = render(weather, video, 10).layer, render(weather, video, 11).layer
    for k in range(0, 7, 2):
        moved, unrelated = moved_corr(layer[k], layer[k + 1]), moved_corr(other[k], layer[k + 1])
        assert moved > 0.65 and unrelated < 0.4 and moved - unrelated > 0.4


def test_haze_density_drifts_slowly_and_within_bounds() -> None:
    field = beta_drift((10, 32, 48), 0.1, np.random.default_rng(0))
    assert field.dtype == np.float32 and field.shape == (10, 32, 48)
    assert field.min() >= 0.9 - 1e-6 and field.max() <= 1.1 + 1e-6 and field.std() > 0.01
    assert np.abs(np.diff(field, axis=0)).max() < 0.02
    assert np.abs(np.diff(field, axis=2)).max() < 0.01
