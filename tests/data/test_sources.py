"""Importers: each layout as a tiny tree of real image files, and each broken tree names the file at fault."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weather_restore.config import ClipsConfig, SourceConfig
from weather_restore.data.clips import Clip, clip_frames, clip_name, read_manifest, write_clips, write_manifest
from weather_restore.data.frames import read_frame
from weather_restore.data.records import VideoRecord
from weather_restore.data.sources import (
    import_folder_pairs,
    import_hazeworld,
    import_mwvd,
    import_rainsynall100,
    import_rvsd,
    import_source,
)
from weather_restore.errors import ClipError, ConfigError, DataError

SIZE = (12, 16)  # height, width
MWVD_INPUT = [f"{i:04d}.jpg" for i in range(10)]
MWVD_GT = [f"{i:04d}.png" for i in range(10)]


def write_image(path: Path, size: tuple[int, int] = SIZE, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 200, size[0] * size[1] * 3).reshape(size[0], size[1], 3)
    Image.fromarray(((ramp + value) % 256).astype(np.uint8)).save(path)


def write_video(folder: Path, names: list[str], size: tuple[int, int] = SIZE) -> None:
    for index, name in enumerate(names):
        write_image(folder / name, size, value=index)


def raises_naming(path: Path | str, error: type[Exception] = DataError):
    """The error must name the exact file or folder."""
    return pytest.raises(error, match=re.escape(str(path)))


def mwvd_tree(root: Path, clips: dict[str, list[str]] | None = None) -> Path:
    clips = clips or {"train": ["haze_0001", "rain_0002", "snow_0003"], "test": ["rain_0100"]}
    for split, names in clips.items():
        for clip in names:
            write_video(root / split / "input" / clip, MWVD_INPUT)
            write_video(root / split / "gt" / clip, MWVD_GT)
    return root


def numbered(count: int, suffix: str = ".jpg") -> list[str]:
    """RainSynAll100's frame names: 1.jpg, 2.jpg, ... without padding."""
    return [f"{k}{suffix}" for k in range(1, count + 1)]


def rainsyn_tree(root: Path) -> Path:
    videos = {"train": {"0001": 12, "0002": 10, "0950": 10}, "test": {"0950": 10, "0951": 5}}
    for split, lengths in videos.items():
        split_dir = root / f"Video_rain_synthesis_{split}"
        for video, count in lengths.items():
            for folder in ("Rain_Haze", "Rain", "GT"):
                write_video(split_dir / folder / video, numbered(count))
    write_video(root / "Video_rain_synthesis_train" / "Trans" / "0001", numbered(12))
    write_video(root / "Video_rain_synthesis_train" / "Alpha" / "0001", numbered(12))
    return root


HAZE_FRAMES = ["frame_8.jpg", "frame_9.jpg", "frame_10.jpg", "frame_11.jpg"]


def hazeworld_tree(root: Path) -> Path:
    """Raw HazeWorld: DAVIS with its ground truth at gt/<Dataset>/<split>/<video>, REDS with same-name gt."""
    for density in ("bear_200_0.01", "bear_230_0.02"):
        write_video(root / "hazy" / "DAVIS" / density, HAZE_FRAMES)
    write_video(root / "gt" / "DAVIS" / "train" / "bear", [n.replace(".jpg", ".png") for n in HAZE_FRAMES])
    write_video(root / "transmission" / "DAVIS" / "train" / "bear_0.01", HAZE_FRAMES)
    write_video(root / "hazy" / "REDS" / "000_192_0.005", HAZE_FRAMES[:3])
    write_video(root / "gt" / "REDS" / "000_192_0.005", HAZE_FRAMES[:3])
    (root / "train").mkdir()
    (root / "train" / "meta_info_GT_train.txt").write_text("DAVIS/bear_200_0.01 4\nDAVIS/bear_230_0.02 4\n")
    (root / "test").mkdir()
    (root / "test" / "meta_info_GT_test.txt").write_text("REDS/000_192_0.005 3\n")
    return root


