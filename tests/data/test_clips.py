import json
from pathlib import Path

import numpy as np
import pytest

from weather_restore.config import ClipsConfig, parse_params
from weather_restore.data.clips import assign_splits, clip_windows, read_manifest, select_clips, write_clips
from weather_restore.data.frames import read_frame, write_frame
from weather_restore.data.records import WEATHERS, VideoRecord
from weather_restore.errors import ClipError, ConfigError


def make_video(root: Path, video_id: str, weather: str, source_video: str, n_frames: int, split=None, ext=".png"):
    rng = np.random.default_rng(list(video_id.encode()))  # the same frames in every process
    inputs, gts = [], []
    for t in range(n_frames):
        for kind, paths in (("input", inputs), ("gt", gts)):
            path = root / video_id / kind / f"{t}{ext}"
            frame = rng.random((12, 16, 3)).astype(np.float32)
            if ext == ".png":
                write_frame(path, frame)
            else:
                from PIL import Image

                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((frame * 255).astype(np.uint8)).save(path)
            paths.append(path)
    return VideoRecord(
        video_id=video_id,
        weather=weather,
        source="test",
        source_video=source_video,
        split=split,
        input_frames=inputs,
        gt_frames=gts,
        params={"beta": 1.0},
    )


@pytest.fixture
def videos(tmp_path):
    """Six sources, each filmed in every weather, 25 frames (two clips of 10 and a dropped tail)."""
    return [
        make_video(tmp_path / "src", f"{weather}/scene{s}", weather, f"scene{s}", 25)
        for s in range(6)
        for weather in WEATHERS
    ]


def test_clip_windows_do_not_overlap_and_drop_the_tail():
    assert clip_windows(25, 10) == [(0, 10), (10, 20)]
    assert clip_windows(9, 10) == []


def test_train_val_and_test_share_no_source_video(tmp_path, videos):
    cfg = ClipsConfig(clip_len=10, train_per_weather=6, val_per_weather=2, test_per_weather=2)
    clips = write_clips(videos, cfg, tmp_path / "mwvd")
    sources = {split: {c.source_video for c in clips if c.split == split} for split in ("train", "val", "test")}
    assert all(sources.values())
    assert not sources["train"] & sources["val"]
    assert not sources["train"] & sources["test"]
    assert not sources["val"] & sources["test"]


def test_counts_per_weather_are_as_asked(tmp_path, videos):
    cfg = ClipsConfig(clip_len=10, train_per_weather=6, val_per_weather=1, test_per_weather=2)
    clips = write_clips(videos, cfg, tmp_path / "mwvd")
    for weather in WEATHERS:
        assert sum(c.weather == weather and c.split == "train" for c in clips) == 6
        assert sum(c.weather == weather and c.split == "val" for c in clips) == 1
        assert sum(c.weather == weather and c.split == "test" for c in clips) == 2
    val = sorted(f"{c.id} 10" for c in clips if c.split == "val")
    assert sorted((tmp_path / "mwvd/meta_info_val.txt").read_text().splitlines()) == val
    assert sorted(p.name for p in (tmp_path / "mwvd/val/gt").iterdir()) == sorted(line.split()[0] for line in val)


