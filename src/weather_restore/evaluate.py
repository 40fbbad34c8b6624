"""Stage `evaluate`: restore every test clip and measure PSNR, SSIM, LPIPS and the temporal errors (temporal.py)
per clip, weather and overall.

The degraded input is measured against the ground truth in the same way, so the gain is visible. Outputs:
`reports/<model>/metrics.json` (DVC metrics), `reports/<model>/clips.csv` and `reports/<model>/samples.png`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from weather_restore.config import Params
from weather_restore.data.clips import Clip, load_clip, read_manifest
from weather_restore.data.frames import to_uint8
from weather_restore.data.records import WEATHERS
from weather_restore.inference import restore_clip
from weather_restore.metrics import LPIPSMetric, count_flops, psnr, ssim
from weather_restore.models.facts import model_facts
from weather_restore.outputs import atomic_path, atomic_write_text
from weather_restore.progress import progress
from weather_restore.temporal import TEMPORAL_KEYS, FlowCache, clip_errors

log = logging.getLogger(__name__)

METRIC_KEYS = ("psnr", "ssim", "lpips", "input_psnr", "input_ssim", "input_lpips", *TEMPORAL_KEYS)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept and len(kept) == len(values) else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Average per-clip rows (each already a mean over its frames) into one row of METRIC_KEYS."""
    return {key: _mean([row[key] for row in rows]) for key in METRIC_KEYS}


def evaluate_clip(
    model: nn.Module, model_name: str, degraded: torch.Tensor, clean: torch.Tensor, lpips_metric: LPIPSMetric
) -> tuple[dict[str, float | None], torch.Tensor, float]:
    """Metrics of one clip (frames averaged), the restored clip, and the seconds the model took."""
    start = time.perf_counter()
    restored = restore_clip(model, model_name, degraded)
    if restored.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    restored, degraded, clean = restored.float().cpu(), degraded.cpu(), clean.cpu()
    lpips_out, lpips_in = lpips_metric(restored, clean), lpips_metric(degraded, clean)
    row = {
        "psnr": psnr(restored, clean).mean().item(),
        "ssim": ssim(restored, clean).mean().item(),
        "lpips": None if lpips_out is None else lpips_out.mean().item(),
        "input_psnr": psnr(degraded, clean).mean().item(),
        "input_ssim": ssim(degraded, clean).mean().item(),
        "input_lpips": None if lpips_in is None else lpips_in.mean().item(),
    }
    return row, restored, seconds


def model_cost(model: nn.Module, model_name: str, frames: int, size: tuple[int, int]) -> float:
    """GFLOPs of restoring `frames` frames of `size` (the video model in one clip, the image model per frame)."""
    shape = model_facts(model_name).input_shape(1, frames, *size)
    # On the meta device: shapes only, no memory. Counted with autograd on (see count_flops), a real forward of
    # DwGN over 10 frames of 128 x 128 held 24 GB of activations and was killed.
    ghost = copy.deepcopy(model).to("meta")
    return count_flops(ghost, torch.zeros(shape, device="meta"))["flops"] / 1e9