def rvsd_tree(root: Path, snowy: str = "snowy") -> Path:
    for split, video in (("train", "scene_1"), ("test", "scene_2")):
        write_video(root / split / "clean" / video, [f"{k:05d}.jpg" for k in range(1, 7)])
        write_video(root / split / snowy / video, numbered(6, ".png"))
    return root


def folder_pairs_tree(root: Path) -> Path:
    write_video(root / "Train" / "t1", [f"{k:05d}.jpg" for k in range(1, 5)])
    write_video(root / "Train_GT" / "t1", [f"{k:05d}.png" for k in range(1, 5)])
    write_video(root / "Test" / "a1", [f"{k:05d}.jpg" for k in range(1, 5)])
    write_video(root / "Test_GT" / "a1", [f"{k:05d}.jpg" for k in range(1, 5)])
    return root


# --- MWVD -----------------------------------------------------------------------------------------------------


def test_mwvd_clips_pair_frames_in_order_with_weather_from_the_name(tmp_path):
    records = import_mwvd(mwvd_tree(tmp_path / "MWVD"))

    by_id = {r.video_id: r for r in records}
    assert sorted(by_id) == [
        "mwvd/test/rain_0100",
        "mwvd/train/haze_0001",
        "mwvd/train/rain_0002",
        "mwvd/train/snow_0003",
    ]
    clip = by_id["mwvd/train/haze_0001"]
    assert (clip.weather, clip.split, clip.source) == ("haze", "train", "mwvd")
    assert [p.name for p in clip.input_frames] == MWVD_INPUT
    assert [p.name for p in clip.gt_frames] == MWVD_GT
    assert all(p.is_absolute() for p in clip.input_frames + clip.gt_frames)
    assert by_id["mwvd/test/rain_0100"].split == "test"
    assert len({r.source_video for r in records}) == len(records), "each published clip is its own source"


def test_mwvd_weather_from_the_map_file_then_the_default(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["0001", "0002", "0003"], "test": ["0001"]})
    weather_map = tmp_path / "weather.txt"
    weather_map.write_text("# clip weather\n0001 haze\ntrain/0002 snow\n")

    records = import_mwvd(root, weather="rain", weather_map=weather_map)

    weathers = {r.video_id: r.weather for r in records}
    assert weathers == {
        "mwvd/train/0001": "haze",
        "mwvd/train/0002": "snow",
        "mwvd/train/0003": "rain",
        "mwvd/test/0001": "haze",
    }


def test_mwvd_clip_of_unknown_weather_is_named(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["haze_0001", "0002"]})
    with raises_naming(root / "train" / "input" / "0002", DataError) as error:
        import_mwvd(root)
    assert "weather unknown" in str(error.value)


def test_mwvd_name_and_map_that_disagree_are_an_error(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["haze_0001"]})
    weather_map = tmp_path / "weather.txt"
    weather_map.write_text("haze_0001 rain\n")
    with raises_naming(weather_map):
        import_mwvd(root, weather_map=weather_map)


def test_mwvd_nested_clip_keys_take_the_weather_from_a_parent_folder(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["snow/0001"]})
    (record,) = import_mwvd(root)
    assert (record.video_id, record.weather) == ("mwvd/train/snow/0001", "snow")


