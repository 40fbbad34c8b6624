"""Stage `train`: one model on the MWVD training clips, resumable, optionally distributed, tracked in MLflow.

Recipe (the papers'): Adam, cosine annealing from `lr` to `lr_min` over the iterations, PSNR loss by default
(Charbonnier and L1 selectable), random crops, flips and 90-degree rotations applied alike to input, ground truth
and every frame; optionally an exponential moving average of the weights (`ema_decay`). CUDA with bf16 (or fp16
with a grad scaler) autocast when present, else float32 on the CPU. Under `torchrun` every process trains on its
share of each global batch with DistributedDataParallel; process 0 alone validates, logs, checkpoints and talks to
MLflow, and it sends the checkpoint a run resumes from to the others: only its machine needs the training's folder.
Processes whose config hash (settings and data) differs from process 0's are refused before anything is written.
A process that loses another (a node died) fails in one line within `peer_timeout` seconds; the rerun resumes.
Validation reads the `val` split only: the test clips are `evaluate`'s alone.

Outputs: `<out>/checkpoint.pt` (every `checkpoint_every` iterations and at the end), `<out>/best.pt` (the weights of
the best validation PSNR so far, the EMA's when on), `<out>/run.json` (the MLflow run, for evaluation and export),
`<reports>/train.csv` (iteration, loss, lr, data wait, step time; written as it goes) and
`<reports>/validation.csv` (validation PSNR of a few validation clips, and the input's).

Killed at any point, a rerun goes on where it stopped. Metric rows reach MLflow only after the checkpoint that
covers them (it carries those not yet sent), so the steps a resume redoes are never logged twice. run.json names
the run from the start and is marked complete only once the run has ended: a finished checkpoint whose record is
not complete finishes its logging in the same run instead of training again, and a run that an interrupted
training left RUNNING is either resumed or, when a new training supersedes it, marked KILLED.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from weather_restore import tracking
from weather_restore.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    config_hash,
    load_checkpoint_bytes,
    restore_rng_state,
    resume_state,
    rng_state,
    save_checkpoint,
)
from weather_restore.config import Params, TrainConfig
from weather_restore.data.dataset import ClipDataset, FrameDataset, TrainingSampler, spread_over_weathers
from weather_restore.errors import ModelFileError, TrainingError
from weather_restore.inference import restore_clip
from weather_restore.losses import LOSSES, Loss
from weather_restore.metrics import psnr
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
    "use",
    "peer_timeout",
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
    best_val_psnr: float | None
    best_iteration: int | None
    seconds: float
    data_wait_fraction: float
    checkpoint: Path
    run_id: str | None
    main: bool


def setup_distributed(peer_timeout: float) -> Distributed:
    """Join the process group when launched by torchrun (nccl on GPUs, gloo on CPU); else one process. A
    collective that waits `peer_timeout` seconds for another process fails (gloo's own default is 30 minutes)."""
    cuda = torch.cuda.is_available()
    if not dist.is_torchelastic_launched():
        return Distributed(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])  # torchrun's contract
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=peer_timeout))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def broadcast_file(path: Path | None, ctx: Distributed) -> bytes | None:
    """Process 0's file `path` (None: it has none to send), on every process: its bytes, or None."""
    size = torch.tensor([path.stat().st_size if ctx.main and path is not None else -1], device=ctx.device)
    dist.broadcast(size, src=0)
    if size.item() < 0:
        return None
    if ctx.main:
        payload = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).to(ctx.device)
    else:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=ctx.device)
    dist.broadcast(payload, src=0)
    return payload.cpu().numpy().tobytes()


def config_hashes(digest: str, ctx: Distributed) -> list[str]:
    """Every process's config hash (`digest`, hex), in rank order."""
    mine = torch.tensor(list(digest.encode()), dtype=torch.uint8, device=ctx.device)
    hashes = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(hashes, mine)
    return [bytes(h.cpu().tolist()).decode() for h in hashes]


def lost_peer(error: RuntimeError) -> bool:
    """Whether a collective failed for want of another process: NCCL raises a DistError, gloo a RuntimeError of
    its transport (a connection closed or reset, a wait past the timeout)."""
    return isinstance(error, dist.DistError) or "gloo/transport/" in str(error)


