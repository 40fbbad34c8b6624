"""A project's own MLflow store as the tests read it: `<project>/mlflow.db`, the store `train` creates there.

Import as `from tests.stores import ...` (pyproject.toml puts the repository's root on the tests' sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path


def client(project: Path):
    """An MLflow client of `<project>/mlflow.db`."""
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def all_runs(project: Path) -> list:
    """Every run in the project's store, deleted experiments and runs included."""
    from mlflow.entities import ViewType

    store = client(project)
    experiments = [e.experiment_id for e in store.search_experiments(view_type=ViewType.ALL)]
    return store.search_runs(experiments, run_view_type=ViewType.ALL)


def own_store_environment() -> dict[str, str]:
    """This process's environment for a CLI subprocess that tracks into its project's own `mlflow.db` (no
    MLFLOW_TRACKING_URI of the caller's), one thread, no progress bars, telemetry off."""
    env = {
        **os.environ,
        "WEATHER_RESTORE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
