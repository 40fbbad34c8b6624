"""Model cards: what a model is, what it was trained and tested on, how it did, what it is for, how to load it.

One renderer, two sources of facts. The pipeline's card (`reports/<model>/model_card.md`, stage `card`) reads the
files the stages wrote (metrics.json, export.json, the data manifest, run.json, params.yaml); a registered version's
card reads its MLflow run (the metrics and params evaluate, export and train logged there) and is attached to the
run (`model_card/model_card.md`, with the samples picture beside it) and to the version's description. Each
promotion decision about a version is appended to its card.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weather_restore.data.records import WEATHERS
from weather_restore.models.facts import model_facts

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CARD_NAME = "model_card.md"
CARD_FOLDER = "model_card"  # the artifact folder of a run: the card and the samples picture it shows
SAMPLES = "samples.png"
# MLflow's SQL store keeps at most 5000 characters of a version's description.
DESCRIPTION_LIMIT = 5000
# Per clip, the figures the card's table shows: (label, restored key, input key, digits, scale).
TABLE = (
    ("PSNR (dB)", "psnr", "input_psnr", 2, 1.0),
    ("SSIM", "ssim", "input_ssim", 4, 1.0),
    ("LPIPS", "lpips", "input_lpips", 4, 1.0),
    ("warping error (x1e3)", "warp_error", "input_warp_error", 3, 1e3),
    ("flicker error (x1e3)", "flicker_error", "input_flicker_error", 2, 1e3),
)
RECIPE = ("iterations", "batch_size", "crop", "clip_frames", "lr", "lr_min", "loss", "init", "ema_decay", "use", "seed")


@dataclass
class CardFacts:
    """Everything a card says, gathered from files (`from_files`) or from an MLflow run (`from_run`)."""

    model: str
    title: str
    metrics: dict[str, Any]  # metrics.json's shape: overall, per_weather, params, gflops, clips, manifest_checksum
    training: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # data_summary(), or only the manifest checksum
    export: dict[str, float] | None = None  # max_abs_diff, psnr_diff_db, onnxruntime_s, pytorch_s
    run_id: str | None = None
    git_commit: str | None = None
    config_hash: str | None = None
    samples: str | None = SAMPLES
    registered: str | None = None  # `models:/DwGN/3`


def data_summary(data_root: Path) -> dict[str, Any]:
    """What the clips of `data_root` (an MWVD tree) are: manifest checksum, clips per split and weather, frame size,
    clip length, source kinds, whether every clip is synthetic and how many clean source videos they come from."""
    from PIL import Image

    from weather_restore.data.clips import SPLITS, read_manifest

    checksum, clips = read_manifest(data_root)
    counts = {split: {w: sum(c.split == split and c.weather == w for c in clips) for w in WEATHERS} for split in SPLITS}
    first = clips[0]
    frame = next((Path(data_root) / first.split / "gt" / first.id).iterdir())
    with Image.open(frame) as image:
        width, height = image.size
    sources = sorted({c.source for c in clips})
    return {
        "manifest_checksum": checksum,
        "clips": counts,
        "clip_len": first.stop - first.start,
        "frame_size": [height, width],
        "sources": sources,
        "synthetic": sources == ["synthetic"],
        "source_videos": len({c.source_video for c in clips}),
    }


def _fmt(value: Any, digits: int, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def _result_table(metrics: dict[str, Any]) -> list[str]:
    rows = [("overall", metrics["overall"])] + [(w, metrics["per_weather"][w]) for w in metrics.get("per_weather", {})]
    lines = ["| weather | " + " | ".join(label for label, *_ in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for weather, row in rows:
        cells = [
            f"{_fmt(row.get(out), digits, scale)} (input {_fmt(row.get(inp), digits, scale)}"
            + (f", clean {_fmt(row.get('clean_warp_error'), digits, scale)})" if out == "warp_error" else ")")
            for _, out, inp, digits, scale in TABLE
        ]
        lines.append(f"| {weather} | " + " | ".join(cells) + " |")
    return lines


def render(facts: CardFacts) -> str:
    """The card as Markdown."""
    model = model_facts(facts.model)
    metrics, data, training = facts.metrics, facts.data, facts.training
    overall = metrics["overall"]
    lines = [f"# Model card: {facts.title}", "", f"{model.description}.", ""]

    lines += ["## Model", ""]
    lines.append(
        f"- Architecture: {model.display_name} ({'video' if model.video else 'image'} model, input "
        f"{model.shape_text}); reference implementation: {model.reference}."
    )
    if facts.architecture:
        lines.append(f"- Constructor arguments: `{json.dumps(facts.architecture, sort_keys=True)}`")
    gflops = metrics.get("gflops")
    flops_input = metrics.get("gflops_input", "10x128x128")
    lines.append(
        f"- Parameters: {'unknown' if metrics.get('params') is None else format(metrics['params'], ',')}; FLOPs: "
        + (f"{gflops:.1f} GFLOPs for {flops_input} (frames x height x width)" if gflops is not None else "not counted")
    )

    lines += ["", "## Training data", ""]
    checksum = data.get("manifest_checksum") or metrics.get("manifest_checksum", "unknown")
    lines.append(f"- Data manifest: `{checksum}`")
    if "clips" in data:
        counts = data["clips"]
        per_split = "; ".join(
            f"{split} {sum(counts[split].values())} (" + ", ".join(f"{w} {n}" for w, n in counts[split].items()) + ")"
            for split in counts
        )
        lines.append(
            f"- Clips of {data['clip_len']} frames of {data['frame_size'][1]}x{data['frame_size'][0]}: {per_split}"
        )
        lines.append(f"- Weathers: {', '.join(w for w in WEATHERS if any(counts[s].get(w) for s in counts))}")
        lines.append(
            f"- Sources: {', '.join(data['sources'])} ({data['source_videos']} clean source videos); "
            + ("synthetic weather (the built-in generator)" if data["synthetic"] else "not only the built-in generator")
        )
    else:
        lines.append("- The manifest's clips are not on this machine: only its checksum is known.")

    lines += ["", "## Training recipe", ""]
    recipe = ", ".join(f"{key} {training[key]}" for key in RECIPE if key in training)
    lines.append(f"- {recipe or 'unknown'}")
    if facts.config_hash:
        lines.append(f"- Config hash: `{facts.config_hash}`")
    if facts.run_id:
        lines.append(
            f"- MLflow run: `{facts.run_id}`" + (f" (git commit `{facts.git_commit}`)" if facts.git_commit else "")
        )

    lines += ["", f"## Test results ({metrics.get('clips') or 'the'} test clips)", ""]
    lines.append(
        "Restored against the ground truth, beside the degraded input (and, for the warping error, the clean clip: "
        "the flow's own residual). PSNR and SSIM: higher is better; LPIPS and the temporal errors: lower is better "
        "(see the README's *Reading the metrics*)."
    )
    lines.append("")
    lines += _result_table(metrics)
    if facts.samples:
        lines += ["", f"![input, output and ground truth per weather]({facts.samples})"]

    lines += ["", "## ONNX export", ""]
    if facts.export:
        e = facts.export
        lines.append(
            f"- Parity with PyTorch on a real test clip: max |difference| {e['max_abs_diff']:.2e}, PSNR difference "
            f"{e['psnr_diff_db']:.5f} dB"
        )
        lines.append(
            f"- Latency per test clip: ONNX Runtime {e['onnxruntime_s']:.3f} s, PyTorch {e['pytorch_s']:.3f} s"
        )
    else:
        lines.append("- Not exported yet.")

    lines += ["", "## Intended use and known limits", ""]
    gain = (
        None
        if overall.get("psnr") is None or overall.get("input_psnr") is None
        else overall["psnr"] - overall["input_psnr"]
    )
    if data.get("synthetic"):
        lines.append(
            f"- Trained for {training.get('iterations', '?')} iterations on synthetic weather over "
            f"{data['source_videos']} clean source videos made from photographs: a pipeline demonstration, not a "
            "restorer for real footage."
        )
    lines.append(
        f"- Removes rain, haze and snow from {'clips' if model.video else 'frames'} like its training data"
        + (f"; on the test split it changes PSNR by {gain:+.2f} dB overall." if gain is not None else ".")
    )
    lines.append(
        "- Not measured: real footage, night, other weathers, frames much larger than the training crops. "
        "For footage without ground truth, `weather-restore score INPUT OUTPUT` gives NIQE and flicker."
    )

    lines += ["", "## How to load it", ""]
    uri = facts.registered or f"models:/{model.registered_name}@champion"
    lines += [
        "```",
        f"weather-restore restore rainy.mp4 -o restored.mp4 --model {uri}",
        "```",
        f'The registered format is ONNX (`mlflow.onnx.load_model("{uri}")`, run by ONNX Runtime on '
        f"{model.shape_text} in [0, 1]); nothing is unpickled.",
    ]
    return "\n".join(lines) + "\n"


# --- the pipeline's card ---------------------------------------------------------------------------------------


def from_files(
    model: str, reports_dir: Path, data_root: Path, run_json: Path, training: dict, architecture: dict
) -> CardFacts:
    """The facts of the current model from the files the stages wrote."""
    from weather_restore.errors import DataError

    path = reports_dir / "metrics.json"
    if not path.is_file():
        raise DataError(f"{path}: no such file: evaluate the model first (weather-restore evaluate --model {model})")
    metrics = json.loads(path.read_text())
    export_path = reports_dir / "export.json"
    export = None
    if export_path.is_file():
        report = json.loads(export_path.read_text())
        export = {
            "max_abs_diff": report["max_abs_diff"],
            "psnr_diff_db": report["psnr_diff_db"],
            "onnxruntime_s": report["latency"]["onnxruntime_s"],
            "pytorch_s": report["latency"]["pytorch_s"],
        }
    run_id = None
    if run_json.is_file():
        run_id = json.loads(run_json.read_text()).get("run_id")
    return CardFacts(
        model=model,
        title=f"{model_facts(model).display_name} (the pipeline's current model)",
        metrics=metrics,
        training=training,
        architecture=architecture,
        data=data_summary(data_root),
        export=export,
        run_id=run_id,
        samples=SAMPLES if (reports_dir / SAMPLES).is_file() else None,
    )


def write_pipeline_card(facts: CardFacts, path: Path) -> Path:
    from weather_restore.outputs import atomic_write_text

    atomic_write_text(path, render(facts))
    return path


# --- a registered version's card -------------------------------------------------------------------------------


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def from_run(model: str, run: Run, name: str, version: str, data_root: Path | None) -> CardFacts:
    """The facts of a registered version from its run: the test metrics evaluate logged (`test_<key>[_<weather>]`),
    the recipe train logged, the parity figures export logged; the data summary when `data_root` holds the run's
    manifest."""
    from weather_restore.evaluate import METRIC_KEYS

    figures, params, tags = run.data.metrics, run.data.params, run.data.tags
    per_weather = {
        w: {key: figures.get(f"test_{key}_{w}") for key in METRIC_KEYS} for w in WEATHERS if f"test_psnr_{w}" in figures
    }
    metrics = {
        "overall": {key: figures.get(f"test_{key}") for key in METRIC_KEYS},
        "per_weather": per_weather,
        "params": int(figures["params_count"]) if "params_count" in figures else None,
        "gflops": figures.get("gflops"),
        "clips": None,
        "manifest_checksum": tags.get("test.manifest_checksum"),
    }
    checksum = params.get("data.manifest_checksum", tags.get("data.manifest_checksum"))
    data: dict[str, Any] = {"manifest_checksum": checksum}
    if data_root is not None and (Path(data_root) / "manifest.json").is_file():
        local = data_summary(Path(data_root))
        if local["manifest_checksum"] == checksum:
            data = local
            metrics["clips"] = sum(local["clips"]["test"].values())
    export = None
    if "onnx_max_abs_diff" in figures:
        export = {
            "max_abs_diff": figures["onnx_max_abs_diff"],
            "psnr_diff_db": figures.get("onnx_psnr_diff_db", float("nan")),
            "onnxruntime_s": figures.get("onnx_latency_s", float("nan")),
            "pytorch_s": figures.get("pytorch_latency_s", float("nan")),
        }
    architecture = json.loads(params["architecture"]) if "architecture" in params else {}
    return CardFacts(
        model=model,
        title=f"{name} version {version}",
        metrics=metrics,
        training={key: _number(params[key]) for key in RECIPE if key in params},
        architecture=architecture,
        data=data,
        export=export,
        run_id=run.info.run_id,
        git_commit=tags.get("mlflow.source.git.commit"),
        config_hash=params.get("config_hash"),
        registered=f"models:/{name}/{version}",
    )


def description(card: str, summary: str, run_id: str) -> str:
    """The version's description: the card, whole when it fits MLflow's limit, else its first sections and where
    the whole card is."""
    pointer = f"\n\n(The whole card: artifact `{CARD_FOLDER}/{CARD_NAME}` of MLflow run {run_id}.)"
    text = f"{summary}\n\n{card}"
    if len(text) <= DESCRIPTION_LIMIT:
        return text
    sections = text.split("\n## ")
    kept = sections[0]
    for section in sections[1:]:
        if len(kept) + len(section) + 4 + len(pointer) > DESCRIPTION_LIMIT:
            break
        kept += "\n## " + section
    return kept[: DESCRIPTION_LIMIT - len(pointer)] + pointer


def _log_card(client: MlflowClient, run_id: str, card: str, samples: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="weather-restore-card-") as folder:
        path = Path(folder) / CARD_NAME
        path.write_text(card)
        client.log_artifact(run_id, str(path), artifact_path=CARD_FOLDER)
        if samples is not None:
            client.log_artifact(run_id, str(samples), artifact_path=CARD_FOLDER)


def _download(client: MlflowClient, run_id: str, artifact: str, folder: str) -> Path | None:
    from mlflow.exceptions import MlflowException

    try:
        return Path(client.download_artifacts(run_id, artifact, folder))
    except (MlflowException, OSError):
        return None


def attach_card(
    client: MlflowClient, model: str, run: Run, version: ModelVersion, summary: str, data_root: Path | None
) -> str:
    """Write the version's card into its run (with the samples picture evaluate logged) and into its description."""
    with tempfile.TemporaryDirectory(prefix="weather-restore-card-") as folder:
        samples = _download(client, run.info.run_id, f"evaluation/{SAMPLES}", folder)
        facts = from_run(model, run, version.name, str(version.version), data_root)
        facts.samples = SAMPLES if samples is not None else None
        card = render(facts)
        _log_card(client, run.info.run_id, card, samples)
    client.update_model_version(version.name, version.version, description=description(card, summary, run.info.run_id))
    return card


