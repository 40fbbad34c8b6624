"""Stage `split`: source videos -> 10-frame clips in the MWVD layout, split by source video, with a manifest.

Output (`<data>/mwvd`): `{train,val,test}/{input,gt}/<clip>/<NNNN>.png`, `{split}/physics/<clip>.npz` where the
source carries physics, `manifest.json`, and the published loader's annotation files `meta_info_{split}.txt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from weather_restore.config import ClipsConfig
from weather_restore.data.frames import read_frame, write_frame
from weather_restore.data.records import WEATHERS, Split, VideoRecord, Weather
from weather_restore.errors import ClipError
from weather_restore.outputs import atomic_path, check_output_folder, write_marker
from weather_restore.progress import progress

log = logging.getLogger(__name__)

SPLITS: tuple[Split, ...] = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
# An MWVD folder older than the output marker is recognised by its manifest.
MANIFEST_KEYS = frozenset({"version", "clip_len", "checksum", "clips"})


class Clip(BaseModel):
    """One clip of `clip_len` consecutive frames of a source video, as written in the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    weather: Weather
    split: Split
    source: str
    source_video: str
    video_id: str
    start: int
    stop: int
    params: dict[str, Any] = {}
    checksum: str = ""


def clip_windows(n_frames: int, clip_len: int) -> list[tuple[int, int]]:
    """Non-overlapping windows [start, stop) of `clip_len` frames; a shorter tail is dropped."""
    return [(start, start + clip_len) for start in range(0, n_frames - clip_len + 1, clip_len)]


def clip_name(record: VideoRecord, start: int) -> str:
    """`<weather>_<video>_<start>`: the weather prefix lets tools built for MWVD read the weather back."""
    video = record.video_id.replace("/", "-")
    prefix = "" if video.startswith(f"{record.weather}_") else f"{record.weather}_"
    return f"{prefix}{video}_{start:04d}"


ATTEMPTS = 200
"""Orders of the free sources `assign_splits` tries before it reports that the targets cannot be met."""


def assign_splits(records: list[VideoRecord], cfg: ClipsConfig) -> dict[str, Split]:
    """Split by source video: every video of one source lands in the same split, so train, val and test share none.

    Sources a dataset assigns itself keep their split (when `respect_source_split`); the rest are free. In turn:
    - test: the free sources, shuffled with the seed: a `test_fraction` of them, plus more while test still lacks
      clips of a weather;
    - val: carved from what is left (the remaining free sources, then the dataset's training sources, each
      shuffled) while val lacks clips of a weather (`val_per_weather`; 0 = one source per weather). A dataset's
      own validation split counts first, so a weather it covers takes nothing from training;
    - train: the rest.
    A source goes to test or val only if every weather it holds keeps a source for each split still to fill.
    When an order leaves a split short of its clips per weather, the next seeded order is tried (the first that
    meets every target wins, so a seed always gives the same split); `select_clips` reports a shortage no order
    avoids.
    """
    groups: dict[str, list[VideoRecord]] = defaultdict(list)
    for record in records:
        groups[record.source_video].append(record)

    fixed: dict[str, Split] = {}
    free: list[str] = []
    given_train: list[str] = []
    for source_video, videos in groups.items():
        given = {v.split for v in videos if v.split is not None}
        if len(given) > 1:
            ids = [v.video_id for v in videos]
            named = " and ".join(split for split in SPLITS if split in given)
            raise ClipError(f"source video {source_video} is in {named} of its dataset: {ids}")
        if given and cfg.respect_source_split:
            split = given.pop()
            if split == "train":
                given_train.append(source_video)
            else:
                fixed[source_video] = split
        else:
            free.append(source_video)

    clips_of = {source_video: _clip_counts(videos, cfg.clip_len) for source_video, videos in groups.items()}
    targets = {"train": cfg.train_per_weather, "val": cfg.val_per_weather, "test": cfg.test_per_weather}
    first = None
    for attempt in range(ATTEMPTS):
        order = (cfg.seed, cfg.seed + 1) if attempt == 0 else ([cfg.seed, attempt], [cfg.seed + 1, attempt])
        orders = (_shuffled(free, order[0]), _shuffled(given_train, order[1]))
        assignment, have = _assign_once(orders, fixed, clips_of, cfg)
        first = first or (assignment, have)
        enough = all(have[split][w] >= n for split, n in targets.items() for w in WEATHERS if _holds(clips_of, w))
        if enough and all(sum(have[split].values()) for split in SPLITS):
            break
    else:
        assignment, have = first
    if empty := [split for split in SPLITS if not sum(have[split].values())]:
        raise ClipError(
            f"the {len(groups)} source videos cannot give every split one of its own: no clip is left for "
            f"{' and '.join(empty)} (train, val and test share none). Add source videos (the params "
            "data.synthetic.videos_per_weather, or data.sources), or set data.clips.respect_source_split: false "
            "if the datasets' own splits hold them all"
        )
    return assignment


