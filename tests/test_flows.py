"""The Prefect flows over a real DVC pipeline, under Prefect's test harness (a real temporary server)."""

import os

import pytest
import yaml

from pipelines.flows import StageFailed, weather_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_server(tmp_path_factory):
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_pipeline_flow_runs_every_stage_then_skips_them(tiny_repo):
    first = weather_pipeline(models=["dynstaticnet", "dwgn"], repo=str(tiny_repo))
    ran = {stage for result in first["stages"] for stage in result["ran"]}
    assert {"assemble", "split", "train@dynstaticnet", "train@dwgn", "evaluate@dwgn", "compare"} <= ran
    assert (tiny_repo / "reports" / "compare.md").is_file()

    second = weather_pipeline(models=["dynstaticnet", "dwgn"], repo=str(tiny_repo))
    assert all(not result["ran"] for result in second["stages"])
    assert {stage for result in second["stages"] for stage in result["skipped"]} >= {"train@dwgn", "compare"}


def test_params_overrides_are_validated_and_recorded(tiny_repo):
    with pytest.raises(Exception, match="training.dwgn.iterations"):
        weather_pipeline(models=["dwgn"], params={"training.dwgn.iterations": -1}, repo=str(tiny_repo))
    weather_pipeline(models=["dwgn"], params={"training.dwgn.iterations": 3}, repo=str(tiny_repo))
    assert yaml.safe_load((tiny_repo / "params.yaml").read_text())["training"]["dwgn"]["iterations"] == 3
    assert "iterations: 3" in (tiny_repo / "dvc.lock").read_text()


def test_a_failing_stage_fails_the_flow_with_its_message(tiny_repo):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["data"]["synthetic"]["photographs"] = ["no_such_photo"]
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = weather_pipeline(models=["dwgn"], repo=str(tiny_repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="no_such_photo.*not available"):
        state.result()
