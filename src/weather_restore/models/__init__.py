"""The models and the one door to build them by name; their facts (names, layout) are in `models.facts`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weather_restore.models.facts import MODEL_NAMES, model_facts

if TYPE_CHECKING:  # torch loads in seconds: the CLI reads the model facts without it
    from torch import nn

__all__ = ["MODEL_NAMES", "build_model"]


def build_model(name: str, **options: Any) -> nn.Module:
    """Build the model called `name` (case-insensitive) with its constructor options, e.g. dim=24."""
    # Imported here, each model only when asked for: a stage runs (and DVC tracks) its own model's file alone.
    if model_facts(name).name == "dynstaticnet":
        from weather_restore.models.dynstaticnet import DynStaticNet

        return DynStaticNet(**options)
    from weather_restore.models.dwgn import DwGN

    return DwGN(**options)
