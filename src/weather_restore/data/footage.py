"""Clean videos from photographs shipped by installed packages, moved by a smooth camera path.

No file is downloaded: only photographs that are already inside the installed wheels are used. The stereo
motorcycle pair of scikit-image comes with a ground-truth disparity map, i.e. real depth (and real parallax);
every other photograph gets a depth prior (farther towards the top, or away from the centre) that follows the
image's edges. The depth is warped by the same camera path as the frames, so anything derived from it (the
haze transmission) moves with the scene.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.transform import rescale

from weather_restore.errors import DataError

DepthPrior = Literal["vertical", "radial"]


@dataclass(frozen=True)
class Photograph:
    """A photograph shipped inside an installed package, and the depth prior that suits its scene."""

    package: str
    file: str
    prior: DepthPrior
    disparity: str | None = None


# Real scenes only (no microscopy, astronomy, text, synthetic or binary images, no textures), in a fixed order.
# Licences: scikit-image's are public domain / CC0 (`camera`, grey, CC0 by Lav Varshney), scikit-learn's two are
# CC BY 2.0 (Flickr, see its README), matplotlib's Grace Hopper portrait is a US Navy photograph in the public
# domain. Looked at and left out (2026-12): imageio's and scipy.datasets' images are downloaded at run time;
# mahotas ships an illustration and portraits of unclear licence; imgaug's quokka (with a depth map) would pull
# in OpenCV and Shapely for one photograph; PyWavelets' images are grey copies of the same kind.
PHOTOGRAPHS: dict[str, Photograph] = {
    "astronaut": Photograph("skimage", "data/astronaut.png", "radial"),
    "chelsea": Photograph("skimage", "data/chelsea.png", "radial"),
    "coffee": Photograph("skimage", "data/coffee.png", "vertical"),
    "motorcycle": Photograph("skimage", "data/motorcycle_left.png", "vertical", disparity="data/motorcycle_disp.npz"),
    "rocket": Photograph("skimage", "data/rocket.jpg", "vertical"),
    "china": Photograph("sklearn", "datasets/images/china.jpg", "vertical"),
    "flower": Photograph("sklearn", "datasets/images/flower.jpg", "radial"),
    "grace_hopper": Photograph("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "radial"),
    "camera": Photograph("skimage", "data/camera.png", "vertical"),
}

# Camera motion, per video. Speeds are in output pixels per frame so that motion looks alike at any size.
PAN_SPEED = (0.4, 1.5)
ZOOM_TOTAL = 0.12  # at most 12% zoom in or out over the video
ROTATION_MAX_DEG = 2.0  # start and end angle within +-2 degrees
COVERAGE = (0.55, 0.8)  # the frame covers this share of the largest crop that fits the photograph
PARALLAX_SPEED = (0.05, 0.2)  # extra shift of the nearest point relative to the farthest, px per frame


def _package_dir(package: str) -> Path | None:
    spec = util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _photo_path(name: str, file: str | None = None) -> Path | None:
    photo = PHOTOGRAPHS[name]
    root = _package_dir(photo.package)
    if root is None:
        return None
    path = root / (file or photo.file)
    return path if path.is_file() else None


def available_photographs() -> list[str]:
    """Names of the photographs present in the installed packages (nothing is downloaded), in a fixed order."""
    names = []
    for name, photo in PHOTOGRAPHS.items():
        if _photo_path(name) is None:
            continue
        if photo.disparity is not None and _photo_path(name, photo.disparity) is None:
            continue
        names.append(name)
    return names


@functools.lru_cache(maxsize=16)
def _load(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    if name not in PHOTOGRAPHS or _photo_path(name) is None:
        raise DataError(
            f"photograph '{name}' is not available; the installed packages ship: {', '.join(available_photographs())}"
        )
    path = _photo_path(name)
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    depth = None
    disparity_file = PHOTOGRAPHS[name].disparity
    if disparity_file is not None:
        with np.load(_photo_path(name, disparity_file)) as archive:
            depth = depth_from_disparity(archive["arr_0"])
    rgb.setflags(write=False)
    if depth is not None:
        depth.setflags(write=False)
    return rgb, depth


def load_photograph(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The photograph as float32 RGB (H, W, 3) in [0, 1], and its real depth (H, W) in [0, 1] (larger is
    farther) where the package ships one, else None. The arrays are cached and read-only."""
    return _load(name)


