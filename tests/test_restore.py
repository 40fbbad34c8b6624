"""`weather-restore restore`: video files, frame folders and images in, the same kinds out; bad input refused."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from weather_restore.checkpoint import load_model, save_checkpoint
from weather_restore.cli import main
from weather_restore.data.frames import write_frame
from weather_restore.errors import DataError, OutputError
from weather_restore.model_loading import LoadedModel, load_restorer
from weather_restore.models import build_model
from weather_restore.outputs import MARKER_NAME
from weather_restore.restore import restore

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
HEIGHT, WIDTH = 32, 48


def moving_frames(count: int, height: int = HEIGHT, width: int = WIDTH) -> list[np.ndarray]:
    """A smooth pattern drifting two pixels a frame: something a video codec keeps recognisable."""
    y, x = np.mgrid[0:height, 0:width]
    return [
        np.stack([127 + 100 * np.sin((x + 2 * t) / (5 + c) + y / 7) for c in range(3)], axis=-1).astype(np.uint8)
        for t in range(count)
    ]


def write_video(
    path: Path, count: int = 12, fps: int = 24, codec: str = "libx264", audio: bool = True, **size: int
) -> Path:
    """A short video file made with PyAV, with a second of silent AAC audio."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        video = moving_frames(count, **size)
        stream.height, stream.width = video[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if audio:
            sound = container.add_stream("aac", rate=16000)
            sound.layout = "mono"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if audio:
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, 0
            container.mux(sound.encode(samples))
            container.mux(sound.encode(None))
        container.mux(stream.encode(None))
    return path


def probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        return {
            "frames": len(decoded),
            "size": (decoded[0].height, decoded[0].width),
            "fps": stream.average_rate,
            "time_base": stream.time_base,
            "pts": [frame.pts for frame in decoded],
            "audio": [s.codec_context.name for s in container.streams.audio],
            "first": decoded[0].to_ndarray(format="rgb24"),
        }


def identity(name: str = "dynstaticnet") -> LoadedModel:
    return LoadedModel(name, "test", lambda x: x, "identity")


@pytest.fixture
def checkpoints(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, config in tiny_models.items():
        torch.manual_seed(0)
        model = build_model(name, **config)
        paths[name] = root / f"{name}.pt"
        save_checkpoint(paths[name], {"model": model.state_dict(), "model_name": name, "model_config": config})
    return paths


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- Round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dynstaticnet", "dwgn"])
def test_video_round_trip_keeps_frame_count_size_fps_time_stamps_and_audio(tmp_path, checkpoints, name):
    source = write_video(tmp_path / "rainy.mp4")
    summary = restore(source, tmp_path / "restored.mp4", load_restorer(name, checkpoints[name]), tile=0)
    before, after = probe(source), probe(tmp_path / "restored.mp4")
    assert summary.frames == after["frames"] == before["frames"] == 12
    assert after["size"] == before["size"] == (HEIGHT, WIDTH)
    assert after["fps"] == before["fps"] == 24
    assert after["pts"] == before["pts"]
    assert after["audio"] == ["aac"] and "audio (aac) copied" in summary.notes
    assert leftovers(tmp_path) == ["rainy.mp4", "restored.mp4"]


def test_identity_restoration_gives_back_the_input_video_up_to_compression(tmp_path):
    source = write_video(tmp_path / "in.mp4", audio=False)
    restore(source, tmp_path / "out.mkv", identity())
    before, after = probe(source), probe(tmp_path / "out.mkv")
    assert after["frames"] == 12 and after["audio"] == []
    assert np.abs(after["first"].astype(int) - before["first"].astype(int)).mean() < 3


def test_audio_the_output_container_cannot_take_is_left_out_and_said_so(tmp_path):
    source = tmp_path / "in.mkv"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
        sound = container.add_stream("libopus", rate=48000)
        sound.layout = "mono"
        for frame in moving_frames(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.float32), format="flt", layout="mono")
        samples.sample_rate, samples.pts = 48000, 0
        container.mux(sound.encode(samples))
        container.mux(sound.encode(None))
        container.mux(stream.encode(None))
    summary = restore(source, tmp_path / "out.avi", identity())
    assert any("audio (opus) not carried over: the .avi container does not take it" in n for n in summary.notes)
    assert probe(tmp_path / "out.avi")["frames"] == 3


def test_compare_writes_input_and_restored_side_by_side(tmp_path):
    source = write_video(tmp_path / "in.mp4", audio=False)
    darker = LoadedModel("dwgn", "test", lambda x: x * 0.5, "darker")
    summary = restore(source, tmp_path / "compare.mp4", darker, compare=True)
    after = probe(tmp_path / "compare.mp4")
    assert after["size"] == (HEIGHT, 2 * WIDTH) and (summary.width, summary.height) == (2 * WIDTH, HEIGHT)
    left, right = after["first"][:, :WIDTH].astype(float), after["first"][:, WIDTH:].astype(float)
    assert abs(right.mean() - left.mean() / 2) < 3


def test_odd_sizes_are_padded_to_even_for_yuv420p_and_said_so(tmp_path):
    frames = tmp_path / "frames"
    for index, frame in enumerate(moving_frames(3, height=21, width=33)):
        write_frame(frames / f"{index}.png", frame)
    summary = restore(frames, tmp_path / "out.mp4", identity("dwgn"), fps=10)
    after = probe(tmp_path / "out.mp4")
    assert after["size"] == (22, 34) and after["fps"] == 10 and after["frames"] == 3
    assert "33x21 padded to 34x22 (yuv420p)" in summary.notes


def test_frame_folder_to_folder_keeps_names_and_order(tmp_path):
    frames = tmp_path / "frames"
    video = moving_frames(12)
    for index, frame in enumerate(video):
        write_frame(frames / f"f{index}.png", frame)
    summary = restore(frames, tmp_path / "restored", identity())
    assert summary.kind == "frames" and summary.frames == 12
    assert leftovers(tmp_path / "restored") == sorted([MARKER_NAME, *(f"f{i}.png" for i in range(12))])
    for index in (0, 2, 11):  # natural order: f2 is the third frame, not the twelfth
        restored = np.asarray(Image.open(tmp_path / "restored" / f"f{index}.png"))
        np.testing.assert_array_equal(restored, video[index])
    assert leftovers(tmp_path) == ["frames", "restored"]


def test_a_second_run_replaces_the_output_folder_of_the_first(tmp_path):
    frames = tmp_path / "frames"
    for index, frame in enumerate(moving_frames(3)):
        write_frame(frames / f"{index}.png", frame)
    restore(frames, tmp_path / "restored", identity())
    (frames / "2.png").unlink()
    restore(frames, tmp_path / "restored", identity())
    assert leftovers(tmp_path / "restored") == [MARKER_NAME, "0.png", "1.png"]
    assert leftovers(tmp_path) == ["frames", "restored"]


def test_single_image_to_image(tmp_path, checkpoints):
    write_frame(tmp_path / "photo.png", moving_frames(1)[0])
    model = load_restorer(str(checkpoints["dynstaticnet"]))
    summary = restore(tmp_path / "photo.png", tmp_path / "clean.jpg", model)
    assert summary.kind == "image" and summary.frames == 1
    with Image.open(tmp_path / "clean.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (WIDTH, HEIGHT))


@pytest.mark.parametrize("name", ["dynstaticnet", "dwgn"])
def test_bfloat16_restores_what_the_model_computes_under_autocast_close_to_float32(checkpoints, name):
    frames = np.stack(moving_frames(10)).transpose(0, 3, 1, 2).astype(np.float32) / 255  # (T, 3, H, W)
    x = frames[None] if name == "dynstaticnet" else frames
    full = load_restorer(str(checkpoints[name]))
    half = load_restorer(str(checkpoints[name]), precision="bfloat16")
    assert (full.precision, half.precision) == ("float32", "bfloat16")
    restored, reference = half.forward(x), full.forward(x)
    module = load_model(checkpoints[name], "cpu", name)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        by_hand = module(torch.from_numpy(x)).float().numpy()
    assert restored.dtype == np.float32 and restored.shape == x.shape
    np.testing.assert_array_equal(restored, by_hand)
    difference = np.abs(restored - reference)
    assert 0 < difference.max() < 0.05  # bfloat16's 8-bit mantissa, not float32's result
    assert difference.mean() < 0.005


def test_video_to_frame_folder(tmp_path):
    source = write_video(tmp_path / "in.mp4", count=5, audio=False)
    restore(source, tmp_path / "frames", identity("dwgn"))
    assert leftovers(tmp_path / "frames") == [MARKER_NAME, *(f"{i:06d}.png" for i in range(5))]


# --- Bad input: one message, no output --------------------------------------------------------------------------


def text_named_as_video(folder: Path) -> Path:
    (folder / "holiday.mp4").write_text("not a video at all")
    return folder / "holiday.mp4"


def truncated_video(folder: Path) -> Path:
    whole = write_video(folder / "whole.mp4").read_bytes()
    (folder / "whole.mp4").unlink()
    (folder / "cut.mp4").write_bytes(whole[: len(whole) // 3])
    return folder / "cut.mp4"


def unknown_codec_video(folder: Path) -> Path:
    """An AVI whose video codec tag (FourCC) no FFmpeg decoder knows."""
    whole = write_video(folder / "mpeg4.avi", codec="mpeg4", audio=False).read_bytes()
    (folder / "mpeg4.avi").unlink()
    (folder / "odd.avi").write_bytes(whole.replace(b"FMP4", b"QQQQ"))
    return folder / "odd.avi"


def unknown_extension(folder: Path) -> Path:
    (folder / "clip.xyz").write_bytes(b"data")
    return folder / "clip.xyz"


def mixed_sizes(folder: Path) -> Path:
    write_frame(folder / "mixed" / "0001.png", moving_frames(1)[0])
    write_frame(folder / "mixed" / "0002.png", moving_frames(1, height=16)[0])
    return folder / "mixed"


def empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


BAD_INPUTS = {
    "not a video": (text_named_as_video, "holiday.mp4: not a readable video"),
    "unreadable (truncated) video": (truncated_video, "cut.mp4: not a readable video"),
    "unsupported codec": (unknown_codec_video, "odd.avi: its video codec is not one this FFmpeg build"),
    "unsupported extension": (unknown_extension, "clip.xyz: unsupported input '.xyz'"),
    "missing input": (lambda folder: folder / "nowhere.mp4", "nowhere.mp4: no such file or folder"),
    "empty folder": (empty_folder, "empty: no frames"),
    "frames of different sizes": (mixed_sizes, r"0002.png: frame is 48x16, but .*0001.png is 48x32"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_its_message_and_leaves_no_output(tmp_path, case):
    make, message = BAD_INPUTS[case]
    bad = make(tmp_path)
    before = leftovers(tmp_path)
    with pytest.raises(DataError, match=message):
        restore(bad, tmp_path / "restored.mp4", identity())
    assert leftovers(tmp_path) == before


def test_a_failure_midway_removes_the_partial_output(tmp_path):
    source = write_video(tmp_path / "in.mp4")
    calls = []

    def failing(x: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        restore(source, tmp_path / "out.mp4", LoadedModel("dwgn", "test", failing, "failing"))
    assert leftovers(tmp_path) == ["in.mp4"]


def test_output_must_not_overwrite_the_input_or_be_an_image_of_a_video(tmp_path):
    source = write_video(tmp_path / "in.mp4", audio=False)
    with pytest.raises(OutputError, match="overwrite the input"):
        restore(source, source, identity())
    with pytest.raises(DataError, match="an image holds one frame"):
        restore(source, tmp_path / "out.png", identity())
    with pytest.raises(DataError, match="unsupported output '.webm'"):
        restore(source, tmp_path / "out.webm", identity())
    assert leftovers(tmp_path) == ["in.mp4"]


# --- The command ------------------------------------------------------------------------------------------------


def test_cli_restores_a_video_and_prints_a_summary(tmp_path, checkpoints, capsys):
    source = write_video(tmp_path / "rainy.mov", count=4)
    args = ["--params", str(PARAMS), "restore", str(source), "-o", str(tmp_path / "clean.mov"), "--model", "dwgn"]
    assert main([*args, "--checkpoint", str(checkpoints["dwgn"]), "--tile", "32", "--tile-overlap", "8"]) == 0
    out = capsys.readouterr().out
    assert "restored 4 frames (48x32) with dwgn (pytorch)" in out and "audio (aac) copied" in out
    assert probe(tmp_path / "clean.mov")["fps"] == Fraction(24)


def test_cli_refuses_a_model_file_of_another_model_with_one_line_and_no_output(tmp_path, checkpoints, capsys):
    source = write_video(tmp_path / "rainy.mp4", count=2, audio=False)
    args = ["--params", str(PARAMS), "restore", str(source), "-o", str(tmp_path / "clean.mp4")]
    assert main([*args, "--model", "dwgn", "--checkpoint", str(checkpoints["dynstaticnet"])]) == 2
    error = capsys.readouterr().err
    assert error.startswith("weather-restore restore: ") and "holds a DynStaticNet model, not DwGN" in error
    assert "Traceback" not in error and error.count("\n") == 1
    assert leftovers(tmp_path) == ["rainy.mp4"]


def test_restore_runs_outside_the_repository_without_a_params_file(tmp_path, checkpoints, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: a user's own folder
    write_video(tmp_path / "rainy.mp4", count=2, audio=False)
    args = ["restore", "rainy.mp4", "-o", "clean", "--model", str(checkpoints["dwgn"]), "--tile", "0"]
    assert main(args) == 0
    assert leftovers(tmp_path / "clean") == [MARKER_NAME, "000000.png", "000001.png"]
    assert main(["train", "--model", "dwgn"]) == 2  # the pipeline's stages still need params.yaml
    assert "params.yaml: no such params file" in capsys.readouterr().err