def test_too_many_clips_asked_says_how_many_there_are(tmp_path, videos):
    cfg = ClipsConfig(clip_len=10, train_per_weather=50, test_per_weather=2)
    with pytest.raises(ClipError, match=r"train/haze: 50 clips asked, the sources supply \d+"):
        write_clips(videos, cfg, tmp_path / "mwvd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # neither the output nor a partial of it


def test_manifest_matches_the_files_on_disk(tmp_path, videos):
    cfg = ClipsConfig(clip_len=10, train_per_weather=4, test_per_weather=2)
    root = tmp_path / "mwvd"
    clips = write_clips(videos, cfg, root)
    checksum, listed = read_manifest(root)
    assert listed == clips and len(checksum) == 64
    on_disk = {(p.parent.parent.parent.name, p.parent.name) for p in root.glob("*/input/*/0000.png")}
    assert on_disk == {(c.split, c.id) for c in clips}
    by_id = {v.video_id: v for v in videos}
    for clip in clips:
        for kind in ("input", "gt"):
            frames = sorted((root / clip.split / kind / clip.id).iterdir())
            assert [f.name for f in frames] == [f"{i:04d}.png" for i in range(10)]
        source = by_id[clip.video_id].gt_frames[clip.start + 3]
        np.testing.assert_array_equal(read_frame(root / clip.split / "gt" / clip.id / "0003.png"), read_frame(source))
    annotation = (root / "meta_info_test.txt").read_text().splitlines()
    assert sorted(annotation) == sorted(f"{c.id} 10" for c in clips if c.split == "test")
    assert all(c.id.startswith(f"{c.weather}") for c in clips)


def test_jpeg_sources_become_png_clips(tmp_path):
    videos = [make_video(tmp_path / "src", f"{w}/v{s}", w, f"v{s}", 10, ext=".jpg") for s in range(3) for w in WEATHERS]
    cfg = ClipsConfig(clip_len=10, train_per_weather=1, val_per_weather=1, test_per_weather=1)
    clips = write_clips(videos, cfg, tmp_path / "mwvd")
    frame = tmp_path / "mwvd" / clips[0].split / "input" / clips[0].id / "0000.png"
    assert frame.read_bytes()[:4] == b"\x89PNG"


def test_split_is_deterministic_by_seed(tmp_path, videos):
    cfg = ClipsConfig(clip_len=10, train_per_weather=4, test_per_weather=2, seed=3)
    a = write_clips(videos, cfg, tmp_path / "a")
    b = write_clips(videos, cfg, tmp_path / "b")
    assert a == b
    assert json.loads((tmp_path / "a/manifest.json").read_text()) == json.loads(
        (tmp_path / "b/manifest.json").read_text()
    )


def test_dataset_split_is_respected_val_carved_from_its_training_videos(tmp_path):
    """A dataset without a validation split gives one of its training videos per weather to val, never a test one."""
    videos = [make_video(tmp_path, f"haze/{s}", "haze", s, 10, split="train") for s in "abc"]
    videos += [make_video(tmp_path, f"haze/{s}", "haze", s, 10, split="test") for s in "xy"]
    assignment = assign_splits(videos, ClipsConfig(clip_len=10, val_per_weather=1))
    assert {s: assignment[s] for s in "xy"} == {"x": "test", "y": "test"}
    assert sorted(assignment[s] for s in "abc") == ["train", "train", "val"]


def test_a_datasets_own_val_split_is_kept_and_nothing_more_is_carved(tmp_path):
    videos = [
        make_video(tmp_path, "rain/a", "rain", "a", 10, split="train"),
        make_video(tmp_path, "rain/b", "rain", "b", 10, split="train"),
        make_video(tmp_path, "rain/v", "rain", "v", 10, split="val"),
        make_video(tmp_path, "rain/t", "rain", "t", 10, split="test"),
    ]
    assignment = assign_splits(videos, ClipsConfig(clip_len=10, val_per_weather=1))
    assert assignment == {"a": "train", "b": "train", "v": "val", "t": "test"}


def test_a_source_video_in_two_splits_of_its_dataset_is_refused(tmp_path):
    videos = [
        make_video(tmp_path, "haze/a", "haze", "a", 10, split="train"),
        make_video(tmp_path, "haze/a2", "haze", "a", 10, split="test"),
    ]
    with pytest.raises(ClipError, match="source video a is in train and test of its dataset"):
        assign_splits(videos, ClipsConfig())


def test_too_few_source_videos_for_three_splits_is_one_line_naming_the_keys(tmp_path):
    videos = [make_video(tmp_path, f"snow/{s}", "snow", s, 10) for s in "ab"]
    with pytest.raises(ClipError, match="no clip is left for test .*data.synthetic.videos_per_weather") as error:
        write_clips(
            videos,
            ClipsConfig(clip_len=10, train_per_weather=1, val_per_weather=1, test_per_weather=1),
            tmp_path / "mwvd",
        )
    assert "\n" not in str(error.value)
    assert not (tmp_path / "mwvd").exists()


def test_a_generator_too_small_for_three_splits_is_refused_at_the_door():
    with pytest.raises(
        ConfigError,
        match=r"^params.yaml: 'data.synthetic.videos_per_weather' = 2 is not allowed: .*"
        r"train, val and test need 3 of their own",
    ) as error:
        parse_params(
            {
                "data": {
                    "synthetic": {"videos_per_weather": 2},
                    "clips": {"train_per_weather": 1, "val_per_weather": 1, "test_per_weather": 1},
                }
            },
            "params.yaml",
        )
    assert "\n" not in str(error.value)
    with pytest.raises(
        ConfigError, match="'data.synthetic.frames_per_video' is not allowed: it is shorter than data.clips.clip_len 40"
    ):
        parse_params({"data": {"clips": {"clip_len": 40}}}, "params.yaml")


def test_every_seed_finds_a_split_that_meets_the_targets_when_one_exists():
    """Photographs rotate across weathers (as the generator films them), so one source holds one to three
    weathers; a first greedy order can leave a weather without val or test clips, and the next order is tried."""
    photographs = [f"photo{i}" for i in range(9)]
    frames = [Path(f"{i}.png") for i in range(20)]
    videos = [
        VideoRecord(
            video_id=f"{weather}/{photographs[(index + w) % 9]}",
            weather=weather,
            source="test",
            source_video=photographs[(index + w) % 9],
            input_frames=frames,
            gt_frames=frames,
        )
        for w, weather in enumerate(WEATHERS)
        for index in range(3)
    ]
    for seed in range(20):
        cfg = ClipsConfig(clip_len=10, train_per_weather=2, val_per_weather=1, test_per_weather=1, seed=seed)
        assignment = assign_splits(videos, cfg)
        clips = select_clips(videos, assignment, cfg)
        for split, wanted in (("train", 2), ("val", 1), ("test", 1)):
            assert [sum(c.split == split and c.weather == w for c in clips) for w in WEATHERS] == [wanted] * 3
        assert assign_splits(videos, cfg) == assignment