def test_mwvd_input_clip_without_ground_truth_is_named(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD")
    write_video(root / "train" / "input" / "rain_0099", MWVD_INPUT)
    with raises_naming(root / "train" / "gt" / "rain_0099"):
        import_mwvd(root)


def test_mwvd_frame_count_mismatch_is_a_clip_error_naming_the_ground_truth(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD")
    (root / "train" / "gt" / "rain_0002" / "0009.png").unlink()
    with raises_naming(root / "train" / "gt" / "rain_0002", ClipError) as error:
        import_mwvd(root)
    assert "has 9 frames" in str(error.value)


def test_mwvd_ground_truth_of_another_size_is_named(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD")
    bad = root / "train" / "gt" / "snow_0003" / "0004.png"
    write_image(bad, size=(8, 8))
    with raises_naming(bad, ClipError):
        import_mwvd(root)


def test_a_frame_of_another_size_within_a_video_is_named(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD")
    bad = root / "test" / "input" / "rain_0100" / "0007.jpg"
    write_image(bad, size=(8, 8))
    with raises_naming(bad):
        import_mwvd(root)


def test_mwvd_ground_truth_names_must_match_the_input(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD")
    gt = root / "train" / "gt" / "haze_0001"
    (gt / "0009.png").rename(gt / "0010.png")
    with raises_naming(gt / "0010.png", ClipError):
        import_mwvd(root)


def png_with_bad_checksum(path: Path) -> None:
    write_image(path)
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # inside the image data chunk
    path.write_bytes(bytes(data))


def not_an_image(path: Path) -> None:
    path.write_bytes(b"this is not a JPEG file" * 4)


def truncated_png(path: Path) -> None:
    write_image(path)
    path.write_bytes(path.read_bytes()[:50])


@pytest.mark.parametrize("corrupt", [not_an_image, png_with_bad_checksum, truncated_png])
def test_a_corrupt_frame_is_named(tmp_path, corrupt):
    root = mwvd_tree(tmp_path / "MWVD")
    bad = root / "train" / "gt" / "rain_0002" / "0003.png"
    corrupt(bad)
    with raises_naming(bad) as error:
        import_mwvd(root)
    assert "cannot read the frame" in str(error.value)


def test_missing_root_and_missing_folders_are_named(tmp_path):
    with raises_naming(tmp_path / "nowhere"):
        import_mwvd(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with raises_naming(tmp_path / "empty") as error:
        import_mwvd(tmp_path / "empty")
    assert "train, val, test" in str(error.value)
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["haze_0001"]})
    (root / "test" / "input").mkdir(parents=True)
    with raises_naming(root / "test" / "gt"):
        import_mwvd(root)


def test_a_clip_folder_without_frames_is_named(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD")
    empty = root / "train" / "input" / "haze_0042"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a frame")
    with raises_naming(empty):
        import_mwvd(root)


def test_hidden_files_beside_the_frames_are_ignored(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["haze_0001"]})
    (root / "train" / "input" / "haze_0001" / "._0000.jpg").write_bytes(b"macOS resource fork")
    (record,) = import_mwvd(root)
    assert record.n_frames == 10


def test_mwvd_annotation_file_is_checked_against_the_frames(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["haze_0001", "rain_0002"]})
    annotation = root / "meta_info_train.txt"
    annotation.write_text("haze_0001 10\nrain_0002 12\n")
    with raises_naming(f"{annotation}:2", ClipError):
        import_mwvd(root)
    annotation.write_text("haze_0001 10\nrain_0002 10\nsnow_0003 10\n")
    with raises_naming(f"{annotation}:3"):
        import_mwvd(root)
    annotation.write_text("haze_0001 10\nrain_0002 10\n")
    assert len(import_mwvd(root)) == 2


def test_mwvd_written_by_this_project_keeps_its_source_videos_and_weathers(tmp_path):
    # Names without a weather prefix, as the split stage wrote for video ids that began with the weather's word.
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["astronaut_0000", "astronaut_0010"]})
    clips = [
        Clip(
            id=f"astronaut_{start:04d}",
            weather="haze",
            split="train",
            source="synthetic",
            source_video="synthetic/astronaut",
            video_id="synthetic/haze/astronaut-00",
            start=start,
            stop=start + 10,
            params={"beta": 3.0},
        )
        for start in (0, 10)
    ]
    write_manifest(clips, ClipsConfig(), root)

    records = import_mwvd(root)

    assert {r.source_video for r in records} == {"synthetic/astronaut"}
    assert all(r.params == {"beta": 3.0} for r in records)
    assert [(r.weather, r.split) for r in records] == [("haze", "train")] * 2


def test_mwvd_manifest_weather_that_disagrees_with_the_name_or_the_map_is_an_error(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["rain_0001", "0002"]})
    clips = [
        Clip(id=name, weather="haze", split="train", source="x", source_video=name, video_id=name, start=0, stop=10)
        for name in ("rain_0001", "0002")
    ]
    write_manifest(clips, ClipsConfig(), root)
    with raises_naming(root / "train" / "input" / "rain_0001") as error:
        import_mwvd(root)
    assert "manifest.json says haze, the clip's name says rain" in str(error.value)

    (root / "train" / "input" / "rain_0001").rename(root / "train" / "input" / "0001")
    (root / "train" / "gt" / "rain_0001").rename(root / "train" / "gt" / "0001")
    write_manifest([clips[1]], ClipsConfig(), root)
    weather_map = tmp_path / "weather.txt"
    weather_map.write_text("0001 snow\n0002 snow\n")
    with raises_naming(root / "train" / "input" / "0002") as error:
        import_mwvd(root, weather_map=weather_map)
    assert f"says haze, {weather_map} says snow" in str(error.value)


