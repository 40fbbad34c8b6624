"""Stage `export`: a trained checkpoint -> ONNX, proven on a real test clip to compute what PyTorch computes.

The graph takes the model's own layout with dynamic sizes: `[B, T, 3, H, W]` for DynStaticNet (batch, frames,
height and width dynamic), `[B, 3, H, W]` for DwGN (batch, height and width). `onnx.checker` must pass, and
ONNX Runtime must match PyTorch on a real test clip at its own size and at a second, ragged size: max absolute
difference <= `export.atol` and PSNR (against the ground truth) within `export.psnr_tolerance_db`; otherwise
the stage fails and says by how much. Both runtimes' latency on this machine goes into
`reports/<model>/export.json`, and the ONNX model into the training's MLflow run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weather_restore.config import ExportConfig, Params
from weather_restore.data.clips import load_clip, read_manifest
from weather_restore.errors import DataError, ExportError, ModelFileError
from weather_restore.metrics import psnr
from weather_restore.models.facts import model_facts
from weather_restore.outputs import atomic_path, atomic_write_text, check_output_file

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "degraded", "restored"


def model_input(model_name: str, clip: np.ndarray) -> np.ndarray:
    """A clip `(T, H, W, 3)` in [0, 1] -> the model's layout: `(1, T, 3, H, W)` or the frames `(T, 3, H, W)`."""
    frames = np.ascontiguousarray(clip.transpose(0, 3, 1, 2), dtype=np.float32)  # (T, 3, H, W)
    return frames[None] if model_facts(model_name).video else frames


def export_onnx(model: nn.Module, model_name: str, example: np.ndarray, path: Path, cfg: ExportConfig) -> float:
    """Write the ONNX graph to `path` (a partial the caller renames once it is proven) and run onnx.checker on it;
    returns the seconds the exporter took. Whatever the exporter raises becomes one ExportError line."""
    exporter = cfg.exporter_for(model_name)
    try:
        seconds = _export(model, model_name, example, path, cfg, exporter)
    except Exception as error:  # the exporters raise anything from TorchExportError to RuntimeError
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise ExportError(
            f"the {exporter} ONNX exporter failed on {model_name} ({type(error).__name__}: {first[:300]}); "
            f"check the params export.opset ({cfg.opset}) and export.exporter.{model_name.lower()}"
        ) from None
    _stamp_and_check(path, model_name, exporter)
    return seconds


def _export(
    model: nn.Module, model_name: str, example: np.ndarray, path: Path, cfg: ExportConfig, exporter: str
) -> float:
    facts = model_facts(model_name)
    # Batch 2: a batch of 1 gets specialised by both exporters' shape analysis.
    sample = torch.from_numpy(np.concatenate([example, example[:, ::-1]]) if facts.video else example[:2].copy())
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning / deprecation notes, one per traced size expression
        if exporter == "dynamo":
            # onnxscript's optimiser logs one INFO line per node it leaves alone: tens of thousands here.
            logging.getLogger("onnxscript").setLevel(logging.WARNING)
            dynamic = torch.export.Dim.DYNAMIC
            axes = dict.fromkeys(facts.dynamic_axes, dynamic)
            program = torch.onnx.export(
                model,
                (sample,),
                dynamo=True,
                opset_version=cfg.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: axes},
                verbose=False,
            )
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                model,
                (sample,),
                str(path),
                dynamo=False,
                opset_version=cfg.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dict.fromkeys((INPUT_NAME, OUTPUT_NAME), facts.dynamic_axes),
            )
    return time.perf_counter() - started


def _stamp_and_check(path: Path, model_name: str, exporter: str) -> None:
    """Record which model the graph is (restore and the loaders read it), then run onnx.checker on the file."""
    import onnx

    graph = onnx.load(str(path))
    entries = {"model_name": model_name, "exporter": exporter, "producer": "weather-restore"}
    kept = [p for p in graph.metadata_props if p.key not in entries]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in entries.items():
        graph.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"onnx.checker rejects the exported {model_name} graph: {error}") from None
    onnx.save(graph, str(path))


