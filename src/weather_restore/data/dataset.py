"""Torch datasets over the MWVD clips of the manifest, and the endless sampler that feeds training.

Randomness (which clip, which frames, crop, flip, rotation) comes from the sample's key, never from a worker's
global state: `TrainingSampler` yields keys `(index, draw)` where `draw` seeds the sample's own generator. So a
run's data depend on its seed and iteration alone, whatever the number of loader workers, processes or restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from weather_restore.data.clips import MANIFEST_NAME, Clip, read_manifest
from weather_restore.data.frames import read_frame
from weather_restore.data.records import WEATHERS, Split
from weather_restore.errors import DataError

Key = int | tuple[int, tuple[int, ...]]
"""A dataset key: a plain index, or `(index, draw)` where `draw` is the entropy of the sample's random choices."""


def load_clips(root: Path, split: Split) -> tuple[str, list[Clip]]:
    """(manifest checksum, clips of one split) of an MWVD tree; a missing tree names the commands that make it."""
    root = Path(root)
    if not (root / MANIFEST_NAME).is_file():
        raise DataError(
            f"{root}: no MWVD data ({MANIFEST_NAME} missing); make it with "
            "`weather-restore assemble && weather-restore split` (or `dvc repro split`)"
        )
    checksum, clips = read_manifest(root)
    chosen = [clip for clip in clips if clip.split == split]
    if not chosen:
        raise DataError(
            f"{root / MANIFEST_NAME}: lists no {split} clips; rerun `weather-restore split` (or `dvc repro split`), "
            f"which writes train, val and test"
        )
    return checksum, chosen


