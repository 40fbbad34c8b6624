"""Real `dvc repro` of the pipeline in a temporary copy of the repository (fixtures in conftest.py)."""

import json

import pytest
import yaml

from weather_restore.data.records import WEATHERS

pytestmark = pytest.mark.slow


def test_data_stages_run_then_second_repro_is_a_no_op(tiny_repo, run):
    run(["dvc", "repro", "split"], tiny_repo)
    manifest = json.loads((tiny_repo / "data/mwvd/manifest.json").read_text())
    for split, count in (("train", 2), ("test", 1)):
        for weather in WEATHERS:
            assert sum(c["split"] == split and c["weather"] == weather for c in manifest["clips"]) == count
    train = {c["source_video"] for c in manifest["clips"] if c["split"] == "train"}
    test = {c["source_video"] for c in manifest["clips"] if c["split"] == "test"}
    assert train and test and not train & test
    first = (tiny_repo / "data/mwvd/manifest.json").read_bytes()

    again = run(["dvc", "repro", "split"], tiny_repo)
    assert "didn't change, skipping" in again and "Running stage" not in again
    assert "up to date" in run(["dvc", "status", "split"], tiny_repo).lower()
    assert (tiny_repo / "data/mwvd/manifest.json").read_bytes() == first


def test_changing_clip_params_reruns_only_split(tiny_repo, run):
    run(["dvc", "repro", "split"], tiny_repo)
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["data"]["clips"]["seed"] = 7
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "split"], tiny_repo)
    assert "Running stage 'split'" in out
    assert "Running stage 'assemble'" not in out


def test_whole_pipeline_trains_evaluates_and_exports_both_models_then_is_a_no_op(tiny_repo, run):
    out = run(["dvc", "repro"], tiny_repo)
    for model in ("dynstaticnet", "dwgn"):
        for stage in ("train", "evaluate", "export"):
            assert f"Running stage '{stage}@{model}'" in out
        export = json.loads((tiny_repo / "reports" / model / "export.json").read_text())
        assert export["max_abs_diff"] <= 1e-4 and (tiny_repo / "models" / model / "model.onnx").is_file()
        metrics = json.loads((tiny_repo / "reports" / model / "metrics.json").read_text())
        assert set(metrics["per_weather"]) == set(WEATHERS)
        assert metrics["overall"]["lpips"] is None and metrics["params"] > 0
        assert (tiny_repo / "reports" / model / "samples.png").is_file()
        run_id = json.loads((tiny_repo / "models" / model / "run.json").read_text())["run_id"]
        assert run_id
    assert "| dynstaticnet | overall |" in (tiny_repo / "reports" / "compare.md").read_text()

    again = run(["dvc", "repro"], tiny_repo)
    assert "Running stage" not in again

    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["training"]["dwgn"]["iterations"] += 1
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro"], tiny_repo)
    for stage in ("train", "evaluate", "export"):
        assert f"Running stage '{stage}@dwgn'" in changed
        assert f"Running stage '{stage}@dynstaticnet'" not in changed
