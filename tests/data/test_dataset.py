import numpy as np
import pytest
import torch

from weather_restore.config import ClipsConfig
from weather_restore.data.clips import read_manifest, write_manifest
from weather_restore.data.dataset import ClipDataset, FrameDataset, TrainingSampler, dihedral, spread_over_weathers
from weather_restore.data.frames import read_frame
from weather_restore.errors import DataError


def test_a_clip_sample_is_a_window_of_frames_with_its_ground_truth(tiny_mwvd):
    dataset = ClipDataset(tiny_mwvd, "train", frames=4, crop=16)
    sample = dataset[(0, (0, 7))]
    assert sample["degraded"].shape == sample["clean"].shape == (4, 3, 16, 16)
    assert sample["degraded"].dtype == torch.float32
    assert sample["weather"] in ("haze", "rain", "snow")
    assert sample["clip_id"] == dataset.clips[0].id


def test_every_frame_and_the_ground_truth_get_the_same_window_flip_and_rotation(tiny_mwvd):
    dataset = ClipDataset(tiny_mwvd, "train", frames=3)
    plain = ClipDataset(tiny_mwvd, "train", augment=False)
    original = plain[2]  # the whole clip, untouched: (6, 3, H, W)
    to_hwc = {k: original[k].permute(0, 2, 3, 1).numpy() for k in ("degraded", "clean")}
    seen = set()
    for draw in range(12):
        sample = dataset[(2, (0, draw))]
        matches = [
            (start, k)
            for start in range(4)
            for k in range(8)
            if all(
                np.array_equal(sample[name].permute(0, 2, 3, 1).numpy(), dihedral(to_hwc[name][start : start + 3], k))
                for name in ("degraded", "clean")
            )
        ]
        assert matches, "input, ground truth and frames were not transformed alike"
        seen.update(k for _, k in matches)
    assert len(seen) > 2


def test_the_same_key_gives_the_same_sample_and_draws_differ(tiny_mwvd):
    dataset = ClipDataset(tiny_mwvd, "train", frames=3, crop=16)
    a, b = dataset[(1, (0, 5))], dataset[(1, (0, 5))]
    assert torch.equal(a["degraded"], b["degraded"])
    others = [dataset[(1, (0, n))]["degraded"] for n in range(6, 12)]
    assert any(not torch.equal(a["degraded"], o) for o in others)


def test_without_a_draw_the_clip_starts_at_frame_zero_uncropped(tiny_mwvd):
    dataset = ClipDataset(tiny_mwvd, "test", frames=2, augment=False)
    clip = dataset.clips[0]
    first = read_frame(tiny_mwvd / "test" / "input" / clip.id / "0000.png")
    assert np.allclose(dataset[0]["degraded"][0].permute(1, 2, 0).numpy(), first)


def test_frame_dataset_has_one_item_per_frame_of_the_same_clips(tiny_mwvd):
    frames = FrameDataset(tiny_mwvd, "train", crop=16)
    clips = ClipDataset(tiny_mwvd, "train")
    assert frames.clips == clips.clips
    assert len(frames) == sum(c.stop - c.start for c in clips.clips)
    sample = frames[(5, (0, 1))]
    assert sample["degraded"].shape == sample["clean"].shape == (3, 16, 16)


def test_dihedral_gives_eight_distinct_transforms():
    frame = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    outputs = {dihedral(frame, k).tobytes() for k in range(8)}
    assert len(outputs) == 8


def test_missing_data_names_the_commands_that_make_it(tmp_path):
    with pytest.raises(DataError, match=r"weather-restore assemble && weather-restore split"):
        ClipDataset(tmp_path / "mwvd")


def test_a_crop_larger_than_the_frames_is_refused(tiny_mwvd):
    with pytest.raises(DataError, match=r"smaller than the crop 64"):
        ClipDataset(tiny_mwvd, "train", crop=64)[(0, (0, 0))]


def test_validation_clips_cover_every_weather(tiny_mwvd):
    dataset = ClipDataset(tiny_mwvd, "val")
    chosen = spread_over_weathers(dataset.clips, 3)
    assert sorted(dataset.clips[i].weather for i in chosen) == ["haze", "rain", "snow"]


def test_each_split_reads_its_own_folder_and_clips(tiny_mwvd):
    sets = {split: ClipDataset(tiny_mwvd, split, augment=False) for split in ("train", "val", "test")}
    assert {split: len(d) for split, d in sets.items()} == {"train": 12, "val": 6, "test": 6}
    for split, dataset in sets.items():
        assert {c.split for c in dataset.clips} == {split}
        sample = dataset[0]
        np.testing.assert_array_equal(
            sample["clean"][0].numpy().transpose(1, 2, 0),
            read_frame(tiny_mwvd / split / "gt" / dataset.clips[0].id / "0000.png"),
        )
    frames = FrameDataset(tiny_mwvd, "val", augment=False)
    assert len(frames) == 6 * 6


def test_a_tree_without_val_clips_asks_for_the_split_stage(tiny_mwvd, tmp_path):
    _, clips = read_manifest(tiny_mwvd)
    write_manifest([c for c in clips if c.split != "val"], ClipsConfig(clip_len=6), tmp_path)
    with pytest.raises(DataError, match=r"manifest.json: lists no val clips; rerun `weather-restore split`"):
        ClipDataset(tmp_path, "val")


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_the_sampler_covers_every_item_once_per_epoch_and_goes_on():
    keys = take(TrainingSampler(size=5, batch_size=2, seed=0), 10)
    assert sorted(k[0] for k in keys[:5]) == [0, 1, 2, 3, 4]
    assert sorted(k[0] for k in keys[5:]) == [0, 1, 2, 3, 4]
    assert len({k[1] for k in keys}) == 10  # every sample has its own draw


def test_resuming_the_sampler_continues_the_same_stream():
    full = take(TrainingSampler(size=7, batch_size=3, seed=4), 30)
    resumed = take(TrainingSampler(size=7, batch_size=3, seed=4, start_iteration=4), 18)
    assert resumed == full[12:]


def test_processes_share_each_global_batch():
    single = take(TrainingSampler(size=7, batch_size=4, seed=1), 12)
    rank0 = take(TrainingSampler(size=7, batch_size=4, seed=1, rank=0, world_size=2), 6)
    rank1 = take(TrainingSampler(size=7, batch_size=4, seed=1, rank=1, world_size=2), 6)
    for step in range(3):
        assert single[4 * step : 4 * step + 4] == rank0[2 * step : 2 * step + 2] + rank1[2 * step : 2 * step + 2]
