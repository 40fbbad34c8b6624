"""Importers of published weather-video datasets: a dataset's folder tree -> `VideoRecord`s, frames indexed in place.

Layouts (shared/spec/data.md, section 2):

    MWVD (published)  <root>/{train,test}/{input,gt}/<clip>/<frame>
    RainSynAll100     <root>/Video_rain_synthesis_{train,test}/{Rain_Haze,Rain,GT[,Haze,Trans,Alpha]}/<NNNN>/<k>.jpg
    HazeWorld         <root>/{hazy,gt}/<Dataset>/[<split>/]<video>_<A*255>_<beta>/ or gt/<Dataset>/<split>/<video>/,
                      or MAP-Net's symlinked <root>/{train,test}/{hazy,gt}/<Dataset>/<video>_<A*255>_<beta>/
    RVSD              <root>/{train,test}/{clean,<snowy>}/<video>/<frame>
    folder pairs      <Set>/{Train,Test}/<video>/<frame> with <Set>/{Train,Test}_GT/<video>/<frame>

Every importer checks the whole tree before it returns: each input video has its ground truth, with as many
frames, all frames of a video have one size, and every frame file opens. Frames are checked by their header
only (`frames.frame_size`, PIL's `open` + `verify`), because decoding every pixel of a 100 GB dataset takes hours.
That catches missing, empty and non-image files, truncated PNGs and PNG checksum errors; a JPEG whose compressed
data is cut short still passes here and fails later, when the clip stage decodes it.

Frames are paired by their natural order (`2.jpg` before `10.jpg`), never by formatting names; input and ground
truth may use different extensions. `source_video` names the clean footage, the unit of the train/test split;
each importer's docstring says how it is chosen for its layout.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import get_args

from weather_restore.config import SourceConfig
from weather_restore.data.clips import MANIFEST_NAME, Clip, read_manifest
from weather_restore.data.frames import FRAME_SUFFIXES, frame_size, list_frames, natural_key
from weather_restore.data.records import WEATHERS, Split, VideoRecord, Weather
from weather_restore.errors import ClipError, ConfigError, DataError
from weather_restore.progress import progress

log = logging.getLogger(__name__)

SPLITS: tuple[Split, ...] = get_args(Split)
"""Every split a record may carry; an MWVD tree may hold a folder for each (a validation split is optional)."""
RAINSYN_INPUTS: dict[str, Weather] = {"Rain_Haze": "rain", "Rain": "rain", "Haze": "haze"}
RAINSYN_TEST_IDS = range(900, 1000)
"""RainSynAll100's test ids (0900-0999); some copies of the train folder hold them too."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]+")
_WEATHER_PREFIX = re.compile(r"^(haze|rain|snow)(?:[_-]|$)", re.IGNORECASE)
_HAZY_NAME = re.compile(r"^(?P<video>.+)_(?P<airlight>\d{1,3})_(?P<beta>\d*\.?\d+)$")

# Which SourceConfig options each kind reads; any other option set is a mistake worth stopping for.
_OPTIONS = {
    "mwvd": {"weather", "weather_map"},
    "rainsynall100": {"weather", "input_folder", "include_test_in_train"},
    "hazeworld": {"weather"},
    "rvsd": {"weather", "input_folder"},
    "folders": {"weather"},
}


def import_source(cfg: SourceConfig) -> list[VideoRecord]:
    """Import one configured dataset with the importer of its `kind`."""
    where = f"data.sources ({cfg.kind} at {cfg.root})"
    set_options = {name for name in ("weather", "weather_map", "input_folder") if getattr(cfg, name) is not None}
    if cfg.include_test_in_train:
        set_options.add("include_test_in_train")
    if unused := sorted(set_options - _OPTIONS[cfg.kind]):
        raise ConfigError(f"{where}: {', '.join(unused)} does not apply to {cfg.kind}")
    if cfg.kind == "mwvd":
        return import_mwvd(cfg.root, cfg.weather, cfg.weather_map)
    if cfg.kind == "folders":
        if cfg.weather is None:
            raise ConfigError(f"{where}: set weather (haze, rain or snow) for a folder-pair dataset")
        return import_folder_pairs(cfg.root, cfg.weather)

    input_folder = cfg.input_folder or "Rain_Haze"
    weather = {"rainsynall100": RAINSYN_INPUTS.get(input_folder), "hazeworld": "haze", "rvsd": "snow"}[cfg.kind]
    if cfg.weather is not None and weather is not None and cfg.weather != weather:
        raise ConfigError(f"{where}: weather is set to {cfg.weather}, but this dataset holds {weather}")
    if cfg.kind == "rainsynall100":
        return import_rainsynall100(cfg.root, input_folder, cfg.include_test_in_train)
    if cfg.kind == "hazeworld":
        return import_hazeworld(cfg.root)
    return import_rvsd(cfg.root, cfg.input_folder)


