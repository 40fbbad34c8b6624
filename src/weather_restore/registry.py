"""Stages `register`, `promote` and `rollback`: MLflow model registry versions behind a promotion gate.

A training run's logged model becomes a version of `DynStaticNet` or `DwGN`, tagged with where it came from (git
commit, data manifest, config hash) and how it did (test metrics overall and per weather, ONNX parity figures).
The alias `champion` names the version to serve (`models:/DwGN@champion`). `promote` moves it only when the
candidate's test PSNR beats the champion's by `registry.min_delta` dB on the same test set and no weather loses more
than `registry.weather_tolerance` dB; the version it leaves gets `previous`, and `rollback` swaps the two. Every
decision is written into the version's tags: `promotion.*` for the latest, `history` (JSON) for all of them.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from weather_restore.data.records import WEATHERS
from weather_restore.errors import PromotionRefused, RegistryError
from weather_restore.tracking import TELEMETRY_OFF, RunInfo

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

log = logging.getLogger(__name__)

REGISTERED_NAMES = {"dynstaticnet": "DynStaticNet", "dwgn": "DwGN"}
CHAMPION = "champion"
PREVIOUS = "previous"
TEST_SET_TAG = "test.manifest_checksum"
HISTORY_TAG = "history"
# Written into the training's run by the export stage; copied into the version when present.
ONNX_METRICS = ("onnx_max_abs_diff", "onnx_psnr_diff_db", "onnx_latency_s", "pytorch_latency_s")
# Run tags copied into the version, under the version tag's name.
RUN_TAGS = {
    "git_commit": "mlflow.source.git.commit",
    "git_dirty": "git_dirty",
    "data.manifest_checksum": "data.manifest_checksum",
    TEST_SET_TAG: TEST_SET_TAG,
    "model_format": "model_format",
}
DESCRIPTIONS = {
    "dynstaticnet": "DynStaticNet: video network removing rain, haze and snow; takes clips [B, T, 3, H, W]",
    "dwgn": "DwGN: image network removing rain, haze and snow, run frame by frame; takes frames [B, 3, H, W]",
}
# Float noise must not turn a gain of exactly min_delta into a refusal.
EPSILON = 1e-9


def connect(tracking_uri: str) -> MlflowClient:
    """A client of the store at `tracking_uri` (from `tracking.tracking_uri`), with telemetry off."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


def registered_name(model: str) -> str:
    """`dynstaticnet` -> `DynStaticNet`, `dwgn` -> `DwGN`."""
    try:
        return REGISTERED_NAMES[model]
    except KeyError:
        raise RegistryError(f"unknown model '{model}': one of {', '.join(REGISTERED_NAMES)}") from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _is(error: Exception, *codes: str) -> bool:
    return getattr(error, "error_code", None) in codes


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
    """What a version records of its run: lineage, test metrics overall and per weather, ONNX parity."""
    tags = {"model": model}
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
        f"{DESCRIPTIONS[model]}. From MLflow run {run.info.run_id}: trained at {code} on the clips of data manifest "
        f"{data[:12]} (config hash {params.get('config_hash', 'unknown')[:12]}). "
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
    return text + "."


def _versions_of(client: MlflowClient, name: str, run_info: RunInfo) -> list[ModelVersion]:
    """Versions of `name` holding the run's logged model, oldest first."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_info.run_id}'")
    return sorted((v for v in found if v.source == run_info.model_uri), key=lambda v: int(v.version))


def _ensure_registered_model(client: MlflowClient, name: str, model: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={"model": model},
            description=f"{DESCRIPTIONS[model]}. Aliases: `{CHAMPION}` is the version that passed the promotion "
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


def register(model: str, run_info: RunInfo, client: MlflowClient, name: str | None = None) -> Registration:
    """Register the logged model of the run in `run_info` (models/<model>/run.json) as a new version of `name`
    (default DynStaticNet or DwGN), with its lineage and test metrics as tags and a description.

    The run must have been evaluated. A run registered before gives back its version; two processes registering at
    once both succeed (the registered model's creation may race, version numbers are allocated by the store).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    name = name or registered_name(model)
    if run_info.model != model:
        raise RegistryError(f"the run record is of {run_info.model}, not {model}")
    if not run_info.run_id or not run_info.model_uri:
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
    if TEST_SET_TAG not in run.data.tags:
        log.warning("run %s does not record its test set (%s): the gate will refuse it", run_info.run_id, TEST_SET_TAG)

    def result(version: ModelVersion, created: bool) -> Registration:
        metrics = run.data.metrics
        return Registration(
            name, str(version.version), run_info.run_id, created, metrics["test_psnr"], metrics.get("test_input_psnr")
        )

    if existing := _versions_of(client, name, run_info):
        return result(existing[0], created=False)
    _ensure_registered_model(client, name, model)
    # A local SQLite store resolves a `models:/m-...` source through MLflow's global URI.
    mlflow.set_tracking_uri(client.tracking_uri)
    model_id = run_info.model_uri.removeprefix("models:/") if run_info.model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name,
        run_info.model_uri,
        run_id=run_info.run_id,
        tags=version_tags(model, run),
        description=describe(model, run),
        model_id=model_id,
    )
    # Two registrations of one run at once both pass the look-up above: the later version gives way.
    first = _versions_of(client, name, run_info)[0]
    if str(first.version) != str(version.version):
        client.delete_model_version(name, version.version)
        return result(first, created=False)
    if model_id:
        _link_logged_model(client, model_id, name, str(version.version))
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


