"""Stages `register`, `promote` and `rollback`: MLflow model registry versions behind a promotion gate.

The ONNX model that `export` logged into a training's run becomes a version of `DynStaticNet` or `DwGN`, tagged
with where it came from (git commit, data manifest, config hash) and how it did (test metrics overall and per
weather, ONNX parity figures). ONNX is the one registered format because it loads without running any code (a
protobuf graph run by ONNX Runtime); every path that loads or promotes a version first reads its MLmodel file and
refuses any other flavour (a pickled or cloudpickled model would run whatever it holds on load).
The alias `champion` names the version to serve (`models:/DwGN@champion`). `promote` moves it only when the
candidate's test PSNR beats the champion's by `registry.min_delta` dB on the same test set and no weather loses more
than `registry.weather_tolerance` dB; the version it leaves gets `previous`, and `rollback` swaps the two. Every
decision is written into the version's tags: `promotion.*` for the latest, `history` (JSON) for all of them.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from weather_restore.data.records import WEATHERS
from weather_restore.errors import PromotionRefused, RegistryError
from weather_restore.models.facts import MODELS, by_registered_name
from weather_restore.temporal import gate_reasons
from weather_restore.tracking import (
    EXPORTED_WEIGHTS_TAG,
    TELEMETRY_OFF,
    TEST_SET_TAG,
    TESTED_WEIGHTS_TAG,
    WEIGHTS_USE_TAG,
    RunInfo,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
HISTORY_TAG = "history"
# Written into the training's run by the export stage; copied into the version when present.
ONNX_METRICS = ("onnx_max_abs_diff", "onnx_psnr_diff_db", "onnx_latency_s", "pytorch_latency_s")
# Run tags copied into the version, under the version tag's name.
RUN_TAGS = {
    "git_commit": "mlflow.source.git.commit",
    "git_dirty": "git_dirty",
    "data.manifest_checksum": "data.manifest_checksum",
    TEST_SET_TAG: TEST_SET_TAG,
    TESTED_WEIGHTS_TAG: TESTED_WEIGHTS_TAG,
    EXPORTED_WEIGHTS_TAG: EXPORTED_WEIGHTS_TAG,
    WEIGHTS_USE_TAG: WEIGHTS_USE_TAG,
}
# Set on the training's run by `export.log_export`: the URI of the ONNX model it logged, what `register` registers.
ONNX_MODEL_TAG = "onnx_model_uri"
MODEL_FORMAT = "onnx"
# Float noise must not turn a gain of exactly min_delta into a refusal.
EPSILON = 1e-9
# `<name>.aliases-lock`: the registered model whose existence says a promote or rollback of <name> is running.
LOCK_SUFFIX = ".aliases-lock"
LOCK_WAIT_S = 60.0  # a promotion holds it for a second or two; longer means its process died holding it


def require_store(tracking_uri: str) -> None:
    """Refuse a local store that does not exist: MLflow would create an empty one in its place, silently."""
    path = None
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    elif tracking_uri.startswith("file:"):
        path = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
    if path is not None and not path.exists():
        raise RegistryError(
            f"no MLflow store at {tracking_uri} (the tracking URI used): run from the project folder, or set "
            "MLFLOW_TRACKING_URI to the store that holds the registry (sqlite:////path/to/mlflow.db or a server URL)"
        )


def connect(tracking_uri: str) -> MlflowClient:
    """A client of the existing store at `tracking_uri` (from `tracking.tracking_uri`), with telemetry off."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    require_store(tracking_uri)
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


def registered_name(model: str) -> str:
    """`dynstaticnet` -> `DynStaticNet`, `dwgn` -> `DwGN`."""
    if model not in MODELS:
        raise RegistryError(f"unknown model '{model}': one of {', '.join(MODELS)}")
    return MODELS[model].registered_name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _is(error: Exception, *codes: str) -> bool:
    return getattr(error, "error_code", None) in codes


