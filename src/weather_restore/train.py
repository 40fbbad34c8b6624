"""Stage `train`: one model on the MWVD training clips, resumable, optionally distributed, tracked in MLflow.

Recipe (the papers'): Adam, cosine annealing from `lr` to `lr_min` over the iterations, PSNR loss by default
(Charbonnier and L1 selectable), random crops, flips and 90-degree rotations applied alike to input, ground truth
and every frame. CUDA with bf16 (or fp16 with a grad scaler) autocast when present, else float32 on the CPU.
Under `torchrun` every process trains on its share of each global batch with DistributedDataParallel; process 0
alone logs, checkpoints and talks to MLflow.

Outputs: `<out>/checkpoint.pt` (every `checkpoint_every` iterations and at the end), `<out>/run.json` (the MLflow
run, for evaluation and export), `<reports>/train.csv` (iteration, loss, lr, data wait, step time; written as it
goes) and `<reports>/validation.csv` (validation PSNR of a few test clips, and the input's).

Killed at any point, a rerun goes on where it stopped. Metric rows reach MLflow only after the checkpoint that
covers them (it carries those not yet sent), so the steps a resume redoes are never logged twice. run.json names
the run from the start and is marked complete only once the run has ended: a finished checkpoint whose record is
not complete finishes its logging in the same run instead of training again, and a run that an interrupted
training left RUNNING is either resumed or, when a new training supersedes it, marked KILLED.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from weather_restore import tracking
from weather_restore.checkpoint import config_hash, restore_rng_state, resume_state, rng_state, save_checkpoint
from weather_restore.config import Params, TrainConfig
from weather_restore.data.dataset import ClipDataset, FrameDataset, TrainingSampler, spread_over_weathers
from weather_restore.errors import ModelFileError, TrainingError
from weather_restore.inference import restore_clip
from weather_restore.losses import LOSSES, Loss, frame_psnr
from weather_restore.models.facts import model_facts
from weather_restore.outputs import atomic_path
from weather_restore.progress import progress

log = logging.getLogger(__name__)

TRAIN_FIELDS = ("iteration", "loss", "lr", "data_wait_s", "step_s")
VALIDATION_FIELDS = ("iteration", "val_psnr", "input_psnr")
# Fields that change how a run is executed or reported, not what it computes: a checkpoint resumes across them.
OPERATIONAL_FIELDS = {
    "workers",
    "log_every",
    "checkpoint_every",
    "validate_every",
    "val_clips",
    "val_frames",
    "compile",
    "deterministic",
}


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class TrainSummary:
    model: str
    iterations: int
    start_iteration: int
    final_loss: float
    val_psnr: float | None
    val_input_psnr: float | None
    seconds: float
    data_wait_fraction: float
    checkpoint: Path
    run_id: str | None
    main: bool


def setup_distributed() -> Distributed:
    """Join the process group when launched by torchrun (nccl on GPUs, gloo on CPU); else one process."""
    cuda = torch.cuda.is_available()
    if not dist.is_torchelastic_launched():
        return Distributed(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])  # torchrun's contract
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast precision: `auto` is bf16 on GPUs that have it, fp16 on older ones, float32 on the CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def hashed_config(model_name: str, params: Params, manifest_checksum: str) -> dict[str, Any]:
    """What a training computes from: the model, its recipe (less operational fields) and the data."""
    cfg: TrainConfig = getattr(params.training, model_name)
    return {
        "model": model_name,
        "model_config": getattr(params.models, model_name).model_dump(mode="json"),
        "training": cfg.model_dump(mode="json", exclude=OPERATIONAL_FIELDS),
        "data": manifest_checksum,
    }


def train_step(
    model: nn.Module,
    degraded: torch.Tensor,
    clean: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
    world_size: int = 1,
) -> float:
    """One optimisation step; returns the loss averaged over all processes. A non-finite loss is returned without
    touching the weights (every process sees the same averaged value, so all of them skip)."""
    with torch.autocast(degraded.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        restored = model(degraded)
    loss = loss_fn(restored.float(), clean)
    value = loss.detach().clone()
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    mean = value.item()
    if not math.isfinite(mean):
        return mean
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return mean


def validate(
    model: nn.Module, model_name: str, samples: list[dict[str, Any]], device: torch.device, dtype: torch.dtype | None
) -> float:
    """Mean PSNR (per frame, then per clip) of the restored validation clips, in dB."""
    was_training = model.training
    model.eval()
    scores = []
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for sample in samples:
            restored = restore_clip(model, model_name, sample["degraded"].to(device)).float()
            scores.append(frame_psnr(restored, sample["clean"].to(device)).mean().item())
    model.train(was_training)
    return float(np.mean(scores))


def input_psnr(samples: list[dict[str, Any]]) -> float:
    """The same score for the degraded input itself: what a model must beat."""
    return float(np.mean([frame_psnr(s["degraded"], s["clean"]).mean().item() for s in samples]))


class CsvLog:
    """A CSV file written row by row (flushed), so a crash keeps what was logged. Resuming at iteration `i` keeps
    the rows up to `i` and appends after them; starting afresh truncates."""

    def __init__(self, path: Path, fields: tuple[str, ...], resume_at: int | None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if resume_at is not None and self.path.is_file():
            with open(self.path, newline="") as file:
                kept = [row for row in csv.DictReader(file) if int(row["iteration"]) <= resume_at]
        with atomic_path(self.path) as temporary, open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 - closed by close()
        self._writer = csv.DictWriter(self._file, fieldnames=fields)

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _timing(waits: list[float], totals: list[float], began: float) -> dict[str, float]:
    """The share of step time spent waiting for data, and the seconds since `began`. The first step waits for the
    loader's workers to start: it is left out of the steady-state share."""
    steady = slice(1, None) if len(totals) > 1 else slice(None)
    fraction = float(sum(waits[steady]) / sum(totals[steady])) if totals else 0.0
    return {"data_wait_fraction": fraction, "train_seconds": time.perf_counter() - began}


