"""Outputs never replace what the tool did not write: a user's file survives every refused command, a crash leaves
no partial and no half-replaced output, and a video cut short is an error, never a short restoration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

from weather_restore.checkpoint import load_checkpoint, save_checkpoint
from weather_restore.cli import main
from weather_restore.config import ExportConfig, ExportExporters
from weather_restore.data.frames import write_frame
from weather_restore.errors import DataError, ExportError, OutputError
from weather_restore.export import export_model, is_onnx_file
from weather_restore.model_loading import LoadedModel
from weather_restore.models import build_model
from weather_restore.outputs import MARKER_NAME, partial_path
from weather_restore.restore import restore

pytestmark = pytest.mark.usefixtures("one_thread")

PRECIOUS = "a user's own notes\n"
TINY_DATA = {
    "data": {
        "workers": 1,
        "synthetic": {
            "videos_per_weather": 3,
            "frames_per_video": 6,
            "frame_size": [16, 16],
            "photographs": ["astronaut", "coffee", "chelsea"],
        },
        "clips": {"clip_len": 3, "train_per_weather": 1, "val_per_weather": 1, "test_per_weather": 1},
    },
    "tracking": {"enabled": False},
}


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, relative, sorted: what must not change when a command is refused."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def user_folder(folder: Path) -> Path:
    """A folder the user made, holding a file of theirs."""
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text(PRECIOUS)
    return folder


def refused(capsys, code: int, *fragments: str) -> str:
    """The command exited 2 with one line on stderr holding `fragments`, and no traceback."""
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.count("\n") == 1 and "Traceback" not in error, error
    for fragment in fragments:
        assert fragment in error, error
    return error


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(TINY_DATA))
    return path


@pytest.fixture(scope="module")
def videos(params_file, tmp_path_factory) -> Path:
    """A videos folder written by `assemble` (6 tiny videos)."""
    out = tmp_path_factory.mktemp("assembled") / "videos"
    assert main(["--params", str(params_file), "assemble", "--out", str(out)]) == 0
    return out


def identity() -> LoadedModel:
    return LoadedModel("dwgn", "test", lambda x: x, "identity")


def noise_frames(count: int, height: int = 32, width: int = 48) -> list[np.ndarray]:
    """Frames of fresh noise: every frame costs the encoder its full size, so half a file is half the frames."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def write_video(path: Path, count: int = 24, faststart: bool = False) -> Path:
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.height, stream.width, stream.pix_fmt = 32, 48, "yuv420p"
        for frame in noise_frames(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


# --- assemble and split -------------------------------------------------------------------------------------------


def test_assemble_refuses_a_folder_of_user_files(tmp_path, params_file, capsys):
    mine = user_folder(tmp_path / "mine")
    code = main(["--params", str(params_file), "assemble", "--out", str(mine)])
    refused(capsys, code, f"{mine}: exists, is not empty", f"has no {MARKER_NAME}", "--force")
    assert listing(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == PRECIOUS


@pytest.mark.parametrize("out", [".", ".."])
def test_assemble_into_the_current_folder_or_its_parent_is_refused_even_with_force(
    tmp_path, params_file, monkeypatch, capsys, out
):
    here = user_folder(tmp_path / "project" / "sub")
    (tmp_path / "project" / "other.txt").write_text(PRECIOUS)
    before = listing(tmp_path)
    monkeypatch.chdir(here)
    code = main(["--params", str(params_file), "assemble", "--out", out, "--force"])
    refused(capsys, code, "holds the current folder", "--force does not change this")
    assert listing(tmp_path) == before


def test_a_second_assemble_replaces_its_own_marked_folder(tmp_path, params_file, videos, capsys):
    assert (videos / MARKER_NAME).is_file()
    out = tmp_path / "videos"
    for _ in range(2):
        assert main(["--params", str(params_file), "assemble", "--out", str(out)]) == 0
    assert listing(out) == listing(videos)
    assert [p.name for p in tmp_path.iterdir()] == ["videos"]  # no partial, no folder moved aside


def test_split_refuses_a_folder_of_user_files_and_replaces_its_own(tmp_path, params_file, videos, capsys):
    mine = user_folder(tmp_path / "mine")
    args = ["--params", str(params_file), "split", "--videos", str(videos)]
    refused(capsys, main([*args, "--out", str(mine)]), f"{mine}: exists, is not empty", "--force")
    assert listing(mine) == ["notes.txt"]

    out = tmp_path / "mwvd"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out)]) == 0  # its own folder, recognised by the marker
    assert (out / MARKER_NAME).is_file() and (out / "manifest.json").is_file()
    assert main([*args, "--out", str(mine), "--force"]) == 0  # what --force is for
    assert not (mine / "notes.txt").exists() and (mine / "manifest.json").is_file()