# --- MWVD (published) -----------------------------------------------------------------------------------------


def import_mwvd(
    root: Path | str, weather: Weather | None = None, weather_map: Path | str | None = None
) -> list[VideoRecord]:
    """The published MWVD layout `<root>/{train,test}/{input,gt}/<clip>/<frame>`; ground truth at the same names.

    A clip is a folder of frames under `input/`; its key is its path below `input/` (it may contain '/'). The
    split is the folder it lies in (`val/` too, when the tree has one).
    Weather: the clip's entry in `manifest.json` when this project's split stage wrote the tree, else a
    `haze_`/`rain_`/`snow_` prefix of the clip's name (or of a folder above it), else the clip's line in
    `weather_map` (`<clip> <weather>` or `<split>/<clip> <weather>`), else `weather`; a DataError otherwise,
    and when two of the first three disagree.

    source_video: the published dataset does not say which clips come from one video, so each clip is its own
    source and the dataset's own train/test split (kept by the clip stage) is the guard against overlap. A tree
    written by this project's split stage carries `manifest.json`; then each clip gets its real source video and
    weather parameters from it. The annotation files `<root>/meta_info_{split}.txt` (`<clip> <frames>`
    lines), when present, are checked against the frame counts on disk.
    """
    root = _dataset_root(root)
    map_path = Path(weather_map).expanduser().absolute() if weather_map is not None else None
    mapping = _read_weather_map(map_path) if map_path is not None else {}
    own = _own_clips(root)

    found: list[tuple[Split, str, Path, Path]] = []
    counts = {split: _read_counts(root / f"meta_info_{split}.txt") for split in SPLITS}
    for split, split_dir in _split_folders(root, {split: split for split in SPLITS}):
        input_top = _folder(split_dir / "input", "input")
        gt_top = _folder(split_dir / "gt", "ground-truth")
        keys = [clip_dir.relative_to(input_top).as_posix() for clip_dir in _clip_folders(input_top)]
        _check_listed(counts[split], keys, input_top)
        found.extend((split, key, input_top / key, gt_top / key) for key in keys)

    records = []
    for split, key, input_dir, gt_dir in progress(found, total=len(found), desc="checking mwvd", unit="clip"):
        inputs, clean = _paired_frames(input_dir, gt_dir, same_names=True)
        if key in counts[split] and counts[split][key][0] != len(inputs):
            listed, line = counts[split][key]
            raise ClipError(f"{input_dir} has {len(inputs)} frames, but {line} says {listed}")
        video_id = _safe_id("mwvd", split, key)
        clip = own.get((split, key))
        if own and clip is None:
            log.warning("%s: not in %s; its weather and source video come from its name", input_dir, MANIFEST_NAME)
        records.append(
            VideoRecord(
                video_id=video_id,
                weather=_mwvd_weather(split, key, input_dir, mapping, map_path, weather, clip, root),
                source="mwvd",
                source_video=clip.source_video if clip else video_id,
                split=split,
                input_frames=inputs,
                gt_frames=clean,
                params=dict(clip.params) if clip else {},
            )
        )
    return _finish("mwvd", root, records)


