"""The one table of model facts: what every layer (CLI, training, evaluation, export, registry, restoration) needs to
know about a model without building it. Imports no torch: the CLI reads it at start-up.

A model `name` lives in `models/<name>.py` as the class `display_name` (what the paper calls it), which is also the
name its versions are registered under in the MLflow registry. A third model is one more row of `MODELS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from weather_restore.errors import ConfigError

CHANNELS = "channels"  # the one axis of a layout that is not dynamic: RGB
_SHORT = {"batch": "B", "frames": "T", CHANNELS: "3", "height": "H", "width": "W"}


@dataclass(frozen=True)
class ModelFacts:
    """One model: its key (params.yaml, CLI, folders), its paper name and its input layout."""

    name: str
    display_name: str
    layout: tuple[str, ...]  # the input's axes, the output's too: ONNX rank, dynamic axes and shapes follow
    summary: str  # what it is, in a few words
    reference: str  # the published implementation the model follows (shared/spec/models.md)

    @property
    def registered_name(self) -> str:
        """The MLflow registered model: named as the paper names the model."""
        return self.display_name

    @property
    def video(self) -> bool:
        """Takes clips [B, T, 3, H, W] (a video model), not frames [B, 3, H, W] each restored on its own."""
        return "frames" in self.layout

    @property
    def rank(self) -> int:
        return len(self.layout)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Every axis but the channels, by position: the ONNX graph's dynamic dimensions."""
        return {axis: name for axis, name in enumerate(self.layout) if name != CHANNELS}

    @property
    def dynamic_shape(self) -> tuple[int, ...]:
        """`(-1, -1, 3, -1, -1)`: the shape with -1 for every dynamic axis (an MLflow tensor signature)."""
        return tuple(-1 if axis in self.dynamic_axes else 3 for axis in range(self.rank))

    @property
    def shape_text(self) -> str:
        """`[B, T, 3, H, W]`."""
        return "[" + ", ".join(_SHORT[axis] for axis in self.layout) + "]"

    @property
    def description(self) -> str:
        """One line for people (the registry's model description)."""
        kind = "clips" if self.video else "frames"
        return f"{self.display_name}: {self.summary}; takes {kind} {self.shape_text}"

    def input_shape(self, clips: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        """The input holding `clips` clips of `frames` frames: (B, T, 3, H, W), or for an image model all their
        frames as one batch (B*T, 3, H, W)."""
        sizes = {"batch": clips, "frames": frames, CHANNELS: 3, "height": height, "width": width}
        if not self.video:
            sizes["batch"] = clips * frames
        return tuple(sizes[axis] for axis in self.layout)


MODELS: dict[str, ModelFacts] = {
    facts.name: facts
    for facts in (
        ModelFacts(
            "dynstaticnet",
            "DynStaticNet",
            ("batch", "frames", CHANNELS, "height", "width"),
            "video network removing rain, haze and snow",
            "GitHub zqx1216155858/DynstaticNet",
        ),
        ModelFacts(
            "dwgn",
            "DwGN",
            ("batch", CHANNELS, "height", "width"),
            "image network removing rain, haze and snow, run frame by frame",
            "GitHub Jeasco/DwGN (WAformer)",
        ),
    )
}
MODEL_NAMES = tuple(MODELS)
# What a PyTorch checkpoint can restore in: float32, or its convolutions and matmuls under bfloat16 autocast.
# ONNX graphs run in float32.
PRECISIONS = ("float32", "bfloat16")


def model_facts(name: str) -> ModelFacts:
    """The facts of the model called `name` (case-insensitive: `DwGN` or `dwgn`)."""
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model '{name}': the models are {', '.join(MODEL_NAMES)}") from None


def by_registered_name(registered: str) -> ModelFacts | None:
    """The model whose versions the registry keeps under `registered`, if any."""
    return next((facts for facts in MODELS.values() if facts.registered_name == registered), None)


def by_rank(rank: int) -> ModelFacts | None:
    """The model whose input has `rank` axes (an ONNX graph's input says which model it is)."""
    return next((facts for facts in MODELS.values() if facts.rank == rank), None)
