"""Restore a clip that fits in memory with a PyTorch module: the helper validation (train) and evaluation share.

Footage of any length and size goes through `windows.restore_frames` with a model from `model_loading`.
"""

from __future__ import annotations

import torch
from torch import nn

from weather_restore.models.facts import model_facts


@torch.no_grad()
def restore_clip(model: nn.Module, model_name: str, degraded: torch.Tensor, frames_per_batch: int = 10) -> torch.Tensor:
    """Restore one clip (T, 3, H, W) in [0, 1]; returns (T, 3, H, W) clamped to [0, 1] on the input's device.

    The video model sees the whole clip at once; the image model sees its frames in batches.
    """
    if degraded.ndim != 4 or degraded.shape[1] != 3:
        raise ValueError(f"expected a clip (T, 3, H, W), got {tuple(degraded.shape)}")
    if model_facts(model_name).video:
        restored = model(degraded.unsqueeze(0)).squeeze(0)
    else:
        restored = torch.cat([model(chunk) for chunk in degraded.split(frames_per_batch)])
    return restored.clamp(0, 1)
