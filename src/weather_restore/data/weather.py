"""Haze, rain and snow physics: pure functions of (clean frames, depth, parameters, random generator).

Clean frames J are (T, H, W, 3) float32 in [0, 1]; depth d is (T, H, W) in [0, 1], larger is farther.
All three weathers share the atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d):
- haze:  I = J t + A (1 - t)
- rain:  I = clip(J + R) t + A (1 - t), R the moving streak layers
- snow:  I = B (1 - z) + max(K, B) z, B = J t + A (1 - t), z the opacity of moving flakes

The `render_*` functions draw every parameter once per video from a config's ranges; the lower-level
functions take the parameters explicitly. Rain drops and snow flakes are persistent particles that move a
few pixels per frame (new ones enter at the top), so the weather moves instead of flickering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from weather_restore.config import HazeConfig, RainConfig, SnowConfig, SyntheticConfig
from weather_restore.errors import DataError


@dataclass(frozen=True)
class WeatherSample:
    """A degraded video and what the physics used to make it (kept beside the frames for physics-guided
    models and for debugging)."""

    degraded: np.ndarray  # (T, H, W, 3) float32 in [0, 1]
    transmission: np.ndarray  # (T, H, W) float32 in (0, 1]
    airlight: np.ndarray  # (3,) float32
    layer: np.ndarray  # (T, H, W) float32 in [0, 1]: rain streak intensity R or snow opacity z; 0 for haze
    params: dict[str, Any] = field(default_factory=dict)  # the drawn parameters, JSON-serialisable


# --- atmospheric scattering -----------------------------------------------------------------------------------


def transmission(depth: np.ndarray, beta: float | np.ndarray) -> np.ndarray:
    """t = exp(-beta d) in (0, 1]; beta a scalar or an array broadcastable to the depth (spatial drift)."""
    t = np.exp(-np.asarray(beta, dtype=np.float32) * np.asarray(depth, dtype=np.float32))
    # exp underflows to 0 only for beta d > 103, far outside any range here; keep t > 0 regardless.
    return np.maximum(t, np.float32(1e-6), dtype=np.float32)


def scatter(clean: np.ndarray, t: np.ndarray, airlight: np.ndarray) -> np.ndarray:
    """I = J t + A (1 - t) (Koschmieder): each pixel moves towards the airlight as t falls."""
    t = t[..., None]
    airlight = np.asarray(airlight, dtype=np.float32)
    return np.clip(clean * t + airlight * (np.float32(1.0) - t), 0.0, 1.0)


def haze(
    clean: np.ndarray, depth: np.ndarray, beta: float | np.ndarray, airlight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hazy frames and their transmission: I = J t + A (1 - t), t = exp(-beta d)."""
    t = transmission(depth, beta)
    return scatter(clean, t, airlight), t


