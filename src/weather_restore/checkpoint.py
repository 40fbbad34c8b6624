"""Training checkpoints: atomic save, weights-only load, resume of an unfinished training of the same config.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (so `torch.load(weights_only=True)`
reads it): the model's and optimiser's state, the scheduler's, the grad scaler's, the iteration, every random
state, the data sampler's position, the model's name and constructor arguments, and a hash of the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weather_restore.errors import ModelFileError

log = logging.getLogger(__name__)

FORMAT = 1


def config_hash(config: Any) -> str:
    """A short, stable hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to a temporary sibling, flush it to disk, then rename it over `path`: a crash at any moment
    leaves either the previous checkpoint or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        torch.save({"format": FORMAT, **state}, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such checkpoint (train the model first: weather-restore train)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        raise ModelFileError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a weather-restore checkpoint of format {FORMAT}")
    return state


def resume_state(path: Path, expected_hash: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None to start afresh.

    None when there is no checkpoint or it holds a finished training (the stage was asked to run again). An
    unfinished training of the same config is returned; one of another config is refused, since resuming it
    would mix two configurations and starting over would silently throw its work away.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = load_checkpoint(path)
    done, total = state["iteration"], state["iterations"]
    if done >= total:
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
    if expected is not None and state["model_name"] != expected:
        raise ModelFileError(f"{path}: holds a {state['model_name']} model, not {expected}")
    model = build_model(state["model_name"], **state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(map_location).eval()