def _mwvd_weather(
    split: str,
    key: str,
    clip_dir: Path,
    mapping: dict[str, Weather],
    map_path: Path | None,
    default: Weather | None,
    clip: Clip | None,
    root: Path,
) -> Weather:
    named = next((m.group(1).lower() for part in reversed(key.split("/")) if (m := _WEATHER_PREFIX.match(part))), None)
    mapped = mapping.get(f"{split}/{key}", mapping.get(key))
    said = [
        (what, weather)
        for what, weather in (
            (str(root / MANIFEST_NAME), clip.weather if clip else None),
            ("the clip's name", named),
            (str(map_path), mapped),
        )
        if weather is not None
    ]
    if len({weather for _, weather in said}) > 1:
        raise DataError(f"{clip_dir}: weather disagrees: " + ", ".join(f"{what} says {w}" for what, w in said))
    weather = said[0][1] if said else default
    if weather is None:
        source = (
            f"{map_path} has no line for '{key}'"
            if map_path is not None
            else "its entry of the params data.sources sets no weather_map file or weather"
        )
        raise DataError(f"{clip_dir}: weather unknown: the name has no haze_/rain_/snow_ prefix and {source}")
    return weather


def _read_weather_map(path: Path) -> dict[str, Weather]:
    """`<clip> <weather>` lines; blank lines and `#` comments are skipped."""
    if not path.is_file():
        raise DataError(f"{path}: weather map file not found")
    mapping: dict[str, Weather] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1].lower() not in WEATHERS:
            raise DataError(f"{path}:{number}: expected '<clip> <haze|rain|snow>', got {line.strip()!r}")
        mapping[parts[0].strip("/")] = parts[1].lower()
    return mapping


def _own_clips(root: Path) -> dict[tuple[str, str], Clip]:
    """Clips of a manifest written by this project's split stage, by (split, clip name); {} for others."""
    if not (root / MANIFEST_NAME).is_file():
        return {}
    try:
        _, clips = read_manifest(root)
    except (ValueError, KeyError, TypeError) as error:
        log.warning("%s: not this project's manifest (%s); each clip is its own source video", root, error)
        return {}
    return {(clip.split, clip.id): clip for clip in clips}


def _clip_folders(top: Path) -> list[Path]:
    """Folders below `top` that hold frames, in natural order; a folder with neither frames nor folders is an error."""
    if list_frames(top):
        raise DataError(f"{top}: frames lie directly in this folder; expected one folder per clip")
    clips = []
    for folder in _subfolders(top):
        if list_frames(folder):
            clips.append(folder)
        elif _subfolders(folder):
            clips.extend(_clip_folders(folder))
        else:
            raise DataError(f"{folder}: no frames (expected {'/'.join(FRAME_SUFFIXES)} files)")
    return clips


# --- RainSynAll100 --------------------------------------------------------------------------------------------