def _holds(clips_of: dict[str, Counter[str]], weather: str) -> bool:
    return any(counts[weather] for counts in clips_of.values())


def _assign_once(
    orders: tuple[list[str], list[str]],
    fixed: dict[str, Split],
    clips_of: dict[str, Counter[str]],
    cfg: ClipsConfig,
) -> tuple[dict[str, Split], dict[str, Counter[str]]]:
    """One pass of `assign_splits` over the free and the dataset's training sources in the given orders:
    (source video -> split, clips per split and weather)."""
    shuffled, given_train = orders
    assignment = dict(fixed)
    have: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
    for source_video, split in assignment.items():
        have[split].update(clips_of[source_video])
    # Sources still unassigned that hold each weather: what the later splits can draw on.
    left: Counter[str] = Counter(w for s in (*shuffled, *given_train) for w, n in clips_of[s].items() if n)

    def spare(source_video: str, later_splits: int) -> bool:
        return all(left[w] - 1 >= later_splits for w, n in clips_of[source_video].items() if n)

    def take(source_video: str, split: Split) -> None:
        assignment[source_video] = split
        have[split].update(clips_of[source_video])
        left.subtract(w for w, n in clips_of[source_video].items() if n)

    def short(source_video: str, split: Split, target: int) -> bool:
        return any(have[split][w] < target for w, n in clips_of[source_video].items() if n)

    minimum_test = math.ceil(cfg.test_fraction * len(shuffled)) if shuffled else 0
    taken = 0
    for source_video in shuffled:
        wanted = taken < minimum_test or short(source_video, "test", cfg.test_per_weather)
        if wanted and spare(source_video, later_splits=2):
            take(source_video, "test")
            taken += 1
    candidates = [s for s in shuffled if s not in assignment] + given_train
    for source_video in candidates:
        if short(source_video, "val", max(cfg.val_per_weather, 1)) and spare(source_video, later_splits=1):
            take(source_video, "val")
    for source_video in candidates:
        if source_video not in assignment:
            take(source_video, "train")
    return assignment, have


def _clip_counts(videos: list[VideoRecord], clip_len: int) -> Counter[str]:
    """Clips each weather of one source video can give."""
    counts: Counter[str] = Counter()
    for video in videos:
        counts[video.weather] += len(clip_windows(video.n_frames, clip_len))
    return counts


def _shuffled(names: list[str], seed: int | list[int]) -> list[str]:
    ordered = sorted(names)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def select_clips(records: list[VideoRecord], assignment: dict[str, Split], cfg: ClipsConfig) -> list[Clip]:
    """Take clips per split and weather up to the targets, spread round-robin over the videos."""
    targets = {"train": cfg.train_per_weather, "val": cfg.val_per_weather, "test": cfg.test_per_weather}
    selected: list[Clip] = []
    shortages = []
    for split in SPLITS:
        for weather in WEATHERS:
            videos = sorted(
                (r for r in records if r.weather == weather and assignment[r.source_video] == split),
                key=lambda r: r.video_id,
            )
            per_video = [[(v, s, e) for s, e in clip_windows(v.n_frames, cfg.clip_len)] for v in videos]
            available = sum(len(windows) for windows in per_video)
            wanted = targets[split] or available
            if available < wanted:
                shortages.append(f"{split}/{weather}: {wanted} clips asked, the sources supply {available}")
                continue
            round_robin = [
                w
                for rank in range(max(map(len, per_video), default=0))
                for w in (windows[rank] for windows in per_video if rank < len(windows))
            ]
            for video, start, stop in round_robin[:wanted]:
                selected.append(
                    Clip(
                        id=clip_name(video, start),
                        weather=weather,
                        split=split,
                        source=video.source,
                        source_video=video.source_video,
                        video_id=video.video_id,
                        start=start,
                        stop=stop,
                        params=video.params,
                    )
                )
    if shortages:
        raise ClipError(
            "the sources cannot supply the clips the params data.clips ask for "
            f"(clip_len {cfg.clip_len}): "
            + "; ".join(shortages)
            + ". Lower train_per_weather/val_per_weather/test_per_weather (0 = all available) or add videos."
        )
    return selected