def test_video_ids_are_path_safe_and_unique(tmp_path):
    root = mwvd_tree(tmp_path / "MWVD", {"train": ["rain_0001 v2.b"]})
    (record,) = import_mwvd(root)
    assert record.video_id == "mwvd/train/rain_0001-v2-b"
    mwvd_tree(root, {"train": ["rain_0001-v2-b"]})
    with raises_naming(root / "train" / "input" / "rain_0001 v2.b"):
        import_mwvd(root)


# --- RainSynAll100 --------------------------------------------------------------------------------------------


def test_rainsynall100_sorts_naturally_and_leaves_out_train_copies_of_test_videos(tmp_path, caplog):
    root = rainsyn_tree(tmp_path / "RainSynAll100")
    with caplog.at_level(logging.INFO, logger="weather_restore.data.sources"):
        records = import_rainsynall100(root)

    by_id = {r.video_id: r for r in records}
    assert sorted(by_id) == [
        "rainsynall100/test/0950",
        "rainsynall100/test/0951",
        "rainsynall100/train/0001",
        "rainsynall100/train/0002",
    ]
    assert "left out 1 videos with test ids 0900-0999" in caplog.text
    first = by_id["rainsynall100/train/0001"]
    assert [p.name for p in first.input_frames] == numbered(12)
    assert first.input_frames[0].parent.parent.name == "Rain_Haze"
    assert [p.parent.parent.name for p in first.gt_frames] == ["GT"] * 12
    assert (first.weather, first.split, first.source_video) == ("rain", "train", "rainsynall100/0001")
    assert first.params["transmission_dir"].endswith("Video_rain_synthesis_train/Trans/0001")
    assert first.params["airlight_dir"].endswith("Video_rain_synthesis_train/Alpha/0001")
    assert by_id["rainsynall100/test/0951"].n_frames == 5, "short videos are kept; the clip stage decides"


def test_rainsynall100_train_copies_kept_on_request_get_their_own_source(tmp_path):
    root = rainsyn_tree(tmp_path / "RainSynAll100")
    records = import_rainsynall100(root, include_test_in_train=True)
    sources = {r.video_id: r.source_video for r in records}
    assert sources["rainsynall100/train/0950"] == "rainsynall100/train-copy/0950"
    assert sources["rainsynall100/test/0950"] == "rainsynall100/0950"


def test_rainsynall100_streaks_only_input(tmp_path):
    records = import_rainsynall100(rainsyn_tree(tmp_path / "RainSynAll100"), input_folder="Rain")
    assert {r.input_frames[0].parent.parent.name for r in records} == {"Rain"}
    assert {r.params["input"] for r in records} == {"Rain"}


def test_rainsynall100_video_without_ground_truth_is_named(tmp_path):
    root = rainsyn_tree(tmp_path / "RainSynAll100")
    write_video(root / "Video_rain_synthesis_test" / "Rain_Haze" / "0952", numbered(10))
    with raises_naming(root / "Video_rain_synthesis_test" / "GT" / "0952"):
        import_rainsynall100(root)


