"""Run any of the models: one door for evaluation, export checks and restoration.

`restore_clip` restores a clip that fits in memory (evaluation, validation). For footage of any length and size,
`load_restorer` loads any kind of model (PyTorch checkpoint, ONNX file, MLflow registry URI of an ONNX model) and
`restore_frames` streams frames through it: DynStaticNet over overlapping 10-frame windows blended over time, DwGN
frame by frame, both over overlapping tiles blended in space.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from weather_restore.errors import ConfigError, ModelFileError
from weather_restore.models.facts import MODEL_NAMES, MODELS, by_rank, model_facts


@torch.no_grad()
def restore_clip(model: nn.Module, model_name: str, degraded: torch.Tensor, frames_per_batch: int = 10) -> torch.Tensor:
    """Restore one clip (T, 3, H, W) in [0, 1]; returns (T, 3, H, W) clamped to [0, 1] on the input's device.

    The video model sees the whole clip at once; the image model sees its frames in batches.
    """
    if degraded.ndim != 4 or degraded.shape[1] != 3:
        raise ValueError(f"expected a clip (T, 3, H, W), got {tuple(degraded.shape)}")
    if model_facts(model_name).video:
        restored = model(degraded.unsqueeze(0)).squeeze(0)
    else:
        restored = torch.cat([model(chunk) for chunk in degraded.split(frames_per_batch)])
    return restored.clamp(0, 1)


# --- Restoring footage of any length and size -------------------------------------------------------------------
#
# A forward is a function from a float32 array in the model's own layout ([B, T, 3, H, W] for the video model,
# [B, 3, H, W] for the image model) to a restored array of the same shape: a PyTorch module and an ONNX Runtime
# session (from a file or from the registry) both become one.

Forward = Callable[[np.ndarray], np.ndarray]

WINDOW = 10  # DynStaticNet is trained on 10-frame clips (MWVD)
WINDOW_STRIDE = WINDOW // 2
TILE = 256
TILE_OVERLAP = 32


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to restore: its name (which says the input layout), backend, forward and where it came from."""

    name: str
    backend: str  # "pytorch" or "onnxruntime"
    forward: Forward
    source: str

    @property
    def video(self) -> bool:
        return model_facts(self.name).video


def temporal_weights(window: int = WINDOW, stride: int = WINDOW_STRIDE) -> np.ndarray:
    """Blending weights over the frames of a window: sin^2 at half-frame offsets.

    With stride = window / 2 the weights of the two windows that cover a frame sum to exactly 1 (sin^2 + cos^2),
    and a window's edge frames, which see the least temporal context, count the least.
    """
    if not 0 < stride <= window:
        raise ConfigError(f"window stride must be in 1..{window}, got {stride}")
    return (np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2).astype(np.float32)


def window_starts(count: int, window: int = WINDOW, stride: int = WINDOW_STRIDE) -> list[int]:
    """First (virtual) frame of every window over `count` frames. The first starts before frame 0 so that frame 0
    sits where later frames sit: covered by window/stride windows, the frames before it mirrored in."""
    return list(range(stride - window, count, stride)) if count > 0 else []