def _write_clip(args: tuple[Clip, VideoRecord, Path]) -> str:
    """Write one clip's frames (PNG sources are copied byte for byte) and return its checksum."""
    clip, video, root = args
    digest = hashlib.sha256()
    for kind, frames in (("input", video.input_frames), ("gt", video.gt_frames)):
        folder = root / clip.split / kind / clip.id
        folder.mkdir(parents=True, exist_ok=True)
        for index, source in enumerate(frames[clip.start : clip.stop]):
            target = folder / f"{index:04d}.png"
            if source.suffix.lower() == ".png":
                shutil.copyfile(source, target)
            else:
                write_frame(target, read_frame(source))
            digest.update(target.read_bytes())
    if video.physics is not None:
        with np.load(video.physics) as physics:
            sliced = {k: (v[clip.start : clip.stop] if v.ndim >= 3 else v) for k, v in physics.items()}
        target = root / clip.split / "physics" / f"{clip.id}.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(target, **sliced)
    return digest.hexdigest()


def write_clips(
    records: list[VideoRecord],
    cfg: ClipsConfig,
    out_root: Path,
    workers: int = 1,
    force: bool = False,
    inputs: tuple[Path, ...] = (),
) -> list[Clip]:
    """Run the stage: assign, select, write into a temporary sibling, then move into place.

    `out_root` may replace only an MWVD folder an earlier run wrote (or, with `force`, any folder), never a
    folder holding `inputs` (the videos folder), the source frames or the current folder."""
    frame_folders = {frame.parent for record in records for frame in (*record.input_frames, *record.gt_frames)}
    out_root = check_output_folder(
        out_root, "split", [*inputs, *sorted(frame_folders)], force, (MANIFEST_NAME, MANIFEST_KEYS)
    )
    assignment = assign_splits(records, cfg)
    clips = select_clips(records, assignment, cfg)
    by_id = {r.video_id: r for r in records}
    with atomic_path(out_root) as tmp:
        tmp.mkdir()
        write_marker(tmp, "split")
        args = [(clip, by_id[clip.video_id], tmp) for clip in clips]
        if workers <= 1:
            checksums = list(progress(map(_write_clip, args), total=len(args), desc="writing clips", unit="clip"))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = pool.map(_write_clip, args, chunksize=4)
                checksums = list(progress(results, total=len(args), desc="writing clips", unit="clip"))
        clips = [c.model_copy(update={"checksum": s}) for c, s in zip(clips, checksums, strict=True)]
        write_manifest(clips, cfg, tmp)
    summary = {s: {w: sum(c.split == s and c.weather == w for c in clips) for w in WEATHERS} for s in SPLITS}
    log.info("wrote %d clips to %s: %s", len(clips), out_root, summary)
    return clips


def manifest_checksum(clips: list[Clip]) -> str:
    """One checksum of the whole dataset: the clips' ids, splits and frame checksums."""
    digest = hashlib.sha256()
    for clip in sorted(clips, key=lambda c: (c.split, c.id)):
        digest.update(f"{clip.split}/{clip.id}:{clip.checksum}\n".encode())
    return digest.hexdigest()


def write_manifest(clips: list[Clip], cfg: ClipsConfig, root: Path) -> None:
    manifest = {
        "version": 1,
        "clip_len": cfg.clip_len,
        "checksum": manifest_checksum(clips),
        "clips": [clip.model_dump(mode="json") for clip in clips],
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    for split in SPLITS:
        lines = [f"{c.id} {c.stop - c.start}\n" for c in clips if c.split == split]
        (root / f"meta_info_{split}.txt").write_text("".join(lines))


def read_manifest(root: Path) -> tuple[str, list[Clip]]:
    """(dataset checksum, clips) of `<root>/manifest.json`."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ClipError(f"{path}: no manifest; run the split stage first (weather-restore split)")
    rerun = "rerun `weather-restore split`"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ClipError(f"{path}: not valid JSON (line {error.lineno}): {rerun}") from None
    except UnicodeDecodeError:
        raise ClipError(f"{path}: not valid JSON (not UTF-8 text): {rerun}") from None
    try:
        return data["checksum"], [Clip.model_validate(row) for row in data["clips"]]
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ClipError(f"{path}: a clip's '{where}' is not allowed ({first['msg']}): {rerun}") from None
    except (KeyError, TypeError) as error:
        raise ClipError(f"{path}: not a manifest of `weather-restore split` (no {error}): {rerun}") from None


def clip_frames(root: Path, clip: Clip, kind: str) -> list[Path]:
    """Frame files of one written clip, `kind` 'input' (degraded) or 'gt' (clean)."""
    return [Path(root) / clip.split / kind / clip.id / f"{i:04d}.png" for i in range(clip.stop - clip.start)]


def load_clip(root: Path, clip: Clip) -> tuple[np.ndarray, np.ndarray]:
    """(degraded, clean) of one written clip, each (T, H, W, 3) float32 in [0, 1]."""
    degraded = np.stack([read_frame(p) for p in clip_frames(root, clip, "input")])
    clean = np.stack([read_frame(p) for p in clip_frames(root, clip, "gt")])
    return degraded, clean
