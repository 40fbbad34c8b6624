"""Load any kind of model for restoration: a PyTorch checkpoint, an ONNX file written by `weather-restore export`,
or an MLflow registry URI of an ONNX model. Each becomes a `LoadedModel`: a forward from a float32 array in the
model's own layout to the restored array, and the facts of the model it holds.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from weather_restore.errors import ConfigError, ModelFileError
from weather_restore.models.facts import MODEL_NAMES, MODELS, PRECISIONS, by_rank, by_registered_name, model_facts
from weather_restore.windows import Forward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to restore: its name (which says the input layout), backend, forward and where it came from."""

    name: str
    backend: str  # "pytorch" or "onnxruntime"
    forward: Forward
    source: str
    precision: str = "float32"  # one of PRECISIONS

    @property
    def video(self) -> bool:
        return model_facts(self.name).video


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and CUDA present when asked for: said before any model file is read."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ConfigError(f"--device {device}: not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def load_restorer(
    model: str,
    checkpoint: Path | None = None,
    device: str = "cpu",
    tracking_uri: str | None = None,
    threads: int | None = None,
    precision: str = "float32",
) -> LoadedModel:
    """A model from what a user names: a `.pt` checkpoint, an `.onnx` file written by `weather-restore export`, a
    model name with a checkpoint or ONNX file (which must hold that model), or a registry URI
    `models:/DynStaticNet@champion` (an ONNX version, run by ONNX Runtime; other formats are refused unloaded).

    threads: ONNX Runtime's CPU threads (None: one per core); PyTorch's are process-wide (torch.set_num_threads).
    precision: "bfloat16" runs a checkpoint's convolutions and matmuls under bfloat16 autocast (float32 otherwise);
    ONNX graphs and registry versions run in float32 only.
    """
    check_device(device)
    check_precision(precision, checkpoint if checkpoint is not None else model, device)
    if model.startswith(("models:/", "runs:/")):
        if checkpoint is not None:
            raise ConfigError(f"{model} is a registry URI: it takes no --checkpoint")
        return load_registered(model, tracking_uri, None, device, threads)
    if Path(model).suffix.lower() in (".pt", ".pth", ".onnx"):
        if checkpoint is not None:
            raise ConfigError(f"give a model file ({model}) or a model name with --checkpoint, not both")
        return _load_file(Path(model), None, device, threads, precision)
    name = model.lower()
    if name not in MODEL_NAMES:
        raise ConfigError(
            f"unknown model '{model}': give a model name ({', '.join(MODEL_NAMES)}) with --checkpoint, "
            "a .pt or .onnx file, or a registry URI such as models:/DynStaticNet@champion"
        )
    if checkpoint is None:
        raise ConfigError(f"--model {model} needs --checkpoint PATH (a .pt checkpoint or an .onnx file)")
    return _load_file(Path(checkpoint), name, device, threads, precision)


