"""The model registry against a real `mlflow server` on 127.0.0.1 (one for the module): registration, the promotion
gate, aliases, rollback, loading by alias, concurrent registrations and the CLI.

Two tiny models are really trained, evaluated, exported and logged; the gate's candidates are real runs holding the
export stage's ONNX graph of a real (untrained) model, their test metrics chosen. Each test works on registered
models of its own name, except the CLI's, which owns `DynStaticNet` and `DwGN`.
"""

import getpass
import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from weather_restore.checkpoint import load_model
from weather_restore.cli import main
from weather_restore.config import parse_params
from weather_restore.data.clips import read_manifest
from weather_restore.errors import PromotionRefused, RegistryError
from weather_restore.evaluate import evaluate_stage
from weather_restore.export import export_stage
from weather_restore.model_loading import load_restorer
from weather_restore.registry import compare, connect, promote, register, rollback
from weather_restore.tracking import RunInfo, read_run_info, write_run_info
from weather_restore.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MODELS = ("dynstaticnet", "dwgn")
TEST_SET = hashlib.sha256(b"test set a").hexdigest()
OTHER_TEST_SET = hashlib.sha256(b"test set b").hexdigest()
WEIGHTS, OTHER_WEIGHTS = hashlib.sha256(b"best.pt").hexdigest(), hashlib.sha256(b"checkpoint.pt").hexdigest()


@pytest.fixture(scope="module")
def server(mlflow_server):
    """The session's server as this module's MLFLOW_TRACKING_URI (what the CLI reads); MLflow's global URI reset."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        for name, value in (
            ("MLFLOW_TRACKING_URI", mlflow_server),
            ("MLFLOW_DISABLE_TELEMETRY", "true"),
            ("DO_NOT_TRACK", "true"),
            ("WEATHER_RESTORE_PROGRESS", "0"),
        ):
            patch.setenv(name, value)
        mlflow.set_tracking_uri(mlflow_server)
        yield mlflow_server
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def client(server):
    return connect(server)


def git_project(path: Path) -> str:
    """A git repository with one commit at `path`; returns the commit."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "README").write_text("test\n")
    for args in (
        ["init", "-q"],
        ["add", "README"],
        ["-c", "user.name=t", "-c", "user.email=t@x.invalid", "commit", "-qm", "x"],
    ):
        subprocess.run(["git", *args], cwd=path, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def write_params(project: Path) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump({"registry": {"min_delta": 0.05, "weather_tolerance": 0.2}}))


@dataclass(frozen=True)
class Trained:
    project: Path
    commit: str
    info: RunInfo


@pytest.fixture(scope="module")
def trained(server, tiny_mwvd, tiny_params_dict, exportable_models, tmp_path_factory) -> dict[str, Trained]:
    """Both tiny models trained a few iterations into the server, evaluated and exported, as the pipeline does."""
    project = tmp_path_factory.mktemp("trained") / "project"
    commit = git_project(project)
    write_params(project)
    (project / "data").mkdir()
    (project / "data" / "mwvd").symlink_to(tiny_mwvd)  # the project's default test set
    result = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model in MODELS:
            params = parse_params(
                {
                    **tiny_params_dict(model, tracking=True),
                    "models": exportable_models,
                    "evaluation": {"lpips": False, "flops_size": [32, 32], "temporal": False},
                    "export": {"latency_repeats": 1},
                }
            )
            out, reports = project / "models" / model, project / "reports" / model
            train(model, params, data_root=tiny_mwvd, out_dir=out, reports_dir=reports, project_root=project)
            # The stages as the CLI runs them, on the training's own weights (best.pt) and default test set.
            evaluate_stage(model, params, project)
            export_stage(model, params, project)
            result[model] = Trained(project, commit, read_run_info(out / "run.json"))
    finally:
        torch.set_num_threads(threads)
    return result


