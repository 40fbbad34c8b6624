"""Cost of the two models on this machine's CPU: parameters, FLOPs, forward and training-step times.

Both models see the same frames: DynStaticNet a clip [1, 10, 3, H, W], DwGN the same ten frames as a batch
[10, 3, H, W]. Achieved GFLOP/s is set against the float32 matmul rate measured in the same run, and the times
against the published code's (shared/spec/models.md: 2 CPU threads of this machine, float32, eager).

Run: python benchmarks/models.py   (writes reports/bench/models.json)
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weather_restore.export import median_seconds
from weather_restore.metrics import count_flops
from weather_restore.models import build_model
from weather_restore.models.facts import MODEL_NAMES, model_facts

FRAMES = 10
SIZES = (64, 128)
REPEATS = 3
OUTPUT = Path("reports/bench/models.json")
# Peak memory of one DynStaticNet training step on a 10-frame 128x128 clip (measured: 13.8 GB resident);
# on a shared machine with less free memory the step is skipped rather than risked.
STEP_MEMORY_GB = {("dynstaticnet", 128): 15.0}

# The published code's times in seconds (low, high) by (model, measure, size); DwGN's at batch 1 (one frame),
# DynStaticNet's for one 10-frame clip.
REFERENCE = {
    ("dynstaticnet", "forward", 64): (1.1, 1.3),
    ("dynstaticnet", "forward", 128): (3.4, 4.2),
    ("dynstaticnet", "step", 64): (3.7, 5.1),
    ("dwgn", "forward", 128): (1.0, 1.3),
    ("dwgn", "step", 128): (4.0, 4.0),
}


def warm_median(run: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of `run` after one warm-up call."""
    run()
    return median_seconds(run, repeats)


def matmul_gflops(size: int = 2048) -> float:
    """The machine's float32 matmul rate now (GFLOP/s), the yardstick for 'fraction of peak'."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / warm_median(lambda: a @ b, repeats=5) / 1e9


def forward_seconds(model: nn.Module, inputs: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return warm_median(lambda: model(inputs))


def step_seconds(model: nn.Module, inputs: torch.Tensor) -> float:
    """One Adam step on an L1 loss against a fixed target (after one warm-up step)."""
    model.train()
    target = torch.rand_like(inputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.l1_loss(model(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return warm_median(step, repeats=1)


def count_on_meta(name: str, shape: tuple[int, ...]) -> dict:
    """FLOPs of one forward, counted on the meta device: they depend on shapes only, and no memory is used.

    On meta, attention runs as plain matmuls, so its MACs are in "matmul" (count_flops on CPU splits them out).
    """
    with torch.device("meta"):
        return count_flops(build_model(name), torch.empty(shape))


def free_memory_gb() -> float:
    """Free physical memory, page cache not counted (conservative)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30


def ratio(seconds: float | None, reference: tuple[float, float] | None) -> str:
    """'0.55-0.68x of 3.4-4.2 s': measured time over the reference range (below 1: faster than published)."""
    if seconds is None or reference is None:
        return "-"
    low, high = reference
    if low == high:
        return f"{seconds / low:.2f}x of {low:g} s"
    return f"{seconds / high:.2f}-{seconds / low:.2f}x of {low:g}-{high:g} s"


def bench_model(name: str) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = build_model(name)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for size in SIZES:
        inputs = torch.rand(model_facts(name).input_shape(1, FRAMES, size, size))
        flops = count_on_meta(name, tuple(inputs.shape))
        forward = forward_seconds(model, inputs)
        # batch 1 as published: one clip for DynStaticNet, one frame for DwGN
        single = inputs if model_facts(name).video else inputs[:1]
        single_forward = forward if model_facts(name).video else forward_seconds(model, single)
        need = STEP_MEMORY_GB.get((name, size), 0.0)
        step = step_seconds(model, single) if free_memory_gb() > need else None
        if step is None:
            print(f"  {name} step at {size}: skipped, needs {need:.0f} GB, {free_memory_gb():.0f} GB free")
        rows.append(
            {
                "model": name,
                "input": list(inputs.shape),
                "params": params,
                "gflops": flops["flops"] / 1e9,
                "gmacs": flops["macs"] / 1e9,
                "gmacs_by_kind": {kind: macs / 1e9 for kind, macs in flops["macs_by_kind"].items()},
                "forward_s": forward,
                "forward_per_frame_s": forward / FRAMES,
                "achieved_gflops_per_s": flops["flops"] / 1e9 / forward,
                "batch1_input": list(single.shape),
                "batch1_forward_s": single_forward,
                "batch1_step_s": step,
                "forward_vs_published": ratio(single_forward, REFERENCE.get((name, "forward", size))),
                "step_vs_published": ratio(step, REFERENCE.get((name, "step", size))),
            }
        )
        print(f"  {name} {list(inputs.shape)}: forward {forward:.2f} s, step {step} s", flush=True)
    return rows


def print_table(rows: list[dict[str, object]], rate: float) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nfloat32 matmul 2048^3: {rate:.0f} GFLOP/s on {torch.get_num_threads()} threads; load {load}")
    header = (
        f"{'model':<13}{'input':<19}{'params':>11}{'GMACs':>8}{'fwd s':>8}{'s/frame':>8}{'GFLOP/s':>9}"
        f"{'%peak':>7}  {'batch 1':<19}{'fwd s':>7}{'step s':>8}  {'fwd vs published':<24}step vs published"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        step = f"{r['batch1_step_s']:.2f}" if r["batch1_step_s"] else "skipped"
        print(
            f"{r['model']:<13}{str(r['input']):<19}{r['params']:>11,}{r['gmacs']:>8.2f}{r['forward_s']:>8.2f}"
            f"{r['forward_per_frame_s']:>8.3f}{r['achieved_gflops_per_s']:>9.1f}"
            f"{100 * r['fraction_of_matmul_rate']:>6.0f}%  {str(r['batch1_input']):<19}"
            f"{r['batch1_forward_s']:>7.2f}{step:>8}  {r['forward_vs_published']:<24}{r['step_vs_published']}"
        )


def main() -> None:
    start_rate = matmul_gflops()
    print(f"float32 matmul rate: {start_rate:.0f} GFLOP/s", flush=True)
    rows, skipped = [], {}
    for name in MODEL_NAMES:
        try:
            rows += bench_model(name)
        except ImportError as error:
            skipped[name] = f"cannot build: {error}"
            print(f"  skipping {name}: {skipped[name]}", flush=True)
    end_rate = matmul_gflops()
    rate = max(start_rate, end_rate)  # the machine is shared: take the less disturbed measurement
    for row in rows:
        row["fraction_of_matmul_rate"] = row["achieved_gflops_per_s"] / rate
    print_table(rows, rate)
    report = {
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "matmul_gflops_per_s": {"start": start_rate, "end": end_rate},
        "load_average": os.getloadavg(),
        "rows": rows,
        "skipped": skipped,
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    partial = OUTPUT.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, OUTPUT)
    print(f"\nwrote {OUTPUT}")


if __name__ == "__main__":
    main()