def mirror_index(index: int, count: int | None) -> int:
    """Frame index `index` reflected into 0..count-1 (a b c b a b ...); count None: only the start is known."""
    if count is None:
        return abs(index)
    period = 2 * count - 2
    if period <= 0:
        return 0
    index %= period
    return min(index, period - index)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: every tile - overlap pixels, the last one flush with the edge."""
    if tile <= 0 or size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def edge_ramp(length: int, overlap: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    """1-D tile weight: 1 inside; on a side that another tile overlaps, 0 over the outer quarter of the overlap
    (where the tile's convolutions saw its cut edge instead of the picture), then a sin^2 ramp over the middle
    half. Facing ramps of two neighbours sum to exactly 1, and every pixel keeps some tile's nonzero weight."""
    weight = np.ones(length, dtype=np.float32)
    guard = overlap // 4
    blend = overlap - 2 * guard
    ramp = np.zeros(overlap, dtype=np.float32)
    ramp[guard : guard + blend] = np.sin(0.5 * np.pi * (np.arange(blend) + 0.5) / max(blend, 1)) ** 2
    ramp[guard + blend :] = 1
    if fade_in and overlap:
        weight[:overlap] = ramp
    if fade_out and overlap:
        weight[length - overlap :] = np.minimum(weight[length - overlap :], ramp[::-1])
    return weight


def check_tiling(tile: int, overlap: int) -> None:
    """Each tile's two ramps must fit in it; tile <= 0 means no tiling."""
    if tile > 0 and not 0 <= 2 * overlap <= tile:
        raise ConfigError(f"tile overlap must be between 0 and half the tile ({tile // 2}), got {overlap}")


def tiled_forward(forward: Forward, x: np.ndarray, tile: int = TILE, overlap: int = TILE_OVERLAP) -> np.ndarray:
    """Restore x (..., 3, H, W) tile by tile (tile x tile pixels, overlapping by `overlap`) and blend the tiles;
    tile <= 0 or a frame that fits in one tile: one forward. Memory is bounded by the tile, not the frame."""
    check_tiling(tile, overlap)
    height, width = x.shape[-2:]
    if tile <= 0 or (height <= tile and width <= tile):
        return forward(x)
    restored = np.zeros(x.shape, dtype=np.float32)
    total = np.zeros((height, width), dtype=np.float32)
    tile_h, tile_w = min(tile, height), min(tile, width)
    for top in tile_starts(height, tile, overlap):
        rows = edge_ramp(tile_h, overlap, top > 0, top + tile_h < height)
        for left in tile_starts(width, tile, overlap):
            cols = edge_ramp(tile_w, overlap, left > 0, left + tile_w < width)
            weight = rows[:, None] * cols[None, :]  # (h, w)
            window = (..., slice(top, top + tile_h), slice(left, left + tile_w))
            restored[window] += forward(np.ascontiguousarray(x[window])) * weight
            total[window] += weight
    restored /= total
    return restored


def to_model_frames(frames: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB frames (H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    return rearrange(np.stack(frames), "n h w c -> n c h w").astype(np.float32) / np.float32(255)


def to_uint8_frame(frame: np.ndarray) -> np.ndarray:
    """float32 (3, H, W) in [0, 1] -> uint8 RGB (H, W, 3), rounded."""
    return np.clip(np.rint(rearrange(frame, "c h w -> h w c") * 255), 0, 255).astype(np.uint8)


def restore_frames(
    frames: Iterable[np.ndarray],
    model: LoadedModel,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
    stride: int = WINDOW_STRIDE,
) -> Iterator[np.ndarray]:
    """Restore a stream of uint8 RGB frames (H, W, 3), yielding each restored frame once, in order, as soon as no
    later window touches it. The video model sees sliding windows; the image model sees one frame at a time."""
    if model.video:
        yield from _restore_windows(frames, model.forward, tile, overlap, stride)
        return
    for frame in frames:
        yield to_uint8_frame(tiled_forward(model.forward, to_model_frames([frame]), tile, overlap)[0])


def _restore_windows(
    frames: Iterable[np.ndarray], forward: Forward, tile: int, overlap: int, stride: int, window: int = WINDOW
) -> Iterator[np.ndarray]:
    """Sliding windows of `window` frames every `stride` frames, blended by `temporal_weights`.

    Only about two windows of input frames and one window of partial sums are held, whatever the length. The
    length is learnt when the source runs out; until then only the start is mirrored.
    """
    weights = temporal_weights(window, stride)
    source = iter(frames)
    buffer: dict[int, np.ndarray] = {}  # input frames by index
    sums: dict[int, np.ndarray] = {}  # weighted restorations of frames not yet written
    totals: dict[int, float] = {}
    count: int | None = None
    read, start, next_out = 0, stride - window, 0
    while True:
        needed = max(start + window - 1, -start)  # the window's last frame, or the mirror of its first
        while count is None and read <= needed:
            try:
                buffer[read] = next(source)
                read += 1
            except StopIteration:
                count = read
        if count == 0 or (count is not None and start >= count):
            return
        indices = [mirror_index(i, count) for i in range(start, start + window)]
        clip = to_model_frames([buffer[i] for i in indices])[None]  # (1, T, 3, H, W)
        restored = tiled_forward(forward, clip, tile, overlap)[0]
        for position, index in enumerate(range(start, start + window)):
            if index >= 0 and (count is None or index < count):
                sums[index] = sums.get(index, 0) + weights[position] * restored[position]
                totals[index] = totals.get(index, 0.0) + float(weights[position])
        start += stride
        while next_out < start and next_out in sums:  # no later window touches frames before `start`
            yield to_uint8_frame(sums.pop(next_out) / totals.pop(next_out))
            next_out += 1
        # A later window needs frames from start - window + 1 on (the mirror at the end reaches back that far).
        for index in [i for i in buffer if i <= start - window]:
            del buffer[index]


# --- Loading any model kind ------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and CUDA present when asked for: said before any model file is read."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ConfigError(f"--device {device}: not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def load_restorer(
    model: str,
    checkpoint: Path | None = None,
    device: str = "cpu",
    tracking_uri: str | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """A model from what a user names: a `.pt` checkpoint, an `.onnx` file written by `weather-restore export`, a
    model name with a checkpoint or ONNX file (which must hold that model), or a registry URI
    `models:/DynStaticNet@champion` (an ONNX version, run by ONNX Runtime; other formats are refused unloaded).

    threads: ONNX Runtime's CPU threads (None: one per core); PyTorch's are process-wide (torch.set_num_threads).
    """
    check_device(device)
    if model.startswith(("models:/", "runs:/")):
        if checkpoint is not None:
            raise ConfigError(f"{model} is a registry URI: it takes no --checkpoint")
        return load_registered(model, tracking_uri, None, device, threads)
    if Path(model).suffix.lower() in (".pt", ".pth", ".onnx"):
        if checkpoint is not None:
            raise ConfigError(f"give a model file ({model}) or a model name with --checkpoint, not both")
        return _load_file(Path(model), None, device, threads)
    name = model.lower()
    if name not in MODEL_NAMES:
        raise ConfigError(
            f"unknown model '{model}': give a model name ({', '.join(MODEL_NAMES)}) with --checkpoint, "
            "a .pt or .onnx file, or a registry URI such as models:/DynStaticNet@champion"
        )
    if checkpoint is None:
        raise ConfigError(f"--model {model} needs --checkpoint PATH (a .pt checkpoint or an .onnx file)")
    return _load_file(Path(checkpoint), name, device, threads)


def _check_name(source: object, found: str, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise ModelFileError(
            f"{source}: holds a {model_facts(found).display_name} model, not {model_facts(expected).display_name} "
            f"(use --model {found}, or a {expected} model file)"
        )


def _load_file(path: Path, expected: str | None, device: str, threads: int | None) -> LoadedModel:
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, expected, device, threads)
    return _load_checkpoint(path, expected, device)


def _load_checkpoint(path: Path, expected: str | None, device: str) -> LoadedModel:
    from weather_restore.checkpoint import load_checkpoint
    from weather_restore.models import build_model

    state = load_checkpoint(path, map_location=device)
    name = str(state.get("model_name", "")).lower()
    if name not in MODEL_NAMES:
        raise ModelFileError(f"{path}: names no known model (model_name {state.get('model_name')!r})")
    _check_name(path, name, expected)
    try:
        module = build_model(name, **state["model_config"])
        module.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as error:
        display = model_facts(name).display_name
        raise ModelFileError(f"{path}: its weights do not fit a {display} model ({error})") from None
    module = module.to(device).eval()

    @torch.inference_mode()
    def forward(x: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return LoadedModel(name, "pytorch", forward, str(path))


def _load_onnx(
    path: Path, expected: str | None, device: str, threads: int | None, source: str | None = None
) -> LoadedModel:
    """An ONNX file that `weather-restore export` wrote: it says which model it is (metadata `model_name`, and
    the `exporter`), and its input's rank agrees. `source` names it in messages (default: the path)."""
    import onnxruntime as ort

    source = source or str(path)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    # The CPU arena keeps every block it ever allocated: 7.1 GiB after two DynStaticNet windows of 256 x 256
    # against 3.5 GiB without it (and without preplanned memory patterns), at the same speed.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own classes for protobuf, graph and type errors
        raise ModelFileError(f"{source}: not a loadable ONNX model ({error})") from None
    (first, *_) = session.get_inputs()
    facts = by_rank(len(first.shape))
    if facts is None:
        layouts = " nor ".join(f"{known.shape_text} ({known.display_name})" for known in MODELS.values())
        raise ModelFileError(f"{source}: takes a {len(first.shape)}-D input {first.shape}, neither {layouts}")
    metadata = session.get_modelmeta().custom_metadata_map
    declared = metadata.get("model_name", "").lower()
    if declared not in MODEL_NAMES or not metadata.get("exporter"):
        raise ModelFileError(
            f"{source}: not an ONNX model of weather-restore (no model_name and exporter in its metadata, which "
            "`weather-restore export` writes); export the checkpoint with `weather-restore export --model NAME`"
        )
    if declared != facts.name:
        raise ModelFileError(f"{source}: metadata says {declared}, but its input {first.shape} is {facts.name}'s")
    _check_name(source, facts.name, expected)

    def forward(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {first.name: x})[0]
        except Exception as error:  # e.g. a graph exported with a size baked in, given another size
            raise ModelFileError(f"{source}: ONNX Runtime failed on an input of shape {x.shape} ({error})") from None

    return LoadedModel(facts.name, "onnxruntime", forward, source)


def load_registered(
    uri: str, tracking_uri: str | None, expected: str | None = None, device: str = "cpu", threads: int | None = None
) -> LoadedModel:
    """models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/PATH of an ONNX model, run by ONNX Runtime like an
    .onnx file. Its MLmodel file is read first and anything but the onnx flavour is refused before any of it is
    loaded; a version registered as DynStaticNet or DwGN must hold that model, and `expected` too."""
    import mlflow

    from weather_restore.registry import fetch_onnx

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="weather-restore-") as folder:
        path, located = fetch_onnx(uri, tracking_uri, Path(folder), expected)
        # ONNX Runtime reads the whole graph when the session is made: the download can go afterwards.
        loaded = _load_onnx(path, expected or located.model, device, threads, source=located.label)
    if located.model is not None and loaded.name != located.model:
        raise ModelFileError(
            f"{located.label}: registered as {model_facts(located.model).registered_name} but holds a "
            f"{model_facts(loaded.name).display_name} model; register it under its own name"
        )
    return loaded


class OnnxModule(nn.Module):
    """A loaded ONNX model as a module, for code that takes one (evaluation): tensors in, tensors out on the
    input's device. It has no parameters PyTorch can see, and FLOP counters see none of its work."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.loaded = loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # shape-only passes (cost counting) learn the shape and nothing else
            return torch.empty_like(x)
        restored = self.loaded.forward(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return torch.from_numpy(restored).to(x.device)