# --- the safe format: ONNX only ---------------------------------------------------------------------------------


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def onnx_problem(mlmodel: Any) -> str | None:
    """Why a logged model's MLmodel file (parsed) is not an ONNX model that loads without running code; None if
    it is. Only `onnx` and its `python_function` (loader_module mlflow.onnx) may appear: any other flavour
    (pytorch, a cloudpickled python_model, sklearn...) unpickles or imports code on load, and so do `code` paths
    (put on sys.path), execution providers with options (which may name plugin libraries) and extra session
    config entries."""
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict) or not flavors:
        return "its MLmodel file names no flavour"
    if set(flavors) - {"onnx", "python_function"}:
        return f"its flavours are {', '.join(sorted(map(str, flavors)))}, not onnx"
    onnx, pyfunc = flavors.get("onnx"), flavors.get("python_function")
    if isinstance(pyfunc, dict) and pyfunc.get("loader_module") != "mlflow.onnx":
        return f"its python_function flavour loads through {pyfunc.get('loader_module')!r}, not mlflow.onnx"
    if not isinstance(onnx, dict) or not isinstance(pyfunc, dict):
        return "it has no onnx flavour with its python_function"
    if onnx.get("code") or pyfunc.get("code"):
        return "it ships Python code"
    if any(not isinstance(provider, str) for provider in onnx.get("providers") or []):
        return "its execution providers carry options"
    if (onnx.get("onnx_session_options") or {}).get("extra_session_config"):
        return "its session options carry extra config entries"
    data = onnx.get("data")
    if not isinstance(data, str) or PurePosixPath(data).name != data or data in ("", ".", ".."):
        return f"its onnx flavour names no plain model file (data: {data!r})"
    return None


def require_onnx(mlmodel: Any, label: str, model: str | None = None) -> str:
    """The ONNX file name of a safe logged model; anything else is refused with how to re-register it."""
    problem = onnx_problem(mlmodel)
    if problem is not None:
        which = model or "MODEL"
        raise RegistryError(
            f"{label}: not an ONNX model ({problem}); loading it could run code, so it is refused. Re-register it "
            f"from a run exported by `weather-restore export --model {which}` (`weather-restore register --model "
            f"{which}`)"
        )
    return mlmodel["flavors"]["onnx"]["data"]


def _download(artifact_uri: str, tracking_uri: str, folder: str) -> Path:
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file on stderr, else
    path = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=folder, tracking_uri=tracking_uri)
    return Path(path)


def read_mlmodel(storage_uri: str, tracking_uri: str, label: str) -> Any:
    """The parsed MLmodel file of the logged model stored at `storage_uri` (only that file is downloaded)."""
    import yaml
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="weather-restore-") as folder:
        try:
            path = _download(f"{storage_uri.rstrip('/')}/MLmodel", tracking_uri, folder)
            return yaml.safe_load(path.read_text())
        except (MlflowException, OSError, yaml.YAMLError) as error:
            raise RegistryError(f"{label}: cannot read its MLmodel file ({_first_line(error)})") from None


@dataclass(frozen=True)
class Located:
    """Where a model URI's files are: `storage` (a version's, pinned even when named by alias), a label for
    messages, and the project's model it is registered as (None when its registered name is not one of ours)."""

    storage: str
    label: str
    model: str | None


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version of registered model `name` that its `champion` alias names now; None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model, or no such alias
        return None


def locate(uri: str, client: MlflowClient) -> Located:
    """Resolve `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/m-ID` (a logged model) or `runs:/...`."""
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        return Located(uri, uri, None)
    rest = uri.removeprefix("models:/").strip("/")
    try:
        if "@" not in rest and "/" not in rest and rest.startswith("m-"):
            return Located(client.get_logged_model(rest).artifact_location, uri, None)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = str(client.get_model_version_by_alias(name, alias).version)
            label = f"{uri} (version {version})"
        else:
            name, _, version = rest.partition("/")
            label = uri
        facts = by_registered_name(name)
        model = facts.name if facts else None
        if not version.isdigit():  # a stage or `latest`: MLflow resolves it
            return Located(uri, label, model)
        return Located(client.get_model_version_download_uri(name, version), label, model)
    except MlflowException as error:
        raise RegistryError(f"{uri}: cannot load from {client.tracking_uri} ({_first_line(error)})") from None


