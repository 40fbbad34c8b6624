"""Stage `assemble`: sources -> source videos, listed in `<data>/videos/index.json`.

The built-in generator renders its videos to `<data>/videos/<video_id>/{input,gt}/NNNN.png` with the physics
(t, A, weather layer) in `physics.npz` beside them. Imported datasets are validated and indexed in place: their
frames are read from where they are, so a 15,000-pair dataset is not copied twice (the `split` stage writes the
MWVD clips).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weather_restore.config import DataConfig, SyntheticConfig
from weather_restore.data.frames import write_frame
from weather_restore.data.records import WEATHERS, VideoRecord
from weather_restore.errors import ConfigError, DataError
from weather_restore.outputs import atomic_path, check_output_folder, write_marker
from weather_restore.progress import progress

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
# A videos folder older than the output marker is recognised by its index.
INDEX_KEYS = frozenset({"version", "videos"})


@dataclass(frozen=True)
class SyntheticJob:
    """One video of the built-in generator: which photograph, which weather, and its own seed."""

    video_id: str
    weather: str
    photograph: str
    seed: tuple[int, ...]


def synthetic_jobs(cfg: SyntheticConfig, photographs: list[str]) -> list[SyntheticJob]:
    """Every video the generator makes. Photographs rotate across videos and weathers; each video's seed
    derives from (seed, weather, index) so the result is independent of worker count and order."""
    jobs = []
    for w, weather in enumerate(WEATHERS):
        for index in range(cfg.videos_per_weather):
            photograph = photographs[(index + w) % len(photographs)]
            jobs.append(
                SyntheticJob(
                    video_id=f"synthetic/{weather}/{photograph}-{index:02d}",
                    weather=weather,
                    photograph=photograph,
                    seed=(cfg.seed, w, index),
                )
            )
    return jobs


def render_synthetic_video(job: SyntheticJob, cfg: SyntheticConfig, out_root: Path) -> VideoRecord:
    """Render one video with its weather and write frames and physics under `out_root/<video_id>`."""
    from weather_restore.data.footage import render_clean_video
    from weather_restore.data.weather import render_weather

    rng = np.random.default_rng(np.random.SeedSequence(list(job.seed)))
    clean, depth = render_clean_video(job.photograph, cfg.frames_per_video, tuple(cfg.frame_size), rng)
    sample = render_weather(job.weather, clean, depth, cfg, rng)
    folder = out_root / job.video_id
    inputs, gts = [], []
    for t in range(clean.shape[0]):
        inputs.append(folder / "input" / f"{t:04d}.png")
        gts.append(folder / "gt" / f"{t:04d}.png")
        write_frame(inputs[-1], sample.degraded[t])
        write_frame(gts[-1], clean[t])
    physics = folder / "physics.npz"
    np.savez_compressed(
        physics,
        transmission=sample.transmission.astype(np.float16),
        airlight=np.asarray(sample.airlight, dtype=np.float32),
        layer=sample.layer.astype(np.float16),
        depth=depth.astype(np.float16),
    )
    return VideoRecord(
        video_id=job.video_id,
        weather=job.weather,
        source="synthetic",
        source_video=f"synthetic/{job.photograph}",
        input_frames=inputs,
        gt_frames=gts,
        params=sample.params,
        physics=physics,
    )


def _render_job(args: tuple[SyntheticJob, SyntheticConfig, Path]) -> VideoRecord:
    return render_synthetic_video(*args)


def worker_count(requested: int) -> int:
    return requested or os.cpu_count() or 1


def generate_synthetic(cfg: SyntheticConfig, out_root: Path, workers: int) -> list[VideoRecord]:
    """Render every synthetic video with a process pool and a progress bar."""
    from weather_restore.data.footage import available_photographs

    available = available_photographs()
    photographs = cfg.photographs or available
    unknown = sorted(set(photographs) - set(available))
    if unknown:
        raise ConfigError(f"{unknown} are not available; choose from {available}", key="data.synthetic.photographs")
    jobs = synthetic_jobs(cfg, photographs)
    args = [(job, cfg, out_root) for job in jobs]
    if workers <= 1:
        results = map(_render_job, args)
        return list(progress(results, total=len(jobs), desc="rendering videos", unit="video"))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_render_job, args)
        return list(progress(results, total=len(jobs), desc="rendering videos", unit="video"))


def write_index(records: list[VideoRecord], out_root: Path) -> Path:
    """index.json: the records, frame paths relative to `out_root` when inside it (portable), else absolute."""

    def rel(path: Path) -> str:
        try:
            return path.resolve().relative_to(out_root.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())

    rows = []
    for record in records:
        row = record.model_dump(mode="json")
        row["input_frames"] = [rel(p) for p in record.input_frames]
        row["gt_frames"] = [rel(p) for p in record.gt_frames]
        row["physics"] = rel(record.physics) if record.physics else None
        rows.append(row)
    path = out_root / INDEX_NAME
    path.write_text(json.dumps({"version": 1, "videos": rows}, indent=1))
    return path


def read_index(videos_root: Path) -> list[VideoRecord]:
    """The records of `<videos_root>/index.json`, with frame paths made absolute again."""
    path = videos_root / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path}: no video index; run the assemble stage first (weather-restore assemble)")
    try:
        rows = json.loads(path.read_text())["videos"]
    except (json.JSONDecodeError, KeyError) as error:
        raise DataError(f"{path}: not a video index ({error}); re-run weather-restore assemble") from None

    def absolute(value: str) -> Path:
        candidate = Path(value)
        return candidate if candidate.is_absolute() else videos_root / candidate

    records = []
    for row in rows:
        row["input_frames"] = [absolute(p) for p in row["input_frames"]]
        row["gt_frames"] = [absolute(p) for p in row["gt_frames"]]
        row["physics"] = absolute(row["physics"]) if row.get("physics") else None
        records.append(VideoRecord.model_validate(row))
    return records


def assemble(cfg: DataConfig, out_root: Path, force: bool = False) -> list[VideoRecord]:
    """Run the stage: build every source video into a temporary sibling, then move it into place.

    `out_root` may replace only a videos folder an earlier run wrote (or, with `force`, any folder), never
    the imported datasets' folders or the current folder."""
    from weather_restore.data.sources import import_source

    out_root = check_output_folder(
        out_root, "assemble", [source.root for source in cfg.sources], force, (INDEX_NAME, INDEX_KEYS)
    )
    with atomic_path(out_root) as tmp:
        tmp.mkdir()
        write_marker(tmp, "assemble")
        if cfg.sources:
            records = [record for source in cfg.sources for record in import_source(source)]
        else:
            records = generate_synthetic(cfg.synthetic, tmp, worker_count(cfg.workers))
        ids = [r.video_id for r in records]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"video ids occur twice: {duplicates[:5]}", key="data.sources")
        write_index(records, tmp)
    counts = {w: sum(r.weather == w for r in records) for w in WEATHERS}
    log.info("assembled %d videos into %s (%s)", len(records), out_root, counts)
    return read_index(out_root)
