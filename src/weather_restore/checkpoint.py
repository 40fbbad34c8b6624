"""Training checkpoints: atomic save, weights-only load, resume of an unfinished training of the same config, and
the choice of the weights later stages use.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (so `torch.load(weights_only=True)`
reads it): the model's and optimiser's state, the scheduler's, the grad scaler's, the EMA of the weights when
training keeps one, the iteration (from which, with the config, the data sampler resumes), every random state,
the model's name and constructor arguments, and a hash of the config. Beside the last checkpoint
(`checkpoint.pt`) training keeps `best.pt`: the weights of its best validation PSNR (the EMA's when on), the
model's name and config, and the training's id. `training.<model>.use` says which of the two `evaluate`,
`export` and `register` use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weather_restore.errors import ModelFileError, WeatherRestoreError
from weather_restore.outputs import atomic_path

log = logging.getLogger(__name__)

FORMAT = 1
LAST_NAME, BEST_NAME = "checkpoint.pt", "best.pt"
WEIGHTS_FILES = {"last": LAST_NAME, "best": BEST_NAME}


def config_hash(config: Any) -> str:
    """A short, stable hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to a temporary sibling, flush it to disk, then rename it over `path`: a crash at any moment
    leaves either the previous checkpoint or the new one, never a partial file."""
    with atomic_path(Path(path), fsync=True) as temporary:
        torch.save({"format": FORMAT, **state}, temporary)


def _load_failure(error: Exception) -> str:
    """What torch.load said, without its advice to retry with weights_only=False (which would run the file)."""
    text = " ".join(str(error).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(". Please use")[0].split(" Check the documentation")[0]
        return f"weights-only loading refuses it: {text.strip().rstrip('.')}"
    return f"{type(error).__name__}: {text.split('. ')[0][:200]}"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such checkpoint (train the model first: weather-restore train)")
    return _read(path, str(path), map_location)


def load_checkpoint_bytes(data: bytes, source: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the bytes of a checkpoint file received from `source` (another process), weights-only like a file."""
    return _read(io.BytesIO(data), source, map_location)


def _read(file: Path | io.BytesIO, source: str, map_location: str | torch.device) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        raise ModelFileError(f"{source}: not a weather-restore checkpoint ({_load_failure(error)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{source}: not a weather-restore checkpoint of format {FORMAT}")
    return state


def resume_state(path: Path, expected_hash: str, unlogged: str | None = None) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None to start afresh.

    None when there is no checkpoint or it holds a finished training (the stage was asked to run again), unless
    that training is `unlogged` (its `training_id`: its end-of-training logging did not complete) and of the same
    config: then it is returned, for the logging to be finished. An unfinished training of the same config is
    returned; one of another config is refused, since resuming it would mix two configurations and starting over
    would silently throw its work away.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = load_checkpoint(path)
    done, total = state["iteration"], state["iterations"]
    if done >= total:
        if unlogged is not None and state.get("training_id") == unlogged and state["config_hash"] == expected_hash:
            log.info("%s holds a finished training whose logging did not complete: finishing it", path)
            return state
        log.info("%s holds a finished training (%d iterations): starting afresh", path, total)
        return None
    if state["config_hash"] != expected_hash:
        raise ModelFileError(
            f"{path}: holds an unfinished training (iteration {done} of {total}) of another configuration "
            f"(config hash {state['config_hash']}, this one {expected_hash}). Restore the params it was made "
            "with to resume it, or delete the file (or pass --restart) to start afresh."
        )
    log.info("resuming %s from iteration %d of %d", path, done, total)
    return state


def rng_state() -> dict[str, Any]:
    """Every global random state (torch CPU and CUDA, numpy, python) as weights-only-loadable values."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def load_model(path: Path, map_location: str | torch.device = "cpu", expected: str | None = None) -> nn.Module:
    """The trained model of a checkpoint, rebuilt from the name and constructor arguments stored in it; with
    `expected`, a checkpoint of another model is refused."""
    from weather_restore.models import build_model

    state = load_checkpoint(path, map_location)
    try:
        name, config = state["model_name"], dict(state["model_config"])
        # A training that keeps an EMA of its weights ships the average, not the raw weights it resumes from.
        weights = state["ema"]["weights"] if state.get("ema") else state["model"]
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(
            f"{path}: not a training checkpoint (it lacks the model's name, config or weights)"
        ) from None
    if expected is not None and name != expected:
        raise ModelFileError(
            f"{path}: holds a {_display(name)} model, not {_display(expected)} (use --model {name}, or a {expected} "
            "model file)"
        )
    retrain = f"the file is damaged or was edited: retrain it (weather-restore train --model {name} --restart)"
    try:
        model = build_model(name, **config)
    except (WeatherRestoreError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: its model {name} {config} cannot be built ({error}); {retrain}") from None
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError):
        raise ModelFileError(
            f"{path}: its weights do not fit a {_display(name)} model of its config ({_misfit(model, weights)}); "
            f"{retrain}"
        ) from None
    return model.to(map_location).eval()


def _display(name: object) -> str:
    """The paper's name of a model named in a checkpoint (which may name none the project knows)."""
    from weather_restore.models.facts import MODELS

    facts = MODELS.get(str(name).lower())
    return facts.display_name if facts else repr(name)


def _misfit(model: nn.Module, weights: Any) -> str:
    """How a state dict differs from a model's: counts of missing, unexpected and reshaped tensors, one named."""
    if not isinstance(weights, dict):
        return f"a {type(weights).__name__}, not a state dict"
    own = model.state_dict()
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    reshaped = [
        key for key in own if key in weights and tuple(own[key].shape) != tuple(getattr(weights[key], "shape", ()))
    ]
    parts = [
        f"{len(keys)} {what}"
        for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
        if keys
    ]
    if reshaped:
        key = reshaped[0]
        parts.append(f"e.g. {key} is {tuple(weights[key].shape)}, the model's {tuple(own[key].shape)}")
    elif missing or unexpected:
        parts.append(f"e.g. {(missing or unexpected)[0]}")
    return ", ".join(parts) or "tensors of another type"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file: which weights a measurement or an export was made of."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_weights(model_dir: Path, use: str) -> Path:
    """The file of the weights `training.<model>.use` names in a training's folder: `best.pt` or the last
    checkpoint. A `best.pt` left by another training than the checkpoint beside it (one that was restarted and has
    not validated yet) is refused rather than taken for this training's best."""
    model_dir = Path(model_dir)
    path = model_dir / WEIGHTS_FILES[use]
    if use == "best" and path.is_file() and (model_dir / LAST_NAME).is_file():
        best, last = load_checkpoint(path), load_checkpoint(model_dir / LAST_NAME)
        if best.get("training_id") != last.get("training_id"):
            raise ModelFileError(
                f"{path}: the best weights of another training than {model_dir / LAST_NAME} (it has not validated "
                f"yet); finish the training (weather-restore train --model {last.get('model_name', 'MODEL')}) or set "
                "use: last"
            )
    if not path.is_file():
        raise ModelFileError(
            f"{path}: no such file (training.<model>.use: {use}); train the model first (weather-restore train)"
        )
    return path