def append_decision(client: MlflowClient, version: ModelVersion, entry: dict[str, Any], table: str | None) -> None:
    """Append a promotion decision (and the gate's comparison) to the card of `version`, in its run and in its
    description. A version registered before cards existed gets none: logged, not raised."""
    run_id = version.run_id
    with tempfile.TemporaryDirectory(prefix="weather-restore-card-") as folder:
        path = _download(client, run_id, f"{CARD_FOLDER}/{CARD_NAME}", folder) if run_id else None
        if path is None:
            log.warning("%s version %s has no model card to append the decision to", version.name, version.version)
            return
        lines = [
            "",
            f"## Promotion decision, {entry.get('time', '')}: {entry['decision']}",
            "",
            f"- By {entry.get('user', '?')}" + (f", reason: {entry['reason']}" if entry.get("reason") else ""),
        ]
        if entry.get("champion"):
            lines.append(f"- Against champion version {entry['champion']}: gate {entry.get('gate', '')}")
        else:
            lines.append(f"- {entry.get('gate', '')}")
        if table:
            lines += ["", "```", table, "```"]
        card = path.read_text() + "\n".join(lines) + "\n"
        _log_card(client, run_id, card, None)
    current = client.get_model_version(version.name, version.version).description or ""
    summary = current.split("\n\n# Model card", 1)[0]
    client.update_model_version(version.name, version.version, description=description(card, summary, run_id))
