"""Frames per second of the built-in generator: clean footage and each weather, in one process.

    python benchmarks/generate.py [--frames 30] [--repeats 3] [--out reports/bench/generate.json]

Each cell is the median over `repeats` videos (different photographs and seeds) of frames / seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from weather_restore.config import SyntheticConfig
from weather_restore.data.footage import available_photographs, render_clean_video
from weather_restore.data.weather import render_weather

SIZES = ((128, 128), (256, 256))
STAGES = ("clean", "haze", "rain", "snow")


def measure(size: tuple[int, int], frames: int, repeats: int) -> dict[str, float]:
    """Median frames per second of each stage at one frame size."""
    cfg = SyntheticConfig()
    photographs = available_photographs()
    seconds: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for repeat in range(repeats):
        rng = np.random.default_rng(repeat)
        start = time.perf_counter()
        clean, depth = render_clean_video(photographs[repeat % len(photographs)], frames, size, rng)
        seconds["clean"].append(time.perf_counter() - start)
        for weather in STAGES[1:]:
            start = time.perf_counter()
            render_weather(weather, clean, depth, cfg, rng)
            seconds[weather].append(time.perf_counter() - start)
    return {stage: frames / statistics.median(times) for stage, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("reports/bench/generate.json"))
    args = parser.parse_args()

    render_clean_video(available_photographs()[0], 2, (32, 32), np.random.default_rng(0))  # warm caches
    rows = {f"{h}x{w}": measure((h, w), args.frames, args.repeats) for h, w in SIZES}

    print(f"frames per second, {args.frames}-frame videos, median of {args.repeats}")
    print(f"{'size':>9} " + " ".join(f"{stage:>8}" for stage in STAGES) + "  clean+weather")
    for size, fps in rows.items():
        # A degraded video needs its clean footage and one weather: average over the three weathers.
        both = 1.0 / (1.0 / fps["clean"] + statistics.mean(1.0 / fps[w] for w in STAGES[1:]))
        fps["clean+weather"] = both
        print(f"{size:>9} " + " ".join(f"{fps[stage]:8.1f}" for stage in STAGES) + f"  {both:13.1f}")

    report = {
        "frames_per_video": args.frames,
        "repeats": args.repeats,
        "unit": "frames per second",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