def train(
    model_name: str,
    params: Params,
    data_root: Path,
    out_dir: Path,
    reports_dir: Path,
    project_root: Path,
    restart: bool = False,
) -> TrainSummary:
    """Run the stage for `model_name` (`dynstaticnet` or `dwgn`) with `params.training.<model_name>`."""
    ctx = setup_distributed()
    if not ctx.main:
        logging.getLogger("weather_restore").setLevel(logging.WARNING)
    try:
        trainer = Trainer(model_name, params, Path(data_root), Path(out_dir), Path(reports_dir), ctx, restart)
        return trainer.run(Path(project_root))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One training: the model, optimiser, schedule and data of a (possibly resumed) run, and its loop."""

    def __init__(
        self,
        model_name: str,
        params: Params,
        data_root: Path,
        out_dir: Path,
        reports_dir: Path,
        ctx: Distributed,
        restart: bool = False,
    ):
        from weather_restore.models import build_model

        cfg: TrainConfig = getattr(params.training, model_name)
        if cfg.batch_size % ctx.world_size:
            raise TrainingError(
                f"training.{model_name}.batch_size {cfg.batch_size} does not divide among {ctx.world_size} processes"
            )
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
        self.model_name, self.params, self.cfg, self.ctx = model_name, params, cfg, ctx
        self.video = model_facts(model_name).video
        self.dtype = autocast_dtype(cfg.amp, ctx.device)
        self.out_dir, self.reports_dir = out_dir, reports_dir
        self.checkpoint_path = out_dir / "checkpoint.pt"

        if self.video:
            train_set: ClipDataset | FrameDataset = ClipDataset(
                data_root, "train", frames=cfg.clip_frames, crop=cfg.crop
            )
        else:
            train_set = FrameDataset(data_root, "train", crop=cfg.crop)
        self.config = hashed_config(model_name, params, train_set.checksum)
        self.digest = config_hash(self.config)
        self.record_path = out_dir / tracking.RUN_INFO_NAME
        self.previous = self._previous_record()
        unlogged = self.previous.training_id if self.previous and not self.previous.complete else None
        self.state = None if restart else resume_state(self.checkpoint_path, self.digest, unlogged)
        self.start = self.state["iteration"] if self.state else 0
        # Killed after its last checkpoint, before its end-of-training logging completed: only that is left.
        self.finishing = self.start >= cfg.iterations
        self.training_id: str = (self.state or {}).get("training_id") or uuid.uuid4().hex

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        model = build_model(model_name, **self.config["model_config"])
        if cfg.init == "identity":
            model.start_from_identity()
        model = model.to(ctx.device)
        if ctx.world_size > 1 and ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=cfg.iterations, eta_min=cfg.lr_min
        )
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.dtype == torch.float16)
        if self.state:
            model.load_state_dict(self.state["model"])
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.scaler.load_state_dict(self.state["scaler"])
            restore_rng_state(self.state["rng"])
        net: nn.Module = model
        if ctx.world_size > 1:
            net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.net = torch.compile(net) if cfg.compile else net

        self.sampler = TrainingSampler(len(train_set), cfg.batch_size, cfg.seed, self.start, ctx.rank, ctx.world_size)
        self.loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size // ctx.world_size,
            sampler=self.sampler,
            num_workers=cfg.workers,
            pin_memory=ctx.device.type == "cuda",
            prefetch_factor=4 if cfg.workers else None,
            # Its own generator: creating the loader must not draw from the global RNG a resume restored.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.val_samples: list[dict[str, Any]] = []
        if ctx.main:
            test_set = ClipDataset(data_root, "test", frames=cfg.val_frames, augment=False)
            self.val_samples = [test_set[i] for i in spread_over_weathers(test_set.clips, cfg.val_clips)]
        self.run_id: str | None = (self.state or {}).get("mlflow_run_id") or None
        self.experiment_id: str | None = None
        self.val_psnr: float | None = (self.state or {}).get("val_psnr")
        self.last_saved: int | None = self.start if self.state else None
        # Metric rows not yet in MLflow: sent after each checkpoint, so that a resume, which redoes the steps
        # after the last checkpoint, never logs a step twice; a checkpoint carries those it was saved with.
        self.pending: list[dict[str, Any]] = list((self.state or {}).get("metrics_pending", []))
        if ctx.world_size > 1:
            dist.barrier()  # every process has read the checkpoint and run.json before process 0 rewrites them

    @property
    def tracked(self) -> bool:
        return self.ctx.main and self.params.tracking.enabled

    def run(self, project_root: Path) -> TrainSummary:
        """Train (or resume, or only finish the logging of a finished checkpoint) inside the MLflow run. run.json
        names the run from the start and is marked complete only after the run has ended: a crash at any point
        before leaves a checkpoint and a record from which the next run resumes."""
        with contextlib.ExitStack() as stack:
            if self.tracked:
                self.run_id = stack.enter_context(self._mlflow_run(project_root))
            if self.ctx.main:
                self._write_record(complete=False)
            summary = self._finished_summary() if self.finishing else self._loop()
            if self.tracked:
                self._log_outputs()
        if self.ctx.main:
            self._write_record(complete=True)
        return summary

    def _previous_record(self) -> tracking.RunInfo | None:
        """The run.json a previous training left here, when there is one that can be read."""
        if not self.record_path.is_file():
            return None
        try:
            return tracking.read_run_info(self.record_path, finished_only=False)
        except ModelFileError as error:
            log.warning("%s; it will be rewritten", error)
            return None

    def _write_record(self, complete: bool) -> None:
        run: dict[str, Any] = {}
        if self.tracked:
            import mlflow

            run = {
                "run_id": self.run_id,
                "experiment_id": self.experiment_id,
                "experiment": self.params.tracking.experiment,
                "tracking_uri": mlflow.get_tracking_uri(),
            }
        tracking.write_run_info(
            self.record_path,
            tracking.RunInfo(model=self.model_name, training_id=self.training_id, complete=complete, **run),
        )

    def save(self, iteration: int, summary: dict[str, float]) -> None:
        """Write the checkpoint (with the metric rows not yet in MLflow), then send those rows."""
        save_checkpoint(
            self.checkpoint_path,
            {
                "model_name": self.model_name,
                "model_config": self.config["model_config"],
                "config": self.config,
                "config_hash": self.digest,
                "iteration": iteration,
                "iterations": self.cfg.iterations,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "sampler": self.sampler.state_dict(iteration),
                "mlflow_run_id": self.run_id or "",
                "training_id": self.training_id,
                "val_psnr": self.val_psnr,
                "summary": summary,
                "metrics_pending": self.pending,
            },
        )
        self.last_saved = iteration
        self._flush()  # only now: a resume starts after this checkpoint and will not redo these steps

    def _loop(self) -> TrainSummary:
        cfg, ctx, main = self.cfg, self.ctx, self.ctx.main
        loss_fn = LOSSES[cfg.loss]
        resume_at = self.start if self.state else None
        if main:
            train_log = CsvLog(self.reports_dir / "train.csv", TRAIN_FIELDS, resume_at)
            val_log = CsvLog(self.reports_dir / "validation.csv", VALIDATION_FIELDS, resume_at)
            baseline = input_psnr(self.val_samples)
        waits: list[float] = []
        totals: list[float] = []
        loss = float("nan")
        began = time.perf_counter()
        steps = range(self.start, cfg.iterations)
        self.net.train()
        batches = iter(self.loader)
        tick = time.perf_counter()
        try:
            for iteration in progress(steps, desc=f"training {self.model_name}", unit="it") if main else steps:
                fetch = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - fetch
                lr = self.optimizer.param_groups[0]["lr"]
                degraded = batch["degraded"].to(ctx.device, non_blocking=True)
                clean = batch["clean"].to(ctx.device, non_blocking=True)
                loss = train_step(
                    self.net, degraded, clean, self.optimizer, loss_fn, self.scaler, self.dtype, ctx.world_size
                )
                if not math.isfinite(loss):
                    raise self._non_finite(loss, iteration + 1, lr)
                self.scheduler.step()
                done = iteration + 1
                now = time.perf_counter()
                waits.append(waited)
                totals.append(now - tick)
                tick = now
                if not main:
                    continue
                if done % cfg.log_every == 0 or done == cfg.iterations:
                    train_log.write(
                        {"iteration": done, "loss": loss, "lr": lr, "data_wait_s": waited, "step_s": totals[-1]}
                    )
                    self._log_metrics({"loss": loss, "lr": lr, "data_wait_s": waited}, done)
                if done % cfg.validate_every == 0 or done == cfg.iterations:
                    self.val_psnr = validate(self.model, self.model_name, self.val_samples, ctx.device, self.dtype)
                    val_log.write({"iteration": done, "val_psnr": self.val_psnr, "input_psnr": baseline})
                    self._log_metrics({"val_psnr": self.val_psnr, "val_input_psnr": baseline}, done)
                    log.info(
                        "%s iteration %d: loss %.4f, validation PSNR %.2f dB (input %.2f dB)",
                        self.model_name,
                        done,
                        loss,
                        self.val_psnr,
                        baseline,
                    )
                if done == cfg.iterations:
                    self._log_metrics(_timing(waits, totals, began), done)
                if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                    self.save(done, {"loss": loss, **_timing(waits, totals, began)})
                tick = time.perf_counter()  # validation and checkpoints are not step time
        finally:
            if main:
                train_log.close()
                val_log.close()

        timing = _timing(waits, totals, began)
        wait_fraction, seconds = timing["data_wait_fraction"], timing["train_seconds"]
        if main:
            log.info(
                "trained %s for %d iterations in %.0f s; data wait %.1f%% of step time",
                self.model_name,
                len(steps),
                seconds,
                100 * wait_fraction,
            )
        return TrainSummary(
            model=self.model_name,
            iterations=cfg.iterations,
            start_iteration=self.start,
            final_loss=loss,
            val_psnr=self.val_psnr,
            val_input_psnr=baseline if main else None,
            seconds=seconds,
            data_wait_fraction=wait_fraction,
            checkpoint=self.checkpoint_path,
            run_id=self.run_id,
            main=main,
        )

    def _finished_summary(self) -> TrainSummary:
        """The figures of the finished training in the checkpoint, whose logging is all that is left to do."""
        figures = self.state["summary"]
        if self.ctx.main:
            log.info("%s finished its %d iterations before: finishing its logging", self.model_name, self.start)
        return TrainSummary(
            model=self.model_name,
            iterations=self.cfg.iterations,
            start_iteration=self.start,
            final_loss=figures["loss"],
            val_psnr=self.val_psnr,
            val_input_psnr=input_psnr(self.val_samples) if self.ctx.main else None,
            seconds=figures["train_seconds"],
            data_wait_fraction=figures["data_wait_fraction"],
            checkpoint=self.checkpoint_path,
            run_id=self.run_id,
            main=self.ctx.main,
        )

    def _non_finite(self, loss: float, iteration: int, lr: float) -> TrainingError:
        kept = (
            f"the last good checkpoint {self.checkpoint_path} (iteration {self.last_saved}) is kept"
            if self.last_saved is not None
            else "no checkpoint had been written yet"
        )
        return TrainingError(
            f"training {self.model_name}: the loss is {loss} at iteration {iteration} (lr {lr:.3g}); training "
            f"stopped and {kept}. Lower training.{self.model_name}.lr, set amp: off, or check the data."
        )

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tracked:
            row = {key: float(value) for key, value in metrics.items()}
            self.pending.append({"step": step, "timestamp": int(time.time() * 1000), "metrics": row})

    def _flush(self, skip_logged: bool = False) -> None:
        """Send the pending metric rows to the run; with `skip_logged`, leave out the (metric, step) pairs it
        has already (the rows a checkpoint carries, which the process that saved it may have sent before dying)."""
        if not (self.tracked and self.pending):
            return
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient()
        logged: set[tuple[str, int]] = set()
        if skip_logged:
            for key in {key for row in self.pending for key in row["metrics"]}:
                logged |= {(key, metric.step) for metric in client.get_metric_history(self.run_id, key)}
        metrics = [
            Metric(key, value, row["timestamp"], row["step"])
            for row in self.pending
            for key, value in row["metrics"].items()
            if (key, row["step"]) not in logged
        ]
        if metrics:
            client.log_batch(self.run_id, metrics=metrics)
        self.pending = []

    @contextlib.contextmanager
    def _mlflow_run(self, project_root: Path) -> Iterator[str]:
        """Start (or, on resume, reopen) the training's MLflow run; an exception inside marks it FAILED. A run
        that an interrupted training left RUNNING and that this one does not continue is marked KILLED."""
        experiment_id = tracking.prepare(self.params.tracking, project_root)
        import mlflow

        if self.run_id and not tracking.run_exists(self.run_id):
            log.warning("MLflow run %s of the checkpoint is not in this store: starting a new run", self.run_id)
            self.run_id = None
        if self.previous and not self.previous.complete and self.previous.run_id != self.run_id:
            tracking.end_interrupted_runs([self.previous.run_id])
        fresh = self.run_id is None
        name = self.model_name if fresh else None
        with mlflow.start_run(run_id=self.run_id, experiment_id=experiment_id, run_name=name) as run:
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            self._flush(skip_logged=True)  # the rows the checkpoint carries
            if fresh:  # a resumed run has its params already
                mlflow.log_params(
                    tracking.flatten(
                        {
                            "model": self.model_name,
                            "models": {self.model_name: self.config["model_config"]},
                            "training": {self.model_name: self.cfg.model_dump(mode="json")},
                            "data": {
                                "manifest_checksum": self.config["data"],
                                "clips": self.params.data.clips.model_dump(mode="json"),
                            },
                            "config_hash": self.digest,
                        }
                    )
                )
            commit, dirty = tracking.git_commit(project_root)
            tags = {
                "model": self.model_name,
                "stage": "train",
                "world_size": self.ctx.world_size,
                "device": self.ctx.device.type,
                "data.manifest_checksum": self.config["data"],
            }
            if commit:
                tags |= {"mlflow.source.git.commit": commit, "git_dirty": dirty}
            if self.start:
                tags["resumed_from_iteration"] = self.start
            mlflow.set_tags(tags)
            yield run.info.run_id

    def _log_outputs(self) -> None:
        """The curves, complete now, into the run."""
        import mlflow

        for name in ("train.csv", "validation.csv"):
            mlflow.log_artifact(str(self.reports_dir / name))
