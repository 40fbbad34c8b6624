"""Reading and writing single frames: RGB float32 in [0, 1], natural frame ordering, atomic writes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from weather_restore.errors import DataError
from weather_restore.outputs import atomic_path

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders '2.jpg' before '10.jpg'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frames(folder: Path) -> list[Path]:
    """Image files of a folder in natural order; a missing folder is a DataError naming it."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    # Hidden files such as macOS's '._0001.jpg' carry image suffixes but are not images.
    frames = [
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")
    ]
    return sorted(frames, key=lambda p: natural_key(p.name))


def read_frame(path: Path) -> np.ndarray:
    """An image file as float32 RGB (H, W, 3) in [0, 1]; an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot read the frame ({error})") from None
    return rgb.astype(np.float32) / 255.0


def frame_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot read the frame ({error})") from None
    return height, width


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 with rounding (the inverse of read_frame up to quantisation)."""
    return np.clip(np.rint(np.asarray(frame, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_frame(path: Path, frame: np.ndarray) -> None:
    """Write a float [0, 1] or uint8 RGB frame as PNG, atomically (temporary sibling, then rename). The stages
    write frames inside an output folder that is itself a partial, so no sweep for dead writers per frame."""
    data = frame if frame.dtype == np.uint8 else to_uint8(frame)
    with atomic_path(path, sweep=False) as temporary:
        Image.fromarray(data).save(temporary, format="PNG")


def check_same_sizes(paths: Iterable[Path]) -> tuple[int, int]:
    """All frames share one size; else a DataError naming the first frame that differs."""
    size: tuple[int, int] | None = None
    first: Path | None = None
    for path in paths:
        current = frame_size(path)
        if size is None:
            size, first = current, path
        elif current != size:
            raise DataError(f"{path}: frame is {current[1]}x{current[0]}, but {first} is {size[1]}x{size[0]}")
    if size is None:
        raise DataError("no frames to check")
    return size
