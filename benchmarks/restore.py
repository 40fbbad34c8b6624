"""Restoration speed on this machine's CPU: frames per second and peak resident memory, for each model and
backend, at 256x256 and at 1920x1080.

The models have their default configs and random weights (seed 0): speed and memory do not depend on the weights.
Each measurement runs the real `restore` stage (PyAV decode, 10-frame windows, 256-pixel tiles overlapping by 32,
libx264 encode) on a synthetic video in a process of its own, so that its peak RSS (VmHWM: the model or ONNX
session, the frame buffers, the codecs) is its own.

A 1920x1080 frame is 45 tiles, minutes of CPU per frame here, so at that size the model runs for real on one
warm-up tile and on the first few tiles of the second pass (when every buffer of the pipeline is at its steady
size); the other tiles pass through unchanged. Everywhere, frames/s is the steady-state rate of a long video:
1 / (seconds per forward x forwards per frame + pipeline seconds per frame), where a forward is one tile of one
window (DynStaticNet: a window every 5 frames, so tiles / 5 forwards per frame) or of one frame (DwGN), its time
the median of the timed forwards (the warm-up one left out), and the pipeline's time is everything else
(decoding, windows, blending, encoding) measured over the whole run.

Backends: pytorch (float32), pytorch-bfloat16 (`restore --precision bfloat16`: the checkpoint under bfloat16
autocast) and onnxruntime. ONNX models are the graphs `weather-restore export` ships (its exporter and dynamic
axes, built by `export_onnx`), exported once and cached in the system's temporary folder.

On a machine shared with other work, --threads 1 avoids the stalls of threads spinning for a busy core.

Run: python benchmarks/restore.py [--threads N] [--quick]   (writes reports/bench/restore.json; --quick: 256x256)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

import weather_restore
from weather_restore import models
from weather_restore.checkpoint import save_checkpoint
from weather_restore.config import ExportConfig
from weather_restore.export import export_onnx
from weather_restore.model_loading import LoadedModel, load_restorer
from weather_restore.models import build_model
from weather_restore.models.facts import MODEL_NAMES, model_facts
from weather_restore.outputs import atomic_path
from weather_restore.progress import show_progress
from weather_restore.restore import restore
from weather_restore.windows import TILE, TILE_OVERLAP, WINDOW, WINDOW_STRIDE, tile_starts

OUTPUT = Path("reports/bench/restore.json")
CACHE = Path(tempfile.gettempdir()) / "weather-restore-bench"
SIZES = ((256, 256), (1080, 1920))
BACKENDS = ("pytorch", "pytorch-bfloat16", "onnxruntime")  # the second: `restore --precision bfloat16`
TIMED_TILES = 2  # real forwards at 1080p besides the warm-up one


def clip_frames(model: str, height: int) -> int:
    """Frames per run: DynStaticNet needs two windows before its first frame is out (three at 256 for a median)."""
    if model_facts(model).video:
        return 10 if height <= TILE else WINDOW_STRIDE
    return 4 if height <= TILE else 2


def forwards_per_frame(model: str, height: int, width: int) -> float:
    tiles = len(tile_starts(height, TILE, TILE_OVERLAP)) * len(tile_starts(width, TILE, TILE_OVERLAP))
    return tiles / WINDOW_STRIDE if model_facts(model).video else tiles


def onnx_file(model: str) -> Path:
    """The default-config model with seed-0 weights, as `export` ships it (the stage's exporter, opset and dynamic
    axes, through `export_onnx`), cached under a digest of the model and export code."""
    sources = [Path(weather_restore.__file__).parent / "export.py", *sorted(Path(models.__file__).parent.glob("*.py"))]
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in sources)).hexdigest()[:12]
    path = CACHE / f"{model}-shipped-{digest}-torch{torch.__version__}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        module = build_model(model).eval()
        # The shipped graph has dynamic batch, frames, height and width: a small example exports it.
        example = np.random.default_rng(0).random(model_facts(model).input_shape(1, 2, 64, 64), dtype=np.float32)
        print(f"exporting {model} to ONNX as the export stage does ...", flush=True)
        with atomic_path(path) as partial:
            seconds = export_onnx(module, model, example, partial, ExportConfig())
        print(f"  exported in {seconds:.0f} s", flush=True)
    return path


def write_video(path: Path, frames: int, height: int, width: int) -> None:
    """A smooth moving pattern with noise, H.264 at 25 fps."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for t in range(frames):
            pattern = np.stack([127 + 90 * np.sin((x + 3 * t) / (40 + 9 * c) + y / 60) for c in range(3)], axis=-1)
            frame = np.clip(pattern + rng.normal(0, 12, pattern.shape), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def measure(model_name: str, backend: str, height: int, width: int, threads: int | None) -> dict[str, object]:
    """One run of the stage in this process (called in a child process by `main`)."""
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    if threads:
        torch.set_num_threads(threads)
    if backend == "onnxruntime":
        model = load_restorer(str(onnx_file(model_name)), threads=threads)
    else:
        torch.manual_seed(0)
        module = build_model(model_name)
        checkpoint = work / "model.pt"
        save_checkpoint(checkpoint, {"model": module.state_dict(), "model_name": model_name, "model_config": {}})
        del module
        precision = "bfloat16" if backend == "pytorch-bfloat16" else "float32"
        model = load_restorer(str(checkpoint), threads=threads, precision=precision)
    frames = clip_frames(model_name, height)
    write_video(work / "input.mp4", frames, height, width)
    tiles = len(tile_starts(height, TILE, TILE_OVERLAP)) * len(tile_starts(width, TILE, TILE_OVERLAP))
    # Every forward at 256x256; at 1080p the warm-up one and the first ones of the second pass.
    timed_calls = {0, *range(tiles, tiles + TIMED_TILES)}

    def is_real(index: int) -> bool:
        return tiles == 1 or index in timed_calls

    calls: list[float] = []
    timed: dict[int, float] = {}

    def forward(x: np.ndarray) -> np.ndarray:
        index = len(calls)
        started = time.perf_counter()
        restored = model.forward(x) if is_real(index) else x
        calls.append(time.perf_counter() - started)
        if is_real(index):
            timed[index] = calls[-1]
        return restored

    started = time.perf_counter()
    summary = restore(work / "input.mp4", work / "output.mp4", LoadedModel(model.name, model.backend, forward, "bench"))
    wall = time.perf_counter() - started
    forward_s = statistics.median(seconds for index, seconds in timed.items() if index != 0)
    pipeline_per_frame = (wall - sum(calls)) / summary.frames
    per_frame = forwards_per_frame(model_name, height, width)
    return {
        "model": model_name,
        "backend": backend,
        "size": f"{width}x{height}",
        "frames": summary.frames,
        "tiles_per_frame": tiles,
        "forwards_per_frame": per_frame,
        "forwards_run": len(timed),
        "forwards_total": len(calls),
        "forward_s": forward_s,
        "warmup_forward_s": timed[0],
        "pipeline_s_per_frame": pipeline_per_frame,
        "wall_s": wall,
        "fps": 1 / (forward_s * per_frame + pipeline_per_frame),
        "peak_rss_mib": peak_rss_mib(),
        "threads": threads or torch.get_num_threads(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM is the peak of this program's own memory; ru_maxrss also
    counts the parent's memory at the fork that started it (the kernel carries it across exec), so a measurement
    started by a parent that exported the models would report the parent's 2.6 GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[dict[str, object]]) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, torch threads {rows[0]['threads'] if rows else '-'}, load average {load}")
    header = (
        f"{'model':<13} {'backend':<17} {'size':>10} {'fwd/frame':>9} {'s/forward':>9} {'frames/s':>9} {'peak RSS':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['model']:<13} {row['backend']:<17} {row['size']:>10} {row['forwards_per_frame']:>9.1f} "
            f"{row['forward_s']:>9.2f} {row['fps']:>9.4f} {row['peak_rss_mib'] / 1024:>7.2f} GiB"
        )


def write_report(rows: list[dict[str, object]]) -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "torch": torch.__version__,
        "weights": "random (seed 0), default configs",
        "tile": TILE,
        "tile_overlap": TILE_OVERLAP,
        "window": WINDOW,
        "window_stride": WINDOW_STRIDE,
        "rows": rows,
    }
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256 only")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core, as a user gets)")
    parser.add_argument("--measure", nargs=4, metavar=("MODEL", "BACKEND", "HEIGHT", "WIDTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    show_progress(False)
    if args.measure:
        model, backend, height, width = args.measure
        print(json.dumps(measure(model, backend, int(height), int(width), args.threads)))
        return
    for model in args.models:  # before any timing: exports take minutes and need memory of their own
        if "onnxruntime" in args.backends:
            onnx_file(model)
    rows: list[dict[str, object]] = []
    for height, width in SIZES[:1] if args.quick else SIZES:
        for model in args.models:
            for backend in args.backends:
                print(f"{model} {backend} {width}x{height} ...", flush=True)
                command = [sys.executable, __file__, "--measure", model, backend, str(height), str(width)]
                command += ["--threads", str(args.threads)] if args.threads else []
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    sys.exit(
                        f"{model} {backend} {width}x{height} failed ({result.returncode}):\n{result.stderr[-3000:]}"
                    )
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"  {rows[-1]['fps']:.4f} frames/s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
                write_report(rows)  # after every row: a long run cut short keeps what it measured
    print_table(rows)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
