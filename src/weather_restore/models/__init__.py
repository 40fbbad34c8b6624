"""The models and the one door to build them by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weather_restore.errors import ConfigError

if TYPE_CHECKING:  # torch loads in seconds: the CLI reads MODEL_NAMES without it
    from torch import nn

MODEL_NAMES = ("dynstaticnet", "dwgn")


def _check(name: str) -> str:
    key = name.lower()
    if key not in MODEL_NAMES:
        raise ConfigError(f"unknown model '{name}': the models are {', '.join(MODEL_NAMES)}")
    return key


def build_model(name: str, **options: Any) -> nn.Module:
    """Build the model called `name` (case-insensitive) with its constructor options, e.g. dim=24."""
    if _check(name) == "dynstaticnet":
        from weather_restore.models.dynstaticnet import DynStaticNet

        return DynStaticNet(**options)
    from weather_restore.models.dwgn import DwGN

    return DwGN(**options)


def model_input_shape(name: str, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    """The input layout of a model: clips (B, T, 3, H, W) for DynStaticNet, frames (B*T, 3, H, W) for DwGN,
    which restores each frame on its own.
    """
    if _check(name) == "dynstaticnet":
        return (batch, frames, 3, height, width)
    return (batch * frames, 3, height, width)