def test_rainsynall100_unknown_input_folder(tmp_path):
    with pytest.raises(ConfigError, match="Rain_Haze, Rain, Haze"):
        import_rainsynall100(rainsyn_tree(tmp_path / "RainSynAll100"), input_folder="Snow")


# --- HazeWorld ------------------------------------------------------------------------------------------------


def test_hazeworld_densities_of_one_video_share_its_source_and_parse_a_and_beta(tmp_path):
    root = hazeworld_tree(tmp_path / "HazeWorld")
    by_id = {r.video_id: r for r in import_hazeworld(root)}

    assert sorted(by_id) == [
        "hazeworld/DAVIS/bear_200_0-01",
        "hazeworld/DAVIS/bear_230_0-02",
        "hazeworld/REDS/000_192_0-005",
    ]
    thin, thick = by_id["hazeworld/DAVIS/bear_200_0-01"], by_id["hazeworld/DAVIS/bear_230_0-02"]
    assert thin.source_video == thick.source_video == "hazeworld/DAVIS/train/bear"
    assert thin.params["airlight"] == pytest.approx(200 / 255)
    assert (thin.params["beta"], thick.params["beta"]) == (0.01, 0.02)
    assert thin.params["transmission_dir"].endswith("transmission/DAVIS/train/bear_0.01")
    assert "transmission_dir" not in thick.params
    assert [p.name for p in thin.input_frames] == HAZE_FRAMES, "the source's own names, in natural order"
    assert thin.gt_frames[0].parent == root / "gt" / "DAVIS" / "train" / "bear"
    assert (thin.split, thick.split, by_id["hazeworld/REDS/000_192_0-005"].split) == ("train", "train", "test")
    assert {r.weather for r in by_id.values()} == {"haze"}


def test_hazeworld_symlinked_split_layout(tmp_path):
    root = tmp_path / "HazeWorld"
    clean = tmp_path / "clean" / "bear"
    write_video(clean, HAZE_FRAMES)
    for density in ("bear_200_0.01", "bear_230_0.02"):
        write_video(root / "train" / "hazy" / "DAVIS" / density, HAZE_FRAMES)
        (root / "train" / "gt" / "DAVIS").mkdir(parents=True, exist_ok=True)
        (root / "train" / "gt" / "DAVIS" / density).symlink_to(clean)

    records = import_hazeworld(root)

    assert [r.split for r in records] == ["train", "train"]
    assert {r.source_video for r in records} == {"hazeworld/DAVIS/bear"}


def test_hazeworld_split_list_count_mismatch_names_the_line(tmp_path):
    root = hazeworld_tree(tmp_path / "HazeWorld")
    listing = root / "train" / "meta_info_GT_train.txt"
    listing.write_text("DAVIS/bear_200_0.01 4\nDAVIS/bear_230_0.02 5\n")
    with raises_naming(f"{listing}:2", ClipError):
        import_hazeworld(root)


def test_hazeworld_densities_listed_in_both_splits_are_an_error(tmp_path):
    root = hazeworld_tree(tmp_path / "HazeWorld")
    (root / "train" / "meta_info_GT_train.txt").write_text("DAVIS/bear_200_0.01 4\n")
    (root / "test" / "meta_info_GT_test.txt").write_text("DAVIS/bear_230_0.02 4\nREDS/000_192_0.005 3\n")
    with raises_naming(root / "hazy" / "DAVIS" / "bear_230_0.02") as error:
        import_hazeworld(root)
    assert "both train and test" in str(error.value)


def test_hazeworld_clip_without_ground_truth_is_named(tmp_path):
    root = hazeworld_tree(tmp_path / "HazeWorld")
    write_video(root / "hazy" / "DAVIS" / "camel_210_0.03", HAZE_FRAMES)
    with raises_naming(root / "hazy" / "DAVIS" / "camel_210_0.03") as error:
        import_hazeworld(root)
    assert "ground truth not found" in str(error.value)


# --- RVSD and folder pairs ------------------------------------------------------------------------------------


