"""Real `dvc repro` of the data stages in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from weather_restore.data.records import WEATHERS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def project_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what a clean clone of this change holds."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


def run(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "ITERATIVE_DO_NOT_TRACK": "1",
        "WEATHER_RESTORE_PROGRESS": "0",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository holding this project with tiny data parameters."""
    root = tmp_path / "repo"
    for name in project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["synthetic"].update(videos_per_weather=3, frames_per_video=20, frame_size=[32, 32])
    params["data"]["clips"].update(train_per_weather=2, test_per_weather=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.lock").unlink(missing_ok=True)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "test copy"], root)
    return root


def test_data_stages_run_then_second_repro_is_a_no_op(repo):
    run(["dvc", "repro", "split"], repo)
    manifest = json.loads((repo / "data/mwvd/manifest.json").read_text())
    for split, count in (("train", 2), ("test", 1)):
        for weather in WEATHERS:
            assert sum(c["split"] == split and c["weather"] == weather for c in manifest["clips"]) == count
    train = {c["source_video"] for c in manifest["clips"] if c["split"] == "train"}
    test = {c["source_video"] for c in manifest["clips"] if c["split"] == "test"}
    assert train and test and not train & test
    first = (repo / "data/mwvd/manifest.json").read_bytes()

    again = run(["dvc", "repro", "split"], repo)
    assert "didn't change, skipping" in again and "Running stage" not in again
    assert "up to date" in run(["dvc", "status"], repo).lower()
    assert (repo / "data/mwvd/manifest.json").read_bytes() == first


def test_changing_clip_params_reruns_only_split(repo):
    run(["dvc", "repro", "split"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["clips"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "split"], repo)
    assert "Running stage 'split'" in out
    assert "Running stage 'assemble'" not in out
