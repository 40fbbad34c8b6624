"""What `restore --precision bfloat16` costs and gains with trained models: test-split PSNR and forward time of each
model's checkpoint in float32 and in bfloat16, loaded by the loader `restore` uses.

Every test clip is restored whole (10 frames: DynStaticNet in one forward, DwGN as a batch of its frames) by both
precisions in turn, so the time ratio is measured in one run. PSNR is the project's, per frame, averaged per clip
and then over the clips, as `evaluate` averages its overall figure. Needs the default pipeline's outputs
(`dvc repro`: data/mwvd and models/<model>/best.pt).

Run: python benchmarks/precision.py [--data data/mwvd] [--models dynstaticnet dwgn] [--threads N]
(writes reports/bench/precision.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from weather_restore.data.clips import load_clip
from weather_restore.data.dataset import load_clips
from weather_restore.errors import WeatherRestoreError
from weather_restore.metrics import psnr
from weather_restore.model_loading import load_restorer
from weather_restore.models.facts import MODEL_NAMES, PRECISIONS, model_facts

OUTPUT = Path("reports/bench/precision.json")


def measure(name: str, checkpoint: Path, data: Path) -> list[dict[str, object]]:
    """One row per precision: mean test PSNR, per-clip PSNRs and the seconds the forwards took."""
    models = {precision: load_restorer(str(checkpoint), precision=precision) for precision in PRECISIONS}
    psnrs: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    seconds = dict.fromkeys(PRECISIONS, 0.0)
    _, clips = load_clips(data, "test")
    for clip in clips:
        degraded, clean = load_clip(data, clip)  # (T, H, W, 3) in [0, 1]
        frames = np.ascontiguousarray(degraded.transpose(0, 3, 1, 2), dtype=np.float32)
        batch = frames[None] if model_facts(name).video else frames
        target = torch.from_numpy(clean).permute(0, 3, 1, 2)
        for precision, model in models.items():
            started = time.perf_counter()
            restored = model.forward(batch)
            seconds[precision] += time.perf_counter() - started
            restored = torch.from_numpy(restored).reshape(target.shape).clamp(0, 1)
            psnrs[precision].append(psnr(restored, target).mean().item())
    reference = np.array(psnrs["float32"])
    return [
        {
            "model": name,
            "precision": precision,
            "checkpoint": str(checkpoint),
            "clips": len(clips),
            "psnr": float(np.mean(psnrs[precision])),
            "psnr_delta": float(np.mean(psnrs[precision]) - reference.mean()),
            "clip_delta_min": float((np.array(psnrs[precision]) - reference).min()),
            "clip_delta_max": float((np.array(psnrs[precision]) - reference).max()),
            "seconds": seconds[precision],
            "speedup": seconds["float32"] / seconds[precision],
            "clip_psnr": psnrs[precision],
        }
        for precision in PRECISIONS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/mwvd"), help="MWVD tree (default: data/mwvd)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core, as a user gets)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        checkpoint = Path("models") / name / "best.pt"
        print(f"{name}: {checkpoint} on {args.data} test ...", flush=True)
        try:
            rows += measure(name, checkpoint, args.data)
        except WeatherRestoreError as error:
            sys.exit(f"{error} (run `dvc repro` first)")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {load}")
    header = (
        f"{'model':<13} {'precision':<9} {'clips':>5} {'PSNR dB':>8} {'delta':>8} {'clip deltas':>17} {'s':>6} {'x':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        spread = f"{row['clip_delta_min']:+.4f}..{row['clip_delta_max']:+.4f}"
        print(
            f"{row['model']:<13} {row['precision']:<9} {row['clips']:>5} {row['psnr']:>8.4f} "
            f"{row['psnr_delta']:>+8.4f} "
            f"{spread:>17} {row['seconds']:>6.1f} {row['speedup']:>5.2f}"
        )
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "torch": torch.__version__,
        "native_bfloat16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "rows": rows,
    }
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
