"""Records that flow between the data stages: one source video (degraded frames and their ground truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Weather = Literal["haze", "rain", "snow"]
WEATHERS: tuple[Weather, ...] = ("haze", "rain", "snow")
Split = Literal["train", "val", "test"]


class VideoRecord(BaseModel):
    """One source video: paired degraded/clean frame files in temporal order, and where they came from.

    `source_video` names the clean footage the video was made from: every video sharing it (the same scene at
    several haze densities, several camera paths over one photograph) must land in the same split.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_id: str = Field(description="unique, path-safe id, e.g. 'synthetic/rain/astronaut-00'")
    weather: Weather
    source: str = Field(description="dataset name: synthetic, mwvd, rainsynall100, hazeworld, rvsd")
    source_video: str = Field(description="id of the clean footage; the unit of the train/val/test split")
    split: Split | None = Field(default=None, description="the split the dataset itself assigns, if any")
    input_frames: list[Path]
    gt_frames: list[Path]
    params: dict[str, Any] = Field(default_factory=dict, description="weather parameters, when known")
    physics: Path | None = Field(default=None, description="npz of t, A and the weather layer, when known")

    @property
    def n_frames(self) -> int:
        return len(self.input_frames)
