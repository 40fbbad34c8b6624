"""The `weather-restore` command as a person runs it: what each subcommand prints, writes and exits with."""

import json
import re

import pytest
import yaml

from weather_restore.cli import main
from weather_restore.config import Params


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder, the working directory, with a params.yaml that turns MLflow off and the slow
    evaluation extras (LPIPS, temporal errors) with it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WEATHER_RESTORE_PROGRESS", "0")
    params = {
        "tracking": {"enabled": False},
        "evaluation": {"lpips": False, "temporal": False, "flops_size": [32, 32]},
        "training": {"dwgn": {"iterations": 7}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_params_prints_the_validated_file_with_every_default_filled_in(project, capsys):
    assert main(["params"]) == 0
    printed = json.loads(capsys.readouterr().out)
    defaults = Params().model_dump(mode="json")
    assert printed["training"]["dwgn"]["iterations"] == 7
    assert printed["tracking"]["enabled"] is False
    assert printed["training"]["dwgn"]["lr"] == defaults["training"]["dwgn"]["lr"]
    assert printed["models"] == defaults["models"]
    assert set(printed) == set(defaults)


def test_evaluate_prints_the_scores_it_wrote(project, exportable_models, tiny_mwvd, capsys):
    import torch

    from weather_restore.checkpoint import save_checkpoint
    from weather_restore.models import build_model

    torch.manual_seed(0)
    config = exportable_models["dwgn"]
    checkpoint = project / "dwgn.pt"
    save_checkpoint(
        checkpoint, {"model": build_model("dwgn", **config).state_dict(), "model_name": "dwgn", "model_config": config}
    )
    args = ["evaluate", "--model", "dwgn", "--checkpoint", str(checkpoint), "--data", str(tiny_mwvd)]
    assert main([*args, "--out", "out"]) == 0

    said = capsys.readouterr().out
    metrics = json.loads((project / "out" / "metrics.json").read_text())
    overall = metrics["overall"]
    printed = re.search(r"test PSNR ([0-9.]+) dB \(input ([0-9.]+)\), SSIM ([0-9.]+) \(input ([0-9.]+)\)", said)
    assert printed, said
    assert printed.groups() == tuple(
        f"{overall[key]:.{digits}f}" for key, digits in (("psnr", 2), ("input_psnr", 2), ("ssim", 4), ("input_ssim", 4))
    )
    assert f"over {metrics['clips']} clips" in said and "out/metrics.json" in said
    assert "not logged to MLflow (tracking.enabled: false)" in said
    assert not (project / "mlflow.db").exists() and not (project / "reports").exists()


def test_compare_prints_the_table_it_writes(project, tiny_mwvd, capsys):
    from torch import nn

    from weather_restore.evaluate import evaluate_model

    class Negative(nn.Module):  # a "model" that loses to its input, by a different margin per weather
        def forward(self, x):
            return 1 - x

    for name in ("dynstaticnet", "dwgn"):
        evaluate_model(Negative(), name, tiny_mwvd, project / "reports" / name, use_lpips=False, temporal=False)

    assert main(["compare"]) == 0

    table = (project / "reports" / "compare.md").read_text()
    assert capsys.readouterr().out == table + "\n"
    for name in ("dynstaticnet", "dwgn"):
        metrics = json.loads((project / "reports" / name / "metrics.json").read_text())
        for weather, row in [("overall", metrics["overall"]), *metrics["per_weather"].items()]:
            gain = row["psnr"] - row["input_psnr"]
            assert gain < -0.1  # the negative loses: the column's sign is the model's PSNR over the input's
            cells = f"{row['psnr']:.2f} | {row['ssim']:.4f} | n/a | {row['input_psnr']:.2f} | {gain:+.2f} |"
            assert f"| {name} | {weather} | {cells}" in table