def lost_peer_error(
    error: RuntimeError, model_name: str, ctx: Distributed, checkpoint: Path, saved: int | None
) -> TrainingError:
    """The one-line failure of a process whose collective lost another process of the torchrun job."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    # gloo's message: "[<source file>:<line>] Read error [10.0.0.2]:41234: Connection reset by peer. This is ..."
    reason = re.sub(r"^\[[^\]]*:\d+\]\s*", "", first).split(". ")[0]
    if not ctx.main:
        then = f"the training resumes from the last checkpoint process 0 wrote ({checkpoint} on its node)"
    elif saved is None:
        then = "no checkpoint was written yet, so the training starts afresh"
    else:
        then = f"the training resumes from the last checkpoint, {checkpoint} (iteration {saved})"
    return TrainingError(
        f"training {model_name}: process {ctx.rank} of {ctx.world_size} lost the others ({reason}): a node"
        f" of the torchrun job stopped or became unreachable (its own log says why). Start the same torchrun "
        f"command on every node again; {then}."
    )


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


# --- set-up: each piece of a training, built from its config ------------------------------------------------------


def make_reproducible(cfg: TrainConfig) -> None:
    """Seed every global generator; with `deterministic`, ask PyTorch (and cuBLAS) for deterministic kernels."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)


def training_set(model_name: str, cfg: TrainConfig, data_root: Path) -> ClipDataset | FrameDataset:
    """The `train` split: clips for a video model, single frames for an image model."""
    if model_facts(model_name).video:
        return ClipDataset(data_root, "train", frames=cfg.clip_frames, crop=cfg.crop)
    return FrameDataset(data_root, "train", crop=cfg.crop)


def validation_samples(cfg: TrainConfig, data_root: Path) -> list[dict[str, Any]]:
    """A few whole clips of the `val` split, spread over the weathers: what validation and best.pt are judged on.
    Never the test split, which only `evaluate` reads."""
    val_set = ClipDataset(data_root, "val", frames=cfg.val_frames, augment=False)
    return [val_set[i] for i in spread_over_weathers(val_set.clips, cfg.val_clips)]


def training_loader(dataset: Dataset, sampler: TrainingSampler, cfg: TrainConfig, ctx: Distributed) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size // ctx.world_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=ctx.device.type == "cuda",
        prefetch_factor=4 if cfg.workers else None,
        # Its own generator: creating the loader must not draw from the global RNG a resume restored.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def distribute(model: nn.Module, ctx: Distributed, compile: bool) -> nn.Module:
    """The module the steps run: DistributedDataParallel under torchrun, torch.compile'd when asked."""
    net: nn.Module = model
    if ctx.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return torch.compile(net) if compile else net


class EMA:
    """An exponential moving average of a model's weights (parameters and floating buffers), the weights
    restoration toolboxes validate and ship: after each step `average = d * average + (1 - d) * weights`, with
    `d = min(decay, (1 + n) / (10 + n))` at update n, so a short training is not dominated by its starting point."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current.detach(), 1 - decay)
            else:
                average.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing from `lr` to `lr_min` over the iterations; with `warmup`, its share of the iterations
    (n, at least one and leaving the cosine one) first ramps linearly from lr / (n + 1) up to `lr`."""
    ramp = min(max(1, round(cfg.warmup * cfg.iterations)), cfg.iterations - 1) if cfg.warmup else 0
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iterations - ramp, eta_min=cfg.lr_min)
    if not ramp:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (ramp + 1), total_iters=ramp)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[ramp])


def train_step(
    model: nn.Module,
    degraded: torch.Tensor,
    clean: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
    world_size: int = 1,
    grad_clip: float = 0.0,
) -> float:
    """One optimisation step; returns the loss averaged over all processes. A non-finite loss is returned without
    touching the weights (every process sees the same averaged value, so all of them skip). With `grad_clip`,
    the gradients' global L2 norm is clipped to it before the step."""
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
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if grad_clip:
        if scaling:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
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
            scores.append(psnr(restored, sample["clean"].to(device)).mean().item())
    model.train(was_training)
    return float(np.mean(scores))