@pytest.fixture(scope="module")
def evaluated_run(server, exported_models):
    """evaluated_run(model, psnr, weathers, test_set, extra_metrics, exported) -> RunInfo: a real run holding the
    export stage's ONNX graph of a real (untrained) tiny model, its test metrics chosen; psnr None: a run not
    evaluated yet; exported False: no ONNX model in the run."""
    import mlflow

    # Not mlflow.set_experiment: it would leave an active experiment behind for later tests (a resumed run elsewhere).
    experiment = connect(server).create_experiment("registry-tests")

    def make(
        model: str,
        psnr: float | None,
        weathers: dict[str, float],
        test_set: str | None = TEST_SET,
        extra_metrics: dict[str, float] | None = None,
        exported: bool = True,
        weights: tuple[str, str] = (WEIGHTS, WEIGHTS),
    ) -> RunInfo:
        with mlflow.start_run(experiment_id=experiment) as run:
            if exported:  # what export.log_export leaves in the run (its figures are extra_metrics here)
                graph = onnx.load(str(exported_models[model]["onnx"]))
                logged = mlflow.onnx.log_model(graph, name="onnx", pip_requirements=[], save_as_external_data=False)
                mlflow.set_tag("onnx_model_uri", logged.model_uri)
            mlflow.log_params({"config_hash": hashlib.sha256(model.encode()).hexdigest()})
            mlflow.set_tags({"data.manifest_checksum": "d" * 64})
            if psnr is not None:
                metrics = {"test_psnr": psnr, "test_input_psnr": 20.0, "test_ssim": 0.8}
                metrics.update({f"test_psnr_{w}": value for w, value in weathers.items()})
                mlflow.log_metrics({**metrics, **(extra_metrics or {})})
            if test_set is not None:
                mlflow.set_tag("test.manifest_checksum", test_set)
            # What evaluate and export record of the weights file they read: the same one, unless told otherwise.
            mlflow.set_tags({"test.weights_sha256": weights[0], "export.weights_sha256": weights[1]})
        return RunInfo(model=model, run_id=run.info.run_id, experiment_id=experiment, tracking_uri=server)

    return make


ONNX = {"onnx_max_abs_diff": 2e-6, "onnx_psnr_diff_db": 0.001, "onnx_latency_s": 0.05, "pytorch_latency_s": 0.08}


@pytest.fixture(scope="module")
def runs(evaluated_run) -> dict[str, RunInfo]:
    """DwGN candidates for the gate, against `base` (25 dB everywhere): min_delta 0.05 dB, weather tolerance 0.2 dB."""
    return {
        "base": evaluated_run("dwgn", 25.0, {"haze": 25.0, "rain": 25.0, "snow": 25.0}),
        # +0.3 dB overall, rain down 0.1 dB (within tolerance); exported to ONNX
        "better": evaluated_run("dwgn", 25.3, {"haze": 25.6, "rain": 24.9, "snow": 25.4}, extra_metrics=ONNX),
        "marginal": evaluated_run("dwgn", 25.03, {"haze": 25.03, "rain": 25.03, "snow": 25.03}),
        "worse": evaluated_run("dwgn", 24.5, {"haze": 24.5, "rain": 24.5, "snow": 24.5}),
        "rain_regressed": evaluated_run("dwgn", 25.5, {"haze": 26.0, "rain": 24.7, "snow": 25.8}),
        "other_test_set": evaluated_run("dwgn", 26.0, {"haze": 26, "rain": 26, "snow": 26}, OTHER_TEST_SET),
        "unevaluated": evaluated_run("dwgn", None, {}, test_set=None),
        "unexported": evaluated_run("dwgn", 25.0, {"haze": 25.0, "rain": 25.0, "snow": 25.0}, exported=False),
        # Better figures, but measured on other weights than the ones exported (and so registered).
        "other_weights": evaluated_run(
            "dwgn", 26.0, {"haze": 26, "rain": 26, "snow": 26}, weights=(OTHER_WEIGHTS, WEIGHTS)
        ),
    }