def test_split_into_the_videos_folder_or_another_command_s_output_is_refused(tmp_path, params_file, videos, capsys):
    args = ["--params", str(params_file), "split", "--videos", str(videos)]
    before = listing(videos)
    refused(capsys, main([*args, "--out", str(videos), "--force"]), "the output would overwrite the input")
    refused(capsys, main([*args, "--out", str(videos.parent), "--force"]), "holds the input")
    assert listing(videos) == before
    # A folder another command marked is not split's to replace: assemble's videos are not clips.
    copy = tmp_path / "videos"
    assert main(["--params", str(params_file), "assemble", "--out", str(copy)]) == 0
    capsys.readouterr()
    videos_elsewhere = ["--params", str(params_file), "split", "--videos", str(videos)]
    refused(capsys, main([*videos_elsewhere, "--out", str(copy)]), "was written by weather-restore assemble")


def test_a_folder_from_before_the_marker_is_recognised_by_its_index(tmp_path, params_file, videos):
    old = tmp_path / "videos"
    old.mkdir()
    (old / "index.json").write_bytes((videos / "index.json").read_bytes())
    (old / "synthetic").mkdir()  # what an older version left beside its index
    assert main(["--params", str(params_file), "assemble", "--out", str(old)]) == 0
    assert (old / MARKER_NAME).is_file()


def test_dvc_stages_need_no_force():
    """DVC removes a stage's outs before it runs it, so the commands in dvc.yaml write into no folder at all."""
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    assert stages["assemble"]["cmd"] == "weather-restore assemble"
    assert stages["split"]["cmd"] == "weather-restore split"


# --- restore ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, exportable_models) -> Path:
    torch.manual_seed(0)
    config = exportable_models["dwgn"]
    path = tmp_path_factory.mktemp("model") / "dwgn.pt"
    state = {"model": build_model("dwgn", **config).state_dict(), "model_name": "dwgn", "model_config": config}
    save_checkpoint(path, state)
    return path


def test_restore_refuses_a_folder_of_user_files_and_replaces_it_with_force(tmp_path, model_file, capsys):
    write_frame(tmp_path / "photo.png", noise_frames(1)[0])
    videos = user_folder(tmp_path / "Videos")
    args = ["restore", str(tmp_path / "photo.png"), "-o", str(videos), "--model", str(model_file), "--tile", "0"]
    refused(capsys, main(args), f"{videos}: exists, is not empty", "--force")
    assert listing(videos) == ["notes.txt"]
    assert main([*args, "--force"]) == 0
    assert listing(videos) == sorted([MARKER_NAME, "photo.png"])


def test_restore_into_a_folder_holding_the_input_is_refused_even_with_force(tmp_path, model_file, monkeypatch, capsys):
    raw = tmp_path / "shoot" / "raw"
    for index, frame in enumerate(noise_frames(3)):
        write_frame(raw / f"{index}.png", frame)
    before = listing(tmp_path)
    frames = {p.name: p.read_bytes() for p in raw.iterdir()}
    monkeypatch.chdir(tmp_path)
    code = main(["restore", "shoot/raw", "-o", "shoot", "--model", str(model_file), "--force"])
    refused(capsys, code, f"{tmp_path / 'shoot'}: the output folder holds the input shoot/raw", "--force does not")
    assert listing(tmp_path) == before and {p.name: p.read_bytes() for p in raw.iterdir()} == frames


def test_restore_replaces_only_a_file_of_the_kind_it_writes(tmp_path):
    source = write_video(tmp_path / "in.mp4", count=3)
    notes = tmp_path / "notes.mp4"
    notes.write_text(PRECIOUS)  # a video's name, not a video
    with pytest.raises(OutputError, match=r"notes\.mp4: exists and is not a video file; pass --force"):
        restore(source, notes, identity())
    assert notes.read_text() == PRECIOUS
    folder = user_folder(tmp_path / "folder.mp4")
    with pytest.raises(OutputError, match=r"folder\.mp4: is a folder, which a video file never replaces"):
        restore(source, folder, identity(), force=True)
    assert listing(folder) == ["notes.txt"]

    previous = write_video(tmp_path / "previous.mp4", count=2)
    restore(source, previous, identity())  # a video replaces a video
    with av.open(str(previous)) as container:
        assert len(list(container.decode(video=0))) == 3
    restore(source, notes, identity(), force=True)
    assert notes.read_bytes()[4:8] == b"ftyp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.mp4", "in.mp4", "notes.mp4", "previous.mp4"]


def test_the_next_run_removes_the_partials_of_dead_writers_and_keeps_a_live_one(tmp_path):
    source = write_video(tmp_path / "in.mp4", count=2)
    output = tmp_path / "out.mp4"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, live.pid):
            partial_path(output, pid).write_bytes(b"half a video")
        restore(source, output, identity())
        assert not partial_path(output, dead.pid).exists()
        assert partial_path(output, live.pid).read_bytes() == b"half a video"
    finally:
        live.kill()
        live.wait()