def import_rainsynall100(
    root: Path | str, input_folder: str = "Rain_Haze", include_test_in_train: bool = False
) -> list[VideoRecord]:
    """RainSynAll100 (Yang et al., TPAMI 2022): `Video_rain_synthesis_{train,test}/<input_folder>/<NNNN>/<k>.jpg`.

    Input is `Rain_Haze` (rain streaks over an accumulation veil), `Rain` (streaks only) or `Haze`; ground truth
    in `GT`. Train-folder videos with the test ids 0900-0999 are left out unless `include_test_in_train` (some
    copies of the dataset hold them in both folders). Videos shorter than a clip are kept: the clip stage decides.

    source_video: the video id (`rainsynall100/0012`), one clean video per id, shared by a test video and its
    train-folder copy. Copies kept with `include_test_in_train` get their own source (`rainsynall100/train-copy/
    0950`): the user chose to leak, and one source may not sit in both splits. params name the `Trans`
    (transmission t) and `Alpha` (atmospheric light A) folders of the video when the dataset has them.
    """
    root = _dataset_root(root)
    if input_folder not in RAINSYN_INPUTS:
        raise ConfigError(f"{root}: input folder {input_folder!r} is not one of {', '.join(RAINSYN_INPUTS)}")
    folders = {"train": "Video_rain_synthesis_train", "test": "Video_rain_synthesis_test"}

    found: list[tuple[Split, Path, Path, Path, bool]] = []
    excluded = 0
    for split, split_dir in _split_folders(root, folders):
        input_top = _folder(split_dir / input_folder, "input")
        gt_top = _folder(split_dir / "GT", "ground-truth")
        for video_dir in _subfolders(input_top):
            copy = split == "train" and video_dir.name.isdigit() and int(video_dir.name) in RAINSYN_TEST_IDS
            if copy and not include_test_in_train:
                excluded += 1
                continue
            found.append((split, split_dir, video_dir, gt_top / video_dir.name, copy))
    if excluded:
        log.info(
            "rainsynall100: left out %d videos with test ids 0900-0999 found in %s (they would leak into test)",
            excluded,
            root / folders["train"],
        )
    if kept := sum(copy for *_, copy in found):
        log.warning("rainsynall100: kept %d train-folder copies of test videos (include_test_in_train)", kept)

    records = []
    for split, split_dir, video_dir, gt_dir, copy in progress(
        found, total=len(found), desc="checking rainsynall100", unit="video"
    ):
        inputs, clean = _paired_frames(video_dir, gt_dir)
        name = video_dir.name
        params: dict[str, str] = {"input": input_folder}
        for key, folder in (("transmission_dir", "Trans"), ("airlight_dir", "Alpha")):
            if (split_dir / folder / name).is_dir():
                params[key] = str(split_dir / folder / name)
        records.append(
            VideoRecord(
                video_id=_safe_id("rainsynall100", split, name),
                weather=RAINSYN_INPUTS[input_folder],
                source="rainsynall100",
                source_video=_safe_id("rainsynall100", "train-copy" if copy else "", name),
                split=split,
                input_frames=inputs,
                gt_frames=clean,
                params=params,
            )
        )
    return _finish("rainsynall100", root, records)


# --- HazeWorld ------------------------------------------------------------------------------------------------


def import_hazeworld(root: Path | str) -> list[VideoRecord]:
    """HazeWorld (MAP-Net, CVPR 2023): hazy clips `hazy/<Dataset>/[<split>/]<video>_<A*255>_<beta>/`.

    Ground truth is the folder of the same name under `gt/`, else `gt/<Dataset>/<split>/<video>/` (one clean
    video for all its densities). MAP-Net's symlinked `{train,test}/{hazy,gt}/<Dataset>/<video>_<A>_<beta>/` is
    read when there is no `hazy/` at the root. The split comes from that folder, else from the split lists
    `{train,test}/meta_info_GT_{train,test}.txt` (`<Dataset>/<video>_<A>_<beta> <frames>` lines, whose counts are
    checked), else it is left to the clip stage.

    source_video: `hazeworld/<Dataset>/[<split>/]<video>`, the name with A and beta removed (plus the source
    dataset's own split folder when the tree has one, as REDS reuses names across its splits), so that all
    densities of one video share it. params: dataset, airlight A (= name / 255), beta, and the transmission folder
    when there is one (`transmission/<Dataset>/<split>/<video>_<beta>/` or the clip's own name).
    """
    root = _dataset_root(root)
    if (root / "hazy").is_dir():
        tops: list[tuple[Split | None, Path]] = [(None, root)]
    else:
        tops = [(split, root / split) for split in SPLITS if (root / split / "hazy").is_dir()]
    if not tops:
        raise DataError(f"{root}: no hazy folder (expected hazy/<Dataset>/<video>_<A>_<beta>/ or train/hazy/...)")
    listed = {}
    for split in SPLITS:
        for key, entry in _read_counts(root / split / f"meta_info_GT_{split}.txt").items():
            listed[key] = (split, *entry)

    found = []
    for top_split, top in tops:
        hazy_top, gt_top = top / "hazy", _folder(top / "gt", "ground-truth")
        found.extend((top_split, *clip, gt_top) for clip in _hazy_folders(hazy_top))
    keys = {f"{dataset}/{hazy_dir.name}" for _, dataset, _, hazy_dir, _, _ in found}
    for key, (_, _, line) in listed.items():
        if key not in keys:
            raise DataError(f"{line}: lists {key}, but there is no such hazy folder under {root}")
    if listed and (unlisted := len(keys - listed.keys())):
        log.warning("hazeworld: %d hazy clips are in no split list; the clip stage assigns them", unlisted)

    records = []
    for top_split, dataset, own_split, hazy_dir, match, gt_top in progress(
        found, total=len(found), desc="checking hazeworld", unit="video"
    ):
        video, airlight, beta = match["video"], int(match["airlight"]), match["beta"]
        if not 0 < airlight <= 255:
            raise DataError(f"{hazy_dir}: airlight {airlight} in the name is not A*255 in (0, 255]")
        gt_dir, gt_split = _hazeworld_gt(hazy_dir, gt_top, dataset, own_split, video)
        inputs, clean = _paired_frames(hazy_dir, gt_dir)

        split = top_split
        key = f"{dataset}/{hazy_dir.name}"
        if key in listed:
            listed_split, count, line = listed[key]
            if count != len(inputs):
                raise ClipError(f"{hazy_dir} has {len(inputs)} frames, but {line} says {count}")
            if split is not None and listed_split != split:
                raise DataError(f"{hazy_dir}: lies in {split}, but {line} lists it in {listed_split}")
            split = listed_split

        params: dict[str, str | float] = {"dataset": dataset, "airlight": airlight / 255, "beta": float(beta)}
        trans_top = gt_top.parent / "transmission" / dataset
        for candidate in (
            trans_top / (own_split or "") / hazy_dir.name,
            trans_top / (gt_split or "") / f"{video}_{beta}",
        ):
            if candidate.is_dir():
                params["transmission_dir"] = str(candidate)
                break
        records.append(
            VideoRecord(
                video_id=_safe_id("hazeworld", dataset, own_split or "", hazy_dir.name),
                weather="haze",
                source="hazeworld",
                source_video=_safe_id("hazeworld", dataset, gt_split or "", video),
                split=split,
                input_frames=inputs,
                gt_frames=clean,
                params=params,
            )
        )
    return _finish("hazeworld", root, records)