def input_psnr(samples: list[dict[str, Any]]) -> float:
    """The same score for the degraded input itself: what a model must beat."""
    return float(np.mean([psnr(s["degraded"], s["clean"]).mean().item() for s in samples]))


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
    ctx = setup_distributed(getattr(params.training, model_name).peer_timeout)
    if not ctx.main:
        logging.getLogger("weather_restore").setLevel(logging.WARNING)
    trainer = None
    try:
        trainer = Trainer(model_name, params, Path(data_root), Path(out_dir), Path(reports_dir), ctx, restart)
        return trainer.run(Path(project_root))
    except RuntimeError as error:
        if ctx.world_size == 1 or not lost_peer(error):
            raise
        saved = trainer.last_saved if trainer is not None else None
        raise lost_peer_error(error, model_name, ctx, Path(out_dir) / LAST_NAME, saved) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One training: the model, optimiser, schedule, EMA and data of a (possibly resumed) run, and its loop."""

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
        self.model_name, self.params, self.cfg, self.ctx = model_name, params, cfg, ctx
        self.dtype = autocast_dtype(cfg.amp, ctx.device)
        self.reports_dir = reports_dir
        self.checkpoint_path, self.best_path = out_dir / LAST_NAME, out_dir / BEST_NAME
        self.record_path = out_dir / tracking.RUN_INFO_NAME

        train_set = training_set(model_name, cfg, data_root)
        self.config = hashed_config(model_name, params, train_set.checksum)
        self.digest = config_hash(self.config)
        if ctx.world_size > 1:  # each machine reads its own params.yaml and data: they must be process 0's
            hashes = config_hashes(self.digest, ctx)
            if others := [rank for rank, digest in enumerate(hashes) if digest != hashes[0]]:
                raise TrainingError(
                    f"training {model_name}: process {', '.join(map(str, others))} of {ctx.world_size} has another "
                    f"configuration or data than process 0 (config hash {hashes[others[0]]}, process 0's "
                    f"{hashes[0]}): run every node from the same commit and params.yaml, with the same data (dvc pull)"
                )
        self.previous = self._previous_record() if ctx.main else None
        unlogged = self.previous.training_id if self.previous and not self.previous.complete else None
        self.state = None if restart or not ctx.main else resume_state(self.checkpoint_path, self.digest, unlogged)
        if ctx.world_size > 1:  # process 0 sends the checkpoint it resumes: only its node needs the training's folder
            sent = broadcast_file(self.checkpoint_path if self.state else None, ctx)
            if not ctx.main and sent is not None:
                self.state = load_checkpoint_bytes(sent, f"{self.checkpoint_path} of process 0")
        state = self.state or {}
        self.start: int = state.get("iteration", 0)
        # Killed after its last checkpoint, before its end-of-training logging completed: only that is left.
        self.finishing = self.start >= cfg.iterations
        self.training_id: str = state.get("training_id") or uuid.uuid4().hex

        make_reproducible(cfg)
        model = build_model(model_name, **self.config["model_config"])
        if cfg.init == "identity":
            model.start_from_identity()
        model = model.to(ctx.device)
        if ctx.world_size > 1 and ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.scheduler = lr_schedule(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.dtype == torch.float16)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay and ctx.main else None  # only process 0 ships
        if self.state:
            self._restore(self.state)
        self.net = distribute(model, ctx, cfg.compile)
        self.sampler = TrainingSampler(len(train_set), cfg.batch_size, cfg.seed, self.start, ctx.rank, ctx.world_size)
        self.loader = training_loader(train_set, self.sampler, cfg, ctx)
        self.val_samples = validation_samples(cfg, data_root) if ctx.main else []
        self.baseline = input_psnr(self.val_samples) if ctx.main else None

        self.run_id: str | None = state.get("mlflow_run_id") or None
        self.experiment_id: str | None = None
        self.val_psnr: float | None = state.get("val_psnr")
        best = state.get("best") or {}
        self.best_psnr: float | None = best.get("val_psnr")
        self.best_iteration: int | None = best.get("iteration")
        self.last_saved: int | None = self.start if self.state else None
        # Metric rows not yet in MLflow: sent after each checkpoint, so that a resume, which redoes the steps
        # after the last checkpoint, never logs a step twice; a checkpoint carries those it was saved with.
        self.pending: list[dict[str, Any]] = list(state.get("metrics_pending", []))
        self.loss = float("nan")
        self.waits: list[float] = []
        self.totals: list[float] = []

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        restore_rng_state(state["rng"])

    @property
    def tracked(self) -> bool:
        return self.ctx.main and self.params.tracking.enabled

    def run(self, project_root: Path) -> TrainSummary:
        """The recipe, inside the training's MLflow run: every iteration a batch, an optimisation step, the EMA and
        the schedule; a curve row every `log_every`, a validation on the val split (a new best goes to best.pt)
        every `validate_every`, a checkpoint every `checkpoint_every`; all three at the last iteration."""
        cfg = self.cfg
        with self._bookkeeping(project_root):
            if self.finishing:
                return self._summary(self.state["summary"], "finished its iterations before: finishing its logging")
            with self._curves():
                for done in self._iterations():
                    loss, lr, waited = self._step(done)
                    if self._due(done, cfg.log_every):
                        self._log_step(done, loss, lr, waited)
                    if self._due(done, cfg.validate_every):
                        self._validate(done)
                    if self._due(done, cfg.checkpoint_every):
                        self.save(done)
            return self._summary({"loss": self.loss, **self._timing()}, f"trained {len(self.totals)} iterations")

    # --- the steps of the recipe ------------------------------------------------------------------------------

    def _iterations(self) -> Iterator[int]:
        """The iterations left, numbered from 1, with a progress bar on process 0; times each step."""
        steps = range(self.start, self.cfg.iterations)
        self.net.train()
        self.batches = iter(self.loader)
        self.began = self.tick = time.perf_counter()
        for iteration in progress(steps, desc=f"training {self.model_name}", unit="it") if self.ctx.main else steps:
            yield iteration + 1
            self.tick = time.perf_counter()  # validation and checkpoints are not step time

    def _step(self, done: int) -> tuple[float, float, float]:
        """One optimisation step on the next batch, then the EMA and the schedule; returns the loss, the learning
        rate the step used and the seconds spent waiting for the batch."""
        fetch = time.perf_counter()
        batch = next(self.batches)
        waited = time.perf_counter() - fetch
        lr = self.optimizer.param_groups[0]["lr"]
        degraded = batch["degraded"].to(self.ctx.device, non_blocking=True)
        clean = batch["clean"].to(self.ctx.device, non_blocking=True)
        loss = train_step(
            self.net, degraded, clean, self.optimizer, LOSSES[self.cfg.loss], self.scaler, self.dtype,
            self.ctx.world_size, self.cfg.grad_clip,
        )  # fmt: skip
        if not math.isfinite(loss):
            raise self._non_finite(loss, done, lr)
        if self.ema is not None:
            self.ema.update(self.model)
        self.scheduler.step()
        now = time.perf_counter()
        self.waits.append(waited)
        self.totals.append(now - self.tick)
        self.loss = loss
        return loss, lr, waited

    def _due(self, done: int, every: int) -> bool:
        """Process 0's periodic work: every `every` iterations and at the last one."""
        return self.ctx.main and (done % every == 0 or done == self.cfg.iterations)

    def _log_step(self, done: int, loss: float, lr: float, waited: float) -> None:
        self.train_log.write(
            {"iteration": done, "loss": loss, "lr": lr, "data_wait_s": waited, "step_s": self.totals[-1]}
        )
        self._log_metrics({"loss": loss, "lr": lr, "data_wait_s": waited}, done)

    def _shipped(self) -> nn.Module:
        """The weights this training hands on: the EMA's when it keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def _validate(self, done: int) -> None:
        """The validation PSNR of the shipped weights on the val clips; a new best is written to best.pt."""
        self.val_psnr = validate(self._shipped(), self.model_name, self.val_samples, self.ctx.device, self.dtype)
        self.val_log.write({"iteration": done, "val_psnr": self.val_psnr, "input_psnr": self.baseline})
        metrics = {"val_psnr": self.val_psnr, "val_input_psnr": self.baseline}
        if self.best_psnr is None or self.val_psnr > self.best_psnr:
            self.best_psnr, self.best_iteration = self.val_psnr, done
            self._save_best(done)
            metrics["best_val_psnr"] = self.val_psnr
        self._log_metrics(metrics, done)
        log.info(
            "%s iteration %d: loss %.4f, validation PSNR %.2f dB (input %.2f dB, best %.2f dB at %d)",
            self.model_name, done, self.loss, self.val_psnr, self.baseline, self.best_psnr, self.best_iteration,
        )  # fmt: skip

    def _save_best(self, done: int) -> None:
        """best.pt: the weights of the best validation so far, loadable as a model like the checkpoint. Written
        before the checkpoint that records it: a resume redoes the same validation and writes the same file."""
        save_checkpoint(
            self.best_path,
            {
                "model_name": self.model_name,
                "model_config": self.config["model_config"],
                "config_hash": self.digest,
                "training_id": self.training_id,
                "iteration": done,
                "val_psnr": self.val_psnr,
                "ema": False,  # the weights below are already the shipped ones
                "model": self._shipped().state_dict(),
            },
        )

    def save(self, iteration: int) -> None:
        """Write the checkpoint (with the metric rows not yet in MLflow), then send those rows."""
        timing = self._timing()
        if iteration == self.cfg.iterations:
            self._log_metrics(timing, iteration)
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
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": rng_state(),
                "mlflow_run_id": self.run_id or "",
                "training_id": self.training_id,
                "val_psnr": self.val_psnr,
                "best": {"val_psnr": self.best_psnr, "iteration": self.best_iteration},
                "summary": {"loss": self.loss, **timing},
                "metrics_pending": self.pending,
            },
        )
        self.last_saved = iteration
        self._flush()  # only now: a resume starts after this checkpoint and will not redo these steps

    def _timing(self) -> dict[str, float]:
        """The share of step time spent waiting for data, and the seconds since the loop began. The first step
        waits for the loader's workers to start: it is left out of the steady-state share."""
        steady = slice(1, None) if len(self.totals) > 1 else slice(None)
        waits, totals = self.waits[steady], self.totals[steady]
        fraction = float(sum(waits) / sum(totals)) if totals else 0.0
        return {"data_wait_fraction": fraction, "train_seconds": time.perf_counter() - self.began}

    def _summary(self, figures: dict[str, float], what: str) -> TrainSummary:
        if self.ctx.main:
            log.info(
                "%s: %s in %.0f s; data wait %.1f%% of step time",
                self.model_name, what, figures["train_seconds"], 100 * figures["data_wait_fraction"],
            )  # fmt: skip
        return TrainSummary(
            model=self.model_name,
            iterations=self.cfg.iterations,
            start_iteration=self.start,
            final_loss=figures["loss"],
            val_psnr=self.val_psnr,
            val_input_psnr=self.baseline,
            best_val_psnr=self.best_psnr,
            best_iteration=self.best_iteration,
            seconds=figures["train_seconds"],
            data_wait_fraction=figures["data_wait_fraction"],
            checkpoint=self.checkpoint_path,
            run_id=self.run_id,
            main=self.ctx.main,
        )

    # --- bookkeeping: curves, run.json, MLflow ----------------------------------------------------------------

    @contextlib.contextmanager
    def _bookkeeping(self, project_root: Path) -> Iterator[None]:
        """Open (or reopen) the MLflow run and mark run.json incomplete; on success send the curves, end the run,
        then mark run.json complete. A crash at any point before leaves a checkpoint and a record from which the
        next run resumes; an exception marks the MLflow run FAILED."""
        with contextlib.ExitStack() as stack:
            if self.tracked:
                self.run_id = stack.enter_context(self._mlflow_run(project_root))
            if self.ctx.main:
                self._write_record(complete=False)
            yield
            if self.tracked:
                self._log_outputs()
        if self.ctx.main:
            self._write_record(complete=True)

    @contextlib.contextmanager
    def _curves(self) -> Iterator[None]:
        """train.csv and validation.csv on process 0: resumed at the checkpoint's iteration, or started afresh."""
        if not self.ctx.main:
            yield
            return
        resume_at = self.start if self.state else None
        self.train_log = CsvLog(self.reports_dir / "train.csv", TRAIN_FIELDS, resume_at)
        self.val_log = CsvLog(self.reports_dir / "validation.csv", VALIDATION_FIELDS, resume_at)
        try:
            yield
        finally:
            self.train_log.close()
            self.val_log.close()

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
            client = mlflow.MlflowClient()
            if fresh:  # a resumed run has its params already
                tracking.log_training_config(
                    client,
                    self.run_id,
                    self.model_name,
                    training=self.cfg.model_dump(mode="json"),
                    architecture=self.config["model_config"],
                    data={
                        "manifest_checksum": self.config["data"],
                        "clips": self.params.data.clips.model_dump(mode="json"),
                    },
                    config_hash=self.digest,
                    params_count=sum(p.numel() for p in self.model.parameters()),
                )
            train_set = self.loader.dataset
            tracking.log_dataset_input(
                client, self.run_id, self.config["data"], "training", train_set.root, len(train_set.clips)
            )
            commit, dirty = tracking.git_commit(project_root)
            tags = {
                "model": self.model_name,
                "stage": "train",
                "world_size": self.ctx.world_size,
                "device": self.ctx.device.type,
                "data.manifest_checksum": self.config["data"],
                **tracking.dvc_experiment_tags(),
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