def fetch_onnx(uri: str, tracking_uri: str, folder: Path, model: str | None = None) -> tuple[Path, Located]:
    """Download the ONNX file of a registry or run URI into `folder`, after its MLmodel file proved it an ONNX
    model; nothing else of a refused model is downloaded, and nothing of it is ever loaded."""
    from mlflow.exceptions import MlflowException

    located = locate(uri, connect(tracking_uri))
    mlmodel = read_mlmodel(located.storage, tracking_uri, located.label)
    data = require_onnx(mlmodel, located.label, model or located.model)
    try:
        return _download(f"{located.storage.rstrip('/')}/{data}", tracking_uri, str(folder)), located
    except (MlflowException, OSError) as error:
        raise RegistryError(f"{located.label}: cannot download its ONNX file ({_first_line(error)})") from None


def require_safe_version(client: MlflowClient, version: ModelVersion, model: str) -> None:
    """Refuse to promote (or roll back to) a version that is not an ONNX model."""
    label = f"{version.name} version {version.version}"
    storage = client.get_model_version_download_uri(version.name, str(version.version))
    require_onnx(read_mlmodel(storage, client.tracking_uri, label), label, model)


# --- register ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """A registered version; `created` is False when the run had been registered before."""

    name: str
    version: str
    run_id: str
    created: bool
    test_psnr: float
    test_input_psnr: float | None

    def summary(self) -> str:
        gain = f" (input {self.test_input_psnr:.2f} dB)" if self.test_input_psnr is not None else ""
        what = "registered" if self.created else "already registered:"
        return (
            f"{what} {self.name} version {self.version} from MLflow run {self.run_id}, "
            f"test PSNR {self.test_psnr:.2f} dB{gain}"
        )


def version_tags(model: str, run: Run) -> dict[str, str]:
    """What a version records of its run: its format, lineage, test metrics overall and per weather, ONNX parity."""
    tags = {"model": model, "model_format": MODEL_FORMAT}
    tags.update({key: run.data.tags[tag] for key, tag in RUN_TAGS.items() if tag in run.data.tags})
    if "config_hash" in run.data.params:
        tags["config_hash"] = run.data.params["config_hash"]
    tags.update(
        {
            key: repr(float(value))
            for key, value in sorted(run.data.metrics.items())
            if key.startswith("test_") or key in ONNX_METRICS
        }
    )
    return tags


def describe(model: str, run: Run) -> str:
    """The version's description: what it is, what it was trained on, how it does on the test set."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    commit = tags.get("mlflow.source.git.commit")
    code = f"git commit {commit[:12]}" if commit else "an unknown commit"
    if tags.get("git_dirty") == "True":
        code += " (with uncommitted changes)"
    data = params.get("data.manifest_checksum", tags.get("data.manifest_checksum", "unknown"))
    text = (
        f"{MODELS[model].description}. From MLflow run {run.info.run_id}: trained at {code} on the clips of data "
        f"manifest {data[:12]} (config hash {params.get('config_hash', 'unknown')[:12]}). "
        f"Test PSNR {metrics['test_psnr']:.2f} dB"
    )
    if "test_input_psnr" in metrics:
        gain = metrics["test_psnr"] - metrics["test_input_psnr"]
        text += f" against {metrics['test_input_psnr']:.2f} dB for the degraded input ({gain:+.2f} dB)"
    weathers = [f"{w} {metrics[f'test_psnr_{w}']:.2f}" for w in WEATHERS if f"test_psnr_{w}" in metrics]
    if weathers:
        text += f"; per weather: {', '.join(weathers)} dB"
    if TEST_SET_TAG in tags:
        text += f"; test manifest {tags[TEST_SET_TAG][:12]}"
    if WEIGHTS_USE_TAG in tags:
        text += f"; the {tags[WEIGHTS_USE_TAG]} weights of the training"
    return text + "."


def _versions_of(client: MlflowClient, name: str, run_id: str, source: str) -> list[ModelVersion]:
    """Versions of `name` made from the run's ONNX model `source`, oldest first."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted((v for v in found if v.source == source), key=lambda v: int(v.version))