def onnx_session(path: Path, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """The ONNX Runtime session every user of an exported graph gets: restore and evaluation (model_loading), the
    stage's own parity and latency, the benchmarks. All of ORT's graph optimisations are applied here, when the
    session is made, so the shipped file stays portable (no layouts of this CPU saved into it).

    Memory: tensors come from ORT's CPU arena (no preplanned memory patterns), and runs given
    `release_after_run()` hand the arena back at their end. One DynStaticNet forward of a restore tile (10 frames
    of 256 x 256) peaked at 1.3 GiB so, against 7.0 GiB without the arena: every tensor a malloc, and glibc's
    heap kept the freed ones resident. threads: intra-op threads (None: one per core).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=list(providers))


def release_after_run() -> Any:
    """Run options that shrink the CPU arena back to nothing once the run is over: a process that restores with
    a model holds its tensors only while a forward runs."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def ragged_crop(x: np.ndarray) -> np.ndarray:
    """A second size unlike the first (odd, not a multiple of any window or downsampling factor)."""
    height, width = x.shape[-2:]
    return np.ascontiguousarray(x[..., : max(9, height * 3 // 4 - 1), : max(9, width * 5 // 8 + 3)])


def compare(model: nn.Module, session: Any, degraded: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
    """PyTorch against ONNX Runtime on one input: max |difference| and each one's PSNR against `clean`."""
    with torch.inference_mode():
        expected = model(torch.from_numpy(degraded)).numpy()
    (restored,) = session.run(None, {INPUT_NAME: degraded})
    if restored.shape != expected.shape:
        raise ExportError(f"ONNX Runtime returned shape {restored.shape}, PyTorch {expected.shape}")

    def quality(x: np.ndarray) -> float:
        frames = torch.from_numpy(x.reshape(-1, *x.shape[-3:])).clamp(0, 1)
        return psnr(frames, torch.from_numpy(clean.reshape(-1, *clean.shape[-3:]))).mean().item()

    torch_psnr, onnx_psnr = quality(expected), quality(restored)
    return {
        "shape": list(degraded.shape),
        "max_abs_diff": float(np.abs(restored - expected).max()),
        "psnr_pytorch": torch_psnr,
        "psnr_onnxruntime": onnx_psnr,
        "psnr_diff_db": abs(torch_psnr - onnx_psnr),
    }


def median_seconds(call: Any, repeats: int) -> float:
    """The median wall time of `repeats` calls (warm them up first: the first run allocates and picks kernels)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def is_onnx_file(path: Path) -> bool:
    """`path` holds an ONNX graph (a protobuf that parses as a model with nodes), so a new export may replace it."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and onnx's own errors alike: not a graph
        return False
    return graph.ir_version > 0 and len(graph.graph.node) > 0


def export_model(
    model_name: str,
    checkpoint: Path,
    data_root: Path,
    onnx_path: Path,
    report_path: Path,
    cfg: ExportConfig,
    force: bool = False,
) -> dict[str, Any]:
    """The stage: export, check, check parity on the first test clip at two sizes, time both runtimes, report.
    An existing `onnx_path` is replaced only when it holds an ONNX graph (any file with `force`)."""
    from weather_restore.checkpoint import load_model

    onnx_path, report_path = Path(onnx_path), Path(report_path)
    check_output_file(onnx_path, "ONNX", is_onnx_file, [checkpoint], force)
    model = load_model(checkpoint, "cpu", expected=model_name).float().eval()
    checksum, clips = read_manifest(data_root)
    test = [clip for clip in clips if clip.split == "test"]
    if not test:
        raise DataError(f"{data_root}/manifest.json: no test clip to check the export on")
    clip = test[0]
    degraded_clip, clean_clip = load_clip(data_root, clip)
    degraded, clean = model_input(model_name, degraded_clip), model_input(model_name, clean_clip)

    threads = torch.get_num_threads()
    # The new graph replaces the previous one only once it has passed both checks: a failure keeps the old one.
    with atomic_path(onnx_path) as partial:
        seconds = export_onnx(model, model_name, degraded, partial, cfg)
        log.info("exported %s in %.1f s (%s)", model_name, seconds, cfg.exporter_for(model_name))
        session = onnx_session(partial, threads)
        parity = [
            compare(model, session, degraded, clean),
            compare(model, session, ragged_crop(degraded), ragged_crop(clean)),
        ]
        worst = max(parity, key=lambda row: row["max_abs_diff"])
        worst_psnr = max(row["psnr_diff_db"] for row in parity)
        if not (worst["max_abs_diff"] <= cfg.atol and worst_psnr <= cfg.psnr_tolerance_db):
            kept = "the previous graph is kept" if onnx_path.exists() else "no graph was written"
            raise ExportError(
                f"{onnx_path}: ONNX Runtime differs from PyTorch on test clip {clip.id}: max |difference| "
                f"{worst['max_abs_diff']:.3g} at input {tuple(worst['shape'])} (allowed {cfg.atol:g}), PSNR "
                f"difference {worst_psnr:.4f} dB (allowed {cfg.psnr_tolerance_db:g}); {kept}"
            )
        size = partial.stat().st_size
    log.info("%s passed the checker and parity at two sizes", onnx_path)
    report = {
        "model": model_name,
        "onnx": str(onnx_path),
        "bytes": size,
        "opset": cfg.opset,
        "exporter": cfg.exporter_for(model_name),
        "export_seconds": seconds,
        "clip": clip.id,
        "manifest_checksum": checksum,
        "parity": parity,
        "max_abs_diff": worst["max_abs_diff"],
        "psnr_diff_db": worst_psnr,
        "atol": cfg.atol,
        "psnr_tolerance_db": cfg.psnr_tolerance_db,
    }

    # The parity runs above were both runtimes' warm-up on this very input.
    def run_torch() -> None:
        with torch.inference_mode():
            model(torch.from_numpy(degraded))

    report["latency"] = {
        "input": list(degraded.shape),
        "threads": threads,
        "repeats": cfg.latency_repeats,
        "pytorch_s": median_seconds(run_torch, cfg.latency_repeats),
        "onnxruntime_s": median_seconds(lambda: session.run(None, {INPUT_NAME: degraded}), cfg.latency_repeats),
    }
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    return report


def log_export(
    run_json: Path, report: dict[str, Any], onnx_path: Path, report_path: Path, weights: dict[str, str] | None = None
) -> str:
    """Log the ONNX model (with its signature), the parity and latency figures into the training's MLflow run,
    without reopening it (killed here, the run keeps the status its training left); returns the model's URI.
    `weights` (`sha256`, `use`) says which of the training's weights files the model was exported from."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from weather_restore.tracking import EXPORTED_WEIGHTS_TAG, WEIGHTS_USE_TAG, log_changed_metrics, read_run_info

    info = read_run_info(run_json)
    if info.run_id is None:
        raise ModelFileError(f"{run_json}: the training was not tracked (tracking.enabled: false)")
    spec = Schema([TensorSpec(np.dtype(np.float32), model_facts(report["model"]).dynamic_shape)])
    mlflow.set_tracking_uri(info.tracking_uri)
    experiment_id = info.experiment_id or mlflow.MlflowClient().get_run(info.run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)  # with no active run, the model's experiment
    logged = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name="onnx",
        signature=ModelSignature(inputs=spec, outputs=spec),
        pip_requirements=[f"onnxruntime=={_version('onnxruntime')}", f"onnx=={onnx.__version__}"],
        save_as_external_data=False,
        run_id=info.run_id,
    )
    client = mlflow.MlflowClient()
    log_changed_metrics(
        client,
        info.run_id,
        {
            "onnx_max_abs_diff": report["max_abs_diff"],
            "onnx_psnr_diff_db": report["psnr_diff_db"],
            "onnx_latency_s": report["latency"]["onnxruntime_s"],
            "pytorch_latency_s": report["latency"]["pytorch_s"],
        },
    )
    client.log_artifact(info.run_id, str(report_path), artifact_path="export")
    if weights is not None:
        client.set_tag(info.run_id, EXPORTED_WEIGHTS_TAG, weights["sha256"])
        client.set_tag(info.run_id, WEIGHTS_USE_TAG, weights["use"])
    client.set_tag(info.run_id, "onnx_model_uri", logged.model_uri)
    log.info("logged the ONNX model to MLflow run %s: %s", info.run_id, logged.model_uri)
    return logged.model_uri


@dataclass(frozen=True)
class Export:
    """What `export` wrote, from which weights, and where it logged the model (a sentence)."""

    report: dict[str, Any]
    onnx_path: Path
    report_path: Path
    weights: dict[str, str]
    logged: str


def export_stage(
    model_name: str,
    params: Params,
    project_root: Path,
    *,
    checkpoint: Path | None = None,
    data: Path | None = None,
    out: Path | None = None,
    report: Path | None = None,
    force: bool = False,
) -> Export:
    """The stage: export the weights `training.<model>.use` names in `<project>/models/<model>` (or `checkpoint`)
    to `out` (default `models/<model>/model.onnx`), prove it on the first test clip of `data`, and log the model
    into the training's MLflow run, which `register` then registers. A `checkpoint` other than the training's own
    weights is exported but logged nowhere: the run's model must be the one its test metrics were measured on."""
    from weather_restore.checkpoint import WEIGHTS_FILES, file_sha256, trained_weights
    from weather_restore.tracking import RUN_INFO_NAME

    project_root = Path(project_root)
    model_dir = project_root / "models" / model_name
    use = getattr(params.training, model_name).use
    path = Path(checkpoint) if checkpoint is not None else trained_weights(model_dir, use)
    own = checkpoint is None or path.resolve() == (model_dir / WEIGHTS_FILES[use]).resolve()
    weights = {"weights": str(path), "sha256": file_sha256(path), "use": use if own else "other"}
    onnx_path = Path(out) if out is not None else model_dir / "model.onnx"
    report_path = Path(report) if report is not None else project_root / "reports" / model_name / "export.json"
    data_root = Path(data) if data is not None else project_root / params.data.root / "mwvd"
    result = export_model(model_name, path, data_root, onnx_path, report_path, params.export, force)
    run_json = model_dir / RUN_INFO_NAME
    if not params.tracking.enabled:
        logged = "not logged to MLflow (tracking.enabled: false)"
    elif not own:
        logged = f"not logged to MLflow: {path} is not the training's {WEIGHTS_FILES[use]} (training.{model_name}.use)"
    elif not run_json.is_file():
        logged = f"not logged to MLflow: no training run recorded ({run_json} is missing)"
    else:
        logged = (
            f"logged to the training's MLflow run as {log_export(run_json, result, onnx_path, report_path, weights)}"
        )
    return Export(result, onnx_path, report_path, weights, logged)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