def depth_from_disparity(disparity: np.ndarray) -> np.ndarray:
    """Normalised depth in [0, 1] from a stereo disparity map (depth = focal * baseline / disparity).

    Pixels without ground truth (inf or nan, mostly occlusions) take the value of the nearest valid pixel.
    The depth is linear in metres, so haze with t = exp(-beta d) stays physical, and spans [0, 1] between the
    1st and 99th percentile of the scene.
    """
    disparity = np.asarray(disparity, dtype=np.float64)
    valid = np.isfinite(disparity) & (disparity > 0)
    if not valid.any():
        raise DataError("disparity map has no valid pixel")
    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    metric = 1.0 / disparity[rows, cols]
    near, far = np.percentile(metric, [1, 99])
    return np.clip((metric - near) / (far - near), 0.0, 1.0).astype(np.float32)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (ECCV 2010): `source` smoothed so that its edges follow `guide`'s (both 2-D)."""
    size = 2 * radius + 1

    def box(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=size, mode="reflect")

    mean_g, mean_s = box(guide), box(source)
    cov = box(guide * source) - mean_g * mean_s
    var = box(guide * guide) - mean_g * mean_g
    a = cov / (var + eps)
    b = mean_s - a * mean_g
    return box(a) * guide + box(b)


def prior_depth(image: np.ndarray, kind: DepthPrior) -> np.ndarray:
    """A depth prior in [0, 1] for a photograph without depth: farther towards the top ('vertical') or away
    from the centre ('radial'), made to follow the image's edges by a guided filter and softened (sigma 2 px).
    """
    height, width = image.shape[:2]
    rows = np.linspace(1.0, 0.0, height)[:, None]
    if kind == "vertical":
        ramp = np.broadcast_to(rows, (height, width))
    else:
        y = np.linspace(-1.0, 1.0, height)[:, None] * (height / max(height, width))
        x = np.linspace(-1.0, 1.0, width)[None, :] * (width / max(height, width))
        ramp = np.sqrt(y**2 + x**2)
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    depth = guided_filter(grey, np.asarray(ramp, dtype=np.float64), max(4, min(height, width) // 12), 1e-3)
    depth = ndimage.gaussian_filter(depth, 2.0)
    depth -= depth.min()
    return (depth / max(depth.max(), 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def photograph_depth(name: str) -> np.ndarray:
    """The photograph's real depth where known, else its prior; (H, W) float32 in [0, 1], cached, read-only."""
    image, depth = _load(name)
    if depth is None:
        depth = prior_depth(image, PHOTOGRAPHS[name].prior)
        depth.setflags(write=False)
    return depth


@dataclass(frozen=True)
class CameraPath:
    """Where each output frame looks at in the photograph: a crop centred at `centre` (y, x photograph px),
    `scale` photograph px per output px, rotated by `angle` (radians), and a lateral `parallax` shift (output
    px) of the nearest point relative to the farthest; all per frame."""

    centre: np.ndarray  # (T, 2)
    scale: np.ndarray  # (T,)
    angle: np.ndarray  # (T,)
    parallax: np.ndarray  # (T,)


def camera_path(
    photo_size: tuple[int, int],
    n_frames: int,
    size: tuple[int, int],
    rng: np.random.Generator,
    parallax: bool = False,
) -> CameraPath:
    """A smooth camera path (pan along a gently curved line, zoom, slight rotation) that keeps every rotated,
    zoomed crop inside the photograph."""
    photo_h, photo_w = photo_size
    out_h, out_w = size
    u = np.linspace(0.0, 1.0, n_frames)

    scale_fit = min(photo_h / out_h, photo_w / out_w)
    zoom = np.exp(rng.uniform(-1.0, 1.0) * np.log1p(ZOOM_TOTAL) * u)
    angle = np.deg2rad(rng.uniform(-ROTATION_MAX_DEG, ROTATION_MAX_DEG, size=2))
    angle = angle[0] + (angle[1] - angle[0]) * u
    # The largest rotated crop along the path must fit: shrink the base scale until it does.
    cos, sin = np.abs(np.cos(angle)).max(), np.abs(np.sin(angle)).max()
    extent_h = (out_h * cos + out_w * sin) * zoom.max()
    extent_w = (out_w * cos + out_h * sin) * zoom.max()
    fit = min(photo_h / extent_h, photo_w / extent_w)
    base = min(scale_fit * rng.uniform(*COVERAGE), fit * 0.98)
    scale = base * zoom
    room = np.array([photo_h - base * extent_h, photo_w - base * extent_w]) / 2.0

    speed = rng.uniform(*PAN_SPEED) * base
    heading = rng.uniform(0.0, 2.0 * np.pi)
    direction = np.array([np.sin(heading), np.cos(heading)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-0.15, 0.15) * speed * (n_frames - 1)
    offset = np.outer(u * speed * (n_frames - 1), direction) + np.outer(np.sin(np.pi * u) * bend, normal)  # (T, 2)
    offset -= (offset.max(axis=0) + offset.min(axis=0)) / 2.0
    span = (offset.max(axis=0) - offset.min(axis=0)) / 2.0
    shrink = min(1.0, *(room / np.maximum(span, 1e-9)))
    offset *= shrink
    slack = np.maximum(room - span * shrink, 0.0)  # >= 0 exactly: rounding left -1e-13 when the pan fills the room
    centre = np.array([photo_h, photo_w]) / 2.0 + rng.uniform(-slack, slack) + offset

    shift = np.zeros(n_frames)
    if parallax:
        shift = rng.choice([-1.0, 1.0]) * rng.uniform(*PARALLAX_SPEED) * (n_frames - 1) * (u - 0.5)
    return CameraPath(centre, scale, angle, shift)


def sample_coordinates(path: CameraPath, size: tuple[int, int], nearness: np.ndarray | None) -> np.ndarray:
    """Photograph coordinates (2, T, H, W) seen by each output pixel along the path. `nearness` (photograph
    sized, 1 = nearest) adds parallax: near points shift by `path.parallax` relative to far ones."""
    out_h, out_w = size
    grid_y = np.arange(out_h, dtype=np.float64) - (out_h - 1) / 2.0
    grid_x = np.arange(out_w, dtype=np.float64) - (out_w - 1) / 2.0
    cos = (np.cos(path.angle) * path.scale)[:, None, None]
    sin = (np.sin(path.angle) * path.scale)[:, None, None]
    ys = path.centre[:, 0, None, None] + cos * grid_y[:, None] - sin * grid_x[None, :]  # (T, H, W)
    xs = path.centre[:, 1, None, None] + sin * grid_y[:, None] + cos * grid_x[None, :]
    if nearness is not None:
        near = ndimage.map_coordinates(nearness, [ys.ravel(), xs.ravel()], order=1, mode="nearest")
        shift = path.parallax[:, None, None] * near.reshape(ys.shape)  # output px along the frame's x axis
        ys = ys - sin * shift
        xs = xs - cos * shift
    return np.stack([ys, xs])


def render_clean_video(
    name: str, n_frames: int, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A clean video (T, H, W, 3) float32 in [0, 1] of a camera moving over photograph `name`, and its depth
    (T, H, W) float32 in [0, 1] (larger is farther) warped by the same path. Same generator state, same bytes.
    """
    if n_frames < 1:
        raise DataError(f"photograph '{name}': n_frames must be >= 1, got {n_frames}")
    image, real_depth = load_photograph(name)
    depth = photograph_depth(name)
    path = camera_path(image.shape[:2], n_frames, size, rng, parallax=real_depth is not None)

    # Downscale once with anti-aliasing so that the per-frame warp never skips pixels.
    factor = min(1.0, 1.0 / float(path.scale.min()))
    if factor < 1.0:
        image = rescale(image, factor, order=1, anti_aliasing=True, channel_axis=-1, preserve_range=True)
        depth = rescale(depth, factor, order=1, anti_aliasing=True, preserve_range=True)
        path = CameraPath(path.centre * factor, path.scale * factor, path.angle, path.parallax)
    image = np.asarray(image, dtype=np.float32)
    depth = np.asarray(depth, dtype=np.float32)

    coords = sample_coordinates(path, size, 1.0 - depth if real_depth is not None else None)
    flat = coords.reshape(2, -1)
    # Cubic spline for the frames (a bilinear warp blurs differently at each sub-pixel phase, which flickers).
    channels = [ndimage.map_coordinates(image[..., c], flat, order=3, mode="reflect") for c in range(image.shape[-1])]
    frames = np.stack(channels, axis=-1).reshape(n_frames, *size, 3)
    depth_video = ndimage.map_coordinates(depth, flat, order=1, mode="nearest").reshape(n_frames, *size)
    return np.clip(frames, 0.0, 1.0, dtype=np.float32), np.clip(depth_video, 0.0, 1.0, dtype=np.float32)
