"""The one progress-bar helper: tqdm on stderr, on unless the door that started the process turned it off (the CLI
does, from WEATHER_RESTORE_PROGRESS=0, for DVC's logs and CI)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_shown = True


def show_progress(enabled: bool) -> None:
    """Turn every progress bar of this process on or off."""
    global _shown
    _shown = enabled


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a progress bar (rate and time left), unless `show_progress(False)` was called."""
    from tqdm.auto import tqdm

    # Without a terminal (dvc repro logs, CI), print a line every 30 s instead of redrawing constantly.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    yield from tqdm(
        items, total=total, desc=desc, unit=unit, disable=not _shown, mininterval=interval, dynamic_ncols=True
    )