def test_rvsd_pairs_frames_by_index_and_finds_the_snowy_folder(tmp_path):
    root = rvsd_tree(tmp_path / "RVSD", snowy="Snow")
    for records in (import_rvsd(root), import_rvsd(root, "Snow")):
        train, test = records
        assert (train.video_id, train.split, train.weather) == ("rvsd/train/scene_1", "train", "snow")
        assert test.source_video == "rvsd/test/scene_2"
        assert [p.name for p in train.input_frames] == numbered(6, ".png")
        assert train.gt_frames[0].name == "00001.jpg"


def test_rvsd_ambiguous_snowy_folder_asks_for_the_parameter(tmp_path):
    root = rvsd_tree(tmp_path / "RVSD")
    (root / "train" / "depth").mkdir()
    with raises_naming(root / "train") as error:
        import_rvsd(root)
    assert "input_folder" in str(error.value)


def test_rvsd_frame_count_mismatch_is_named(tmp_path):
    root = rvsd_tree(tmp_path / "RVSD")
    (root / "test" / "clean" / "scene_2" / "00006.jpg").unlink()
    with raises_naming(root / "test" / "clean" / "scene_2", ClipError):
        import_rvsd(root, "snowy")


def test_folder_pairs_layout(tmp_path):
    root = folder_pairs_tree(tmp_path / "NTURain")

    train, test = import_folder_pairs(root, "rain")

    assert (train.video_id, train.source, train.split, train.weather) == (
        "NTURain/train/t1",
        "NTURain",
        "train",
        "rain",
    )
    assert test.gt_frames[-1] == root / "Test_GT" / "a1" / "00004.jpg"


# --- import_source --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "build", "options", "count"),
    [
        ("mwvd", mwvd_tree, {}, 4),
        ("rainsynall100", rainsyn_tree, {"input_folder": "Rain"}, 4),
        ("hazeworld", hazeworld_tree, {"weather": "haze"}, 3),
        ("rvsd", rvsd_tree, {"input_folder": "snowy"}, 2),
    ],
)
def test_import_source_dispatches_on_kind(tmp_path, kind, build, options, count):
    root = build(tmp_path / kind)
    records = import_source(SourceConfig(kind=kind, root=root, **options))
    assert len(records) == count
    assert {r.source for r in records} == {kind}


def test_import_source_rejects_a_weather_the_dataset_does_not_hold(tmp_path):
    cfg = SourceConfig(kind="rvsd", root=rvsd_tree(tmp_path / "RVSD"), weather="rain")
    with pytest.raises(ConfigError, match="holds snow"):
        import_source(cfg)


def test_import_source_rejects_options_of_another_kind(tmp_path):
    cfg = SourceConfig(kind="hazeworld", root=tmp_path, include_test_in_train=True)
    with pytest.raises(ConfigError, match="include_test_in_train does not apply to hazeworld"):
        import_source(cfg)


# --- the round trip: every layout -> split -> MWVD ------------------------------------------------------------


def test_clip_name_prefixes_the_weather_unless_the_id_starts_with_it_exactly():
    def record(video_id: str, weather: str) -> VideoRecord:
        return VideoRecord(
            video_id=video_id, weather=weather, source="x", source_video="x", input_frames=[], gt_frames=[]
        )

    assert clip_name(record("rainsynall100/train/0001", "rain"), 0) == "rain_rainsynall100-train-0001_0000"
    assert clip_name(record("hazeworld/DAVIS/bear_200_0-01", "haze"), 10) == "haze_hazeworld-DAVIS-bear_200_0-01_0010"
    assert clip_name(record("snow_0003", "snow"), 0) == "snow_0003_0000"
    assert clip_name(record("rain_0003", "snow"), 0) == "snow_rain_0003_0000"


ROUND_TRIP = ClipsConfig(clip_len=3, train_per_weather=0, val_per_weather=0, test_per_weather=0)


