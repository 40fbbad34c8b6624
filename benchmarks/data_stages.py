"""Wall time of the data stages (assemble, split) and the input PSNR per weather and split of what they make.

    python benchmarks/data_stages.py [--params params.yaml] [--workers 1 0] [--out reports/bench/data_stages.json]

Runs the real stage functions on the params' data section into a temporary folder, once per worker count (0 = all
cores, the default of params.yaml). Frames are degraded/clean pairs: assemble renders and writes them, split copies
them into clips. Input PSNR is the degraded input against its ground truth as `evaluate` reports it for the
untouched input: the project's PSNR per frame, averaged per clip, then over the clips of a weather.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from weather_restore.config import load_params
from weather_restore.data.assemble import assemble, worker_count
from weather_restore.data.clips import SPLITS, Clip, load_clip, write_clips
from weather_restore.data.records import WEATHERS
from weather_restore.metrics import psnr
from weather_restore.progress import show_progress


def input_psnr(root: Path, clips: list[Clip]) -> dict[str, dict[str, float]]:
    """Mean input PSNR (dB) of the clips of each split and weather."""
    per_clip: dict[tuple[str, str], list[float]] = {}
    for clip in clips:
        degraded, clean = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in load_clip(root, clip))
        per_clip.setdefault((clip.split, clip.weather), []).append(psnr(degraded, clean).mean().item())
    return {split: {w: sum(v) / len(v) for w in WEATHERS if (v := per_clip.get((split, w)))} for split in SPLITS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 0], help="process counts; 0 = all cores")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/data_stages.json"))
    args = parser.parse_args()
    show_progress(False)
    data = load_params(args.params).data
    cores = os.cpu_count() or 1
    rows = []
    quality: dict[str, dict[str, float]] = {}
    for workers in sorted({worker_count(w) for w in args.workers}):
        cfg = data.model_copy(update={"workers": workers})
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            records = assemble(cfg, Path(tmp) / "videos")
            assemble_s = time.perf_counter() - start
            start = time.perf_counter()
            clips = write_clips(records, cfg.clips, Path(tmp) / "mwvd", workers)
            split_s = time.perf_counter() - start
            quality = quality or input_psnr(Path(tmp) / "mwvd", clips)
        video_frames = sum(r.n_frames for r in records)
        clip_frames = sum(c.stop - c.start for c in clips)
        rows.append(
            {
                "workers": workers,
                "assemble_s": assemble_s,
                "assemble_fps": video_frames / assemble_s,
                "split_s": split_s,
                "split_fps": clip_frames / split_s,
                "video_frames": video_frames,
                "clip_frames": clip_frames,
            }
        )
    print(f"{'workers':>7} {'assemble s':>10} {'frames/s':>9} {'split s':>8} {'frames/s':>9}")
    for row in rows:
        print(
            f"{row['workers']:>7} {row['assemble_s']:10.2f} {row['assemble_fps']:9.1f} "
            f"{row['split_s']:8.2f} {row['split_fps']:9.1f}"
        )
    print(f"input PSNR (dB) {' '.join(f'{w:>6}' for w in WEATHERS)}")
    for split, by_weather in quality.items():
        print(f"{split:>15} " + " ".join(f"{by_weather.get(w, float('nan')):6.2f}" for w in WEATHERS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "cpus": cores,
        "frame_size": list(data.synthetic.frame_size),
        "results": rows,
        "input_psnr_db": quality,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
