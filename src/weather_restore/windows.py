"""Restore footage of any length and size with a loaded model: DynStaticNet over overlapping 10-frame windows
blended over time, DwGN frame by frame, both over overlapping tiles blended in space. Pure arithmetic on arrays
(the weights, the tile origins, the mirrored frame indices) and a streaming loop; no model is loaded here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from einops import rearrange

from weather_restore.errors import ConfigError

if TYPE_CHECKING:
    from weather_restore.model_loading import LoadedModel

# A forward is a function from a float32 array in the model's own layout ([B, T, 3, H, W] for the video model,
# [B, 3, H, W] for the image model) to a restored array of the same shape: a PyTorch module and an ONNX Runtime
# session (from a file or from the registry) both become one.

Forward = Callable[[np.ndarray], np.ndarray]

WINDOW = 10  # DynStaticNet is trained on 10-frame clips (MWVD)
WINDOW_STRIDE = WINDOW // 2
TILE = 256
TILE_OVERLAP = 32


def temporal_weights(window: int = WINDOW, stride: int = WINDOW_STRIDE) -> np.ndarray:
    """Blending weights over the frames of a window: sin^2 at half-frame offsets.

    With stride = window / 2 the weights of the two windows that cover a frame sum to exactly 1 (sin^2 + cos^2),
    and a window's edge frames, which see the least temporal context, count the least.
    """
    if not 0 < stride <= window:
        raise ConfigError(f"window stride must be in 1..{window}, got {stride}")
    return (np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2).astype(np.float32)


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
    model_frames = rearrange(np.stack(frames), "n h w c -> n c h w").astype(np.float32)
    model_frames /= np.float32(255)  # in place: a 10-frame 1080p window is 250 MB of float32
    return model_frames


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