def test_a_truncated_video_fails_with_the_frame_counts_and_leaves_no_output(tmp_path, monkeypatch, capsys):
    whole = write_video(tmp_path / "whole.mp4", faststart=True).read_bytes()
    (tmp_path / "whole.mp4").unlink()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.mp4: truncated or damaged: decoded \d+ of 24 frames"):
        restore(tmp_path / "cut.mp4", tmp_path / "out.mp4", identity())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4"]


# --- export and checkpoints ---------------------------------------------------------------------------------------

EXPORT = ExportConfig(exporter=ExportExporters(dwgn="torchscript"), latency_repeats=1)


@pytest.fixture(scope="module")
def exported(tiny_mwvd, tmp_path_factory, exportable_models) -> tuple[Path, Path, Path]:
    """(checkpoint, model.onnx, export.json) of one good export; the tests below leave it as it was, or fail."""
    torch.manual_seed(0)
    config = exportable_models["dwgn"]
    root = tmp_path_factory.mktemp("export")
    checkpoint = root / "dwgn.pt"
    state = {"model": build_model("dwgn", **config).state_dict(), "model_name": "dwgn", "model_config": config}
    save_checkpoint(checkpoint, state)
    onnx_path, report = root / "out" / "model.onnx", root / "out" / "export.json"
    export_model("dwgn", checkpoint, tiny_mwvd, onnx_path, report, EXPORT)
    return checkpoint, onnx_path, report


def test_a_failed_parity_keeps_the_previous_good_graph_byte_for_byte(exported, tiny_mwvd):
    checkpoint, onnx_path, report = exported
    graph, figures = onnx_path.read_bytes(), report.read_bytes()
    strict = EXPORT.model_copy(update={"atol": 1e-12})  # float32 kernels differ by ~1e-7: nothing passes
    with pytest.raises(ExportError, match="the previous graph is kept"):
        export_model("dwgn", checkpoint, tiny_mwvd, onnx_path, report, strict)
    assert onnx_path.read_bytes() == graph and report.read_bytes() == figures
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["export.json", "model.onnx"]


def test_an_exporter_exception_is_one_export_error_and_leaves_no_partial(exported, tiny_mwvd):
    checkpoint, onnx_path, report = exported
    graph = onnx_path.read_bytes()
    unsupported = EXPORT.model_copy(update={"opset": 99})
    with pytest.raises(ExportError) as raised:
        export_model("dwgn", checkpoint, tiny_mwvd, onnx_path, report, unsupported)
    message = str(raised.value)
    assert message.startswith("the torchscript ONNX exporter failed on dwgn (RuntimeError: ") and "\n" not in message
    assert onnx_path.read_bytes() == graph
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["export.json", "model.onnx"]


def test_export_replaces_only_an_onnx_graph_and_never_its_checkpoint(exported, tiny_mwvd, tmp_path):
    checkpoint, onnx_path, _ = exported
    assert is_onnx_file(onnx_path)  # what a re-export replaces
    notes, weights = tmp_path / "notes.onnx", checkpoint.read_bytes()
    notes.write_text(PRECIOUS)
    with pytest.raises(OutputError, match=r"notes\.onnx: exists and is not an ONNX file; pass --force"):
        export_model("dwgn", checkpoint, tiny_mwvd, notes, tmp_path / "export.json", EXPORT)
    with pytest.raises(OutputError, match="the output would overwrite the input"):
        export_model("dwgn", checkpoint, tiny_mwvd, checkpoint, tmp_path / "export.json", EXPORT, force=True)
    assert notes.read_text() == PRECIOUS and checkpoint.read_bytes() == weights
    assert list(tmp_path.iterdir()) == [notes]


def test_a_checkpoint_write_that_fails_midway_leaves_no_temporary_and_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 3, "weights": torch.arange(3.0)})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a value it cannot write
        save_checkpoint(path, {"iteration": 4, "weights": torch.arange(4.0), "oops": lambda: None})
    assert path.read_bytes() == before and load_checkpoint(path)["iteration"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_output_checks_resolve_links_before_comparing(tmp_path):
    raw = tmp_path / "shoot" / "raw"
    for index, frame in enumerate(noise_frames(2)):
        write_frame(raw / f"{index}.png", frame)
    os.symlink(tmp_path / "shoot", tmp_path / "alias")
    with pytest.raises(OutputError, match="holds the input"):
        restore(raw, tmp_path / "alias", identity(), force=True)
    assert sorted(p.name for p in raw.iterdir()) == ["0.png", "1.png"]


def test_a_file_output_never_replaces_a_folder_of_the_same_name(tmp_path):
    from weather_restore.errors import OutputError
    from weather_restore.outputs import atomic_write_text

    folder = tmp_path / "checkpoint.pt"
    folder.mkdir()
    (folder / "user.txt").write_text("keep")
    with pytest.raises(OutputError, match="is a folder: refusing to replace it with a file"):
        atomic_write_text(folder, "new")
    assert (folder / "user.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