def _ensure_registered_model(client: MlflowClient, name: str, model: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={"model": model},
            description=f"{MODELS[model].description}. Aliases: `{CHAMPION}` is the version that passed the promotion "
            f"gate (weather-restore promote), `{PREVIOUS}` the champion before it (weather-restore rollback).",
        )
        log.info("created registered model %s", name)
    except MlflowException as error:
        # Another process may have created it since our look-up: that is what we wanted.
        if not _is(error, "RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """List the version on the logged model, as `mlflow.register_model` does (the UI links them through it)."""
    from mlflow.exceptions import MlflowException

    key = "mlflow.modelVersions"
    try:
        linked = json.loads(client.get_logged_model(model_id).tags.get(key, "[]"))
        client.set_logged_model_tags(model_id, {key: json.dumps([*linked, {"name": name, "version": version}])})
    except MlflowException as error:
        log.warning("could not link logged model %s to %s version %s: %s", model_id, name, version, error)


def register(
    model: str, run_info: RunInfo, client: MlflowClient, name: str | None = None, data_root: Path | None = None
) -> Registration:
    """Register the ONNX model that `export` logged into the run in `run_info` (models/<model>/run.json) as a new
    version of `name` (default DynStaticNet or DwGN), with its lineage and test metrics as tags, and its model card
    (model_card.py; the training data described from `data_root` when it holds the run's manifest) attached to the
    run and to the version's description.

    The run must have been evaluated and exported. A run registered before gives back its version; two processes
    registering at once both succeed (the registered model's creation may race, version numbers are allocated by
    the store).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    name = name or registered_name(model)
    if run_info.model != model:
        raise RegistryError(f"the run record is of {run_info.model}, not {model}")
    if not run_info.run_id:
        raise RegistryError(f"{model} was trained with tracking disabled: there is no MLflow run to register")
    try:
        run = client.get_run(run_info.run_id)
    except MlflowException as error:
        if not _is(error, "RESOURCE_DOES_NOT_EXIST"):
            raise
        raise RegistryError(
            f"MLflow run {run_info.run_id} of {model} (tracked in {run_info.tracking_uri}) is not in "
            f"{client.tracking_uri}; set MLFLOW_TRACKING_URI to the store it was tracked in"
        ) from None
    if "test_psnr" not in run.data.metrics:
        raise RegistryError(
            f"MLflow run {run_info.run_id} of {model} has no test metrics: run `weather-restore evaluate --model "
            f"{model}` first"
        )
    source = run.data.tags.get(ONNX_MODEL_TAG)
    if not source:
        raise RegistryError(
            f"MLflow run {run_info.run_id} of {model} has no ONNX model to register: run `weather-restore export "
            f"--model {model}` first"
        )
    if TEST_SET_TAG not in run.data.tags:
        log.warning("run %s does not record its test set (%s): the gate will refuse it", run_info.run_id, TEST_SET_TAG)

    def result(version: ModelVersion, created: bool) -> Registration:
        metrics = run.data.metrics
        return Registration(
            name, str(version.version), run_info.run_id, created, metrics["test_psnr"], metrics.get("test_input_psnr")
        )

    if existing := _versions_of(client, name, run_info.run_id, source):
        return result(existing[0], created=False)
    located = locate(source, client)
    require_onnx(read_mlmodel(located.storage, client.tracking_uri, source), f"{source} (tag {ONNX_MODEL_TAG})", model)
    _ensure_registered_model(client, name, model)
    # A local SQLite store resolves a `models:/m-...` source through MLflow's global URI.
    mlflow.set_tracking_uri(client.tracking_uri)
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    version = client.create_model_version(
        name,
        source,
        run_id=run_info.run_id,
        tags=version_tags(model, run),
        description=describe(model, run),
        model_id=model_id,
    )
    # Two registrations of one run at once both pass the look-up above: the later version gives way.
    first = _versions_of(client, name, run_info.run_id, source)[0]
    if str(first.version) != str(version.version):
        client.delete_model_version(name, version.version)
        return result(first, created=False)
    if model_id:
        _link_logged_model(client, model_id, name, str(version.version))
    from weather_restore.model_card import attach_card

    attach_card(client, model, run, version, describe(model, run), data_root)
    log.info("registered %s version %s from run %s", name, version.version, run_info.run_id)
    return result(version, created=True)


# --- the promotion gate -----------------------------------------------------------------------------------------


def _figure(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a test PSNR of the candidate and of the champion, and the least delta allowed."""

    label: str
    candidate: float | None
    champion: float | None
    least: float

    @property
    def delta(self) -> float | None:
        return None if self.candidate is None or self.champion is None else self.candidate - self.champion

    @property
    def ok(self) -> bool:
        if self.champion is None:  # nothing to lose against
            return True
        return self.delta is not None and self.delta >= self.least - EPSILON


@dataclass(frozen=True)
class Gate:
    """The comparison of a candidate version with the champion, and why it fails (no reasons: it passes)."""

    candidate: str
    champion: str
    rows: tuple[Row, ...]
    test_sets: tuple[str | None, str | None]
    reasons: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def deltas(self) -> dict[str, str]:
        return {row.label: f"{row.delta:+.4f}" for row in self.rows if row.delta is not None}

    def table(self) -> str:
        """Overall and per weather: candidate, champion, delta and the least delta allowed; then the test sets."""

        def db(value: float | None, sign: str = "") -> str:
            return "n/a" if value is None else f"{value:{sign}.2f}"

        head = ("test PSNR (dB)", f"candidate v{self.candidate}", f"champion v{self.champion}", "delta", "needs", "")
        lines = [
            (row.label, db(row.candidate), db(row.champion), db(row.delta, "+"), f">= {row.least:+.2f}")
            + ("ok" if row.ok else "FAIL",)
            for row in self.rows
        ]
        same = self.test_sets[0] is not None and self.test_sets[0] == self.test_sets[1]
        manifests = tuple("unknown" if m is None else m[:12] for m in self.test_sets)
        lines.append(("test manifest", *manifests, "", "same", "ok" if same else "FAIL"))
        widths = [max(len(line[i]) for line in (head, *lines)) for i in range(5)]

        def fmt(cells: tuple[str, ...]) -> str:
            columns = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:5], widths[1:], strict=True)]
            return "  ".join([*columns, cells[5]]).rstrip()

        return "\n".join(fmt(line) for line in (head, *lines))


def evidence_problem(version: ModelVersion, required: bool) -> str | None:
    """Why a version's test metrics are not evidence about its registered model, or None: they must have been
    measured on the very weights file its ONNX model was exported from (`test.weights_sha256` equal to
    `export.weights_sha256`, both set by the stages on the training's own weights). With `required`, a version
    that does not record both is refused too."""
    tested, exported = version.tags.get(TESTED_WEIGHTS_TAG), version.tags.get(EXPORTED_WEIGHTS_TAG)
    if tested is None or exported is None:
        if not required:
            return None
        missing = " and ".join(
            tag for tag, value in ((TESTED_WEIGHTS_TAG, tested), (EXPORTED_WEIGHTS_TAG, exported)) if value is None
        )
        return (
            f"unknown weights: version {version.version} records no {missing} (evaluated or exported before it "
            "was recorded): evaluate and export the training again, then register it"
        )
    if tested != exported:
        return (
            f"other weights: version {version.version}'s test metrics were measured on weights {tested[:12]}…, its "
            f"model was exported from {exported[:12]}…: evaluate and export the same weights "
            "(training.<model>.use), then register again"
        )
    return None


def compare(
    candidate: ModelVersion,
    champion: ModelVersion,
    min_delta: float,
    weather_tolerance: float,
    temporal_tolerance: float | None = None,
) -> Gate:
    """The gate: the candidate's test PSNR beats the champion's by at least `min_delta` dB, measured on the same
    test set (the manifest checksum), and no weather's PSNR drops by more than `weather_tolerance` dB; with a
    `temporal_tolerance`, no weather's warping or flicker error may grow by more than that share (temporal.py)."""
    new, old = candidate.tags, champion.tags
    rows = [Row("overall", _figure(new, "test_psnr"), _figure(old, "test_psnr"), min_delta)]
    rows += [
        Row(w, _figure(new, f"test_psnr_{w}"), _figure(old, f"test_psnr_{w}"), -weather_tolerance)
        for w in WEATHERS
        if f"test_psnr_{w}" in new or f"test_psnr_{w}" in old
    ]
    test_sets = (new.get(TEST_SET_TAG), old.get(TEST_SET_TAG))
    reasons = [problem for v in (candidate, champion) if (problem := evidence_problem(v, required=True))]
    if None in test_sets:
        unknown = " and ".join(f"version {v.version}" for v in (candidate, champion) if TEST_SET_TAG not in v.tags)
        reasons.append(f"unknown test set: {unknown} records no {TEST_SET_TAG} (evaluated before it was recorded)")
    elif test_sets[0] != test_sets[1]:
        reasons.append(
            f"different test set: manifest {test_sets[0][:12]}… vs {test_sets[1][:12]}… (candidate vs champion); "
            "PSNRs on different clips do not compare"
        )
    if reasons:  # PSNRs of different test sets, or of other weights than those registered, say nothing
        return Gate(str(candidate.version), str(champion.version), tuple(rows), test_sets, tuple(reasons))
    overall, *weathers = rows
    if overall.candidate is None:
        reasons.append(f"version {candidate.version} has no test PSNR (test_psnr tag)")
    elif not overall.ok:
        reasons.append(
            f"a gain of {overall.delta:+.2f} dB, less than the {min_delta:.2f} dB required (registry.min_delta)"
        )
    for row in weathers:
        if row.ok:
            continue
        if row.candidate is None:
            reasons.append(f"{row.label}: the candidate has no test PSNR")
        else:
            reasons.append(
                f"{row.label} PSNR drops {-row.delta:.2f} dB, more than the {weather_tolerance:.2f} dB allowed "
                "(registry.weather_tolerance)"
            )
    figures = [{key: _figure(v.tags, key) for key in v.tags if key.startswith("test_")} for v in (candidate, champion)]
    reasons += gate_reasons(*figures, WEATHERS, temporal_tolerance)
    return Gate(str(candidate.version), str(champion.version), tuple(rows), test_sets, tuple(reasons))


# --- promote and roll back --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """What `promote` did: `decision` is `first` (no champion before), `promoted`, `forced` or `unchanged`."""

    name: str
    version: str
    decision: str
    replaced: str | None
    gate: Gate | None

    def summary(self) -> str:
        if self.decision == "unchanged":
            return f"{self.name} version {self.version} is already the {CHAMPION}"
        if self.decision == "first":
            return f"promoted {self.name} version {self.version} to {CHAMPION} (the first)"
        forced = " by force, over the gate" if self.decision == "forced" else ""
        return (
            f"promoted {self.name} version {self.version} to {CHAMPION}{forced}; version {self.replaced} is now "
            f"{PREVIOUS}"
        )


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """Alias -> version (a string, whatever the store returns)."""
    return {alias: str(number) for alias, number in _registered_model(client, name).aliases.items()}


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if _is(error, "RESOURCE_DOES_NOT_EXIST"):
            raise RegistryError(
                f"no registered model {name} in {client.tracking_uri}: register a version first "
                "(weather-restore register)"
            ) from None
        raise


def _version(client: MlflowClient, name: str, version: str | int | None) -> ModelVersion:
    """The given version of `name`, or its newest."""
    from mlflow.exceptions import MlflowException

    if version is None:
        newest = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
        if not newest:
            raise RegistryError(f"{name} has no versions: register one first (weather-restore register)")
        return newest[0]
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if _is(error, "RESOURCE_DOES_NOT_EXIST"):
            raise RegistryError(f"{name} has no version {version}") from None
        raise


def _record(
    client: MlflowClient, version: ModelVersion, prefix: str, entry: dict[str, Any], table: str | None = None
) -> None:
    """Write a decision into the version's tags: `<prefix>.<key>` for the latest, appended to `history`; a
    promotion decision (with the gate's `table`) is appended to the version's model card too."""
    entry = {"time": _now(), "user": getpass.getuser(), **entry}
    history = json.loads(version.tags.get(HISTORY_TAG, "[]"))
    client.set_model_version_tag(version.name, version.version, HISTORY_TAG, json.dumps([*history, entry]))
    # The latest decision as flat tags, to filter versions on (`tags.promotion.decision = 'forced'`).
    settings = ("deltas", "min_delta", "weather_tolerance", "temporal_tolerance")
    flat = {key: value for key, value in entry.items() if key not in settings}
    flat.update({f"delta.{label}": delta for label, delta in entry.get("deltas", {}).items()})
    for key, value in flat.items():
        client.set_model_version_tag(version.name, version.version, f"{prefix}.{key}", str(value))
    if prefix == "promotion":
        from weather_restore.model_card import append_decision

        append_decision(client, version, entry, table)


@contextlib.contextmanager
def aliases_locked(client: MlflowClient, name: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the right to move the aliases of `name` while the block reads and moves them.

    MLflow has no compare-and-set on an alias, but a registered model's name is unique in every store (a primary
    key, in a server's database too): the process that creates `<name>.aliases-lock` holds the lock, and deletes it
    when done. Two promotions (or a promotion and a rollback) racing from two processes or machines thus run one
    after the other, the second reading the aliases the first left.
    """
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": holder, "since": _now()}, description=f"{holder} is moving the aliases of {name}"
            )
            break
        except MlflowException as error:
            # Taken; or taken and released between the store's insert and its look-up of the existing model.
            if not _is(error, "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        if time.monotonic() > deadline:
            tags = _lock_tags(client, lock)
            raise RegistryError(
                f"the aliases of {name} are locked by {tags.get('holder', '?')} since {tags.get('since', '?')} "
                f"(registered model {lock}): another promote or rollback is running; if its process died, delete "
                f"that registered model and try again"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _lock_tags(client: MlflowClient, lock: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException:
        return {}


def promote(
    model: str,
    client: MlflowClient,
    version: str | int | None = None,
    *,
    min_delta: float = 0.05,
    weather_tolerance: float = 0.2,
    temporal_tolerance: float | None = None,
    force: bool = False,
    reason: str | None = None,
    name: str | None = None,
) -> Promotion:
    """Move the alias `champion` of `name` (default DynStaticNet or DwGN) to `version` (default the newest) when it
    passes the gate (`compare`); the version losing `champion` gets `previous`. A refusal raises `PromotionRefused`
    with the comparison table. `force` promotes anyway and records the user and `reason` (required). A version
    that is not an ONNX model is refused before anything is written.
    """
    name = name or registered_name(model)
    if force and not (reason and reason.strip()):
        raise RegistryError("forcing a promotion needs a reason (--reason TEXT): it is recorded with your user name")
    with aliases_locked(client, name):
        aliases = _aliases(client, name)
        candidate = _version(client, name, version)
        require_safe_version(client, candidate, model)
        new, old = str(candidate.version), aliases.get(CHAMPION)
        if old == new:
            return Promotion(name, new, "unchanged", None, None)
        if old is None and (problem := evidence_problem(candidate, required=False)) and not force:
            _record(client, candidate, "promotion", {"decision": "refused", "gate": problem, "reason": ""})
            raise PromotionRefused(f"refused to promote {name} version {new} to {CHAMPION} (the first): {problem}")
        if old is None:
            _record(
                client, candidate, "promotion", {"decision": "first", "gate": "no champion yet", "reason": reason or ""}
            )
            client.set_registered_model_alias(name, CHAMPION, new)
            log.info("%s version %s is the first %s", name, new, CHAMPION)
            return Promotion(name, new, "first", None, None)

        gate = compare(candidate, client.get_model_version(name, old), min_delta, weather_tolerance, temporal_tolerance)
        decision = "promoted" if gate.passed else "forced" if force else "refused"
        entry = {
            "decision": decision,
            "champion": old,
            "gate": "passed" if gate.passed else "; ".join(gate.reasons),
            "deltas": gate.deltas(),
            "min_delta": min_delta,
            "weather_tolerance": weather_tolerance,
            "temporal_tolerance": temporal_tolerance,
            "reason": reason or "",
        }
        _record(client, candidate, "promotion", entry, gate.table())
        if decision == "refused":
            raise PromotionRefused(
                f"refused to promote {name} version {new} over {CHAMPION} version {old}: {'; '.join(gate.reasons)}\n"
                + gate.table()
            )
        # `previous` first: a crash in between leaves the old champion under both aliases, never under neither.
        client.set_registered_model_alias(name, PREVIOUS, old)
        client.set_registered_model_alias(name, CHAMPION, new)
        log.info("%s version %s is %s (%s); version %s is %s", name, new, CHAMPION, decision, old, PREVIOUS)
        return Promotion(name, new, decision, old, gate)


@dataclass(frozen=True)
class Rollback:
    name: str
    champion: str
    previous: str

    def summary(self) -> str:
        return (
            f"rolled {self.name} back: version {self.champion} is {CHAMPION} again, "
            f"version {self.previous} is {PREVIOUS}"
        )


def rollback(model: str, client: MlflowClient, name: str | None = None) -> Rollback:
    """Swap the aliases `champion` and `previous` of `name` (default DynStaticNet or DwGN); recorded in both. A
    `previous` that is not an ONNX model is refused: it would become the champion."""
    name = name or registered_name(model)
    with aliases_locked(client, name):
        aliases = _aliases(client, name)
        if PREVIOUS not in aliases or CHAMPION not in aliases:
            raise RegistryError(f"{name} has no {PREVIOUS} version to roll back to (aliases: {aliases or 'none'})")
        restored, demoted = aliases[PREVIOUS], aliases[CHAMPION]
        require_safe_version(client, client.get_model_version(name, restored), model)
        client.set_registered_model_alias(name, CHAMPION, restored)
        client.set_registered_model_alias(name, PREVIOUS, demoted)
        _record(
            client,
            client.get_model_version(name, restored),
            "rollback",
            {"decision": "restored", "swapped_with": demoted},
        )
        _record(
            client,
            client.get_model_version(name, demoted),
            "rollback",
            {"decision": "demoted", "swapped_with": restored},
        )
        log.info("rolled %s back to version %s (version %s is %s)", name, restored, demoted, PREVIOUS)
        return Rollback(name, restored, demoted)