def _hazy_folders(hazy_top: Path) -> list[tuple[str, str | None, Path, re.Match[str]]]:
    """(Dataset, its own split folder or None, clip folder, name match) of every `<video>_<A>_<beta>` folder."""
    found: list[tuple[str, str | None, Path, re.Match[str]]] = []
    skipped = []
    for dataset in _subfolders(hazy_top):
        for child in _subfolders(dataset):
            if match := _HAZY_NAME.match(child.name):
                found.append((dataset.name, None, child, match))
                continue
            for clip in _subfolders(child):
                if match := _HAZY_NAME.match(clip.name):
                    found.append((dataset.name, child.name, clip, match))
                else:
                    skipped.append(clip)
    if skipped:
        log.warning("hazeworld: skipped %d folders not named <video>_<A>_<beta>, e.g. %s", len(skipped), skipped[0])
    if not found:
        raise DataError(f"{hazy_top}: no hazy clips (expected <Dataset>/[<split>/]<video>_<A*255>_<beta>/ folders)")
    return found


def _hazeworld_gt(
    hazy_dir: Path, gt_top: Path, dataset: str, own_split: str | None, video: str
) -> tuple[Path, str | None]:
    """The ground-truth folder of a hazy clip and the source dataset's split folder it lies in, if any."""
    same_name = gt_top / dataset / (own_split or "") / hazy_dir.name
    if same_name.is_dir():
        return same_name, own_split
    if own_split is not None:
        candidates = [gt_top / dataset / own_split / video]
    elif (gt_top / dataset).is_dir():
        candidates = [folder / video for folder in _subfolders(gt_top / dataset)]
    else:
        candidates = []
    hits = [c for c in candidates if c.is_dir()]
    if len(hits) > 1:
        raise DataError(f"{hazy_dir}: ground truth is ambiguous: {', '.join(map(str, hits))}")
    if not hits:
        elsewhere = gt_top / dataset / (own_split or "<split>") / video
        raise DataError(f"{hazy_dir}: ground truth not found (looked for {same_name} and {elsewhere})")
    return hits[0], hits[0].parent.name


# --- RVSD -----------------------------------------------------------------------------------------------------