def dihedral(frames: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 flips/90-degree rotations of (..., H, W, C) frames: rotate `transform % 4` quarter turns,
    then flip left-right when `transform >= 4`."""
    out = np.rot90(frames, k=transform % 4, axes=(-3, -2))
    if transform >= 4:
        out = out[..., ::-1, :]
    return out


def _split_key(key: Key) -> tuple[int, np.random.Generator | None]:
    if isinstance(key, tuple):
        index, draw = key
        return int(index), np.random.default_rng(list(draw))
    return int(key), None


class _MWVDDataset(Dataset):
    """Shared reading, cropping and augmentation of the clips of one split."""

    def __init__(self, root: Path, split: Split, crop: int | None, augment: bool):
        self.root = Path(root)
        self.split = split
        self.crop = crop
        self.augment = augment
        self.checksum, self.clips = load_clips(self.root, split)

    def _frames(self, clip: Clip, kind: str, indices: range | list[int]) -> np.ndarray:
        folder = self.root / clip.split / kind / clip.id
        return np.stack([read_frame(folder / f"{i:04d}.png") for i in indices])  # (T, H, W, 3)

    def _pair(self, clip: Clip, indices: range | list[int], rng: np.random.Generator | None) -> dict[str, Any]:
        degraded = self._frames(clip, "input", indices)
        clean = self._frames(clip, "gt", indices)
        if degraded.shape != clean.shape:
            raise DataError(
                f"{self.root / clip.split}/{{input,gt}}/{clip.id}: input frames are {degraded.shape[1:3]}, "
                f"ground truth {clean.shape[1:3]}"
            )
        height, width = degraded.shape[1:3]
        if self.crop is not None:
            if self.crop > min(height, width):
                raise DataError(
                    f"{self.root / clip.split}/input/{clip.id}: frames are {width}x{height}, smaller than the "
                    f"crop {self.crop}; lower training.*.crop"
                )
            if rng is None:
                top, left = (height - self.crop) // 2, (width - self.crop) // 2
            else:
                top, left = int(rng.integers(height - self.crop + 1)), int(rng.integers(width - self.crop + 1))
            degraded = degraded[:, top : top + self.crop, left : left + self.crop]
            clean = clean[:, top : top + self.crop, left : left + self.crop]
        if self.augment and rng is not None:
            transform = int(rng.integers(8))
            degraded, clean = dihedral(degraded, transform), dihedral(clean, transform)
        return {
            "degraded": torch.from_numpy(np.ascontiguousarray(degraded.transpose(0, 3, 1, 2))),  # (T, 3, H, W)
            "clean": torch.from_numpy(np.ascontiguousarray(clean.transpose(0, 3, 1, 2))),
            "weather": clip.weather,
            "clip_id": clip.id,
        }


class ClipDataset(_MWVDDataset):
    """Clips for DynStaticNet: `{"degraded", "clean": (T, 3, H, W), "weather", "clip_id"}`.

    With `augment`, a key `(index, draw)` picks a random window of `frames` consecutive frames, a random crop and
    one of the 8 flips/rotations, the same for every frame and for input and ground truth. Without a draw (a plain
    index) the window starts at the first frame and the crop is centred.
    """

    def __init__(
        self,
        root: Path,
        split: Split = "train",
        frames: int | None = None,
        crop: int | None = None,
        augment: bool = True,
    ):
        super().__init__(root, split, crop, augment)
        self.frames = frames
        shortest = min(self.clips, key=lambda c: c.stop - c.start)
        if frames is not None and frames > shortest.stop - shortest.start:
            raise DataError(
                f"{self.root}: clip {shortest.id} has {shortest.stop - shortest.start} frames, fewer than the "
                f"{frames} asked (training.*.clip_frames / val_frames)"
            )

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, rng = _split_key(key)
        clip = self.clips[index]
        length = clip.stop - clip.start
        frames = self.frames or length
        start = int(rng.integers(length - frames + 1)) if rng is not None and self.augment else 0
        return self._pair(clip, range(start, start + frames), rng)


class FrameDataset(_MWVDDataset):
    """Single frames of the same clips for DwGN: `{"degraded", "clean": (3, H, W), "weather", "clip_id",
    "frame"}`; one item per frame of every clip, so an epoch sees each frame once."""

    def __init__(self, root: Path, split: Split = "train", crop: int | None = None, augment: bool = True):
        super().__init__(root, split, crop, augment)
        self.items = [(c, f) for c, clip in enumerate(self.clips) for f in range(clip.stop - clip.start)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, rng = _split_key(key)
        clip_index, frame = self.items[index]
        sample = self._pair(self.clips[clip_index], [frame], rng)
        sample["degraded"], sample["clean"] = sample["degraded"][0], sample["clean"][0]
        sample["frame"] = frame
        return sample


def spread_over_weathers(clips: list[Clip], count: int) -> list[int]:
    """Indices of up to `count` clips taken in turn from each weather (sorted by id), for a small validation set
    that sees every weather."""
    by_weather = {
        w: sorted((i for i, c in enumerate(clips) if c.weather == w), key=lambda i: clips[i].id) for w in WEATHERS
    }
    chosen: list[int] = []
    rank = 0
    while len(chosen) < min(count, len(clips)):
        for weather in WEATHERS:
            if rank < len(by_weather[weather]) and len(chosen) < count:
                chosen.append(by_weather[weather][rank])
        rank += 1
    return chosen


class TrainingSampler(Sampler[tuple[int, tuple[int, ...]]]):
    """Endless keys for training: sample `n` of the run (counted over all processes) is position `n % size` of
    the permutation of epoch `n // size`, with draw `(seed, n)`.

    Each of `world_size` processes takes its contiguous share of every global batch, so N processes see exactly
    the batches one process would. Starting at `start_iteration` reproduces an uninterrupted run's data.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_iteration: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not divide among {world_size} processes")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.rank = rank
        self.world_size = world_size
        self._epoch = -1
        self._order = np.arange(size)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        share = self.batch_size // self.world_size
        iteration = self.start_iteration
        while True:
            for j in range(self.rank * share, (self.rank + 1) * share):
                n = iteration * self.batch_size + j
                epoch, position = divmod(n, self.size)
                yield int(self._permutation(epoch)[position]), (self.seed, n)
            iteration += 1