def mwvd_tree_with_val(root: Path) -> Path:
    """A published-layout tree with its own validation split, which the clip stage keeps."""
    clips = {
        "train": ["haze_0001", "rain_0002", "snow_0003"],
        "val": ["haze_0011", "rain_0012"],
        "test": ["rain_0100", "snow_0101"],
    }
    return mwvd_tree(root, clips)


def hazeworld_tree_of_two_training_videos(root: Path) -> Path:
    """The raw HazeWorld tree and one more listed training video: one of the two becomes val."""
    hazeworld_tree(root)
    write_video(root / "hazy" / "DAVIS" / "cow_210_0.03", HAZE_FRAMES)
    write_video(root / "gt" / "DAVIS" / "train" / "cow", HAZE_FRAMES)
    with (root / "train" / "meta_info_GT_train.txt").open("a") as listing:
        listing.write("DAVIS/cow_210_0.03 4\n")
    return root


def rvsd_tree_of_two_training_videos(root: Path) -> Path:
    rvsd_tree(root)
    write_video(root / "train" / "clean" / "scene_3", [f"{k:05d}.jpg" for k in range(1, 7)])
    write_video(root / "train" / "snowy" / "scene_3", numbered(6, ".png"))
    return root


def folder_pairs_tree_of_two_training_videos(root: Path) -> Path:
    folder_pairs_tree(root)
    write_video(root / "Train" / "t2", [f"{k:05d}.jpg" for k in range(1, 5)])
    write_video(root / "Train_GT" / "t2", [f"{k:05d}.png" for k in range(1, 5)])
    return root


@pytest.mark.parametrize(
    ("kind", "build", "options"),
    [
        ("mwvd", mwvd_tree_with_val, {}),
        ("rainsynall100", rainsyn_tree, {}),
        ("hazeworld", hazeworld_tree_of_two_training_videos, {}),
        ("rvsd", rvsd_tree_of_two_training_videos, {}),
        ("folders", folder_pairs_tree_of_two_training_videos, {"weather": "rain"}),
    ],
)
def test_every_layout_split_then_imported_as_mwvd_gives_back_the_same_clips(tmp_path, kind, build, options):
    imported = import_source(SourceConfig(kind=kind, root=build(tmp_path / kind), **options))
    written = write_clips(imported, ROUND_TRIP, tmp_path / "clips")
    by_video = {r.video_id: r for r in imported}

    back = {r.video_id: r for r in import_source(SourceConfig(kind="mwvd", root=tmp_path / "clips"))}

    assert sorted(back) == sorted(f"mwvd/{clip.split}/{clip.id}" for clip in written)
    for clip in written:
        record = back[f"mwvd/{clip.split}/{clip.id}"]
        assert (record.weather, record.split, record.source_video) == (clip.weather, clip.split, clip.source_video)
        assert record.params == clip.params
        source = by_video[clip.video_id]
        for frames, originals in (
            (record.input_frames, source.input_frames),
            (record.gt_frames, source.gt_frames),
        ):
            assert [p.name for p in frames] == [p.name for p in clip_frames(tmp_path / "clips", clip, "input")]
            for frame, original in zip(frames, originals[clip.start : clip.stop], strict=True):
                np.testing.assert_array_equal(read_frame(frame), read_frame(original))
    splits = {clip.split for clip in written}
    assert splits == {"train", "val", "test"}
    if kind == "mwvd":  # the dataset's own validation split is kept, and nothing carved from its training clips
        assert {c.source_video for c in written if c.split == "val"} == {"mwvd/val/haze_0011", "mwvd/val/rain_0012"}
    for split in splits:
        for other in splits - {split}:
            ours = {r.source_video for r in back.values() if r.split == split}
            assert not ours & {r.source_video for r in back.values() if r.split == other}

    # Split again: the same frames, weathers, splits and source videos, clip for clip.
    again = write_clips(list(back.values()), ROUND_TRIP, tmp_path / "clips-again")
    assert sorted((c.split, c.weather, c.source_video, c.checksum) for c in again) == sorted(
        (c.split, c.weather, c.source_video, c.checksum) for c in written
    )
    assert read_manifest(tmp_path / "clips-again")[1] == again