def import_rvsd(root: Path | str, snowy_folder: str | None = None) -> list[VideoRecord]:
    """RVSD (snow, ICCV 2023): `<root>/{train,test}/{clean,<snowy_folder>}/<video>/<frame>`.

    The snowy folder's name is not documented: pass it, or leave it None when `clean` has a single sibling.
    Frames are paired by sorted index (snowy and clean names may differ). source_video: each video is its own
    (`rvsd/<split>/<video>`; the split is part of it because each split may number its videos from 1).
    """
    root = _dataset_root(root)
    found = []
    for split, split_dir in _split_folders(root, {"train": "train", "test": "test"}):
        clean_top = _folder(split_dir / "clean", "clean (ground-truth)")
        snowy_top = _folder(split_dir / (snowy_folder or _only_sibling(split_dir, "clean")), "snowy")
        found.extend((split, video_dir, clean_top / video_dir.name) for video_dir in _subfolders(snowy_top))

    records = []
    for split, video_dir, gt_dir in progress(found, total=len(found), desc="checking rvsd", unit="video"):
        inputs, clean = _paired_frames(video_dir, gt_dir)
        video_id = _safe_id("rvsd", split, video_dir.name)
        records.append(
            VideoRecord(
                video_id=video_id,
                weather="snow",
                source="rvsd",
                source_video=video_id,
                split=split,
                input_frames=inputs,
                gt_frames=clean,
            )
        )
    return _finish("rvsd", root, records)


def _only_sibling(folder: Path, name: str) -> str:
    others = [p.name for p in _subfolders(folder) if p.name != name]
    if len(others) != 1:
        raise DataError(
            f"{folder}: cannot tell the snowy folder among {others or 'no folders'} beside {name}/; "
            "set input_folder in its entry of the params data.sources"
        )
    return others[0]


# --- folder pairs ---------------------------------------------------------------------------------------------


def import_folder_pairs(root: Path | str, weather: Weather) -> list[VideoRecord]:
    """Folder-pair datasets: `<Set>/{Train,Test}/<video>/<frame>` with `<Set>/{Train,Test}_GT/<video>/<frame>`.

    All videos have `weather`. Frames are paired by sorted index. source_video: each video is its own
    (`<set>/<split>/<video>`), as for RVSD.
    """
    root = _dataset_root(root)
    if weather not in WEATHERS:
        raise ConfigError(f"{root}: weather {weather!r} is not one of {', '.join(WEATHERS)}")
    name = _safe_id(root.name)
    found = []
    for split, split_dir in _split_folders(root, {"train": "Train", "test": "Test"}):
        gt_top = _folder(root / f"{split_dir.name}_GT", "ground-truth")
        found.extend((split, video_dir, gt_top / video_dir.name) for video_dir in _subfolders(split_dir))

    records = []
    for split, video_dir, gt_dir in progress(found, total=len(found), desc=f"checking {name}", unit="video"):
        inputs, clean = _paired_frames(video_dir, gt_dir)
        video_id = _safe_id(name, split, video_dir.name)
        records.append(
            VideoRecord(
                video_id=video_id,
                weather=weather,
                source=name,
                source_video=video_id,
                split=split,
                input_frames=inputs,
                gt_frames=clean,
            )
        )
    return _finish(name, root, records)


# --- checks shared by every layout ----------------------------------------------------------------------------


def _dataset_root(root: Path | str) -> Path:
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    return root


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def _split_folders(root: Path, names: dict[Split, str]) -> list[tuple[Split, Path]]:
    """The split folders that exist; a missing one is logged (a user may hold only one split), none is an error."""
    found: list[tuple[Split, Path]] = [(split, root / name) for split, name in names.items() if (root / name).is_dir()]
    if not found:
        raise DataError(f"{root}: none of the split folders {', '.join(names.values())} found")
    for split, name in names.items():
        if split in ("train", "test") and not (root / name).is_dir():
            log.warning("%s: no %s folder; importing without a %s split", root, name, split)
    return found


def _subfolders(folder: Path) -> list[Path]:
    folders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(folders, key=lambda p: natural_key(p.name))


