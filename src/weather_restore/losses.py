"""Training losses on restored/clean frames in [0, 1], shaped (..., C, H, W): every loss is minimised."""

from __future__ import annotations

from collections.abc import Callable

import torch

from weather_restore.metrics import psnr

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def psnr_loss(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Negative PSNR averaged over frames and batch (the reference's loss, per frame as it should be)."""
    return -psnr(restored, clean, eps=1e-8).mean().to(restored.dtype)


def charbonnier_loss(restored: torch.Tensor, clean: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """sqrt((x - y)^2 + eps^2), averaged: L1 with a smooth minimum."""
    return torch.sqrt((restored - clean).pow(2) + eps * eps).mean()


def l1_loss(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return (restored - clean).abs().mean()


LOSSES: dict[str, Loss] = {"psnr": psnr_loss, "charbonnier": charbonnier_loss, "l1": l1_loss}
