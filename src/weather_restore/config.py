"""params.yaml -> typed, validated config objects. The only module that reads params.yaml.

Every section is a pydantic model that forbids unknown keys, so a typo stops the run with a message naming the
key, the value and what is allowed, instead of silently falling back to a default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from weather_restore.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_a_flag(value: Any) -> Any:
    # pydantic would read `true` as 1 in a number field: a flag where a number belongs is a slip, not a 1.
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "a number is required, not true/false")
    return value


Int = Annotated[int, Strict()]
"""An integer written as one: `true`, `1.0` and `"1"` are refused rather than read as 1."""

Float = Annotated[float, BeforeValidator(_not_a_flag), Field(allow_inf_nan=False)]
"""A finite number. An integer is fine, and so is `1e-4`, which PyYAML (YAML 1.1) reads as a string."""

Count = Annotated[Int, Field(ge=1)]
Blocks = Annotated[Int, Field(ge=0)]
Beta = Annotated[Float, Field(ge=0, lt=1)]


def _ordered(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    if pair[0] > pair[1]:
        raise ValueError(f"low {pair[0]} is above high {pair[1]}: write [low, high]")
    return pair


Range = Annotated[tuple[Float, Float], AfterValidator(_ordered)]
"""A closed interval `[low, high]` from which a parameter is drawn once per video."""

CountRange = Annotated[tuple[Count, Count], AfterValidator(_ordered)]
"""A closed interval `[low, high]` of whole numbers, at least 1, drawn once per video."""


def _rule(field: str | tuple[str, ...], detail: str) -> PydanticCustomError:
    """A rule between the fields of a section, reported against `field` (a path into a subsection as a tuple;
    the message names the others)."""
    return PydanticCustomError("section_rule", "{detail}", {"field": field, "detail": detail})


# --- data: the built-in generator -------------------------------------------------------------------------


class HazeConfig(Section):
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), d the depth normalised to [0, 1].

    The defaults are HazeWorld's densities (beta 0.005-0.03 per metre, A 0.75-0.94) over a 50 m far plane."""

    beta: Range = (0.25, 1.5)
    airlight: Range = (0.75, 0.94)
    tint: Float = Field(0.03, ge=0, le=0.2, description="max per-channel deviation of A from grey")
    drift: Float = Field(0.1, ge=0, le=0.5, description="max relative drift of beta in space and time")


class RainConfig(Section):
    """Moving streak layers over an accumulation veil: I = clip(J + w S) t + A (1 - t).

    Lengths and speeds are in pixels of a frame whose shorter side is `reference_size`, and scale with the
    frame, so rain looks alike at 128 and at 512 pixels. Layers farther away have shorter, thinner, fainter
    and slower streaks; veil_beta [0, 0] gives streaks only (t = 1).
    """

    streak_length: Range = (20.0, 60.0)
    angle: Float = Field(10.0, ge=0, le=45, description="max |angle| from vertical, degrees, per video")
    angle_jitter: Float = Field(2.0, ge=0, le=10, description="per-frame jitter of the angle, degrees")
    layers: CountRange = (2, 3)
    density: Range = Field((0.002, 0.006), description="drops per pixel, all layers together")
    intensity: Range = Field((0.25, 0.6), description="peak brightness w S of the nearest streaks")
    fall_speed: Range = Field((0.25, 0.45), description="advection per frame, in streak lengths")
    veil_beta: Range = (0.0, 1.5)
    airlight: Range = (0.25, 0.95)
    reference_size: Int = Field(128, ge=16, description="frame side (px) at which lengths are given")


class SnowConfig(Section):
    """A persistent particle system over a light veil: I = (J t + A (1 - t)) (1 - z) + K z.

    K is raised to the background where that is brighter, so flakes never darken a white sky. Radii, speeds
    and wind are in pixels (per frame) of a frame whose shorter side is `reference_size`, and scale with the
    frame. The nearest layer has the largest, fastest flakes; the farthest has radius[0].
    """

    density: Range = Field((20.0, 120.0), description="flakes per 10,000 px, all layers together")
    layers: CountRange = (2, 3)
    radius: Range = (1.0, 6.0)
    speed: Range = (2.0, 10.0)
    wind: Range = (-3.0, 3.0)
    brightness: Range = (0.85, 1.0)
    veil_beta: Range = (0.25, 1.0)
    airlight: Range = (0.75, 0.95)
    reference_size: Int = Field(128, ge=16, description="frame side (px) at which sizes and speeds are given")