def _paired_frames(input_dir: Path, gt_dir: Path, same_names: bool = False) -> tuple[list[Path], list[Path]]:
    """(input frames, ground-truth frames) of one video, paired by natural order, after checking the pair.

    Checks: the ground truth exists, both have frames and as many, no frame name occurs twice with different
    extensions, every header opens, and all frames of both share one size. `same_names` also asks for
    matching names up to the extension (MWVD keeps ground truth at the same relative path).
    """
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: ground truth not found for {input_dir}")
    inputs, clean = list_frames(input_dir), list_frames(gt_dir)
    for folder, frames in ((input_dir, inputs), (gt_dir, clean)):
        if not frames:
            raise DataError(f"{folder}: no frames (expected {'/'.join(FRAME_SUFFIXES)} files)")
        stems = Counter(p.stem for p in frames)
        if twice := [p for p in frames if stems[p.stem] > 1]:
            raise DataError(f"{twice[0]}: frame {twice[0].stem} occurs twice ({twice[0].name}, {twice[1].name})")
    if len(clean) != len(inputs):
        raise ClipError(f"{gt_dir} has {len(clean)} frames, input {input_dir} has {len(inputs)}")
    if same_names:
        for degraded, truth in zip(inputs, clean, strict=True):
            if degraded.stem != truth.stem:
                raise ClipError(f"{truth}: pairs with input {degraded.name} by order, but the names differ")

    reference = frame_size(inputs[0])
    for path in inputs[1:]:
        if (size := frame_size(path)) != reference:
            raise DataError(f"{path}: frame is {_wh(size)}, but {inputs[0].name} of the same video is {_wh(reference)}")
    for path in clean:
        if (size := frame_size(path)) != reference:
            raise ClipError(f"{path}: ground truth is {_wh(size)}, but the input {inputs[0]} is {_wh(reference)}")
    return inputs, clean


def _wh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _read_counts(path: Path) -> dict[str, tuple[int, str]]:
    """`<key> <frames> [...]` lines (published annotation and split lists) -> {key: (frames, 'file:line')}."""
    if not path.is_file():
        return {}
    counts = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise DataError(f"{path}:{number}: expected '<clip> <number of frames>', got {line.strip()!r}")
        counts[parts[0].strip("/")] = (int(parts[1]), f"{path}:{number}")
    return counts


def _check_listed(counts: dict[str, tuple[int, str]], keys: list[str], top: Path) -> None:
    """Every clip an annotation file lists exists on disk; clips it does not list are only logged."""
    for key, (_, line) in counts.items():
        if key not in keys:
            raise DataError(f"{line}: lists clip {key}, but {top / key} does not exist")
    if counts and (unlisted := len(set(keys) - counts.keys())):
        log.warning("%s: %d clips are not in the annotation file", top, unlisted)


def _safe_id(*parts: str) -> str:
    """Non-empty parts joined by '/', every run of characters other than letters, digits, '-', '_' made '-'."""
    return "/".join(_UNSAFE.sub("-", part) for part in parts if part)


def _finish(source: str, root: Path, records: list[VideoRecord]) -> list[VideoRecord]:
    """Final checks over a whole import (videos found, unique ids, one split per source video) and a summary."""
    if not records:
        raise DataError(f"{root}: no {source} videos found")
    by_id: dict[str, VideoRecord] = {}
    splits: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if (other := by_id.get(record.video_id)) is not None:
            raise DataError(
                f"{record.input_frames[0].parent} and {other.input_frames[0].parent} both become video id "
                f"{record.video_id}; rename one"
            )
        by_id[record.video_id] = record
        if record.split is not None:
            splits[record.source_video].add(record.split)
    if mixed := [source_video for source_video, given in splits.items() if len(given) > 1]:
        folders = [str(r.input_frames[0].parent) for r in records if r.source_video == mixed[0]]
        given = " and ".join(split for split in SPLITS if split in splits[mixed[0]])
        raise DataError(f"source video {mixed[0]} is in both {given}: {', '.join(folders)}")

    counts = Counter((r.split or "unsplit", r.weather) for r in records)
    summary = ", ".join(f"{split} {weather} {n}" for (split, weather), n in sorted(counts.items()))
    log.info("%s: %d videos in %s (%s)", source, len(records), root, summary)
    return records
