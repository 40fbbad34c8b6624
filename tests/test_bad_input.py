"""Every bad input is refused the same way: exit status 2, one line on stderr naming the key or file (and the file
given with --params, not params.yaml), no traceback, and not one file written in the working folder.

The rows run `weather-restore` in-process (`cli.main`); two of them also through the installed entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import BaseModel

from weather_restore.checkpoint import save_checkpoint
from weather_restore.cli import main
from weather_restore.config import CountRange, Params, Range
from weather_restore.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SETTINGS = "settings.yaml"  # the file given with --params: messages must name it, never params.yaml


def range_keys(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, Any]:
    """Every `[low, high]` setting of params (a field typed Range or CountRange), dotted key -> default."""
    ordered = {*Range.__metadata__, *CountRange.__metadata__}
    keys = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.update(range_keys(field.annotation, f"{prefix}{name}."))
        elif ordered & set(field.metadata):
            keys[prefix + name] = field.default
    return keys


RANGES = range_keys()

# (dotted key, bad value, what the message says): for a params file given with --params.
BAD_SETTINGS = [
    ("training.dwgn.betas", [2, 3], "'training.dwgn.betas' = [2, 3] is not allowed: item 0: Input should be less"),
    ("evaluation.flops_size", [0, -5], "'evaluation.flops_size' = [0, -5] is not allowed: item 0: Input should be"),
    ("models.dwgn.dim", 48, "'models.dwgn.dim' = 48 is not allowed: it must be a multiple of head_dim (32)"),
    # dim 10: each branch of the refinement has 5 channels, which its 2 heads cannot split.
    ("models.dynstaticnet.dim", 10, "'models.dynstaticnet.refinement_heads' = 2 is not allowed: with dim 10"),
    ("training.dwgn.iterations", True, "'training.dwgn.iterations' = True is not allowed: Input should be a valid"),
    ("training.dynstaticnet.lr", float("inf"), "'training.dynstaticnet.lr' = inf is not allowed: Input should be a"),
    ("training.dwgn.iteration", 5, "unknown key 'training.dwgn.iteration'"),
] + [
    (key, [high, low], f"'{key}' = {[high, low]!r} is not allowed: low {high} is above high {low}: write [low, high]")
    for key, (low, high) in RANGES.items()
]


def test_the_range_settings_are_found_in_the_config_classes():
    assert {"data.synthetic.rain.layers", "data.synthetic.haze.beta", "data.synthetic.snow.wind"} <= RANGES.keys()
    assert all(low < high for low, high in RANGES.values())  # reversed, each default is a bad range


@pytest.fixture(scope="module")
def project(tmp_path_factory, exportable_models) -> Path:
    """A user's folder: the repository's params.yaml, a photograph, a trained-looking DwGN checkpoint, one whose
    weights do not fit its config, a file that is no checkpoint, and a split whose manifest.json is cut short."""
    root = tmp_path_factory.mktemp("bad_input")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(root / "photo.png")
    config = exportable_models["dwgn"]
    torch.manual_seed(0)
    weights = build_model("dwgn", **config).state_dict()
    save_checkpoint(root / "dwgn.pt", {"model": weights, "model_name": "dwgn", "model_config": config})
    wider = {**config, "dim": 2 * config["dim"], "head_dim": 2 * config["head_dim"]}
    save_checkpoint(root / "misfit.pt", {"model": weights, "model_name": "dwgn", "model_config": wider})
    torch.save({"weights": torch.zeros(3)}, root / "random.pt")
    (root / "broken" / "test").mkdir(parents=True)
    (root / "broken" / "manifest.json").write_text('{"version": 1, "clips": [{"id": "rain_0001", ')
    return root


@pytest.fixture
def settings(tmp_path) -> Any:
    """Write the repository's params with one key set to a bad value into tmp_path/settings.yaml; its path."""

    def write(key: str, value: Any) -> Path:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        *parents, last = key.split(".")
        section = params
        for part in parents:
            section = section.setdefault(part, {})
        section[last] = value
        path = tmp_path / SETTINGS
        path.write_text(yaml.safe_dump(params))
        return path

    return write


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # the parser's refusals
        return exit.code


def refused(project: Path, argv: list[str], capsys, *fragments: str) -> str:
    """Run `weather-restore ARGV` in `project`: exit 2, one stderr line holding `fragments`, no file written."""
    before = listing(project)
    capsys.readouterr()
    code = run_cli(argv)
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    (line,) = error.splitlines()
    assert line.startswith("weather-restore"), line
    for fragment in fragments:
        assert fragment in line, line
    assert listing(project) == before
    return line


STAGE_OF = {"data": ["assemble"], "models": ["train", "--model", "dwgn"], "training": ["export", "--model", "dwgn"]}


@pytest.mark.parametrize(("key", "value", "says"), BAD_SETTINGS, ids=[row[0] for row in BAD_SETTINGS])
def test_a_bad_setting_names_the_params_file_given_and_the_key(
    project, settings, monkeypatch, capsys, key, value, says
):
    monkeypatch.chdir(project)
    path = settings(key, value)
    command = STAGE_OF.get(key.split(".")[0], ["params"])
    # --params before the command for half of the rows, after it for the others: both are the same option.
    argv = ["--params", str(path), *command] if len(key) % 2 else [*command, "--params", str(path)]
    line = refused(project, argv, capsys, f"{path}: {says}")
    assert "params.yaml" not in line


