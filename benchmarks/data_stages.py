"""Wall time and frames per second of the data stages (assemble, split) with one process and with all cores.

    python benchmarks/data_stages.py [--params params.yaml] [--out reports/bench/data_stages.json]

Runs the real stage functions on the params' data section into a temporary folder. Frames are degraded/clean
pairs: assemble renders and writes them, split copies them into clips.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from weather_restore.config import load_params
from weather_restore.data.assemble import assemble
from weather_restore.data.clips import write_clips
from weather_restore.progress import show_progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench/data_stages.json"))
    args = parser.parse_args()
    show_progress(False)
    data = load_params(args.params).data
    cores = os.cpu_count() or 1
    rows = []
    for workers in sorted({1, cores}):
        cfg = data.model_copy(update={"workers": workers})
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            records = assemble(cfg, Path(tmp) / "videos")
            assemble_s = time.perf_counter() - start
            start = time.perf_counter()
            clips = write_clips(records, cfg.clips, Path(tmp) / "mwvd", workers)
            split_s = time.perf_counter() - start
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"cpus": cores, "frame_size": list(data.synthetic.frame_size), "results": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