def compare(candidate: ModelVersion, champion: ModelVersion, min_delta: float, weather_tolerance: float) -> Gate:
    """The gate: the candidate's test PSNR beats the champion's by at least `min_delta` dB, measured on the same
    test set (the manifest checksum), and no weather's PSNR drops by more than `weather_tolerance` dB."""
    new, old = candidate.tags, champion.tags
    rows = [Row("overall", _figure(new, "test_psnr"), _figure(old, "test_psnr"), min_delta)]
    rows += [
        Row(w, _figure(new, f"test_psnr_{w}"), _figure(old, f"test_psnr_{w}"), -weather_tolerance)
        for w in WEATHERS
        if f"test_psnr_{w}" in new or f"test_psnr_{w}" in old
    ]
    test_sets = (new.get(TEST_SET_TAG), old.get(TEST_SET_TAG))
    reasons = []
    if None in test_sets:
        unknown = " and ".join(f"version {v.version}" for v in (candidate, champion) if TEST_SET_TAG not in v.tags)
        reasons.append(f"unknown test set: {unknown} records no {TEST_SET_TAG} (evaluated before it was recorded)")
    elif test_sets[0] != test_sets[1]:
        reasons.append(
            f"different test set: manifest {test_sets[0][:12]}… vs {test_sets[1][:12]}… (candidate vs champion); "
            "PSNRs on different clips do not compare"
        )
    if reasons:  # PSNRs of different test sets say nothing about each other
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


def _record(client: MlflowClient, version: ModelVersion, prefix: str, entry: dict[str, Any]) -> None:
    """Write a decision into the version's tags: `<prefix>.<key>` for the latest, appended to `history`."""
    entry = {"time": _now(), "user": getpass.getuser(), **entry}
    history = json.loads(version.tags.get(HISTORY_TAG, "[]"))
    client.set_model_version_tag(version.name, version.version, HISTORY_TAG, json.dumps([*history, entry]))
    # The latest decision as flat tags, to filter versions on (`tags.promotion.decision = 'forced'`).
    flat = {key: value for key, value in entry.items() if key not in ("deltas", "min_delta", "weather_tolerance")}
    flat.update({f"delta.{label}": delta for label, delta in entry.get("deltas", {}).items()})
    for key, value in flat.items():
        client.set_model_version_tag(version.name, version.version, f"{prefix}.{key}", str(value))


def promote(
    model: str,
    client: MlflowClient,
    version: str | int | None = None,
    *,
    min_delta: float = 0.05,
    weather_tolerance: float = 0.2,
    force: bool = False,
    reason: str | None = None,
    name: str | None = None,
) -> Promotion:
    """Move the alias `champion` of `name` (default DynStaticNet or DwGN) to `version` (default the newest) when it
    passes the gate (`compare`); the version losing `champion` gets `previous`. A refusal raises `PromotionRefused`
    with the comparison table. `force` promotes anyway and records the user and `reason` (required).
    """
    name = name or registered_name(model)
    if force and not (reason and reason.strip()):
        raise RegistryError("forcing a promotion needs a reason (--reason TEXT): it is recorded with your user name")
    aliases = _aliases(client, name)
    candidate = _version(client, name, version)
    new, old = str(candidate.version), aliases.get(CHAMPION)
    if old == new:
        return Promotion(name, new, "unchanged", None, None)
    if old is None:
        _record(
            client, candidate, "promotion", {"decision": "first", "gate": "no champion yet", "reason": reason or ""}
        )
        client.set_registered_model_alias(name, CHAMPION, new)
        log.info("%s version %s is the first %s", name, new, CHAMPION)
        return Promotion(name, new, "first", None, None)

    gate = compare(candidate, client.get_model_version(name, old), min_delta, weather_tolerance)
    decision = "promoted" if gate.passed else "forced" if force else "refused"
    entry = {
        "decision": decision,
        "champion": old,
        "gate": "passed" if gate.passed else "; ".join(gate.reasons),
        "deltas": gate.deltas(),
        "min_delta": min_delta,
        "weather_tolerance": weather_tolerance,
        "reason": reason or "",
    }
    _record(client, candidate, "promotion", entry)
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
    """Swap the aliases `champion` and `previous` of `name` (default DynStaticNet or DwGN); recorded in both."""
    name = name or registered_name(model)
    aliases = _aliases(client, name)
    if PREVIOUS not in aliases or CHAMPION not in aliases:
        raise RegistryError(f"{name} has no {PREVIOUS} version to roll back to (aliases: {aliases or 'none'})")
    restored, demoted = aliases[PREVIOUS], aliases[CHAMPION]
    client.set_registered_model_alias(name, CHAMPION, restored)
    client.set_registered_model_alias(name, PREVIOUS, demoted)
    _record(
        client, client.get_model_version(name, restored), "rollback", {"decision": "restored", "swapped_with": demoted}
    )
    _record(
        client, client.get_model_version(name, demoted), "rollback", {"decision": "demoted", "swapped_with": restored}
    )
    log.info("rolled %s back to version %s (version %s is %s)", name, restored, demoted, PREVIOUS)
    return Rollback(name, restored, demoted)