class SyntheticConfig(Section):
    """Clean videos from photographs shipped by installed packages, with physically modelled weather."""

    seed: Int = Field(0, ge=0)
    videos_per_weather: Int = Field(8, ge=1)
    frames_per_video: Int = Field(30, ge=1)
    frame_size: tuple[Annotated[Int, Field(ge=16)], Annotated[Int, Field(ge=16)]] = Field(
        (128, 128), description="height, width of the rendered frames, each at least 16"
    )
    photographs: list[str] = Field(default_factory=list, description="skimage photograph names; [] = all")
    haze: HazeConfig = HazeConfig()
    rain: RainConfig = RainConfig()
    snow: SnowConfig = SnowConfig()


# --- data: importers ----------------------------------------------------------------------------------------


class SourceConfig(Section):
    """One dataset to import. `kind` picks the importer; `root` is the dataset's folder."""

    kind: Literal["mwvd", "rainsynall100", "hazeworld", "rvsd", "folders"] = Field(
        description="folders: <Set>/{Train,Test}/<video>/ with <Set>/{Train,Test}_GT/<video>/"
    )
    root: Path
    weather: Literal["haze", "rain", "snow"] | None = Field(
        None, description="weather of every clip, for datasets of one weather (mwvd may map per clip)"
    )
    weather_map: Path | None = Field(None, description="mwvd: file of '<clip> <weather>' lines")
    input_folder: str | None = Field(
        None, description="rainsynall100: Rain_Haze (default) or Rain; rvsd: name of the snowy folder"
    )
    include_test_in_train: bool = Field(
        False, description="rainsynall100: keep test ids 0900-0999 found in the train folder (leaks)"
    )


class ClipsConfig(Section):
    """How source videos are cut into clips and split into train, val and test (no source video in two)."""

    clip_len: Int = Field(10, ge=1)
    seed: Int = Field(0, ge=0)
    train_per_weather: Int = Field(12, ge=0, description="0 = every clip of the training videos")
    val_per_weather: Int = Field(
        3, ge=0, description="validation clips carved from the training videos; 0 = those of one video per weather"
    )
    test_per_weather: Int = Field(3, ge=0, description="0 = every clip of the test videos")
    test_fraction: Float = Field(0.25, gt=0, lt=1, description="share of source videos sent to test")
    respect_source_split: bool = Field(True, description="keep a dataset's own train/val/test assignment")


class DataConfig(Section):
    root: Path = Path("data")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="real datasets to import; [] = the built-in generator"
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    clips: ClipsConfig = ClipsConfig()
    workers: Int = Field(0, ge=0, description="processes for generation and writing; 0 = all cores")

    @model_validator(mode="after")
    def _enough_videos(self) -> DataConfig:
        """The generator must film enough videos of each weather to give train, val and test their own."""
        if self.sources:
            return self
        synthetic, clips = self.synthetic, self.clips
        per_video = synthetic.frames_per_video // clips.clip_len
        if not per_video:
            raise _rule(
                ("synthetic", "frames_per_video"),
                f"it is shorter than data.clips.clip_len {clips.clip_len}: no video gives a clip; raise it",
            )
        targets = (clips.train_per_weather, clips.val_per_weather, clips.test_per_weather)
        needed = sum(max(math.ceil(target / per_video), 1) for target in targets)
        distinct = min(synthetic.videos_per_weather, len(synthetic.photographs) or synthetic.videos_per_weather)
        if distinct < needed:
            field = "videos_per_weather" if distinct == synthetic.videos_per_weather else "photographs"
            raise _rule(
                ("synthetic", field),
                f"each weather has {distinct} source videos, but train, val and test need {needed} of their own "
                f"(data.clips train/val/test_per_weather {'/'.join(map(str, targets))} at {per_video} clips per "
                f"video of {synthetic.frames_per_video} frames): raise it or lower data.clips.*_per_weather",
            )
        return self