def champion_of(name: str, client) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


# --- register ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_registering_an_evaluated_run_records_lineage_metrics_and_description(model, trained, client, tiny_mwvd):
    info = trained[model].info
    run = client.get_run(info.run_id)
    name = f"lineage-{model}"

    first = register(model, info, client, name=name)
    again = register(model, info, client, name=name)

    assert first.created and not again.created
    assert again.version == first.version == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    version = client.get_model_version(name, first.version)
    assert version.run_id == info.run_id and version.source == run.data.tags["onnx_model_uri"]
    tags = version.tags
    assert tags["git_commit"] == trained[model].commit
    assert tags["data.manifest_checksum"] == run.data.params["data.manifest_checksum"]
    assert tags["config_hash"] == run.data.params["config_hash"]
    assert tags["test.manifest_checksum"] == read_manifest(tiny_mwvd)[0]
    assert tags["model_format"] == "onnx"
    for key in ("test_psnr", "test_ssim", "test_input_psnr", "test_psnr_haze", "test_psnr_rain", "test_psnr_snow"):
        assert float(tags[key]) == run.data.metrics[key]
    assert {key: float(tags[key]) for key in ONNX} == {key: run.data.metrics[key] for key in ONNX}
    metrics = run.data.metrics
    assert f"Test PSNR {metrics['test_psnr']:.2f} dB against {metrics['test_input_psnr']:.2f} dB" in version.description
    assert trained[model].commit[:12] in version.description


def test_onnx_parity_figures_become_tags_when_the_export_logged_them(runs, client):
    version = client.get_model_version("onnx", register("dwgn", runs["better"], client, name="onnx").version)
    assert {key: float(version.tags[key]) for key in ONNX} == ONNX


def test_a_run_without_test_metrics_is_refused_registration(runs, client):
    with pytest.raises(RegistryError, match=r"no test metrics: run `weather-restore evaluate --model dwgn` first"):
        register("dwgn", runs["unevaluated"], client, name="unevaluated")


def test_a_run_that_was_not_exported_is_refused_registration(runs, client):
    run_id = runs["unexported"].run_id
    with pytest.raises(RegistryError) as refused:
        register("dwgn", runs["unexported"], client, name="unexported")
    assert str(refused.value) == (
        f"MLflow run {run_id} of dwgn has no ONNX model to register: run `weather-restore export --model dwgn` first"
    )
    assert not client.search_registered_models("name = 'unexported'")