CLI_ROWS = {
    "tile": (["restore", "photo.png", "-o", "out.png", "--model", "dwgn.pt", "--tile", "-5"], ["--tile", "-5"]),
    "crf": (["restore", "photo.png", "-o", "out.mp4", "--model", "dwgn.pt", "--crf", "100"], ["--crf", "0 to 51"]),
    "threads": (["restore", "photo.png", "-o", "out.png", "--model", "dwgn.pt", "--threads", "-1"], ["--threads"]),
    "fps-0": (["restore", "photo.png", "-o", "out.mp4", "--model", "dwgn.pt", "--fps", "0"], ["--fps", "above 0"]),
    "fps-negative": (["restore", "photo.png", "-o", "out.mp4", "--model", "dwgn.pt", "--fps", "-3"], ["--fps", "-3"]),
    "device": (["restore", "photo.png", "-o", "out.png", "--model", "dwgn.pt", "--device", "bogus"], ["--device"]),
    "precision": (["restore", "photo.png", "-o", "out.png", "--model", "dwgn.pt", "--precision", "fp16"], ["fp16"]),
    "precision-of-onnx": (
        ["restore", "photo.png", "-o", "out.png", "--model", "dwgn.onnx", "--precision", "bfloat16"],
        ["--precision bfloat16", "dwgn.onnx is an ONNX graph", "float32"],
    ),
    "precision-of-registry": (
        ["restore", "photo.png", "-o", "out.png", "--model", "models:/DwGN@champion", "--precision", "bfloat16"],
        ["--precision bfloat16", "models:/DwGN@champion is an ONNX graph"],
    ),
    "not-a-checkpoint": (
        ["restore", "photo.png", "-o", "out.png", "--model", "random.pt"],
        ["random.pt", "not a weather-restore checkpoint"],
    ),
    "misfit-restore": (
        ["restore", "photo.png", "-o", "out.png", "--model", "misfit.pt"],
        ["misfit.pt", "weights do not fit a DwGN model"],
    ),
    "misfit-evaluate": (
        ["evaluate", "--model", "dwgn", "--checkpoint", "misfit.pt", "--data", "broken"],
        ["misfit.pt", "weights do not fit a DwGN model"],
    ),
    "other-model": (
        ["restore", "photo.png", "-o", "out.png", "--model", "dynstaticnet", "--checkpoint", "dwgn.pt"],
        ["dwgn.pt", "holds a DwGN model, not DynStaticNet"],
    ),
    "uri-of-other-model": (
        ["evaluate", "--model", "dwgn", "--model-uri", "models:/DynStaticNet@champion"],
        ["models:/DynStaticNet@champion", "not DwGN"],
    ),
    "no-store": (
        ["restore", "photo.png", "-o", "out.png", "--model", "models:/DwGN@champion"],
        ["no MLflow store at sqlite:///", "mlflow.db", "MLFLOW_TRACKING_URI"],
    ),
    "version-word": (["promote", "--model", "dwgn", "--version", "abc"], ["--version", "'abc'"]),
    "version-decimal": (["promote", "--model", "dwgn", "--version", "1.0"], ["--version", "'1.0'"]),
    "reason-without-force": (["promote", "--model", "dwgn", "--reason", "better"], ["--reason", "--force"]),
    "force-without-reason": (["promote", "--model", "dwgn", "--force"], ["--force", "--reason"]),
    "compare-missing-reports": (["compare", "--reports", "missing"], ["missing: no such folder"]),
    "compare-unknown-model": (["compare", "--models", "dwgn_typo"], ["dwgn_typo"]),
    "broken-manifest-train": (["train", "--model", "dwgn", "--data", "broken"], ["broken/manifest.json"]),
    "broken-manifest-evaluate": (
        ["evaluate", "--model", "dwgn", "--checkpoint", "dwgn.pt", "--data", "broken"],
        ["broken/manifest.json"],
    ),
    "missing-params-after-command": (["train", "--model", "dwgn", "--params", "x.yaml"], ["x.yaml: no such"]),
}


@pytest.mark.parametrize(("argv", "fragments"), CLI_ROWS.values(), ids=CLI_ROWS.keys())
def test_a_bad_argument_or_input_file_is_one_line(project, monkeypatch, capsys, argv, fragments):
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store is the project's own (there is none)
    refused(project, argv, capsys, f"weather-restore {argv[0]}: ", *fragments)


def test_a_setting_a_stage_judges_names_the_params_file_given(project, settings, monkeypatch, capsys):
    """A photograph this machine lacks is only known when assemble looks: the message still names --params."""
    monkeypatch.chdir(project)
    photographs = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["synthetic"]["photographs"]
    path = settings("data.synthetic.photographs", [*photographs[:-1], "no_such_photograph"])
    line = refused(project, ["--params", str(path), "assemble"], capsys, f"{path}: data.synthetic.photographs: ")
    assert "no_such_photograph" in line and "params.yaml" not in line


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["restore", "photo.png", "-o", "out.mp4", "--model", "dwgn.pt", "--crf", "100"], "argument --crf: 100"),
        (["train", "--model", "dwgn", "--params", SETTINGS], f"{SETTINGS}: 'training.dwgn.lr' = inf"),
    ],
    ids=["parser", "params"],
)
def test_the_installed_command_refuses_the_same_way(project, settings, argv, start):
    shutil.copy(settings("training.dwgn.lr", float("inf")), project / SETTINGS)
    before = listing(project)
    command = Path(sys.executable).with_name("weather-restore")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(command), *argv], cwd=project, capture_output=True, text=True, env=env)
    after = listing(project)
    (project / SETTINGS).unlink()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"weather-restore {argv[0]}: {start}"), result.stderr
    assert result.stdout == "" and after == before
