"""The models and the one door to build them by name; their facts (names, layout) are in `models.facts`."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from weather_restore.models.facts import MODEL_NAMES, model_facts

if TYPE_CHECKING:  # torch loads in seconds: the CLI reads the model facts without it
    from torch import nn

__all__ = ["MODEL_NAMES", "build_model"]


def build_model(name: str, **options: Any) -> nn.Module:
    """Build the model called `name` (case-insensitive) with its constructor options, e.g. dim=24."""
    facts = model_facts(name)
    return getattr(import_module(f"{__name__}.{facts.name}"), facts.display_name)(**options)