def samples_picture(samples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """One row per weather: input | output | ground truth (the middle frame of one clip)."""
    tiles = [[to_uint8(img) for img in (degraded, restored, clean)] for _, degraded, restored, clean in samples]
    height, width = tiles[0][0].shape[:2]
    label = 14
    canvas = Image.new("RGB", (3 * width, len(tiles) * (height + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, ((weather, *_), row) in enumerate(zip(samples, tiles, strict=True)):
        top = r * (height + label)
        for c, (name, tile) in enumerate(zip(("input", "output", "ground truth"), row, strict=True)):
            canvas.paste(Image.fromarray(tile), (c * width, top + label))
            draw.text((c * width + 2, top + 1), f"{weather}: {name}", fill="black")
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")


def evaluate_model(
    model: nn.Module,
    model_name: str,
    data_root: Path,
    reports_dir: Path,
    *,
    max_clips: int = 0,
    use_lpips: bool = True,
    flops_size: tuple[int, int] = (128, 128),
    device: torch.device | str = "cpu",
    temporal: bool = True,
    flow_cache: Path | None = None,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Evaluate on the test split and write metrics.json, clips.csv and samples.png into `reports_dir`. With
    `temporal`, the warping and flicker errors too, the clean clips' flows kept in `flow_cache` (None: not kept).
    `mlflow_run_id`: the training's run these figures are logged into, named in metrics.json (so `dvc exp show`
    names each experiment's run)."""
    device = torch.device(device)
    manifest_checksum, clips = read_manifest(data_root)
    test: list[Clip] = [c for c in clips if c.split == "test"]
    if max_clips:
        test = test[:max_clips]
    model = model.to(device).eval()
    lpips_metric = LPIPSMetric(device) if use_lpips else LPIPSMetric.disabled("LPIPS turned off in params")
    rows, samples, seconds, frames = [], {}, 0.0, 0
    flows, temporal_seconds = FlowCache(flow_cache), 0.0
    for clip in progress(test, total=len(test), desc=f"evaluating {model_name}", unit="clip"):
        degraded_np, clean_np = load_clip(data_root, clip)
        degraded = torch.from_numpy(degraded_np).permute(0, 3, 1, 2).to(device)
        clean = torch.from_numpy(clean_np).permute(0, 3, 1, 2)
        row, restored, took = evaluate_clip(model, model_name, degraded, clean, lpips_metric)
        start = time.perf_counter()
        if temporal:
            row.update(clip_errors(restored, degraded, clean, flows.reference(clean)))
        else:
            row.update(dict.fromkeys(TEMPORAL_KEYS))
        temporal_seconds += time.perf_counter() - start
        seconds += took
        frames += degraded.shape[0]
        rows.append({"clip": clip.id, "weather": clip.weather, "source_video": clip.source_video, **row})
        if clip.weather not in samples:
            middle = degraded.shape[0] // 2
            samples[clip.weather] = (
                clip.weather,
                degraded_np[middle],
                restored[middle].permute(1, 2, 0).numpy(),
                clean_np[middle],
            )
    if not rows:
        raise ValueError(f"{data_root}: the test split has no clips")
    metrics: dict[str, Any] = {
        "overall": summarise(rows),
        "per_weather": {
            w: summarise([r for r in rows if r["weather"] == w])
            for w in WEATHERS
            if any(r["weather"] == w for r in rows)
        },
        "params": sum(p.numel() for p in model.parameters()),
        # An ONNX graph from the registry has no PyTorch modules to count: no figure rather than a false one.
        "gflops": model_cost(model, model_name, 10, flops_size) if any(True for _ in model.parameters()) else None,
        "gflops_input": f"10x{flops_size[0]}x{flops_size[1]}",  # the frames the figure counts (evaluation.flops_size)
        "fps": frames / seconds,
        "device": device.type,
        "clips": len(rows),
        "lpips_note": lpips_metric.reason or None,
        "manifest_checksum": manifest_checksum,
        "temporal": {
            "seconds": temporal_seconds,
            "flows_computed": flows.computed,
            "flows_reused": flows.reused,
        }
        if temporal
        else None,
    }
    if mlflow_run_id:
        metrics["mlflow_run_id"] = mlflow_run_id
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["clip", "weather", "source_video", *METRIC_KEYS])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(reports_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(reports_dir / "clips.csv", table.getvalue())
    samples_picture([samples[w] for w in WEATHERS if w in samples], reports_dir / "samples.png")
    overall = metrics["overall"]
    log.info(
        "%s: PSNR %.2f dB (input %.2f), SSIM %.4f (input %.4f), %.1f frames/s on %s",
        model_name,
        overall["psnr"],
        overall["input_psnr"],
        overall["ssim"],
        overall["input_ssim"],
        metrics["fps"],
        device.type,
    )
    return metrics


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_evaluation(
    model_name: str, checkpoint: Path, model_uri: str | None, device: torch.device, tracking_uri: str | None = None
) -> nn.Module:
    """The model to evaluate: a registry or run URI of an ONNX model `model_name` (run by ONNX Runtime; any other
    format is refused unloaded), or a training checkpoint."""
    if model_uri:
        from weather_restore.model_loading import OnnxModule, load_registered

        return OnnxModule(load_registered(model_uri, tracking_uri, model_name, str(device)))
    from weather_restore.checkpoint import load_model

    return load_model(checkpoint, device, expected=model_name)


def logged_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures of metrics.json as MLflow metrics: `test_<key>` overall, `test_<key>_<weather>`, fps, GFLOPs."""
    flat = {f"test_{key}": value for key, value in metrics["overall"].items() if value is not None}
    for weather, row in metrics["per_weather"].items():
        flat.update({f"test_{key}_{weather}": value for key, value in row.items() if value is not None})
    flat["test_fps"] = metrics["fps"]
    if metrics["gflops"] is not None:
        flat["gflops"] = metrics["gflops"]
    return flat


REPORT_FILES = ("metrics.json", "clips.csv", "samples.png")


def log_evaluation(
    run_json: Path, metrics: dict[str, Any], reports_dir: Path, weights: dict[str, str] | None = None
) -> str:
    """Log test metrics (overall and per weather) and the report files into the training's MLflow run, without
    reopening it (killed here, the run keeps the status its training left); a rerun logs only what changed. Tags
    the run with the test set and, from `weights` (`sha256`, `use`), the weights measured: the evidence the
    promotion gate checks. Only for an evaluation of the training's own weights on the default test set."""
    import mlflow

    from weather_restore.errors import ModelFileError
    from weather_restore.tracking import (
        TEST_SET_TAG,
        TESTED_WEIGHTS_TAG,
        WEIGHTS_USE_TAG,
        log_changed_metrics,
        log_dataset_input,
        read_run_info,
    )

    info = read_run_info(run_json)
    if info.run_id is None:
        raise ModelFileError(f"{run_json}: the training was not tracked (tracking.enabled: false)")
    client = mlflow.MlflowClient(tracking_uri=info.tracking_uri)
    log_changed_metrics(client, info.run_id, logged_metrics(metrics))
    # The promotion gate compares test PSNRs only when both versions were measured on the same test set, each on
    # the weights it registered.
    client.set_tag(info.run_id, TEST_SET_TAG, metrics["manifest_checksum"])
    data = (weights or {}).get("data")
    log_dataset_input(client, info.run_id, metrics["manifest_checksum"], "testing", data, metrics["clips"])
    if weights is not None:
        client.set_tag(info.run_id, TESTED_WEIGHTS_TAG, weights["sha256"])
        client.set_tag(info.run_id, WEIGHTS_USE_TAG, weights["use"])
    for name in REPORT_FILES:
        client.log_artifact(info.run_id, str(reports_dir / name), artifact_path="evaluation")
    log.info("logged the evaluation to MLflow run %s", info.run_id)
    return info.run_id


def log_other_evaluation(
    params: Params,
    project_root: Path,
    model_name: str,
    metrics: dict[str, Any],
    reports_dir: Path,
    evaluated: dict[str, str],
) -> str:
    """Log an evaluation that is not of a training's own weights on its default test set into a new, finished run
    of its own, tagged `evaluated.*` with what it measured (weights file and hash or model URI, data, test set);
    returns the run's id. It never touches a training's run."""
    import mlflow
    from mlflow.entities import Metric

    from weather_restore import tracking

    experiment_id = tracking.prepare(params.tracking, project_root)
    client = mlflow.MlflowClient()
    tags = {"model": model_name, "stage": "evaluate", **{f"evaluated.{key}": value for key, value in evaluated.items()}}
    tags["evaluated.manifest_checksum"] = metrics["manifest_checksum"]
    run = client.create_run(experiment_id, run_name=f"evaluate {model_name}", tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id, metrics=[Metric(key, float(value), now, 0) for key, value in logged_metrics(metrics).items()]
    )
    for name in REPORT_FILES:
        client.log_artifact(run.info.run_id, str(reports_dir / name), artifact_path="evaluation")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measured (metrics.json's figures), of which weights, where it wrote the reports and where
    it logged them (a sentence)."""

    metrics: dict[str, Any]
    reports_dir: Path
    evaluated: dict[str, str]
    logged: str


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def evaluate_stage(
    model_name: str,
    params: Params,
    project_root: Path,
    *,
    checkpoint: Path | None = None,
    model_uri: str | None = None,
    data: Path | None = None,
    out: Path | None = None,
) -> Evaluation:
    """The stage: evaluate the weights `training.<model>.use` names in `<project>/models/<model>` (or `checkpoint`,
    or the registry's `model_uri`) on the test split of `data` (default `<data.root>/mwvd`), on CUDA when present;
    write the reports into `out` (default `reports/<model>`) and log them.

    Only an evaluation of the training's own weights on the default test set logs into the training's MLflow run
    (its test metrics and tags are the evidence `register` copies and the gate checks). Any other evaluation logs
    into a new run of its own, tagged with what it evaluated, so it never rewrites a training's evidence."""
    from weather_restore.checkpoint import WEIGHTS_FILES, file_sha256, load_model, trained_weights
    from weather_restore.tracking import RUN_INFO_NAME, read_run_info, tracking_uri

    project_root = Path(project_root)
    model_dir = project_root / "models" / model_name
    default_data = project_root / params.data.root / "mwvd"
    data_root = Path(data) if data is not None else default_data
    out = Path(out) if out is not None else project_root / "reports" / model_name
    use = getattr(params.training, model_name).use
    device = default_device()
    if model_uri:
        model = load_for_evaluation(model_name, Path(), model_uri, device, tracking_uri(params.tracking, project_root))
        evaluated, own = {"model_uri": model_uri}, False
    else:
        path = Path(checkpoint) if checkpoint is not None else trained_weights(model_dir, use)
        own = checkpoint is None or _same_path(path, model_dir / WEIGHTS_FILES[use])
        model = load_model(path, device, expected=model_name)
        evaluated = {"weights": str(path.resolve()), "sha256": file_sha256(path), "use": use if own else "other"}
    own = own and _same_path(data_root, default_data)
    evaluated["data"] = str(data_root.resolve())
    run_json = model_dir / RUN_INFO_NAME
    logs_into_training = params.tracking.enabled and own and run_json.is_file()
    cfg = params.evaluation
    metrics = evaluate_model(
        model,
        model_name,
        data_root,
        out,
        max_clips=cfg.max_clips,
        use_lpips=cfg.lpips,
        flops_size=tuple(cfg.flops_size),
        device=device,
        temporal=cfg.temporal,
        flow_cache=project_root / params.data.root / "flows",
        mlflow_run_id=read_run_info(run_json).run_id if logs_into_training else None,
    )
    if not params.tracking.enabled:
        logged = "not logged to MLflow (tracking.enabled: false)"
    elif logs_into_training:
        logged = f"logged into the training's MLflow run {log_evaluation(run_json, metrics, out, evaluated)}"
    elif own:
        logged = f"not logged to MLflow: no training run recorded ({run_json} is missing)"
    else:
        what = model_uri or f"{evaluated['weights']} on {data_root}"
        run_id = log_other_evaluation(params, project_root, model_name, metrics, out, evaluated)
        logged = f"logged into a new MLflow run {run_id}, not the training's: it evaluated {what}"
    return Evaluation(metrics, out, evaluated, logged)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _milli(value: float | None) -> float | None:
    return None if value is None else 1e3 * value


def _gain(psnr: float | None, input_psnr: float | None) -> str:
    """`+0.87`: the model's PSNR over the degraded input's, in dB."""
    return "n/a" if psnr is None or input_psnr is None else f"{psnr - input_psnr:+.2f}"


def _gflops(metrics: dict[str, Any]) -> str:
    """`51.6 (10x128x128)`: the figure with the frames it counts (evaluation.flops_size), which can differ."""
    if metrics["gflops"] is None:
        return _fmt(None, 1)
    return f"{metrics['gflops']:.1f} ({metrics.get('gflops_input', 'size not recorded')})"


TABLE_TEMPORAL = ("warp_error", "input_warp_error", "clean_warp_error", "flicker_error", "input_flicker_error")


def compare_table(metrics_by_model: dict[str, dict[str, Any]]) -> str:
    """reports/compare.md: every evaluated model per weather, with the degraded input as the baseline."""
    lines = [
        "# Model comparison on the test split",
        "",
        "PSNR (dB) and SSIM on RGB in [0, 1], per frame, averaged per clip then per weather; LPIPS (AlexNet) "
        "where its weights are cached. `input` is the degraded clip against the ground truth.",
        "Temporal errors (lower is better): warp is Lai et al.'s warping error (mean squared difference of each "
        "frame to the previous one warped by the clean clip's TV-L1 flow, occlusions masked), beside the same figure "
        "of the input and of the clean clip (the flow's own residual, the floor); flicker is the mean "
        "|(R_t - R_t-1) - (C_t - C_t-1)|, zero for a clip that changes exactly as the clean one.",
        "",
        "| model | weather | PSNR | SSIM | LPIPS | input PSNR | gain (dB) | input SSIM | warp (x1e3) | input warp "
        "| clean warp | flicker (x1e3) | input flicker | params | GFLOPs (frames) | frames/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, metrics in metrics_by_model.items():
        groups = [("overall", metrics["overall"])] + list(metrics["per_weather"].items())
        for weather, row in groups:
            lines.append(
                f"| {name} | {weather} | {_fmt(row['psnr'], 2)} | {_fmt(row['ssim'], 4)} | {_fmt(row['lpips'], 4)} "
                f"| {_fmt(row['input_psnr'], 2)} | {_gain(row['psnr'], row['input_psnr'])} "
                f"| {_fmt(row['input_ssim'], 4)} | "
                + " | ".join(_fmt(_milli(row.get(key)), 2) for key in TABLE_TEMPORAL)
                + f" | {metrics['params']:,} "
                f"| {_gflops(metrics)} | {metrics['fps']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def write_comparison(reports_root: Path, models: list[str]) -> Path:
    """Gather reports/<model>/metrics.json of the given models into reports/compare.md. A model without a
    readable metrics.json is refused before anything is written: compare.md keeps its previous table."""
    from weather_restore.errors import DataError

    found = {}
    for name in models:
        path = reports_root / name / "metrics.json"
        rerun = f"weather-restore evaluate --model {name}"
        if not path.is_file():
            raise DataError(f"{path}: no such file: evaluate the model first ({rerun}) or leave it out of --models")
        try:
            metrics = json.loads(path.read_text())
            compare_table({name: metrics})  # every figure the table reads is there
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            problem = f"{type(error).__name__}: {' '.join(str(error).split())}"
            raise DataError(f"{path}: not a metrics file of `{rerun}` ({problem}): rerun it") from None
        found[name] = metrics
    out = reports_root / "compare.md"
    atomic_write_text(out, compare_table(found))
    return out
