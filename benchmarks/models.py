"""Cost of the two models on this machine's CPU: forward and training-step times, eager and ONNX Runtime.

The cases are issue 14's: DynStaticNet forward on 10-frame clips of 128² and 64² and a training step on 3 frames
of 64²; DwGN forward on one frame of 128² and 256², a step on one frame of 128², and the 10-frame batch that
`export` times. ONNX rows run the graph `export` ships: built by `export_onnx` (the stage's exporter and opset)
and run in the stage's own session. Achieved GFLOP/s is set against the float32 matmul rate measured in the same
run.

The published code of both papers, two ways:
- measured (--published DIR): the published models are timed in the same run, on the same inputs, by the same
  harness (forward under inference_mode, median of 3 after a warm-up; a step with Adam on an MSE loss), each case
  right after ours, and the ratio published / ours is measured. This is the figure issue 14's goals are about.
- scaled (without it): the times in shared/spec/models.md (measured on an older machine whose float32 matmul ran
  at about 125 GFLOP/s) are scaled by the ratio of that rate to this run's matmul rate. A rough estimate only: most
  of both models' time is memory-bound (elementwise, depthwise and small ops), which does not scale with the
  matmul rate. Rows and table say "scaled".

Nothing of the published code is in this repository. To make a DIR: clone (outside this repository) the papers'
repositories, GitHub zqx1216155858/DynstaticNet (mmedit/models/backbones/sr_backbones/DynStaticNet.py) and
Jeasco/DwGN (model/WAformer.py, model/filters_generator.py); patch them only to run on CPU (`.cuda()`
and `torch.cuda.FloatTensor` to the input's device, drop the mmedit registry decorator and the unused decord and
timm imports); install their dependencies somewhere importable (`pip install --target DIR/site --no-deps
pytorch-wavelets PyWavelets`; einops is already in this environment); and write DIR/published_models.py with
    LAYOUTS = {"dynstaticnet": ("batch", "frames", "channels", "height", "width"),
               "dwgn": ("batch", "channels", "height", "width")}   # the input each takes, in facts.py's words
    def build(name: str) -> torch.nn.Module: ...                    # the reference configuration (spec)
putting its folders on sys.path itself. The configuration is the spec's reference (DynStaticNet at the README's
dim 24, DwGN at width 32): the run records both models' parameter counts, to check against the spec's.

Bounds (--bounds): each eager case is timed twice more with parts of our model replaced by nothing, the most any
hand-written kernel for them could give: every attention core (softmax(q kᵀ) v: SDPA) returning v, and that with
every channel LayerNorm returning its input too. Ablations, not models: they bound what kernels for those parts can
win, against the published code of the same run.

Run: python benchmarks/models.py [--threads 2] [--models dynstaticnet,dwgn] [--no-onnx] [--published DIR] [--bounds]
(writes reports/bench/models.json)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weather_restore.config import ExportConfig
from weather_restore.export import INPUT_NAME, export_onnx, median_seconds, onnx_session
from weather_restore.metrics import count_flops
from weather_restore.models import build_model, dwgn, dynstaticnet, layers
from weather_restore.models.facts import MODEL_NAMES, model_facts
from weather_restore.outputs import atomic_write_text

REPEATS = 3
OUTPUT = Path("reports/bench/models.json")
SPEC_MATMUL_GFLOPS = 125.0  # the matmul rate of the run that measured the spec's published times (117-138 GFLOP/s)
ADAPTER = "published_models.py"

# (model, measure, input shape, the published code's seconds in shared/spec/models.md, or None)
CASES = [
    ("dynstaticnet", "forward", (1, 10, 3, 128, 128), 4.85),
    ("dynstaticnet", "forward", (1, 10, 3, 64, 64), 1.38),
    ("dynstaticnet", "step", (1, 3, 3, 64, 64), 1.16),
    ("dwgn", "forward", (1, 3, 128, 128), 1.10),
    ("dwgn", "forward", (1, 3, 256, 256), 4.12),
    ("dwgn", "forward", (10, 3, 128, 128), None),  # the 10-frame batch `export` times
    ("dwgn", "step", (1, 3, 128, 128), 4.35),
]
# Small examples to export from: the graphs have dynamic batch, frames, height and width.
EXPORT_EXAMPLE = {"dynstaticnet": (1, 2, 3, 64, 64), "dwgn": (2, 3, 64, 64)}


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
    with torch.inference_mode():
        return warm_median(lambda: model(inputs))


def step_seconds(model: nn.Module, inputs: torch.Tensor) -> float:
    """One Adam step (the training's optimiser) on an MSE loss against a fixed target."""
    model.train()
    target = torch.rand_like(inputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999))

    def step() -> None:
        loss = F.mse_loss(model(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = warm_median(step)
    model.eval()
    return seconds


# The bounds' ablations: row key suffix, and whether the channel norms go too (the attention cores always do);
# VARIANT_LABELS: every timed variant of ours that a row may carry, by suffix, as the table names it.
BOUNDS = {"attention_free": False, "attention_norms_free": True}
VARIANT_LABELS = {
    "no_dropout": "no attention dropout (ours)",
    "attention_free": "bound: attention cores free",
    "attention_norms_free": "bound: + channel norms free",
}


@contextlib.contextmanager
def parts_free(norms: bool) -> Iterator[None]:
    """Within: both models' attention cores return v, and with `norms` every ChannelLayerNorm its input."""
    modules, norm_forward = (dynstaticnet, dwgn), layers.ChannelLayerNorm.forward
    cores = {module: module.attention for module in modules}
    try:
        for module in modules:
            module.attention = lambda q, k, v, mask=None, dropout=0.0: v
        if norms:
            layers.ChannelLayerNorm.forward = lambda self, x: x
        yield
    finally:
        for module in modules:
            module.attention = cores[module]
        layers.ChannelLayerNorm.forward = norm_forward


def count_on_meta(name: str, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward, counted on the meta device: they depend on shapes only, and no memory is used."""
    with torch.device("meta"):
        return count_flops(build_model(name), torch.empty(shape))["flops"]


def load_published(folder: Path) -> ModuleType:
    """The adapter module in `folder` (see the docstring above): build(name) and LAYOUTS."""
    path = folder / ADAPTER
    if not path.is_file():
        raise ValueError(f"{path} does not exist: --published needs a folder with an adapter module {ADAPTER}")
    spec = importlib.util.spec_from_file_location("published_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for name in ("build", "LAYOUTS"):
        if not hasattr(module, name):
            raise ValueError(f"{path} defines no {name}: the adapter needs build(name) and LAYOUTS")
    return module


def to_layout(inputs: torch.Tensor, ours: tuple[str, ...], theirs: tuple[str, ...]) -> torch.Tensor:
    """`inputs` in our model's axis order, permuted to the published model's."""
    if sorted(ours) != sorted(theirs):
        raise ValueError(f"the published model takes axes {theirs}, ours {ours}: not a permutation")
    return inputs.permute(*(ours.index(axis) for axis in theirs)).contiguous()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shipped_session(model: nn.Module, name: str, folder: Path, threads: int) -> tuple[object, float]:
    """The graph as `export` ships it, in the session `export` times it with; and the exporter's seconds."""
    path = folder / f"{name}.onnx"
    example = np.random.default_rng(0).random(EXPORT_EXAMPLE[name], dtype=np.float32)
    seconds = export_onnx(model.eval(), name, example, path, ExportConfig())
    return onnx_session(path, threads), seconds


def bench(
    names: list[str],
    threads: int,
    onnx: bool,
    published: ModuleType | None,
    bounds: bool,
    rate: float,
    report: dict,
    save: Callable[[], None],
) -> None:
    """Fill report's rows and exports, saving after each (a run cut short on a shared machine keeps its rows)."""
    rows, exports = report["rows"], report["exports"]
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            torch.manual_seed(0)
            model = build_model(name).eval()
            report["parameters"][name] = {"ours": parameter_count(model)}
            theirs = None
            if published is not None:
                torch.manual_seed(0)
                theirs = published.build(name).eval()
                report["parameters"][name]["published"] = parameter_count(theirs)
            session = None
            if onnx:
                session, seconds = shipped_session(model, name, Path(folder), threads)
                exports[name] = {"exporter": ExportConfig().exporter_for(name), "export_seconds": seconds}
                print(f"  exported {name} in {seconds:.0f} s", flush=True)
                save()
            for case_name, measure, shape, spec_seconds in CASES:
                if case_name != name:
                    continue
                inputs = torch.rand(shape, generator=torch.Generator().manual_seed(1))
                row: dict[str, object] = {"model": name, "measure": measure, "input": list(shape)}
                measure_seconds = step_seconds if measure == "step" else forward_seconds
                if measure == "step":
                    row["eager_s"] = step_seconds(model, inputs)
                    if name == "dynstaticnet":  # the same step without attention dropout (a recipe option)
                        torch.manual_seed(0)
                        row["eager_no_dropout_s"] = step_seconds(build_model(name, dropout=0.0), inputs)
                else:
                    flops = count_on_meta(name, shape)
                    row["gflop"] = flops / 1e9
                    row["eager_s"] = forward_seconds(model, inputs)
                    row["eager_gflops_per_s"] = flops / 1e9 / row["eager_s"]
                    row["eager_fraction_of_matmul"] = row["eager_gflops_per_s"] / rate
                    if session is not None:
                        feed = {INPUT_NAME: inputs.numpy()}
                        (restored,) = session.run(None, feed)
                        with torch.inference_mode():
                            row["onnx_max_abs_diff"] = float(np.abs(restored - model(inputs).numpy()).max())
                        row["onnx_s"] = warm_median(lambda run=session.run, feed=feed: run(None, feed))
                        row["onnx_speedup"] = row["eager_s"] / row["onnx_s"]
                if bounds:
                    for suffix, norms in BOUNDS.items():
                        with parts_free(norms):
                            row[f"eager_{suffix}_s"] = measure_seconds(model, inputs)
                if theirs is not None:  # right after ours, on the same input, by the same harness
                    their_inputs = to_layout(inputs, model_facts(name).layout, tuple(published.LAYOUTS[name]))
                    row["published_measured_s"] = measure_seconds(theirs, their_inputs)
                    ratios(row, row["published_measured_s"], "measured")
                if spec_seconds is not None:
                    row["published_spec_s"] = spec_seconds
                    row["published_scaled_s"] = spec_seconds * SPEC_MATMUL_GFLOPS / rate  # as if it ran now
                    ratios(row, row["published_scaled_s"], "scaled")
                rows.append(row)
                save()
                print(f"  {name} {measure} {list(shape)}: {row}", flush=True)


def ratios(row: dict, published_seconds: float, kind: str) -> None:
    """published / ours for the row (and for its no-dropout step and bounds), `kind` being measured or scaled."""
    row[f"speedup_vs_published_{kind}"] = published_seconds / row["eager_s"]
    for suffix in VARIANT_LABELS:
        if f"eager_{suffix}_s" in row:
            row[f"speedup_vs_published_{kind}_{suffix}"] = published_seconds / row[f"eager_{suffix}_s"]


def print_table(rows: list[dict], rate: float, threads: int, measured: bool) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nfloat32 matmul 2048^3: {rate:.0f} GFLOP/s on {threads} threads; load average {load}")
    kind = "measured" if measured else "scaled"
    print(
        "pub s: the published code timed in this run; spec s: shared/spec/models.md's time on the older machine,"
        f" scaled: that time x {SPEC_MATMUL_GFLOPS:.0f} / this run's matmul rate;"
        f" x pub: published / ours eager, {kind}"
        + ("" if measured else " (no --published DIR: an estimate, not a measurement)")
    )
    header = (
        f"{'model':<13}{'case':<9}{'input':<20}{'GFLOP':>7}{'eager s':>9}{'GFLOP/s':>9}{'%mm':>5}"
        f"{'ONNX s':>8}{'ONNX x':>8}{'pub s':>7}{'spec s':>8}{'scaled':>8}{'x pub':>7}"
    )
    print(header)
    print("-" * len(header))

    def cell(row: dict, key: str, spec: str, width: int) -> str:
        return f"{row[key]:>{width}{spec}}" if key in row else f"{'-':>{width}}"

    for r in rows:
        percent = f"{100 * r['eager_fraction_of_matmul']:.0f}%" if "gflop" in r else "-"
        print(
            f"{r['model']:<13}{r['measure']:<9}{str(r['input']):<20}{cell(r, 'gflop', '.1f', 7)}"
            f"{cell(r, 'eager_s', '.2f', 9)}{cell(r, 'eager_gflops_per_s', '.1f', 9)}"
            f"{percent:>5}"
            f"{cell(r, 'onnx_s', '.2f', 8)}{cell(r, 'onnx_speedup', '.2f', 8)}"
            f"{cell(r, 'published_measured_s', '.2f', 7)}{cell(r, 'published_spec_s', '.2f', 8)}"
            f"{cell(r, 'published_scaled_s', '.2f', 8)}{cell(r, f'speedup_vs_published_{kind}', '.2f', 7)}"
        )
        for suffix, label in VARIANT_LABELS.items():
            if f"eager_{suffix}_s" in r:
                print(
                    f"{'':<13}{'  ' + label:<36}{r[f'eager_{suffix}_s']:>9.2f}{'':<53}"
                    f"{cell(r, f'speedup_vs_published_{kind}_{suffix}', '.2f', 7)}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--no-onnx", action="store_true", help="eager PyTorch only (no export)")
    parser.add_argument(
        "--bounds", action="store_true", help="also time ours with the attention cores (and channel norms) free"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument(
        "--published",
        type=Path,
        metavar="DIR",
        help=f"time the published code in this run too, built by DIR/{ADAPTER} (see the module docstring)",
    )
    args = parser.parse_args()
    published = None
    if args.published is not None:
        try:
            published = load_published(args.published)
        except (ValueError, ImportError) as error:
            parser.error(f"--published: {error}")
        missing = [name for name in args.models.split(",") if name not in published.LAYOUTS]
        if missing:
            parser.error(f"--published: {args.published / ADAPTER} has no LAYOUTS entry for {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    start_rate = matmul_gflops()
    print(f"float32 matmul rate: {start_rate:.0f} GFLOP/s", flush=True)
    report = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "threads": args.threads,
        "torch": torch.__version__,
        "matmul_gflops_per_s": {"start": start_rate},
        "spec_matmul_gflops_per_s": SPEC_MATMUL_GFLOPS,
        "bounds": args.bounds,
        "published": {
            "measured": published is not None,
            "adapter": str(args.published / ADAPTER) if published is not None else None,
        },
        "parameters": {},
        "load_average_at_start": os.getloadavg(),
        "exports": {},
        "rows": [],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")

    bench(args.models.split(","), args.threads, not args.no_onnx, published, args.bounds, start_rate, report, save)
    report["matmul_gflops_per_s"]["end"] = matmul_gflops()
    report["load_average_at_end"] = os.getloadavg()
    save()
    # The rate at the start scales the published times and the fractions above; the end rate shows the drift.
    print_table(report["rows"], start_rate, args.threads, measured=published is not None)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
