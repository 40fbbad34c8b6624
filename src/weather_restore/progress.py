"""The one progress-bar helper: tqdm on stderr, quiet when stderr is not a terminal and CI asks for it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a progress bar (rate and time left); `WEATHER_RESTORE_PROGRESS=0` turns it off."""
    disable = os.environ.get("WEATHER_RESTORE_PROGRESS", "1") == "0"
    # Without a terminal (dvc repro logs, CI), print a line every 10% instead of redrawing constantly.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    yield from tqdm(
        items, total=total, desc=desc, unit=unit, disable=disable, mininterval=interval, dynamic_ncols=True
    )