# --- models -------------------------------------------------------------------------------------------------


class DynStaticNetConfig(Section):
    """DynStaticNet's constructor arguments (the paper's defaults). Levels 1, 2 and 3 (the bottleneck) have
    dim, 2·dim and 4·dim channels; every block halves them into a static and a dynamic branch, and each
    branch's channels split into that level's heads."""

    dim: Int = Field(24, ge=2)
    heads: tuple[Count, Count, Count] = Field((1, 2, 4), description="attention heads of levels 1, 2, 3")
    blocks: tuple[Blocks, Blocks, Blocks] = Field((4, 6, 8), description="blocks of levels 1, 2, 3")
    refinement_blocks: Int = Field(4, ge=0)
    refinement_heads: Int = Field(2, ge=1)
    window: Int = Field(8, ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> DynStaticNetConfig:
        if self.dim % 2:
            raise _rule("dim", "every block halves it into a static and a dynamic branch: it must be even")
        levels = [
            (f"heads[{i}]", f"level {i + 1}", heads, blocks, 2**i * self.dim // 2)
            for i, (heads, blocks) in enumerate(zip(self.heads, self.blocks, strict=True))
        ]
        refinement = (self.refinement_heads, self.refinement_blocks, self.dim // 2)
        levels.append(("refinement_heads", "the refinement", *refinement))
        for name, level, heads, blocks, branch in levels:
            if blocks and branch % heads:  # a level without blocks has no attention
                raise _rule(
                    name.split("[")[0],
                    f"with dim {self.dim}, each branch of {level} has {branch} channels, which do not split into "
                    f"{name} = {heads} heads: choose dim and heads so that they divide",
                )
        return self


class DwGNConfig(Section):
    """DwGN's constructor arguments (the paper's defaults). Its four levels have dim, 2·dim, 4·dim and 8·dim
    channels, each split into heads of head_dim channels and into fgroup groups of the weight generator."""

    dim: Int = Field(32, ge=16, description="at least 16: the feed-forward's mixing layer has dim // 16 units")
    encoder_blocks: tuple[Blocks, Blocks, Blocks] = (4, 4, 6)
    bottleneck_blocks: Int = Field(8, ge=0)
    decoder_blocks: tuple[Blocks, Blocks, Blocks] = (6, 4, 4)
    head_dim: Int = Field(32, ge=1)
    window: Int = Field(8, ge=1)
    fgroup: Int = Field(16, ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> DwGNConfig:
        for name, divisor in (("head_dim", self.head_dim), ("fgroup", self.fgroup)):
            if self.dim % divisor:
                raise _rule("dim", f"it must be a multiple of {name} ({divisor}), or its channels do not split")
        return self


class ModelsConfig(Section):
    dynstaticnet: DynStaticNetConfig = DynStaticNetConfig()
    dwgn: DwGNConfig = DwGNConfig()


# --- training and later stages ----------------------------------------------------------------------------


class TrainConfig(Section):
    """One model's training recipe (Adam, cosine annealing to lr_min over the iterations, random crops,
    flips and 90-degree rotations). `batch_size` is global: under torchrun each process takes its share."""

    iterations: Int = Field(300, ge=1)
    batch_size: Int = Field(1, ge=1, description="clips (DynStaticNet) or frames (DwGN) per step, all processes")
    crop: Int = Field(64, ge=8, description="side of the random square crop")
    clip_frames: Int = Field(5, ge=1, description="frames per training clip (DynStaticNet; unused by DwGN)")
    lr: Float = Field(2e-4, gt=0)
    lr_min: Float = Field(1e-7, ge=0, description="learning rate reached at the last iteration (cosine)")
    warmup: Float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of the iterations that ramp the learning rate linearly up to lr before the cosine "
        "(a share, so a run of any length keeps it); 0 = none",
    )
    grad_clip: Float = Field(0.0, ge=0, description="clip the gradients' global L2 norm to this; 0 = no clipping")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam's decay rates, each in [0, 1)")
    loss: Literal["psnr", "charbonnier", "l1"] = "psnr"
    init: Literal["identity", "random"] = Field(
        "identity",
        description="identity: the last convolution before the global residual starts at zero, so the untrained "
        "network returns its input and a short training starts from the input's PSNR; random: PyTorch's default",
    )
    seed: Int = Field(0, ge=0)
    workers: Int = Field(1, ge=0, description="data-loading processes; 0 = in the training process")
    log_every: Int = Field(1, ge=1, description="iterations between loss/lr rows (train.csv, MLflow)")
    checkpoint_every: Int = Field(50, ge=1)
    validate_every: Int = Field(100, ge=1)
    val_clips: Int = Field(3, ge=1, description="validation clips (spread over the weathers) in the validation PSNR")
    val_frames: Int = Field(5, ge=1, description="frames of each validation clip, full size")
    ema_decay: Float = Field(
        0.0,
        ge=0,
        lt=1,
        description="exponential moving average of the weights (0 = off); validated, kept as best.pt and "
        "exported in place of the raw weights when on",
    )
    use: Literal["last", "best"] = Field(
        "best",
        description="the weights evaluate, export and register use: best.pt (highest validation PSNR) or the "
        "last checkpoint",
    )
    compile: bool = Field(False, description="torch.compile the model (needs a C++ compiler on CPU)")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="autocast precision; auto = bf16 on GPUs that support it, else fp16; off on CPU"
    )
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower; for tests)")
    peer_timeout: Int = Field(
        600,
        ge=1,
        description="under torchrun, seconds a process waits for the others at a step before the training fails "
        "(how long a lost node can go unnoticed); keep it above process 0's longest validation plus checkpoint",
    )

    @model_validator(mode="after")
    def _lr(self) -> TrainConfig:
        if self.lr_min > self.lr:
            raise _rule("lr_min", f"it is above lr {self.lr}: the cosine schedule decays from lr down to lr_min")
        return self


class DynStaticNetTrainConfig(TrainConfig):
    """DynStaticNet's recipe (README): PSNR loss, cosine 2e-4 -> 1e-7, clips of frames (the paper: 10)."""

    clip_frames: Int = Field(3, ge=1, description="frames per training clip")


class DwGNTrainConfig(TrainConfig):
    """DwGN's recipe: L1 loss, cosine 2e-4 -> 1e-6, batches of single frames."""

    batch_size: Int = Field(1, ge=1, description="frames per step, all processes (the paper: 8)")
    loss: Literal["psnr", "charbonnier", "l1"] = "l1"
    lr_min: Float = Field(1e-6, ge=0, description="learning rate reached at the last iteration (cosine)")


class TrainingConfig(Section):
    """Per model; the defaults are the quickstart (minutes on a 2-core CPU). One class per model, so that a
    partial section in params.yaml keeps that model's own defaults. The papers' full schedule: DynStaticNet
    500,000 iterations, batch 8 (1 per GPU), crop 128, 10-frame clips, cosine 2e-4 -> 1e-7, PSNR loss; DwGN
    600 epochs, batch 8, crop 128, cosine 2e-4 -> 1e-6, L1 loss."""

    dynstaticnet: DynStaticNetTrainConfig = DynStaticNetTrainConfig()
    dwgn: DwGNTrainConfig = DwGNTrainConfig()


class EvaluationConfig(Section):
    max_clips: Int = Field(0, ge=0, description="0 = every test clip")
    lpips: bool = True
    flops_size: tuple[Count, Count] = Field((128, 128), description="height, width of the GFLOPs measurement")
    temporal: bool = Field(True, description="warping and flicker errors (TV-L1 flows of the clean clips, cached)")


class ExportExporters(Section):
    """Which torch.onnx exporter each model goes through. Both default to the TorchScript tracer: dynamo's
    (torch.export) symbolic-shape export took 578 s for DynStaticNet and about 20 minutes for DwGN on a 2-core
    CPU, against about 2 minutes traced, for the same parity. A tracer bakes in any Python branch on a size; the
    export stage checks parity on a second, ragged size, so such a graph is refused, never shipped."""

    dynstaticnet: Literal["dynamo", "torchscript"] = "torchscript"
    dwgn: Literal["dynamo", "torchscript"] = "torchscript"


class ExportConfig(Section):
    """ONNX export: opset, the parity the stage demands against PyTorch, and the latency measurement."""

    opset: Int = Field(18, ge=17)
    atol: Float = Field(1e-4, gt=0, description="max |ONNX Runtime - PyTorch| on a real test clip")
    psnr_tolerance_db: Float = Field(0.01, gt=0, description="max PSNR difference between the two runtimes")
    exporter: ExportExporters = ExportExporters()
    latency_repeats: Int = Field(3, ge=1, description="timed runs per runtime (the median is reported)")

    def exporter_for(self, model_name: str) -> str:
        return getattr(self.exporter, model_name.lower())


class TrackingConfig(Section):
    """MLflow: one run per training. With no MLFLOW_TRACKING_URI, an embedded store in the project
    (`mlflow ui --backend-store-uri sqlite:///mlflow.db` opens it); paths are relative to the project root."""

    enabled: bool = Field(True, description="false: no MLflow run (quick experiments, tests)")
    experiment: str = Field("weather-restore", min_length=1)
    store: Path = Field(Path("mlflow.db"), description="SQLite file of the embedded store")
    artifacts: Path = Field(Path("mlartifacts"), description="artifact folder of the embedded store")


class RegistryConfig(Section):
    min_delta: Float = Field(0.05, ge=0, description="dB of test PSNR a new version must gain")
    weather_tolerance: Float = Field(0.2, ge=0, description="dB any weather may lose")
    temporal_tolerance: Float | None = Field(
        None, ge=0, description="how much worse (0.1 = 10%) any weather's warping or flicker error may be; null = off"
    )


class Params(Section):
    """The whole of params.yaml."""

    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()


def _value_at(raw: Any, loc: tuple[Any, ...]) -> str:
    """` = <value>` of the key at `loc`; empty for a key left at its default (a rule between fields may name one)."""
    for part in loc:
        if not isinstance(raw, dict | list) or (isinstance(raw, dict) and part not in raw):
            return ""
        raw = raw[part]
    return f" = {raw!r}"


def _describe(raw: dict[str, Any], key_loc: tuple[Any, ...], errors: list[dict[str, Any]], source: str) -> str:
    """One line for one key: its problems, with the items of a list (betas, ranges) together."""
    key = ".".join(str(part) for part in key_loc) or "(top level)"
    first = errors[0]
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' (check the spelling; `weather-restore params` lists every key)"
    if first["type"] == "missing":
        return f"{source}: '{key}' is required"
    reasons = []
    for error in errors:
        reason = error["msg"].removeprefix("Value error, ")
        if len(error["loc"]) > len(key_loc):  # an item of a list
            reason = f"item {error['loc'][-1]}: {reason}"
        reasons.append(reason)
    return f"{source}: '{key}'{_value_at(raw, key_loc)} is not allowed: {'; '.join(reasons)}"


def _key_of(error: dict[str, Any]) -> tuple[Any, ...]:
    """The key an error is about: a list's items count as the list; a rule between fields, as its field."""
    loc = tuple(error["loc"])
    if error["type"] == "section_rule":
        field = error["ctx"]["field"]
        return (*loc, *(field if isinstance(field, tuple) else (field,)))
    if loc and isinstance(loc[-1], int):
        return loc[:-1]
    return loc


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a parsed params mapping; every problem is listed, one line per key, with its value and what is
    allowed."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for problem in error.errors():
            by_key.setdefault(_key_of(problem), []).append(problem)
        lines = [_describe(raw, key, problems, source) for key, problems in by_key.items()]
        raise ConfigError("\n".join(lines)) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        hint = " (run from the repository root or pass --params FILE)" if path == DEFAULT_PARAMS else ""
        raise ConfigError(f"{path}: no such params file{hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_params(raw, str(path))