def check_precision(precision: str, model: str | Path, device: str) -> None:
    """Refuse a precision the model file cannot run in, before anything loads; warn when bfloat16 would be slow."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return
    if str(model).startswith(("models:/", "runs:/")) or Path(model).suffix.lower() == ".onnx":
        raise ConfigError(
            f"--precision {precision} runs a PyTorch checkpoint under autocast, but {model} is an ONNX graph, which "
            "ONNX Runtime runs in float32: drop --precision, or give the model's .pt checkpoint"
        )
    if torch.device(device).type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning(
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): bfloat16 will likely run slower than float32"
        )


def _check_name(source: object, found: str, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise ModelFileError(
            f"{source}: holds a {model_facts(found).display_name} model, not {model_facts(expected).display_name} "
            f"(use --model {found}, or a {expected} model file)"
        )


def _load_file(
    path: Path, expected: str | None, device: str, threads: int | None, precision: str = "float32"
) -> LoadedModel:
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, expected, device, threads)
    return _load_checkpoint(path, expected, device, precision)


def _load_checkpoint(path: Path, expected: str | None, device: str, precision: str = "float32") -> LoadedModel:
    from weather_restore.checkpoint import load_model

    module = load_model(path, device, expected)  # the weights every stage ships (the EMA's when kept)
    name = next(facts.name for facts in MODELS.values() if facts.display_name == type(module).__name__)
    device_type = torch.device(device).type
    bfloat16 = precision == "bfloat16"

    @torch.inference_mode()
    def forward(x: np.ndarray) -> np.ndarray:
        # Autocast runs convolutions, matmuls and attention in bfloat16 (the features after them follow); both
        # models add their correction to the float32 input, so the restored frames are float32 sums.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bfloat16):
            restored = module(torch.from_numpy(x).to(device))
        return restored.float().cpu().numpy()

    return LoadedModel(name, "pytorch", forward, str(path), precision)


def _load_onnx(
    path: Path, expected: str | None, device: str, threads: int | None, source: str | None = None
) -> LoadedModel:
    """An ONNX file that `weather-restore export` wrote: it says which model it is (metadata `model_name`, and
    the `exporter`), and its input's rank agrees. `source` names it in messages (default: the path)."""
    import onnxruntime as ort

    from weather_restore.export import onnx_session, release_after_run

    source = source or str(path)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnx_session(path, threads, providers)  # the session `export` checked and timed the graph in
    except Exception as error:  # onnxruntime raises its own classes for protobuf, graph and type errors
        raise ModelFileError(f"{source}: not a loadable ONNX model ({error})") from None
    (first, *_) = session.get_inputs()
    facts = by_rank(len(first.shape))
    if facts is None:
        layouts = " nor ".join(f"{known.shape_text} ({known.display_name})" for known in MODELS.values())
        raise ModelFileError(f"{source}: takes a {len(first.shape)}-D input {first.shape}, neither {layouts}")
    metadata = session.get_modelmeta().custom_metadata_map
    declared = metadata.get("model_name", "").lower()
    if declared not in MODEL_NAMES or not metadata.get("exporter"):
        raise ModelFileError(
            f"{source}: not an ONNX model of weather-restore (no model_name and exporter in its metadata, which "
            "`weather-restore export` writes); export the checkpoint with `weather-restore export --model NAME`"
        )
    if declared != facts.name:
        raise ModelFileError(f"{source}: metadata says {declared}, but its input {first.shape} is {facts.name}'s")
    _check_name(source, facts.name, expected)

    run_options = release_after_run()

    def forward(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {first.name: x}, run_options)[0]
        except Exception as error:  # e.g. a graph exported with a size baked in, given another size
            raise ModelFileError(f"{source}: ONNX Runtime failed on an input of shape {x.shape} ({error})") from None

    return LoadedModel(facts.name, "onnxruntime", forward, source)


def _registered_model_of(uri: str) -> str | None:
    """The project's model that `models:/NAME@ALIAS` or `models:/NAME/VERSION` is registered as, from its NAME."""
    if not uri.startswith("models:/"):
        return None
    name = uri.removeprefix("models:/").strip("/").split("@")[0].split("/")[0]
    facts = by_registered_name(name)
    return facts.name if facts else None


def load_registered(
    uri: str, tracking_uri: str | None, expected: str | None = None, device: str = "cpu", threads: int | None = None
) -> LoadedModel:
    """models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/PATH of an ONNX model, run by ONNX Runtime like an
    .onnx file. Its MLmodel file is read first and anything but the onnx flavour is refused before any of it is
    loaded; a version registered as DynStaticNet or DwGN must hold that model, and `expected` too."""
    import mlflow

    from weather_restore.registry import fetch_onnx

    named = _registered_model_of(uri)
    if expected is not None and named is not None and named != expected:  # said before the store is opened
        want = model_facts(expected).registered_name
        raise ModelFileError(
            f"{uri}: names a {model_facts(named).registered_name} version, not {want}; use --model {named}, or a "
            f"URI of {want} (models:/{want}@champion)"
        )
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="weather-restore-") as folder:
        path, located = fetch_onnx(uri, tracking_uri, Path(folder), expected)
        # ONNX Runtime reads the whole graph when the session is made: the download can go afterwards.
        loaded = _load_onnx(path, expected or located.model, device, threads, source=located.label)
    if located.model is not None and loaded.name != located.model:
        raise ModelFileError(
            f"{located.label}: registered as {model_facts(located.model).registered_name} but holds a "
            f"{model_facts(loaded.name).display_name} model; register it under its own name"
        )
    return loaded


class OnnxModule(nn.Module):
    """A loaded ONNX model as a module, for code that takes one (evaluation): tensors in, tensors out on the
    input's device. It has no parameters PyTorch can see, and FLOP counters see none of its work."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.loaded = loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # shape-only passes (cost counting) learn the shape and nothing else
            return torch.empty_like(x)
        restored = self.loaded.forward(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return torch.from_numpy(restored).to(x.device)