def beta_drift(shape: tuple[int, int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field (T, H, W) in [1 - amplitude, 1 + amplitude]: two plane waves longer than
    the frame whose phases move slowly (at most half a cycle over the video), so haze density varies gently."""
    n_frames, height, width = shape
    y = np.arange(height, dtype=np.float32)[:, None] / max(height, width)
    x = np.arange(width, dtype=np.float32)[None, :] / max(height, width)
    frames = np.arange(n_frames, dtype=np.float32) / max(n_frames - 1, 1)
    field_ = np.zeros(shape, dtype=np.float32)
    for _ in range(2):
        heading = rng.uniform(0.0, 2.0 * np.pi)
        frequency = rng.uniform(0.3, 0.8)  # cycles per frame side
        drift = rng.uniform(-np.pi / 2, np.pi / 2)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        plane = 2.0 * np.pi * frequency * (np.cos(heading) * y + np.sin(heading) * x)
        field_ += np.sin(plane[None] + (drift * frames + phase)[:, None, None]).astype(np.float32)
    return np.float32(1.0) + np.float32(amplitude / 2.0) * field_


def _grey_airlight(level: float, tint: float, rng: np.random.Generator) -> np.ndarray:
    airlight = level + rng.uniform(-tint, tint, size=3) if tint > 0 else np.full(3, level)
    return np.clip(airlight, 0.0, 1.0).astype(np.float32)


# --- moving particles ------------------------------------------------------------------------------------------


def _particle_count(density: float, size: tuple[int, int], reach: float, slope: float, rng: np.random.Generator) -> int:
    """How many particles `_advect` needs for `density` per pixel in the frame; `slope` is |vx / vy|."""
    span = size[0] + 2.0 * reach
    return int(rng.poisson(density * span * (size[1] + 2.0 * reach + span * slope)))


def _advect(
    count: int,
    n_frames: int,
    size: tuple[int, int],
    velocity: tuple[np.ndarray, np.ndarray],
    reach: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (T, count) y and x of particles falling with per-particle `velocity` (vy > 0, vx) px/frame.

    Each particle loops through a domain that covers the frame plus `reach` (how far its drawing extends
    from its position); when it leaves at the bottom it re-enters at the top at a fresh random x, so the
    density stays constant and nothing repeats.
    """
    height, width = size
    vy, vx = velocity
    if np.any(vy <= 0):
        raise ValueError("particles must fall: every vertical velocity must be > 0")
    top, bottom = -reach, height + reach
    span = bottom - top
    passes = int(np.ceil((span + vy.max() * n_frames) / span)) + 1
    duration = span / vy  # frames a particle needs to cross the domain
    # Start each pass far enough upwind that the particle crosses the frame, whatever the wind.
    low = -reach - np.maximum(vx, 0.0) * duration
    high = width + reach - np.minimum(vx, 0.0) * duration
    starts = low[:, None] + (high - low)[:, None] * rng.random((count, passes))  # (count, passes)
    offset = rng.uniform(0.0, span, size=count)

    travelled = offset[None, :] + vy[None, :] * np.arange(n_frames)[:, None]  # (T, count)
    pass_index = np.floor(travelled / span).astype(np.int64)
    along = travelled - pass_index * span
    ys = top + along
    xs = np.take_along_axis(starts, pass_index.T, axis=1).T + vx[None, :] * along / vy[None, :]
    return ys, xs


def _splat(
    ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, frames: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """Bilinear splatting of weighted points (same-shaped arrays, `frames` the frame index) into (T, H, W)."""
    n_frames, height, width = shape
    ys, xs, weights, frames = (np.ravel(a) for a in np.broadcast_arrays(ys, xs, weights, frames))
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = ys - y0, xs - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    total = np.zeros(n_frames * height * width)
    for dy, dx, share in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        index = (frames[inside] * height + yy[inside]) * width + xx[inside]
        total += np.bincount(index, weights=(weights * share)[inside], minlength=total.size)
    return total.reshape(shape)


def _line_peak(sigma: float) -> float:
    """Peak of a 1-px-wide line of unit density after a Gaussian blur of `sigma` (to normalise brightness)."""
    delta = np.zeros(33)
    delta[16] = 1.0
    return float(ndimage.gaussian_filter1d(delta, sigma)[16]) if sigma > 0 else 1.0


# --- rain ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreakLayer:
    """One depth layer of rain: streaks `length` px long, `density` drops per pixel, peak `opacity` (the w of
    I = clip(J + w S)), Gaussian `width` (sigma, px), moving `speed` px per frame along the rain's angle."""

    length: float
    density: float
    opacity: float
    width: float
    speed: float

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"{type(self).__name__}: speed must be > 0 px per frame, got {self.speed}")


def rain_layers(
    n_frames: int,
    size: tuple[int, int],
    layers: Sequence[StreakLayer],
    angle: float,
    jitter: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """The streak intensity R (T, H, W) in [0, 1]: each layer's drops are sparse bright points, motion-blurred
    into streaks along the rain direction (`angle` degrees from vertical, plus per-frame `jitter` degrees)
    and advected along `angle` by the layer's speed, so frame k+1 shows the streaks of frame k moved on."""
    shape = (n_frames, *size)
    total = np.zeros(shape, dtype=np.float32)
    theta = np.deg2rad(angle)
    frame_theta = np.deg2rad(angle + np.asarray(jitter, dtype=np.float64))  # (T,)
    for layer in layers:
        if layer.density <= 0 or layer.opacity <= 0:
            continue
        reach = layer.length + 3.0 * layer.width + 2.0
        count = _particle_count(layer.density, size, reach, abs(np.tan(theta)), rng)
        if count == 0:
            continue
        velocity = np.full(count, layer.speed)
        ys, xs = _advect(count, n_frames, size, (velocity * np.cos(theta), velocity * np.sin(theta)), reach, rng)
        amplitude = rng.uniform(0.5, 1.0, size=count)
        # A streak is the trail behind its drop: samples every pixel back along the frame's direction.
        steps = np.arange(int(np.ceil(layer.length)), dtype=np.float64)  # (S,)
        step_y = np.cos(frame_theta)[:, None, None] * steps  # (T, 1, S)
        step_x = np.sin(frame_theta)[:, None, None] * steps
        frames = np.arange(n_frames)[:, None, None]
        streaks = _splat(ys[..., None] - step_y, xs[..., None] - step_x, amplitude[None, :, None], frames, shape)
        if layer.width > 0:
            streaks = ndimage.gaussian_filter(streaks, sigma=(0, layer.width, layer.width), truncate=3.0)
        total += (layer.opacity / _line_peak(layer.width) * streaks).astype(np.float32)
    return np.clip(total, 0.0, 1.0)


def rain(
    clean: np.ndarray, depth: np.ndarray, streaks: np.ndarray, beta: float, airlight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rainy frames and their transmission: I = clip(J + R) t + A (1 - t); beta = 0 is streaks only (t = 1)."""
    t = transmission(depth, beta)
    return scatter(np.clip(clean + streaks[..., None], 0.0, 1.0), t, airlight), t


def streak_weight(length: float) -> float:
    """w = 0.2 + 0.04 L: longer (nearer, faster) streaks are drawn with more weight."""
    return 0.2 + 0.04 * length


def render_rain(clean: np.ndarray, depth: np.ndarray, cfg: RainConfig, rng: np.random.Generator) -> WeatherSample:
    """Rain with 2-3 streak layers (shorter, thinner, fainter and slower far away) over an accumulation veil."""
    n_frames, height, width = clean.shape[:3]
    n_layers = int(rng.integers(cfg.layers[0], cfg.layers[1] + 1))
    length = rng.uniform(*cfg.streak_length) * min(height, width) / cfg.reference_size
    angle = rng.uniform(-cfg.angle, cfg.angle)
    density = rng.uniform(*cfg.density)
    intensity = rng.uniform(*cfg.intensity)
    fall = rng.uniform(*cfg.fall_speed)
    beta = rng.uniform(*cfg.veil_beta)
    level = rng.uniform(*cfg.airlight)
    jitter = rng.uniform(-cfg.angle_jitter, cfg.angle_jitter, size=n_frames)

    nearness = np.linspace(0.4, 1.0, n_layers) if n_layers > 1 else np.ones(1)
    layers = [
        StreakLayer(
            length=length * f,
            density=density * (1.0 / f) / np.sum(1.0 / nearness),
            opacity=intensity * streak_weight(length * f) / streak_weight(length),
            width=0.35 + 0.45 * f,
            speed=fall * length * f,
        )
        for f in nearness
    ]
    streaks = rain_layers(n_frames, (height, width), layers, angle, jitter, rng)
    airlight = _grey_airlight(level, 0.0, rng)
    degraded, t = rain(clean, depth, streaks, beta, airlight)
    params = {
        "layers": n_layers,
        "streak_length": float(length),
        "angle": float(angle),
        "density": float(density),
        "intensity": float(intensity),
        "fall_speed": float(fall),
        "beta": float(beta),
        "airlight": [float(a) for a in airlight],
    }
    return WeatherSample(degraded, t, airlight, streaks, params)


# --- snow ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlakeLayer:
    """One depth layer of snow: `density` flakes per pixel of `radius` px and peak `opacity`, falling at
    `speed` px per frame and blown sideways by `wind` px per frame."""

    density: float
    radius: float
    opacity: float
    speed: float
    wind: float

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"{type(self).__name__}: speed must be > 0 px per frame, got {self.speed}")


EXPOSURE = 0.5  # share of the frame interval the shutter is open: the length of a flake's motion blur
SWAY = 0.3  # a flake's sideways flutter, in radii
FLAT_TOP = 1.6  # gain on a flake's Gaussian profile before clipping to an opacity of 1


def snow_layers(
    n_frames: int, size: tuple[int, int], layers: Sequence[FlakeLayer], rng: np.random.Generator
) -> np.ndarray:
    """The flake opacity z (T, H, W) in [0, 1]: soft round flakes, each motion-blurred along its velocity,
    that fall and drift with the wind (and flutter) from frame to frame; layers composite front to back."""
    shape = (n_frames, *size)
    clear = np.ones(shape, dtype=np.float32)  # share of light that passes every layer
    frames = np.arange(n_frames)
    for layer in layers:
        if layer.density <= 0 or layer.opacity <= 0:
            continue
        sigma = layer.radius / 2.0
        trail = EXPOSURE * float(np.hypot(layer.speed, layer.wind)) * 1.2
        reach = 3.0 * sigma + trail + abs(SWAY * layer.radius) + 2.0
        count = _particle_count(layer.density, size, reach, abs(layer.wind) / layer.speed, rng)
        if count == 0:
            continue
        vy = layer.speed * rng.uniform(0.8, 1.2, size=count)
        vx = layer.wind * rng.uniform(0.8, 1.2, size=count) + rng.normal(0.0, 0.15 * layer.speed, size=count)
        ys, xs = _advect(count, n_frames, size, (vy, vx), reach, rng)
        period = rng.uniform(15.0, 40.0, size=count)
        phase = rng.uniform(0.0, 2.0 * np.pi, size=count)
        xs = xs + SWAY * layer.radius * np.sin(2.0 * np.pi * frames[:, None] / period + phase)
        amplitude = layer.opacity * rng.uniform(0.6, 1.0, size=count)

        samples = max(1, int(np.ceil(trail)))
        back = np.linspace(0.0, EXPOSURE, samples) if samples > 1 else np.zeros(1)  # (S,)
        mass = 2.0 * np.pi * sigma**2 / samples  # a still flake's blurred peak equals its amplitude
        flakes = _splat(
            ys[..., None] - vy[None, :, None] * back,
            xs[..., None] - vx[None, :, None] * back,
            (amplitude * mass)[None, :, None],
            frames[:, None, None],
            shape,
        )
        flakes = ndimage.gaussian_filter(flakes, sigma=(0, sigma, sigma), truncate=3.0)
        # Saturating the Gaussian's core gives a soft-edged disc rather than a glowing dot.
        clear *= np.float32(1.0) - np.clip(FLAT_TOP * flakes, 0.0, 1.0).astype(np.float32)
    return np.float32(1.0) - clear


def snow(
    clean: np.ndarray,
    depth: np.ndarray,
    opacity: np.ndarray,
    beta: float,
    airlight: np.ndarray,
    brightness: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Snowy frames and their transmission: I = B (1 - z) + max(K, B) z with B = J t + A (1 - t).

    max(K, B) instead of K: a flake never darkens a background brighter than itself (a white sky stays
    white), so flakes only ever brighten.
    """
    t = transmission(depth, beta)
    background = scatter(clean, t, airlight)
    # B (1 - z) + max(K, B) z, written so that rounding can never take a pixel below B.
    lift = np.maximum(np.float32(brightness) - background, np.float32(0.0))
    return np.clip(background + opacity[..., None] * lift, 0.0, 1.0), t


def render_snow(clean: np.ndarray, depth: np.ndarray, cfg: SnowConfig, rng: np.random.Generator) -> WeatherSample:
    """Snow with 2-3 flake layers (larger, faster, sparser and more opaque near the camera) over a light veil."""
    n_frames, height, width = clean.shape[:3]
    scale = min(height, width) / cfg.reference_size
    n_layers = int(rng.integers(cfg.layers[0], cfg.layers[1] + 1))
    density = rng.uniform(*cfg.density) / 1e4
    closeness = rng.uniform(0.6, 1.0)  # how close the nearest layer is: its radius and speed within the ranges
    wind = rng.uniform(*cfg.wind)
    brightness = rng.uniform(*cfg.brightness)
    beta = rng.uniform(*cfg.veil_beta)
    level = rng.uniform(*cfg.airlight)

    nearness = np.linspace(0.0, 1.0, n_layers) if n_layers > 1 else np.ones(1)
    radius_lo, radius_hi = cfg.radius
    speed_lo, speed_hi = cfg.speed
    radii = radius_lo + (radius_hi - radius_lo) * closeness * nearness
    shares = 1.0 / radii
    layers = [
        FlakeLayer(
            density=density * share / shares.sum(),
            radius=r * scale,
            opacity=0.55 + 0.45 * f,
            speed=(speed_lo + (speed_hi - speed_lo) * closeness * f) * scale,
            wind=wind * (0.4 + 0.6 * f) * scale,
        )
        for f, r, share in zip(nearness, radii, shares, strict=True)
    ]
    opacity = snow_layers(n_frames, (height, width), layers, rng)
    airlight = _grey_airlight(level, 0.0, rng)
    degraded, t = snow(clean, depth, opacity, beta, airlight, brightness)
    params = {
        "layers": n_layers,
        "density": float(density * 1e4),
        "nearest_radius": float(radii[-1] * scale),
        "nearest_speed": float(layers[-1].speed),
        "wind": float(wind * scale),
        "brightness": float(brightness),
        "beta": float(beta),
        "airlight": [float(a) for a in airlight],
    }
    return WeatherSample(degraded, t, airlight, opacity, params)


# --- haze and dispatch -----------------------------------------------------------------------------------------


def render_haze(clean: np.ndarray, depth: np.ndarray, cfg: HazeConfig, rng: np.random.Generator) -> WeatherSample:
    """Haze with a grey (slightly tinted) airlight and a density that may drift slowly in space and time."""
    beta = rng.uniform(*cfg.beta)
    level = rng.uniform(*cfg.airlight)
    airlight = _grey_airlight(level, cfg.tint, rng)
    drift = rng.uniform(0.0, cfg.drift)
    beta_field = beta * beta_drift(depth.shape, drift, rng) if drift > 0 else beta
    degraded, t = haze(clean, depth, beta_field, airlight)
    params = {"beta": float(beta), "drift": float(drift), "airlight": [float(a) for a in airlight]}
    return WeatherSample(degraded, t, airlight, np.zeros(depth.shape, dtype=np.float32), params)


def render_weather(
    weather: str, clean: np.ndarray, depth: np.ndarray, cfg: SyntheticConfig, rng: np.random.Generator
) -> WeatherSample:
    """Degrade a clean video with `weather` ('haze', 'rain' or 'snow'), drawing its parameters from `cfg`."""
    if clean.ndim != 4 or clean.shape[-1] != 3 or depth.shape != clean.shape[:3]:
        raise DataError(f"{weather}: expected clean (T, H, W, 3) and depth (T, H, W), got {clean.shape}, {depth.shape}")
    clean = np.asarray(clean, dtype=np.float32)
    depth = np.asarray(depth, dtype=np.float32)
    if weather == "haze":
        return render_haze(clean, depth, cfg.haze, rng)
    if weather == "rain":
        return render_rain(clean, depth, cfg.rain, rng)
    if weather == "snow":
        return render_snow(clean, depth, cfg.snow, rng)
    raise DataError(f"unknown weather '{weather}': expected haze, rain or snow")