def test_simultaneous_registrations_get_distinct_versions(runs, client, tmp_path):
    """Three processes at once on a model not yet registered: two runs, one of them twice."""
    records = []
    for key in ("base", "better", "base"):
        records.append(tmp_path / f"{len(records)}.json")
        write_run_info(records[-1], runs[key])
    script = (
        "import json, pathlib, sys, time\n"
        "from weather_restore.registry import connect, register\n"
        "from weather_restore.tracking import read_run_info\n"
        "record, uri, folder = sys.argv[1:]\n"
        "client = connect(uri)\n"
        "pathlib.Path(record + '.ready').touch()\n"
        "while len(list(pathlib.Path(folder).glob('*.ready'))) < 3:\n"
        "    time.sleep(0.01)\n"
        "result = register('dwgn', read_run_info(record), client, name='concurrent')\n"
        "print(json.dumps([result.version, result.created]))\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(record), client.tracking_uri, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for record in records
    ]
    outputs = [process.communicate(timeout=180) for process in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    (base, base_created), (better, _), (base_again, base_again_created) = [json.loads(out) for out, _ in outputs]

    assert base == base_again != better
    assert base_created != base_again_created  # one created it, the other found it
    versions = client.search_model_versions("name = 'concurrent'")
    assert sorted(str(v.version) for v in versions) == sorted([base, better])


# --- the gate ---------------------------------------------------------------------------------------------------


def registered(client, name: str, runs: dict[str, RunInfo], *keys: str) -> list[str]:
    return [register("dwgn", runs[key], client, name=name).version for key in keys]


def test_the_first_version_becomes_champion(runs, client):
    (base,) = registered(client, "first", runs, "base")
    result = promote("dwgn", client, name="first")
    assert (result.decision, result.version) == ("first", base)
    assert champion_of("first", client) == {"champion": base}
    assert client.get_model_version("first", base).tags["promotion.decision"] == "first"
    assert promote("dwgn", client, name="first").decision == "unchanged"


def test_a_better_version_is_promoted_and_the_champion_becomes_previous(runs, client):
    base, better = registered(client, "better", runs, "base", "better")
    promote("dwgn", client, base, name="better")

    result = promote("dwgn", client, name="better")  # the newest version

    assert (result.decision, result.version, result.replaced) == ("promoted", better, base)
    assert champion_of("better", client) == {"champion": better, "previous": base}
    tags = client.get_model_version("better", better).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion"] == base
    assert (tags["promotion.delta.overall"], tags["promotion.delta.rain"]) == ("+0.3000", "-0.1000")
    assert tags["promotion.time"] and tags["promotion.gate"] == "passed"
    assert [entry["decision"] for entry in json.loads(tags["history"])] == ["promoted"]
    assert "overall" in result.gate.table() and "+0.30" in result.gate.table()


def test_a_worse_version_is_refused_with_the_comparison_table(runs, client):
    base, worse = registered(client, "worse", runs, "base", "worse")
    promote("dwgn", client, base, name="worse")

    with pytest.raises(PromotionRefused) as refused:
        promote("dwgn", client, worse, name="worse")

    message = str(refused.value)
    assert f"refused to promote worse version {worse} over champion version {base}" in message
    assert "a gain of -0.50 dB, less than the 0.05 dB required (registry.min_delta)" in message
    assert "rain PSNR drops 0.50 dB, more than the 0.20 dB allowed" in message
    table = message.splitlines()[1:]
    assert table[0].split() == [
        "test",
        "PSNR",
        "(dB)",
        "candidate",
        f"v{worse}",
        "champion",
        f"v{base}",
        "delta",
        "needs",
    ]
    assert table[1].split() == ["overall", "24.50", "25.00", "-0.50", ">=", "+0.05", "FAIL"]
    assert table[3].split() == ["rain", "24.50", "25.00", "-0.50", ">=", "-0.20", "FAIL"]
    assert champion_of("worse", client) == {"champion": base}
    tags = client.get_model_version("worse", worse).tags
    assert (tags["promotion.decision"], tags["promotion.delta.overall"]) == ("refused", "-0.5000")
    assert "less than the 0.05 dB required" in tags["promotion.gate"]


def test_a_gain_below_min_delta_is_refused(runs, client):
    base, marginal = registered(client, "marginal", runs, "base", "marginal")
    promote("dwgn", client, base, name="marginal")
    with pytest.raises(PromotionRefused, match=r"a gain of \+0.03 dB, less than the 0.05 dB required"):
        promote("dwgn", client, marginal, name="marginal")
    # The same gain passes a gate that asks less.
    assert promote("dwgn", client, marginal, min_delta=0.02, name="marginal").decision == "promoted"


def test_a_version_measured_on_another_test_set_is_refused(runs, client):
    base, other = registered(client, "test-set", runs, "base", "other_test_set")
    promote("dwgn", client, base, name="test-set")
    with pytest.raises(PromotionRefused) as refused:
        promote("dwgn", client, other, name="test-set")
    message = str(refused.value)
    assert f"different test set: manifest {OTHER_TEST_SET[:12]}… vs {TEST_SET[:12]}…" in message
    assert "gain" not in message.splitlines()[0]  # PSNRs of different clips are not compared
    assert message.splitlines()[-1].split() == ["test", "manifest", OTHER_TEST_SET[:12], TEST_SET[:12], "same", "FAIL"]
    assert champion_of("test-set", client) == {"champion": base}


def test_a_version_whose_metrics_are_of_other_weights_than_its_model_is_refused(runs, client):
    base, other = registered(client, "evidence", runs, "base", "other_weights")
    assert client.get_model_version("evidence", other).tags["export.weights_sha256"] == WEIGHTS
    promote("dwgn", client, base, name="evidence")
    with pytest.raises(PromotionRefused) as refused:
        promote("dwgn", client, other, name="evidence")
    reasons = str(refused.value).splitlines()[0]
    assert (
        f"other weights: version {other}'s test metrics were measured on weights {OTHER_WEIGHTS[:12]}…, its model "
        f"was exported from {WEIGHTS[:12]}…" in reasons
    )
    assert "a gain of" not in reasons  # figures of other weights are not compared
    assert champion_of("evidence", client) == {"champion": base}
    # Nor does it become the first champion of a model of its own.
    registered(client, "evidence-first", runs, "other_weights")
    with pytest.raises(PromotionRefused, match=r"\(the first\): other weights"):
        promote("dwgn", client, name="evidence-first")
    assert champion_of("evidence-first", client) == {}


def test_evaluating_other_weights_or_data_leaves_the_training_run_unchanged(
    trained, client, exported_models, tiny_mwvd, tmp_path, monkeypatch, capsys
):
    project, run_id = trained["dwgn"].project, trained["dwgn"].info.run_id
    before = client.get_run(run_id).data
    assert before.tags["test.weights_sha256"] == before.tags["export.weights_sha256"]
    assert before.tags["weights.use"] == "best"
    other_data = tmp_path / "other-mwvd"
    shutil.copytree(tiny_mwvd, other_data)
    monkeypatch.chdir(project)
    other = exported_models["dwgn"]["pt"]
    best = project / "models" / "dwgn" / "best.pt"
    for args, weights, data in (
        (["--checkpoint", str(other)], other, tiny_mwvd),
        (["--data", str(other_data)], best, other_data),
    ):
        assert main(["evaluate", "--model", "dwgn", "--out", str(tmp_path / "reports"), *args]) == 0
        said = capsys.readouterr().out
        assert ", not the training's: it evaluated " in said
        new_run = client.get_run(said.split("logged into a new MLflow run ")[1].split(",")[0])
        assert new_run.data.tags["evaluated.weights"] == str(weights.resolve())
        assert new_run.data.tags["evaluated.sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert new_run.data.tags["evaluated.data"] == str(data.resolve())
        assert "test_psnr" in new_run.data.metrics and new_run.info.status == "FINISHED"
        after = client.get_run(run_id).data
        assert (after.metrics, after.tags) == (before.metrics, before.tags)


def test_a_weather_regression_beyond_tolerance_is_refused_despite_the_overall_gain(runs, client):
    base, regressed = registered(client, "weather", runs, "base", "rain_regressed")
    promote("dwgn", client, base, name="weather")
    with pytest.raises(PromotionRefused) as refused:
        promote("dwgn", client, regressed, name="weather")
    reasons = str(refused.value).splitlines()[0]
    assert "rain PSNR drops 0.30 dB, more than the 0.20 dB allowed (registry.weather_tolerance)" in reasons
    assert "gain" not in reasons and "haze" not in reasons
    assert promote("dwgn", client, regressed, weather_tolerance=0.5, name="weather").decision == "promoted"


def test_a_gain_of_exactly_min_delta_passes():
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    def version(number: str, psnr: float) -> ModelVersion:
        tags = [ModelVersionTag("test_psnr", repr(psnr)), ModelVersionTag("test.manifest_checksum", TEST_SET)]
        tags += [ModelVersionTag(tag, WEIGHTS) for tag in ("test.weights_sha256", "export.weights_sha256")]
        return ModelVersion("m", number, 0, tags=tags)

    assert compare(version("2", 25.35), version("1", 25.3), min_delta=0.05, weather_tolerance=0.2).passed
    assert not compare(version("2", 25.34), version("1", 25.3), min_delta=0.05, weather_tolerance=0.2).passed


def test_force_promotes_over_the_gate_and_records_who_and_why(runs, client):
    base, worse = registered(client, "force", runs, "base", "worse")
    promote("dwgn", client, base, name="force")
    with pytest.raises(RegistryError, match="needs a reason"):
        promote("dwgn", client, worse, force=True, name="force")

    result = promote("dwgn", client, worse, force=True, reason="hotfix for rain artefacts", name="force")

    assert (result.decision, result.replaced) == ("forced", base)
    assert champion_of("force", client) == {"champion": worse, "previous": base}
    tags = client.get_model_version("force", worse).tags
    assert tags["promotion.decision"] == "forced"
    assert tags["promotion.user"] == getpass.getuser()
    assert tags["promotion.reason"] == "hotfix for rain artefacts"
    assert "less than the 0.05 dB required" in tags["promotion.gate"]


def test_rollback_swaps_champion_and_previous(runs, client):
    base, better = registered(client, "rollback", runs, "base", "better")
    promote("dwgn", client, base, name="rollback")
    with pytest.raises(RegistryError, match="no previous version to roll back to"):
        rollback("dwgn", client, name="rollback")
    promote("dwgn", client, better, name="rollback")

    result = rollback("dwgn", client, name="rollback")

    assert (result.champion, result.previous) == (base, better)
    assert champion_of("rollback", client) == {"champion": base, "previous": better}
    restored, demoted = (client.get_model_version("rollback", v).tags for v in (base, better))
    assert (restored["rollback.decision"], restored["rollback.swapped_with"]) == ("restored", better)
    assert (demoted["rollback.decision"], demoted["rollback.user"]) == ("demoted", getpass.getuser())
    assert [e["decision"] for e in json.loads(demoted["history"])] == ["promoted", "demoted"]
    rollback("dwgn", client, name="rollback")  # and back again
    assert champion_of("rollback", client) == {"champion": better, "previous": base}


# --- the CLI and loading by alias -------------------------------------------------------------------------------


SHAPES = {"dynstaticnet": (2, 4, 3, 40, 72), "dwgn": (3, 3, 40, 72)}  # not the logged example's 16 x 16


@pytest.mark.parametrize("model", MODELS)
def test_the_cli_registers_promotes_refuses_and_rolls_back_and_the_champion_loads_by_alias(
    model, trained, evaluated_run, client, tmp_path, monkeypatch, capsys, tiny_mwvd
):
    import mlflow

    name = {"dynstaticnet": "DynStaticNet", "dwgn": "DwGN"}[model]
    project = trained[model].project
    monkeypatch.chdir(project)
    assert main(["register", "--model", model]) == 0
    assert main(["promote", "--model", model]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"registered {name} version 1 from MLflow run {trained[model].info.run_id}")
    assert out[1] == f"promoted {name} version 1 to champion (the first)"

    probe = torch.rand(*SHAPES[model], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_model(project / "models" / model / "best.pt")(probe).numpy()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    np.testing.assert_allclose(pyfunc.predict(probe.numpy())["restored"], expected, atol=1e-4)
    restorer = load_restorer(f"models:/{name}@champion", tracking_uri=client.tracking_uri)
    assert (restorer.name, restorer.backend) == (model, "onnxruntime")
    np.testing.assert_allclose(restorer.forward(probe.numpy()), expected, atol=1e-4)

    # A worse version of the same model, evaluated on the same test set, from another checkout.
    run = client.get_run(trained[model].info.run_id)
    weathers = {w: run.data.metrics[f"test_psnr_{w}"] - 1 for w in ("haze", "rain", "snow")}
    worse = evaluated_run(model, run.data.metrics["test_psnr"] - 1, weathers, run.data.tags["test.manifest_checksum"])
    other = tmp_path / "other"
    write_run_info(other / "models" / model / "run.json", worse)
    write_params(other)
    monkeypatch.chdir(other)
    assert main(["register", "--model", model]) == 0
    capsys.readouterr()

    assert main(["promote", "--model", model]) == 3  # refused by the gate; errors exit with 2
    err = capsys.readouterr().err
    assert err.startswith(f"weather-restore promote: refused to promote {name} version 2 over champion version 1: ")
    assert [line.split()[0] for line in err.splitlines()[2:]] == ["overall", "haze", "rain", "snow", "test"]
    with pytest.raises(SystemExit) as refused:  # the parser refuses --force without --reason
        main(["promote", "--model", model, "--force"])
    assert refused.value.code == 2
    assert "--force needs --reason" in capsys.readouterr().err
    assert main(["promote", "--model", model, "--force", "--reason", "testing the CLI"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"promoted {name} version 2 to champion by force, over the gate; version 1 is now previous"
    )
    assert main(["rollback", "--model", model]) == 0
    assert capsys.readouterr().out.strip() == (
        f"rolled {name} back: version 1 is champion again, version 2 is previous"
    )
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    np.testing.assert_allclose(pyfunc.predict(probe.numpy())["restored"], expected, atol=1e-4)

    # What the evaluate-champions flow runs: the champion from the registry scores what its checkpoint scored.
    out = tmp_path / "champion"
    uri = f"models:/{name}@champion"
    assert main(["evaluate", "--model", model, "--model-uri", uri, "--data", str(tiny_mwvd), "--out", str(out)]) == 0
    by_alias = json.loads((out / "metrics.json").read_text())["overall"]
    by_checkpoint = json.loads((project / "reports" / model / "metrics.json").read_text())["overall"]
    assert by_alias["psnr"] == pytest.approx(by_checkpoint["psnr"], abs=1e-4)
    assert by_alias["ssim"] == pytest.approx(by_checkpoint["ssim"], abs=1e-5)


# --- runs that line up in MLflow's comparison view ----------------------------------------------------------------


def test_both_models_runs_share_their_param_names_and_record_their_data(trained, client, tiny_mwvd, exportable_models):
    runs = {model: client.get_run(trained[model].info.run_id) for model in MODELS}
    checksum = read_manifest(tiny_mwvd)[0]

    assert set(runs["dynstaticnet"].data.params) == set(runs["dwgn"].data.params)
    shared = {"model", "lr", "batch_size", "crop", "iterations", "loss", "ema_decay", "architecture", "config_hash"}
    assert shared <= set(runs["dwgn"].data.params)
    assert not [key for key in runs["dwgn"].data.params if key.startswith(("training.", "models."))]
    for model, run in runs.items():
        params, metrics = run.data.params, run.data.metrics
        assert (params["model"], params["lr"], params["crop"], params["loss"]) == (
            model, "0.001", "16", {"dynstaticnet": "psnr", "dwgn": "l1"}[model]
        )  # fmt: skip
        assert json.loads(params["architecture"]).items() >= exportable_models[model].items()
        network = load_model(trained[model].project / "models" / model / "checkpoint.pt")
        assert metrics["params_count"] == sum(p.numel() for p in network.parameters())
        assert metrics["gflops"] > 0
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config/params.yaml")).read_text())
        assert config["training"][model]["lr"] == 0.001
        assert config["models"][model] == json.loads(params["architecture"])
        inputs = {
            (given.dataset.name, given.dataset.digest, tag.value)
            for given in run.inputs.dataset_inputs
            for tag in given.tags
            if tag.key == "mlflow.data.context"
        }
        assert inputs == {("mwvd/train", checksum[:36], "training"), ("mwvd/test", checksum[:36], "testing")}
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs
