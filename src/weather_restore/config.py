"""params.yaml -> typed, validated config objects. The only module that reads params.yaml.

Every section is a pydantic model that forbids unknown keys, so a typo stops the run with a message naming the
key, the value and what is allowed, instead of silently falling back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from weather_restore.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"range [{pair[0]}, {pair[1]}] has low > high")
    return pair


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
"""A closed interval `[low, high]` from which a parameter is drawn once per video."""


# --- data: the built-in generator -------------------------------------------------------------------------


class HazeConfig(Section):
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), d the depth normalised to [0, 1]."""

    beta: Range = (2.6, 4.6)
    airlight: Range = (0.75, 0.95)
    tint: float = Field(0.03, ge=0, le=0.2, description="max per-channel deviation of A from grey")
    drift: float = Field(0.1, ge=0, le=0.5, description="max relative drift of beta in space and time")


class RainConfig(Section):
    """Moving streak layers over an accumulation veil: I = clip(J + w S) t + A (1 - t).

    Lengths and speeds are in pixels of a frame whose shorter side is `reference_size`, and scale with the
    frame, so rain looks alike at 128 and at 512 pixels. Layers farther away have shorter, thinner, fainter
    and slower streaks; veil_beta [0, 0] gives streaks only (t = 1).
    """

    streak_length: Range = (20.0, 60.0)
    angle: float = Field(10.0, ge=0, le=45, description="max |angle| from vertical, degrees, per video")
    angle_jitter: float = Field(2.0, ge=0, le=10, description="per-frame jitter of the angle, degrees")
    layers: tuple[int, int] = (2, 3)
    density: Range = Field((0.002, 0.006), description="drops per pixel, all layers together")
    intensity: Range = Field((0.25, 0.6), description="peak brightness w S of the nearest streaks")
    fall_speed: Range = Field((0.25, 0.45), description="advection per frame, in streak lengths")
    veil_beta: Range = (0.0, 2.5)
    airlight: Range = (0.25, 0.95)
    reference_size: int = Field(128, ge=16, description="frame side (px) at which lengths are given")


class SnowConfig(Section):
    """A persistent particle system over a light veil: I = (J t + A (1 - t)) (1 - z) + K z.

    K is raised to the background where that is brighter, so flakes never darken a white sky. Radii, speeds
    and wind are in pixels (per frame) of a frame whose shorter side is `reference_size`, and scale with the
    frame. The nearest layer has the largest, fastest flakes; the farthest has radius[0].
    """

    density: Range = Field((50.0, 250.0), description="flakes per 10,000 px, all layers together")
    layers: tuple[int, int] = (2, 3)
    radius: Range = (1.0, 6.0)
    speed: Range = (2.0, 10.0)
    wind: Range = (-3.0, 3.0)
    brightness: Range = (0.85, 1.0)
    veil_beta: Range = (0.5, 2.0)
    airlight: Range = (0.75, 0.95)
    reference_size: int = Field(128, ge=16, description="frame side (px) at which sizes and speeds are given")


class SyntheticConfig(Section):
    """Clean videos from photographs shipped by installed packages, with physically modelled weather."""

    seed: int = Field(0, ge=0)
    videos_per_weather: int = Field(8, ge=1)
    frames_per_video: int = Field(30, ge=1)
    frame_size: tuple[int, int] = Field((128, 128), description="height, width of the rendered frames")
    photographs: list[str] = Field(default_factory=list, description="skimage photograph names; [] = all")
    haze: HazeConfig = HazeConfig()
    rain: RainConfig = RainConfig()
    snow: SnowConfig = SnowConfig()

    @model_validator(mode="after")
    def _size(self) -> SyntheticConfig:
        if min(self.frame_size) < 16:
            raise ValueError(f"frame_size {list(self.frame_size)} is too small: both sides must be >= 16")
        return self


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
    """How source videos are cut into clips and split into train and test."""

    clip_len: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    train_per_weather: int = Field(12, ge=0)
    test_per_weather: int = Field(3, ge=0)
    test_fraction: float = Field(0.25, gt=0, lt=1, description="share of source videos sent to test")
    respect_source_split: bool = Field(True, description="keep a dataset's own train/test assignment")


class DataConfig(Section):
    root: Path = Path("data")
    sources: list[SourceConfig] = Field(
        default_factory=list, description="real datasets to import; [] = the built-in generator"
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    clips: ClipsConfig = ClipsConfig()
    workers: int = Field(0, ge=0, description="processes for generation and writing; 0 = all cores")


# --- models -------------------------------------------------------------------------------------------------


class DynStaticNetConfig(Section):
    """DynStaticNet's constructor arguments (the paper's defaults)."""

    dim: int = Field(24, ge=2)
    heads: tuple[int, int, int] = (1, 2, 4)
    blocks: tuple[int, int, int] = (4, 6, 8)
    refinement_blocks: int = Field(4, ge=0)
    refinement_heads: int = Field(2, ge=1)
    window: int = Field(8, ge=1)


class DwGNConfig(Section):
    """DwGN's constructor arguments (the paper's defaults)."""

    dim: int = Field(32, ge=2)
    encoder_blocks: tuple[int, int, int] = (4, 4, 6)
    bottleneck_blocks: int = Field(8, ge=0)
    decoder_blocks: tuple[int, int, int] = (6, 4, 4)
    head_dim: int = Field(32, ge=1)
    window: int = Field(8, ge=1)
    fgroup: int = Field(16, ge=1)


class ModelsConfig(Section):
    dynstaticnet: DynStaticNetConfig = DynStaticNetConfig()
    dwgn: DwGNConfig = DwGNConfig()


# --- training and later stages ----------------------------------------------------------------------------


class TrainConfig(Section):
    """One model's training recipe (Adam, cosine annealing to lr_min over the iterations, random crops,
    flips and 90-degree rotations). `batch_size` is global: under torchrun each process takes its share."""

    iterations: int = Field(300, ge=1)
    batch_size: int = Field(1, ge=1, description="clips (DynStaticNet) or frames (DwGN) per step, all processes")
    crop: int = Field(64, ge=8, description="side of the random square crop")
    clip_frames: int = Field(5, ge=1, description="frames per training clip (DynStaticNet; unused by DwGN)")
    lr: float = Field(2e-4, gt=0)
    lr_min: float = Field(1e-7, ge=0, description="learning rate reached at the last iteration (cosine)")
    betas: tuple[float, float] = (0.9, 0.999)
    loss: Literal["psnr", "charbonnier", "l1"] = "psnr"
    init: Literal["identity", "random"] = Field(
        "identity",
        description="identity: the last convolution before the global residual starts at zero, so the untrained "
        "network returns its input and a short training starts from the input's PSNR; random: PyTorch's default",
    )
    seed: int = Field(0, ge=0)
    workers: int = Field(1, ge=0, description="data-loading processes; 0 = in the training process")
    log_every: int = Field(1, ge=1, description="iterations between loss/lr rows (train.csv, MLflow)")
    checkpoint_every: int = Field(50, ge=1)
    validate_every: int = Field(100, ge=1)
    val_clips: int = Field(3, ge=1, description="test clips (spread over the weathers) in the validation PSNR")
    val_frames: int = Field(5, ge=1, description="frames of each validation clip, full size")
    compile: bool = Field(False, description="torch.compile the model (needs a C++ compiler on CPU)")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="autocast precision; auto = bf16 on GPUs that support it, else fp16; off on CPU"
    )
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower; for tests)")

    @model_validator(mode="after")
    def _lr(self) -> TrainConfig:
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min {self.lr_min} is above lr {self.lr}")
        return self


class DynStaticNetTrainConfig(TrainConfig):
    """DynStaticNet's recipe (README): PSNR loss, cosine 2e-4 -> 1e-7, clips of frames (the paper: 10)."""

    clip_frames: int = Field(3, ge=1, description="frames per training clip")


class DwGNTrainConfig(TrainConfig):
    """DwGN's recipe: L1 loss, cosine 2e-4 -> 1e-6, batches of single frames."""

    batch_size: int = Field(1, ge=1, description="frames per step, all processes (the paper: 8)")
    loss: Literal["psnr", "charbonnier", "l1"] = "l1"
    lr_min: float = Field(1e-6, ge=0, description="learning rate reached at the last iteration (cosine)")


class TrainingConfig(Section):
    """Per model; the defaults are the quickstart (minutes on a 2-core CPU). One class per model, so that a
    partial section in params.yaml keeps that model's own defaults. The papers' full schedule: DynStaticNet
    500,000 iterations, batch 8 (1 per GPU), crop 128, 10-frame clips, cosine 2e-4 -> 1e-7, PSNR loss; DwGN
    600 epochs, batch 8, crop 128, cosine 2e-4 -> 1e-6, L1 loss."""

    dynstaticnet: DynStaticNetTrainConfig = DynStaticNetTrainConfig()
    dwgn: DwGNTrainConfig = DwGNTrainConfig()


class EvaluationConfig(Section):
    max_clips: int = Field(0, ge=0, description="0 = every test clip")
    lpips: bool = True
    flops_size: tuple[int, int] = (128, 128)


class ExportExporters(Section):
    """Which torch.onnx exporter each model goes through. Both default to the TorchScript tracer: dynamo's
    (torch.export) symbolic-shape export took 578 s for DynStaticNet and about 20 minutes for DwGN on a 2-core
    CPU, against about 2 minutes traced, for the same parity. A tracer bakes in any Python branch on a size; the
    export stage checks parity on a second, ragged size, so such a graph is refused, never shipped."""

    dynstaticnet: Literal["dynamo", "torchscript"] = "torchscript"
    dwgn: Literal["dynamo", "torchscript"] = "torchscript"


class ExportConfig(Section):
    """ONNX export: opset, the parity the stage demands against PyTorch, and the latency measurement."""

    opset: int = Field(18, ge=17)
    atol: float = Field(1e-4, gt=0, description="max |ONNX Runtime - PyTorch| on a real test clip")
    psnr_tolerance_db: float = Field(0.01, gt=0, description="max PSNR difference between the two runtimes")
    exporter: ExportExporters = ExportExporters()
    latency_repeats: int = Field(3, ge=1, description="timed runs per runtime (the median is reported)")

    def exporter_for(self, model_name: str) -> str:
        return getattr(self.exporter, model_name.lower())


class TrackingConfig(Section):
    """MLflow: one run per training. With no MLFLOW_TRACKING_URI, an embedded store in the project
    (`mlflow ui --backend-store-uri sqlite:///mlflow.db` opens it); paths are relative to the project root."""

    enabled: bool = Field(True, description="false: no MLflow run (quick experiments, tests)")
    experiment: str = Field("weather-restore", min_length=1)
    store: Path = Field(Path("mlflow.db"), description="SQLite file of the embedded store")
    artifacts: Path = Field(Path("mlartifacts"), description="artifact folder of the embedded store")
    model_format: Literal["auto", "pickle"] = Field(
        "auto",
        description="auto: a torch.export graph (pt2) when it holds for every input shape, else pickle; "
        "pickle: skip the export attempt",
    )


class RegistryConfig(Section):
    min_delta: float = Field(0.05, ge=0, description="dB of test PSNR a new version must gain")
    weather_tolerance: float = Field(0.2, ge=0, description="dB any weather may lose")


class Params(Section):
    """The whole of params.yaml."""

    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()


def _describe(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' (check the spelling; see params.yaml for the allowed keys)"
    if error["type"] == "missing":
        return f"{source}: '{key}' is required"
    return f"{source}: '{key}' = {error.get('input')!r} is not allowed: {error['msg']}"


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a parsed params mapping; every problem is listed with its key, value and what is allowed."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        lines = [_describe(e, source) for e in error.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))
